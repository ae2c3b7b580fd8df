//! Privileged: the daemon's real host gives an instance a secret as a file (its content and
//! mode 0400 inside, owned by the app's user, on a tmpfs and nowhere on disk), mounts a
//! read-only volume that the app cannot write (EROFS), and keeps the logs of a removed instance
//! where `logs` still finds them. Preconditions: root, the registry on 127.0.0.1:5000 with the
//! fixture images.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lull_daemon::host::real::{RealHost, RealHostConfig};
use lull_daemon::host::{InstanceHost, SecretFile, StartRequest, VolumeMount, instance_id};
use lull_daemon::secrets::SecretValue;
use lull_netns::network::InstanceNetwork;
use lull_tests::e2e::{BUSYBOX, FIXTURE_APP, TestRuntime, reference, require_registry};
use lull_tests::host_net::Host;
use lull_tests::scratch::mounts_under;

/// The secret; never printed in clear by the instance (its logs are on disk).
const SECRET: &str = "correct-horse-battery-staple";

/// What the instance prints instead: each of a-y shifted to the next letter (`tr a-y b-z`).
fn shifted(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            'a'..='y' => (c as u8 + 1) as char,
            other => other,
        })
        .collect()
}

/// Checks what a busybox instance sees, one `key=value` line each, then idles.
const SCRIPT: &str = r#"
echo "secret=$(tr a-y b-z < /run/secrets/db)"
echo "mode=$(stat -c '%a %u %g' /run/secrets/db)"
echo "conf=$(cat /etc/app/settings)"
if touch /etc/app/new 2>/tmp/err; then echo conf-write=allowed; else echo "conf-write=$(cat /tmp/err)"; fi
if echo x 2>/tmp/err > /run/secrets/db; then echo secret-write=allowed; else echo "secret-write=$(cat /tmp/err)"; fi
echo data > /data/out && echo data-write=ok
echo done
exec sleep 60
"#;

/// Every file under `dir` (not following symlinks, skipping `skip`) whose bytes hold `needle`.
fn files_holding(dir: &Path, skip: &Path, needle: &[u8], found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.starts_with(skip) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            files_holding(&path, skip, needle, found);
        } else if meta.is_file()
            && meta.len() < 64 << 20
            && let Ok(bytes) = std::fs::read(&path)
            && bytes.windows(needle.len()).any(|w| w == needle)
        {
            found.push(path);
        }
    }
}

fn is_tmpfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .unwrap_or(false)
}

/// The instance's lines once it printed `done` (or its lines so far after `timeout`).
async fn output(real: &RealHost, id: &str, timeout: Duration) -> Vec<String> {
    let started = Instant::now();
    loop {
        let lines: Vec<String> = real
            .logs(id)
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.text)
            .collect();
        if lines.iter().any(|l| l == "done") || started.elapsed() > timeout {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn secret_files_read_only_volumes_and_logs_of_removed_instances() {
    let host = Host::new();
    let zygote = Path::new(env!("CARGO_BIN_EXE_lull-test-zygote"));
    require_registry();
    let t = TestRuntime::new("lull-secvol", zygote);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        for image in [BUSYBOX, FIXTURE_APP] {
            t.runtime
                .store
                .pull(&reference(image), &Default::default())
                .await
                .unwrap();
        }
    });
    host.run(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(scenario(&host, &t));
    });
}

fn request(id: &str, image: &str, command: Option<Vec<String>>) -> StartRequest {
    StartRequest {
        service: "web".into(),
        revision: 1,
        id: id.to_owned(),
        image: image.into(),
        command,
        args: None,
        env: vec![("PORT".into(), "8080".into())],
        port: 8080,
        limits: Default::default(),
        volumes: vec![],
        secret_files: vec![SecretFile {
            target: "/run/secrets/db".into(),
            value: SecretValue::from(SECRET),
        }],
    }
}

