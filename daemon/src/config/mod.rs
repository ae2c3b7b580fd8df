//! The daemon's own settings, read from `/etc/lull/lull.toml`. Every key is optional: a missing
//! file means the embedded defaults. Unknown keys and bad values are reported all together, each
//! as `FILE:LINE:COL: key.path: what is wrong (expected ...)`, before anything is bound.

mod load;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lull_netns::network::NetworkConfig;

/// Where the daemon looks for its settings.
pub const DEFAULT_PATH: &str = "/etc/lull/lull.toml";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/lull";
pub const DEFAULT_RUN_DIR: &str = "/run/lull";
/// The admin socket's file name inside the run dir.
pub const SOCKET_FILE: &str = "lull.sock";
pub const DEFAULT_SOCKET_GROUP: &str = "lull";
pub const DEFAULT_METRICS: &str = "127.0.0.1:9464";
pub const DEFAULT_ROLLBACK_WINDOW: Duration = Duration::from_secs(10 * 60);
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
pub const DEFAULT_LOG_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
pub const DEFAULT_LOG_MAX_BYTES: u64 = 100 << 20;

/// The daemon's settings, defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    /// State kept across reboots: the store, images, volumes, secrets.
    pub data_dir: PathBuf,
    /// State cleared at boot: the admin socket, namespaces.
    pub run_dir: PathBuf,
    pub socket: SocketConfig,
    pub listeners: Listeners,
    /// The Prometheus endpoint; `None`: off.
    pub metrics: Option<SocketAddr>,
    /// Services also answer on `<name>.<base_domain>` when set.
    pub base_domain: Option<String>,
    /// The instance network (names mirror `lull`'s network flags).
    pub network: NetworkConfig,
    /// How long a replaced revision's instances stay (throttled, out of rotation) so that a
    /// rollback is a routing switch; zero disables.
    pub rollback_window: Duration,
    /// Time between SIGTERM and SIGKILL when an instance is stopped.
    pub stop_grace: Duration,
    pub logs: LogConfig,
    pub scaling: ScalingConfig,
    pub builder: BuilderConfig,
    pub tls: TlsConfig,
    pub acme: AcmeConfig,
}

/// Let's Encrypt's production directory: the default CA.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory (`directory = "letsencrypt-staging"`).
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// Automatic certificates (`[acme]`): off until the operator turns them on, which is also
/// their agreement to the CA's terms of service.
#[derive(Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    pub enabled: bool,
    /// The CA's RFC 8555 directory URL (`letsencrypt` and `letsencrypt-staging` are shorthands).
    pub directory: String,
    /// The account's contact address, if any.
    pub email: Option<String>,
    /// Trust anchors (PEM) for the directory's HTTPS, instead of the system's: for a private
    /// or test CA.
    pub ca_certificates: Option<PathBuf>,
    /// How names are proved: `http-01` (answered on port 80) or `tls-alpn-01` (on 443).
    pub challenge: ChallengeKind,
    /// External account binding: key id and base64url HMAC key, for CAs that require one.
    pub eab: Option<(String, String)>,
    /// The first retry after a failed order; each next one doubles (jittered) up to `retry_max`
    /// (longer when the CA rate-limits or asks for a wait with `Retry-After`).
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// How often certificates are checked for renewal and domains for their DNS records.
    pub check_interval: Duration,
    /// The DNS server asked when a domain's records are checked (`None`: the system's).
    pub resolver: Option<SocketAddr>,
    /// This host's public addresses: what a domain's A/AAAA records must point to, and what
    /// `lull domain add` tells to create. Empty: any address is accepted (the host's
    /// interface addresses are shown as candidates).
    pub public_addresses: Vec<IpAddr>,
    /// An executable that publishes DNS-01 TXT records (`HOOK present NAME VALUE`, `HOOK
    /// cleanup NAME VALUE`): with it the base domain gets one wildcard certificate.
    pub dns01_hook: Option<PathBuf>,
}

/// How ACME validations are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    Http01,
    TlsAlpn01,
}

impl ChallengeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

impl std::fmt::Debug for AcmeConfig {
    /// Everything but the EAB HMAC key, which is a credential.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeConfig")
            .field("enabled", &self.enabled)
            .field("directory", &self.directory)
            .field("email", &self.email)
            .field("ca_certificates", &self.ca_certificates)
            .field("challenge", &self.challenge)
            .field(
                "eab",
                &self.eab.as_ref().map(|(kid, _)| (kid, "[redacted]")),
            )
            .field("retry_initial", &self.retry_initial)
            .field("retry_max", &self.retry_max)
            .field("check_interval", &self.check_interval)
            .field("resolver", &self.resolver)
            .field("public_addresses", &self.public_addresses)
            .field("dns01_hook", &self.dns01_hook)
            .finish()
    }
}

