//! The admin API's routes (version 1) over [`Control`]. `openapi.json` beside this crate
//! describes the same routes; a test keeps the two in step.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Control, end_json};
use crate::api::{ApiError, ApiRequest, ErrorCode, Reply, Router};

/// The OpenAPI document of this API, checked in and served at `GET /v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// How often a followed event list looks for new events.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);

pub fn router() -> Router<Control> {
    Router::new()
        .route(Method::GET, "/v1/openapi.json", |_, _| async {
            Ok(Reply::Text(
                StatusCode::OK,
                "application/json",
                OPENAPI.to_owned(),
            ))
        })
        .route(Method::GET, "/v1/status", |c: Arc<Control>, _| async move {
            let services = c.engine.services();
            Reply::ok(json!({
                "version": env!("CARGO_PKG_VERSION"),
                "services_running": services,
                "http_port": c.http_port,
            }))
        })
        .route(
            Method::GET,
            "/v1/services",
            |c: Arc<Control>, _| async move { Reply::ok(c.list().await?) },
        )
        .route(
            Method::POST,
            "/v1/services",
            |c: Arc<Control>, r| async move {
                let body: Value = r.json()?;
                Reply::status(StatusCode::ACCEPTED, c.create(body).await?)
            },
        )
        .route(
            Method::GET,
            "/v1/services/{name}",
            |c: Arc<Control>, r| async move { Reply::ok(c.get(r.param("name")).await?) },
        )
        .route(
            Method::PATCH,
            "/v1/services/{name}",
            |c: Arc<Control>, r| async move {
                let body: Value = r.json()?;
                Reply::status(StatusCode::ACCEPTED, c.update(r.param("name"), body).await?)
            },
        )
        .route(
            Method::DELETE,
            "/v1/services/{name}",
            |c: Arc<Control>, r| async move {
                c.delete(r.param("name")).await?;
                Reply::ok(json!({ "deleted": r.param("name") }))
            },
        )
        .route(
            Method::POST,
            "/v1/services/{name}/deploy",
            |c: Arc<Control>, r| async move {
                Reply::status(StatusCode::ACCEPTED, c.redeploy(r.param("name")).await?)
            },
        )
        .route(
            Method::POST,
            "/v1/services/{name}/builds",
            |c: Arc<Control>, r| async move {
                let body: Value = r.json()?;
                Reply::status(StatusCode::ACCEPTED, c.build(r.param("name"), body).await?)
            },
        )
        .route(Method::POST, "/v1/uploads", upload)
        .route(Method::POST, "/v1/images/push", |c: Arc<Control>, r| async move {
            let body: Value = r.json()?;
            Reply::ok(c.push_image(body).await?)
        })
        .route(
            Method::POST,
            "/v1/services/{name}/rollback",
            |c: Arc<Control>, r| async move {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Body {
                    revision: Option<u64>,
                }
                let body: Body = r.json()?;
                Reply::ok(c.rollback(r.param("name"), body.revision).await?)
            },
        )
        .route(Method::POST, "/v1/services/{name}/exec", super::exec::exec)
        .route(
            Method::POST,
            "/v1/services/{name}/pause",
            |c: Arc<Control>, r| async move {
                c.pause(r.param("name")).await?;
                Reply::ok(json!({ "paused": r.param("name") }))
            },
        )
        .route(
            Method::POST,
            "/v1/services/{name}/resume",
            |c: Arc<Control>, r| async move { Reply::ok(c.resume(r.param("name")).await?) },
        )
        .route(
            Method::GET,
            "/v1/services/{name}/revisions",
            |c: Arc<Control>, r| async move { Reply::ok(c.revisions(r.param("name")).await?) },
        )
        .route(
            Method::GET,
            "/v1/services/{name}/export",
            |c: Arc<Control>, r| async move {
                Ok(Reply::Text(
                    StatusCode::OK,
                    "application/yaml",
                    c.export(r.param("name")).await?,
                ))
            },
        )
        .route(Method::GET, "/v1/services/{name}/events", events)
        .route(Method::GET, "/v1/services/{name}/logs", logs)
        .route(
            Method::GET,
            "/v1/operations/{id}",
            |c: Arc<Control>, r| async move {
                Reply::ok(operation_json(&c.operation(r.param("id")).await?))
            },
        )
        .route(Method::GET, "/v1/operations/{id}/progress", progress)
        .route(
            Method::GET,
            "/v1/secrets",
            |c: Arc<Control>, _| async move { Reply::ok(c.list_secrets().await?) },
        )
        .route(Method::PUT, "/v1/secrets/{name}", put_secret)
        .route(
            Method::DELETE,
            "/v1/secrets/{name}",
            |c: Arc<Control>, r| async move {
                c.delete_secret(r.param("name")).await?;
                Reply::ok(json!({ "deleted": r.param("name") }))
            },
        )
        .route(
            Method::GET,
            "/v1/registries",
            |c: Arc<Control>, _| async move { Reply::ok(c.list_registries().await?) },
        )
        .route(Method::PUT, "/v1/registries/{host}", put_registry)
        .route(
            Method::GET,
            "/v1/domains",
            |c: Arc<Control>, _| async move { Reply::ok(c.list_domains(None).await?) },
        )
        .route(
            Method::GET,
            "/v1/services/{name}/domains",
            |c: Arc<Control>, r| async move {
                Reply::ok(c.list_domains(Some(r.param("name"))).await?)
            },
        )
        .route(
            Method::POST,
            "/v1/services/{name}/domains",
            |c: Arc<Control>, r| async move {
                let body: super::domains::AddDomain = r.json()?;
                Reply::status(
                    StatusCode::ACCEPTED,
                    c.add_domain(r.param("name"), body).await?,
                )
            },
        )
        .route(
            Method::DELETE,
            "/v1/services/{name}/domains/{domain}",
            |c: Arc<Control>, r| async move {
                Reply::status(
                    StatusCode::ACCEPTED,
                    c.remove_domain(r.param("name"), r.param("domain")).await?,
                )
            },
        )
        .route(
            Method::GET,
            "/v1/certificates",
            |c: Arc<Control>, _| async move { Reply::ok(c.list_certificates()?) },
        )
        .route(
            Method::POST,
            "/v1/certificates/reload",
            |c: Arc<Control>, _| async move { Reply::ok(c.reload_certificates().await?) },
        )
        .route(
            Method::PUT,
            "/v1/certificates/{id}",
            |c: Arc<Control>, r| async move {
                let body: super::domains::PutCertificate = r.json()?;
                Reply::ok(c.put_certificate(r.param("id"), body).await?)
            },
        )
        .route(
            Method::DELETE,
            "/v1/certificates/{id}",
            |c: Arc<Control>, r| async move {
                c.delete_certificate(r.param("id")).await?;
                Reply::ok(json!({ "deleted": r.param("id") }))
            },
        )
        .route(
            Method::DELETE,
            "/v1/registries/{host}",
            |c: Arc<Control>, r| async move { Reply::ok(c.registry_logout(r.param("host")).await?) },
        )
}

