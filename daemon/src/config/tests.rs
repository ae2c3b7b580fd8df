use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

fn problems(text: &str) -> Vec<String> {
    match DaemonConfig::parse(text, "lull.toml") {
        Ok(c) => panic!("accepted: {c:?}"),
        Err(ConfigError::Invalid { origin, problems }) => problems
            .iter()
            .map(|p| format!("{origin}:{}:{}: {}: {}", p.line, p.column, p.key, p.message))
            .collect(),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn missing_file_means_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let config = DaemonConfig::load(&dir.path().join("lull.toml")).unwrap();
    assert_eq!(config, DaemonConfig::default());
    assert_eq!(config.data_dir, Path::new("/var/lib/lull"));
    assert_eq!(config.socket.path, Path::new("/run/lull/lull.sock"));
    assert_eq!(config.socket.group, "lull");
    assert_eq!(config.listeners.http.unwrap().to_string(), ":80");
    assert_eq!(config.listeners.https.unwrap().to_string(), ":443");
    assert_eq!(
        config.metrics,
        Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9464))
    );
    assert_eq!(config.rollback_window, Duration::from_secs(600));
    assert_eq!(config.base_domain, None);
    assert_eq!(config.network.bridge, "lull0");
    assert_eq!(config.network.subnet.to_string(), "10.73.0.0/16");
}

#[test]
fn an_empty_file_means_defaults_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lull.toml");
    std::fs::write(&path, "# nothing here\n").unwrap();
    assert_eq!(DaemonConfig::load(&path).unwrap(), DaemonConfig::default());
}

#[test]
fn every_key_is_read() {
    let text = r#"
data_dir = "/srv/lull"
run_dir = "/run/lull-test"
base_domain = "apps.example.com"
rollback_window = "0"
stop_grace = "30s"

[socket]
group = "wheel"

[listeners]
unprivileged = true
https = "off"

[metrics]
address = "off"

[network]
bridge = "lbr0"
subnet = "10.99.0.0/24"
subnet6 = "fd00:6c75:6c6c::/64"
nft_table = "lulltest"
veth_prefix = "lt"
uplink = "eth1"
dns = ["192.0.2.53", "2001:db8::53"]
allow_host_ports = ["5432", "53/udp"]
allow_metadata = true

[logs]
retention = "1d"
max_size = "1G"
"#;
    let c = DaemonConfig::parse(text, "lull.toml").unwrap();
    assert_eq!(c.data_dir, Path::new("/srv/lull"));
    // The socket and the network's paths follow the dirs unless set.
    assert_eq!(c.socket.path, PathBuf::from("/run/lull-test/lull.sock"));
    assert_eq!(
        c.network.ipam_file,
        Path::new("/srv/lull/network/ipam.json")
    );
    assert_eq!(c.network.netns_dir, Path::new("/run/lull-test/netns"));
    assert_eq!(c.socket.group, "wheel");
    assert_eq!(c.base_domain.as_deref(), Some("apps.example.com"));
    assert_eq!(c.rollback_window, Duration::ZERO);
    assert_eq!(c.stop_grace, Duration::from_secs(30));
    assert_eq!(c.listeners.http.unwrap().to_string(), ":8080");
    assert_eq!(c.listeners.https, None);
    assert_eq!(c.metrics, None);
    assert_eq!(c.network.bridge, "lbr0");
    assert_eq!(c.network.subnet.to_string(), "10.99.0.0/24");
    assert!(c.network.subnet6.is_some());
    assert_eq!(c.network.table, "lulltest");
    assert_eq!(c.network.veth_prefix, "lt");
    assert_eq!(c.network.uplink.as_deref(), Some("eth1"));
    assert_eq!(c.network.dns.len(), 2);
    assert_eq!(
        c.network
            .host_ports
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>(),
        ["5432/tcp", "53/udp"]
    );
    assert!(c.network.allow_metadata);
    assert_eq!(c.logs.retention, Duration::from_secs(86_400));
    assert_eq!(c.logs.max_bytes, 1 << 30);
}

