//! The host for real: images from the runtime's store (pulled when missing), instances
//! launched by the runtime in network namespaces of their own, their CPU gate handed to the
//! proxy, and labels on disk so a restarted daemon knows whose each running instance is.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lull_netns::network::{AttachRequest, InstanceNetwork, LiveInstance};
use lull_proxy::gate::CpuControl;
use lull_runtime::cgroup::{CpuGate, Gate, InstanceCgroup, Resources, UsageCounter};
use lull_runtime::host::Runtime;
use lull_runtime::instance::{
    ExitStatus, FileBind, Instance, InstanceRequest, ProcessOverrides, Recovered, StartGate,
};
use lull_runtime::logs::{self, LogLimits};
use lull_runtime::pull::{Credentials, PullOptions};
use lull_runtime::reference::Reference;
use serde::{Deserialize, Serialize};

use super::{
    ExecProcess, ExecRequest, ExitInfo, HostError, HostFuture, ImageInfo, InstanceHost, LogLine,
    RecoveredInstance, StartRequest, Started,
};

/// The proxy's `CpuControl` over an instance's CPU gate and its cgroup's usage counter.
pub struct InstanceCpu {
    gate: CpuGate,
    cgroup: InstanceCgroup,
    /// The usage counter kept open; `None` if it could not be opened (then read by path).
    usage: Option<UsageCounter>,
    /// Idle tier 2; `None` where the host has no freezer for the instance.
    freezer: Option<lull_runtime::cgroup::Freezer>,
}

impl InstanceCpu {
    /// The gate and usage counter of an instance, and its freezer when the host has one.
    pub fn new(gate: CpuGate, cgroup: InstanceCgroup) -> InstanceCpu {
        let fs: Arc<dyn lull_runtime::cgroup::CgroupFs> =
            Arc::new(lull_runtime::cgroup::HostCgroupFs);
        let freezer = match lull_runtime::cgroup::Freezer::open(fs, &cgroup) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::debug!(cgroup = %cgroup.cgroups_path().display(), "no freezer: {e}");
                None
            }
        };
        let usage = match cgroup.usage_counter() {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::debug!(cgroup = %cgroup.cgroups_path().display(), "usage counter not kept open: {e}");
                None
            }
        };
        InstanceCpu {
            gate,
            cgroup,
            usage,
            freezer,
        }
    }
}

impl CpuControl for InstanceCpu {
    /// Thaws first: a frozen instance (idle tier 2) would not run on a restored quota, and
    /// callers other than the gate (adoption, rollback, exec, stop) do not know it was frozen.
    fn restore(&self) -> Result<(), String> {
        self.thaw()?;
        self.gate.restore().map(|_| ()).map_err(|e| e.to_string())
    }

    fn throttle(&self) -> Result<(), String> {
        self.gate.throttle().map(|_| ()).map_err(|e| e.to_string())
    }

    fn usage_ns(&self) -> Option<u64> {
        match &self.usage {
            Some(counter) => counter.read_ns().ok(),
            None => self.cgroup.cpu_usage_ns().ok(),
        }
    }

    fn freeze(&self) -> Result<(), String> {
        match &self.freezer {
            Some(f) => f.freeze().map_err(|e| e.to_string()),
            None => Err("no cgroup freezer for this instance".into()),
        }
    }

