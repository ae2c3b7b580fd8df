//! The contents of an instance's `/etc/resolv.conf` and `/etc/hosts`.
//!
//! An instance has its own network namespace, so a nameserver on the host's loopback (such as
//! systemd-resolved's stub at 127.0.0.53) is unreachable from it. As Docker does, loopback
//! nameservers are dropped and replaced by real upstream servers, which the caller reads from
//! systemd-resolved's own list (`/run/systemd/resolve/resolv.conf`) when it exists, with
//! [`upstreams_from_systemd_resolved`]. `search` and `options` are kept as the host has them.

use std::net::IpAddr;

use tracing::{debug, warn};

/// glibc's resolver reads at most this many nameservers (`MAXNS`); later ones are ignored, so
/// they are not written.
pub const MAX_NAMESERVERS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum ResolvError {
    #[error(
        "the host's resolv.conf has no nameserver an instance can reach{} and no upstream \
         nameserver was given to replace them",
        dropped_note(.dropped)
    )]
    NoNameserver { dropped: Vec<String> },
    #[error("invalid hostname {hostname:?}: {reason}")]
    InvalidHostname {
        hostname: String,
        reason: &'static str,
    },
}

fn dropped_note(dropped: &[String]) -> String {
    if dropped.is_empty() {
        " (it lists none)".to_string()
    } else {
        format!(" (dropped: {})", dropped.join(", "))
    }
}

/// What the resolver reads from a resolv.conf.
#[derive(Debug, Default, PartialEq, Eq)]
struct ResolvConf {
    /// The parsed `nameserver` entries in order.
    nameservers: Vec<IpAddr>,
    /// `nameserver` entries that are not usable addresses (e.g. with a zone id), as written.
    unusable: Vec<String>,
    /// From the last `search` or `domain` line, as glibc does.
    search: Vec<String>,
    /// All `options` in order, without duplicates.
    options: Vec<String>,
}