#[test]
fn listen_addresses() {
    let c = DaemonConfig::parse(
        "[listeners]\nhttp = \"127.0.0.1:0\"\nhttps = \"[::1]:8443\"\n",
        "lull.toml",
    )
    .unwrap();
    assert_eq!(c.listeners.http.unwrap().to_string(), "127.0.0.1:0");
    assert_eq!(c.listeners.https.unwrap().to_string(), "[::1]:8443");
    // An explicit address wins over `unprivileged`, whatever the order.
    let c = DaemonConfig::parse(
        "[listeners]\nhttp = \":9000\"\nunprivileged = true\n",
        "lull.toml",
    )
    .unwrap();
    assert_eq!(c.listeners.http.unwrap().port, 9000);
    assert_eq!(c.listeners.https.unwrap().port, 8443);
}

#[test]
fn every_problem_is_reported_together_with_its_line() {
    let text = r#"data_dir = "var/lib/lull"
rollback_window = "10 minutes"
colour = "blue"

[listeners]
http = "80"

[network]
subnet = "10.0.0.0/33"
allow_host_ports = ["5432", "x/udp"]
dns = "1.1.1.1"
allow_metadata = "yes"

[metrics]
adress = "127.0.0.1:1"

[logs]
max_size = "lots"
"#;
    let got = problems(text);
    let want = [
        "lull.toml:1:12: data_dir: \"var/lib/lull\" is not absolute (expected an absolute path)",
        "lull.toml:2:19: rollback_window: duration \"10 minutes\" has a number without a unit (use ms, s, m, h or d)",
        "lull.toml:3:1: colour: unknown key (expected one of data_dir, run_dir, base_domain, rollback_window, stop_grace, socket, listeners, metrics, network, logs, scaling, builder, tls, acme)",
        "lull.toml:6:8: listeners.http: \"80\" is not a listen address (expected \":PORT\", \"HOST:PORT\" or \"off\")",
    ];
    for (i, line) in want.iter().enumerate() {
        assert_eq!(&got[i], line);
    }
    let rest = &got[want.len()..];
    let keys_and_lines: Vec<&str> = rest.iter().map(|p| p.split(": ").next().unwrap()).collect();
    assert_eq!(
        keys_and_lines,
        [
            "lull.toml:9:10",
            "lull.toml:10:29",
            "lull.toml:11:7",
            "lull.toml:12:18",
            "lull.toml:15:1",
            "lull.toml:18:12",
        ],
        "{rest:#?}"
    );
    assert!(rest[0].contains("network.subnet: "), "{}", rest[0]);
    assert!(
        rest[1].contains("network.allow_host_ports[1]: "),
        "{}",
        rest[1]
    );
    assert!(
        rest[2].ends_with("network.dns: found a string (expected an array of IP addresses)"),
        "{}",
        rest[2]
    );
    assert!(
        rest[3].ends_with("network.allow_metadata: found a string (expected true or false)"),
        "{}",
        rest[3]
    );
    assert!(
        rest[4].ends_with("metrics.adress: unknown key (expected one of address)"),
        "{}",
        rest[4]
    );
    assert!(
        rest[5].contains("logs.max_size: size \"lots\""),
        "{}",
        rest[5]
    );
}

#[test]
fn a_table_given_as_a_value_is_a_type_error() {
    assert_eq!(
        problems("network = \"lull0\"\n"),
        ["lull.toml:1:11: network: found a string (expected a table)"]
    );
}

#[test]
fn combined_network_rules_name_their_key() {
    let got = problems("[network]\nbridge = \"lv0\"\n");
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].starts_with("lull.toml:"), "{}", got[0]);
    assert!(got[0].contains("network.veth_prefix: "), "{}", got[0]);
    let got = problems("[network]\nnft_table = \"no spaces\"\n");
    assert!(
        got[0].starts_with("lull.toml:2:13: network.nft_table: "),
        "{}",
        got[0]
    );
}

#[test]
fn syntax_errors_have_positions() {
    let got = problems("data_dir = \n[socket\n");
    assert!(!got.is_empty());
    assert!(got[0].starts_with("lull.toml:1:"), "{got:?}");
    assert!(got[0].contains(": toml: "), "{got:?}");
}

#[test]
fn an_unreadable_file_names_its_path() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the file should be.
    let e = DaemonConfig::load(dir.path()).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }), "{e}");
    assert!(e.to_string().contains(&dir.path().display().to_string()));
}