    fn thaw(&self) -> Result<(), String> {
        match &self.freezer {
            Some(f) => f.thaw().map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}

/// Where the real host keeps its own files, and how it pulls.
#[derive(Debug, Clone)]
pub struct RealHostConfig {
    /// One `<instance id>.json` per instance the daemon started: its service and revision.
    pub labels_dir: PathBuf,
    /// `<service>/<volume>` directories mounted into instances.
    pub volumes_dir: PathBuf,
    pub pull: PullOptions,
    pub log_limits: LogLimits,
    /// `<service>/<instance id>/` log dirs of removed instances, in the runtime's log format.
    pub retained_logs_dir: PathBuf,
    /// Bytes of retained logs kept per service; the oldest go first beyond it.
    pub retained_logs_max_bytes: u64,
}

impl RealHostConfig {
    /// The layout under the daemon's data dir.
    pub fn under(data_dir: &Path) -> RealHostConfig {
        RealHostConfig {
            labels_dir: data_dir.join("daemon/instances"),
            volumes_dir: data_dir.join("volumes"),
            pull: PullOptions::default(),
            log_limits: LogLimits::default(),
            retained_logs_dir: data_dir.join("logs/instances"),
            retained_logs_max_bytes: crate::config::DEFAULT_LOG_MAX_BYTES,
        }
    }

    /// The same, keeping at most `max_bytes` of retained logs per service.
    pub fn with_retained_logs_max_bytes(mut self, max_bytes: u64) -> RealHostConfig {
        self.retained_logs_max_bytes = max_bytes;
        self
    }
}

/// `base` with the stored credentials of `registry` when `lookup` has some and `base` names no
/// explicit credentials. Blocking (the lookup reads the store).
pub fn pull_options_for(
    base: &PullOptions,
    lookup: Option<&RegistryCredentials>,
    registry: &str,
) -> PullOptions {
    let mut options = base.clone();
    if options.credentials.is_some() {
        return options;
    }
    if let Some((username, password)) = lookup.and_then(|lookup| lookup(registry)) {
        tracing::debug!(registry, %username, "pulling with stored credentials");
        options.credentials = Some(Credentials::new(username, password));
    }
    options
}

/// What the daemon records of an instance it started.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Label {
    service: String,
    revision: u64,
    port: u16,
}

/// Stored credentials for a registry host (`host[:port]`, `docker.io` for Docker Hub):
/// `(username, password)`, or `None`. It may block (it reads the state store).
pub type RegistryCredentials = Arc<dyn Fn(&str) -> Option<(String, String)> + Send + Sync>;

pub struct RealHost {
    runtime: Arc<Runtime>,
    network: Arc<dyn InstanceNetwork>,
    config: RealHostConfig,
    live: Mutex<HashMap<String, Arc<Instance>>>,
    credentials: Option<RegistryCredentials>,
}

impl RealHost {
    pub fn new(
        runtime: Arc<Runtime>,
        network: Arc<dyn InstanceNetwork>,
        config: RealHostConfig,
    ) -> Result<RealHost, HostError> {
        for dir in [
            &config.labels_dir,
            &config.volumes_dir,
            &config.retained_logs_dir,
        ] {
            std::fs::create_dir_all(dir).map_err(|e| HostError::Recover {
                reason: format!("create {}: {e}", dir.display()),
            })?;
        }
        Ok(RealHost {
            runtime,
            network,
            config,
            live: Mutex::new(HashMap::new()),
            credentials: None,
        })
    }

    /// Pulls use the credentials `lookup` finds for an image's registry (`lull registry
    /// login`), before any docker config.
    pub fn with_registry_credentials(mut self, lookup: RegistryCredentials) -> RealHost {
        self.credentials = Some(lookup);
        self
    }

    /// The pull options for `reference`: the configured ones, with the stored credentials of
    /// its registry when there are some.
    async fn pull_options(&self, reference: &Reference) -> PullOptions {
        let base = self.config.pull.clone();
        let lookup = self.credentials.clone();
        let registry = reference.registry().to_owned();
        match tokio::task::spawn_blocking(move || {
            pull_options_for(&base, lookup.as_ref(), &registry)
        })
        .await
        {
            Ok(options) => options,
            Err(e) => {
                tracing::warn!(
                    registry = reference.registry(),
                    "registry credentials lookup: {e}"
                );
                self.config.pull.clone()
            }
        }
    }

    fn label_path(&self, id: &str) -> PathBuf {
        self.config.labels_dir.join(format!("{id}.json"))
    }

