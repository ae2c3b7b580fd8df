//! An [`InstanceHost`] that counts every instance against the host's budget: a start is
//! refused (with the limit it would break) before the inner host does anything, and a removal
//! gives the instance's share back. Wrapping the host, rather than asking at each place the
//! engine starts or removes an instance (deploys, resumes, restarts, scale-out, adoption),
//! means none of them can forget to.

use std::sync::Arc;
use std::time::Duration;

use super::{
    ExecProcess, ExecRequest, ExitInfo, HostError, HostFuture, ImageInfo, InstanceHost, LogLine,
    RecoveredInstance, StartRequest, Started,
};
use crate::autoscale::HostBudget;

pub struct BudgetedHost {
    inner: Arc<dyn InstanceHost>,
    budget: Arc<HostBudget>,
}

impl BudgetedHost {
    pub fn new(inner: Arc<dyn InstanceHost>, budget: Arc<HostBudget>) -> BudgetedHost {
        BudgetedHost { inner, budget }
    }

    pub fn budget(&self) -> &Arc<HostBudget> {
        &self.budget
    }
}

impl InstanceHost for BudgetedHost {
    fn ensure_image<'a>(
        &'a self,
        reference: &'a str,
    ) -> HostFuture<'a, Result<ImageInfo, HostError>> {
        self.inner.ensure_image(reference)
    }

    fn start(&self, request: StartRequest) -> HostFuture<'_, Result<Started, HostError>> {
        Box::pin(async move {
            let memory = request.limits.memory_bytes.unwrap_or(0);
            let id = request.id.clone();
            let admission =
                self.budget
                    .admit(&id, memory)
                    .map_err(|refusal| HostError::Refused {
                        id: id.clone(),
                        reason: refusal.to_string(),
                    })?;
            let started = self.inner.start(request).await;
            if started.is_err() && admission.new {
                self.budget.release(&id);
            }
            started
        })
    }

    fn wait<'a>(&'a self, id: &'a str) -> HostFuture<'a, Result<ExitInfo, HostError>> {
        self.inner.wait(id)
    }

    fn stop<'a>(
        &'a self,
        id: &'a str,
        grace: Duration,
    ) -> HostFuture<'a, Result<ExitInfo, HostError>> {
        self.inner.stop(id, grace)
    }

    fn remove<'a>(&'a self, id: &'a str) -> HostFuture<'a, Result<(), HostError>> {
        Box::pin(async move {
            let removed = self.inner.remove(id).await;
            if !matches!(removed, Err(ref e) if !matches!(e, HostError::NotFound { .. })) {
                self.budget.release(id);
            }
            removed
        })
    }

    /// Running instances are counted (with no memory: the engine, which knows their plan,
    /// counts it when it adopts them).
    fn recover(&self) -> HostFuture<'_, Result<Vec<RecoveredInstance>, HostError>> {
        Box::pin(async move {
            let found = self.inner.recover().await?;
            let ids: Vec<&str> = found.iter().map(|r| r.instance.id.as_str()).collect();
            self.budget.retain(&ids);
            for r in &found {
                self.budget.adopt_if_missing(&r.instance.id);
            }
            Ok(found)
        })
    }

    fn logs<'a>(&'a self, id: &'a str) -> HostFuture<'a, Result<Vec<LogLine>, HostError>> {
        self.inner.logs(id)
    }

    fn exec<'a>(
        &'a self,
        id: &'a str,
        request: ExecRequest,
    ) -> HostFuture<'a, Result<ExecProcess, HostError>> {
        self.inner.exec(id, request)
    }

    fn retained_logs<'a>(
        &'a self,
        service: &'a str,
    ) -> HostFuture<'a, Result<Vec<String>, HostError>> {
        self.inner.retained_logs(service)
    }

    fn forget_logs<'a>(&'a self, service: &'a str) -> HostFuture<'a, Result<(), HostError>> {
        self.inner.forget_logs(service)
    }

    fn log_tail<'a>(
        &'a self,
        id: &'a str,
        lines: usize,
    ) -> HostFuture<'a, Result<Vec<String>, HostError>> {
        self.inner.log_tail(id, lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::HostLimits;
    use crate::host::InstanceLimits;
    use crate::host::fake::FakeHost;

    #[tokio::test]
    async fn starts_beyond_the_budget_are_refused_and_removals_give_back() {
        let fake = Arc::new(FakeHost::new());
        let budget = Arc::new(HostBudget::new(HostLimits {
            memory_total: 100 << 20,
            overcommit_ratio: 1.0,
            ..HostLimits::for_memory(0)
        }));
        let host = BudgetedHost::new(fake.clone(), budget.clone());
        let request = |id: &str| StartRequest {
            service: "web".into(),
            revision: 1,
            id: id.into(),
            image: "example.test/app:1".into(),
            command: None,
            args: None,
            env: vec![("PORT".into(), "8080".into())],
            port: 8080,
            limits: InstanceLimits {
                memory_bytes: Some(60 << 20),
                ..InstanceLimits::default()
            },
            volumes: Vec::new(),
            secret_files: Vec::new(),
        };
        host.ensure_image("example.test/app:1").await.unwrap();
        host.start(request("web-r1-a")).await.unwrap();
        let refused = host.start(request("web-r1-b")).await.unwrap_err();
        assert!(
            matches!(&refused, HostError::Refused { reason, .. } if reason.starts_with("memory:")),
            "{refused}"
        );
        assert!(
            refused
                .to_string()
                .starts_with("instance web-r1-b not started: memory:")
        );
        host.stop("web-r1-a", Duration::from_secs(1)).await.unwrap();
        host.remove("web-r1-a").await.unwrap();
        assert_eq!(budget.committed(), (0, 0));
        host.start(request("web-r1-b")).await.unwrap();
        assert_eq!(budget.committed(), (1, 60 << 20));
    }
}
