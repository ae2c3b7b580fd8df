//! The forwarding headers the proxy benchmarks' peers are configured to add, so that nginx,
//! haproxy and lull each send the app the same request: lull adds `X-Forwarded-For`,
//! `X-Forwarded-Proto`, `X-Forwarded-Host`, `Forwarded` and an `X-Request-Id` when the client
//! sent none, and passes the client's `Host` on; a peer that forwards the bare request does less
//! work itself and gives the app (which parses every header) less to do. [`check`] asks the
//! fixture app's `/headers` what it received, so a config that stops adding one fails the run.

use anyhow::{Result, bail};

/// The headers every contender must add (lowercase, as the fixture app lists them).
pub const HEADERS: [&str; 5] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "x-request-id",
];

/// nginx, at the `http` level: the request id, the client's own when it sent one.
pub const NGINX_HTTP: &str = "  map $http_x_request_id $bench_request_id { \"\" $request_id; default $http_x_request_id; }\n";

/// nginx, inside the proxying `location` (with `proxy_set_header Connection ""` for upstream
/// keep-alive: a `location` that sets any header inherits none).
pub const NGINX_LOCATION: &str = "      proxy_set_header Connection \"\";\n\
     \x20     proxy_set_header Host $http_host;\n\
     \x20     proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
     \x20     proxy_set_header X-Forwarded-Proto $scheme;\n\
     \x20     proxy_set_header X-Forwarded-Host $http_host;\n\
     \x20     proxy_set_header Forwarded \"for=$remote_addr;proto=$scheme;host=$http_host\";\n\
     \x20     proxy_set_header X-Request-Id $bench_request_id;\n";

/// haproxy, in the `frontend` (haproxy passes `Host` on as it came).
pub const HAPROXY_FRONTEND: &str = "  option forwardfor\n\
     \x20 http-request set-header X-Forwarded-Proto %[ssl_fc,iif(https,http)]\n\
     \x20 http-request set-header X-Forwarded-Host %[req.hdr(host)]\n\
     \x20 http-request set-header Forwarded \"for=%[src];proto=%[ssl_fc,iif(https,http)];host=%[req.hdr(host)]\"\n\
     \x20 http-request set-header X-Request-Id %[uuid()] unless { req.hdr(x-request-id) -m found }\n";

/// Checks the body of the fixture app's `/headers`, fetched through `contender`: every one of
/// [`HEADERS`] once, and `host` as sent.
pub fn check(contender: &str, host: &str, body: &str) -> Result<()> {
    let names: Vec<&str> = body
        .lines()
        .filter_map(|line| line.split_once(": ").map(|(name, _)| name))
        .collect();
    for header in HEADERS {
        let count = names.iter().filter(|n| **n == header).count();
        if count != 1 {
            bail!(
                "{contender} sent the app {count} `{header}` headers, not 1: every contender must \
                 forward the same request; the app received:\n{body}"
            );
        }
    }
    if !body.lines().any(|line| line == format!("host: {host}")) {
        bail!("{contender} did not pass `Host: {host}` on; the app received:\n{body}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "host: bench.local\nx-forwarded-for: 127.0.0.1\nx-forwarded-proto: http\n\
                        x-forwarded-host: bench.local\nforwarded: for=127.0.0.1\n\
                        x-request-id: 1f\n";

    #[test]
    fn a_request_with_every_header_passes() {
        check("lull", "bench.local", GOOD).unwrap();
    }

    #[test]
    fn a_missing_or_doubled_header_is_named() {
        let missing = GOOD.replace("forwarded: for=127.0.0.1\n", "");
        let e = check("nginx", "bench.local", &missing)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nginx sent the app 0 `forwarded` headers"),
            "{e}"
        );
        let doubled = format!("{GOOD}x-request-id: 2f\n");
        let e = check("haproxy", "bench.local", &doubled)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 `x-request-id` headers"), "{e}");
        let e = check("nginx", "other", GOOD).unwrap_err().to_string();
        assert!(e.contains("`Host: other`"), "{e}");
    }
}
