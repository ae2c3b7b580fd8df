//! The proxy's listeners: plain TCP (HTTP/1.0, HTTP/1.1, h2c with prior knowledge) and TLS
//! (ALPN h2 and http/1.1), IPv4 and IPv6, with graceful shutdown.
//!
//! ```text
//! let routes = Arc::new(RouteTable::new());
//! routes.insert("app.example.com", Route::new(pool, "rev-1"));
//! let proxy = Proxy::new(routes.clone(), ProxyOptions::default());
//! proxy.listen("[::]:80".parse()?).await?;
//! let certs = Arc::new(tls::CertStore::with_generated_default()?);
//! proxy.listen_tls("[::]:443".parse()?, tls::acceptor_for(certs.clone())?).await?;
//! ...
//! proxy.shutdown(Duration::from_secs(30)).await;
//! ```

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::edge::{Edge, EdgeSlot};
use crate::fast;
use crate::forward::{self, Activity, ClientBody, ConnInfo, StreamCount, Touch};
use crate::h2;
use crate::routes::RouteTable;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("binding listener {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the proxy is shutting down; no new listener on {addr}")]
    ShuttingDown { addr: SocketAddr },
    #[error("listening socket (fd {fd}): {source}")]
    Adopt {
        fd: RawFd,
        #[source]
        source: std::io::Error,
    },
    #[error("listening socket (fd {fd}) is bound to {found}, not {expected} like the others")]
    MixedAddresses {
        fd: RawFd,
        found: SocketAddr,
        expected: SocketAddr,
    },
    #[error("no listening socket given")]
    NoSockets,
}

/// A duplicate of one of the proxy's listening sockets (see [`Proxy::listener_fds`]).
#[derive(Debug)]
pub struct ListenerFd {
    pub addr: SocketAddr,
    /// Whether the proxy serves TLS on it.
    pub tls: bool,
    pub fd: OwnedFd,
}

/// Proxy-wide settings for the client side (a service's own limits apply once its request is
/// routed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyOptions {
    /// Largest request head read (HTTP/1: its bytes; HTTP/2: its header list, as
    /// SETTINGS_MAX_HEADER_LIST_SIZE counts it; past it, 431).
    pub max_header_bytes: usize,
    /// Most request headers (HTTP/1 and HTTP/2).
    pub max_headers: usize,
    /// Time a client has to send a whole request head (TLS handshake included). On HTTP/1
    /// it also bounds the wait for the next request on a kept-alive connection (hyper starts
    /// its timer when it waits for a head), so the proxy uses the longer of this and
    /// `idle_keep_alive` there.
    pub header_read_timeout: Duration,
    /// A client connection with no request in flight and no bytes moving is closed after this.
    pub idle_keep_alive: Duration,
    /// Serve plain HTTP/1.1 keep-alive exchanges without hyper (see `crate::fast`); hyper
    /// takes a connection over at its first request the fast path does not take. The
    /// `GET`, `HEAD` and `OPTIONS` requests without a body, `TE` or upgrade that hyper serves
    /// (HTTP/2 ones above all) go to HTTP/1 instances over the fast path's plain sockets
    /// (`crate::fast::upstream`). Off: hyper serves every connection and its client every
    /// request (a bisection aid; the same answers, more CPU).
    pub http1_fast_path: bool,
    /// Serve HTTP/2 (h2c with prior knowledge, TLS with ALPN h2) with the proxy's own
    /// server (`crate::h2`) instead of hyper's. h2c is told from HTTP/1 by the fast path, so
    /// without it hyper serves h2c.
    pub own_http2: bool,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(30),
            idle_keep_alive: Duration::from_secs(75),
            http1_fast_path: true,
            own_http2: true,
        }
    }
}

/// What shutdown found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Connections (and WebSockets) still open at the deadline, closed by force.
    pub forced: usize,
}

struct Shared {
    routes: Arc<RouteTable>,
    edge: EdgeSlot,
    options: ProxyOptions,
    builder: auto::Builder<TokioExecutor>,
    /// true: stop accepting and finish what is in flight.
    drain: watch::Sender<bool>,
    /// true: close everything now.
    close: watch::Sender<bool>,
    connections: AtomicUsize,
    connections_done: Notify,
    streams: Arc<StreamCount>,
}

