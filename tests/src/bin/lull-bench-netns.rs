//! `lull-bench-netns [--smoke] [--app PATH] [--markdown PATH]`: the network benchmarks that
//! `cargo xtask bench netns` builds and runs (as root). Everything runs on a bridge and a /22 of
//! this run's own, and every figure is measured side by side with its peer in the same run:
//!
//! - wiring one instance's network: the lull path (network namespace, address, veth pair on the
//!   bridge; see [`lull_attach`]) against the same end state made with `ip` commands the way
//!   CNI's bridge plugin makes it, interleaved; and the teardown of each;
//! - throughput: the host downloading from the fixture app's `/bytes` endpoint over the veth
//!   pair into a wired namespace, against the same download over the host's loopback.
//!
//! Targets are reported, never enforced: the program fails only when the harness does, or when
//! the run leaves a link, namespace or process behind.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use lull_netns::NetNs;
use lull_netns::ipam::Subnet;
use lull_netns::link::Bridge;
use lull_netns::network::{AttachRequest, HostNetwork, InstanceNetwork, NetworkConfig};
use lull_tests::scratch::ScratchDir;

const USAGE: &str = "usage: lull-bench-netns [--smoke] [--app PATH] [--markdown PATH]";

/// Where `ip netns add` pins its namespaces.
const IP_NETNS_DIR: &str = "/run/netns";
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// The port the fixture app listens on inside the wired namespace.
const APP_PORT: u16 = 8080;
/// Longest wait for the fixture app to say it is listening.
const APP_START_DEADLINE: Duration = Duration::from_secs(10);
/// Longest a download may stall before the harness gives up.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Prefix length of the run's subnet: a /22 has addresses for 1021 instances, and a bridge
/// takes at most 1024 ports; both paths' instances are all wired at once.
const PREFIX: u8 = 22;
/// How often (in iterations) both paths' namespaces are checked to be reachable from the host.
const REACH_CHECK_EVERY: usize = 50;