fn parse(text: &str) -> ResolvConf {
    let mut conf = ResolvConf::default();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        // A comment may also follow the values.
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut words = line.split_whitespace();
        let Some(keyword) = words.next() else {
            continue;
        };
        match keyword {
            "nameserver" => {
                let Some(value) = words.next() else { continue };
                match value.parse::<IpAddr>() {
                    Ok(addr) => conf.nameservers.push(addr),
                    Err(_) => conf.unusable.push(value.to_string()),
                }
            }
            "search" | "domain" => conf.search = words.map(str::to_string).collect(),
            "options" => {
                for option in words {
                    if !conf.options.iter().any(|o| o == option) {
                        conf.options.push(option.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    conf
}

/// Loopback and unspecified addresses both mean "this host" to the resolver.
fn is_local(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_unspecified(),
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| v4.is_loopback() || v4.is_unspecified())
        }
    }
}

/// The nameservers systemd-resolved forwards to, from its `/run/systemd/resolve/resolv.conf`,
/// without loopback ones and duplicates.
pub fn upstreams_from_systemd_resolved(text: &str) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for addr in parse(text).nameservers {
        if !is_local(&addr) && !out.contains(&addr) {
            out.push(addr);
        }
    }
    out
}

/// The instance's resolv.conf, from the host's: loopback nameservers are replaced by
/// `fallback_upstreams` (in their place, in order), at most [`MAX_NAMESERVERS`] are kept,
/// `search` and `options` are kept as they are. A host file with no nameserver at all means the
/// resolver's default of 127.0.0.1, so it gets the fallback upstreams too.
pub fn instance_resolv_conf(
    host_resolv: &str,
    fallback_upstreams: &[IpAddr],
) -> Result<String, ResolvError> {
    let host = parse(host_resolv);
    let mut dropped: Vec<String> = host.unusable.clone();
    for unusable in &host.unusable {
        warn!(nameserver = %unusable, "ignoring a host nameserver that is not an IP address");
    }
    let fallback: Vec<IpAddr> = fallback_upstreams
        .iter()
        .copied()
        .filter(|a| !is_local(a))
        .collect();
    let mut nameservers: Vec<IpAddr> = Vec::new();
    let push = |addr: IpAddr, list: &mut Vec<IpAddr>| {
        if !list.contains(&addr) {
            list.push(addr);
        }
    };
    let mut replaced = false;
    for addr in &host.nameservers {
        if is_local(addr) {
            dropped.push(addr.to_string());
            if !replaced {
                replaced = true;
                for up in &fallback {
                    push(*up, &mut nameservers);
                }
            }
        } else {
            push(*addr, &mut nameservers);
        }
    }
    if host.nameservers.is_empty() {
        for up in &fallback {
            push(*up, &mut nameservers);
        }
    }
    if nameservers.is_empty() {
        return Err(ResolvError::NoNameserver { dropped });
    }
    if nameservers.len() > MAX_NAMESERVERS {
        debug!(
            ignored = ?&nameservers[MAX_NAMESERVERS..],
            "the resolver reads only {MAX_NAMESERVERS} nameservers"
        );
        nameservers.truncate(MAX_NAMESERVERS);
    }

    let mut out = String::from("# generated by lull from the host's resolv.conf\n");
    for addr in &nameservers {
        out.push_str(&format!("nameserver {addr}\n"));
    }
    if !host.search.is_empty() {
        out.push_str(&format!("search {}\n", host.search.join(" ")));
    }
    if !host.options.is_empty() {
        out.push_str(&format!("options {}\n", host.options.join(" ")));
    }
    Ok(out)
}

/// The instance's `/etc/hosts`: localhost for IPv4 and IPv6, and `hostname` on `addr`, or on
/// 127.0.1.1 (the Debian convention) when the instance has no address of its own.
pub fn instance_hosts(hostname: &str, addr: Option<IpAddr>) -> Result<String, ResolvError> {
    check_hostname(hostname)?;
    let own = addr.map_or_else(|| "127.0.1.1".to_string(), |a| a.to_string());
    Ok(format!(
        "127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::\tip6-localnet\n\
         ff00::\tip6-mcastprefix\n\
         ff02::1\tip6-allnodes\n\
         ff02::2\tip6-allrouters\n\
         {own}\t{hostname}\n"
    ))
}

/// A name that fits in the kernel's hostname (64 bytes) and cannot break the hosts file:
/// letters, digits, `-`, `_` and `.`, not starting with `-` or `.`.
fn check_hostname(hostname: &str) -> Result<(), ResolvError> {
    let reason = if hostname.is_empty() {
        Some("empty")
    } else if hostname.len() > 64 {
        Some("longer than 64 bytes")
    } else if !hostname
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        Some("only letters, digits, '-', '_' and '.' are allowed")
    } else if hostname.starts_with(['-', '.']) || hostname.contains("..") {
        Some("starts with '-' or '.', or has an empty label")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ResolvError::InvalidHostname {
            hostname: hostname.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn body(conf: &str) -> Vec<&str> {
        conf.lines().filter(|l| !l.starts_with('#')).collect()
    }

    const RESOLVED_STUB: &str = "\
# This is /run/systemd/resolve/stub-resolv.conf managed by man:systemd-resolved(8).
# Do not edit.
#
nameserver 127.0.0.53
options edns0 trust-ad
search corp.example.com
";

    const RESOLVED_UPSTREAMS: &str = "\
# This is /run/systemd/resolve/resolv.conf managed by man:systemd-resolved(8).
nameserver 10.0.0.2
nameserver 2001:db8::53
nameserver 10.0.0.2
search corp.example.com
";

    #[test]
    fn systemd_resolved_stub_is_replaced_by_its_upstreams() {
        let upstreams = upstreams_from_systemd_resolved(RESOLVED_UPSTREAMS);
        assert_eq!(upstreams, ips(&["10.0.0.2", "2001:db8::53"]));
        let conf = instance_resolv_conf(RESOLVED_STUB, &upstreams).unwrap();
        assert!(conf.starts_with("# generated by lull"), "{conf}");
        assert_eq!(
            body(&conf),
            [
                "nameserver 10.0.0.2",
                "nameserver 2001:db8::53",
                "search corp.example.com",
                "options edns0 trust-ad",
            ]
        );
    }

    #[test]
    fn plain_host_file_is_kept() {
        let host = "nameserver 1.1.1.1\nnameserver 9.9.9.9\nsearch a.example b.example\n";
        let conf = instance_resolv_conf(host, &ips(&["8.8.8.8"])).unwrap();
        assert_eq!(
            body(&conf),
            [
                "nameserver 1.1.1.1",
                "nameserver 9.9.9.9",
                "search a.example b.example"
            ]
        );
    }

    #[test]
    fn only_loopback_without_fallback_is_an_error() {
        let host = "nameserver 127.0.0.53\nnameserver ::1\nnameserver 127.1.2.3\n";
        let err = instance_resolv_conf(host, &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the host's resolv.conf has no nameserver an instance can reach (dropped: \
             127.0.0.53, ::1, 127.1.2.3) and no upstream nameserver was given to replace them"
        );
        // A loopback-only fallback is no fallback.
        assert!(instance_resolv_conf(host, &ips(&["127.0.0.1", "::ffff:127.0.0.1"])).is_err());
        let err = instance_resolv_conf("# nothing\n", &[]).unwrap_err();
        assert!(err.to_string().contains("(it lists none)"), "{err}");
    }

    #[test]
    fn only_loopback_with_fallback() {
        let host = "nameserver 127.0.0.53\nnameserver ::1\n";
        let conf = instance_resolv_conf(host, &ips(&["192.0.2.1", "192.0.2.2"])).unwrap();
        assert_eq!(
            body(&conf),
            ["nameserver 192.0.2.1", "nameserver 192.0.2.2"]
        );
        // No nameserver line at all means 127.0.0.1 to glibc: the fallback is used too.
        let conf = instance_resolv_conf("search x.example\n", &ips(&["192.0.2.1"])).unwrap();
        assert_eq!(body(&conf), ["nameserver 192.0.2.1", "search x.example"]);
    }

    #[test]
    fn fallback_goes_where_the_loopback_was_and_the_list_is_capped() {
        let host = "nameserver 1.1.1.1\nnameserver 127.0.0.53\nnameserver 9.9.9.9\n";
        let conf = instance_resolv_conf(host, &ips(&["192.0.2.1", "1.1.1.1"])).unwrap();
        assert_eq!(
            body(&conf),
            [
                "nameserver 1.1.1.1",
                "nameserver 192.0.2.1",
                "nameserver 9.9.9.9"
            ]
        );
        let host =
            "nameserver 1.1.1.1\nnameserver 1.0.0.1\nnameserver 9.9.9.9\nnameserver 8.8.8.8\n";
        let conf = instance_resolv_conf(host, &[]).unwrap();
        assert_eq!(body(&conf).len(), MAX_NAMESERVERS);
        assert!(!conf.contains("8.8.8.8"), "{conf}");
    }

    #[test]
    fn ipv6_nameservers() {
        let host = "nameserver 2001:4860:4860::8888\nnameserver ::1\n\
                    nameserver fe80::1%eth0\nnameserver ::ffff:127.0.0.1\n";
        let conf = instance_resolv_conf(host, &ips(&["2606:4700:4700::1111"])).unwrap();
        assert_eq!(
            body(&conf),
            [
                "nameserver 2001:4860:4860::8888",
                "nameserver 2606:4700:4700::1111"
            ]
        );
        let err = instance_resolv_conf("nameserver fe80::1%eth0\nnameserver ::1\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("(dropped: fe80::1%eth0, ::1)"), "{err}");
    }

    #[test]
    fn comments_and_odd_spacing() {
        let host = "  # leading comment\n\
                    ; semicolon comment\n\
                    \tnameserver\t\t10.1.1.1   # office\n\
                    nameserver\n\
                    nameserver 10.1.1.2;trailing\n\
                    domain old.example\n\
                    search   new.example\t other.example  \n\
                    sortlist 10.0.0.0/255.0.0.0\n\
                    options ndots:2\n\
                    options   timeout:1 ndots:2\r\n\
                    \n";
        let conf = instance_resolv_conf(host, &[]).unwrap();
        assert_eq!(
            body(&conf),
            [
                "nameserver 10.1.1.1",
                "nameserver 10.1.1.2",
                "search new.example other.example",
                "options ndots:2 timeout:1",
            ]
        );
    }

    #[test]
    fn hosts_file() {
        let hosts = instance_hosts("web-1", Some("10.88.0.7".parse().unwrap())).unwrap();
        let lines: Vec<_> = hosts.lines().collect();
        assert!(lines.contains(&"127.0.0.1\tlocalhost"), "{hosts}");
        assert!(
            lines.contains(&"::1\tlocalhost ip6-localhost ip6-loopback"),
            "{hosts}"
        );
        assert_eq!(lines.last(), Some(&"10.88.0.7\tweb-1"));
        let hosts = instance_hosts("solo", None).unwrap();
        assert!(hosts.ends_with("127.0.1.1\tsolo\n"), "{hosts}");
        for bad in [
            "",
            "a b",
            "a\n1.2.3.4 evil",
            "-x",
            ".x",
            "a..b",
            &"x".repeat(65),
        ] {
            let err = instance_hosts(bad, None).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with(&format!("invalid hostname {bad:?}: ")),
                "{err}"
            );
        }
    }
}
