//! An admin socket passed on by a previous daemon is served as it is, and one bound to
//! another path is refused.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};

use lull_daemon::api::server::{self, SocketError, SocketOptions};

#[tokio::test]
async fn an_inherited_socket_on_the_configured_path_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lull.sock");
    let inherited = UnixListener::bind(&path).unwrap();
    let options = SocketOptions {
        path: path.clone(),
        mode: 0o660,
        group: None,
    };
    let listener = server::adopt(inherited, &options).unwrap();
    let client = std::thread::spawn({
        let path = path.clone();
        move || {
            let mut stream = UnixStream::connect(&path).unwrap();
            stream.write_all(b"ping").unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).unwrap();
            answer
        }
    });
    let (mut stream, _) = listener.accept().await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    stream.write_all(b"pong").await.unwrap();
    drop(stream);
    assert_eq!(client.join().unwrap(), "pong");
}

#[tokio::test]
async fn an_inherited_socket_on_another_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let inherited = UnixListener::bind(dir.path().join("old.sock")).unwrap();
    let options = SocketOptions {
        path: dir.path().join("lull.sock"),
        mode: 0o660,
        group: None,
    };
    let err = server::adopt(inherited, &options).unwrap_err();
    assert!(matches!(err, SocketError::InheritedPath { .. }), "{err}");
    assert!(err.to_string().contains("old.sock"), "{err}");
}
