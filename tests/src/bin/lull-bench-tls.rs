//! `lull-bench-tls [--smoke] [--app PATH] [--markdown PATH]`: the TLS benchmarks that
//! `cargo xtask bench tls` builds and runs (as root). Same machine, same run, same upstream, same
//! certificates: four instances of the fixture app as plain processes on loopback, and in front
//! of them three servers terminating TLS, each a process (tree) of its own with 2 threads or
//! workers:
//!
//! - lull: this program again (`lull-bench-tls serve-lull ...`), serving `lull_proxy::Proxy` as
//!   the daemon does: `tls::acceptor_for` a `CertStore`, 2 current-thread runtimes with a
//!   `SO_REUSEPORT` socket each (`Proxy::listen_tls_on_sockets`), mimalloc;
//! - nginx (`worker_processes 2`) and haproxy (`nbthread 2`), run in the foreground as children
//!   with their configs, pid and log files in a scratch dir.
//!
//! The certificates (one CA; a P-256 and an RSA-2048 leaf for `bench.local`) are made with the
//! `openssl` command in the scratch dir. Measurements:
//!
//! - server CPU per new connection, full and resumed TLS 1.3 handshakes: this program's own
//!   rustls client (one thread, a few connections at a time) makes connections that each do a
//!   handshake and one `GET /` with `Connection: close`; full handshakes with resumption off,
//!   resumed ones with a shared ticket store, each connection's `handshake_kind()` counted. The
//!   server's CPU time is read from `/proc/<pid>/task/<tid>/schedstat` of its process and its
//!   children before and after;
//! - HTTPS req/s on keep-alive connections: h2load over TLS, h2 (`-c50 -m10`) and HTTP/1.1
//!   (`--h1 -c50`).
//!
//! Targets are reported, never enforced: the program fails only when the harness does (or lull
//! does not resume sessions, which would make the resumed figures meaningless).

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use lull_proxy::config::ServiceConfig;
use lull_proxy::gate::NoCpuControl;
use lull_proxy::metrics::ProxyMetrics;
use lull_proxy::pool::{InstanceSpec, Pool};
use lull_proxy::server::{bind_reuse_port, spawn_runtimes};
use lull_proxy::tls::{self, CertStore, Certificate, CertificateFiles};
use lull_proxy::{Proxy, ProxyOptions, Route, RouteTable};
use lull_tests::bench_util::Report;
use lull_tests::forwarding;
use lull_tests::scratch::ScratchDir;
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, HandshakeKind, ProtocolVersion, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

/// The allocator `lull daemon` serves the proxy with (see the cli crate).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: lull-bench-tls [--smoke] [--app PATH] [--markdown PATH]";

/// The name the certificates are for, the SNI and the Host clients send.
const HOST: &str = "bench.local";
/// Upstream instances (fixture apps), the same for every server.
const INSTANCES: usize = 4;
/// Threads (lull's runtimes, haproxy's threads) or worker processes (nginx) of every server.
const SERVER_THREADS: usize = 2;
/// Connections the handshake client keeps in flight.
const HANDSHAKE_CONNS: usize = 4;
/// Keep-alive loads: connections, and streams per connection for h2.
const KEEPALIVE_CONNS: usize = 50;
const H2_STREAMS: usize = 10;
/// Longest wait for an app or a server to answer.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// Longest a handshake connection may take.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after a batch of connections its server's CPU time is read (the last closes).
const SETTLE: Duration = Duration::from_millis(20);
/// Below this share of resumed handshakes a resumed run does not count as one.
const MIN_RESUMED_SHARE: f64 = 0.95;