struct Args {
    smoke: bool,
    app: PathBuf,
    markdown: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let exe = std::env::current_exe().context("find this executable")?;
    let mut parsed = Args {
        smoke: false,
        app: exe.with_file_name("lull-fixture-app"),
        markdown: None,
    };
    let mut args = std::env::args().skip(1);
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

/// Iteration counts and sizes of one run.
struct Plan {
    wirings: usize,
    download_bytes: u64,
    downloads: usize,
}

impl Plan {
    fn new(smoke: bool) -> Plan {
        if smoke {
            Plan {
                wirings: 20,
                download_bytes: 16 << 20,
                downloads: 3,
            }
        } else {
            Plan {
                wirings: 300,
                download_bytes: 256 << 20,
                downloads: 3,
            }
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LULL_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match parse_args().and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lull-bench-netns: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the network benchmarks need root (namespaces, links)");
    }
    if !args.app.is_file() {
        bail!(
            "fixture app {} not found (build it: cargo build --release -p lull-fixture-app)",
            args.app.display()
        );
    }
    run_tool(Command::new("ip").arg("-V")).context("`ip` (Debian package iproute2)")?;
    let plan = Plan::new(args.smoke);
    // Both paths' instances (and one warm-up each) are wired at once, plus the app's.
    let instances = 2 * (plan.wirings + 1) + 1;
    if instances > 1000 {
        bail!("{instances} instances do not fit on one bridge (1024 ports) and a /{PREFIX}");
    }
    let mut report = Report {
        rows: Vec::new(),
        details: Vec::new(),
    };

    let mut net = BenchNet::new()?;
    let tag = net.tag.clone();
    let veth_prefix = net.veth_prefix.clone();
    eprintln!(
        "lull-bench-netns: {} run, bridge {} on {}",
        if args.smoke { "smoke" } else { "full" },
        net.bridge()?.name(),
        net.subnet
    );
    wiring(&mut net, &plan, &mut report)?;
    throughput(&mut net, &plan, &args.app, &mut report)?;
    drop(net);

    let left = leftovers(&tag, &veth_prefix);
    if !left.is_empty() {
        bail!("the run left these behind: {}", left.join(", "));
    }
    report.print();
    if let Some(path) = &args.markdown {
        fs::write(path, report.markdown()).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The run's network, and its cleanup

/// This run's bridge, subnet, address allocator and lull namespace dir. Dropping it kills the
/// apps it started and removes every link and namespace whose name carries its tag, whether the
/// run finished or not.
struct BenchNet {
    /// Prefix of every `ip netns` name and `ip` path link this run makes, and of its bridge:
    /// `nb`, the pid (5 digits) and 3 hex digits of the clock, so names of two runs never share
    /// a prefix.
    tag: String,
    /// Prefix of the lull path's links (at most 7 bytes: lull appends 8 hex digits).
    veth_prefix: String,
    /// lull's instance network over this run's bridge, table and subnet.
    network: Option<HostNetwork>,
    subnet: Subnet,
    /// The ip path takes addresses from the top of the subnet down (lull's allocator hands
    /// them out from the bottom up), one per namespace, outside the timed part.
    ip_next: u32,
    /// The host's `net.ipv4.ip_forward`, put back at the end (lull switches it on).
    ip_forward: Option<String>,
    /// Instance names are `<tag><l|i><seq>`; one number per instance made.
    seq: u32,
    children: Vec<Child>,
    _scratch: ScratchDir,
}

impl BenchNet {
    fn new() -> Result<BenchNet> {
        let pid = std::process::id();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tag = format!("nb{:05}{:03x}", pid % 100_000, nanos & 0xfff);
        let scratch = ScratchDir::new("lull-bench-netns").context("create the scratch dir")?;
        let gateway = free_subnet_gateway(pid.wrapping_add(nanos))?;
        let [a, b, c, _] = gateway.octets();
        let subnet = Subnet::parse(&format!("{a}.{b}.{c}.0/{PREFIX}"))?;
        let veth_prefix = format!("v{:06x}", (pid.wrapping_mul(4096) ^ nanos) & 0xff_ffff);
        let mut config =
            NetworkConfig::new(&scratch.path().join("data"), &scratch.path().join("run"));
        config.bridge = format!("{tag}br");
        config.table = format!("lull_bench_{tag}");
        config.veth_prefix = veth_prefix.clone();
        config.subnet = subnet;
        // Egress is not measured: loopback stands in for the uplink, so the run needs no
        // default route and masquerades nothing.
        config.uplink = Some("lo".into());
        // ... and the MTU is a real uplink's, not loopback's 64 KiB.
        config.mtu = Some(1500);
        config.dns = vec![Ipv4Addr::new(192, 0, 2, 53).into()];
        let mut net = BenchNet {
            network: None,
            subnet,
            ip_next: u32::from(subnet.broadcast()) - 1,
            ip_forward: fs::read_to_string(IP_FORWARD).ok(),
            seq: 0,
            children: Vec::new(),
            _scratch: scratch,
            tag,
            veth_prefix,
        };
        let (network, _) = HostNetwork::start(config).context("set up lull's instance network")?;
        net.network = Some(network);
        Ok(net)
    }

    fn network(&self) -> Result<&HostNetwork> {
        self.network.as_ref().context("the network was torn down")
    }

    fn bridge(&self) -> Result<&Bridge> {
        Ok(self.network()?.bridge())
    }

    /// The next address for the ip path.
    fn ip_address(&mut self) -> Ipv4Addr {
        let addr = Ipv4Addr::from(self.ip_next);
        self.ip_next -= 1;
        addr
    }

    /// A fresh instance name for one path (`l` lull, `i` ip), at most 15 bytes so that it also
    /// serves as the name of the instance's host-side veth.
    fn next_name(&mut self, path: char) -> String {
        self.seq += 1;
        format!("{}{path}{}", self.tag, self.seq)
    }
}

impl Drop for BenchNet {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // lull's network first, through lull (instances, table, bridge); then whatever else
        // carries the tag, through `ip`.
        if let Some(network) = self.network.take()
            && let Err(e) = network.teardown()
        {
            eprintln!("lull-bench-netns: tear down lull's network: {e}");
        }
        if let Some(value) = &self.ip_forward {
            let _ = fs::write(IP_FORWARD, value);
        }
        for link in links_with_prefix(&self.tag) {
            let _ = run_tool(Command::new("ip").args(["link", "del", &link]));
        }
        for name in ip_netns_with_prefix(&self.tag) {
            let _ = run_tool(Command::new("ip").args(["netns", "del", &name]));
        }
        // The scratch dir (ipam state, namespace mount points) goes when `_scratch` drops.
    }
}

fn links_with_prefix(prefix: &str) -> Vec<String> {
    names_in_dir(Path::new("/sys/class/net"), prefix)
}

fn ip_netns_with_prefix(prefix: &str) -> Vec<String> {
    names_in_dir(Path::new(IP_NETNS_DIR), prefix)
}

fn names_in_dir(dir: &Path, prefix: &str) -> Vec<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Links and `ip` namespaces of this run still present.
fn leftovers(tag: &str, veth_prefix: &str) -> Vec<String> {
    let mut left: Vec<String> = links_with_prefix(tag)
        .into_iter()
        .chain(links_with_prefix(veth_prefix))
        .map(|l| format!("link {l}"))
        .collect();
    left.extend(
        ip_netns_with_prefix(tag)
            .into_iter()
            .map(|n| format!("network namespace {IP_NETNS_DIR}/{n}")),
    );
    left
}

/// The gateway (.1) of a 10.252.x.0/22 that no host route overlaps, starting the search at
/// `seed` (so that concurrent runs are likely to pick different ones).
fn free_subnet_gateway(seed: u32) -> Result<Ipv4Addr> {
    let routes = fs::read_to_string("/proc/net/route").context("read /proc/net/route")?;
    let taken: Vec<(u32, u32)> = routes
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let dest = u32::from_str_radix(fields.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(fields.get(7)?, 16).ok()?;
            // /proc/net/route prints addresses in host (little-endian) byte order.
            Some((u32::from_be(dest.to_le()), u32::from_be(mask.to_le())))
        })
        .filter(|(_, mask)| *mask != 0)
        .collect();
    let subnet_mask = u32::MAX << (32 - u32::from(PREFIX));
    let blocks = 1u32 << (PREFIX - 16);
    for i in 0..blocks {
        let block = seed.wrapping_add(i) % blocks;
        let net = u32::from(Ipv4Addr::new(10, 252, 0, 0)) | (block << (32 - u32::from(PREFIX)));
        let clash = taken.iter().any(|(dest, mask)| {
            let common = mask & subnet_mask;
            net & common == dest & common
        });
        if !clash {
            return Ok(Ipv4Addr::from(net + 1));
        }
    }
    bail!("no free /{PREFIX} in 10.252.0.0/16 (every one overlaps a host route)")
}

// ---------------------------------------------------------------------------------------------
// The two paths

/// What the lull path made for one instance.
struct LullInstance {
    id: String,
    netns: NetNs,
    host_ifname: String,
    addr: Ipv4Addr,
}

/// The lull path for one instance: `HostNetwork::attach`, everything an instance start asks of
/// the network: the address (allocated under the state file's lock, on disk when it returns),
/// a network namespace with `lo` up, the veth pair (isolated bridge port, alias, /32 address,
/// on-link default route) and the instance's resolv.conf and hosts files.
fn lull_attach(net: &mut BenchNet, id: &str) -> Result<LullInstance> {
    let attachment = net.network()?.attach(&AttachRequest {
        instance: id.to_owned(),
        service: "bench".into(),
        allow_peers: false,
        hostname: id.to_owned(),
    })?;
    let dir = attachment.netns.parent().context("namespace path")?;
    Ok(LullInstance {
        id: id.to_owned(),
        netns: NetNs::open(dir, id)?,
        host_ifname: attachment.host_ifname,
        addr: attachment.addr,
    })
}

/// Undoes [`lull_attach`] with `HostNetwork::detach`; returns the time it took.
fn lull_detach(net: &mut BenchNet, instance: LullInstance) -> Result<Duration> {
    let started = Instant::now();
    net.network()?.detach(&instance.id)?;
    Ok(started.elapsed())
}

/// The `ip` commands that give namespace `name` the same end state as [`lull_attach`], in the
/// order CNI's bridge plugin works (plus `lo` up, which lull does and CNI leaves to its
/// loopback plugin). The host end of the veth pair is named `name` too.
fn ip_attach_commands(name: &str, bridge: &str, addr: Ipv4Addr, subnet: &Subnet) -> IpCommands {
    let cidr = format!("{addr}/{}", subnet.prefix());
    let gateway = subnet.gateway().to_string();
    let commands: [(&'static str, Vec<String>); 7] = [
        ("netns add", vec!["netns", "add", name]),
        ("lo up", vec!["-n", name, "link", "set", "lo", "up"]),
        (
            "veth add",
            vec![
                "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", name,
            ],
        ),
        (
            "master + up",
            vec!["link", "set", name, "master", bridge, "up"],
        ),
        (
            "addr add",
            vec!["-n", name, "addr", "add", cidr.as_str(), "dev", "eth0"],
        ),
        ("eth0 up", vec!["-n", name, "link", "set", "eth0", "up"]),
        (
            "route add",
            vec![
                "-n",
                name,
                "route",
                "add",
                "default",
                "via",
                gateway.as_str(),
            ],
        ),
    ]
    .map(|(label, args)| (label, args.into_iter().map(str::to_owned).collect()));
    commands.into()
}

/// The `ip` commands that undo [`ip_attach_commands`], as CNI's DEL and the runtime do.
fn ip_detach_commands(name: &str) -> IpCommands {
    vec![
        ("link del", vec!["link".into(), "del".into(), name.into()]),
        ("netns del", vec!["netns".into(), "del".into(), name.into()]),
    ]
}

/// `(label, arguments of ip)` pairs.
type IpCommands = Vec<(&'static str, Vec<String>)>;

/// Runs each command, returning the time each took.
fn run_ip(commands: &IpCommands) -> Result<Vec<Duration>> {
    let mut took = Vec::with_capacity(commands.len());
    for (_, args) in commands {
        let started = Instant::now();
        run_tool(Command::new("ip").args(args))?;
        took.push(started.elapsed());
    }
    Ok(took)
}

fn run_tool(command: &mut Command) -> Result<()> {
    let program = command.get_program().to_string_lossy().into_owned();
    let args: Vec<String> = command
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {}: {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Checks that both paths made a working network

/// The host end `host_ifname` is a port of the run's bridge.
fn check_on_bridge(net: &BenchNet, host_ifname: &str) -> Result<()> {
    let master = fs::read_link(format!("/sys/class/net/{host_ifname}/master"))
        .with_context(|| format!("link {host_ifname} has no master"))?;
    let bridge = net.bridge()?.name();
    if master.file_name().and_then(|n| n.to_str()) != Some(bridge) {
        bail!(
            "link {host_ifname} is attached to {}, not to bridge {bridge}",
            master.display()
        );
    }
    Ok(())
}

/// A TCP round trip from the host to a listener on `addr` inside `netns`, through the bridge.
fn check_reachable(netns: &NetNs, addr: Ipv4Addr) -> Result<()> {
    let listener = netns
        .run_in(|| TcpListener::bind((addr, 0)))?
        .with_context(|| format!("listen on {addr} in {}", netns.path().display()))?;
    let target = listener.local_addr()?;
    let mut client = TcpStream::connect_timeout(&target, Duration::from_secs(5))
        .with_context(|| format!("connect from the host to {target}"))?;
    let (mut server, _) = listener.accept()?;
    client.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf)?;
    if &buf != b"ping" {
        bail!("{target} received {buf:?} instead of ping");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Wiring

/// One timed operation of one path, with the time of each of its steps (the lull path's
/// calls, or the `ip` commands).
struct Sample {
    total: Duration,
    steps: Vec<Duration>,
}

fn lull_create(net: &mut BenchNet, check_reach: bool) -> Result<(LullInstance, Sample)> {
    let id = net.next_name('l');
    let started = Instant::now();
    let instance = lull_attach(net, &id)?;
    let total = started.elapsed();
    check_on_bridge(net, &instance.host_ifname)
        .and_then(|()| {
            if check_reach {
                check_reachable(&instance.netns, instance.addr)
            } else {
                Ok(())
            }
        })
        .with_context(|| format!("lull path, instance {id}"))?;
    Ok((
        instance,
        Sample {
            total,
            steps: vec![total],
        },
    ))
}

fn lull_teardown(net: &mut BenchNet, instance: LullInstance) -> Result<Sample> {
    let id = instance.id.clone();
    let total = lull_detach(net, instance).with_context(|| format!("lull path, tear down {id}"))?;
    Ok(Sample {
        total,
        steps: vec![total],
    })
}

/// An instance the ip path made: namespace and host-side veth share the name.
struct IpInstance {
    name: String,
}

fn ip_create(net: &mut BenchNet, check_reach: bool) -> Result<(IpInstance, Sample)> {
    let name = net.next_name('i');
    // The address comes from the same allocator, outside the timed part: the ip path is timed
    // without any address management.
    let addr = net.ip_address();
    let attach = ip_attach_commands(&name, net.bridge()?.name(), addr, &net.subnet);
    let started = Instant::now();
    let steps = run_ip(&attach).with_context(|| format!("ip path, namespace {name}"))?;
    let total = started.elapsed();
    check_on_bridge(net, &name)
        .and_then(|()| {
            if check_reach {
                check_reachable(&NetNs::open(Path::new(IP_NETNS_DIR), &name)?, addr)
            } else {
                Ok(())
            }
        })
        .with_context(|| format!("ip path, namespace {name}"))?;
    Ok((IpInstance { name }, Sample { total, steps }))
}

fn ip_teardown(instance: IpInstance) -> Result<Sample> {
    let name = instance.name;
    let started = Instant::now();
    let steps = run_ip(&ip_detach_commands(&name))
        .with_context(|| format!("ip path, tear down namespace {name}"))?;
    let total = started.elapsed();
    Ok(Sample { total, steps })
}

/// Shows progress: every iteration on one rewritten line on a terminal, every 50th and the
/// last on a line of its own in a log.
fn progress(i: usize, of: usize, line: impl FnOnce() -> String) {
    if std::io::stderr().is_terminal() {
        eprint!("\r{}   ", line());
        if i == of {
            eprintln!();
        }
    } else if i.is_multiple_of(50) || i == of {
        eprintln!("{}", line());
    }
}

/// Statistics of one path's samples, in milliseconds.
struct Stats {
    p50: f64,
    p99: f64,
    /// p50 of each step.
    steps_p50: Vec<f64>,
}

impl Stats {
    fn of(samples: &[Sample]) -> Stats {
        let totals: Vec<f64> = samples.iter().map(|s| ms(s.total)).collect();
        let steps = samples.first().map_or(0, |s| s.steps.len());
        let steps_p50 = (0..steps)
            .map(|i| {
                let v: Vec<f64> = samples
                    .iter()
                    .filter_map(|s| s.steps.get(i).copied().map(ms))
                    .collect();
                percentile(&v, 50.0)
            })
            .collect();
        Stats {
            p50: percentile(&totals, 50.0),
            p99: percentile(&totals, 99.0),
            steps_p50,
        }
    }

    fn steps_text(&self, labels: &[&str]) -> String {
        labels
            .iter()
            .zip(&self.steps_p50)
            .map(|(label, p50)| format!("{label} {p50:.2} ms"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Wires `plan.wirings` instances with each path (plus one warm-up each, not counted), keeping
/// them all, so the bridge fills up as on a busy host; then tears them all down. Both phases
/// interleave the two paths and alternate which goes first. Creation and teardown are measured
/// in separate phases because the kernel cleans up a deleted namespace asynchronously, and that
/// work slows down whatever is created next.
fn wiring(net: &mut BenchNet, plan: &Plan, report: &mut Report) -> Result<()> {
    let mut lull_instances = Vec::new();
    let mut ip_instances = Vec::new();
    let mut lull = Vec::new();
    let mut ip = Vec::new();
    for i in 0..=plan.wirings {
        let check_reach = i % REACH_CHECK_EVERY == 0 || i == plan.wirings;
        let ((l_inst, l), (p_inst, p)) = if i % 2 == 0 {
            let lull = lull_create(net, check_reach)?;
            (lull, ip_create(net, check_reach)?)
        } else {
            let ip = ip_create(net, check_reach)?;
            (lull_create(net, check_reach)?, ip)
        };
        lull_instances.push(l_inst);
        ip_instances.push(p_inst);
        progress(i, plan.wirings, || {
            format!(
                "wire {i}/{}: lull {:.2} ms, ip {:.2} ms",
                plan.wirings,
                ms(l.total),
                ms(p.total)
            )
        });
        if i > 0 {
            lull.push(l);
            ip.push(p);
        }
    }
    let ports = fs::read_dir(format!("/sys/class/net/{}/brif", net.bridge()?.name()))
        .map(|d| d.count())
        .unwrap_or(0);
    if ports != lull_instances.len() + ip_instances.len() {
        bail!(
            "bridge {} has {ports} ports, {} expected",
            net.bridge()?.name(),
            lull_instances.len() + ip_instances.len()
        );
    }

    let mut lull_down = Vec::new();
    let mut ip_down = Vec::new();
    let pairs: Vec<_> = lull_instances.into_iter().zip(ip_instances).collect();
    let count = pairs.len();
    for (i, (l_inst, p_inst)) in pairs.into_iter().enumerate() {
        let (l, p) = if i % 2 == 0 {
            let lull = lull_teardown(net, l_inst)?;
            (lull, ip_teardown(p_inst)?)
        } else {
            let ip = ip_teardown(p_inst)?;
            (lull_teardown(net, l_inst)?, ip)
        };
        progress(i + 1, count, || {
            format!(
                "tear down {}/{count}: lull {:.2} ms, ip {:.2} ms",
                i + 1,
                ms(l.total),
                ms(p.total)
            )
        });
        lull_down.push(l);
        ip_down.push(p);
    }

    let (lull_up, ip_up) = (Stats::of(&lull), Stats::of(&ip));
    let (lull_dn, ip_dn) = (Stats::of(&lull_down), Stats::of(&ip_down));
    let ratio = lull_up.p50 / ip_up.p50;
    report.rows.push(Row {
        name: "create + wire one instance's network (p50) vs ip commands".into(),
        target: "< 1.0x".into(),
        measured: format!("{:.2} ms", lull_up.p50),
        baseline: format!("{:.2} ms", ip_up.p50),
        ratio: format!("{ratio:.2}x"),
        pass: Some(ratio < 1.0),
    });
    report.rows.push(Row {
        name: "create + wire one instance's network (p50), absolute".into(),
        target: "< 5 ms".into(),
        measured: format!("{:.2} ms", lull_up.p50),
        baseline: "-".into(),
        ratio: "-".into(),
        pass: Some(lull_up.p50 < 5.0),
    });
    report.rows.push(Row {
        name: "create + wire one instance's network (p99) vs ip commands".into(),
        target: "(none)".into(),
        measured: format!("{:.2} ms", lull_up.p99),
        baseline: format!("{:.2} ms", ip_up.p99),
        ratio: format!("{:.2}x", lull_up.p99 / ip_up.p99),
        pass: None,
    });
    report.rows.push(Row {
        name: "tear down one instance's network (p50) vs ip commands".into(),
        target: "(none)".into(),
        measured: format!("{:.2} ms", lull_dn.p50),
        baseline: format!("{:.2} ms", ip_dn.p50),
        ratio: format!("{:.2}x", lull_dn.p50 / ip_dn.p50),
        pass: None,
    });

    let ip_labels: Vec<&str> = ip_attach_commands("x", "x", Ipv4Addr::UNSPECIFIED, &net.subnet)
        .iter()
        .map(|(label, _)| *label)
        .collect();
    let ip_down_labels: Vec<&str> = ip_detach_commands("x").iter().map(|(l, _)| *l).collect();
    report.details.push(format!(
        "create + wire, {} interleaved iterations each, all kept until the teardown phase (the bridge ends with {ports} ports): lull p50 {:.2} ms p99 {:.2} ms; ip commands p50 {:.2} ms p99 {:.2} ms",
        lull.len(),
        lull_up.p50,
        lull_up.p99,
        ip_up.p50,
        ip_up.p99
    ));
    // Does wiring get slower as the bridge fills up? The first and last fifth of each path.
    let fifth = (lull.len() / 5).max(1);
    let early_late = |samples: &[Sample]| {
        let early = Stats::of(&samples[..fifth.min(samples.len())]).p50;
        let late = Stats::of(&samples[samples.len().saturating_sub(fifth)..]).p50;
        format!("{early:.2} ms first, {late:.2} ms last")
    };
    report.details.push(format!(
        "create + wire p50 over the first and the last {fifth} instances of each path (the bridge filling up): lull {}; ip {}",
        early_late(&lull),
        early_late(&ip)
    ));
    report.details.push(
        "lull path: `HostNetwork::attach` as an instance start calls it (address under the state \
         file's lock, written and fsynced; namespace; veth pair; resolver files)"
            .to_string(),
    );
    report.details.push(format!(
        "ip path commands (p50 each): {}; one exec of `ip` per command; the address comes from the same allocator, outside the timed part",
        ip_up.steps_text(&ip_labels)
    ));
    report.details.push(format!(
        "teardown, {count} each, interleaved: lull (`HostNetwork::detach`) p50 {:.2} ms p99 {:.2} ms; ip p50 {:.2} ms p99 {:.2} ms ({})",
        lull_dn.p50,
        lull_dn.p99,
        ip_dn.p50,
        ip_dn.p99,
        ip_dn.steps_text(&ip_down_labels)
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Throughput

/// The byte at offset `i` of a `/bytes` body (the fixture app's pattern).
fn pattern_byte(i: u64) -> u8 {
    b'a' + (i % 26) as u8
}

/// Starts the fixture app with `PORT=port` (inside `netns` if given: a child inherits the
/// network namespace of the thread that spawns it) and returns the port it listens on. The
/// child is killed when `net` is dropped.
fn start_app(net: &mut BenchNet, app: &Path, netns: Option<&NetNs>, port: u16) -> Result<u16> {
    let spawn = || {
        Command::new(app)
            .env("PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
    };
    let where_ = netns.map_or_else(
        || "on the host".to_owned(),
        |ns| format!("in {}", ns.path().display()),
    );
    let mut child = match netns {
        Some(ns) => ns.run_in(spawn)?,
        None => spawn(),
    }
    .with_context(|| format!("start {} {where_}", app.display()))?;
    let stdout = child.stdout.take();
    net.children.push(child);
    let stdout = stdout.context("the fixture app's stdout was not piped")?;
    // It prints `listening on :<port>` once bound; read it on a thread so a silent app cannot
    // hang the run.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        let _ = tx.send(read);
    });
    let line = rx
        .recv_timeout(APP_START_DEADLINE)
        .map_err(|_| {
            anyhow!("the fixture app {where_} did not start listening in {APP_START_DEADLINE:?}")
        })?
        .with_context(|| format!("read the fixture app's output {where_}"))?;
    line.trim()
        .strip_prefix("listening on :")
        .and_then(|p| p.parse().ok())
        .with_context(|| {
            format!("the fixture app {where_} printed {line:?}, not `listening on :<port>`")
        })
}

/// Downloads `/bytes?n=<bytes>` from `addr` with a plain blocking client; returns the time from
/// connecting to the last byte. Checks the status, the length and the pattern.
fn download(addr: SocketAddr, bytes: u64) -> Result<Duration> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    write!(
        stream,
        "GET /bytes?n={bytes} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut head = Vec::new();
    let body_start = loop {
        let n = stream
            .read(&mut buf)
            .with_context(|| format!("read the response head from {addr}"))?;
        if n == 0 {
            bail!("{addr} closed the connection inside the response head");
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if head.len() > 64 * 1024 {
            bail!("the response head from {addr} is over 64 KiB");
        }
    };
    let text = String::from_utf8_lossy(&head[..body_start]).into_owned();
    if !text.starts_with("HTTP/1.1 200 ") {
        bail!(
            "{addr} answered {:?}",
            text.lines().next().unwrap_or_default()
        );
    }
    if !text.contains(&format!("Content-Length: {bytes}\r\n")) {
        bail!("{addr} did not announce Content-Length {bytes}: {text:?}");
    }
    let check = |offset: u64, chunk: &[u8]| -> Result<()> {
        let last = chunk.len() as u64 - 1;
        if chunk[0] != pattern_byte(offset) || chunk[chunk.len() - 1] != pattern_byte(offset + last)
        {
            bail!("{addr} sent the wrong bytes at offset {offset}");
        }
        Ok(())
    };
    let mut received = (head.len() - body_start) as u64;
    if received > 0 {
        check(0, &head[body_start..])?;
    }
    while received < bytes {
        let n = stream
            .read(&mut buf)
            .with_context(|| format!("read the body from {addr} at offset {received}"))?;
        if n == 0 {
            bail!("{addr} closed the connection after {received} of {bytes} bytes");
        }
        check(received, &buf[..n])?;
        received += n as u64;
    }
    let took = started.elapsed();
    if received != bytes {
        bail!("{addr} sent {received} bytes, {bytes} expected");
    }
    Ok(took)
}

fn throughput(net: &mut BenchNet, plan: &Plan, app: &Path, report: &mut Report) -> Result<()> {
    let id = net.next_name('l');
    let instance = lull_attach(net, &id)?;
    let measured = measure_downloads(net, plan, app, &instance);
    for mut child in net.children.drain(..) {
        let _ = child.kill();
        let _ = child.wait();
    }
    lull_detach(net, instance).with_context(|| format!("tear down instance {id}"))?;
    let (veth, lo) = measured?;

    let mb = plan.download_bytes as f64 / 1e6;
    let rate = |took: Duration| mb / took.as_secs_f64();
    let best = |samples: &[Duration]| samples.iter().copied().min().unwrap_or_default();
    let (veth_best, lo_best) = (rate(best(&veth)), rate(best(&lo)));
    let mib = plan.download_bytes >> 20;
    report.rows.push(Row {
        name: format!(
            "download {mib} MiB from an instance: veth vs loopback (best of {})",
            veth.len()
        ),
        target: "(none)".into(),
        measured: format!("{veth_best:.0} MB/s"),
        baseline: format!("{lo_best:.0} MB/s"),
        ratio: format!("{:.2}x", veth_best / lo_best),
        pass: None,
    });
    let list = |samples: &[Duration]| {
        samples
            .iter()
            .map(|d| format!("{:.0}", rate(*d)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    report.details.push(format!(
        "throughput: a plain std TcpStream client on the host reads GET /bytes?n={} from the fixture app (release build), interleaved; over the veth pair to the app in a wired namespace: {} MB/s; over the host's loopback to the same app on the host: {} MB/s",
        plan.download_bytes,
        list(&veth),
        list(&lo)
    ));
    Ok(())
}

/// Starts the app in `instance`'s namespace and on the host, and downloads from each in turn;
/// returns the times over the veth and over loopback.
fn measure_downloads(
    net: &mut BenchNet,
    plan: &Plan,
    app: &Path,
    instance: &LullInstance,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let inside = start_app(net, app, Some(&instance.netns), APP_PORT)?;
    let veth_addr = SocketAddr::from((instance.addr, inside));
    let host = start_app(net, app, None, 0)?;
    let lo_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, host));
    // Warm-up: connections, page cache, the app's first thread.
    download(veth_addr, 1 << 20)?;
    download(lo_addr, 1 << 20)?;
    let mut veth = Vec::new();
    let mut lo = Vec::new();
    for i in 0..plan.downloads {
        let order = if i % 2 == 0 {
            [(veth_addr, true), (lo_addr, false)]
        } else {
            [(lo_addr, false), (veth_addr, true)]
        };
        for (addr, over_veth) in order {
            let took = download(addr, plan.download_bytes)?;
            eprintln!(
                "download {}/{}: {} {:.0} MB/s",
                i + 1,
                plan.downloads,
                if over_veth { "veth" } else { "loopback" },
                plan.download_bytes as f64 / 1e6 / took.as_secs_f64()
            );
            if over_veth {
                veth.push(took);
            } else {
                lo.push(took);
            }
        }
    }
    Ok((veth, lo))
}

// ---------------------------------------------------------------------------------------------
// Statistics and the report (the same table as `lull-bench runtime`)

/// Nearest-rank percentile of `samples` (any order), `p` in 0..=100.
fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One line of the table.
struct Row {
    name: String,
    target: String,
    measured: String,
    baseline: String,
    /// The figure compared with the target (a ratio, or the measured value itself).
    ratio: String,
    pass: Option<bool>,
}

fn pass_text(pass: Option<bool>) -> &'static str {
    match pass {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    }
}

struct Report {
    rows: Vec<Row>,
    details: Vec<String>,
}

impl Report {
    fn cells(&self) -> Vec<[String; 6]> {
        self.rows
            .iter()
            .map(|r| {
                [
                    r.name.clone(),
                    r.target.clone(),
                    r.measured.clone(),
                    r.baseline.clone(),
                    r.ratio.clone(),
                    pass_text(r.pass).to_owned(),
                ]
            })
            .collect()
    }

    fn print(&self) {
        let headers = [
            "measurement",
            "target",
            "measured",
            "baseline",
            "ratio",
            "pass",
        ]
        .map(str::to_owned);
        let cells = self.cells();
        let mut widths = headers.clone().map(|h| h.len());
        for row in &cells {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |row: &[String]| {
            let mut out = String::new();
            for (c, w) in row.iter().zip(widths) {
                let _ = write!(out, "{c:<w$}  ");
            }
            out.trim_end().to_owned()
        };
        println!();
        println!("{}", line(&headers));
        println!("{}", line(&widths.map(|w| "-".repeat(w))));
        for row in &cells {
            println!("{}", line(row));
        }
        println!();
        for d in &self.details {
            println!("  {d}");
        }
    }

    fn markdown(&self) -> String {
        let mut out = String::new();
        out.push_str("| measurement | target | measured | baseline | ratio | pass |\n");
        out.push_str("|---|---|---|---|---|---|\n");
        for row in self.cells() {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        let missed: Vec<&str> = self
            .rows
            .iter()
            .filter(|r| r.pass == Some(false))
            .map(|r| r.name.as_str())
            .collect();
        out.push('\n');
        if missed.is_empty() {
            out.push_str("Every target was met in this run.\n");
        } else {
            let _ = writeln!(
                out,
                "**Targets missed in this run:** {}.",
                missed.join("; ")
            );
        }
        out.push_str("\nDetails:\n\n");
        for d in &self.details {
            let _ = writeln!(out, "- {d}");
        }
        out
    }
}