#[test]
fn the_file_name_leads_every_line_of_the_error() {
    let e = DaemonConfig::parse("a = 1\nb = 2\n", "/etc/lull/lull.toml").unwrap_err();
    assert_eq!(
        e.to_string().lines().map(|l| &l[..24]).collect::<Vec<_>>(),
        ["/etc/lull/lull.toml:1:1:", "/etc/lull/lull.toml:2:1:"]
    );
}

#[test]
fn the_scaling_section() {
    let c = DaemonConfig::parse(
        "[scaling]\nmemory_overcommit = 2\nmax_instances = 600\ncpu_pressure_brake = 75.5\nmemory_pressure_brake = 10\n",
        "lull.toml",
    )
    .unwrap();
    assert_eq!(c.scaling.memory_overcommit, 2.0);
    assert_eq!(c.scaling.max_instances, 600);
    assert_eq!(c.scaling.cpu_pressure_brake, 75.5);
    let limits = c.scaling.limits(1 << 30);
    assert_eq!(limits.memory_allowed(), 2 << 30);
    assert_eq!(limits.memory_pressure_brake, 10.0);

    let e = DaemonConfig::parse(
        "[scaling]\nmemory_overcommit = \"lots\"\nmax_instances = 2.5\ncpu_pressure_brake = 120\nspeed = 1\n",
        "lull.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("lull.toml:2:21: scaling.memory_overcommit: found a string (expected a ratio from 0.1 to 100)"),
        "{e}"
    );
    assert!(
        e.contains("lull.toml:3:17: scaling.max_instances: not a whole number"),
        "{e}"
    );
    assert!(e.contains("lull.toml:4:22: scaling.cpu_pressure_brake: out of range (expected a percentage from 0 to 100)"), "{e}");
    assert!(
        e.contains("lull.toml:5:1: scaling.speed: unknown key"),
        "{e}"
    );

    // One bridge holds every instance, and takes 1023 ports.
    let e = DaemonConfig::parse("[scaling]\nmax_instances = 2000\n", "lull.toml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lull.toml:2:17: scaling.max_instances: out of range (expected a whole number from 1 to 1023 (instances share one bridge, which takes at most 1023 ports))"),
        "{e}"
    );
    let c = DaemonConfig::parse("[scaling]\nmax_instances = 1023\n", "lull.toml").unwrap();
    assert_eq!(c.scaling.max_instances, 1023);
}

#[test]
fn tls_certificates() {
    let config = DaemonConfig::parse(
        r#"
[tls]
certificates = [
  { cert = "/etc/lull/a/fullchain.pem", key = "/etc/lull/a/key.pem" },
  { cert = "/etc/lull/b.pem", key = "/etc/lull/b.key", ocsp = "/etc/lull/b.ocsp", names = ["B.example.com", "*.b.example.com"] },
]
"#,
        "lull.toml",
    )
    .unwrap();
    let c = &config.tls.certificates;
    assert_eq!(c.len(), 2);
    assert_eq!(c[0].files.cert, Path::new("/etc/lull/a/fullchain.pem"));
    assert_eq!(c[0].files.key, Path::new("/etc/lull/a/key.pem"));
    assert_eq!(c[0].files.ocsp, None);
    assert_eq!(c[0].names, None);
    assert_eq!(
        c[1].files.ocsp.as_deref(),
        Some(Path::new("/etc/lull/b.ocsp"))
    );
    assert_eq!(
        c[1].names.as_deref(),
        Some(&["b.example.com".to_string(), "*.b.example.com".to_string()][..])
    );
    assert!(DaemonConfig::default().tls.certificates.is_empty());
}

#[test]
fn tls_problems_have_lines() {
    let text = r#"[tls]
certificates = [
  { cert = "relative.pem", key = "/k.pem" },
  { key = "/k.pem", colour = "blue" },
  { cert = "/c.pem", key = "/k.pem", names = ["bad name"] },
  "/c.pem",
]
other = 1
"#;
    assert_eq!(
        problems(text),
        [
            "lull.toml:3:12: tls.certificates[0].cert: \"relative.pem\" is not absolute (expected an absolute path)",
            "lull.toml:4:3: tls.certificates[1].cert: missing (expected an absolute path)",
            "lull.toml:4:21: tls.certificates[1].colour: unknown key (expected one of cert, key, ocsp, names)",
            "lull.toml:5:47: tls.certificates[2].names[0]: \"bad name\" is not a DNS name (expected dot-separated labels of lowercase letters, digits and hyphens, at most 253 characters)",
            "lull.toml:6:3: tls.certificates[3]: found a string (expected a table)",
            "lull.toml:8:1: tls.other: unknown key (expected one of certificates)",
        ]
    );
}