struct Args {
    smoke: bool,
    app: PathBuf,
    markdown: Option<PathBuf>,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Args> {
    let exe = std::env::current_exe().context("find this executable")?;
    let mut parsed = Args {
        smoke: false,
        app: exe.with_file_name("lull-fixture-app"),
        markdown: None,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--smoke" => parsed.smoke = true,
            "--app" => parsed.app = value("--app")?.into(),
            "--markdown" => parsed.markdown = Some(value("--markdown")?.into()),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(parsed)
}

/// Counts and durations of one run.
struct Plan {
    runs: usize,
    /// Connections per handshake measurement.
    handshakes: usize,
    /// Length of one keep-alive run.
    seconds: u64,
}

impl Plan {
    fn new(smoke: bool) -> Plan {
        if smoke {
            Plan {
                runs: 1,
                handshakes: 100,
                seconds: 1,
            }
        } else {
            Plan {
                runs: 3,
                handshakes: 2000,
                seconds: 5,
            }
        }
    }
}

fn main() -> ExitCode {
    lull_tests::bench_util::init_logging();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let result = if args.first().is_some_and(|a| a == "serve-lull") {
        args.remove(0);
        serve_lull(args)
    } else {
        parse_args(args).and_then(run)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lull-bench-tls: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the TLS benchmarks need root (the peers bind and run as root)");
    }
    if !args.app.is_file() {
        bail!(
            "fixture app {} not found (build it: cargo build --release -p lull-fixture-app)",
            args.app.display()
        );
    }
    lull_tests::bench_util::require_tools(&[
        ("h2load", "--version", "nghttp2-client"),
        ("nginx", "-v", "nginx"),
        ("haproxy", "-v", "haproxy"),
        ("openssl", "version", "openssl"),
    ])?;
    let plan = Plan::new(args.smoke);
    eprintln!(
        "lull-bench-tls: {} run",
        if args.smoke { "smoke" } else { "full" }
    );
    let scratch = ScratchDir::new("lull-bench-tls").context("create the scratch dir")?;
    let certs = make_certificates(scratch.path())?;
    let mut apps = Apps::default();
    for _ in 0..INSTANCES {
        apps.start(&args.app)?;
    }
    let upstreams = apps.addrs.clone();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the client's tokio runtime")?;
    let mut results = Results::default();
    for cert in &certs.leaves {
        let servers = Servers::start(scratch.path(), cert, &upstreams)?;
        let handshakes = measure_handshakes(&plan, &runtime, &certs, cert, &servers)?;
        results.handshakes.push((cert.kind, handshakes));
        if cert.kind == KeyKind::P256 {
            results.keepalive = Some(measure_keepalive(&plan, scratch.path(), &servers)?);
        }
        servers.check_alive()?;
    }
    apps.stop();

    let report = results.report(&plan);
    print!("{}", report.text());
    if let Some(path) = &args.markdown {
        fs::write(path, report.markdown()).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Certificates

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    P256,
    Rsa2048,
}

impl KeyKind {
    fn name(self) -> &'static str {
        match self {
            KeyKind::P256 => "P-256",
            KeyKind::Rsa2048 => "RSA-2048",
        }
    }

    fn stem(self) -> &'static str {
        match self {
            KeyKind::P256 => "p256",
            KeyKind::Rsa2048 => "rsa2048",
        }
    }

    /// `openssl genpkey` arguments for a key of this kind.
    fn genpkey_args(self) -> [&'static str; 4] {
        match self {
            KeyKind::P256 => ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            KeyKind::Rsa2048 => ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        }
    }
}

/// One leaf certificate, as every server is given it.
struct Leaf {
    kind: KeyKind,
    /// Leaf then CA, PEM.
    chain: PathBuf,
    /// PKCS#8 PEM.
    key: PathBuf,
    /// Chain then key, in one file (haproxy's `crt`).
    combined: PathBuf,
    /// The leaf's DER, to check that a server showed it.
    der: CertificateDer<'static>,
}

struct Certs {
    ca: CertificateDer<'static>,
    leaves: Vec<Leaf>,
}

/// A P-256 CA and a P-256 and an RSA-2048 leaf for [`HOST`] it signed, valid for two days.
fn make_certificates(scratch: &Path) -> Result<Certs> {
    let dir = scratch.join("certs");
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let openssl = |args: &[&str]| -> Result<()> {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .output()
            .context("run openssl")?;
        if !output.status.success() {
            bail!(
                "openssl {}: {}: {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    };
    let write = |name: &str, text: &str| -> Result<PathBuf> {
        let path = dir.join(name);
        fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    };
    write(
        "ca.cnf",
        "[req]\n\
         distinguished_name = dn\n\
         x509_extensions = ca\n\
         prompt = no\n\
         [dn]\n\
         CN = lull-bench-tls CA\n\
         [ca]\n\
         basicConstraints = critical,CA:TRUE\n\
         keyUsage = critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier = hash\n",
    )?;
    write(
        "leaf.cnf",
        &format!(
            "basicConstraints = critical,CA:FALSE\n\
             keyUsage = critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage = serverAuth\n\
             subjectAltName = DNS:{HOST}\n\
             authorityKeyIdentifier = keyid\n"
        ),
    )?;
    openssl(&[
        "req",
        "-x509",
        "-config",
        "ca.cnf",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
    ])?;
    let ca_pem = fs::read_to_string(dir.join("ca.pem")).context("read ca.pem")?;
    let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes()).context("parse ca.pem")?;
    let mut leaves = Vec::new();
    for (serial, kind) in [KeyKind::P256, KeyKind::Rsa2048].into_iter().enumerate() {
        let stem = kind.stem();
        let (key, csr, leaf) = (
            format!("{stem}.key"),
            format!("{stem}.csr"),
            format!("{stem}.leaf.pem"),
        );
        let mut genpkey = vec!["genpkey"];
        genpkey.extend(kind.genpkey_args());
        genpkey.extend(["-out", &key]);
        openssl(&genpkey)?;
        openssl(&[
            "req",
            "-new",
            "-key",
            &key,
            "-subj",
            &format!("/CN={HOST}"),
            "-out",
            &csr,
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            &(serial + 2).to_string(),
            "-days",
            "2",
            "-extfile",
            "leaf.cnf",
            "-out",
            &leaf,
        ])?;
        let leaf_pem =
            fs::read_to_string(dir.join(&leaf)).with_context(|| format!("read {leaf}"))?;
        let key_pem = fs::read_to_string(dir.join(&key)).with_context(|| format!("read {key}"))?;
        let der = CertificateDer::from_pem_slice(leaf_pem.as_bytes())
            .with_context(|| format!("parse {leaf}"))?;
        leaves.push(Leaf {
            kind,
            chain: write(&format!("{stem}.chain.pem"), &format!("{leaf_pem}{ca_pem}"))?,
            key: dir.join(&key),
            combined: write(
                &format!("{stem}.combined.pem"),
                &format!("{leaf_pem}{ca_pem}{key_pem}"),
            )?,
            der,
        });
    }
    Ok(Certs { ca, leaves })
}

// ---------------------------------------------------------------------------------------------
// The upstream: fixture apps

/// The fixture apps of this run, killed when dropped.
#[derive(Default)]
struct Apps {
    children: Vec<Child>,
    addrs: Vec<SocketAddr>,
}

impl Apps {
    fn start(&mut self, app: &Path) -> Result<()> {
        let port = lull_tests::bench_util::free_port()?;
        let mut command = Command::new(app);
        let mut child = lull_tests::bench_util::die_with_parent(&mut command)
            .env("PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start {}", app.display()))?;
        let stdout = child.stdout.take();
        self.children.push(child);
        let line = first_line(stdout, "the fixture app")?;
        if line.trim() != format!("listening on :{port}") {
            bail!("the fixture app printed {line:?}, not `listening on :{port}`");
        }
        self.addrs
            .push(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        Ok(())
    }

    fn stop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.clear();
    }
}

impl Drop for Apps {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The first line `stdout` prints, within the start deadline.
fn first_line(stdout: Option<ChildStdout>, what: &str) -> Result<String> {
    let stdout = stdout.with_context(|| format!("{what}'s stdout was not piped"))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        let _ = tx.send(read);
    });
    rx.recv_timeout(START_DEADLINE)
        .map_err(|_| anyhow!("{what} printed nothing in {START_DEADLINE:?}"))?
        .with_context(|| format!("read {what}'s output"))
}

// ---------------------------------------------------------------------------------------------
// lull, served by this program in a process of its own

/// `serve-lull --cert PATH --key PATH --upstream ADDR...`: lull's proxy terminating TLS with
/// that certificate (also the default, for clients sending no SNI) on a loopback port, all
/// upstreams in one pool at [`HOST`]. Prints `listening on ADDR`; serves until stdin closes.
fn serve_lull(args: Vec<String>) -> Result<()> {
    let usage = "usage: lull-bench-tls serve-lull --cert PATH --key PATH --upstream ADDR...";
    let (mut cert, mut key, mut upstreams) = (None, None, Vec::new());
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .with_context(|| format!("{name} needs a value\n{usage}"))
        };
        match arg.as_str() {
            "--cert" => cert = Some(PathBuf::from(value("--cert")?)),
            "--key" => key = Some(PathBuf::from(value("--key")?)),
            "--upstream" => upstreams.push(
                value("--upstream")?
                    .parse::<SocketAddr>()
                    .with_context(|| format!("--upstream takes an address\n{usage}"))?,
            ),
            other => bail!("unknown argument {other:?}\n{usage}"),
        }
    }
    let (Some(cert), Some(key)) = (cert, key) else {
        bail!("--cert and --key are required\n{usage}");
    };
    if upstreams.is_empty() {
        bail!("no --upstream\n{usage}");
    }

    // Pools and health checks; the listeners run on the runtimes of `spawn_runtimes`.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("lull-bench")
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let _entered = runtime.enter();
    let (events_tx, _events) = tokio::sync::mpsc::unbounded_channel();
    let pool = Pool::with_metrics(
        "bench",
        Arc::new(ServiceConfig::default()),
        events_tx,
        Arc::new(ProxyMetrics::new()),
    );
    for (i, addr) in upstreams.iter().enumerate() {
        let id = format!("bench-{i}");
        pool.add_instance(InstanceSpec {
            id: id.clone(),
            addr: *addr,
            cpu: Arc::new(NoCpuControl),
        });
        pool.set_healthy(&id, true, "bench");
    }
    let routes = Arc::new(RouteTable::new());
    routes.insert(HOST, Route::new(pool, "rev-1"));
    let proxy = Proxy::new(routes, ProxyOptions::default());

    let certificate = Certificate::load(&CertificateFiles::new(&cert, &key), chrono::Utc::now())
        .with_context(|| format!("load {}", cert.display()))?;
    let store = Arc::new(CertStore::new(certificate.key.clone()));
    store.replace(vec![certificate]);
    let acceptor = tls::acceptor_for(store).context("the TLS configuration")?;
    let sockets = bind_reuse_port(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), SERVER_THREADS)
        .context("bind the HTTPS sockets")?;
    let runtimes =
        spawn_runtimes(SERVER_THREADS, "lull-proxy").context("start the proxy's threads")?;
    let addr = proxy
        .listen_tls_on_sockets(sockets, &runtimes, acceptor)
        .context("start lull's HTTPS listener")?;
    println!("listening on {addr}");
    // Until the driver closes our stdin (or dies).
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    runtime.block_on(proxy.shutdown(Duration::from_secs(1)));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The servers

