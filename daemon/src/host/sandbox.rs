//! The build sandbox for real: a build step is an instance of lull's runtime (its own mount,
//! pid, ipc, uts, cgroup and network namespaces, an overlay over the step's layers, the build's
//! cgroup limits) on a network of its own whose egress goes out through lull's NAT, so package
//! managers reach their registries. Nothing of the host is visible inside but the binds the
//! builder asks for (CA bundle, download caches) and lull's resolv.conf and hosts; no daemon
//! socket, no host credentials. The step's upper dir stays until `remove`, for capture.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lull_builder::sandbox::{
    LogSink, SandboxError, SandboxFuture, SandboxRun, SandboxRunner, SandboxStep,
};
use lull_netns::network::{AttachRequest, InstanceNetwork};
use lull_runtime::cgroup::Resources;
use lull_runtime::host::Runtime;
use lull_runtime::instance::{
    FileBind, ImageProcess, Instance, InstanceRequest, ProcessOverrides, Recovered,
};
use lull_runtime::logs::{Follower, LogLimits};

/// Lines kept for a failed step's error.
const LAST_LINES: usize = 20;
/// How often the step's log is read while it runs.
const LOG_POLL: Duration = Duration::from_millis(100);
/// Sandbox ids start with this (`b.<build>.<step>`); service instances never contain a dot.
pub const SANDBOX_PREFIX: &str = "b.";

pub struct RealSandbox {
    runtime: Arc<Runtime>,
    network: Arc<dyn InstanceNetwork>,
    log_limits: LogLimits,
    live: Mutex<HashMap<String, Arc<Instance>>>,
}

impl RealSandbox {
    pub fn new(
        runtime: Arc<Runtime>,
        network: Arc<dyn InstanceNetwork>,
        log_limits: LogLimits,
    ) -> RealSandbox {
        RealSandbox {
            runtime,
            network,
            log_limits,
            live: Mutex::new(HashMap::new()),
        }
    }

    /// Removes the sandboxes a previous daemon left (it stopped in the middle of a build):
    /// their builds failed with it.
    pub async fn remove_leftovers(&self) {
        let Ok(found) = self.runtime.instances.recover() else {
            return;
        };
        for item in found {
            let id = match &item {
                Recovered::Running(i) | Recovered::Exited(i, _) => i.id.clone(),
                Recovered::Removed { id } => id.clone(),
            };
            if !id.starts_with(SANDBOX_PREFIX) {
                continue;
            }
            tracing::info!(sandbox = %id, "removing a build sandbox left by a previous daemon");
            match item {
                Recovered::Running(instance) => {
                    let _ = instance.stop(Duration::from_secs(1)).await;
                    let _ = self.runtime.instances.delete(instance).await;
                }
                Recovered::Exited(instance, _) => {
                    let _ = self.runtime.instances.delete(instance).await;
                }
                Recovered::Removed { .. } => {}
            }
            self.cleanup(&id).await;
        }
    }

    async fn cleanup(&self, id: &str) {
        let _ = self.runtime.instances.remove_files(id);
        let network = self.network.clone();
        let owned = id.to_owned();
        match tokio::task::spawn_blocking(move || network.detach(&owned)).await {
            Ok(Err(e)) => tracing::warn!(sandbox = id, "remove the sandbox's network: {e}"),
            Err(e) => tracing::warn!(sandbox = id, "network task: {e}"),
            Ok(Ok(())) => {}
        }
    }