    fn instance(&self, id: &str) -> Result<Arc<Instance>, HostError> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| HostError::NotFound { id: id.to_owned() })
    }

    async fn image_info(&self, reference: &str) -> Result<ImageInfo, HostError> {
        let image_err = |reason: String| HostError::Image {
            reference: reference.to_owned(),
            reason,
        };
        let parsed: Reference = reference.parse().map_err(|e| image_err(format!("{e}")))?;
        let record = match self
            .runtime
            .store
            .get(&parsed)
            .map_err(|e| image_err(format!("{e}")))?
        {
            Some(record) => record,
            None => self
                .runtime
                .store
                .pull(&parsed, &self.pull_options(&parsed).await)
                .await
                .map_err(|e| image_err(format!("pull: {e}")))?,
        };
        let exposed_port = record
            .config
            .exposed_ports
            .iter()
            .find_map(|p| p.strip_suffix("/tcp").and_then(|n| n.parse().ok()));
        Ok(ImageInfo {
            reference: reference.to_owned(),
            digest: record.manifest_digest.to_string(),
            exposed_port,
        })
    }

    async fn start_instance(&self, req: StartRequest) -> Result<Started, HostError> {
        let id = req.id.clone();
        let fail = |reason: String| HostError::Start {
            id: id.clone(),
            reason,
        };
        lull_runtime::instance::validate_id(&id).map_err(|e| HostError::BadId {
            id: id.clone(),
            reason: e.to_string(),
        })?;
        let parsed: Reference = req
            .image
            .parse()
            .map_err(|e| fail(format!("image {}: {e}", req.image)))?;
        let image = match self.runtime.store.get(&parsed) {
            Ok(Some(image)) => image,
            Ok(None) => {
                self.image_info(&req.image).await?;
                self.runtime
                    .store
                    .get(&parsed)
                    .map_err(|e| fail(e.to_string()))?
                    .ok_or_else(|| fail(format!("image {} vanished after its pull", req.image)))?
            }
            Err(e) => return Err(fail(e.to_string())),
        };
        let layers = self
            .runtime
            .prepare(&image)
            .await
            .map_err(|e| fail(format!("unpack the image: {e}")))?;
        let mut files = Vec::new();
        for volume in &req.volumes {
            let dir = self
                .config
                .volumes_dir
                .join(&req.service)
                .join(&volume.name);
            std::fs::create_dir_all(&dir)
                .map_err(|e| fail(format!("volume dir {}: {e}", dir.display())))?;
            files.push(FileBind {
                read_only: volume.read_only,
                ..FileBind::new(dir, &volume.target)
            });
        }
        if !req.secret_files.is_empty() {
            let dir = self.secrets_dir(&id);
            let secrets = req.secret_files.clone();
            let written = tokio::task::spawn_blocking(move || write_secret_files(&dir, &secrets))
                .await
                .map_err(|e| fail(format!("secret files task: {e}")))?;
            match written {
                Ok(binds) => files.extend(binds),
                Err(e) => {
                    self.remove_secret_files(&id).await;
                    return Err(fail(e.to_string()));
                }
            }
        }
        let label = Label {
            service: req.service.clone(),
            revision: req.revision,
            port: req.port,
        };
        let label_json = serde_json::to_vec(&label).map_err(|e| fail(e.to_string()))?;
        if let Err(e) = std::fs::write(self.label_path(&id), label_json) {
            self.remove_secret_files(&id).await;
            return Err(fail(format!(
                "write {}: {e}",
                self.label_path(&id).display()
            )));
        }

        let network = self.network.clone();
        let attach = AttachRequest {
            instance: id.clone(),
            service: req.service.clone(),
            allow_peers: false,
            hostname: req.service.clone(),
        };
        // The address, namespace and files first (the process is created in the namespace);
        // the veth pair is wired while the instance is created, and its process starts once
        // both are done (see `Instances::launch_when`).
        let attachment = tokio::task::spawn_blocking(move || network.reserve(&attach))
            .await
            .map_err(|e| fail(format!("network task: {e}")))?
            .map_err(|e| fail(format!("network: {e}")));
        let attachment = match attachment {
            Ok(a) => a,
            Err(e) => {
                let _ = std::fs::remove_file(self.label_path(&id));
                self.remove_secret_files(&id).await;
                return Err(e);
            }
        };
        files.extend(
            attachment
                .files()
                .map(|(source, destination)| FileBind::new(source, destination)),
        );
        let request = InstanceRequest {
            id: id.clone(),
            layers,
            image: Runtime::image_process(&image),
            overrides: ProcessOverrides {
                entrypoint: req.command.clone(),
                cmd: req.args.clone(),
                env: req.env.clone(),
                port: Some(req.port),
                user: None,
                working_dir: None,
            },
            resources: Resources {
                cpu: req.limits.cpu,
                memory_bytes: req.limits.memory_bytes,
                pids: req.limits.pids.map(|p| p.min(i64::MAX as u64) as i64),
            },
            netns: Some(attachment.netns.clone()),
            files,
            log_limits: self.config.log_limits,
        };
        let network = self.network.clone();
        let wiring_id = id.clone();
        let (wired_tx, wired_rx) = tokio::sync::oneshot::channel();
        let wiring = tokio::task::spawn_blocking(move || {
            let wired = network.wire(&wiring_id);
            let _ = wired_tx.send(wired.map(drop).map_err(|e| format!("network: {e}")));
        });
        let wired: StartGate = Box::pin(async move {
            wired_rx
                .await
                .unwrap_or_else(|_| Err("network task ended without wiring".into()))
        });
        let instance = match self
            .runtime
            .instances
            .launch_when(request, Some(wired))
            .await
        {
            Ok(instance) => instance,
            Err(e) => {
                // The wiring may still run (a launch can fail before it waits for it): let it
                // finish, so the cleanup removes all of it.
                let _ = wiring.await;
                self.cleanup(&id).await;
                return Err(fail(e.to_string()));
            }
        };
        let gate = match instance.open_gate() {
            Ok(gate) => gate,
            Err(e) => {
                let _ = self.runtime.instances.delete(instance).await;
                self.cleanup(&id).await;
                return Err(fail(format!("cpu gate: {e}")));
            }
        };
        let cpu: Arc<dyn CpuControl> = Arc::new(InstanceCpu::new(gate, instance.cgroup.clone()));
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), Arc::new(instance));
        Ok(Started {
            id,
            addr: SocketAddr::from((attachment.addr, req.port)),
            cpu,
        })
    }

    /// The tmpfs holding an instance's secret files.
    fn secrets_dir(&self, id: &str) -> PathBuf {
        self.runtime.config.run_dir.join("secrets").join(id)
    }

    async fn remove_secret_files(&self, id: &str) {
        let dir = self.secrets_dir(id);
        match tokio::task::spawn_blocking(move || remove_secrets_dir(&dir)).await {
            Ok(Err(e)) => tracing::warn!(instance = id, "remove the secret files: {e}"),
            Err(e) => tracing::warn!(instance = id, "secret files task: {e}"),
            Ok(Ok(())) => {}
        }
    }

    /// Moves a removed instance's log files to the retained logs of its service (then trimmed
    /// to the service's cap), so that `lull logs` still shows them. Failures are logged: the
    /// instance is removed anyway.
    async fn retain_logs(&self, id: &str) {
        let from = self.runtime.config.instances_dir().join(id).join("logs");
        let service = std::fs::read(self.label_path(id))
            .ok()
            .and_then(|b| serde_json::from_slice::<Label>(&b).ok())
            .map(|l| l.service)
            .or_else(|| super::parse_instance_id(id).map(|(s, _)| s.to_owned()));
        let Some(service) = service else {
            return;
        };
        let service_dir = self.config.retained_logs_dir.join(&service);
        let max_bytes = self.config.retained_logs_max_bytes;
        let owned = id.to_owned();
        let moved = tokio::task::spawn_blocking(move || {
            move_logs(&from, &service_dir.join(&owned))?;
            trim_retained(&service_dir, max_bytes)
        })
        .await;
        match moved {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(instance = id, %service, "retain the logs: {e}"),
            Err(e) => tracing::warn!(instance = id, "retain logs task: {e}"),
        }
    }

    /// The retained log dir of removed instance `id`, if its logs are kept.
    fn retained_dir(&self, id: &str) -> Option<PathBuf> {
        if lull_runtime::instance::validate_id(id).is_err() {
            return None;
        }
        let by_name = super::parse_instance_id(id)
            .map(|(service, _)| self.config.retained_logs_dir.join(service).join(id));
        if let Some(dir) = by_name.filter(|d| d.is_dir()) {
            return Some(dir);
        }
        std::fs::read_dir(&self.config.retained_logs_dir)
            .ok()?
            .flatten()
            .map(|e| e.path().join(id))
            .find(|d| d.is_dir())
    }

    /// Removes what an instance left besides its runtime files: network, label, secret files.
    async fn cleanup(&self, id: &str) {
        let _ = self.runtime.instances.remove_files(id);
        self.remove_secret_files(id).await;
        let network = self.network.clone();
        let owned = id.to_owned();
        match tokio::task::spawn_blocking(move || network.detach(&owned)).await {
            Ok(Err(e)) => tracing::warn!(instance = id, "remove the instance's network: {e}"),
            Err(e) => tracing::warn!(instance = id, "network task: {e}"),
            Ok(Ok(())) => {}
        }
        let _ = std::fs::remove_file(self.label_path(id));
    }

    async fn recover_all(&self) -> Result<Vec<RecoveredInstance>, HostError> {
        let recover_err = |reason: String| HostError::Recover { reason };
        let found = self
            .runtime
            .instances
            .recover()
            .map_err(|e| recover_err(e.to_string()))?;
        let mut running = Vec::new();
        for item in found {
            match item {
                Recovered::Running(instance) => {
                    let label = std::fs::read(self.label_path(&instance.id))
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Label>(&b).ok());
                    match label {
                        Some(label) => running.push((instance, label)),
                        // Not started by the daemon (`lull run`): not ours to adopt.
                        None => {
                            tracing::info!(instance = %instance.id, "running instance without a daemon label left alone")
                        }
                    }
                }
                Recovered::Exited(instance, status) => {
                    let id = instance.id.clone();
                    if self.label_path(&id).exists() {
                        tracing::info!(instance = %id, "ended while the daemon was down: {}", exit_info(&status));
                        self.retain_logs(&id).await;
                        let _ = self.runtime.instances.delete(instance).await;
                        self.cleanup(&id).await;
                    }
                }
                Recovered::Removed { id } => {
                    if self.label_path(&id).exists() {
                        self.cleanup(&id).await;
                    }
                }
            }
        }
        let live: Vec<LiveInstance> = running
            .iter()
            .map(|(i, l)| LiveInstance {
                instance: i.id.clone(),
                service: l.service.clone(),
                allow_peers: false,
            })
            .collect();
        let network = self.network.clone();
        let report = tokio::task::spawn_blocking(move || network.reconcile(&live))
            .await
            .map_err(|e| recover_err(format!("network task: {e}")))?
            .map_err(|e| recover_err(format!("network: {e}")))?;
        let mut adopted = Vec::new();
        for (instance, label) in running {
            let id = instance.id.clone();
            let attachment = self.network.attachment(&id);
            let lost = report.lost.contains(&id);
            let gate = instance.open_gate();
            match (attachment, gate) {
                (Some(attachment), Ok(gate)) if !lost => {
                    let cpu: Arc<dyn CpuControl> =
                        Arc::new(InstanceCpu::new(gate, instance.cgroup.clone()));
                    self.live
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id.clone(), Arc::new(instance));
                    adopted.push(RecoveredInstance {
                        service: label.service,
                        revision: label.revision,
                        instance: Started {
                            id,
                            addr: SocketAddr::from((attachment.addr, label.port)),
                            cpu,
                        },
                    });
                }
                _ => {
                    // Unreachable without its network (or ungated): stop it, the engine
                    // starts a replacement.
                    tracing::warn!(instance = %id, "running instance lost its network or gate: stopping it");
                    let _ = instance.stop(Duration::from_secs(5)).await;
                    let _ = self.runtime.instances.delete(instance).await;
                    self.cleanup(&id).await;
                }
            }
        }
        Ok(adopted)
    }
}

