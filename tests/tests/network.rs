//! Privileged tests of instance networking ([`HostNetwork`]): addresses, reachability, egress
//! through NAT, isolation, firewall conflicts, cleanup under a loop, and recovery after a crash.
//!
//! Every test runs inside a "host" network namespace of its own, made for the test: the bridge,
//! the nftables table, IP forwarding and the routes all live there, so nothing touches the real
//! host's network and two runs never meet. The egress side is another namespace of the test's
//! ("uplink", 198.18.0.0/30 from the benchmarking range) with a server in it; no traffic goes
//! anywhere else.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lull_netns::NetNs;
use lull_netns::firewall::{HostPort, Proto};
use lull_netns::ipam::Subnet;
use lull_netns::link::host_link;
use lull_netns::network::{
    AttachRequest, HostNetwork, InstanceNetwork, LiveInstance, NetworkError,
};
use lull_tests::host_net::{
    Host, METADATA, REFUSED_WITHIN, UPLINK_BRIDGE, UPLINK_HOST, UPLINK_SERVER, sh_in,
};
use lull_tests::scratch::mounts_under;

fn request(instance: &str, service: &str, allow_peers: bool) -> AttachRequest {
    AttachRequest {
        instance: instance.into(),
        service: service.into(),
        allow_peers,
        hostname: instance.into(),
    }
}

/// A listener inside `ns` on `addr`, any port.
fn listen_in(ns: &Path, addr: Ipv4Addr) -> TcpListener {
    let ns = NetNs::open(
        ns.parent().unwrap(),
        &ns.file_name().unwrap().to_string_lossy(),
    )
    .unwrap();
    ns.run_in(|| TcpListener::bind((addr, 0))).unwrap().unwrap()
}

/// Connects from inside `ns` (a namespace path) to `target`; what the peer saw as our address.
fn connect_from(ns: &Path, target: SocketAddr) -> std::io::Result<TcpStream> {
    let ns = NetNs::open(
        ns.parent().unwrap(),
        &ns.file_name().unwrap().to_string_lossy(),
    )
    .unwrap();
    ns.run_in(|| TcpStream::connect_timeout(&target, REFUSED_WITHIN))
        .unwrap()
}

/// Serves one connection on `listener` on a thread: answers with the peer's address.
fn serve_peer_address(listener: TcpListener) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        listener.set_nonblocking(false).unwrap();
        if let Ok((mut stream, peer)) = listener.accept() {
            let _ = stream.write_all(peer.ip().to_string().as_bytes());
        }
    })
}

