//! A service's proxy settings: timeouts, limits, concurrency, queue, health check and CPU gate,
//! with defaults a demanding user would pick and checks that name the field at fault.

use std::time::Duration;

/// What the CPU gate does for a service's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuMode {
    /// Throttle an instance's CPU when it has no request in flight (the default).
    #[default]
    Request,
    /// Never throttle ("CPU always allocated"), for apps with background work.
    Always,
}

/// The protocol the proxy speaks to instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (cleartext).
    H2c,
}

/// How the proxy decides an instance is healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthProbe {
    /// A GET of `path`; healthy when the status is in `min_status..=max_status`.
    Http {
        path: String,
        min_status: u16,
        max_status: u16,
    },
    /// A TCP connection that opens.
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub probe: HealthProbe,
    pub interval: Duration,
    /// Must be shorter than `interval` (see [`TIMEOUT_RULE`]).
    pub timeout: Duration,
    /// Consecutive successes that put an instance in rotation.
    pub healthy_threshold: u32,
    /// Consecutive failures that take it out.
    pub unhealthy_threshold: u32,
}

/// The one rule on health check timings, worded the same in docs, errors and help.
pub const TIMEOUT_RULE: &str = "the health check timeout must be shorter than its interval";

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            probe: HealthProbe::Tcp,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            healthy_threshold: 1,
            unhealthy_threshold: 3,
        }
    }
}

/// Per-service timeouts. A client connection's idle keep-alive is the listener's, not a
/// service's (a connection is idle before its next request names a service): see
/// `ProxyOptions::idle_keep_alive`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// Opening a connection to an instance.
    pub connect: Duration,
    /// From the request sent to the response's head received.
    pub first_byte: Duration,
    /// The whole exchange, bodies included (not WebSockets).
    pub request: Duration,
    /// A WebSocket with no frame either way.
    pub websocket_idle: Duration,
    /// How long an idle connection to an instance is kept in the pool: shorter than the usual
    /// app keep-alive (5 s in Node, Gunicorn, Go's default server), so the app never closes a
    /// connection the proxy is about to reuse.
    pub upstream_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            first_byte: Duration::from_secs(300),
            request: Duration::from_secs(15 * 60),
            websocket_idle: Duration::from_secs(3600),
            upstream_idle: Duration::from_secs(4),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Total bytes of a request's head (request line and headers).
    pub max_header_bytes: usize,
    /// Number of request headers.
    pub max_headers: usize,
    /// Largest request body; `None`: no limit.
    pub max_body_bytes: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_body_bytes: None,
        }
    }
}

/// HTTP Strict Transport Security (RFC 6797): what the `Strict-Transport-Security` header sent
/// on a service's HTTPS responses says.
///
/// **A browser that has seen it refuses plain HTTP to that host for `max_age`**, with no way
/// for the user to click through a certificate error: turn it on only once HTTPS works for
/// every name the service answers on, and keep it working. `include_subdomains` extends that
/// to every name under the host (including ones served by something else); `preload` asks
/// browsers to ship the rule built in (after submission to hstspreload.org), which takes
/// months to undo. A `max_age` of zero tells browsers to forget an earlier rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hsts {
    /// How long browsers remember the rule (whole seconds).
    pub max_age: Duration,
    pub include_subdomains: bool,
    pub preload: bool,
}

/// The least `max_age` hstspreload.org accepts with `preload`: one year.
pub const HSTS_PRELOAD_MIN_AGE: Duration = Duration::from_secs(365 * 24 * 3600);

impl Hsts {
    /// The header's value: `max-age=N[; includeSubDomains][; preload]`.
    pub fn header_value(&self) -> String {
        let mut value = format!("max-age={}", self.max_age.as_secs());
        if self.include_subdomains {
            value.push_str("; includeSubDomains");
        }
        if self.preload {
            value.push_str("; preload");
        }
        value
    }
}

