//! End-to-end test support: the preconditions CI guarantees (root, the local registry and its
//! fixture images, the fixture layouts), a whole [`Runtime`] over scratch dirs, and guards that
//! delete instances and network namespaces even when a test fails.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lull_netns::NetNs;
use lull_runtime::host::{Runtime, RuntimeConfig};
use lull_runtime::instance::{Instance, InstanceManager};
use lull_runtime::reference::Reference;

use crate::scratch::{CgroupParentGuard, ScratchDir};

/// The local registry `cargo xtask fixtures` pushes to.
pub const REGISTRY: &str = "127.0.0.1:5000";
pub const FIXTURE_APP: &str = "127.0.0.1:5000/lull/fixture-app:latest";
pub const FIXTURE_APP_ZSTD: &str = "127.0.0.1:5000/lull/fixture-app:zstd";
pub const BUSYBOX: &str = "127.0.0.1:5000/lull/busybox:latest";

/// The fixture app's greeting on `/`.
pub const HELLO: &str = "hello from lull fixture\n";

/// The workspace root (the parent of the `tests` crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_owned()
}

/// A file or dir under `target/fixtures/`, which `cargo xtask fixtures` writes; panics with the
/// fix when it is missing.
pub fn fixture_path(name: &str) -> PathBuf {
    let path = workspace_root().join("target/fixtures").join(name);
    assert!(
        path.exists(),
        "precondition failed: fixture {} is missing; run `cargo xtask fixtures` first",
        path.display()
    );
    path
}

/// Panics unless the test runs as root (CI's runner does; these tests never skip).
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "precondition failed: this privileged test must run as root"
    );
}

fn registry_tags(repository: &str) -> Result<String, String> {
    let addr: SocketAddr = REGISTRY.parse().map_err(|e| format!("{e}"))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect to {REGISTRY}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET /v2/{repository}/tags/list HTTP/1.1\r\nHost: {REGISTRY}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("request {repository} tags: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read {repository} tags: {e}"))?;
    let response = crate::http::parse(&raw).map_err(|e| e.to_string())?;
    if response.status != 200 {
        return Err(format!(
            "GET /v2/{repository}/tags/list answered {}",
            response.status
        ));
    }
    Ok(response.body)
}

/// Panics unless the local registry answers and holds every fixture image.
pub fn require_registry() {
    for (repository, tags) in [
        ("lull/fixture-app", &["latest", "zstd"][..]),
        ("lull/busybox", &["latest"][..]),
    ] {
        let body = registry_tags(repository).unwrap_or_else(|e| {
            panic!(
                "precondition failed: the registry at {REGISTRY} must be running with the fixture images ({e}); start it and run `cargo xtask fixtures`"
            )
        });
        for tag in tags {
            assert!(
                body.contains(&format!("\"{tag}\"")),
                "precondition failed: {REGISTRY}/{repository}:{tag} is not in the registry (tags: {body}); run `cargo xtask fixtures`"
            );
        }
    }
}

/// Parses a reference the tests spell out.
pub fn reference(text: &str) -> Reference {
    text.parse()
        .unwrap_or_else(|e| panic!("reference {text:?}: {e}"))
}

/// A runtime over a scratch data dir and run dir, with its own cgroup parent. Fields drop in
/// order: the runtime (and its zygote), then whatever still runs in the test's cgroups is killed
/// and the groups removed, then everything mounted under the scratch dir is unmounted and the
/// dir removed.
pub struct TestRuntime {
    pub runtime: std::sync::Arc<Runtime>,
    pub cgroups: CgroupParentGuard,
    pub scratch: ScratchDir,
}

