//! Paths to handlers: `/v1/services/{name}`-style patterns, path parameters, query strings,
//! JSON bodies decoded with the path of the field at fault, and replies (JSON, text, or a
//! stream of JSON lines for progress, logs and events).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, Method, StatusCode};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::error::{ApiError, ErrorCode, FieldError};

/// A request as handlers see it.
#[derive(Debug)]
pub struct ApiRequest {
    pub method: Method,
    pub path: String,
    pub params: HashMap<String, String>,
    pub query: Vec<(String, String)>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The body, not read, for a request whose content type is a byte stream (see
    /// [`is_streamed`]); `body` is then empty.
    pub stream: Option<hyper::body::Incoming>,
}

/// Content types whose bodies reach the handler unread (uploads), instead of being collected
/// up to the JSON limit.
pub fn is_streamed(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(http::header::CONTENT_TYPE) else {
        return false;
    };
    let essence = ct
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim();
    [
        "application/octet-stream",
        "application/x-tar",
        "application/gzip",
    ]
    .iter()
    .any(|t| essence.eq_ignore_ascii_case(t))
}

impl ApiRequest {
    /// A path parameter the pattern declared.
    pub fn param(&self, name: &str) -> &str {
        self.params.get(name).map(String::as_str).unwrap_or("")
    }

    /// The last value of a query parameter.
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the request asks for an HTTP/1.1 upgrade to `protocol` (`Connection: upgrade`
    /// and `Upgrade: <protocol>`, case-insensitive).
    pub fn wants_upgrade(&self, protocol: &str) -> bool {
        let has = |name: http::header::HeaderName, token: &str| {
            self.headers.get_all(name).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            })
        };
        has(http::header::CONNECTION, "upgrade") && has(http::header::UPGRADE, protocol)
    }

    /// A boolean query flag: present without a value, `true`/`1`, or `false`/`0`.
    pub fn flag(&self, name: &str) -> Result<bool, ApiError> {
        match self.query(name) {
            None => Ok(false),
            Some("" | "true" | "1") => Ok(true),
            Some("false" | "0") => Ok(false),
            Some(other) => Err(ApiError::invalid(vec![FieldError {
                field: name.to_owned(),
                message: format!("expected true or false, got {other:?}"),
            }])),
        }
    }

    /// A numeric query parameter.
    pub fn query_u64(&self, name: &str) -> Result<Option<u64>, ApiError> {
        self.query(name)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    ApiError::invalid(vec![FieldError {
                        field: name.to_owned(),
                        message: format!("expected a whole number, got {v:?}"),
                    }])
                })
            })
            .transpose()
    }

    /// The body as JSON of type `T`; an error names the field at fault (`env[2].name`) and
    /// what was expected there.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        if let Some(ct) = self.headers.get(http::header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("");
            let essence = ct.split(';').next().unwrap_or("").trim();
            if !essence.eq_ignore_ascii_case("application/json") {
                return Err(ApiError::new(
                    ErrorCode::UnsupportedMediaType,
                    format!("the body must be application/json, not {ct:?}"),
                ));
            }
        }
        let body: &[u8] = if self.body.is_empty() {
            b"{}"
        } else {
            &self.body
        };
        let de = &mut serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let message = if inner.is_syntax() || inner.is_eof() {
                format!(
                    "the body is not valid JSON: {inner} (line {}, column {})",
                    inner.line(),
                    inner.column()
                )
            } else {
                inner.to_string()
            };
            let mut err = ApiError::new(ErrorCode::InvalidJson, message.clone());
            if path != "." && !inner.is_syntax() && !inner.is_eof() {
                err.message = format!("{path}: {message}");
                err.fields.push(FieldError {
                    field: path,
                    message,
                });
            }
            err
        })
    }
}

/// The connection after an HTTP/1.1 upgrade: raw bytes both ways.
pub type Upgraded = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;

/// What runs on an upgraded connection (see [`Reply::Upgrade`]).
pub type UpgradeHandler = Box<dyn FnOnce(Upgraded) -> BoxFuture<'static, ()> + Send>;

/// What a handler answers.
pub enum Reply {
    Json(StatusCode, serde_json::Value),
    Text(StatusCode, &'static str, String),
    /// JSON lines, one per value received, until the sender is dropped.
    Lines(mpsc::Receiver<serde_json::Value>),
    /// `101 Switching Protocols` to `protocol` (the request must have asked for it, see
    /// [`ApiRequest::wants_upgrade`]); the handler then owns the connection.
    Upgrade {
        protocol: &'static str,
        handler: UpgradeHandler,
    },
}

impl Reply {
    pub fn ok(value: impl serde::Serialize) -> Result<Reply, ApiError> {
        Reply::status(StatusCode::OK, value)
    }