impl RealHost {
    /// `lull exec`: a command inside a live instance, through the runtime's tenant exec.
    async fn exec_in_instance(
        &self,
        id: &str,
        request: ExecRequest,
    ) -> Result<ExecProcess, HostError> {
        use lull_runtime::instance::{ExecRequest as RuntimeExec, InstanceError, WindowSize};
        let instance = self.instance(id)?;
        if instance.has_exited() {
            return Err(instance_err(id, "exec")("it is not running".into()));
        }
        // An idle instance may be throttled: the command gets the CPU back for its start. The
        // exec route also holds it through the proxy's gate for the whole stream
        // (`Pool::hold_cpu`); this covers an instance no pool has.
        if let Ok(gate) = instance.open_gate()
            && let Err(e) = gate.restore()
        {
            tracing::warn!(instance = id, "restore the CPU for an exec: {e}");
        }
        let runtime_request = RuntimeExec {
            args: request.command,
            env: request
                .env
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            cwd: request.cwd,
            tty: request.tty.map(|(rows, cols)| WindowSize { rows, cols }),
        };
        let mut session = self
            .runtime
            .instances
            .exec(id, runtime_request)
            .await
            .map_err(|e| match e {
                InstanceError::NotFound(_) => HostError::NotFound { id: id.to_owned() },
                other => instance_err(id, "exec")(other.to_string()),
            })?;
        let missing = || instance_err(id, "exec")("the session lacks a stream".into());
        let stdin = session.take_stdin().ok_or_else(missing)?;
        let stdout = session.take_stdout().ok_or_else(missing)?;
        let stderr = session.take_stderr();
        let resize = session.resizer().map(|r| {
            let resize: super::ExecResize = Arc::new(move |rows, cols| {
                r.resize(WindowSize { rows, cols })
                    .map_err(|e| e.to_string())
            });
            resize
        });
        let owned_id = id.to_owned();
        Ok(ExecProcess {
            stdin: Box::pin(stdin),
            stdout: Box::pin(stdout),
            stderr: stderr.map(|s| Box::pin(s) as super::ExecReader),
            resize,
            exit: Box::pin(async move {
                session
                    .wait()
                    .await
                    .map(|status| exit_info(&status))
                    .map_err(|e| instance_err(&owned_id, "exec")(e.to_string()))
            }),
        })
    }
}

