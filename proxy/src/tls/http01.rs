//! ACME's HTTP-01 challenge (RFC 8555 §8.3): the key authorizations the ACME client is
//! waiting to have fetched, answered by the proxy itself on its plain-HTTP listeners at
//! `/.well-known/acme-challenge/<token>`, for any Host, before routing: a challenge request
//! never reaches an app, and an app cannot answer one.
//!
//! ```text
//! let challenges = Arc::new(Http01Challenges::new());
//! proxy.set_edge(Edge { http01: challenges.clone(), .. });
//! challenges.insert(&token, &key_authorization); // then tell the ACME server to validate
//! challenges.remove(&token);                     // once the authorization is done
//! ```

use std::collections::HashMap;
use std::sync::RwLock;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;

use crate::forward::{ProxyBody, plain};

/// The path every HTTP-01 challenge is fetched under; the token follows it.
pub const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Longest token served (RFC 8555 asks for at least 128 bits of entropy, 22 characters;
/// CAs use 43). Longer paths are not challenges this proxy could hold.
pub const MAX_TOKEN_LEN: usize = 256;

/// Pending HTTP-01 challenges: token → key authorization. Share it as
/// `Arc<Http01Challenges>` between the ACME client (which inserts and removes) and the proxy
/// (which answers, see [`crate::Proxy::set_edge`]).
#[derive(Debug, Default)]
pub struct Http01Challenges {
    tokens: RwLock<HashMap<String, Bytes>>,
}

impl Http01Challenges {
    pub fn new() -> Http01Challenges {
        Http01Challenges::default()
    }

    /// Answers `GET /.well-known/acme-challenge/<token>` with `key_authorization` from now on
    /// (replacing what the token had). A token outside the base64url alphabet is never asked
    /// for (such paths get 404), so it is not stored.
    pub fn insert(&self, token: &str, key_authorization: &str) {
        if !is_token(token) {
            tracing::warn!(token, "not a base64url ACME token: not served");
            return;
        }
        self.write()
            .insert(token.to_owned(), Bytes::from(key_authorization.to_owned()));
    }

    /// Stops answering `token` (its authorization is done, or was abandoned).
    pub fn remove(&self, token: &str) {
        self.write().remove(token);
    }

    /// Tokens answered now.
    pub fn len(&self) -> usize {
        self.tokens.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key authorization for `token`, if it is pending.
    pub fn get(&self, token: &str) -> Option<Bytes> {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Bytes>> {
        self.tokens.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether `token` could be an ACME token: 1 to [`MAX_TOKEN_LEN`] characters of the
/// base64url alphabet (`A-Z a-z 0-9 - _`, no padding).
pub fn is_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The proxy's answer to a request for `path` (which starts with [`ACME_CHALLENGE_PREFIX`]):
/// 200 `text/plain` with the key authorization for a pending token; 404 for anything else;
/// 405 for methods other than GET and HEAD. `challenges` is `None` before the proxy was given
/// any (every token is unknown then).
pub(crate) fn answer(
    challenges: Option<&Http01Challenges>,
    method: &Method,
    path: &str,
) -> Response<ProxyBody> {
    if method != Method::GET && method != Method::HEAD {
        let mut resp = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "405 method not allowed: ACME challenges are fetched with GET",
        );
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let token = path.strip_prefix(ACME_CHALLENGE_PREFIX).unwrap_or_default();
    let key_authorization = is_token(token)
        .then(|| challenges.and_then(|c| c.get(token)))
        .flatten();
    let Some(key_authorization) = key_authorization else {
        tracing::debug!(token, "unknown ACME challenge");
        return plain(
            StatusCode::NOT_FOUND,
            "404 not found: no such ACME challenge is pending",
        );
    };
    tracing::debug!(token, "ACME challenge answered");
    let body = http_body_util::Full::new(key_authorization)
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut resp = Response::new(body);
    let headers = resp.headers_mut();
    // RFC 8555 §8.3: the body is the key authorization itself, nothing added.
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(resp: Response<ProxyBody>) -> String {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn tokens_are_base64url() {
        for good in ["abc", "A-b_9", &"x".repeat(MAX_TOKEN_LEN)] {
            assert!(is_token(good), "{good}");
        }
        for bad in [
            "",
            "a/b",
            "a.b",
            "..",
            "a=",
            "a+b",
            "a%2Fb",
            "é",
            &"x".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(!is_token(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn pending_tokens_are_answered_and_others_are_not() {
        let c = Http01Challenges::new();
        c.insert("tok-1", "tok-1.thumbprint");
        c.insert("bad/token", "x");
        assert_eq!(c.len(), 1);
        let ok = answer(Some(&c), &Method::GET, "/.well-known/acme-challenge/tok-1");
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(ok.headers()[header::CONTENT_TYPE], "text/plain");
        assert_eq!(body(ok).await, "tok-1.thumbprint");
        let head = answer(Some(&c), &Method::HEAD, "/.well-known/acme-challenge/tok-1");
        assert_eq!(head.status(), StatusCode::OK);
        for path in [
            "/.well-known/acme-challenge/tok-2",
            "/.well-known/acme-challenge/",
            "/.well-known/acme-challenge/tok-1/x",
            "/.well-known/acme-challenge/bad/token",
        ] {
            let resp = answer(Some(&c), &Method::GET, path);
            assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
            assert!(body(resp).await.contains("ACME challenge"), "{path}");
        }
        let none = answer(None, &Method::GET, "/.well-known/acme-challenge/tok-1");
        assert_eq!(none.status(), StatusCode::NOT_FOUND);
        let post = answer(Some(&c), &Method::POST, "/.well-known/acme-challenge/tok-1");
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        c.remove("tok-1");
        assert!(c.is_empty());
        let gone = answer(Some(&c), &Method::GET, "/.well-known/acme-challenge/tok-1");
        assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    }
}