struct Server {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
    /// Where its stderr or error log is, for messages.
    log: PathBuf,
}

/// lull, nginx and haproxy serving one certificate; stopped when dropped.
struct Servers {
    servers: Vec<Server>,
}

impl Servers {
    fn start(scratch: &Path, leaf: &Leaf, upstreams: &[SocketAddr]) -> Result<Servers> {
        let mut servers = Servers {
            servers: Vec::new(),
        };
        let dir = scratch.join(leaf.kind.stem());
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        servers.start_lull(&dir, leaf, upstreams)?;
        servers.start_nginx(&dir, leaf, upstreams)?;
        servers.start_haproxy(&dir, leaf, upstreams)?;
        for server in &servers.servers {
            wait_until_answering(server.addr).with_context(|| {
                format!(
                    "{} did not answer (see {})",
                    server.name,
                    server.log.display()
                )
            })?;
            check_forwarding(server.name, server.addr)?;
        }
        Ok(servers)
    }

    fn start_lull(&mut self, dir: &Path, leaf: &Leaf, upstreams: &[SocketAddr]) -> Result<()> {
        let exe = std::env::current_exe().context("find this executable")?;
        let log = dir.join("lull.log");
        let mut command = Command::new(exe);
        lull_tests::bench_util::die_with_parent(&mut command);
        command
            .arg("serve-lull")
            .arg("--cert")
            .arg(&leaf.chain)
            .arg("--key")
            .arg(&leaf.key);
        for upstream in upstreams {
            command.arg("--upstream").arg(upstream.to_string());
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("start lull-bench-tls serve-lull")?;
        let stdout = child.stdout.take();
        self.servers.push(Server {
            name: "lull",
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            log: log.clone(),
        });
        let line = first_line(stdout, "lull")
            .with_context(|| format!("lull did not start (see {})", log.display()))?;
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("lull printed {line:?}, not `listening on ADDR`"))?;
        if let Some(server) = self.servers.last_mut() {
            server.addr = addr;
        }
        Ok(())
    }

