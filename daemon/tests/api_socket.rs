//! The admin API over a real Unix socket: JSON answers, errors decoded by the client with
//! their code, body limits, streamed JSON lines, the socket's mode and a second daemon refused.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use http::{Method, StatusCode};
use lull_daemon::api::server::{self, SocketOptions};
use lull_daemon::api::{ApiError, ClientError, ErrorCode, FieldError, Reply, Router};
use serde::Deserialize;

#[derive(Default)]
struct State {
    names: std::sync::Mutex<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    name: String,
}

fn router() -> Router<State> {
    Router::new()
        .route(Method::GET, "/v1/names", |s: Arc<State>, _| async move {
            Reply::ok(s.names.lock().unwrap().clone())
        })
        .route(Method::POST, "/v1/names", |s: Arc<State>, r| async move {
            let c: Create = r.json()?;
            if c.name.is_empty() {
                return Err(ApiError::invalid(vec![FieldError {
                    field: "name".into(),
                    message: "must not be empty".into(),
                }]));
            }
            let mut names = s.names.lock().unwrap();
            if names.contains(&c.name) {
                return Err(ApiError::new(
                    ErrorCode::AlreadyExists,
                    format!("{:?} exists", c.name),
                ));
            }
            names.push(c.name.clone());
            Reply::status(StatusCode::CREATED, serde_json::json!({ "name": c.name }))
        })
        .route(Method::GET, "/v1/count", |_, r| async move {
            let n = r.query_u64("n")?.unwrap_or(3);
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(async move {
                for i in 0..n {
                    if tx.send(serde_json::json!({ "i": i })).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            });
            Ok(Reply::Lines(rx))
        })
}

#[tokio::test]
async fn json_errors_and_streams_over_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/lull.sock");
    let options = SocketOptions::new(&path);
    let listener = server::bind(&options).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o660
    );
    // A second daemon on the same socket is refused while the first answers.
    assert!(matches!(
        server::bind(&options),
        Err(server::SocketError::InUse { .. })
    ));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let served = tokio::spawn(server::serve(
        listener,
        Arc::new(router()),
        Arc::new(State::default()),
        stop,
    ));
    let client = lull_daemon::api::Client::new(&path);

    let created: serde_json::Value = client
        .call(
            Method::POST,
            "/v1/names",
            Some(&serde_json::json!({"name": "web"})),
        )
        .await
        .unwrap();
    assert_eq!(created["name"], "web");
    let names: Vec<String> = client.get("/v1/names").await.unwrap();
    assert_eq!(names, ["web"]);

    let again = client
        .call::<_, serde_json::Value>(
            Method::POST,
            "/v1/names",
            Some(&serde_json::json!({"name": "web"})),
        )
        .await
        .unwrap_err();
    assert_eq!(again.api().unwrap().code, ErrorCode::AlreadyExists);

    let bad = client
        .call::<_, serde_json::Value>(
            Method::POST,
            "/v1/names",
            Some(&serde_json::json!({"name": 7})),
        )
        .await
        .unwrap_err();
    let bad = bad.api().unwrap();
    assert_eq!(bad.code, ErrorCode::InvalidJson);
    assert_eq!(bad.fields[0].field, "name");

    let empty = client
        .call::<_, serde_json::Value>(
            Method::POST,
            "/v1/names",
            Some(&serde_json::json!({"name": ""})),
        )
        .await
        .unwrap_err();
    assert_eq!(empty.to_string(), "name: must not be empty");

    let huge = "x".repeat(server::MAX_BODY + 1);
    let too_big = client
        .call::<_, serde_json::Value>(
            Method::POST,
            "/v1/names",
            Some(&serde_json::json!({"name": huge})),
        )
        .await
        .unwrap_err();
    assert_eq!(too_big.api().unwrap().code, ErrorCode::PayloadTooLarge);

    let missing = client
        .get::<serde_json::Value>("/v1/nothing")
        .await
        .unwrap_err();
    assert_eq!(missing.api().unwrap().code, ErrorCode::NotFound);

    let mut lines = client
        .stream(Method::GET, "/v1/count?n=4", None::<&()>)
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(v) = lines.next().await.unwrap() {
        got.push(v["i"].as_u64().unwrap());
    }
    assert_eq!(got, [0, 1, 2, 3]);

    stop_tx.send(true).unwrap();
    served.await.unwrap();
    drop(dir);
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_no_daemon_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lull.sock");
    let client = lull_daemon::api::Client::new(&path);
    let err = client
        .get::<serde_json::Value>("/v1/names")
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::NotRunning { .. }), "{err}");
    assert!(err.to_string().contains("lull daemon"), "{err}");
    // A socket file left by a daemon that died: bound again without complaint.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let err = client
        .get::<serde_json::Value>("/v1/names")
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::NotRunning { .. }), "{err}");
    let listener = server::bind(&SocketOptions::new(&path)).unwrap();
    drop(listener);
}