/// `POST /v1/uploads` with a source tar (or gzip tar) as the body, streamed to disk.
async fn upload(c: Arc<Control>, mut r: ApiRequest) -> Result<Reply, ApiError> {
    let Some(body) = r.stream.take() else {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "an upload's body must be application/x-tar, application/gzip or application/octet-stream",
        ));
    };
    Reply::status(StatusCode::CREATED, c.store_upload(body).await?)
}

/// `PUT /v1/secrets/{name}` with `{"value": "..."}`: the value is sealed, never answered.
async fn put_secret(c: Arc<Control>, r: ApiRequest) -> Result<Reply, ApiError> {
    // No Debug: the value must not reach a log by accident.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        value: String,
    }
    let body: Body = r
        .json()
        .map_err(|e| scrub_body_error(e, r#"{"value": "..."}"#))?;
    let set = c
        .set_secret(r.param("name"), zeroize::Zeroizing::new(body.value))
        .await?;
    let status = if set.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Reply::status(status, set)
}

/// A body error that cannot quote a secret: JSON errors may quote the offending text, so only
/// unknown and missing fields are told as they are; anything else names the field (if any) and
/// the expected shape.
fn scrub_body_error(e: ApiError, shape: &str) -> ApiError {
    if e.code == ErrorCode::UnsupportedMediaType
        || e.message.contains("unknown field")
        || e.message.contains("missing field")
    {
        return e;
    }
    match e.fields.first() {
        Some(field) => ApiError::invalid(vec![crate::api::FieldError {
            field: field.field.clone(),
            message: "expected a string".into(),
        }]),
        None => ApiError::new(e.code, format!("the body must be JSON: {shape}")),
    }
}

/// `PUT /v1/registries/{host}` with `{"username": "...", "password": "..."}`.
async fn put_registry(c: Arc<Control>, r: ApiRequest) -> Result<Reply, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        username: String,
        password: String,
    }
    let body: Body = r
        .json()
        .map_err(|e| scrub_body_error(e, r#"{"username": "...", "password": "..."}"#))?;
    let view = c
        .registry_login(
            r.param("host"),
            &body.username,
            zeroize::Zeroizing::new(body.password),
        )
        .await?;
    Reply::ok(view)
}

fn operation_json(op: &crate::store::OperationRecord) -> Value {
    json!({
        "id": op.id,
        "kind": op.kind,
        "service": op.service,
        "state": op.state,
        "created_at": op.created_at.to_string(),
        "updated_at": op.updated_at.to_string(),
        "progress": op.progress.iter().map(|p| json!({"time": p.time.to_string(), "line": p.line})).collect::<Vec<_>>(),
        "result": op.result,
        "error": op.error,
    })
}

/// `GET /v1/services/{name}/events?since=SEQ&follow`: JSON lines, oldest first; with
/// `follow`, new events as they are recorded.
async fn events(c: Arc<Control>, r: ApiRequest) -> Result<Reply, ApiError> {
    let name = r.param("name").to_owned();
    let mut since = r.query_u64("since")?.unwrap_or(0);
    let follow = r.flag("follow")?;
    // The service must exist (or have existed: a deleted service's events stay readable).
    let first = c.events(&name, since, 10_000).await?;
    if first.is_empty() && c.get(&name).await.is_err() {
        return Err(ApiError::not_found(format!(
            "no service {name} and no events of it"
        )));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut batch = first;
        loop {
            for event in batch.drain(..) {
                since = since.max(event.seq);
                let deleted = event.kind == "service.deleted";
                if tx.send(json!(event)).await.is_err() {
                    return;
                }
                if deleted && follow {
                    return;
                }
            }
            if !follow {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(FOLLOW_EVERY) => {}
                _ = tx.closed() => return,
            }
            match c.events(&name, since, 1000).await {
                Ok(b) => batch = b,
                Err(e) => {
                    let _ = tx.send(e.to_body()).await;
                    return;
                }
            }
        }
    });
    Ok(Reply::Lines(rx))
}