/// The HTTP(S) ingress. Create one, add listeners, shut it down once.
pub struct Proxy {
    shared: Arc<Shared>,
    listeners: Mutex<Vec<JoinHandle<()>>>,
    /// Every listening socket, while its accept loop holds it: `(tls, socket)`.
    sockets: Mutex<Vec<(bool, Weak<TcpListener>)>>,
}

impl Proxy {
    pub fn new(routes: Arc<RouteTable>, options: ProxyOptions) -> Proxy {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            // hyper starts this timer as soon as a connection waits for a request head, idle
            // keep-alive time included: it must not be shorter than the idle timeout.
            .header_read_timeout(options.header_read_timeout.max(options.idle_keep_alive))
            .max_buf_size(options.max_header_bytes.max(8192))
            .max_headers(options.max_headers)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(options.max_header_bytes).unwrap_or(u32::MAX));
        Proxy {
            shared: Arc::new(Shared {
                routes,
                edge: EdgeSlot::default(),
                options,
                builder,
                drain: watch::channel(false).0,
                close: watch::channel(false).0,
                connections: AtomicUsize::new(0),
                connections_done: Notify::new(),
                streams: Arc::new(StreamCount::default()),
            }),
            listeners: Mutex::new(Vec::new()),
            sockets: Mutex::new(Vec::new()),
        }
    }

    pub fn routes(&self) -> &Arc<RouteTable> {
        &self.shared.routes
    }

    pub fn options(&self) -> &ProxyOptions {
        &self.shared.options
    }

    /// Gives the proxy its HTTPS edge (see [`crate::edge`]): the HTTP-01 challenges its
    /// plain-HTTP listeners answer, the certificates that decide which hosts are redirected
    /// to HTTPS, and the port redirects name. Callable at any time, before or after listeners
    /// start; requests after the call see the new edge. Until it is called, challenge paths
    /// get 404 and nothing is redirected.
    pub fn set_edge(&self, edge: Edge) {
        self.shared.edge.set(edge);
    }

    /// The edge given with [`Proxy::set_edge`], if any.
    pub fn edge(&self) -> Option<Arc<Edge>> {
        self.shared.edge.get()
    }

    /// Open client connections (not counting upgraded ones).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Acquire)
    }

    /// Listens for plain HTTP on `addr` (port 0 picks one); returns the bound address. An IPv6
    /// address listens on IPv6 only, so `0.0.0.0:80` and `[::]:80` can both be bound.
    pub async fn listen(&self, addr: SocketAddr) -> Result<SocketAddr, ServerError> {
        self.spawn_listener(addr, None)
    }

    /// Listens for plain HTTP on `addr` once per runtime in `runtimes`, each with a socket of
    /// its own (`SO_REUSEPORT`: the kernel spreads new connections over them), each
    /// connection served on the runtime that accepted it. With one current-thread runtime
    /// per core this is how nginx's workers split the load, and it serves more requests per
    /// CPU than one multi-thread runtime, whose tasks wake each other across threads.
    /// Returns the bound address (port 0 picks one, shared by all the sockets).
    pub fn listen_on(
        &self,
        addr: SocketAddr,
        runtimes: &[tokio::runtime::Handle],
    ) -> Result<SocketAddr, ServerError> {
        if *self.shared.drain.borrow() {
            return Err(ServerError::ShuttingDown { addr });
        }
        let sockets = bind_reuse_port(addr, runtimes.len())?;
        self.listen_on_sockets(sockets, runtimes)
    }

    /// Serves plain HTTP on listening sockets bound elsewhere (inherited from a previous
    /// daemon or from systemd, or made with [`bind_reuse_port`]), all on the same address:
    /// socket `i` is accepted from on runtime `i % runtimes.len()`. Returns the address.
    pub fn listen_on_sockets(
        &self,
        sockets: Vec<std::net::TcpListener>,
        runtimes: &[tokio::runtime::Handle],
    ) -> Result<SocketAddr, ServerError> {
        self.adopt_sockets(sockets, runtimes, None)
    }

    /// [`Proxy::listen_on_sockets`] for HTTPS: each connection's TLS handshake goes through
    /// `acceptor` (see [`crate::tls::acceptor_for`], whose certificates can change while the
    /// sockets serve).
    pub fn listen_tls_on_sockets(
        &self,
        sockets: Vec<std::net::TcpListener>,
        runtimes: &[tokio::runtime::Handle],
        acceptor: TlsAcceptor,
    ) -> Result<SocketAddr, ServerError> {
        self.adopt_sockets(sockets, runtimes, Some(acceptor))
    }

    fn adopt_sockets(
        &self,
        sockets: Vec<std::net::TcpListener>,
        runtimes: &[tokio::runtime::Handle],
        tls: Option<TlsAcceptor>,
    ) -> Result<SocketAddr, ServerError> {
        let Some(first) = sockets.first() else {
            return Err(ServerError::NoSockets);
        };
        if runtimes.is_empty() {
            return Err(ServerError::Adopt {
                fd: first.as_raw_fd(),
                source: std::io::Error::other("no runtime to serve it on"),
            });
        }
        let bound = first.local_addr().map_err(|source| ServerError::Adopt {
            fd: first.as_raw_fd(),
            source,
        })?;
        if *self.shared.drain.borrow() {
            return Err(ServerError::ShuttingDown { addr: bound });
        }
        let mut adopted = Vec::with_capacity(sockets.len());
        for (i, socket) in sockets.into_iter().enumerate() {
            let fd = socket.as_raw_fd();
            let adopt = |source| ServerError::Adopt { fd, source };
            let local = socket.local_addr().map_err(adopt)?;
            if local != bound {
                return Err(ServerError::MixedAddresses {
                    fd,
                    found: local,
                    expected: bound,
                });
            }
            socket.set_nonblocking(true).map_err(adopt)?;
            let runtime = &runtimes[i % runtimes.len()];
            let _entered = runtime.enter();
            let listener = TcpListener::from_std(socket).map_err(adopt)?;
            adopted.push((runtime, Arc::new(listener)));
        }
        let count = adopted.len();
        for (runtime, listener) in adopted {
            self.register(tls.is_some(), &listener);
            let task = runtime.spawn(accept_loop(self.shared.clone(), listener, tls.clone()));
            self.listeners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(task);
        }
        tracing::info!(addr = %bound, sockets = count, tls = tls.is_some(), "proxy listening");
        Ok(bound)
    }

    /// Duplicates of the listening sockets still accepted from, to pass to another process
    /// (a daemon taking over, systemd's fd store). The duplicates do not stop
    /// [`Proxy::shutdown`] from closing this proxy's own.
    pub fn listener_fds(&self) -> std::io::Result<Vec<ListenerFd>> {
        let sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        let mut fds = Vec::new();
        for (tls, socket) in sockets.iter() {
            let Some(socket) = socket.upgrade() else {
                continue;
            };
            fds.push(ListenerFd {
                addr: socket.local_addr()?,
                tls: *tls,
                fd: socket.as_fd().try_clone_to_owned()?,
            });
        }
        Ok(fds)
    }

    fn register(&self, tls: bool, listener: &Arc<TcpListener>) {
        let mut sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        sockets.retain(|(_, s)| s.strong_count() > 0);
        sockets.push((tls, Arc::downgrade(listener)));
    }

    /// Listens for HTTPS on `addr`.
    pub async fn listen_tls(
        &self,
        addr: SocketAddr,
        acceptor: TlsAcceptor,
    ) -> Result<SocketAddr, ServerError> {
        self.spawn_listener(addr, Some(acceptor))
    }

    fn spawn_listener(
        &self,
        addr: SocketAddr,
        tls: Option<TlsAcceptor>,
    ) -> Result<SocketAddr, ServerError> {
        if *self.shared.drain.borrow() {
            return Err(ServerError::ShuttingDown { addr });
        }
        let listener = bind(addr).map_err(|source| ServerError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr, source })?;
        let listener = Arc::new(listener);
        self.register(tls.is_some(), &listener);
        let shared = self.shared.clone();
        let task = tokio::spawn(accept_loop(shared, listener, tls));
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
        tracing::info!(addr = %local, "proxy listening");
        Ok(local)
    }

    /// Stops accepting, lets in-flight requests finish until `grace` passes, then closes every
    /// connection still open.
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        let _ = self.shared.drain.send(true);
        // Instances finish their requests with their CPU, and are not throttled again.
        for host in self.routes().hosts() {
            if let Some(route) = self.routes().lookup(&host) {
                route.pool.drain();
            }
        }
        let listeners: Vec<_> = self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for l in listeners {
            let _ = l.await;
        }
        let shared = &self.shared;
        let drained = async {
            loop {
                let conns = shared.connections_done.notified();
                let streams = shared.streams.done.notified();
                tokio::pin!(conns, streams);
                conns.as_mut().enable();
                streams.as_mut().enable();
                if shared.connections.load(Ordering::Acquire) == 0
                    && shared.streams.open.load(Ordering::Acquire) == 0
                {
                    return;
                }
                tokio::select! {
                    _ = conns => {}
                    _ = streams => {}
                }
            }
        };
        let forced = if tokio::time::timeout(grace, drained).await.is_ok() {
            0
        } else {
            shared.connections.load(Ordering::Acquire) + shared.streams.open.load(Ordering::Acquire)
        };
        let _ = shared.close.send(true);
        ShutdownReport { forced }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.shared.drain.send(true);
        let _ = self.shared.close.send(true);
        for l in self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            l.abort();
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    bind_with(addr, false)
}