fn read_all(mut stream: TcpStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

/// Whether `from` (a namespace path) can open a connection to a fresh listener on `to_addr`
/// inside namespace `to` (a path), or on the host when `to` is `None`.
fn can_connect(host: &Host, from: &Path, to: Option<&Path>, to_addr: Ipv4Addr) -> bool {
    let listener = match to {
        Some(ns) => listen_in(ns, to_addr),
        None => host.run(|| TcpListener::bind((to_addr, 0))).unwrap(),
    };
    let target = listener.local_addr().unwrap();
    connect_from(from, target).is_ok()
}

#[test]
fn instances_get_distinct_addresses_and_reach_out_through_nat() {
    let host = Host::new();
    let config = host.config();
    let network = host.start(config.clone());
    let a = host
        .run(|| network.attach(&request("web-a", "web", false)))
        .unwrap();
    let b = host
        .run(|| network.attach(&request("web-b", "web", false)))
        .unwrap();
    assert_ne!(a.addr, b.addr);
    for att in [&a, &b] {
        assert!(config.subnet.is_instance_address(att.addr), "{att:?}");
        assert_eq!(att.gateway, config.subnet.gateway());
        assert!(att.netns.starts_with(&config.netns_dir));
        assert_eq!(network.attachment(&att.instance).as_ref(), Some(att));
    }

    // The host reaches each instance on its address.
    for att in [&a, &b] {
        let listener = listen_in(&att.netns, att.addr);
        let target = listener.local_addr().unwrap();
        let server = serve_peer_address(listener);
        let stream = host
            .run(|| TcpStream::connect_timeout(&target, Duration::from_secs(5)))
            .unwrap();
        assert_eq!(read_all(stream), config.subnet.gateway().to_string());
        server.join().unwrap();
    }

    // Egress: the uplink's server sees the host's uplink address, not the instance's.
    let listener = listen_in(host.uplink.path(), UPLINK_SERVER);
    let target = listener.local_addr().unwrap();
    let server = serve_peer_address(listener);
    let stream = connect_from(&a.netns, target).expect("egress to the uplink's server");
    assert_eq!(read_all(stream), UPLINK_HOST.to_string(), "masqueraded");
    server.join().unwrap();

    // eth0 takes the uplink's MTU; the resolver files are written.
    let eth0 = NetNs::open(&config.netns_dir, "web-a")
        .unwrap()
        .run_in(|| host_link("eth0"))
        .unwrap()
        .unwrap()
        .expect("eth0 in the instance");
    assert_eq!(eth0.mtu, Some(1450));
    let resolv = fs::read_to_string(&a.resolv_conf).unwrap();
    assert!(!resolv.contains("127.0.0.53"), "{resolv}");
    assert!(resolv.contains("nameserver 192.0.2.53\n"), "{resolv}");
    assert!(resolv.contains("search corp.example\n"), "{resolv}");
    let hosts = fs::read_to_string(&a.hosts).unwrap();
    assert!(hosts.contains(&format!("{}\tweb-a", a.addr)), "{hosts}");

    host.run(|| network.detach("web-a")).unwrap();
    host.run(|| network.detach("web-a")).unwrap();
    assert!(network.attachment("web-a").is_none());
    assert!(!a.netns.exists());
    assert!(!a.resolv_conf.exists());
    assert_eq!(host.links("ltv"), vec![b.host_ifname.clone()]);
}

#[test]
fn services_are_isolated_from_each_other_the_host_and_metadata() {
    let host = Host::new();
    // A "metadata service" beyond the uplink, as a cloud would have it.
    sh_in(&host.uplink, &format!("ip addr add {METADATA}/32 dev lo"));
    host.sh(&format!(
        "ip route add {METADATA}/32 via {UPLINK_SERVER} dev {UPLINK_BRIDGE} onlink"
    ));
    let mut config = host.config();
    let open_port = {
        let l = host
            .run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)))
            .unwrap();
        l.local_addr().unwrap().port()
    };
    config.host_ports = vec![HostPort {
        proto: Proto::Tcp,
        port: open_port,
    }];
    let network = host.start(config.clone());
    let attach = |id: &str, service: &str, peers: bool| {
        host.run(|| network.attach(&request(id, service, peers)))
            .unwrap()
    };
    let a1 = attach("a1", "a", false);
    let a2 = attach("a2", "a", false);
    let b1 = attach("b1", "b", false);
    let p1 = attach("p1", "p", true);
    let p2 = attach("p2", "p", true);

    // Across services: never.
    assert!(!can_connect(&host, &a1.netns, Some(&b1.netns), b1.addr));
    assert!(!can_connect(&host, &b1.netns, Some(&a1.netns), a1.addr));
    // Same service: only when the service allows it.
    assert!(!can_connect(&host, &a1.netns, Some(&a2.netns), a2.addr));
    assert!(can_connect(&host, &p1.netns, Some(&p2.netns), p2.addr));
    assert!(can_connect(&host, &p2.netns, Some(&p1.netns), p1.addr));
    assert!(!can_connect(&host, &p1.netns, Some(&a1.netns), a1.addr));
    // Host ports: closed (a metrics listener, say) unless the operator opened them.
    let gateway = config.subnet.gateway();
    assert!(!can_connect(&host, &a1.netns, None, gateway));
    let allowed = host
        .run(|| TcpListener::bind((gateway, open_port)))
        .unwrap();
    let target = allowed.local_addr().unwrap();
    assert!(connect_from(&a1.netns, target).is_ok(), "allowed host port");
    drop(allowed);
    // Link-local metadata: unreachable, while the rest of the uplink side is reachable.
    assert!(!can_connect(
        &host,
        &a1.netns,
        Some(host.uplink.path()),
        METADATA
    ));
    assert!(can_connect(
        &host,
        &a1.netns,
        Some(host.uplink.path()),
        UPLINK_SERVER
    ));

    // When a peer goes, its pairs go too.
    host.run(|| network.detach("p2")).unwrap();
    let p3 = attach("p3", "p", true);
    assert!(can_connect(&host, &p3.netns, Some(&p1.netns), p1.addr));
    let peers = host.run(|| network.firewall().peers()).unwrap();
    assert_eq!(peers.len(), 2, "{peers:?}");

    // With the operator's consent, metadata is reachable.
    drop(network);
    let mut open = config.clone();
    open.allow_metadata = true;
    let network = host.start(open);
    host.run(|| {
        network.reconcile(&[LiveInstance {
            instance: "a1".into(),
            service: "a".into(),
            allow_peers: false,
        }])
    })
    .unwrap();
    assert!(can_connect(
        &host,
        &a1.netns,
        Some(host.uplink.path()),
        UPLINK_SERVER
    ));
    assert!(can_connect(
        &host,
        &a1.netns,
        Some(host.uplink.path()),
        METADATA
    ));
}

