//! Does a domain point at this host? The records a user must create, and a check of what DNS
//! answers now, asked of `[acme] resolver` (tests: a DNS server on loopback) or the system's.

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use serde::Serialize;

/// One DNS record to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    pub name: String,
    /// `A`, `AAAA` or `CNAME`.
    pub kind: &'static str,
    pub value: String,
}

/// What DNS says of one name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    /// The addresses it resolves to now.
    pub found: Vec<IpAddr>,
    /// Why it is not ok yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The records that make `name` reach this host: A/AAAA to `public`, or else a CNAME to
/// `cname_target` (the service's name under the base domain) when there is one.
pub fn records(name: &str, public: &[IpAddr], cname_target: Option<&str>) -> Vec<Record> {
    let mut out: Vec<Record> = public
        .iter()
        .map(|ip| Record {
            name: name.to_owned(),
            kind: if ip.is_ipv4() { "A" } else { "AAAA" },
            value: ip.to_string(),
        })
        .collect();
    if let Some(target) = cname_target.filter(|t| *t != name) {
        out.push(Record {
            name: name.to_owned(),
            kind: "CNAME",
            value: format!("{target}."),
        });
    }
    out
}

/// The host's own global addresses (no loopback, link-local or unspecified), the candidates
/// shown when `[acme] public_addresses` is not set.
pub fn interface_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return out;
    };
    for ifaddr in addrs {
        let Some(address) = ifaddr.address else {
            continue;
        };
        let ip = if let Some(v4) = address.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = address.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let local = match ip {
            IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4.is_unspecified(),
            IpAddr::V6(v6) => {
                v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80
            }
        };
        if !local && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// Asks DNS about names.
#[derive(Clone)]
pub struct DnsChecker {
    resolver: TokioResolver,
    public: Vec<IpAddr>,
}

impl DnsChecker {
    /// Asks `server` (or the system's resolvers); `public` are this host's addresses (empty:
    /// any answer is accepted).
    pub fn new(server: Option<SocketAddr>, public: Vec<IpAddr>) -> Result<DnsChecker, String> {
        let provider = TokioRuntimeProvider::default();
        let builder = match server {
            Some(addr) => {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for connection in &mut ns.connections {
                    connection.port = addr.port();
                }
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![ns]),
                    provider,
                )
            }
            None => TokioResolver::builder(provider)
                .map_err(|e| format!("the system's DNS configuration: {e}"))?,
        };
        let resolver = builder
            .build()
            .map_err(|e| format!("a DNS resolver: {e}"))?;
        Ok(DnsChecker { resolver, public })
    }

    pub fn public(&self) -> &[IpAddr] {
        &self.public
    }

    /// Whether `name` resolves to this host.
    pub async fn check(&self, name: &str) -> Check {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        let found: Vec<IpAddr> = match self.resolver.lookup_ip(fqdn.as_str()).await {
            Ok(lookup) => lookup.iter().collect(),
            Err(e) => {
                return Check {
                    name: name.to_owned(),
                    ok: false,
                    found: Vec::new(),
                    reason: Some(format!("{name} does not resolve yet: {e}")),
                };
            }
        };
        // Every address must be this host's: a CA validating from another address (a stale
        // AAAA record, a CDN) would fail the whole order.
        let ok = !found.is_empty()
            && (self.public.is_empty() || found.iter().all(|ip| self.public.contains(ip)));
        let reason = match (ok, found.is_empty()) {
            (true, _) => None,
            (false, true) => Some(format!("{name} has no A or AAAA record yet")),
            (false, false) => Some(format!(
                "{name} points to {}, not only to this host ({})",
                list(&found),
                list(&self.public)
            )),
        };
        Check {
            name: name.to_owned(),
            ok,
            found,
            reason,
        }
    }
}

fn list(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_name_the_addresses_and_the_cname_alternative() {
        let public: Vec<IpAddr> = vec![
            "203.0.113.7".parse().unwrap(),
            "2001:db8::7".parse().unwrap(),
        ];
        let r = records("shop.example.com", &public, Some("web.apps.example.net"));
        let lines: Vec<String> = r
            .iter()
            .map(|r| format!("{} {} {}", r.name, r.kind, r.value))
            .collect();
        assert_eq!(
            lines,
            [
                "shop.example.com A 203.0.113.7",
                "shop.example.com AAAA 2001:db8::7",
                "shop.example.com CNAME web.apps.example.net.",
            ]
        );
        assert!(records("web.apps.example.net", &[], Some("web.apps.example.net")).is_empty());
    }
}