impl Default for AcmeConfig {
    fn default() -> Self {
        AcmeConfig {
            enabled: false,
            directory: LETS_ENCRYPT.to_owned(),
            email: None,
            ca_certificates: None,
            challenge: ChallengeKind::Http01,
            eab: None,
            // Let's Encrypt allows 5 failed validations per name per hour: 5 min, doubling
            // (jittered down by at most half), stays under it.
            retry_initial: Duration::from_secs(300),
            retry_max: Duration::from_secs(6 * 3600),
            check_interval: Duration::from_secs(60),
            resolver: None,
            public_addresses: Vec::new(),
            dns01_hook: None,
        }
    }
}

/// Certificates for the HTTPS listener (`[tls]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// Operator-supplied certificates, each served for the DNS names in its SANs (or the
    /// `names` given). The files are read and checked at start (see [`crate::certs`]).
    pub certificates: Vec<CertificateConfig>,
}

/// `{ cert = "/path/fullchain.pem", key = "/path/key.pem" }`, optionally with `ocsp` (a DER
/// OCSP response; default `<cert>.ocsp` when it exists) and `names` (serve it for these only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateConfig {
    pub files: lull_proxy::tls::CertificateFiles,
    /// `None`: the certificate's own DNS names.
    pub names: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketConfig {
    /// The admin API's Unix socket (`<run_dir>/lull.sock`).
    pub path: PathBuf,
    /// The group given access (mode 0660) when it exists.
    pub group: String,
}

/// The public listeners; `None` switches one off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listeners {
    pub http: Option<ListenAddr>,
    pub https: Option<ListenAddr>,
}

impl Listeners {
    /// `:80` and `:443`.
    pub fn privileged() -> Listeners {
        Listeners {
            http: Some(ListenAddr { ip: None, port: 80 }),
            https: Some(ListenAddr {
                ip: None,
                port: 443,
            }),
        }
    }

    /// `listeners.unprivileged = true`: `:8080` and `:8443`, for tests and non-root trials.
    pub fn unprivileged() -> Listeners {
        Listeners {
            http: Some(ListenAddr {
                ip: None,
                port: 8080,
            }),
            https: Some(ListenAddr {
                ip: None,
                port: 8443,
            }),
        }
    }
}

/// `:PORT` (every address) or `HOST:PORT` (`127.0.0.1:8080`, `[::1]:8080`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr {
    /// `None`: every address.
    pub ip: Option<IpAddr>,
    pub port: u16,
}