impl TestRuntime {
    /// `zygote` is the program serving the zygote (tests of this crate pass
    /// `env!("CARGO_BIN_EXE_lull-test-zygote")`).
    pub fn new(prefix: &str, zygote: &Path) -> TestRuntime {
        require_root();
        let scratch = ScratchDir::new(prefix).expect("create scratch dir");
        let cgroups = CgroupParentGuard::new("lull-test");
        let mut config =
            RuntimeConfig::new(scratch.path().join("data"), scratch.path().join("run"))
                .expect("runtime config");
        config.cgroup_parent = cgroups.parent.clone();
        config.zygote_program = zygote.to_owned();
        config.zygote_args = Vec::new();
        let runtime = std::sync::Arc::new(Runtime::open(config).expect("open the runtime"));
        TestRuntime {
            runtime,
            cgroups,
            scratch,
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.runtime.config.data_dir
    }
}

/// A network namespace destroyed when dropped.
pub struct NetNsGuard(Option<NetNs>);

impl NetNsGuard {
    pub fn create(dir: &Path, name: &str) -> NetNsGuard {
        NetNsGuard(Some(NetNs::create(dir, name).unwrap_or_else(|e| {
            panic!("create network namespace {name}: {e}")
        })))
    }

    pub fn netns(&self) -> &NetNs {
        self.0.as_ref().expect("namespace not destroyed yet")
    }

    /// Destroys the namespace now, reporting errors.
    pub fn destroy(mut self) -> Result<(), lull_netns::NetnsError> {
        match self.0.take() {
            Some(netns) => netns.destroy(),
            None => Ok(()),
        }
    }
}

impl Drop for NetNsGuard {
    fn drop(&mut self) {
        if let Some(netns) = self.0.take() {
            let _ = netns.destroy();
        }
    }
}

/// An instance deleted when dropped (killed first if it still runs): what a failing test leaves
/// is removed before the scratch dir goes.
pub struct InstanceGuard<'m> {
    manager: &'m InstanceManager,
    instance: Option<Instance>,
}

impl<'m> InstanceGuard<'m> {
    pub fn new(manager: &'m InstanceManager, instance: Instance) -> Self {
        InstanceGuard {
            manager,
            instance: Some(instance),
        }
    }

    pub fn instance(&self) -> &Instance {
        self.instance.as_ref().expect("instance not deleted yet")
    }

    /// Deletes the instance now, reporting errors.
    pub async fn delete(mut self) -> Result<(), lull_runtime::instance::InstanceError> {
        match self.instance.take() {
            Some(instance) => self.manager.delete(instance).await,
            None => Ok(()),
        }
    }
}

impl std::ops::Deref for InstanceGuard<'_> {
    type Target = Instance;
    fn deref(&self) -> &Instance {
        self.instance()
    }
}

impl Drop for InstanceGuard<'_> {
    fn drop(&mut self) {
        let Some(instance) = self.instance.take() else {
            return;
        };
        let _ = instance.signal(libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !instance.has_exited() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Let the shim record the exit before its dir goes.
        let exit = instance.paths().exit();
        while !exit.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let id = instance.id.clone();
        drop(instance);
        if let Err(e) = self.manager.remove_files(&id) {
            eprintln!("cleanup of instance {id} failed: {e}");
        }
    }
}

/// A TCP port nothing on the host listens on right now (bound and released).
pub fn free_host_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port on the host's loopback")
}

/// True when `text` is an RFC 3339 UTC timestamp as the log store writes it
/// (`YYYY-MM-DDTHH:MM:SS[.fraction]Z`).
pub fn is_rfc3339_utc(text: &str) -> bool {
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        b.get(range.clone())
            .is_some_and(|s| s.iter().all(u8::is_ascii_digit))
    };
    let fixed = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !fixed || b[b.len() - 1] != b'Z' {
        return false;
    }
    let rest = &b[19..b.len() - 1];
    rest.is_empty()
        || (rest[0] == b'.' && rest.len() > 1 && rest[1..].iter().all(u8::is_ascii_digit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_utc_timestamps_are_recognised() {
        for good in ["2026-11-26T06:30:01Z", "2026-11-26T06:30:01.123456789Z"] {
            assert!(is_rfc3339_utc(good), "{good}");
        }
        for bad in [
            "2026-11-26 06:30:01Z",
            "2026-11-26T06:30:01+00:00",
            "2026-11-26T06:30:01.Z",
            "2026-11-26T06:30Z",
            "",
        ] {
            assert!(!is_rfc3339_utc(bad), "{bad}");
        }
    }
}
