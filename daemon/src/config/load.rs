//! lull.toml → [`DaemonConfig`]: a walk over the parsed document that keeps every key's
//! position, so that each unknown key and bad value is reported with its line and column.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use lull_netns::firewall::HostPort;
use lull_netns::ipam::Subnet;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use lull_proxy::tls::CertificateFiles;

use super::{CertificateConfig, DaemonConfig, ListenAddr, Listeners, Problem};
use crate::{duration, names};

type Value<'i> = Spanned<DeValue<'i>>;

const ROOT_KEYS: &[&str] = &[
    "data_dir",
    "run_dir",
    "base_domain",
    "rollback_window",
    "stop_grace",
    "socket",
    "listeners",
    "metrics",
    "network",
    "logs",
    "scaling",
    "builder",
    "tls",
    "acme",
];
const ACME_KEYS: &[&str] = &[
    "enabled",
    "directory",
    "email",
    "ca_certificates",
    "challenge",
    "eab_kid",
    "eab_hmac_key",
    "retry_initial",
    "retry_max",
    "check_interval",
    "resolver",
    "public_addresses",
    "dns01_hook",
];
const TLS_KEYS: &[&str] = &["certificates"];
const CERTIFICATE_KEYS: &[&str] = &["cert", "key", "ocsp", "names"];
const SOCKET_KEYS: &[&str] = &["path", "group"];
const LISTENER_KEYS: &[&str] = &["http", "https", "unprivileged"];
const METRICS_KEYS: &[&str] = &["address"];
const NETWORK_KEYS: &[&str] = &[
    "bridge",
    "subnet",
    "subnet6",
    "nft_table",
    "veth_prefix",
    "uplink",
    "dns",
    "allow_host_ports",
    "allow_metadata",
];
const LOG_KEYS: &[&str] = &["retention", "max_size"];
const BUILDER_KEYS: &[&str] = &[
    "base_images",
    "extra_ca_certs",
    "cpu",
    "memory",
    "timeout",
    "max_upload",
    "git_allow_local",
    "concurrency",
];
const SCALING_KEYS: &[&str] = &[
    "memory_overcommit",
    "max_instances",
    "cpu_pressure_brake",
    "memory_pressure_brake",
];

pub(super) fn parse(text: &str) -> Result<DaemonConfig, Vec<Problem>> {
    let mut walk = Walk {
        text,
        problems: Vec::new(),
    };
    let (root, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        for e in syntax {
            let span = e.span().unwrap_or(0..0);
            walk.problem(span, "toml", e.message().trim_end_matches('.').to_string());
        }
        walk.problems.sort_by_key(|p| (p.line, p.column));
        return Err(walk.problems);
    }
    let root = root.into_inner();
    let config = walk.root(&root);
    if walk.problems.is_empty() {
        Ok(config)
    } else {
        walk.problems.sort_by_key(|p| (p.line, p.column));
        Err(walk.problems)
    }
}

struct Walk<'t> {
    text: &'t str,
    problems: Vec<Problem>,
}