fn exit_info(status: &ExitStatus) -> ExitInfo {
    ExitInfo {
        code: status.code,
        signal: status.signal,
        oom_killed: status.oom_killed,
    }
}

fn instance_err(id: &str, action: &'static str) -> impl Fn(String) -> HostError {
    let id = id.to_owned();
    move |reason| HostError::Instance {
        id: id.clone(),
        action,
        reason,
    }
}

impl InstanceHost for RealHost {
    fn ensure_image<'a>(
        &'a self,
        reference: &'a str,
    ) -> HostFuture<'a, Result<ImageInfo, HostError>> {
        Box::pin(self.image_info(reference))
    }

    fn start(&self, request: StartRequest) -> HostFuture<'_, Result<Started, HostError>> {
        Box::pin(self.start_instance(request))
    }

    fn wait<'a>(&'a self, id: &'a str) -> HostFuture<'a, Result<ExitInfo, HostError>> {
        Box::pin(async move {
            let instance = self.instance(id)?;
            let status = instance
                .wait()
                .await
                .map_err(|e| instance_err(id, "wait")(e.to_string()))?;
            Ok(exit_info(&status))
        })
    }

    fn stop<'a>(
        &'a self,
        id: &'a str,
        grace: Duration,
    ) -> HostFuture<'a, Result<ExitInfo, HostError>> {
        Box::pin(async move {
            let instance = self.instance(id)?;
            // An idle instance may be throttled: give it its CPU back for its shutdown.
            if let Ok(gate) = instance.open_gate()
                && let Err(e) = gate.restore()
            {
                tracing::warn!(instance = id, "restore the CPU before stopping: {e}");
            }
            let status = instance
                .stop(grace)
                .await
                .map_err(|e| instance_err(id, "stop")(e.to_string()))?;
            Ok(exit_info(&status))
        })
    }

    fn remove<'a>(&'a self, id: &'a str) -> HostFuture<'a, Result<(), HostError>> {
        Box::pin(async move {
            self.live
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            // A fresh handle: waiters may still hold the old one for a moment.
            let found = self
                .runtime
                .instances
                .get(id)
                .map_err(|e| instance_err(id, "remove")(e.to_string()))?;
            match found {
                Some(Recovered::Running(instance)) | Some(Recovered::Exited(instance, _)) => {
                    self.retain_logs(id).await;
                    self.runtime
                        .instances
                        .delete(instance)
                        .await
                        .map_err(|e| instance_err(id, "remove")(e.to_string()))?;
                }
                Some(Recovered::Removed { .. }) | None => {}
            }
            self.cleanup(id).await;
            Ok(())
        })
    }

    fn recover(&self) -> HostFuture<'_, Result<Vec<RecoveredInstance>, HostError>> {
        Box::pin(self.recover_all())
    }

    fn exec<'a>(
        &'a self,
        id: &'a str,
        request: ExecRequest,
    ) -> HostFuture<'a, Result<ExecProcess, HostError>> {
        Box::pin(self.exec_in_instance(id, request))
    }

    fn logs<'a>(&'a self, id: &'a str) -> HostFuture<'a, Result<Vec<LogLine>, HostError>> {
        Box::pin(async move {
            let live = self.runtime.config.instances_dir().join(id).join("logs");
            let dir = match live.exists() {
                true => live,
                false => self
                    .retained_dir(id)
                    .ok_or_else(|| HostError::NotFound { id: id.to_owned() })?,
            };
            let records = tokio::task::spawn_blocking(move || logs::read_all(&dir))
                .await
                .map_err(|e| instance_err(id, "read logs")(e.to_string()))?
                .map_err(|e| instance_err(id, "read logs")(e.to_string()))?;
            Ok(records
                .into_iter()
                .map(|r| LogLine {
                    time: r.time,
                    stream: r.stream.as_str(),
                    text: r.text,
                })
                .collect())
        })
    }

    fn retained_logs<'a>(
        &'a self,
        service: &'a str,
    ) -> HostFuture<'a, Result<Vec<String>, HostError>> {
        Box::pin(async move {
            let dir = self.config.retained_logs_dir.join(service);
            tokio::task::spawn_blocking(move || retained_oldest_first(&dir))
                .await
                .map_err(|e| HostError::Recover {
                    reason: format!("retained logs task: {e}"),
                })
                .map(|dirs| {
                    dirs.iter()
                        .filter_map(|d| d.file_name()?.to_str().map(str::to_owned))
                        .collect()
                })
        })
    }

    fn forget_logs<'a>(&'a self, service: &'a str) -> HostFuture<'a, Result<(), HostError>> {
        Box::pin(async move {
            if crate::names::check_label(service).is_err() {
                return Ok(());
            }
            let dir = self.config.retained_logs_dir.join(service);
            let removed =
                tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(format!("remove {}: {e}", dir.display()))
                    }
                    _ => Ok(()),
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
            removed.map_err(|reason| HostError::Instance {
                id: service.to_owned(),
                action: "remove the retained logs of",
                reason,
            })
        })
    }
}