    fn start_nginx(&mut self, dir: &Path, leaf: &Leaf, upstreams: &[SocketAddr]) -> Result<()> {
        let dir = dir.join("nginx");
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let port = lull_tests::bench_util::free_port()?;
        let servers: String = upstreams
            .iter()
            .map(|a| format!("    server {a};\n"))
            .collect();
        let d = dir.display();
        let config = format!(
            "worker_processes {SERVER_THREADS};\n\
             user root;\n\
             daemon off;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
             {forwarding_http}\
             \x20 access_log off;\n\
             \x20 client_body_temp_path {d}/body;\n\
             \x20 proxy_temp_path {d}/proxy;\n\
             \x20 fastcgi_temp_path {d}/fastcgi;\n\
             \x20 uwsgi_temp_path {d}/uwsgi;\n\
             \x20 scgi_temp_path {d}/scgi;\n\
             \x20 keepalive_requests 1000000;\n\
             \x20 upstream app {{\n\
             \x20   least_conn;\n\
             {servers}\
             \x20   keepalive 64;\n\
             \x20   keepalive_requests 1000000;\n\
             \x20 }}\n\
             \x20 server {{\n\
             \x20   listen 127.0.0.1:{port} ssl http2;\n\
             \x20   ssl_certificate {chain};\n\
             \x20   ssl_certificate_key {key};\n\
             \x20   ssl_protocols TLSv1.2 TLSv1.3;\n\
             \x20   ssl_session_cache shared:bench:10m;\n\
             \x20   ssl_session_tickets on;\n\
             \x20   location / {{\n\
             \x20     proxy_pass http://app;\n\
             \x20     proxy_http_version 1.1;\n\
             {forwarding_location}\
             \x20   }}\n\
             \x20 }}\n\
             }}\n",
            chain = leaf.chain.display(),
            key = leaf.key.display(),
            forwarding_http = forwarding::NGINX_HTTP,
            forwarding_location = forwarding::NGINX_LOCATION,
        );
        let path = dir.join("nginx.conf");
        fs::write(&path, config).with_context(|| format!("write {}", path.display()))?;
        let mut command = Command::new("nginx");
        let child = lull_tests::bench_util::die_with_parent(&mut command)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("stderr.log"))?)
            .spawn()
            .context("start nginx")?;
        self.servers.push(Server {
            name: "nginx",
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            log: dir.join("error.log"),
        });
        Ok(())
    }

    fn start_haproxy(&mut self, dir: &Path, leaf: &Leaf, upstreams: &[SocketAddr]) -> Result<()> {
        let dir = dir.join("haproxy");
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let port = lull_tests::bench_util::free_port()?;
        let servers: String = upstreams
            .iter()
            .enumerate()
            .map(|(i, a)| format!("  server app{i} {a}\n"))
            .collect();
        let config = format!(
            "global\n\
             \x20 nbthread {SERVER_THREADS}\n\
             \x20 maxconn 4096\n\
             \x20 pidfile {pid}\n\
             \x20 ssl-default-bind-options ssl-min-ver TLSv1.2\n\
             defaults\n\
             \x20 mode http\n\
             \x20 timeout connect 5s\n\
             \x20 timeout client 60s\n\
             \x20 timeout server 60s\n\
             \x20 http-reuse always\n\
             frontend bench\n\
             \x20 bind 127.0.0.1:{port} ssl crt {crt} alpn h2,http/1.1\n\
             {forwarding_frontend}\
             \x20 default_backend app\n\
             backend app\n\
             \x20 balance leastconn\n\
             {servers}",
            pid = dir.join("haproxy.pid").display(),
            crt = leaf.combined.display(),
            forwarding_frontend = forwarding::HAPROXY_FRONTEND,
        );
        let path = dir.join("haproxy.cfg");
        fs::write(&path, config).with_context(|| format!("write {}", path.display()))?;
        let mut command = Command::new("haproxy");
        let child = lull_tests::bench_util::die_with_parent(&mut command)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("stderr.log"))?)
            .spawn()
            .context("start haproxy")?;
        self.servers.push(Server {
            name: "haproxy",
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            log: dir.join("stderr.log"),
        });
        Ok(())
    }

    /// An error if a server died during the run (its numbers would be wrong).
    fn check_alive(mut self) -> Result<()> {
        for server in &mut self.servers {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "{} exited during the run: {status} (see {})",
                    server.name,
                    server.log.display()
                );
            }
        }
        Ok(())
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for server in &mut self.servers {
            // lull serves until its stdin closes.
            drop(server.child.stdin.take());
            stop_gracefully(server.name, &mut server.child);
        }
    }
}

/// SIGTERM, then SIGKILL if it has not exited in 5 s. Not SIGKILL at once: nginx's workers
/// outlive a killed master; on SIGTERM the master stops them and exits.
fn stop_gracefully(name: &str, child: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill with a pid we spawned and have not yet reaped (so it cannot have been
        // reused) and a valid signal number; it touches no memory.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("lull-bench-tls: {name} did not stop on SIGTERM in 5 s, killing it");
    let _ = child.kill();
    let _ = child.wait();
}

/// CPU time used so far by a process, its children and all their threads: the scheduler's run
/// time of each (`/proc/<pid>/task/<tid>/schedstat`, in ns), summed.
fn tree_cpu(root: u32) -> Duration {
    let tasks_ns = |pid: u32| -> u64 {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return 0;
        };
        tasks
            .flatten()
            .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    };
    let mut pids = vec![root];
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if parent_pid(pid) == Some(root) {
                pids.push(pid);
            }
        }
    }
    Duration::from_nanos(pids.into_iter().map(tasks_ns).sum())
}