impl ListenAddr {
    pub fn parse(text: &str) -> Option<ListenAddr> {
        if let Some(port) = text.strip_prefix(':') {
            return Some(ListenAddr {
                ip: None,
                port: port.parse().ok()?,
            });
        }
        let addr: SocketAddr = text.parse().ok()?;
        Some(ListenAddr {
            ip: Some(addr.ip()),
            port: addr.port(),
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            None => write!(f, ":{}", self.port),
            Some(ip) => write!(f, "{}", SocketAddr::new(ip, self.port)),
        }
    }
}

/// Source builds (`[builder]`).
#[derive(Debug, Clone, PartialEq)]
pub struct BuilderConfig {
    /// Base-image key (`python311`, `nodejs18`, `nodejs20`, `nodejs22`) → image reference.
    pub base_images: std::collections::BTreeMap<String, String>,
    /// PEM files of CAs trusted inside builds (added to the base image's bundle, never to the
    /// image built): for networks whose egress intercepts TLS.
    pub extra_ca_certs: Vec<PathBuf>,
    /// A build step's vCPUs, memory and time.
    pub cpu: f64,
    pub memory_bytes: u64,
    pub timeout: Duration,
    /// The largest source upload accepted.
    pub max_upload: u64,
    /// Whether git sources may name paths on the daemon's host (`/srv/repo`, `file://...`).
    /// Off by default: the daemon reads as root what its callers may not.
    pub git_allow_local: bool,
    /// Builds that run at once; more wait.
    pub concurrency: usize,
}

/// Where `cargo xtask base-images` pushes lull's base images. Node 22 has no Debian package
/// yet: `nodejs22` works once `[builder.base_images]` names an image for it.
pub const DEFAULT_BASE_IMAGES: [(&str, &str); 3] = [
    ("python311", "127.0.0.1:5000/lull/base/python:3.11"),
    ("nodejs18", "127.0.0.1:5000/lull/base/node:18"),
    ("nodejs20", "127.0.0.1:5000/lull/base/node:20"),
];

impl Default for BuilderConfig {
    fn default() -> Self {
        BuilderConfig {
            base_images: DEFAULT_BASE_IMAGES
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            extra_ca_certs: Vec::new(),
            cpu: 2.0,
            memory_bytes: 2 << 30,
            timeout: Duration::from_secs(30 * 60),
            max_upload: 2 << 30,
            git_allow_local: false,
            concurrency: 2,
        }
    }
}

/// Host-wide limits on instances (`[scaling]`); see [`crate::autoscale::HostLimits`].
#[derive(Debug, Clone, PartialEq)]
pub struct ScalingConfig {
    /// How far the instances' memory limits may add up beyond the host's memory.
    pub memory_overcommit: f64,
    /// Instances across all services.
    pub max_instances: usize,
    /// Scale-out waits while host CPU pressure (PSI `some` avg10, %) is above this.
    pub cpu_pressure_brake: f64,
    /// Scale-out waits while host memory pressure (PSI `some` avg10, %) is above this.
    pub memory_pressure_brake: f64,
}

impl Default for ScalingConfig {
    fn default() -> Self {
        let limits = crate::autoscale::HostLimits::for_memory(0);
        ScalingConfig {
            memory_overcommit: limits.overcommit_ratio,
            max_instances: limits.max_instances,
            cpu_pressure_brake: limits.cpu_pressure_brake,
            memory_pressure_brake: limits.memory_pressure_brake,
        }
    }
}

impl ScalingConfig {
    /// The limits for a host with `memory_total` bytes.
    pub fn limits(&self, memory_total: u64) -> crate::autoscale::HostLimits {
        crate::autoscale::HostLimits {
            memory_total,
            overcommit_ratio: self.memory_overcommit,
            max_instances: self.max_instances,
            cpu_pressure_brake: self.cpu_pressure_brake,
            memory_pressure_brake: self.memory_pressure_brake,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// App logs older than this are removed.
    pub retention: Duration,
    /// A service's app logs are trimmed, oldest first, beyond this many bytes.
    pub max_bytes: u64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig::with_dirs(
            PathBuf::from(DEFAULT_DATA_DIR),
            PathBuf::from(DEFAULT_RUN_DIR),
        )
    }
}

impl DaemonConfig {
    /// The defaults for a data dir and a run dir (the socket and network paths follow them).
    pub fn with_dirs(data_dir: PathBuf, run_dir: PathBuf) -> DaemonConfig {
        DaemonConfig {
            network: NetworkConfig::new(&data_dir, &run_dir),
            socket: SocketConfig {
                path: run_dir.join(SOCKET_FILE),
                group: DEFAULT_SOCKET_GROUP.to_string(),
            },
            data_dir,
            run_dir,
            listeners: Listeners::privileged(),
            metrics: DEFAULT_METRICS.parse().ok(),
            base_domain: None,
            rollback_window: DEFAULT_ROLLBACK_WINDOW,
            stop_grace: DEFAULT_STOP_GRACE,
            logs: LogConfig {
                retention: DEFAULT_LOG_RETENTION,
                max_bytes: DEFAULT_LOG_MAX_BYTES,
            },
            scaling: ScalingConfig::default(),
            builder: BuilderConfig::default(),
            tls: TlsConfig::default(),
            acme: AcmeConfig::default(),
        }
    }

    /// Settings that parse but cannot work together: ACME on with nowhere to serve what it
    /// obtains, or with HTTP-01 and no HTTP listener to answer it. Each line names the keys.
    pub fn combination_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.acme.enabled {
            if self.listeners.https.is_none() {
                out.push(
                    "acme.enabled: ACME's certificates are served on the HTTPS listener, and \
                     listeners.https is off"
                        .to_owned(),
                );
            }
            if self.acme.challenge == ChallengeKind::Http01 && self.listeners.http.is_none() {
                out.push(
                    "acme.challenge: \"http-01\" is answered on the HTTP listener, and \
                     listeners.http is off (turn it on, or use \"tls-alpn-01\")"
                        .to_owned(),
                );
            }
        }
        out
    }

    /// Reads `path`; a missing file means the defaults. Every problem is reported at once.
    pub fn load(path: &Path) -> Result<DaemonConfig, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => DaemonConfig::parse(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DaemonConfig::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Parses settings text; `origin` names it in errors (the file's path).
    pub fn parse(text: &str, origin: &str) -> Result<DaemonConfig, ConfigError> {
        load::parse(text).map_err(|problems| ConfigError::Invalid {
            origin: origin.to_string(),
            problems,
        })
    }
}

/// One thing wrong in the settings file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    /// `network.subnet`, `listeners.http`, ...
    pub key: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render(origin, problems))]
    Invalid {
        origin: String,
        problems: Vec<Problem>,
    },
}

fn render(origin: &str, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{origin}:{}:{}: {}: {}", p.line, p.column, p.key, p.message))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests;