/// `n` current-thread tokio runtimes, each driven forever by a thread of its own named
/// `{name}-{i}`: what [`Proxy::listen_on`] serves from, one per CPU.
pub fn spawn_runtimes(n: usize, name: &str) -> std::io::Result<Vec<tokio::runtime::Handle>> {
    (0..n)
        .map(|i| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
            Ok(handle)
        })
        .collect()
}

/// `n` (at least one) listening sockets on `addr` sharing its port with `SO_REUSEPORT` (port 0
/// picks one for all), not yet served: give them to [`Proxy::listen_on_sockets`].
pub fn bind_reuse_port(
    addr: SocketAddr,
    n: usize,
) -> Result<Vec<std::net::TcpListener>, ServerError> {
    let mut bound = addr;
    let mut sockets = Vec::with_capacity(n.max(1));
    for _ in 0..n.max(1) {
        let socket = bind_std(bound, true).map_err(|source| ServerError::Bind {
            addr: bound,
            source,
        })?;
        bound = socket.local_addr().map_err(|source| ServerError::Bind {
            addr: bound,
            source,
        })?;
        sockets.push(socket);
    }
    Ok(sockets)
}

fn bind_with(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    TcpListener::from_std(bind_std(addr, reuse_port)?)
}

fn bind_std(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

async fn accept_loop(shared: Arc<Shared>, listener: Arc<TcpListener>, tls: Option<TlsAcceptor>) {
    let mut drain = shared.drain.subscribe();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = drain.wait_for(|d| *d) => return,
        };
        let (stream, client) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait a moment instead of spinning.
                tracing::warn!("accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        shared.connections.fetch_add(1, Ordering::AcqRel);
        let guard = ConnGuard(shared.clone());
        let tls = tls.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let _guard = guard;
            match tls {
                None => serve(shared, stream, client, "http", true).await,
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(
                        shared.options.header_read_timeout,
                        acceptor.accept(stream),
                    )
                    .await;
                    match handshake {
                        // A TLS-ALPN-01 validation: the handshake was the answer.
                        Ok(Ok(tls_stream))
                            if tls_stream.get_ref().1.alpn_protocol()
                                == Some(crate::tls::ACME_TLS_ALPN) =>
                        {
                            tracing::debug!(%client, "acme-tls/1 handshake done: closed");
                        }
                        Ok(Ok(tls_stream)) => {
                            let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
                            serve(shared, tls_stream, client, "https", !h2).await
                        }
                        Ok(Err(e)) => tracing::debug!(%client, "tls handshake failed: {e}"),
                        Err(_) => tracing::debug!(%client, "tls handshake timed out"),
                    }
                }
            }
        });
    }
}

