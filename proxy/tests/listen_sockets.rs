//! Listening sockets bound outside the proxy (inherited by a daemon taking over) are served,
//! and the proxy's own sockets can be duplicated and served by another proxy: a connection
//! made while the first proxy shuts down is never refused, the second one answers it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use lull_proxy::server::{ServerError, bind_reuse_port, spawn_runtimes};
use lull_proxy::{Proxy, ProxyOptions, RouteTable};

fn get(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to the proxy");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: nobody.test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read the answer");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_given_sockets_and_hands_duplicates_on() {
    let runtimes = spawn_runtimes(2, "listen-sockets-test").unwrap();
    let sockets = bind_reuse_port("127.0.0.1:0".parse().unwrap(), 3).unwrap();
    assert_eq!(sockets.len(), 3);
    let addr = sockets[0].local_addr().unwrap();
    assert!(sockets.iter().all(|s| s.local_addr().unwrap() == addr));

    let first = Proxy::new(Arc::new(RouteTable::new()), ProxyOptions::default());
    assert_eq!(first.listen_on_sockets(sockets, &runtimes).unwrap(), addr);
    let answer = tokio::task::spawn_blocking(move || get(addr))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");

    let fds = first.listener_fds().unwrap();
    assert_eq!(fds.len(), 3);
    assert!(fds.iter().all(|f| f.addr == addr && !f.tls));

    // The first proxy stops accepting; its sockets stay open through the duplicates, so a
    // client connecting now waits in the backlog instead of being refused...
    first.shutdown(Duration::from_secs(1)).await;
    assert!(
        first.listener_fds().unwrap().is_empty(),
        "closed after shutdown"
    );
    let waiting = tokio::task::spawn_blocking(move || get(addr));
    tokio::time::sleep(Duration::from_millis(100)).await;

    // ...and the second proxy, given the duplicates, answers it.
    let second = Proxy::new(Arc::new(RouteTable::new()), ProxyOptions::default());
    let inherited: Vec<std::net::TcpListener> = fds.into_iter().map(|f| f.fd.into()).collect();
    assert_eq!(
        second.listen_on_sockets(inherited, &runtimes).unwrap(),
        addr
    );
    let answer = waiting.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    second.shutdown(Duration::from_secs(1)).await;
}

#[test]
fn refuses_no_sockets_and_mixed_addresses() {
    let runtimes = spawn_runtimes(1, "listen-sockets-refuse").unwrap();
    let proxy = Proxy::new(Arc::new(RouteTable::new()), ProxyOptions::default());
    assert!(matches!(
        proxy.listen_on_sockets(Vec::new(), &runtimes),
        Err(ServerError::NoSockets)
    ));
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let err = proxy.listen_on_sockets(vec![a, b], &runtimes).unwrap_err();
    assert!(matches!(err, ServerError::MixedAddresses { .. }), "{err}");
}

/// A connection accepted just before the drain, whose request arrives after it, is answered
/// (not dropped while the proxy was still telling HTTP/1 from HTTP/2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_arriving_just_after_the_drain_is_answered() {
    let proxy = Arc::new(Proxy::new(
        Arc::new(RouteTable::new()),
        ProxyOptions::default(),
    ));
    let addr = proxy.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Accepted, nothing sent yet.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(proxy.connections(), 1);
    let shutdown = tokio::spawn({
        let proxy = proxy.clone();
        async move { proxy.shutdown(Duration::from_secs(3)).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let answer = tokio::task::spawn_blocking(move || {
        write!(
            stream,
            "GET / HTTP/1.1\r\nHost: nobody.test\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "answer: {answer:?}");
    let report = shutdown.await.unwrap();
    assert_eq!(report.forced, 0, "{report:?}");
}
