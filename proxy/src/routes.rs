//! The routing table: a request's Host (or `:authority`) names the service that answers it.
//! Readers take a snapshot (`Arc<HashMap>`) and never wait for writers; a change swaps in a
//! new map.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use http::HeaderValue;

use crate::access_log::AccessLog;
use crate::forward::Upstream;
use crate::pool::Pool;

/// Where one host's requests go.
pub struct Route {
    pub pool: Arc<Pool>,
    /// The service revision serving now (for the access log); may be empty.
    pub revision: String,
    pub access_log: Option<Arc<AccessLog>>,
    /// Connections to the pool's instances, built from the pool's settings.
    pub(crate) upstream: Upstream,
    /// The pool's `hsts` setting as a header value, made once.
    pub(crate) hsts: Option<HeaderValue>,
}

impl Route {
    pub fn new(pool: Arc<Pool>, revision: &str) -> Route {
        let upstream = Upstream::new(pool.config());
        let hsts = pool
            .config()
            .hsts
            .as_ref()
            .and_then(|h| HeaderValue::from_str(&h.header_value()).ok());
        Route {
            pool,
            revision: revision.to_string(),
            access_log: None,
            upstream,
            hsts,
        }
    }

    pub fn with_access_log(mut self, log: Arc<AccessLog>) -> Route {
        self.access_log = Some(log);
        self
    }
}

/// Host → route, swapped atomically.
#[derive(Default)]
pub struct RouteTable {
    routes: RwLock<Arc<HashMap<String, Arc<Route>>>>,
}

impl RouteTable {
    pub fn new() -> RouteTable {
        RouteTable::default()
    }

    fn update(&self, change: impl FnOnce(&mut HashMap<String, Arc<Route>>)) {
        let mut guard = self.routes.write().unwrap_or_else(|e| e.into_inner());
        let mut next = HashMap::clone(&guard);
        change(&mut next);
        *guard = Arc::new(next);
    }

    /// Routes `host` (any case, a port is ignored) to `route`, replacing what it had.
    pub fn insert(&self, host: &str, route: Route) -> Arc<Route> {
        let route = Arc::new(route);
        let key = normalize_host(host);
        let r = route.clone();
        self.update(move |m| {
            m.insert(key, r);
        });
        route
    }

    /// Routes several hosts to one route.
    pub fn insert_shared(&self, hosts: &[&str], route: Arc<Route>) {
        self.update(|m| {
            for h in hosts {
                m.insert(normalize_host(h), route.clone());
            }
        });
    }

    pub fn remove(&self, host: &str) -> Option<Arc<Route>> {
        let key = normalize_host(host);
        let mut removed = None;
        self.update(|m| removed = m.remove(&key));
        removed
    }

    /// Replaces the whole table at once.
    pub fn replace_all(&self, routes: HashMap<String, Arc<Route>>) {
        let next = routes
            .into_iter()
            .map(|(h, r)| (normalize_host(&h), r))
            .collect();
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
    }

    pub fn lookup(&self, host: &str) -> Option<Arc<Route>> {
        let key = normalized(host);
        // The map is only read under the lock (no snapshot taken): one shared counter
        // touched instead of two, and no key allocated when the host is already in
        // normal form (the usual case).
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key.as_ref())
            .cloned()
    }

    pub fn hosts(&self) -> Vec<String> {
        let snapshot = self
            .routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        snapshot.keys().cloned().collect()
    }
}

/// Lowercase, without port, without a trailing dot; IPv6 literals keep their brackets.
pub fn normalize_host(host: &str) -> String {
    normalized(host).into_owned()
}

/// [`normalize_host`], borrowing `host` when nothing needs to change but cutting.
pub(crate) fn normalized(host: &str) -> std::borrow::Cow<'_, str> {
    let host = host.trim();
    let bare = if host.starts_with('[') {
        match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    let bare = bare.trim_end_matches('.');
    if bare.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(bare.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(bare)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(normalize_host("App.Example.COM:8443"), "app.example.com");
        assert_eq!(normalize_host("app.example.com."), "app.example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("[::1]"), "[::1]");
        assert_eq!(normalize_host("localhost"), "localhost");
    }
}