/// What went wrong with secret files or retained logs on the host.
#[derive(Debug, thiserror::Error)]
pub enum HostFilesError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mount a tmpfs at {path}: {source}")]
    Mount { path: PathBuf, source: nix::Error },
    #[error("retained logs: {0}")]
    Logs(#[from] logs::LogError),
}

fn files_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> HostFilesError {
    let path = path.to_owned();
    move |source| HostFilesError::Io {
        action,
        path,
        source,
    }
}

/// Bytes of tmpfs for secret files besides their values (inodes, rounding).
const SECRETS_TMPFS_SLACK: usize = 64 * 1024;

/// Mounts a private tmpfs at `dir` and writes each secret there (mode 0400), returning the
/// binds that put them at their targets, read-only and handed to the app's user. Nothing is
/// written to a disk: the values live in the tmpfs's memory until it is unmounted.
pub fn write_secret_files(
    dir: &Path,
    secrets: &[super::SecretFile],
) -> Result<Vec<FileBind>, HostFilesError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(files_err("create", parent))?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(files_err("create", dir))?;
    let bytes: usize = secrets.iter().map(|s| s.value.as_bytes().len()).sum();
    let size = (bytes + SECRETS_TMPFS_SLACK).div_ceil(4096) * 4096;
    let options = format!("mode=0700,size={size},nr_inodes={}", secrets.len() + 16);
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some(options.as_str()),
    )
    .map_err(|source| HostFilesError::Mount {
        path: dir.to_owned(),
        source,
    })?;
    let mut binds = Vec::with_capacity(secrets.len());
    for (i, secret) in secrets.iter().enumerate() {
        let path = dir.join(i.to_string());
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(files_err("create", &path))?;
        file.write_all(secret.value.as_bytes())
            .map_err(files_err("write", &path))?;
        binds.push(FileBind {
            read_only: true,
            owned_by_app: true,
            ..FileBind::new(path, &secret.target)
        });
    }
    Ok(binds)
}