impl Walk<'_> {
    fn problem(&mut self, span: Range<usize>, key: &str, message: String) {
        let start = span.start.min(self.text.len());
        let before = &self.text[..start];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        self.problems.push(Problem {
            line,
            column,
            key: key.to_string(),
            message,
        });
    }

    fn wrong_type(&mut self, key: &str, value: &Value, expected: &str) {
        self.problem(
            value.span(),
            key,
            format!(
                "found {} {} (expected {expected})",
                article(value.get_ref().type_str()),
                value.get_ref().type_str()
            ),
        );
    }

    /// The entries of `table`, unknown keys reported.
    fn entries<'a, 'i>(
        &mut self,
        prefix: &str,
        table: &'a DeTable<'i>,
        known: &[&str],
    ) -> Vec<(String, &'a Value<'i>)> {
        let mut out = Vec::new();
        for (key, value) in table.iter() {
            let name: &str = key.get_ref();
            let path = join(prefix, name);
            if known.contains(&name) {
                out.push((path, value));
            } else {
                self.problem(
                    key.span(),
                    &path,
                    format!("unknown key (expected one of {})", known.join(", ")),
                );
            }
        }
        out
    }

    fn table<'a, 'i>(&mut self, key: &str, value: &'a Value<'i>) -> Option<&'a DeTable<'i>> {
        match value.get_ref() {
            DeValue::Table(table) => Some(table),
            _ => {
                self.wrong_type(key, value, "a table");
                None
            }
        }
    }

    fn string<'a>(&mut self, key: &str, value: &'a Value, expected: &str) -> Option<&'a str> {
        match value.get_ref() {
            DeValue::String(s) => Some(s),
            _ => {
                self.wrong_type(key, value, expected);
                None
            }
        }
    }

    fn boolean(&mut self, key: &str, value: &Value) -> Option<bool> {
        match value.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                self.wrong_type(key, value, "true or false");
                None
            }
        }
    }

    /// A number (integer or float) within `range`.
    fn number(
        &mut self,
        key: &str,
        value: &Value,
        range: std::ops::RangeInclusive<f64>,
        expected: &str,
    ) -> Option<f64> {
        let n = match value.get_ref() {
            DeValue::Integer(i) => i.as_str().parse::<f64>().ok(),
            DeValue::Float(f) => f.as_str().parse::<f64>().ok(),
            _ => {
                self.wrong_type(key, value, expected);
                return None;
            }
        };
        match n {
            Some(n) if range.contains(&n) => Some(n),
            _ => {
                self.problem(
                    value.span(),
                    key,
                    format!("out of range (expected {expected})"),
                );
                None
            }
        }
    }

    fn path(&mut self, key: &str, value: &Value) -> Option<PathBuf> {
        let text = self.string(key, value, "an absolute path")?;
        if !text.starts_with('/') {
            self.problem(
                value.span(),
                key,
                format!("{text:?} is not absolute (expected an absolute path)"),
            );
            return None;
        }
        Some(PathBuf::from(text))
    }

    fn duration(&mut self, key: &str, value: &Value) -> Option<Duration> {
        let text = self.string(key, value, "a duration such as \"30s\" or \"10m\"")?;
        match duration::parse(text) {
            Ok(d) => Some(d),
            Err(e) => {
                self.problem(value.span(), key, e.to_string());
                None
            }
        }
    }

    /// A string parsed by `parse`, whose error (or `expected`) explains a refusal.
    fn parsed<T>(
        &mut self,
        key: &str,
        value: &Value,
        expected: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let text = self.string(key, value, expected)?;
        match parse(text) {
            Ok(v) => Some(v),
            Err(reason) if reason.contains("expected") => {
                self.problem(value.span(), key, reason);
                None
            }
            Err(reason) => {
                self.problem(value.span(), key, format!("{reason} (expected {expected})"));
                None
            }
        }
    }

    fn strings<'a, 'i>(
        &mut self,
        key: &str,
        value: &'a Value<'i>,
        expected: &str,
    ) -> Vec<(String, &'a Value<'i>)> {
        let mut out = Vec::new();
        let DeValue::Array(items) = value.get_ref() else {
            self.wrong_type(key, value, &format!("an array of {expected}"));
            return out;
        };
        for (i, item) in items.iter().enumerate() {
            out.push((format!("{key}[{i}]"), item));
        }
        out
    }

    fn root(&mut self, root: &DeTable) -> DaemonConfig {
        let entries = self.entries("", root, ROOT_KEYS);
        let find = |name: &str| entries.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
        let data_dir = find("data_dir").and_then(|v| self.path("data_dir", v));
        let run_dir = find("run_dir").and_then(|v| self.path("run_dir", v));
        let mut config = DaemonConfig::with_dirs(
            data_dir.unwrap_or_else(|| PathBuf::from(super::DEFAULT_DATA_DIR)),
            run_dir.unwrap_or_else(|| PathBuf::from(super::DEFAULT_RUN_DIR)),
        );
        for (key, value) in &entries {
            match key.as_str() {
                "data_dir" | "run_dir" => {}
                "base_domain" => {
                    config.base_domain = self.parsed(key, value, "a DNS name", |text| {
                        names::check_dns_name(text)
                            .map(|()| text.to_string())
                            .map_err(|e| e.to_string())
                    });
                }
                "rollback_window" => {
                    if let Some(d) = self.duration(key, value) {
                        config.rollback_window = d;
                    }
                }
                "stop_grace" => {
                    if let Some(d) = self.duration(key, value) {
                        config.stop_grace = d;
                    }
                }
                "socket" => self.socket(key, value, &mut config),
                "listeners" => self.listeners(key, value, &mut config),
                "metrics" => self.metrics(key, value, &mut config),
                "network" => self.network(key, value, &mut config),
                "logs" => self.logs(key, value, &mut config),
                "scaling" => self.scaling(key, value, &mut config),
                "builder" => self.builder(key, value, &mut config),
                "tls" => self.tls(key, value, &mut config),
                "acme" => self.acme(key, value, &mut config),
                _ => {}
            }
        }
        config
    }

    fn socket(&mut self, key: &str, value: &Value, config: &mut DaemonConfig) {
        let Some(table) = self.table(key, value) else {
            return;
        };
        for (key, value) in self.entries(key, table, SOCKET_KEYS) {
            if key.ends_with(".path") {
                if let Some(path) = self.path(&key, value) {
                    config.socket.path = path;
                }
            } else if let Some(group) = self.string(&key, value, "a group name") {
                if group.is_empty() {
                    self.problem(
                        value.span(),
                        &key,
                        "is empty (expected a group name)".into(),
                    );
                } else {
                    config.socket.group = group.to_string();
                }
            }
        }
    }

    fn listeners(&mut self, key: &str, value: &Value, config: &mut DaemonConfig) {
        let Some(table) = self.table(key, value) else {
            return;
        };
        let entries = self.entries(key, table, LISTENER_KEYS);
        let unprivileged = entries
            .iter()
            .find(|(k, _)| k.ends_with(".unprivileged"))
            .and_then(|(k, v)| self.boolean(k, v));
        if unprivileged == Some(true) {
            config.listeners = Listeners::unprivileged();
        }
        const EXPECTED: &str = "\":PORT\", \"HOST:PORT\" or \"off\"";
        for (key, value) in &entries {
            if key.ends_with(".unprivileged") {
                continue;
            }
            let addr = self.parsed(key, value, EXPECTED, |text| match text {
                "off" => Ok(None),
                _ => ListenAddr::parse(text)
                    .map(Some)
                    .ok_or_else(|| format!("{text:?} is not a listen address")),
            });
            if let Some(addr) = addr {
                if key.ends_with(".http") {
                    config.listeners.http = addr;
                } else {
                    config.listeners.https = addr;
                }
            }
        }
    }

    fn metrics(&mut self, key: &str, value: &Value, config: &mut DaemonConfig) {
        let Some(table) = self.table(key, value) else {
            return;
        };
        for (key, value) in self.entries(key, table, METRICS_KEYS) {
            let addr = self.parsed(&key, value, "\"HOST:PORT\" or \"off\"", |text| match text {
                "off" => Ok(None),
                _ => text
                    .parse::<SocketAddr>()
                    .map(Some)
                    .map_err(|_| format!("{text:?} is not an address")),
            });
            if let Some(addr) = addr {
                config.metrics = addr;
            }
        }
    }

    fn network(&mut self, key: &str, value: &Value, config: &mut DaemonConfig) {
        let Some(table) = self.table(key, value) else {
            return;
        };
        let table_span = value.span();
        let entries = self.entries(key, table, NETWORK_KEYS);
        let net = &mut config.network;
        for (key, value) in &entries {
            let field = key.trim_start_matches("network.");
            match field {
                "bridge" | "nft_table" | "veth_prefix" | "uplink" => {
                    let Some(text) = self.string(key, value, "a name") else {
                        continue;
                    };
                    let text = text.to_string();
                    match field {
                        "bridge" => net.bridge = text,
                        "nft_table" => net.table = text,
                        "veth_prefix" => net.veth_prefix = text,
                        _ => net.uplink = Some(text),
                    }
                }
                "subnet" => {
                    if let Some(subnet) =
                        self.parsed(key, value, "an IPv4 CIDR such as \"10.73.0.0/16\"", |t| {
                            Subnet::parse(t).map_err(|e| e.to_string())
                        })
                    {
                        net.subnet = subnet;
                    }
                }
                "subnet6" => {
                    net.subnet6 = self.parsed(
                        key,
                        value,
                        "an IPv6 unique local CIDR such as \"fd00:6c75:6c6c::/64\"",
                        parse_subnet6,
                    );
                }
                "dns" => {
                    let mut dns = Vec::new();
                    for (key, item) in self.strings(key, value, "IP addresses") {
                        if let Some(ip) = self.parsed(&key, item, "an IP address", |t| {
                            t.parse::<IpAddr>()
                                .map_err(|_| format!("{t:?} is not an IP address"))
                        }) {
                            dns.push(ip);
                        }
                    }
                    net.dns = dns;
                }
                "allow_host_ports" => {
                    let mut ports = Vec::new();
                    for (key, item) in self.strings(key, value, "ports") {
                        if let Some(port) =
                            self.parsed(&key, item, "\"PORT\", \"PORT/tcp\" or \"PORT/udp\"", |t| {
                                t.parse::<HostPort>().map_err(|e| e.to_string())
                            })
                        {
                            ports.push(port);
                        }
                    }
                    net.host_ports = ports;
                }
                "allow_metadata" => {
                    if let Some(b) = self.boolean(key, value) {
                        net.allow_metadata = b;
                    }
                }
                _ => {}
            }
        }
        if self.problems.is_empty()
            && let Err(e) = config.network.validate()
        {
            let field = match e.field {
                "table" => "nft_table",
                "host_ports" => "allow_host_ports",
                other => other,
            };
            let key = format!("network.{field}");
            let span = entries
                .iter()
                .find(|(k, _)| *k == key)
                .map_or(table_span, |(_, v)| v.span());
            self.problem(span, &key, e.reason);
        }
    }

    fn logs(&mut self, key: &str, value: &Value, config: &mut DaemonConfig) {
        let Some(table) = self.table(key, value) else {
            return;
        };
        for (key, value) in self.entries(key, table, LOG_KEYS) {
            if key.ends_with(".retention") {
                if let Some(d) = self.duration(&key, value) {
                    config.logs.retention = d;
                }
            } else if let Some(bytes) = self.parsed(&key, value, "a size such as \"100M\"", |t| {
                lull_runtime::size::parse(t).map_err(|e| e.to_string())
            }) {
                config.logs.max_bytes = bytes;
            }
        }
    }
}