#[test]
fn a_foreign_forward_drop_is_reported_and_foreign_names_are_refused() {
    let host = Host::new();
    let config = host.config();
    // Like Docker's iptables-nft rules: the forward chain of `ip filter` drops by default.
    host.sh("nft add table ip filter
         nft 'add chain ip filter FORWARD { type filter hook forward priority 0; policy drop; }'");
    let (network, report) = host.run(|| HostNetwork::start(config.clone())).unwrap();
    let text: Vec<String> = report.conflicts.iter().map(|c| c.to_string()).collect();
    assert_eq!(report.conflicts.len(), 1, "{text:?}");
    assert!(
        text[0].contains("filter") && text[0].contains("FORWARD") && text[0].contains("lulltest0"),
        "{text:?}"
    );
    host.run(|| network.teardown()).unwrap();

    // A table of lull's name that lull did not make: refused, and left as it was.
    host.sh("nft add table inet lulltest; nft add chain inet lulltest mine");
    let err = host.run(|| HostNetwork::start(config.clone())).unwrap_err();
    assert!(matches!(err, NetworkError::Firewall(_)), "{err}");
    assert!(err.to_string().contains("lulltest"), "{err}");
    assert!(
        host.links("lulltest0").is_empty(),
        "the failed start took its bridge away again"
    );
    host.sh("nft list chain inet lulltest mine >/dev/null; nft delete table inet lulltest");

    // A link with lull's veth prefix that is not lull's: reported, never deleted.
    host.sh("ip link add ltvforeign type bridge");
    let network = host.start(config.clone());
    let report = host.run(|| network.reconcile(&[])).unwrap();
    assert_eq!(report.foreign_links, vec!["ltvforeign".to_string()]);
    assert_eq!(host.links("ltvforeign"), vec!["ltvforeign".to_string()]);

    // A bridge lull did not make (no alias), and a link of another kind with the bridge's
    // name: both refused, both left alone.
    host.run(|| network.teardown()).unwrap();
    let mut taken = config.clone();
    taken.bridge = "ltvforeign".into();
    taken.veth_prefix = "xv".into();
    let err = host.run(|| HostNetwork::start(taken.clone())).unwrap_err();
    assert!(
        err.to_string().contains("ltvforeign") && err.to_string().contains("did not make"),
        "{err}"
    );
    host.sh("ip link add ltvpair type veth peer name ltvpair2");
    taken.bridge = "ltvpair".into();
    let err = host.run(|| HostNetwork::start(taken)).unwrap_err();
    assert!(err.to_string().contains("not a bridge"), "{err}");
    assert_eq!(host.links("ltvpair").len(), 2, "left alone");
}

#[test]
fn a_subnet_overlapping_a_host_route_is_refused() {
    let host = Host::new();
    host.sh("ip link add other9 type bridge; ip link set other9 up; ip route add 10.73.0.128/25 dev other9");
    let err = host.run(|| HostNetwork::start(host.config())).unwrap_err();
    assert!(matches!(err, NetworkError::SubnetOverlap { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("10.73.0.128/25") && text.contains("other9"),
        "{text}"
    );
    assert!(host.links("lulltest0").is_empty(), "no bridge was made");
}

#[test]
fn exhaustion_and_failures_leave_nothing_half_made() {
    let host = Host::new();
    let mut config = host.config();
    config.subnet = Subnet::parse("10.73.0.0/29").unwrap();
    let network = host.start(config.clone());
    let mut addrs = BTreeSet::new();
    for i in 0..5 {
        let att = host
            .run(|| network.attach(&request(&format!("i{i}"), "s", false)))
            .unwrap();
        addrs.insert(att.addr);
    }
    assert_eq!(addrs.len(), 5);
    let err = host
        .run(|| network.attach(&request("i5", "s", false)))
        .unwrap_err();
    assert!(err.to_string().contains("exhausted"), "{err}");
    assert!(!config.netns_dir.join("i5").exists());
    assert_eq!(host.links("ltv").len(), 5);

    // A namespace file already there (not lull's to take): the attach fails and gives the
    // address back.
    host.run(|| network.detach("i0")).unwrap();
    fs::write(config.netns_dir.join("x"), b"").unwrap();
    let err = host
        .run(|| network.attach(&request("x", "s", false)))
        .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert!(config.netns_dir.join("x").exists(), "left alone");
    assert_eq!(host.links("ltv").len(), 4);
    fs::remove_file(config.netns_dir.join("x")).unwrap();
    host.run(|| network.attach(&request("i6", "s", false)))
        .expect("the address of the failed attach is free again");
}

#[test]
fn reserved_instances_are_wired_in_parallel_and_a_reservation_detaches_whole() {
    let host = Host::new();
    let config = host.config();
    let network = host.start(config.clone());
    let a = host
        .run(|| network.reserve(&request("par-a", "par", true)))
        .unwrap();
    let b = host
        .run(|| network.reserve(&request("par-b", "par", true)))
        .unwrap();
    // Reserved: an address, a namespace with only its loopback, the files; not attached yet.
    assert_ne!(a.addr, b.addr);
    assert!(a.host_ifname.is_empty());
    assert!(a.resolv_conf.exists() && a.hosts.exists());
    let eth0 = NetNs::open(&config.netns_dir, "par-a")
        .unwrap()
        .run_in(|| host_link("eth0"))
        .unwrap()
        .unwrap();
    assert!(eth0.is_none(), "{eth0:?}");
    assert!(network.attachment("par-a").is_none());
    let err = host
        .run(|| network.reserve(&request("par-a", "par", true)))
        .unwrap_err();
    assert!(matches!(err, NetworkError::AlreadyAttached { .. }), "{err}");

    // Both wired at once, each on a thread of its own (as two instance starts would).
    let wired: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = ["par-a", "par-b"]
            .map(|id| scope.spawn(|| host.run(|| network.wire(id))))
            .into_iter()
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wired: Vec<_> = wired.into_iter().map(|w| w.unwrap()).collect();
    for (att, reserved) in wired.iter().zip([&a, &b]) {
        assert!(!att.host_ifname.is_empty());
        assert_eq!(att.addr, reserved.addr);
        assert_eq!(network.attachment(&att.instance).as_ref(), Some(att));
    }
    // Peers of one service wired together still reach each other.
    let peers = host.run(|| network.firewall().peers()).unwrap();
    assert!(peers.contains(&(a.addr, b.addr)), "{peers:?}");
    let listener = listen_in(&b.netns, b.addr);
    let target = listener.local_addr().unwrap();
    let server = serve_peer_address(listener);
    let stream = connect_from(&a.netns, target).expect("peer a reaches peer b");
    assert_eq!(read_all(stream), a.addr.to_string());
    server.join().unwrap();

    let err = host.run(|| network.wire("par-a")).unwrap_err();
    assert!(matches!(err, NetworkError::NotReserved { .. }), "{err}");

    // A reservation never wired is detached whole: namespace, files, address.
    let c = host
        .run(|| network.reserve(&request("par-c", "par", false)))
        .unwrap();
    host.run(|| network.detach("par-c")).unwrap();
    assert!(!c.netns.exists() && !c.resolv_conf.exists());
    let err = host.run(|| network.wire("par-c")).unwrap_err();
    assert!(matches!(err, NetworkError::NotReserved { .. }), "{err}");
    let ipam = fs::read_to_string(&config.ipam_file).unwrap();
    assert!(!ipam.contains("par-c"), "{ipam}");
    for id in ["par-a", "par-b"] {
        host.run(|| network.detach(id)).unwrap();
    }
    assert!(host.links("ltv").is_empty(), "{:?}", host.links("ltv"));
}

#[test]
fn attach_detach_cycles_leave_no_links_namespaces_addresses_or_rules() {
    let cycles: usize = std::env::var("LULL_NET_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let host = Host::new();
    let config = host.config();
    let network = host.start(config.clone());
    let keep = host
        .run(|| network.attach(&request("keep", "loop", true)))
        .unwrap();
    for i in 0..cycles {
        let id = format!("c{i}");
        let att = host
            .run(|| network.attach(&request(&id, "loop", i % 2 == 0)))
            .unwrap_or_else(|e| panic!("cycle {i}: attach: {e}"));
        assert_ne!(att.addr, keep.addr);
        host.run(|| network.detach(&id))
            .unwrap_or_else(|e| panic!("cycle {i}: detach: {e}"));
    }
    host.run(|| network.detach("keep")).unwrap();
    assert!(host.links("ltv").is_empty(), "{:?}", host.links("ltv"));
    let namespaces: Vec<_> = fs::read_dir(&config.netns_dir).unwrap().flatten().collect();
    assert!(namespaces.is_empty(), "{namespaces:?}");
    let files: Vec<_> = fs::read_dir(&config.files_dir).unwrap().flatten().collect();
    assert!(files.is_empty(), "{files:?}");
    let ipam = fs::read_to_string(&config.ipam_file).unwrap();
    let state: serde_json::Value = serde_json::from_str(&ipam).unwrap();
    assert_eq!(state["allocations"], serde_json::json!({}), "{ipam}");
    assert!(host.run(|| network.firewall().peers()).unwrap().is_empty());
    assert!(
        mounts_under(&config.netns_dir).is_empty(),
        "namespace mounts left"
    );
}

#[test]
fn a_crash_mid_way_is_reconciled_on_restart() {
    let host = Host::new();
    let config = host.config();
    // The child attaches instances forever, printing each id; spawned from a thread inside
    // the host namespace, it lives there.
    let mut child = host
        .run(|| {
            Command::new(env!("CARGO_BIN_EXE_lull-test-network-crash"))
                .arg(host.scratch.path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
        })
        .unwrap();
    // Let it attach a few, then kill it wherever it is.
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut attached = Vec::new();
    while attached.len() < 6 {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(!line.is_empty(), "the child ended early");
        if line.starts_with('k') {
            attached.push(line.trim().to_string());
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
    assert!(host.links("ltv").len() >= 6);

    // Restart: two of the instances still run, the rest are gone.
    let network = host.start(config.clone());
    let live: Vec<LiveInstance> = ["k1", "k4"]
        .iter()
        .map(|id| LiveInstance {
            instance: (*id).into(),
            service: "crash".into(),
            allow_peers: true,
        })
        .collect();
    let report = host.run(|| network.reconcile(&live)).unwrap();
    assert_eq!(report.adopted, vec!["k1", "k4"], "{report:?}");
    assert!(report.lost.is_empty(), "{report:?}");
    assert!(report.removed_namespaces.len() >= 4, "{report:?}");
    let mut links = host.links("ltv");
    links.sort();
    let mut expected: Vec<String> = ["k1", "k4"]
        .iter()
        .map(|id| network.attachment(id).unwrap().host_ifname)
        .collect();
    expected.sort();
    assert_eq!(links, expected);
    let namespaces: BTreeSet<String> = fs::read_dir(&config.netns_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(namespaces, BTreeSet::from(["k1".into(), "k4".into()]));
    let ipam: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&config.ipam_file).unwrap()).unwrap();
    assert_eq!(ipam["allocations"].as_object().unwrap().len(), 2, "{ipam}");
    // The survivors still talk to each other (peers rebuilt) and the host still reaches them.
    let k1 = network.attachment("k1").unwrap();
    let k4 = network.attachment("k4").unwrap();
    assert_eq!(host.run(|| network.firewall().peers()).unwrap().len(), 2);
    assert!(can_connect(&host, &k1.netns, Some(&k4.netns), k4.addr));
    // New instances do not get the survivors' addresses.
    let fresh = host
        .run(|| network.attach(&request("fresh", "crash", false)))
        .unwrap();
    assert!(fresh.addr != k1.addr && fresh.addr != k4.addr);
}

/// Two instances of the fixture app, each in the network `HostNetwork` gave it: distinct
/// addresses, each answering the host on its own, each seeing its own resolver files.
#[test]
fn two_fixture_app_instances_answer_the_host_on_their_addresses() {
    use lull_runtime::host::Runtime;
    use lull_runtime::instance::{FileBind, InstanceRequest, ProcessOverrides};
    use lull_runtime::logs::LogLimits;
    use lull_tests::e2e::{FIXTURE_APP, HELLO, InstanceGuard, TestRuntime, reference};

    let host = Host::new();
    let network = host.start(host.config());
    let t = TestRuntime::new(
        "lull-net-app",
        Path::new(env!("CARGO_BIN_EXE_lull-test-zygote")),
    );
    let tokio = tokio::runtime::Runtime::new().unwrap();
    lull_tests::e2e::require_registry();
    let image = tokio
        .block_on(
            t.runtime
                .store
                .pull(&reference(FIXTURE_APP), &Default::default()),
        )
        .unwrap();
    let layers = tokio.block_on(t.runtime.prepare(&image)).unwrap();
    let port = 8080;
    let mut running = Vec::new();
    for id in ["app-1", "app-2"] {
        let att = host
            .run(|| network.attach(&request(id, "app", false)))
            .unwrap();
        let request = InstanceRequest {
            id: id.into(),
            layers: layers.clone(),
            image: Runtime::image_process(&image),
            overrides: ProcessOverrides {
                port: Some(port),
                ..Default::default()
            },
            resources: Default::default(),
            netns: Some(att.netns.clone()),
            files: att
                .files()
                .map(|(source, destination)| FileBind::new(source, destination))
                .to_vec(),
            log_limits: LogLimits::default(),
        };
        let instance = tokio
            .block_on(t.runtime.instances.launch(request))
            .unwrap_or_else(|e| panic!("launch {id}: {e}"));
        running.push((att, InstanceGuard::new(&t.runtime.instances, instance)));
    }
    assert_ne!(running[0].0.addr, running[1].0.addr);
    for (att, _) in &running {
        let target = SocketAddr::from((att.addr, port));
        let started = std::time::Instant::now();
        let answer = loop {
            match host.run(|| lull_tests::http::get_at(target, "/", Duration::from_secs(2))) {
                Ok(r) => break r,
                Err(e) if started.elapsed() > Duration::from_secs(20) => {
                    panic!("{} never answered on {target}: {e}", att.instance)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        assert_eq!((answer.status, answer.body.as_str()), (200, HELLO));
    }
    for (att, guard) in &running {
        // The app sees the files lull wrote: its own name on its own address, the resolver.
        let root = PathBuf::from(format!("/proc/{}/root", guard.state.init_pid));
        let hosts = fs::read_to_string(root.join("etc/hosts")).unwrap();
        assert!(
            hosts.contains(&format!("{}\t{}", att.addr, att.instance)),
            "{hosts}"
        );
        let resolv = fs::read_to_string(root.join("etc/resolv.conf")).unwrap();
        assert_eq!(resolv, fs::read_to_string(&att.resolv_conf).unwrap());
    }
    for (att, guard) in running {
        tokio.block_on(guard.delete()).unwrap();
        host.run(|| network.detach(&att.instance)).unwrap();
    }
}

#[test]
fn an_ipv6_subnet_gives_instances_a_second_address() {
    use std::net::{Ipv6Addr, SocketAddrV6};

    let host = Host::new();
    let mut config = host.config();
    config.subnet6 = Some(("fd00:6c75:6c6c::".parse().unwrap(), 64));
    let network = host.start(config.clone());
    let a = host
        .run(|| network.attach(&request("six", "six", false)))
        .unwrap();
    let addr6 = a.addr6.expect("an IPv6 address");
    assert_eq!(addr6, config.addr6_for(a.addr).unwrap());
    let forwarding = host
        .run(|| fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding"))
        .unwrap();
    assert_eq!(forwarding.trim(), "1");

    // The host reaches the instance over IPv6 (no duplicate address detection to wait for).
    let ns = NetNs::open(&config.netns_dir, "six").unwrap();
    let listener = ns
        .run_in(|| TcpListener::bind(SocketAddrV6::new(addr6, 0, 0, 0)))
        .unwrap()
        .unwrap();
    let target = listener.local_addr().unwrap();
    let server = serve_peer_address(listener);
    let stream = host
        .run(|| TcpStream::connect_timeout(&target, Duration::from_secs(5)))
        .unwrap();
    let gateway6: Ipv6Addr = "fd00:6c75:6c6c::1".parse().unwrap();
    assert_eq!(read_all(stream), gateway6.to_string());
    server.join().unwrap();
    host.run(|| network.detach("six")).unwrap();
}

/// Leftovers made on purpose, as a crash at each step of an attach would leave them: a
/// namespace whose veth pair was never made (rewired), an address record with no namespace
/// (released), a namespace with no address record (removed), an empty mount point (removed).
#[test]
fn every_kind_of_leftover_is_reconciled() {
    use lull_netns::ipam::Ipam;

    let host = Host::new();
    let config = host.config();
    let network = host.start(config.clone());
    let whole = host
        .run(|| network.attach(&request("whole", "s", false)))
        .unwrap();
    {
        let mut ipam = Ipam::open(&config.ipam_file, config.subnet).unwrap();
        ipam.allocate("unwired").unwrap();
        ipam.allocate("no-namespace").unwrap();
    }
    host.run(|| {
        NetNs::create(&config.netns_dir, "unwired").unwrap();
        NetNs::create(&config.netns_dir, "no-address").unwrap();
    });
    fs::write(config.netns_dir.join("empty-mount-point"), b"").unwrap();

    let network = host.start(config.clone());
    let live: Vec<LiveInstance> = ["whole", "unwired", "no-namespace", "no-address"]
        .iter()
        .map(|id| LiveInstance {
            instance: (*id).into(),
            service: "s".into(),
            allow_peers: false,
        })
        .collect();
    let report = host.run(|| network.reconcile(&live)).unwrap();
    assert_eq!(report.adopted, vec!["whole"], "{report:?}");
    assert_eq!(report.rewired, vec!["unwired"], "{report:?}");
    let mut lost = report.lost.clone();
    lost.sort();
    assert_eq!(lost, vec!["no-address", "no-namespace"], "{report:?}");
    assert_eq!(
        report.removed_namespaces,
        vec!["empty-mount-point"],
        "{report:?}"
    );

    // The rewired one works; the lost ones left nothing.
    let unwired = network.attachment("unwired").expect("rewired and attached");
    let listener = listen_in(&unwired.netns, unwired.addr);
    let target = listener.local_addr().unwrap();
    host.run(|| TcpStream::connect_timeout(&target, Duration::from_secs(5)))
        .expect("the host reaches the rewired instance");
    assert_eq!(host.links("ltv").len(), 2);
    let namespaces: BTreeSet<String> = fs::read_dir(&config.netns_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        namespaces,
        BTreeSet::from(["whole".into(), "unwired".into()])
    );
    let ipam = Ipam::open(&config.ipam_file, config.subnet).unwrap();
    let owners: BTreeSet<&str> = ipam.allocations().map(|(_, o)| o).collect();
    assert_eq!(owners, BTreeSet::from(["whole", "unwired"]));
    assert_eq!(network.attachment("whole").unwrap().addr, whole.addr);
}

/// `remove_host_network` takes everything away with no network started, and nothing else.
#[test]
fn the_network_comes_down_without_being_started() {
    let host = Host::new();
    let config = host.config();
    let network = host.start(config.clone());
    for id in ["d1", "d2"] {
        host.run(|| network.attach(&request(id, "s", true)))
            .unwrap();
    }
    drop(network);
    host.run(|| lull_netns::network::remove_host_network(&config))
        .unwrap();
    assert!(host.links("ltv").is_empty());
    assert!(host.links("lulltest0").is_empty());
    assert_eq!(host.links(UPLINK_BRIDGE), vec![UPLINK_BRIDGE.to_string()]);
    let out = host
        .run(|| Command::new("nft").args(["list", "tables"]).output())
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("lulltest"),
        "table left"
    );
    assert!(fs::read_dir(&config.netns_dir).unwrap().next().is_none());
}