/// Unmounts and removes a secrets dir made by [`write_secret_files`]; nothing there is fine.
pub fn remove_secrets_dir(dir: &Path) -> Result<(), HostFilesError> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(files_err("inspect", dir)(e)),
        Ok(_) => {}
    }
    match nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (the mount failed, or it is gone already).
        Ok(()) | Err(nix::Error::EINVAL) => {}
        Err(source) => {
            return Err(HostFilesError::Mount {
                path: dir.to_owned(),
                source,
            });
        }
    }
    std::fs::remove_dir_all(dir).map_err(files_err("remove", dir))
}

/// Moves an instance's log dir to `to` (a rename on one filesystem, else a copy).
fn move_logs(from: &Path, to: &Path) -> Result<(), HostFilesError> {
    if !from.is_dir() {
        return Ok(());
    }
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(files_err("create", parent))?;
    }
    if to.exists() {
        std::fs::remove_dir_all(to).map_err(files_err("replace", to))?;
    }
    if std::fs::rename(from, to).is_ok() {
        return Ok(());
    }
    std::fs::create_dir_all(to).map_err(files_err("create", to))?;
    for path in logs::log_files(from) {
        let Some(name) = path.file_name() else {
            continue;
        };
        std::fs::copy(&path, to.join(name)).map_err(files_err("copy", &path))?;
    }
    std::fs::remove_dir_all(from).map_err(files_err("remove", from))
}