/// How long a connection accepted just before a drain may take to send its first bytes.
pub(crate) const FIRST_BYTES_WAIT: Duration = Duration::from_secs(1);

/// Notes that the client's first bytes (or its end) were read.
struct Heard<T> {
    inner: T,
    heard: Arc<AtomicBool>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Heard<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let read = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if read.is_ready() && !self.heard.load(Ordering::Relaxed) {
            self.heard.store(true, Ordering::Release);
        }
        read
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Heard<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct ConnGuard(Arc<Shared>);
impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.0.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.connections_done.notify_waiters();
        }
    }
}

/// Serves one client connection: on the fast path while it takes the requests (`http1`:
/// HTTP/1 is possible, i.e. not TLS with ALPN h2), then with the proxy's own HTTP/2 server
/// (h2c with prior knowledge, ALPN h2) or hyper.
async fn serve<IO>(
    shared: Arc<Shared>,
    io: IO,
    client: SocketAddr,
    proto: &'static str,
    http1: bool,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let active = Arc::new(AtomicUsize::new(0));
    let info = ConnInfo {
        client,
        proto,
        active: active.clone(),
        closing: shared.close.subscribe(),
        streams: shared.streams.clone(),
        plain_upstream: shared.options.http1_fast_path,
        after_write: None,
    };
    let heard = Arc::new(AtomicBool::new(false));
    let mut io = Touch::new(
        Heard {
            inner: io,
            heard: heard.clone(),
        },
        activity.clone(),
    );
    let mut drain = shared.drain.subscribe();
    let mut close = shared.close.subscribe();
    let mut prefix = bytes::BytesMut::new();
    if http1 && shared.options.http1_fast_path {
        let conn = fast::Conn {
            routes: &shared.routes,
            edge: &shared.edge,
            info: &info,
            options: &shared.options,
        };
        let served = tokio::select! {
            served = fast::serve(&conn, &mut io, &mut drain) => served,
            _ = close.wait_for(|c| *c) => return,
        };
        match served {
            fast::Served::Closed => {
                // A clean end (a TLS client gets its close_notify).
                let _ = tokio::time::timeout(FIRST_BYTES_WAIT, io.shutdown()).await;
                return;
            }
            fast::Served::Other(read) => prefix = read,
        }
    }
    let watch = Watch {
        client,
        heard,
        activity,
        active,
        idle: shared.options.idle_keep_alive,
        drain,
        close,
    };
    let own_h2 = shared.options.own_http2
        && (!http1 || (shared.options.http1_fast_path && prefix.starts_with(H2C_PREFACE_LINE)));
    if own_h2 {
        // Each request is recorded once its response's last bytes were written.
        let after_write = forward::AfterWrite::default();
        let info = ConnInfo {
            after_write: Some(after_write.clone()),
            ..info
        };
        // One reference per request, not one per field of the connection's info.
        let handling = Arc::new((shared.clone(), info));
        let service = move |req| -> h2::conn::Answer {
            let handling = handling.clone();
            Box::pin(async move {
                let (shared, info) = &*handling;
                forward::handle(&shared.routes, &shared.edge, info, req).await
            })
        };
        let options = &shared.options;
        let config = h2::Config {
            limits: h2::hpack::Limits {
                list_size: options.max_header_bytes,
                count: options.max_headers,
            },
            ..h2::Config::default()
        };
        let conn = std::pin::pin!(h2::Connection::new(
            io,
            prefix,
            service,
            config,
            after_write
        ));
        watch.drive(conn, |c| c.get_mut().graceful_shutdown()).await;
        return;
    }
    let handling = Arc::new((shared.clone(), info));
    let service = service_fn(move |req: Request<Incoming>| {
        let handling = handling.clone();
        // Boxed: a request's future is a few KiB, and hyper moves the one it is given (into
        // its dispatcher's slot; on HTTP/2 into a task of its own, more than once). Moving a
        // box instead copies a pointer; the future is written once, into the heap.
        Box::pin(async move {
            let (shared, info) = &*handling;
            Ok::<_, std::convert::Infallible>(
                forward::handle(
                    &shared.routes,
                    &shared.edge,
                    info,
                    req.map(ClientBody::Hyper),
                )
                .await,
            )
        })
    });
    let io = TokioIo::new(fast::Prefixed { prefix, inner: io });
    let conn = std::pin::pin!(shared.builder.serve_connection_with_upgrades(io, service));
    watch.drive(conn, |c| c.graceful_shutdown()).await;
}