#[test]
fn the_builder_section() {
    let c = DaemonConfig::parse(
        r#"
[builder]
cpu = 4
memory = "4G"
timeout = "45m"
max_upload = "512M"
extra_ca_certs = ["/etc/lull/corp-ca.pem", "/etc/lull/proxy-ca.pem"]
git_allow_local = true
concurrency = 3

[builder.base_images]
python311 = "registry.example.com/lull/python:3.11"
nodejs22 = "127.0.0.1:5000/lull/base/node:22"
"#,
        "lull.toml",
    )
    .unwrap();
    let b = &c.builder;
    assert_eq!(b.cpu, 4.0);
    assert_eq!(b.memory_bytes, 4 << 30);
    assert_eq!(b.timeout, Duration::from_secs(45 * 60));
    assert_eq!(b.max_upload, 512 << 20);
    assert!(b.git_allow_local);
    assert_eq!(b.concurrency, 3);
    assert_eq!(
        b.extra_ca_certs,
        [
            PathBuf::from("/etc/lull/corp-ca.pem"),
            PathBuf::from("/etc/lull/proxy-ca.pem")
        ]
    );
    assert_eq!(
        b.base_images["python311"],
        "registry.example.com/lull/python:3.11"
    );
    assert_eq!(
        b.base_images["nodejs22"],
        "127.0.0.1:5000/lull/base/node:22"
    );
    // The base images not named keep their defaults.
    assert_eq!(
        b.base_images["nodejs18"],
        "127.0.0.1:5000/lull/base/node:18"
    );
    assert_eq!(b.base_images.len(), 4);

    let defaults = DaemonConfig::parse("", "lull.toml").unwrap().builder;
    assert_eq!(defaults, BuilderConfig::default());
    assert_eq!(defaults.cpu, 2.0);
    assert_eq!(defaults.memory_bytes, 2 << 30);
    assert_eq!(defaults.timeout, Duration::from_secs(30 * 60));
    assert_eq!(defaults.max_upload, 2 << 30);
    assert!(defaults.extra_ca_certs.is_empty());
    assert!(!defaults.git_allow_local);
    assert_eq!(defaults.concurrency, 2);
}

#[test]
fn builder_problems_name_their_key_and_line() {
    let got = problems(
        r#"[builder]
cpu = 0
memory = "lots"
timeout = "forever"
max_upload = 5
extra_ca_certs = ["ca.pem"]
speed = "fast"

[builder.base_images]
python311 = "Not A Reference!"
nodejs18 = 18
"#,
    );
    let keys: Vec<String> = got
        .iter()
        .map(|p| {
            // `lull.toml:LINE:COLUMN: KEY: MESSAGE` → `lull.toml:LINE KEY`.
            let mut parts = p.split(": ");
            let (position, key) = (parts.next().unwrap(), parts.next().unwrap());
            format!("{} {key}", position.rsplit_once(':').unwrap().0)
        })
        .collect();
    assert_eq!(
        keys,
        [
            "lull.toml:2 builder.cpu",
            "lull.toml:3 builder.memory",
            "lull.toml:4 builder.timeout",
            "lull.toml:5 builder.max_upload",
            "lull.toml:6 builder.extra_ca_certs[0]",
            "lull.toml:7 builder.speed",
            "lull.toml:10 builder.base_images.python311",
            "lull.toml:11 builder.base_images.nodejs18",
        ],
        "{got:#?}"
    );
    assert!(
        got[0].ends_with("out of range (expected vCPUs from 0.1)"),
        "{}",
        got[0]
    );
    assert!(got[1].contains("\"lots\""), "{}", got[1]);
    assert!(
        got[3].ends_with("found an integer (expected a size such as \"2G\")"),
        "{}",
        got[3]
    );
    assert!(
        got[4].ends_with("\"ca.pem\" is not absolute (expected an absolute path)"),
        "{}",
        got[4]
    );
    assert!(
        got[5].ends_with("unknown key (expected one of base_images, extra_ca_certs, cpu, memory, timeout, max_upload, git_allow_local, concurrency)"),
        "{}",
        got[5]
    );
    assert!(
        got[7].contains("(expected an image reference)"),
        "{}",
        got[7]
    );
}