impl Walk<'_> {
    fn builder(&mut self, key: &str, value: &Value, config: &mut DaemonConfig) {
        let Some(table) = self.table(key, value) else {
            return;
        };
        let builder = &mut config.builder;
        for (key, value) in self.entries(key, table, BUILDER_KEYS) {
            let name = key.rsplit('.').next().unwrap_or_default();
            match name {
                "base_images" => {
                    let Some(images) = self.table(&key, value) else {
                        continue;
                    };
                    for (runtime, image) in images.iter() {
                        let runtime_key = join(&key, runtime.get_ref());
                        if let Some(reference) =
                            self.parsed(&runtime_key, image, "an image reference", |t| {
                                t.parse::<lull_runtime::reference::Reference>()
                                    .map(|_| t.to_owned())
                                    .map_err(|e| e.to_string())
                            })
                        {
                            builder
                                .base_images
                                .insert(runtime.get_ref().to_string(), reference);
                        }
                    }
                }
                "extra_ca_certs" => {
                    for (item_key, item) in self.strings(&key, value, "absolute paths") {
                        if let Some(path) = self.path(&item_key, item) {
                            builder.extra_ca_certs.push(path);
                        }
                    }
                }
                "concurrency" => {
                    if let Some(n) =
                        self.number(&key, value, 1.0..=64.0, "a whole number from 1 to 64")
                    {
                        if n.fract() != 0.0 {
                            self.problem(
                                value.span(),
                                &key,
                                "not a whole number (expected a whole number from 1 to 64)".into(),
                            );
                        } else {
                            builder.concurrency = n as usize;
                        }
                    }
                }
                "git_allow_local" => {
                    if let Some(b) = self.boolean(&key, value) {
                        builder.git_allow_local = b;
                    }
                }
                "cpu" => {
                    if let Some(n) = self.number(&key, value, 0.1..=1024.0, "vCPUs from 0.1") {
                        builder.cpu = n;
                    }
                }
                "memory" | "max_upload" => {
                    if let Some(bytes) = self.parsed(&key, value, "a size such as \"2G\"", |t| {
                        lull_runtime::size::parse(t).map_err(|e| e.to_string())
                    }) {
                        if name == "memory" {
                            builder.memory_bytes = bytes;
                        } else {
                            builder.max_upload = bytes;
                        }
                    }
                }
                _ => {
                    if let Some(d) = self.duration(&key, value) {
                        builder.timeout = d;
                    }
                }
            }
        }
    }

    fn acme(&mut self, key: &str, value: &Value, config: &mut DaemonConfig) {
        let Some(table) = self.table(key, value) else {
            return;
        };
        let (mut kid, mut hmac) = (None, None);
        let mut eab_span = None;
        for (key, value) in self.entries(key, table, ACME_KEYS) {
            let acme = &mut config.acme;
            match key.rsplit('.').next().unwrap_or_default() {
                "enabled" => {
                    if let Some(b) = self.boolean(&key, value) {
                        acme.enabled = b;
                    }
                }
                "directory" => {
                    if let Some(url) = self.parsed(
                        &key,
                        value,
                        "an https:// URL, \"letsencrypt\" or \"letsencrypt-staging\"",
                        |t| match t {
                            "letsencrypt" => Ok(super::LETS_ENCRYPT.to_owned()),
                            "letsencrypt-staging" => Ok(super::LETS_ENCRYPT_STAGING.to_owned()),
                            _ if t.starts_with("https://") && t.len() > "https://".len() => {
                                Ok(t.to_owned())
                            }
                            _ => Err(format!("{t:?} is not an https:// URL")),
                        },
                    ) {
                        acme.directory = url;
                    }
                }
                "email" => {
                    acme.email = self.parsed(&key, value, "an email address", |t| {
                        match t.split_once('@') {
                            Some((user, host))
                                if !user.is_empty()
                                    && host.contains('.')
                                    && !t.contains(char::is_whitespace) =>
                            {
                                Ok(t.to_owned())
                            }
                            _ => Err(format!("{t:?} is not an email address")),
                        }
                    });
                }
                "ca_certificates" => acme.ca_certificates = self.path(&key, value),
                "dns01_hook" => acme.dns01_hook = self.path(&key, value),
                "challenge" => {
                    if let Some(kind) =
                        self.parsed(&key, value, "\"http-01\" or \"tls-alpn-01\"", |t| match t {
                            "http-01" => Ok(super::ChallengeKind::Http01),
                            "tls-alpn-01" => Ok(super::ChallengeKind::TlsAlpn01),
                            _ => Err(format!("{t:?} is not a challenge lull answers")),
                        })
                    {
                        acme.challenge = kind;
                    }
                }
                "eab_kid" => {
                    eab_span = Some(value.span());
                    kid = self
                        .string(&key, value, "the CA's key id")
                        .map(str::to_owned);
                }
                "eab_hmac_key" => {
                    eab_span = Some(value.span());
                    hmac = self.parsed(&key, value, "the CA's HMAC key, base64url", |t| {
                        use base64::Engine as _;
                        base64::engine::general_purpose::URL_SAFE_NO_PAD
                            .decode(t.trim_end_matches('='))
                            .map(|_| t.to_owned())
                            .map_err(|e| format!("not base64url: {e}"))
                    });
                }
                name @ ("retry_initial" | "retry_max" | "check_interval") => {
                    if let Some(d) = self.duration(&key, value) {
                        if d.is_zero() {
                            self.problem(
                                value.span(),
                                &key,
                                "is zero (expected a duration such as \"1m\")".into(),
                            );
                        } else if name == "retry_initial" {
                            acme.retry_initial = d;
                        } else if name == "retry_max" {
                            acme.retry_max = d;
                        } else {
                            acme.check_interval = d;
                        }
                    }
                }
                "resolver" => {
                    acme.resolver = self.parsed(
                        &key,
                        value,
                        "a DNS server address such as \"127.0.0.1:53\"",
                        |t| {
                            t.parse::<SocketAddr>()
                                .or_else(|_| t.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                                .map_err(|_| format!("{t:?} is not an address"))
                        },
                    );
                }
                _ => {
                    for (item_key, item) in self.strings(&key, value, "IP addresses") {
                        if let Some(ip) = self.parsed(&item_key, item, "an IP address", |t| {
                            t.parse::<IpAddr>()
                                .map_err(|_| format!("{t:?} is not an IP address"))
                        }) {
                            config.acme.public_addresses.push(ip);
                        }
                    }
                }
            }
        }
        match (kid, hmac) {
            (Some(kid), Some(hmac)) => config.acme.eab = Some((kid, hmac)),
            (None, None) => {}
            _ => {
                if let Some(span) = eab_span {
                    self.problem(
                        span,
                        "acme.eab_kid",
                        "an external account binding needs both acme.eab_kid and acme.eab_hmac_key"
                            .into(),
                    );
                }
            }
        }
        if config.acme.retry_max < config.acme.retry_initial {
            config.acme.retry_max = config.acme.retry_initial;
        }
    }

    fn tls(&mut self, key: &str, value: &Value, config: &mut DaemonConfig) {
        let Some(table) = self.table(key, value) else {
            return;
        };
        for (key, value) in self.entries(key, table, TLS_KEYS) {
            let DeValue::Array(items) = value.get_ref() else {
                self.wrong_type(
                    &key,
                    value,
                    "an array of { cert = PATH, key = PATH } tables",
                );
                continue;
            };
            for (i, item) in items.iter().enumerate() {
                let item_key = format!("{key}[{i}]");
                if let Some(certificate) = self.certificate(&item_key, item) {
                    config.tls.certificates.push(certificate);
                }
            }
        }
    }

    fn certificate(&mut self, key: &str, value: &Value) -> Option<CertificateConfig> {
        let table = self.table(key, value)?;
        let (mut cert, mut cert_key, mut ocsp, mut names) = (None, None, None, None);
        let mut ok = true;
        for (field_key, field) in self.entries(key, table, CERTIFICATE_KEYS) {
            match field_key.rsplit('.').next().unwrap_or_default() {
                "cert" => cert = self.path(&field_key, field),
                "key" => cert_key = self.path(&field_key, field),
                "ocsp" => {
                    ocsp = self.path(&field_key, field);
                    ok &= ocsp.is_some();
                }
                _ => {
                    let mut list = Vec::new();
                    let items = self.strings(&field_key, field, "DNS names");
                    let given = items.len();
                    for (name_key, item) in items {
                        let name = self.parsed(&name_key, item, "a DNS name", |text| {
                            let lower = text.to_ascii_lowercase();
                            let bare = lower.strip_prefix("*.").unwrap_or(&lower);
                            names::check_dns_name(bare)
                                .map(|()| lower.clone())
                                .map_err(|e| e.to_string())
                        });
                        ok &= name.is_some();
                        list.extend(name);
                    }
                    if given == 0 && matches!(field.get_ref(), DeValue::Array(_)) {
                        self.problem(
                            field.span(),
                            &field_key,
                            "is empty (expected DNS names, or no key for the certificate's own)"
                                .into(),
                        );
                        ok = false;
                    }
                    names = Some(list);
                }
            }
        }
        for (field, found) in [("cert", cert.is_some()), ("key", cert_key.is_some())] {
            let present = table.iter().any(|(k, _)| k.get_ref() == field);
            if !found && !present {
                self.problem(
                    value.span(),
                    &format!("{key}.{field}"),
                    "missing (expected an absolute path)".into(),
                );
            }
        }
        let mut files = CertificateFiles::new(cert?, cert_key?);
        files.ocsp = ocsp;
        ok.then_some(CertificateConfig { files, names })
    }

    fn scaling(&mut self, key: &str, value: &Value, config: &mut DaemonConfig) {
        let Some(table) = self.table(key, value) else {
            return;
        };
        let scaling = &mut config.scaling;
        for (key, value) in self.entries(key, table, SCALING_KEYS) {
            let name = key.rsplit('.').next().unwrap_or_default();
            match name {
                "memory_overcommit" => {
                    if let Some(n) =
                        self.number(&key, value, 0.1..=100.0, "a ratio from 0.1 to 100")
                    {
                        scaling.memory_overcommit = n;
                    }
                }
                "max_instances" => {
                    let most = lull_netns::link::MAX_BRIDGE_PORTS as f64;
                    let expected = format!(
                        "a whole number from 1 to {most} (instances share one bridge, which \
                         takes at most {most} ports)"
                    );
                    if let Some(n) = self.number(&key, value, 1.0..=most, &expected) {
                        if n.fract() != 0.0 {
                            self.problem(
                                value.span(),
                                &key,
                                format!("not a whole number (expected {expected})"),
                            );
                        } else {
                            scaling.max_instances = n as usize;
                        }
                    }
                }
                "cpu_pressure_brake" => {
                    if let Some(n) =
                        self.number(&key, value, 0.0..=100.0, "a percentage from 0 to 100")
                    {
                        scaling.cpu_pressure_brake = n;
                    }
                }
                _ => {
                    if let Some(n) =
                        self.number(&key, value, 0.0..=100.0, "a percentage from 0 to 100")
                    {
                        scaling.memory_pressure_brake = n;
                    }
                }
            }
        }
    }
}

fn parse_subnet6(text: &str) -> Result<(std::net::Ipv6Addr, u8), String> {
    let (addr, prefix) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not ADDRESS/PREFIX"))?;
    let addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IPv6 address"))?;
    let prefix = prefix
        .parse()
        .map_err(|_| format!("{prefix:?} is not a prefix length"))?;
    Ok((addr, prefix))
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}