    pub fn status(status: StatusCode, value: impl serde::Serialize) -> Result<Reply, ApiError> {
        serde_json::to_value(value)
            .map(|v| Reply::Json(status, v))
            .map_err(|e| ApiError::internal(format!("encode the answer: {e}")))
    }
}

type Handler<S> =
    Arc<dyn Fn(Arc<S>, ApiRequest) -> BoxFuture<'static, Result<Reply, ApiError>> + Send + Sync>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

struct Route<S> {
    method: Method,
    pattern: String,
    segments: Vec<Segment>,
    handler: Handler<S>,
}

/// The admin API's routes over a shared state `S`.
pub struct Router<S> {
    routes: Vec<Route<S>>,
}

impl<S> Default for Router<S> {
    fn default() -> Self {
        Router { routes: Vec::new() }
    }
}

/// Why a request matched no handler.
enum Miss {
    NoPath,
    Method(Vec<Method>),
}

impl<S: Send + Sync + 'static> Router<S> {
    pub fn new() -> Router<S> {
        Router::default()
    }

    /// Adds a route; `pattern` is a path with `{param}` segments.
    ///
    /// # Panics
    /// On a pattern registered twice for one method: a programming error caught by the
    /// router's tests.
    pub fn route<F, Fut>(mut self, method: Method, pattern: &str, handler: F) -> Router<S>
    where
        F: Fn(Arc<S>, ApiRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Reply, ApiError>> + Send + 'static,
    {
        let segments = split(pattern)
            .map(
                |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) => Segment::Param(name.to_owned()),
                    None => Segment::Literal(s.to_owned()),
                },
            )
            .collect::<Vec<_>>();
        assert!(
            !self
                .routes
                .iter()
                .any(|r| r.method == method && same_shape(&r.segments, &segments)),
            "route {method} {pattern} registered twice"
        );
        self.routes.push(Route {
            method,
            pattern: pattern.to_owned(),
            segments,
            handler: Arc::new(move |state, req| Box::pin(handler(state, req))),
        });
        self
    }

    /// Every (method, pattern), for the OpenAPI document's check.
    pub fn routes(&self) -> impl Iterator<Item = (&Method, &str)> {
        self.routes.iter().map(|r| (&r.method, r.pattern.as_str()))
    }

    /// Runs the handler `req` names (or answers why none).
    pub async fn dispatch(&self, state: Arc<S>, mut req: ApiRequest) -> Result<Reply, ApiError> {
        match self.find(&req.method, &req.path) {
            Ok((route, params)) => {
                req.params = params;
                (route.handler)(state, req).await
            }
            Err(Miss::NoPath) => Err(ApiError::not_found(format!(
                "no API path {:?} (the API is described at GET /v1/openapi.json)",
                req.path
            ))),
            Err(Miss::Method(allowed)) => Err(ApiError::new(
                ErrorCode::MethodNotAllowed,
                format!(
                    "{} is not allowed on {:?}; allowed: {}",
                    req.method,
                    req.path,
                    allowed
                        .iter()
                        .map(Method::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    fn find(
        &self,
        method: &Method,
        path: &str,
    ) -> Result<(&Route<S>, HashMap<String, String>), Miss> {
        let parts = split(path).collect::<Vec<_>>();
        let mut allowed = Vec::new();
        for route in &self.routes {
            let Some(params) = matches(&route.segments, &parts) else {
                continue;
            };
            if route.method == *method || (*method == Method::HEAD && route.method == Method::GET) {
                return Ok((route, params));
            }
            allowed.push(route.method.clone());
        }
        if allowed.is_empty() {
            Err(Miss::NoPath)
        } else {
            Err(Miss::Method(allowed))
        }
    }
}

/// Two patterns that match the same paths (parameter names aside).
fn same_shape(a: &[Segment], b: &[Segment]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|pair| match pair {
            (Segment::Literal(x), Segment::Literal(y)) => x == y,
            (Segment::Param(_), Segment::Param(_)) => true,
            _ => false,
        })
}

fn split(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

fn matches(segments: &[Segment], parts: &[&str]) -> Option<HashMap<String, String>> {
    if segments.len() != parts.len() {
        return None;
    }
    let mut params = HashMap::new();
    for (segment, part) in segments.iter().zip(parts) {
        match segment {
            Segment::Literal(lit) if lit == part => {}
            Segment::Literal(_) => return None,
            Segment::Param(name) => {
                let value = percent_encoding::percent_decode_str(part)
                    .decode_utf8()
                    .ok()?
                    .into_owned();
                params.insert(name.clone(), value);
            }
        }
    }
    Some(params)
}

/// Splits a query string into decoded pairs (`+` is a space, as in forms).
pub fn parse_query(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    fn req(method: Method, target: &str, body: &str) -> ApiRequest {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        ApiRequest {
            method,
            path: path.to_owned(),
            params: HashMap::new(),
            query: parse_query(query),
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_owned()),
            stream: None,
        }
    }

    fn router() -> Router<()> {
        Router::new()
            .route(Method::GET, "/v1/services", |_, _| async {
                Reply::ok(serde_json::json!(["list"]))
            })
            .route(Method::GET, "/v1/services/{name}", |_, r| async move {
                Reply::ok(serde_json::json!({ "name": r.param("name") }))
            })
            .route(Method::DELETE, "/v1/services/{name}", |_, r| async move {
                Reply::ok(serde_json::json!({ "deleted": r.param("name") }))
            })
    }

    fn json(reply: Result<Reply, ApiError>) -> serde_json::Value {
        match reply {
            Ok(Reply::Json(_, v)) => v,
            Ok(_) => panic!("not JSON"),
            Err(e) => e.to_body(),
        }
    }

    #[tokio::test]
    async fn params_are_decoded_and_methods_chosen() {
        let r = router();
        let v = json(
            r.dispatch(Arc::new(()), req(Method::GET, "/v1/services/we%62", ""))
                .await,
        );
        assert_eq!(v["name"], "web");
        let v = json(
            r.dispatch(Arc::new(()), req(Method::DELETE, "/v1/services/api/", ""))
                .await,
        );
        assert_eq!(v["deleted"], "api");
        let v = json(
            r.dispatch(Arc::new(()), req(Method::HEAD, "/v1/services", ""))
                .await,
        );
        assert_eq!(v[0], "list");
    }

    #[tokio::test]
    async fn unknown_paths_and_methods_say_what_is_there() {
        let r = router();
        let v = json(
            r.dispatch(Arc::new(()), req(Method::GET, "/v2/services", ""))
                .await,
        );
        assert_eq!(v["error"]["code"], "not_found");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("/v1/openapi.json")
        );
        let v = json(
            r.dispatch(Arc::new(()), req(Method::PUT, "/v1/services/x", ""))
                .await,
        );
        assert_eq!(v["error"]["code"], "method_not_allowed");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .ends_with("GET, DELETE")
        );
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        env: Vec<Env>,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Env {
        name: String,
        value: String,
    }

    #[test]
    fn json_errors_name_the_field() {
        let r = req(
            Method::POST,
            "/",
            r#"{"name": "web", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": 2}]}"#,
        );
        let e = r.json::<Body>().unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidJson);
        assert_eq!(e.fields[0].field, "env[1].value");
        assert!(
            e.message
                .starts_with("env[1].value: invalid type: integer `2`")
        );

        let r = req(
            Method::POST,
            "/",
            r#"{"name": "web", "env": [], "colour": 1}"#,
        );
        let e = r.json::<Body>().unwrap_err();
        assert!(
            e.message.contains("unknown field `colour`"),
            "{}",
            e.message
        );

        let r = req(Method::POST, "/", "{\"name\": \n\"web\",");
        let e = r.json::<Body>().unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        assert!(e.message.contains("line 2"), "{}", e.message);
        assert!(e.fields.is_empty());
    }

    #[test]
    fn json_wants_json_content() {
        let mut r = req(Method::POST, "/", "name=web");
        r.headers.insert(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded".parse().unwrap(),
        );
        assert_eq!(
            r.json::<serde_json::Value>().unwrap_err().code,
            ErrorCode::UnsupportedMediaType
        );
        r.headers.insert(
            http::header::CONTENT_TYPE,
            "application/json; charset=utf-8".parse().unwrap(),
        );
        r.body = Bytes::from_static(b"{}");
        assert!(r.json::<serde_json::Value>().is_ok());
    }

    #[test]
    fn query_values() {
        let r = req(Method::GET, "/x?follow&since=12&tail=abc&q=a+b%21", "");
        assert!(r.flag("follow").unwrap());
        assert!(!r.flag("absent").unwrap());
        assert_eq!(r.query_u64("since").unwrap(), Some(12));
        assert_eq!(r.query_u64("tail").unwrap_err().fields[0].field, "tail");
        assert_eq!(r.query("q"), Some("a b!"));
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn a_route_twice_is_a_bug() {
        let _ = router().route(Method::GET, "/v1/services/{other}", |_, _| async {
            Reply::ok(1)
        });
    }
}
