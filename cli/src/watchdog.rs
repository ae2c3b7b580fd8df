//! systemd's watchdog (`WatchdogSec=`): the daemon pings at half the interval, and only while
//! its parts work. A ping says: the daemon's own runtime runs this task, its state store
//! answers, and every proxy thread runs a task it is given. A daemon whose store hangs, or
//! whose proxy thread is stuck, is not pinged for, so systemd restarts it (the next daemon
//! adopts the instances, and the fd store keeps the listening sockets).

use std::sync::Arc;
use std::time::Duration;

use lull_daemon::store::Store;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

/// Feeds systemd's watchdog at half its interval, when it set one (`WATCHDOG_USEC`).
/// `proxy_threads` are the runtimes of the proxy's threads.
pub fn spawn(store: Arc<dyn Store>, proxy_threads: Vec<Handle>) -> Option<JoinHandle<()>> {
    let interval = match lull_systemd::watchdog_interval() {
        Ok(Some(interval)) => interval,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!("{e}");
            return None;
        }
    };
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval / 2);
        loop {
            tick.tick().await;
            // Each check gets a quarter of the interval: a ping missed once is made up at the
            // next tick, before systemd gives up.
            match check(&store, &proxy_threads, interval / 4).await {
                // `systemctl status lull` shows the status line.
                Ok(services) => crate::daemon::notify(&[
                    ("WATCHDOG", "1"),
                    ("STATUS", &format!("serving {services} service(s)")),
                ]),
                Err(e) => tracing::error!("watchdog: {e}: no ping"),
            }
        }
    }))
}

/// Whether the daemon works: the store lists its services, and every proxy thread runs an
/// empty task, each within `within`. Returns how many services the store holds.
async fn check(
    store: &Arc<dyn Store>,
    proxy_threads: &[Handle],
    within: Duration,
) -> Result<usize, String> {
    let store = store.clone();
    let listed = tokio::time::timeout(
        within,
        tokio::task::spawn_blocking(move || store.list_services().map(|s| s.len())),
    )
    .await;
    let services = match listed {
        Ok(Ok(Ok(services))) => services,
        Ok(Ok(Err(e))) => return Err(format!("the state store failed ({e})")),
        _ => {
            return Err(format!("the state store did not answer within {within:?}"));
        }
    };
    threads_answer(proxy_threads, within).await?;
    Ok(services)
}

/// Runs an empty task on every runtime in `threads` and waits for them all, together, for
/// at most `within`; the error names the threads that did not run theirs.
async fn threads_answer(threads: &[Handle], within: Duration) -> Result<(), String> {
    let tasks: Vec<JoinHandle<()>> = threads.iter().map(|t| t.spawn(async {})).collect();
    let deadline = tokio::time::Instant::now() + within;
    let mut stuck = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(())) => {}
            // A runtime shut down (its thread gone) cancels the task: as bad as stuck.
            Ok(Err(_)) | Err(_) => stuck.push(i),
        }
    }
    if stuck.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = stuck.iter().map(|i| format!("lull-proxy-{i}")).collect();
    Err(format!(
        "proxy thread(s) {} did not run a task within {within:?}",
        names.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A current-thread runtime driven by a thread of its own, as the proxy's are.
    fn runtime_thread() -> Handle {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let handle = runtime.handle().clone();
        std::thread::spawn(move || runtime.block_on(std::future::pending::<()>()));
        handle
    }

    #[tokio::test]
    async fn every_thread_answering_passes_and_a_stuck_one_is_named() {
        let threads = vec![runtime_thread(), runtime_thread()];
        threads_answer(&threads, Duration::from_secs(5))
            .await
            .unwrap();
        // Thread 1 blocks (a task that never yields, as a stuck proxy thread would).
        let (release, blocked) = mpsc::channel::<()>();
        threads[1].spawn(async move {
            let _ = blocked.recv();
        });
        let err = threads_answer(&threads, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(err.contains("lull-proxy-1"), "{err}");
        assert!(!err.contains("lull-proxy-0"), "{err}");
        // Released, it answers again.
        release.send(()).unwrap();
        threads_answer(&threads, Duration::from_secs(5))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_check_counts_the_services_and_fails_on_a_stuck_thread() {
        let store: Arc<dyn Store> = Arc::new(lull_daemon::store::MemStore::new());
        let threads = vec![runtime_thread()];
        assert_eq!(check(&store, &threads, Duration::from_secs(5)).await, Ok(0));
        let (release, blocked) = mpsc::channel::<()>();
        threads[0].spawn(async move {
            let _ = blocked.recv();
        });
        let err = check(&store, &threads, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(
            err.starts_with("proxy thread(s) lull-proxy-0 did not run"),
            "{err}"
        );
        release.send(()).unwrap();
    }

    #[tokio::test]
    async fn a_runtime_that_is_gone_counts_as_stuck() {
        // Built and dropped on a thread of its own: a runtime cannot be dropped in another's.
        let handle = std::thread::spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.handle().clone()
        })
        .join()
        .unwrap();
        let err = threads_answer(&[handle], Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(err.contains("lull-proxy-0"), "{err}");
    }
}