#[test]
fn acme_settings_parse_and_every_bad_value_is_named() {
    let c = DaemonConfig::parse(
        r#"
[acme]
enabled = true
directory = "letsencrypt-staging"
email = "ops@example.com"
challenge = "tls-alpn-01"
ca_certificates = "/etc/lull/ca.pem"
eab_kid = "kid-1"
eab_hmac_key = "c2VjcmV0LWtleQ"
retry_initial = "30s"
retry_max = "2h"
check_interval = "1m"
resolver = "127.0.0.1:8053"
public_addresses = ["203.0.113.7", "2001:db8::7"]
dns01_hook = "/usr/local/bin/dns-hook"
"#,
        "lull.toml",
    )
    .unwrap();
    let a = &c.acme;
    assert!(a.enabled);
    assert_eq!(a.directory, crate::config::LETS_ENCRYPT_STAGING);
    assert_eq!(a.email.as_deref(), Some("ops@example.com"));
    assert_eq!(a.challenge, crate::config::ChallengeKind::TlsAlpn01);
    assert_eq!(a.eab, Some(("kid-1".into(), "c2VjcmV0LWtleQ".into())));
    assert_eq!(a.retry_initial, Duration::from_secs(30));
    assert_eq!(a.retry_max, Duration::from_secs(7200));
    assert_eq!(a.resolver, Some("127.0.0.1:8053".parse().unwrap()));
    assert_eq!(a.public_addresses.len(), 2);
    assert_eq!(
        a.dns01_hook.as_deref(),
        Some(std::path::Path::new("/usr/local/bin/dns-hook"))
    );
    // Off by default, Let's Encrypt's production directory, HTTP-01.
    let d = DaemonConfig::parse("", "lull.toml").unwrap().acme;
    assert!(!d.enabled);
    assert_eq!(d.directory, crate::config::LETS_ENCRYPT);
    assert_eq!(d.challenge, crate::config::ChallengeKind::Http01);

    let e = DaemonConfig::parse(
        r#"[acme]
directory = "http://ca.example/dir"
email = "nobody"
challenge = "dns-01"
eab_kid = "only-the-kid"
resolver = "dns.example"
public_addresses = ["not-an-ip"]
retry_initial = "0s"
colour = 1
"#,
        "lull.toml",
    )
    .unwrap_err()
    .to_string();
    for want in [
        "lull.toml:2:13: acme.directory: \"http://ca.example/dir\" is not an https:// URL",
        "lull.toml:3:9: acme.email: \"nobody\" is not an email address",
        "lull.toml:4:13: acme.challenge: \"dns-01\" is not a challenge lull answers",
        "acme.eab_kid: an external account binding needs both acme.eab_kid and acme.eab_hmac_key",
        "lull.toml:6:12: acme.resolver: \"dns.example\" is not an address",
        "acme.public_addresses[0]: \"not-an-ip\" is not an IP address",
        "acme.retry_initial: is zero",
        "lull.toml:9:1: acme.colour: unknown key",
    ] {
        assert!(e.contains(want), "{want:?} not in:\n{e}");
    }
}

#[test]
fn acme_needs_its_listeners() {
    let c = DaemonConfig::parse(
        "[acme]\nenabled = true\n[listeners]\nhttp = \"off\"\nhttps = \"off\"\n",
        "lull.toml",
    )
    .unwrap();
    let problems = c.combination_problems();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].starts_with("acme.enabled:"), "{problems:?}");
    assert!(problems[1].starts_with("acme.challenge:"), "{problems:?}");
    let ok = DaemonConfig::parse(
        "[acme]\nenabled = true\nchallenge = \"tls-alpn-01\"\n[listeners]\nhttp = \"off\"\n",
        "lull.toml",
    )
    .unwrap();
    assert!(ok.combination_problems().is_empty());
    // Off, nothing is asked of the listeners.
    let off = DaemonConfig::parse(
        "[listeners]\nhttp = \"off\"\nhttps = \"off\"\n",
        "lull.toml",
    )
    .unwrap();
    assert!(off.combination_problems().is_empty());
}
