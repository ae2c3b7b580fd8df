//! The upstream: the fixture apps as plain host processes on loopback, each in a cgroup of its
//! own with the runtime's CPU gate on it, killed and their cgroups removed at the end.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;

use anyhow::{Context, Result, anyhow, bail};
use lull_daemon::host::real::InstanceCpu;
use lull_proxy::gate::CpuControl;
use lull_runtime::cgroup::{
    CgroupLayout, Controller, CpuGate, CpuLimit, InstanceCgroup, V1Hierarchies,
};
use lull_tests::scratch::unique_name;

use crate::conn::get_once;
use crate::{HOST, START_DEADLINE};

pub(crate) struct App {
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
    pub(crate) cgroup: InstanceCgroup,
    pub(crate) gate: Arc<CgroupCpu>,
}

/// The fixture apps of this run. Dropping it kills them (after restoring their CPU) and removes
/// their cgroups, whether the run finished or not.
pub(crate) struct Apps {
    layout: CgroupLayout,
    pub(crate) apps: Vec<App>,
    /// Cgroups made, removed at the end (also those whose app failed to start).
    cgroups: Vec<InstanceCgroup>,
    pub(crate) body_len: usize,
}

impl Apps {
    pub(crate) fn new() -> Result<Apps> {
        let layout = match CgroupLayout::host().context("read the host's cgroup layout")? {
            // Only the CPU hierarchies: the apps' memory, pids and freezer cgroups are left
            // where the machine put them.
            CgroupLayout::V1(h) => CgroupLayout::V1(V1Hierarchies {
                cpu: h.cpu,
                cpuacct: h.cpuacct,
                ..V1Hierarchies::default()
            }),
            v2 => v2,
        };
        Ok(Apps {
            layout,
            apps: Vec::new(),
            cgroups: Vec::new(),
            body_len: 0,
        })
    }

    /// Starts the fixture app (`SPIN=1` if `spin`) on a free loopback port, in a new cgroup,
    /// with its CPU gate open (restored).
    pub(crate) fn start(&mut self, app: &Path, spin: bool) -> Result<&App> {
        let name = unique_name("lull-bench-proxy");
        let cgroup = InstanceCgroup::new(&self.layout, Path::new(&format!("/{name}")))
            .with_context(|| format!("cgroup /{name}"))?;
        cgroup.create()?;
        self.cgroups.push(cgroup.clone());
        if cgroup.controller_dir(Controller::Cpu).is_none() {
            bail!("the host has no cpu cgroup controller");
        }
        let gate = CpuGate::open(&cgroup, lull_runtime::instance::gate_limit())
            .with_context(|| format!("open the cpu gate of /{name}"))?;
        let gate = Arc::new(CgroupCpu {
            cpu: InstanceCpu::new(gate, cgroup.clone()),
            cgroup: cgroup.clone(),
        });
        gate.restore()
            .map_err(|e| anyhow!("restore /{name}: {e}"))?;
        let port = lull_tests::bench_util::free_port()?;
        let mut command = Command::new(app);
        lull_tests::bench_util::die_with_parent(&mut command);
        command
            .env("PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if spin {
            command.env("SPIN", "1");
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("start {}", app.display()))?;
        let stdout = child.stdout.take();
        // Into the list first, so that it is killed whatever happens next.
        self.apps.push(App {
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            cgroup: cgroup.clone(),
            gate,
        });
        let index = self.apps.len() - 1;
        let pid = self.apps[index].child.id();
        cgroup
            .add_process(pid)
            .with_context(|| format!("move the fixture app (pid {pid}) into /{name}"))?;
        let stdout = stdout.context("the fixture app's stdout was not piped")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let read = BufReader::new(stdout).read_line(&mut line).map(|_| line);
            let _ = tx.send(read);
        });
        let line = rx
            .recv_timeout(START_DEADLINE)
            .map_err(|_| anyhow!("the fixture app did not start listening in {START_DEADLINE:?}"))?
            .context("read the fixture app's output")?;
        if line.trim() != format!("listening on :{port}") {
            bail!("the fixture app printed {line:?}, not `listening on :{port}`");
        }
        let addr = self.apps[index].addr;
        let (status, body_len) = get_once(addr, HOST)?;
        if status != 200 {
            bail!("the fixture app at {addr} answered {status} to GET /");
        }
        self.body_len = body_len;
        Ok(&self.apps[index])
    }

    /// Kills the apps and removes their cgroups; an error if a cgroup stays.
    pub(crate) fn stop(&mut self) -> Result<()> {
        for app in &mut self.apps {
            // A throttled app needs its CPU to die quickly.
            let _ = app.gate.restore();
            let _ = app.child.kill();
            let _ = app.child.wait();
        }
        self.apps.clear();
        let mut failed = Vec::new();
        for cgroup in self.cgroups.drain(..) {
            if let Err(e) = cgroup.remove() {
                failed.push(format!("{}: {e}", cgroup.cgroups_path().display()));
            }
        }
        if !failed.is_empty() {
            bail!("cgroups left behind: {}", failed.join("; "));
        }
        Ok(())
    }
}

impl Drop for Apps {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("lull-bench-proxy: {e:#}");
        }
    }
}

/// The daemon's CPU control of an instance (the runtime's gate, the cgroup's usage counter),
/// and the cgroup to check its quota in.
pub(crate) struct CgroupCpu {
    cpu: InstanceCpu,
    cgroup: InstanceCgroup,
}

impl CgroupCpu {
    /// Whether the cgroup's quota file holds the throttled limit right now.
    pub(crate) fn quota_is_throttled(&self) -> Result<bool> {
        let throttled = CpuLimit::THROTTLED;
        let dir = self
            .cgroup
            .controller_dir(Controller::Cpu)
            .context("no cpu controller")?;
        if self.cgroup.is_v2() {
            let path = dir.join("cpu.max");
            let value =
                fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
            Ok(value.trim() == throttled.cpu_max_value())
        } else {
            let path = dir.join("cpu.cfs_quota_us");
            let value =
                fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
            Ok(value.trim() == throttled.cfs_quota_value())
        }
    }
}

impl CpuControl for CgroupCpu {
    fn restore(&self) -> Result<(), String> {
        self.cpu.restore()
    }

    fn throttle(&self) -> Result<(), String> {
        self.cpu.throttle()
    }

    fn usage_ns(&self) -> Option<u64> {
        self.cpu.usage_ns()
    }
}