/// Normalizes a `since` value: RFC 3339 (any offset) or a duration back from now (`10m`).
fn since_time(value: Option<&str>) -> Result<Option<String>, ApiError> {
    let Some(value) = value else { return Ok(None) };
    let at = match chrono::DateTime::parse_from_rfc3339(value) {
        Ok(t) => t.with_timezone(&chrono::Utc),
        Err(_) => match crate::duration::parse(value) {
            Ok(ago) => chrono::Duration::from_std(ago)
                .ok()
                .and_then(|ago| chrono::Utc::now().checked_sub_signed(ago))
                .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC),
            Err(_) => {
                return Err(ApiError::invalid(vec![crate::api::FieldError {
                    field: "since".into(),
                    message: format!(
                        "{value:?} is neither an RFC 3339 time (2026-11-26T10:00:00Z) nor a duration (10m)"
                    ),
                }]));
            }
        },
    };
    Ok(Some(
        at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    ))
}

/// `GET /v1/services/{name}/logs?since=T&instance=ID&follow&requests`: the instances' output
/// (or, with `requests`, the proxy's access log of the service) as JSON lines, oldest first.
async fn logs(c: Arc<Control>, r: ApiRequest) -> Result<Reply, ApiError> {
    let name = r.param("name").to_owned();
    let since = since_time(r.query("since"))?;
    let follow = r.flag("follow")?;
    let instance = r.query("instance").map(str::to_owned);
    if r.flag("requests")? {
        // The service must exist: its name becomes a file name.
        c.get(&name).await?;
        return access_log(c, name, since, follow);
    }
    let first = c.logs(&name, since.as_deref(), instance.as_deref()).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(async move {
        let mut last = since;
        let mut batch = first;
        loop {
            for line in batch.drain(..) {
                if let Some(t) = line["time"].as_str() {
                    last = Some(t.to_owned());
                }
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(FOLLOW_EVERY) => {}
                _ = tx.closed() => return,
            }
            match c.logs(&name, last.as_deref(), instance.as_deref()).await {
                Ok(b) => batch = b,
                Err(e) if e.code == ErrorCode::NotFound => return,
                Err(e) => {
                    let _ = tx.send(e.to_body()).await;
                    return;
                }
            }
        }
    });
    Ok(Reply::Lines(rx))
}