/// The parent of `pid`, from `/proc/<pid>/stat` (the field after the state, which follows the
/// command name in parentheses).
fn parent_pid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Retries one HTTPS `GET /` (no verification: only whether it serves) until it answers 200.
fn wait_until_answering(addr: SocketAddr) -> Result<()> {
    let started = Instant::now();
    loop {
        let output = Command::new("h2load")
            .args(["--h1", "-n1", "-c1"])
            .args(["-H", &format!(":authority: {HOST}")])
            .arg(format!("https://{addr}/"))
            .output()
            .context("run h2load")?;
        let text = String::from_utf8_lossy(&output.stdout);
        if output.status.success() && text.contains("status codes: 1 2xx") {
            return Ok(());
        }
        if started.elapsed() > START_DEADLINE {
            bail!("{addr} did not answer GET / in {START_DEADLINE:?}: {text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The application protocol h2load reports. Its threads print progress lines while the main
/// one prints this, so another thread's words can come between the label and the value: the
/// first protocol name after the label (progress lines never contain one).
fn negotiated(text: &str) -> Option<&str> {
    let (_, after) = text.split_once("Application protocol:")?;
    after
        .split_whitespace()
        .find(|word| ["h2", "http/1.1", "h2c", "http/1.0"].contains(word))
}

/// What the fixture app received from `name` (curl, no verification: only the headers matter),
/// checked by [`forwarding::check`].
fn check_forwarding(name: &str, addr: SocketAddr) -> Result<()> {
    let output = Command::new("curl")
        .args(["-sSk", "--http1.1", "--max-time", "5", "-H"])
        .arg(format!("Host: {HOST}"))
        .arg(format!("https://{addr}/headers"))
        .output()
        .context("run curl")?;
    if !output.status.success() {
        bail!(
            "GET /headers through {name}: curl {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    forwarding::check(name, HOST, &String::from_utf8_lossy(&output.stdout))
}

// ---------------------------------------------------------------------------------------------
// Handshakes

/// What one batch of new connections did.
#[derive(Debug, Clone)]
struct HandshakeRun {
    connections: usize,
    resumed: usize,
    /// The server's CPU time over the batch divided by the connections.
    cpu_per_connection: Duration,
    /// Connections per second the client made.
    rate: f64,
    /// The cipher suite and key exchange group of the last connection.
    negotiated: Option<String>,
}

impl HandshakeRun {
    fn resumed_share(&self) -> f64 {
        self.resumed as f64 / self.connections.max(1) as f64
    }
}

/// Per server (in [`Servers`] order), the runs of full and of resumed handshakes.
struct HandshakeResults {
    names: Vec<&'static str>,
    full: Vec<Vec<HandshakeRun>>,
    resumed: Vec<Vec<HandshakeRun>>,
}

fn client_config(ca: &CertificateDer<'static>, resume: bool) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).context("add the CA to the roots")?;
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("a TLS 1.3 client")?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = if resume {
        Resumption::in_memory_sessions(256)
    } else {
        Resumption::disabled()
    };
    Ok(Arc::new(config))
}

fn measure_handshakes(
    plan: &Plan,
    runtime: &tokio::runtime::Runtime,
    certs: &Certs,
    leaf: &Leaf,
    servers: &Servers,
) -> Result<HandshakeResults> {
    let n = servers.servers.len();
    let mut results = HandshakeResults {
        names: servers.servers.iter().map(|s| s.name).collect(),
        full: vec![Vec::new(); n],
        resumed: vec![Vec::new(); n],
    };
    // One ticket store per server, kept over the runs (as a browser keeps its own).
    let resuming: Vec<Arc<ClientConfig>> = (0..n)
        .map(|_| client_config(&certs.ca, true))
        .collect::<Result<_>>()?;
    let fresh = client_config(&certs.ca, false)?;
    let warmup = (plan.handshakes / 10).max(HANDSHAKE_CONNS * 4);
    for (i, server) in servers.servers.iter().enumerate() {
        // Warm the server up and fill the ticket store.
        runtime
            .block_on(connections(
                server.addr,
                resuming[i].clone(),
                &leaf.der,
                warmup,
            ))
            .with_context(|| format!("warm-up connections to {}", server.name))?;
    }
    for run in 0..plan.runs {
        // Interleaved: run r of every server, then run r+1.
        for (i, server) in servers.servers.iter().enumerate() {
            for (resume, config) in [(false, &fresh), (true, &resuming[i])] {
                let before = tree_cpu(server.child.id());
                let started = Instant::now();
                let (resumed, negotiated) = runtime
                    .block_on(connections(
                        server.addr,
                        config.clone(),
                        &leaf.der,
                        plan.handshakes,
                    ))
                    .with_context(|| format!("connections to {}", server.name))?;
                let elapsed = started.elapsed();
                // The server's side of the last closes.
                std::thread::sleep(SETTLE);
                let used = tree_cpu(server.child.id()).saturating_sub(before);
                let handshake = HandshakeRun {
                    connections: plan.handshakes,
                    resumed,
                    cpu_per_connection: used / u32::try_from(plan.handshakes).unwrap_or(u32::MAX),
                    rate: plan.handshakes as f64 / elapsed.as_secs_f64(),
                    negotiated,
                };
                eprintln!(
                    "{} {} run {}/{}: {:<8} {:>7.1} µs server CPU per connection, {} of {} resumed, {:.0} connections/s",
                    leaf.kind.name(),
                    if resume { "resumed" } else { "full" },
                    run + 1,
                    plan.runs,
                    server.name,
                    us(handshake.cpu_per_connection),
                    handshake.resumed,
                    handshake.connections,
                    handshake.rate
                );
                if !resume && handshake.resumed > 0 {
                    bail!(
                        "{}: {} connections resumed with resumption off",
                        server.name,
                        handshake.resumed
                    );
                }
                if resume && server.name == "lull" && handshake.resumed_share() < MIN_RESUMED_SHARE
                {
                    bail!(
                        "lull resumed only {} of {} TLS 1.3 sessions with tickets on ({} certificate); its resumed-handshake figures would be full handshakes",
                        handshake.resumed,
                        handshake.connections,
                        leaf.kind.name()
                    );
                }
                if resume {
                    results.resumed[i].push(handshake);
                } else {
                    results.full[i].push(handshake);
                }
            }
        }
    }
    Ok(results)
}

/// `count` new connections to `addr`, [`HANDSHAKE_CONNS`] at a time, each a TLS 1.3 handshake
/// and one `GET /` with `Connection: close`. Returns how many resumed a session, and the cipher
/// suite and key exchange group of one. Fails on any error, a status other than 200, or a certificate that is not
/// `leaf` on a full handshake.
async fn connections(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    leaf: &CertificateDer<'static>,
    count: usize,
) -> Result<(usize, Option<String>)> {
    let connector = TlsConnector::from(config);
    let name = ServerName::try_from(HOST).context("the server name")?;
    let remaining = Arc::new(AtomicUsize::new(count));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..HANDSHAKE_CONNS.min(count) {
        let (connector, name, remaining, leaf) = (
            connector.clone(),
            name.clone(),
            remaining.clone(),
            leaf.clone(),
        );
        tasks.spawn(async move {
            let mut resumed = 0;
            let mut negotiated = None;
            while remaining
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                let one = tokio::time::timeout(
                    CONNECTION_TIMEOUT,
                    one_connection(addr, &connector, name.clone(), &leaf),
                )
                .await
                .map_err(|_| anyhow!("a connection took longer than {CONNECTION_TIMEOUT:?}"))??;
                resumed += usize::from(one.0);
                negotiated = Some(one.1);
            }
            Ok::<_, anyhow::Error>((resumed, negotiated))
        });
    }
    let mut resumed = 0;
    let mut negotiated = None;
    while let Some(joined) = tasks.join_next().await {
        let (r, n) = joined.context("a client task panicked")??;
        resumed += r;
        negotiated = negotiated.or(n);
    }
    Ok((resumed, negotiated))
}

/// One connection: whether it resumed, and its cipher suite and key exchange group.
async fn one_connection(
    addr: SocketAddr,
    connector: &TlsConnector,
    name: ServerName<'static>,
    leaf: &CertificateDer<'static>,
) -> Result<(bool, String)> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    tcp.set_nodelay(true)?;
    let mut stream = connector
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS handshake with {addr}"))?;
    let (_, conn) = stream.get_ref();
    if conn.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
        bail!("{addr} negotiated {:?}", conn.protocol_version());
    }
    let resumed = match conn.handshake_kind() {
        Some(HandshakeKind::Resumed) => true,
        Some(HandshakeKind::Full | HandshakeKind::FullWithHelloRetryRequest) => {
            if conn.peer_certificates().and_then(|c| c.first()) != Some(leaf) {
                bail!("{addr} did not show the benchmark's certificate");
            }
            false
        }
        None => bail!("{addr}: the handshake did not complete"),
    };
    let negotiated = format!(
        "{:?} {:?}",
        conn.negotiated_cipher_suite()
            .context("no cipher suite negotiated")?
            .suite(),
        conn.negotiated_key_exchange_group()
            .context("no key exchange group negotiated")?
            .name()
    );
    stream
        .write_all(
            format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .with_context(|| format!("send to {addr}"))?;
    let status = read_response(&mut stream)
        .await
        .with_context(|| format!("read the response from {addr}"))?;
    if status != 200 {
        bail!("{addr} answered {status} to GET /");
    }
    Ok((resumed, negotiated))
}

/// Reads one response with a `Content-Length` body; its status.
async fn read_response(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Result<u16> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("the connection closed before the response head");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status line: {head:?}"))?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .with_context(|| format!("no Content-Length: {head:?}"))?;
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("the connection closed inside the body");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(status)
}

// ---------------------------------------------------------------------------------------------
// Keep-alive req/s

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    H1,
    H2,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::H1 => "HTTP/1.1",
            Protocol::H2 => "h2",
        }
    }
}

/// One h2load run's figures.
#[derive(Debug, Clone, Copy)]
struct Load {
    rps: f64,
    /// Requests answered 2xx.
    requests: u64,
    /// Failed, errored and timed-out requests, and answers other than 2xx.
    errors: u64,
    /// The server's CPU time over the run divided by the requests.
    cpu_per_request: Duration,
}

/// Per protocol, per server (in [`Servers`] order), the runs.
struct KeepaliveResults {
    names: Vec<&'static str>,
    loads: Vec<(Protocol, Vec<Vec<Load>>)>,
}

fn measure_keepalive(plan: &Plan, scratch: &Path, servers: &Servers) -> Result<KeepaliveResults> {
    let mut results = KeepaliveResults {
        names: servers.servers.iter().map(|s| s.name).collect(),
        loads: Vec::new(),
    };
    for protocol in [Protocol::H1, Protocol::H2] {
        let mut runs = vec![Vec::new(); servers.servers.len()];
        for run in 0..plan.runs {
            for (i, server) in servers.servers.iter().enumerate() {
                let before = tree_cpu(server.child.id());
                let mut load = h2load(protocol, server.addr, plan.seconds, scratch)
                    .with_context(|| format!("h2load against {}", server.name))?;
                let used = tree_cpu(server.child.id()).saturating_sub(before);
                load.cpu_per_request =
                    used / u32::try_from(load.requests.max(1)).unwrap_or(u32::MAX);
                eprintln!(
                    "{} keep-alive run {}/{}: {:<8} {:>9.0} req/s, {:.1} µs server CPU per request{}",
                    protocol.name(),
                    run + 1,
                    plan.runs,
                    server.name,
                    load.rps,
                    us(load.cpu_per_request),
                    if load.errors > 0 {
                        format!(" ({} errors)", load.errors)
                    } else {
                        String::new()
                    }
                );
                runs[i].push(load);
            }
        }
        results.loads.push((protocol, runs));
    }
    Ok(results)
}

/// `h2load -c50 -t2 -D<s>` over TLS: h2 with 10 streams per connection, or `--h1` (one request
/// at a time per connection).
fn h2load(protocol: Protocol, addr: SocketAddr, seconds: u64, scratch: &Path) -> Result<Load> {
    let mut command = Command::new("h2load");
    command
        .arg(format!("-c{KEEPALIVE_CONNS}"))
        .arg("-t2")
        .arg(format!("-D{seconds}"))
        .args(["-H", &format!(":authority: {HOST}")]);
    match protocol {
        Protocol::H1 => command.args(["--h1", "-m1"]),
        Protocol::H2 => command.arg(format!("-m{H2_STREAMS}")),
    };
    let output = command
        .arg(format!("https://{addr}/"))
        .current_dir(scratch)
        .output()
        .context("run h2load")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "h2load failed ({}): {text}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let load = parse_h2load(&text).with_context(|| format!("parse h2load's output: {text}"))?;
    let expected = match protocol {
        Protocol::H1 => "http/1.1",
        Protocol::H2 => "h2",
    };
    if negotiated(&text) != Some(expected) {
        bail!("h2load did not negotiate {expected}: {text}");
    }
    Ok(load)
}

fn parse_h2load(text: &str) -> Result<Load> {
    let mut rps = f64::NAN;
    let mut requests = None;
    let mut errors = 0u64;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // finished in 5.00s, 12345.67 req/s, 1.23MB/s
            rps = rest
                .split(", ")
                .nth(1)
                .and_then(|f| f.strip_suffix(" req/s"))
                .context("no req/s on the `finished in` line")?
                .parse()?;
        }
        if let Some(rest) = line.strip_prefix("requests: ") {
            // requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout
            for field in rest.split(", ") {
                if let Some(n) = field
                    .strip_suffix(" failed")
                    .or_else(|| field.strip_suffix(" errored"))
                    .or_else(|| field.strip_suffix(" timeout"))
                {
                    errors += n.trim().parse::<u64>()?;
                }
            }
        }
        if let Some(rest) = line.strip_prefix("status codes: ") {
            // status codes: N 2xx, N 3xx, N 4xx, N 5xx
            for field in rest.split(", ") {
                let (n, class) = field
                    .trim()
                    .split_once(' ')
                    .with_context(|| format!("status count {field:?}"))?;
                let n: u64 = n.parse()?;
                if class == "2xx" {
                    requests = Some(n);
                } else {
                    errors += n;
                }
            }
        }
    }
    let Some(requests) = requests else {
        bail!("no `status codes:` line");
    };
    if rps.is_nan() {
        bail!("no `finished in` line");
    }
    Ok(Load {
        rps,
        requests,
        errors,
        cpu_per_request: Duration::ZERO,
    })
}