/// The first line of an h2c connection's preface, as the fast path hands it over.
const H2C_PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// What a served connection is watched for: a drain, the proxy closing, an idle client, a
/// client that stopped reading.
struct Watch {
    client: SocketAddr,
    heard: Arc<AtomicBool>,
    activity: Arc<Activity>,
    active: Arc<AtomicUsize>,
    idle: Duration,
    drain: watch::Receiver<bool>,
    close: watch::Receiver<bool>,
}

impl Watch {
    /// Runs `conn` to its end, asking it to finish (`shut`: a graceful shutdown) on a drain
    /// or once idle, and dropping it when the proxy closes or the client stops reading.
    async fn drive<C, E>(
        self,
        mut conn: std::pin::Pin<&mut C>,
        shut: impl Fn(std::pin::Pin<&mut C>),
    ) where
        C: std::future::Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let Watch {
            client,
            heard,
            activity,
            active,
            idle,
            mut drain,
            mut close,
        } = self;
        let tick = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut ticker = tokio::time::interval(tick);
        let mut draining = false;
        // Draining came before the client's first bytes: shut down once they are in (see below).
        let mut deferred: Option<tokio::time::Instant> = None;
        // Made once, not in each turn of the loop: the task wakes several times per request
        // (more on HTTP/2), and a watch's wait registers with it and unregisters each time it
        // is made and dropped.
        let mut drained = std::pin::pin!(async {
            let _ = drain.wait_for(|d| *d).await;
        });
        let mut closed = std::pin::pin!(async {
            let _ = close.wait_for(|c| *c).await;
        });
        let mut recheck = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
        loop {
            tokio::select! {
                // The connection first: one the fast path handed over has its request read
                // already, and hyper must take it in before a drain's graceful shutdown (which
                // drops a connection still telling HTTP/1 from HTTP/2).
                biased;
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%client, "client connection ended: {e}");
                    }
                    return;
                }
                () = drained.as_mut(), if !draining => {
                    draining = true;
                    // Before the first bytes are read, a graceful shutdown drops the connection
                    // without an answer (hyper-util is still telling HTTP/1 from HTTP/2), though
                    // the client may have sent its request already: the socket was accepted just
                    // before the drain. Let it be read first; hyper then answers that request and
                    // closes.
                    if heard.load(Ordering::Acquire) {
                        shut(conn.as_mut());
                    } else {
                        deferred = Some(tokio::time::Instant::now());
                        recheck.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(5));
                    }
                }
                () = recheck.as_mut(), if deferred.is_some() => {
                    let waited = deferred.map_or(Duration::ZERO, |since| since.elapsed());
                    if heard.load(Ordering::Acquire) || waited >= FIRST_BYTES_WAIT {
                        deferred = None;
                        shut(conn.as_mut());
                    } else {
                        recheck.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(5));
                    }
                }
                () = closed.as_mut() => return,
                _ = ticker.tick() => {
                    // A client that stops reading its response would hold the instance's slot
                    // (and CPU) for as long as it likes: cut it once a write has waited for it as
                    // long as an idle connection may last.
                    if activity.write_stalled() >= idle {
                        tracing::debug!(%client, "client stopped reading its response: connection cut");
                        return;
                    }
                    if !draining && active.load(Ordering::Acquire) == 0 && activity.idle() >= idle {
                        tracing::debug!(%client, "idle client connection closed");
                        draining = true;
                        shut(conn.as_mut());
                    }
                }
            }
        }
    }
}