/// The access log's entries (JSON objects, one per line) after `since`, then new ones.
fn access_log(
    c: Arc<Control>,
    name: String,
    since: Option<String>,
    follow: bool,
) -> Result<Reply, ApiError> {
    let Some(path) = c.access_log_path(&name) else {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "this daemon keeps no access logs",
        ));
    };
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(async move {
        let mut offset = 0u64;
        loop {
            let read = {
                let path = path.clone();
                tokio::task::spawn_blocking(move || read_from(&path, offset)).await
            };
            let (lines, next) = match read {
                Ok(Ok(r)) => r,
                Ok(Err(_)) | Err(_) => (Vec::new(), offset),
            };
            // A rotation starts a new, shorter file.
            offset = if next < offset { 0 } else { next };
            for line in lines {
                let Ok(entry) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if let (Some(s), Some(t)) = (since.as_deref(), entry["time"].as_str())
                    && t <= s
                {
                    continue;
                }
                if tx.send(entry).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(FOLLOW_EVERY) => {}
                _ = tx.closed() => return,
            }
        }
    });
    Ok(Reply::Lines(rx))
}

/// Whole lines of `path` from byte `offset`; the offset after the last whole line.
fn read_from(path: &std::path::Path, offset: u64) -> std::io::Result<(Vec<String>, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len < offset {
        return Ok((Vec::new(), 0));
    }
    file.seek(SeekFrom::Start(offset))?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    let whole = text.rfind('\n').map_or(0, |i| i + 1);
    let lines = text[..whole].lines().map(str::to_owned).collect();
    Ok((lines, offset + whole as u64))
}

/// `GET /v1/operations/{id}/progress`: the operation's lines as JSON lines (`{"line": ...}`),
/// as they happen while it runs, and a last `{"end": {...}}`.
async fn progress(c: Arc<Control>, r: ApiRequest) -> Result<Reply, ApiError> {
    let id = r.param("id").to_owned();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    if let Some(mut op) = c.live_operation(&id) {
        let redactor = c.redactor().await;
        tokio::spawn(async move {
            while let Some(line) = op.next_line().await {
                let line = redactor.redact(&line);
                if tx.send(json!({ "line": line })).await.is_err() {
                    return;
                }
            }
            let mut end = end_json(&op.wait().await);
            super::secrets::redact_json(&redactor, &mut end);
            let _ = tx.send(json!({ "end": end })).await;
        });
        return Ok(Reply::Lines(rx));
    }
    let record = c.operation(&id).await.map_err(|e| match e.code {
        ErrorCode::NotFound => ApiError::not_found(format!("no operation {id}")),
        _ => e,
    })?;
    tokio::spawn(async move {
        for p in &record.progress {
            if tx.send(json!({ "line": p.line })).await.is_err() {
                return;
            }
        }
        let end = record
            .result
            .clone()
            .or_else(|| record.error.clone())
            .unwrap_or_else(|| json!({ "state": record.state }));
        let _ = tx.send(json!({ "end": end })).await;
    });
    Ok(Reply::Lines(rx))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every route is in the OpenAPI document and every path of the document is routed.
    #[test]
    fn the_openapi_document_matches_the_routes() {
        let doc: Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
        let routed: BTreeSet<(String, String)> = router()
            .routes()
            .map(|(m, p)| (m.to_string(), p.to_owned()))
            .collect();
        assert_eq!(routed, documented);
    }
}