// ---------------------------------------------------------------------------------------------
// The report

#[derive(Default)]
struct Results {
    handshakes: Vec<(KeyKind, HandshakeResults)>,
    keepalive: Option<KeepaliveResults>,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The middle value of `values` (the upper one of an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

fn join(values: impl IntoIterator<Item = f64>, decimals: usize) -> String {
    values
        .into_iter()
        .map(|v| format!("{v:.decimals$}"))
        .collect::<Vec<_>>()
        .join("/")
}

fn met_text(met: Option<bool>) -> String {
    match met {
        Some(true) => "yes".into(),
        Some(false) => "NO".into(),
        None => "-".into(),
    }
}

impl Results {
    fn report(&self, plan: &Plan) -> Report {
        let mut report = Report::new(&[
            "measurement",
            "lull",
            "nginx",
            "haproxy",
            "lull / better peer",
            "target",
            "met",
        ]);
        for (kind, results) in &self.handshakes {
            for (label, runs) in [("full", &results.full), ("resumed", &results.resumed)] {
                // A peer that did not resume has no resumed figure.
                let medians: Vec<Option<f64>> = runs
                    .iter()
                    .map(|r| {
                        let resumed_ok = label == "full"
                            || r.iter().all(|h| h.resumed_share() >= MIN_RESUMED_SHARE);
                        (!r.is_empty() && resumed_ok).then(|| {
                            median(
                                &r.iter()
                                    .map(|h| us(h.cpu_per_connection))
                                    .collect::<Vec<_>>(),
                            )
                        })
                    })
                    .collect();
                let cells: Vec<String> = medians
                    .iter()
                    .zip(runs)
                    .map(|(m, r)| match m {
                        Some(m) => format!("{m:.0} µs"),
                        None => format!(
                            "not resumed ({} of {})",
                            r.iter().map(|h| h.resumed).sum::<usize>(),
                            r.iter().map(|h| h.connections).sum::<usize>()
                        ),
                    })
                    .collect();
                let better = medians[1..].iter().flatten().copied().reduce(f64::min);
                let (ratio, met) = match (medians[0], better) {
                    (Some(lull), Some(peer)) if peer > 0.0 => {
                        let ratio = lull / peer;
                        (format!("{ratio:.2}x"), Some(ratio <= 1.1))
                    }
                    _ => ("-".into(), None),
                };
                let mut row = vec![format!(
                    "{} {label} handshake: server CPU per connection",
                    kind.name()
                )];
                row.extend(cells);
                row.extend([ratio, "≤ 1.1x".into(), met_text(met)]);
                report.row(row, met);
                report.detail(format!(
                    "{} {label}: server CPU µs per connection of each run: {}; connections/s: {}; resumed: {}; cipher suite and key exchange: {}",
                    kind.name(),
                    self.per_server(&results.names, runs, |h| join(h.iter().map(|h| us(h.cpu_per_connection)), 0)),
                    self.per_server(&results.names, runs, |h| join(h.iter().map(|h| h.rate), 0)),
                    self.per_server(&results.names, runs, |h| {
                        format!(
                            "{} of {}",
                            h.iter().map(|h| h.resumed).sum::<usize>(),
                            h.iter().map(|h| h.connections).sum::<usize>()
                        )
                    }),
                    self.per_server(&results.names, runs, |h| {
                        h.last()
                            .and_then(|h| h.negotiated.clone())
                            .unwrap_or_else(|| "-".into())
                    }),
                ));
            }
        }
        if let Some(keepalive) = &self.keepalive {
            let mut cpu_rows = Vec::new();
            for (protocol, runs) in &keepalive.loads {
                let medians: Vec<Option<f64>> = runs
                    .iter()
                    .map(|r| {
                        (!r.is_empty())
                            .then(|| median(&r.iter().map(|l| l.rps).collect::<Vec<_>>()))
                    })
                    .collect();
                let better = medians[1..].iter().flatten().copied().reduce(f64::max);
                let (ratio, met) = match (medians[0], better) {
                    (Some(lull), Some(peer)) if peer > 0.0 => {
                        let ratio = lull / peer;
                        (format!("{ratio:.2}x"), Some(ratio >= 1.0))
                    }
                    _ => ("-".into(), None),
                };
                let load = match protocol {
                    Protocol::H1 => format!("c={KEEPALIVE_CONNS}"),
                    Protocol::H2 => format!("c={KEEPALIVE_CONNS} m={H2_STREAMS}"),
                };
                let mut row = vec![format!(
                    "HTTPS {} keep-alive req/s ({load})",
                    protocol.name()
                )];
                row.extend(
                    medians
                        .iter()
                        .map(|m| m.map_or_else(|| "-".into(), |m| format!("{m:.0}"))),
                );
                row.extend([ratio, "≥ 1.0x".into(), met_text(met)]);
                report.row(row, met);
                let mut cpu_row = vec![format!(
                    "HTTPS {} keep-alive ({load}): server CPU per request",
                    protocol.name()
                )];
                cpu_row.extend(runs.iter().map(|r| {
                    let m = median(&r.iter().map(|l| us(l.cpu_per_request)).collect::<Vec<_>>());
                    format!("{m:.1} µs")
                }));
                cpu_rows.push(cpu_row);
                let errors: u64 = runs.iter().flatten().map(|l| l.errors).sum();
                report.detail(format!(
                    "HTTPS {} keep-alive ({load}, h2load -t2 -D{}): req/s of each run: {}; server CPU µs per request: {}{}",
                    protocol.name(),
                    plan.seconds,
                    self.per_server(&keepalive.names, runs, |l| join(l.iter().map(|l| l.rps), 0)),
                    self.per_server(&keepalive.names, runs, |l| join(l.iter().map(|l| us(l.cpu_per_request)), 1)),
                    if errors > 0 {
                        format!("; {errors} failed requests in all")
                    } else {
                        String::new()
                    }
                ));
            }
            report.extra.push((
                "Server CPU per request on keep-alive connections (no target; medians):".into(),
                vec![
                    "load".into(),
                    "lull".into(),
                    "nginx".into(),
                    "haproxy".into(),
                ],
                cpu_rows,
            ));
        }
        report.detail(format!(
            "servers: each a process tree of its own with {SERVER_THREADS} threads or workers, terminating TLS with the same certificate chain (leaf + CA) and key on 127.0.0.1 and proxying to the same {INSTANCES} fixture apps (release build, std-only HTTP/1.1, `GET /`) over keep-alive upstream connections. lull: `lull-bench-tls serve-lull`, lull_proxy::Proxy as the daemon serves HTTPS (tls::acceptor_for a CertStore holding the certificate, also as its default for clients without SNI; {SERVER_THREADS} current-thread runtimes with a SO_REUSEPORT socket each, mimalloc; rustls with the aws-lc-rs provider, tickets from rustls' ticketer plus a session cache); nginx {}: worker_processes {SERVER_THREADS}, listen ssl http2, ssl_session_cache shared 10m, ssl_session_tickets on, upstream least_conn keepalive 64; haproxy {}: nbthread {SERVER_THREADS}, bind ssl crt alpn h2,http/1.1 (tickets and its session cache by default), balance leastconn, http-reuse always; both with {}; all three send the app the same request: the client's Host and X-Forwarded-For/-Proto/-Host, Forwarded and X-Request-Id added (the peers' config fragments in tests/src/forwarding.rs), checked through the app's /headers before the run",
            nginx_version(),
            haproxy_version(),
            openssl_version()
        ));
        report.detail(format!(
            "handshakes: TLS 1.3 only (the rustls client offers X25519 first: ring has X25519, P-256, P-384), certificates from one P-256 CA; this program's rustls client (ring, verifying the chain against the CA, ALPN http/1.1) on one thread keeps {HANDSHAKE_CONNS} connections in flight, each a TCP connect, a handshake, one `GET /` with `Connection: close` and its response; full: resumption off in the client; resumed: the client's ticket store (one per server, kept over the runs, filled by {} warm-up connections) offers a ticket each time, every connection's handshake_kind() counted (a run under {:.0} % resumed gives no resumed figure); {} connections per run, {} runs interleaved between the servers, medians. Server CPU per connection = the server's CPU time over the run (the scheduler's run time of every thread of the process and its children, /proc/<pid>/task/<tid>/schedstat) / connections; it includes the TCP accept, one proxied request and the close, the same for every server (see the keep-alive CPU per request for that share)",
            (plan.handshakes / 10).max(HANDSHAKE_CONNS * 4),
            MIN_RESUMED_SHARE * 100.0,
            plan.handshakes,
            plan.runs
        ));
        report
    }

    /// `lull X; nginx Y; haproxy Z` with `text` of each server's runs.
    fn per_server<T>(
        &self,
        names: &[&str],
        runs: &[Vec<T>],
        text: impl Fn(&[T]) -> String,
    ) -> String {
        names
            .iter()
            .zip(runs)
            .map(|(name, r)| format!("{name} {}", text(r)))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn nginx_version() -> String {
    // nginx prints its version on stderr.
    Command::new("nginx")
        .arg("-v")
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .replace("nginx version: ", "")
        })
        .unwrap_or_else(|| "unknown".into())
}

fn haproxy_version() -> String {
    Command::new("haproxy")
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(2)
                .map(|v| format!("HAProxy {v}"))
        })
        .unwrap_or_else(|| "unknown".into())
}