async fn scenario(host: &Host, t: &TestRuntime) {
    let network: Arc<dyn InstanceNetwork> = Arc::new(host.start(host.config()));
    let config = RealHostConfig::under(&t.scratch.path().join("daemon"))
        .with_retained_logs_max_bytes(1 << 20);
    let real = RealHost::new(t.runtime.clone(), network.clone(), config.clone()).unwrap();
    let secrets_root = t.runtime.config.run_dir.join("secrets");
    let conf = config.volumes_dir.join("web/conf");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(conf.join("settings"), "from the host").unwrap();

    // A busybox instance (root is its user) with the secret file and two volumes.
    let id = instance_id("web", 1);
    let mut req = request(
        &id,
        BUSYBOX,
        Some(vec!["sh".into(), "-c".into(), SCRIPT.into()]),
    );
    req.volumes = vec![
        VolumeMount {
            name: "conf".into(),
            target: "/etc/app".into(),
            read_only: true,
        },
        VolumeMount {
            name: "data".into(),
            target: "/data".into(),
            read_only: false,
        },
    ];
    real.start(req).await.unwrap();
    let lines = output(&real, &id, Duration::from_secs(15)).await;
    let has = |want: &str| lines.iter().any(|l| l == want);
    assert!(
        has(&format!("secret={}", shifted(SECRET))),
        "the file holds the secret: {lines:?}"
    );
    assert!(has("mode=400 0 0"), "mode 0400, the app's user: {lines:?}");
    assert!(has("conf=from the host"), "{lines:?}");
    let refused = |key: &str| {
        lines
            .iter()
            .any(|l| l.starts_with(key) && l.contains("Read-only file system"))
    };
    assert!(
        refused("conf-write="),
        "EROFS in the read-only volume: {lines:?}"
    );
    assert!(
        refused("secret-write="),
        "EROFS on the secret file: {lines:?}"
    );
    assert!(has("data-write=ok"), "{lines:?}");
    assert_eq!(
        std::fs::read_to_string(config.volumes_dir.join("web/data/out")).unwrap(),
        "data\n"
    );
    assert!(!conf.join("new").exists());

    // On the host: the secret lives on its instance's tmpfs only.
    let dir = secrets_root.join(&id);
    assert!(is_tmpfs(&dir), "{} is not a tmpfs", dir.display());
    let mut found = Vec::new();
    files_holding(t.scratch.path(), &dir, SECRET.as_bytes(), &mut found);
    assert!(found.is_empty(), "the secret is on disk in {found:?}");

    // Removed: the tmpfs goes, the logs stay where `logs` finds them.
    real.stop(&id, Duration::from_secs(2)).await.unwrap();
    real.remove(&id).await.unwrap();
    assert!(!dir.exists());
    assert!(mounts_under(&secrets_root).is_empty());
    assert!(!t.runtime.config.instances_dir().join(&id).exists());
    assert_eq!(
        real.retained_logs("web").await.unwrap(),
        std::slice::from_ref(&id)
    );
    let kept: Vec<String> = real
        .logs(&id)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.text)
        .collect();
    assert!(kept.iter().any(|l| l == "data-write=ok"), "{kept:?}");
    assert!(config.retained_logs_dir.join("web").join(&id).is_dir());

    // The fixture app runs as `app` (uid 1000): its secret file is handed to it.
    let id2 = instance_id("web", 2);
    let mut req = request(&id2, FIXTURE_APP, None);
    req.revision = 2;
    real.start(req).await.unwrap();
    let file = secrets_root.join(&id2).join("0");
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (1000, 1000, 0o400),
        "{}",
        file.display()
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), SECRET);
    real.stop(&id2, Duration::from_secs(5)).await.unwrap();
    real.remove(&id2).await.unwrap();
    assert!(mounts_under(&secrets_root).is_empty());
    assert_eq!(
        real.retained_logs("web").await.unwrap(),
        [id.clone(), id2.clone()]
    );

    // The service deleted: its retained logs go.
    real.forget_logs("web").await.unwrap();
    assert!(real.retained_logs("web").await.unwrap().is_empty());
    assert!(real.logs(&id).await.is_err());
}