/// The retained instance dirs of a service, oldest first (by their newest log file's time).
fn retained_oldest_first(service_dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(service_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .map(|dir| {
            let newest = logs::log_files(&dir)
                .iter()
                .chain(std::iter::once(&dir))
                .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
                .max()
                .unwrap_or(std::time::UNIX_EPOCH);
            (newest, dir)
        })
        .collect();
    dirs.sort();
    dirs.into_iter().map(|(_, d)| d).collect()
}

/// Keeps a service's retained logs under `max_bytes`, the oldest removed first.
fn trim_retained(service_dir: &Path, max_bytes: u64) -> Result<(), HostFilesError> {
    let dirs = retained_oldest_first(service_dir);
    let removed = logs::trim_to(&dirs, max_bytes)?;
    if !removed.is_empty() {
        tracing::debug!(
            dir = %service_dir.display(),
            files = removed.len(),
            "retained logs trimmed to the service's cap"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulls_use_the_stored_credentials_of_the_images_registry() {
        let lookup: RegistryCredentials = Arc::new(|registry: &str| {
            (registry == "127.0.0.1:5000").then(|| ("bob".to_owned(), "pw".to_owned()))
        });
        let base = PullOptions::default();
        let options = pull_options_for(&base, Some(&lookup), "127.0.0.1:5000");
        assert_eq!(options.credentials, Some(Credentials::new("bob", "pw")));
        // Another registry, or no lookup: none.
        assert_eq!(
            pull_options_for(&base, Some(&lookup), "ghcr.io").credentials,
            None
        );
        assert_eq!(
            pull_options_for(&base, None, "127.0.0.1:5000").credentials,
            None
        );
        // Explicit credentials in the host's options win.
        let explicit = PullOptions {
            credentials: Some(Credentials::new("ops", "given")),
            ..PullOptions::default()
        };
        assert_eq!(
            pull_options_for(&explicit, Some(&lookup), "127.0.0.1:5000").credentials,
            Some(Credentials::new("ops", "given"))
        );
    }
}