fn openssl_version() -> String {
    Command::new("openssl")
        .arg("version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2load_output_is_parsed() {
        let text = "finished in 1.00s, 20000.00 req/s, 1.00MB/s\nrequests: 20000 total, 20000 started, 20000 done, 19997 succeeded, 2 failed, 1 errored, 0 timeout\nstatus codes: 19990 2xx, 0 3xx, 0 4xx, 7 5xx\n";
        let load = parse_h2load(text).unwrap();
        assert_eq!(load.rps, 20000.0);
        assert_eq!(load.requests, 19990);
        assert_eq!(load.errors, 10);
        assert!(parse_h2load("finished in 1.00s, 1.00 req/s, 1MB/s\n").is_err());
        assert!(parse_h2load("status codes: 1 2xx, 0 3xx, 0 4xx, 0 5xx\n").is_err());
    }

    #[test]
    fn negotiated_protocol_survives_interleaved_progress_lines() {
        assert_eq!(
            negotiated("Cipher: X\nApplication protocol: h2\nfinished in 1s"),
            Some("h2")
        );
        // Seen in a run: another thread's line split the label from its value.
        let split = "Warm-up phase is over for thread #1Application protocol: .\n\
                     Main benchmark duration is started for thread #1.\nhttp/1.1\n";
        assert_eq!(negotiated(split), Some("http/1.1"));
        assert_eq!(negotiated("finished in 1s"), None);
    }

    #[test]
    fn median_is_the_middle_value() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[5.0]), 5.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn args_parse_and_refuse_unknown_ones() {
        let args = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let parsed =
            parse_args(args(&["--smoke", "--app", "/x/app", "--markdown", "o.md"])).unwrap();
        assert!(parsed.smoke);
        assert_eq!(parsed.app, PathBuf::from("/x/app"));
        assert_eq!(parsed.markdown, Some(PathBuf::from("o.md")));
        assert!(parse_args(args(&["--fast"])).is_err());
    }

    #[test]
    fn this_process_has_cpu_time() {
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(5) {}
        assert!(tree_cpu(std::process::id()) > Duration::ZERO);
        assert_eq!(
            parent_pid(std::process::id()),
            Some(std::os::unix::process::parent_id())
        );
    }
}