/// One service's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Requests one instance serves at once.
    pub max_concurrency: u32,
    /// Requests that may wait for a free slot.
    pub queue_size: u32,
    /// How long one may wait.
    pub queue_timeout: Duration,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub upstream: UpstreamProtocol,
    pub health: HealthCheck,
    pub cpu: CpuMode,
    /// How long an instance stays unthrottled after its last response (a request in between
    /// cancels the throttle).
    pub idle_delay: Duration,
    /// Idle tier 2: how long a throttled instance stays throttled before it is frozen
    /// (cgroup freezer: no task runs at all; waking takes milliseconds). `None`: never.
    pub freeze_after: Option<Duration>,
    /// Whether open WebSockets and SSE streams keep the instance's CPU (they count as in
    /// flight).
    pub streams_keep_cpu: bool,
    /// What a paused service's 503 says in `Retry-After`.
    pub paused_retry_after: Duration,
    /// On the plain-HTTP listeners, answer with a redirect to HTTPS (301 for GET and HEAD,
    /// 308 for the rest) when the proxy holds a certificate for the request's host; hosts
    /// under `.localhost` and ACME's HTTP-01 challenges stay on plain HTTP. See
    /// [`crate::Proxy::set_edge`].
    pub https_redirect: bool,
    /// `Strict-Transport-Security` on responses sent over HTTPS (unless the app sent its
    /// own); `None`: not sent. Read the risks in [`Hsts`] before turning it on.
    pub hsts: Option<Hsts>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            max_concurrency: 100,
            queue_size: 1000,
            queue_timeout: Duration::from_secs(30),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            upstream: UpstreamProtocol::default(),
            health: HealthCheck::default(),
            cpu: CpuMode::default(),
            idle_delay: Duration::ZERO,
            freeze_after: None,
            streams_keep_cpu: true,
            paused_retry_after: Duration::from_secs(30),
            https_redirect: true,
            hsts: None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("service setting {field}: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

impl ServiceConfig {
    /// Checks every setting; the error names the first one at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, reason: String| Err(ConfigError { field, reason });
        if self.max_concurrency == 0 {
            return err("max_concurrency", "must be at least 1".into());
        }
        if self.queue_size > 0 && self.queue_timeout.is_zero() {
            return err(
                "queue_timeout",
                "must be more than 0 when requests may queue".into(),
            );
        }
        let t = &self.timeouts;
        for (field, value) in [
            ("timeouts.connect", t.connect),
            ("timeouts.first_byte", t.first_byte),
            ("timeouts.request", t.request),
            ("timeouts.websocket_idle", t.websocket_idle),
            ("timeouts.upstream_idle", t.upstream_idle),
        ] {
            if value.is_zero() {
                return err(field, "must be more than 0".into());
            }
        }
        if t.first_byte > t.request {
            return err(
                "timeouts.first_byte",
                format!(
                    "{:?} is longer than the whole request's timeout ({:?})",
                    t.first_byte, t.request
                ),
            );
        }
        if self.limits.max_header_bytes < 1024 {
            return err("limits.max_header_bytes", "must be at least 1024".into());
        }
        if self.limits.max_headers == 0 {
            return err("limits.max_headers", "must be at least 1".into());
        }
        let h = &self.health;
        if h.interval.is_zero() {
            return err("health.interval", "must be more than 0".into());
        }
        if h.timeout.is_zero() || h.timeout >= h.interval {
            return err(
                "health.timeout",
                format!(
                    "{TIMEOUT_RULE} (timeout {:?}, interval {:?})",
                    h.timeout, h.interval
                ),
            );
        }
        if h.healthy_threshold == 0 {
            return err("health.healthy_threshold", "must be at least 1".into());
        }
        if h.unhealthy_threshold == 0 {
            return err("health.unhealthy_threshold", "must be at least 1".into());
        }
        if let HealthProbe::Http {
            path,
            min_status,
            max_status,
        } = &h.probe
        {
            if !path.starts_with('/') {
                return err("health.path", format!("{path:?} must start with '/'"));
            }
            if !(100..=599).contains(min_status)
                || !(100..=599).contains(max_status)
                || min_status > max_status
            {
                return err(
                    "health.status",
                    format!("{min_status}-{max_status} is not a range of HTTP status codes"),
                );
            }
        }
        if let Some(hsts) = &self.hsts {
            if hsts.max_age.subsec_nanos() != 0 {
                return err("hsts.max_age", "must be whole seconds".into());
            }
            if hsts.preload && !hsts.include_subdomains {
                return err(
                    "hsts.preload",
                    "needs include_subdomains (browsers' preload lists require it)".into(),
                );
            }
            if hsts.preload && hsts.max_age < HSTS_PRELOAD_MIN_AGE {
                return err(
                    "hsts.preload",
                    format!(
                        "needs a max_age of at least {}s (one year; browsers' preload lists require it)",
                        HSTS_PRELOAD_MIN_AGE.as_secs()
                    ),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_generous() {
        let c = ServiceConfig::default();
        c.validate().unwrap();
        assert_eq!(c.max_concurrency, 100);
        assert_eq!(c.timeouts.request, Duration::from_secs(900));
        assert_eq!(c.cpu, CpuMode::Request);
        assert!(c.timeouts.upstream_idle < Duration::from_secs(5));
        assert!(c.https_redirect);
        assert_eq!(c.hsts, None, "HSTS is never on unless asked for");
    }

    #[test]
    fn hsts_header_values() {
        let mut h = Hsts {
            max_age: Duration::from_secs(31_536_000),
            include_subdomains: false,
            preload: false,
        };
        assert_eq!(h.header_value(), "max-age=31536000");
        h.include_subdomains = true;
        assert_eq!(h.header_value(), "max-age=31536000; includeSubDomains");
        h.preload = true;
        assert_eq!(
            h.header_value(),
            "max-age=31536000; includeSubDomains; preload"
        );
        let c = ServiceConfig {
            hsts: Some(h),
            ..ServiceConfig::default()
        };
        c.validate().unwrap();
    }

    #[test]
    fn bad_settings_name_their_field() {
        type Change = Box<dyn Fn(&mut ServiceConfig)>;
        let cases: Vec<(&str, Change)> = vec![
            ("max_concurrency", Box::new(|c| c.max_concurrency = 0)),
            (
                "queue_timeout",
                Box::new(|c| c.queue_timeout = Duration::ZERO),
            ),
            (
                "timeouts.connect",
                Box::new(|c| c.timeouts.connect = Duration::ZERO),
            ),
            (
                "timeouts.first_byte",
                Box::new(|c| c.timeouts.first_byte = Duration::from_secs(10_000)),
            ),
            ("limits.max_headers", Box::new(|c| c.limits.max_headers = 0)),
            (
                "health.timeout",
                Box::new(|c| c.health.timeout = c.health.interval),
            ),
            (
                "health.path",
                Box::new(|c| {
                    c.health.probe = HealthProbe::Http {
                        path: "healthz".into(),
                        min_status: 200,
                        max_status: 399,
                    }
                }),
            ),
            (
                "health.status",
                Box::new(|c| {
                    c.health.probe = HealthProbe::Http {
                        path: "/healthz".into(),
                        min_status: 400,
                        max_status: 200,
                    }
                }),
            ),
            (
                "hsts.max_age",
                Box::new(|c| {
                    c.hsts = Some(Hsts {
                        max_age: Duration::from_millis(1500),
                        include_subdomains: false,
                        preload: false,
                    })
                }),
            ),
            (
                "hsts.preload",
                Box::new(|c| {
                    c.hsts = Some(Hsts {
                        max_age: HSTS_PRELOAD_MIN_AGE,
                        include_subdomains: false,
                        preload: true,
                    })
                }),
            ),
            (
                "hsts.preload",
                Box::new(|c| {
                    c.hsts = Some(Hsts {
                        max_age: Duration::from_secs(3600),
                        include_subdomains: true,
                        preload: true,
                    })
                }),
            ),
        ];
        for (field, change) in cases {
            let mut c = ServiceConfig::default();
            change(&mut c);
            let e = c.validate().unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.to_string().contains(field), "{e}");
        }
        let mut c = ServiceConfig::default();
        c.health.timeout = Duration::from_secs(9);
        assert!(c.validate().unwrap_err().to_string().contains(TIMEOUT_RULE));
    }
}
