//! One thread's idle upstream connections to a service's instances, by instance address, with a
//! reaper that closes those idle for longer than the service's `timeouts.upstream_idle`.
//!
//! Only the owning thread takes the lock on the request path (uncontended); the reaper runs on
//! the same thread's runtime. Used for hyper's HTTP/1 client connections (the general path)
//! and for plain sockets (`crate::fast::upstream`: the HTTP/1 fast path's, and those of
//! bodiless requests hyper's server read).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// A connection that can wait in an [`IdleSet`].
pub(crate) trait Reusable: Send + 'static {
    /// Whether it may be taken for a request (checked on the request path: keep it cheap).
    fn usable(&self) -> bool;
    /// Whether the instance closed it (checked by the reaper, off the request path).
    fn closed(&self) -> bool;
}

impl<B: hyper::body::Body + 'static> Reusable for hyper::client::conn::http1::SendRequest<B>
where
    B: Send,
{
    fn usable(&self) -> bool {
        !self.is_closed()
    }

    fn closed(&self) -> bool {
        self.is_closed()
    }
}

impl Reusable for tokio::net::TcpStream {
    /// Costs no system call unless the reactor saw the socket become readable (the instance
    /// closed it): tokio answers `WouldBlock` from its cached readiness.
    fn usable(&self) -> bool {
        !self.closed()
    }

    /// An idle connection has nothing to read: readable means the instance closed it (or
    /// sent bytes nobody asked for, which makes it unusable as well).
    fn closed(&self) -> bool {
        let mut byte = [0u8; 1];
        !matches!(self.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

struct Inner<C> {
    by_addr: HashMap<SocketAddr, Vec<(C, Instant)>>,
    /// A reaper task is running for this set.
    reaping: bool,
}

/// Idle connections of one kind, for one thread.
pub(crate) struct IdleSet<C> {
    inner: Arc<Mutex<Inner<C>>>,
    idle_timeout: Duration,
}

impl<C: Reusable> IdleSet<C> {
    pub(crate) fn new(idle_timeout: Duration) -> IdleSet<C> {
        IdleSet {
            inner: Arc::new(Mutex::new(Inner {
                by_addr: HashMap::new(),
                reaping: false,
            })),
            idle_timeout,
        }
    }

    /// The most recently used usable idle connection to `addr`, if any.
    pub(crate) fn take(&self, addr: SocketAddr) -> Option<C> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let conns = inner.by_addr.get_mut(&addr)?;
        while let Some((c, since)) = conns.pop() {
            if c.usable() && since.elapsed() < self.idle_timeout {
                return Some(c);
            }
        }
        None
    }

    /// A handle that gives connections back to this set, if it still exists then.
    pub(crate) fn returner(&self) -> Returner<C> {
        Returner {
            inner: Arc::downgrade(&self.inner),
            idle_timeout: self.idle_timeout,
        }
    }
}

/// Gives connections back to an [`IdleSet`].
pub(crate) struct Returner<C> {
    inner: Weak<Mutex<Inner<C>>>,
    idle_timeout: Duration,
}

impl<C: Reusable> Returner<C> {
    /// Puts `conn` back as idle (dropped when it is no longer usable or the set is gone).
    pub(crate) fn give_back(&self, addr: SocketAddr, conn: C) {
        if !conn.usable() {
            return;
        }
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let start_reaper = {
            let mut idle = inner.lock().unwrap_or_else(|e| e.into_inner());
            idle.by_addr
                .entry(addr)
                .or_default()
                .push((conn, Instant::now()));
            !std::mem::replace(&mut idle.reaping, true)
        };
        if start_reaper {
            spawn_reaper(Arc::downgrade(&inner), self.idle_timeout);
        }
    }
}

/// Closes connections idle for longer than `idle_timeout` or closed by their instance,
/// checking every half of it; ends when nothing is idle or the set is gone.
fn spawn_reaper<C: Reusable>(inner: Weak<Mutex<Inner<C>>>, idle_timeout: Duration) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        if let Some(inner) = inner.upgrade() {
            inner.lock().unwrap_or_else(|e| e.into_inner()).reaping = false;
        }
        return;
    };
    let tick = (idle_timeout / 2).max(Duration::from_millis(10));
    runtime.spawn(async move {
        loop {
            tokio::time::sleep(tick).await;
            let Some(inner) = inner.upgrade() else { return };
            let mut idle = inner.lock().unwrap_or_else(|e| e.into_inner());
            idle.by_addr.retain(|_, conns| {
                conns.retain(|(c, since)| !c.closed() && since.elapsed() < idle_timeout);
                !conns.is_empty()
            });
            if idle.by_addr.is_empty() {
                idle.reaping = false;
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sockets_closed_by_the_instance_or_idle_too_long_are_reaped() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let set: IdleSet<tokio::net::TcpStream> = IdleSet::new(Duration::from_millis(200));
        let a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server_a, _) = listener.accept().await.unwrap();
        let b = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (_server_b, _) = listener.accept().await.unwrap();
        let back = set.returner();
        back.give_back(addr, a);
        back.give_back(addr, b);
        drop(server_a);
        // The reaper's first pass (after 100 ms) drops the closed one, keeps the other.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let kept = set.take(addr).expect("the open connection stays idle");
        assert!(set.take(addr).is_none(), "the closed one was reaped");
        back.give_back(addr, kept);
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(set.take(addr).is_none(), "past the idle timeout");
    }
}