    async fn run_step(&self, step: &SandboxStep, log: LogSink) -> Result<SandboxRun, SandboxError> {
        let fail = |reason: String| SandboxError {
            step: step.name.clone(),
            reason,
        };
        let network = self.network.clone();
        let attach = AttachRequest {
            instance: step.id.clone(),
            service: "build".into(),
            allow_peers: false,
            hostname: "build".into(),
        };
        let attachment = tokio::task::spawn_blocking(move || network.attach(&attach))
            .await
            .map_err(|e| fail(format!("network task: {e}")))?
            .map_err(|e| fail(format!("network: {e}")))?;
        let mut files: Vec<FileBind> = step
            .binds
            .iter()
            .map(|b| FileBind {
                read_only: b.read_only,
                ..FileBind::new(&b.source, &b.destination)
            })
            .collect();
        files.extend(
            attachment
                .files()
                .map(|(source, destination)| FileBind::new(source, destination)),
        );
        let request = InstanceRequest {
            id: step.id.clone(),
            layers: step.layers.clone(),
            image: ImageProcess {
                entrypoint: Vec::new(),
                cmd: Vec::new(),
                env: Vec::new(),
                working_dir: lull_builder::sandbox::WORKDIR.into(),
                user: "0:0".into(),
            },
            overrides: ProcessOverrides {
                entrypoint: Some(vec!["/bin/sh".into(), "-c".into(), step.script.clone()]),
                cmd: Some(Vec::new()),
                env: step.env.clone(),
                port: None,
                user: Some("0:0".into()),
                working_dir: Some(lull_builder::sandbox::WORKDIR.into()),
            },
            resources: Resources {
                cpu: Some(step.limits.cpu),
                memory_bytes: Some(step.limits.memory_bytes),
                pids: Some(step.limits.pids.min(i64::MAX as u64) as i64),
            },
            netns: Some(attachment.netns.clone()),
            files,
            log_limits: self.log_limits,
        };
        let instance = self
            .runtime
            .instances
            .launch(request)
            .await
            .map_err(|e| fail(format!("start: {e}")))?;
        let instance = Arc::new(instance);
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(step.id.clone(), instance.clone());
        let paths = instance.paths();
        let mut follower = Follower::from_start(&paths.logs());
        let mut last = VecDeque::with_capacity(LAST_LINES);
        let mut forward = |follower: &mut Follower| {
            for record in follower.poll() {
                log(&record.text);
                if last.len() == LAST_LINES {
                    last.pop_front();
                }
                last.push_back(record.text);
            }
        };
        let deadline = tokio::time::sleep(step.limits.timeout);
        tokio::pin!(deadline);
        let mut timed_out = false;
        let wait = instance.wait();
        tokio::pin!(wait);
        let status = loop {
            tokio::select! {
                status = &mut wait => break status,
                _ = tokio::time::sleep(LOG_POLL) => forward(&mut follower),
                _ = &mut deadline, if !timed_out => {
                    timed_out = true;
                    log(&format!(
                        "lull: {} ran longer than {} s: stopping it",
                        step.name,
                        step.limits.timeout.as_secs()
                    ));
                    if let Err(e) = instance.stop(Duration::from_secs(5)).await {
                        return Err(fail(format!("stop after the timeout: {e}")));
                    }
                }
            }
        };
        forward(&mut follower);
        let status = status.map_err(|e| fail(format!("wait: {e}")))?;
        let exit_code = match (status.code, status.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => -1,
        };
        if status.oom_killed {
            last.push_back(format!(
                "lull: killed for lack of memory (the build's limit is {} MiB)",
                step.limits.memory_bytes >> 20
            ));
        }
        Ok(SandboxRun {
            exit_code,
            timed_out,
            upper: paths.upper(),
            last_lines: last.into_iter().collect(),
        })
    }
}

impl SandboxRunner for RealSandbox {
    fn run<'a>(
        &'a self,
        step: &'a SandboxStep,
        log: LogSink,
    ) -> SandboxFuture<'a, Result<SandboxRun, SandboxError>> {
        Box::pin(self.run_step(step, log))
    }

    fn remove<'a>(&'a self, id: &'a str) -> SandboxFuture<'a, ()> {
        Box::pin(async move {
            let held = self
                .live
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            drop(held);
            if let Ok(Some(found)) = self.runtime.instances.get(id) {
                match found {
                    Recovered::Running(instance) => {
                        let _ = instance.stop(Duration::from_secs(1)).await;
                        if let Err(e) = self.runtime.instances.delete(instance).await {
                            tracing::warn!(sandbox = id, "remove: {e}");
                        }
                    }
                    Recovered::Exited(instance, _) => {
                        if let Err(e) = self.runtime.instances.delete(instance).await {
                            tracing::warn!(sandbox = id, "remove: {e}");
                        }
                    }
                    Recovered::Removed { .. } => {}
                }
            }
            self.cleanup(id).await;
        })
    }
}
