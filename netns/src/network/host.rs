//! [`HostNetwork`]: the bridge, the firewall table and one namespace and veth pair per instance,
//! on the real host.
//!
//! Address allocations live in the ipam state file, locked (`flock`) for the length of every
//! change, so a `lull` command running beside the daemon can never hand out an address twice.
//! The links carry their instance in their alias, and the namespaces are named after their
//! instance, so after a crash [`HostNetwork::reconcile`] can tell what belongs to whom.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::fcntl::{Flock, FlockArg};
use tracing::{debug, info, info_span, warn};

use super::names::{instance_of_alias, link_alias, veth_name};
use super::{
    AttachRequest, Attachment, InstanceNetwork, LiveInstance, NetworkConfig, NetworkError,
    ReconcileReport,
};
use crate::firewall::{self, Conflict, Firewall, FirewallConfig};
use crate::ipam::Ipam;
use crate::link::{self, Bridge, HostLink, InstanceLink, LinkError};
use crate::{NetNs, NetnsError, resolv, routes};

/// How many names to try for a host end whose hashed name is taken.
const NAME_ATTEMPTS: u32 = 4;

/// What [`HostNetwork::start`] found on the host.
#[derive(Debug, Clone)]
pub struct StartReport {
    /// The interface egress leaves by.
    pub uplink: String,
    /// The MTU instances' links get.
    pub mtu: u32,
    /// Whether IP forwarding had to be switched on.
    pub forwarding_enabled: bool,
    /// Other tables' forward chains that would drop instances' traffic.
    pub conflicts: Vec<Conflict>,
}

/// Instance networking on this host.
#[derive(Debug)]
pub struct HostNetwork {
    config: NetworkConfig,
    bridge: Bridge,
    uplink: String,
    mtu: u32,
    firewall: Firewall,
    /// Wired instances.
    attachments: Mutex<BTreeMap<String, Attachment>>,
    /// Reserved instances waiting for [`InstanceNetwork::wire`] (`host_ifname` still empty).
    pending: Mutex<BTreeMap<String, Attachment>>,
}

impl HostNetwork {
    /// Sets the host up for instances: finds the uplink, checks the subnet against the host's
    /// routes, makes sure the bridge exists, switches forwarding on, installs the firewall table
    /// (replacing lull's own from an earlier run) and looks for firewalls that would drop the
    /// traffic. Leftover instance networks stay until [`HostNetwork::reconcile`].
    pub fn start(config: NetworkConfig) -> Result<(HostNetwork, StartReport), NetworkError> {
        config.validate()?;
        // One start at a time on this host (two `lull` commands racing to make the bridge).
        let _lock = lock_state(&config)?;
        let uplink = match &config.uplink {
            Some(name) => name.clone(),
            None => {
                let oif = routes::default_route_oif()
                    .map_err(NetworkError::HostLink)?
                    .ok_or(NetworkError::NoUplink)?;
                link::host_links("")
                    .map_err(NetworkError::HostLink)?
                    .into_iter()
                    .find(|l| l.index == oif)
                    .map(|l| l.name)
                    .ok_or(NetworkError::NoUplink)?
            }
        };
        let uplink_link = link::host_link(&uplink)
            .map_err(NetworkError::HostLink)?
            .ok_or_else(|| NetworkError::UplinkMissing {
                name: uplink.clone(),
            })?;
        // A veth takes at most 65535 (loopback, as a stand-in uplink, has 65536).
        let mtu = config.mtu.or(uplink_link.mtu).unwrap_or(1500).min(65535);
        check_subnet_is_free(&config)?;

        let bridge_existed = link::host_link(&config.bridge)
            .map_err(NetworkError::HostLink)?
            .is_some();
        let bridge = Bridge::ensure(
            &config.bridge,
            config.subnet.gateway(),
            config.subnet.prefix(),
        )
        .map_err(NetworkError::HostLink)?;
        // From here on, a failure takes away a bridge this call made.
        let (bridge, firewall, forwarding_enabled) =
            match finish_start(&config, bridge.clone(), &uplink) {
                Ok(done) => done,
                Err(e) => {
                    if !bridge_existed && let Err(undo) = bridge.remove() {
                        warn!(error = %undo, "could not remove the bridge of a failed start");
                    }
                    return Err(e);
                }
            };
        // Advisory: a failure to read other firewalls does not stop instances from starting.
        let conflicts = firewall::forward_conflicts(firewall.config()).unwrap_or_else(|e| {
            warn!(error = %e, "could not check other firewalls for rules that drop instances' traffic");
            Vec::new()
        });
        for conflict in &conflicts {
            warn!(%conflict, "another firewall would drop instances' traffic");
        }
        info!(
            bridge = config.bridge,
            subnet = %config.subnet,
            uplink,
            mtu,
            table = config.table,
            "instance network ready"
        );
        let report = StartReport {
            uplink: uplink.clone(),
            mtu,
            forwarding_enabled,
            conflicts,
        };
        Ok((
            HostNetwork {
                config,
                bridge,
                uplink,
                mtu,
                firewall,
                attachments: Mutex::new(BTreeMap::new()),
                pending: Mutex::new(BTreeMap::new()),
            },
            report,
        ))
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    pub fn bridge(&self) -> &Bridge {
        &self.bridge
    }

    pub fn uplink(&self) -> &str {
        &self.uplink
    }

    pub fn firewall(&self) -> &Firewall {
        &self.firewall
    }

    /// Removes everything this network put on the host: every instance's network, the
    /// firewall table and the bridge. For tests and uninstalling; instances lose their network.
    pub fn teardown(self) -> Result<(), NetworkError> {
        remove_host_network(&self.config)
    }

    fn lock_state(&self) -> Result<Flock<File>, NetworkError> {
        lock_state(&self.config)
    }

    fn open_ipam(&self) -> Result<Ipam, NetworkError> {
        open_ipam(&self.config)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Attachment>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives `instance`'s address back after a failed reserve or wire.
    fn release_address(&self, instance: &str) {
        let released = self.lock_state().and_then(|_lock| {
            self.open_ipam()?
                .release(instance)
                .map_err(NetworkError::State)
        });
        match released {
            Ok(Some(addr)) => forget_neighbours(&self.config, addr),
            Ok(None) => {}
            Err(e) => {
                warn!(instance, error = %e, "could not release the address of a failed attach")
            }
        }
    }

    /// Creates the veth pair, trying other names when the hashed one is taken by another
    /// instance's link; returns the host end's name.
    fn wire_link(
        &self,
        netns: &NetNs,
        instance: &str,
        addr: Ipv4Addr,
    ) -> Result<String, LinkError> {
        let alias = link_alias(&self.config.bridge, instance);
        let mut last = None;
        for attempt in 0..NAME_ATTEMPTS {
            let name = veth_name(&self.config.veth_prefix, instance, attempt);
            let wired = link::wire_instance(
                &self.bridge,
                netns,
                &InstanceLink {
                    host_ifname: &name,
                    alias: &alias,
                    addr,
                    addr6: self.config.addr6_for(addr),
                    mtu: Some(self.mtu),
                },
            );
            match wired {
                Ok(()) => return Ok(name),
                Err(e @ LinkError::Exists { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    fn files_dir(&self, instance: &str) -> PathBuf {
        self.config.files_dir.join(instance)
    }

    /// Writes the instance's resolv.conf and hosts; returns their paths.
    fn write_files(
        &self,
        instance: &str,
        hostname: &str,
        addr: Ipv4Addr,
    ) -> Result<(PathBuf, PathBuf), NetworkError> {
        let resolv_error = |source| NetworkError::Resolv {
            instance: instance.to_string(),
            source,
        };
        let hosts =
            resolv::instance_hosts(hostname, Some(IpAddr::V4(addr))).map_err(resolv_error)?;
        let resolv_conf = instance_resolv_conf(&self.config);
        let dir = self.files_dir(instance);
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| NetworkError::Io { what, path, source }
        };
        fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
        let (resolv_path, hosts_path) = (dir.join("resolv.conf"), dir.join("hosts"));
        fs::write(&resolv_path, resolv_conf).map_err(io("write", &resolv_path))?;
        fs::write(&hosts_path, hosts).map_err(io("write", &hosts_path))?;
        Ok((resolv_path, hosts_path))
    }

    fn remove_files(&self, instance: &str) -> Result<(), NetworkError> {
        remove_files(&self.config, instance)
    }

    /// The (source, destination) pairs that let `addr` and its service's other instances reach
    /// each other.
    fn peer_pairs(
        attachments: &BTreeMap<String, Attachment>,
        instance: &str,
        service: &str,
        addr: Ipv4Addr,
    ) -> Vec<(Ipv4Addr, Ipv4Addr)> {
        attachments
            .values()
            .filter(|a| a.service == service && a.allow_peers && a.instance != instance)
            .flat_map(|a| [(addr, a.addr), (a.addr, addr)])
            .collect()
    }

    /// Undoes a half-made attachment.
    fn undo(&self, instance: &str, netns: Option<NetNs>, veth: Option<&str>) {
        if let Some(veth) = veth
            && let Err(e) = link::unwire_instance(veth)
        {
            warn!(instance, link = veth, error = %e, "could not remove the veth pair of a failed attach");
        }
        if let Some(netns) = netns
            && let Err(e) = netns.destroy()
        {
            warn!(instance, error = %e, "could not remove the namespace of a failed attach");
        }
        if let Err(e) = self.remove_files(instance) {
            warn!(instance, error = %e, "could not remove the files of a failed attach");
        }
    }
}

impl InstanceNetwork for HostNetwork {
    fn attach(&self, request: &AttachRequest) -> Result<Attachment, NetworkError> {
        self.reserve(request)?;
        self.wire(&request.instance)
    }

    fn reserve(&self, request: &AttachRequest) -> Result<Attachment, NetworkError> {
        let instance = request.instance.as_str();
        let _span = info_span!("reserve", instance, service = %request.service).entered();
        let ns_error = |source| NetworkError::Namespace {
            instance: instance.to_string(),
            source,
        };
        crate::check_name(instance).map_err(ns_error)?;
        resolv::instance_hosts(&request.hostname, None).map_err(|source| NetworkError::Resolv {
            instance: instance.to_string(),
            source,
        })?;
        let attached = || NetworkError::AlreadyAttached {
            instance: instance.to_string(),
        };
        if self.attachment(instance).is_some() || self.pending().contains_key(instance) {
            return Err(attached());
        }
        // The address under the state lock (other processes may hold it too); the rest of the
        // work is this instance's alone, so instances are reserved and wired in parallel.
        let addr = {
            let _lock = self.lock_state()?;
            let mut ipam = self.open_ipam()?;
            if ipam.address_of(instance).is_some() {
                return Err(attached());
            }
            // First the address: an exhausted subnet fails here, before anything exists.
            ipam.allocate(instance)
                .map_err(|source| NetworkError::Ipam {
                    instance: instance.to_string(),
                    source,
                })?
        };
        let made = (|| {
            let netns = NetNs::create(&self.config.netns_dir, instance).map_err(ns_error)?;
            let (resolv_conf, hosts) = match self.write_files(instance, &request.hostname, addr) {
                Ok(files) => files,
                Err(e) => {
                    self.undo(instance, Some(netns), None);
                    return Err(e);
                }
            };
            Ok(Attachment {
                instance: instance.to_string(),
                service: request.service.clone(),
                allow_peers: request.allow_peers,
                netns: netns.path().to_path_buf(),
                addr,
                addr6: self.config.addr6_for(addr),
                gateway: self.bridge.gateway(),
                host_ifname: String::new(),
                resolv_conf,
                hosts,
            })
        })();
        match made {
            Ok(reserved) => {
                debug!(%addr, "reserved");
                self.pending()
                    .insert(instance.to_string(), reserved.clone());
                Ok(reserved)
            }
            Err(e) => {
                self.release_address(instance);
                Err(e)
            }
        }
    }

    fn wire(&self, instance: &str) -> Result<Attachment, NetworkError> {
        let _span = info_span!("wire", instance).entered();
        let Some(mut attachment) = self.pending().remove(instance) else {
            return Err(NetworkError::NotReserved {
                instance: instance.to_string(),
            });
        };
        let failed = |e: NetworkError, veth: Option<&str>| {
            let netns = NetNs::open(&self.config.netns_dir, instance).ok();
            self.undo(instance, netns, veth);
            self.release_address(instance);
            e
        };
        let netns = match NetNs::open(&self.config.netns_dir, instance) {
            Ok(netns) => netns,
            Err(source) => {
                let e = NetworkError::Namespace {
                    instance: instance.to_string(),
                    source,
                };
                return Err(failed(e, None));
            }
        };
        let veth = match self.wire_link(&netns, instance, attachment.addr) {
            Ok(veth) => veth,
            Err(source) => {
                let e = NetworkError::Link {
                    instance: instance.to_string(),
                    source,
                };
                return Err(failed(e, None));
            }
        };
        attachment.host_ifname = veth;
        // Peers and the map together, so two instances of a service wired at once each see
        // the other.
        let mut attachments = self.attachments.lock().unwrap_or_else(|p| p.into_inner());
        if attachment.allow_peers {
            let pairs =
                Self::peer_pairs(&attachments, instance, &attachment.service, attachment.addr);
            if !pairs.is_empty()
                && let Err(e) = self.firewall.allow_peers(&pairs)
            {
                drop(attachments);
                return Err(failed(e.into(), Some(&attachment.host_ifname)));
            }
        }
        debug!(addr = %attachment.addr, link = attachment.host_ifname, "attached");
        attachments.insert(instance.to_string(), attachment.clone());
        Ok(attachment)
    }

    fn detach(&self, instance: &str) -> Result<(), NetworkError> {
        let _span = info_span!("detach", instance).entered();
        remove_instance_network(&self.config, instance)?;
        self.pending().remove(instance);
        self.attachments
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(instance);
        debug!("detached");
        Ok(())
    }

    fn reconcile(&self, live: &[LiveInstance]) -> Result<ReconcileReport, NetworkError> {
        let _span = info_span!("reconcile", live = live.len()).entered();
        let mut attachments = self.attachments.lock().unwrap_or_else(|p| p.into_inner());
        let _lock = self.lock_state()?;
        let mut report = ReconcileReport::default();
        let live_ids: HashSet<String> = live.iter().map(|l| l.instance.clone()).collect();

        // Links: lull's (by alias) of dead instances go; others with the prefix are reported.
        let mut live_links: BTreeMap<String, String> = BTreeMap::new();
        for l in link::host_links(&self.config.veth_prefix).map_err(NetworkError::HostLink)? {
            let owner = l
                .alias
                .as_deref()
                .and_then(|a| instance_of_alias(&self.config.bridge, a));
            match owner {
                Some(owner) if l.is_veth() => {
                    if live_ids.contains(owner) {
                        live_links.insert(owner.to_string(), l.name.clone());
                    } else {
                        link::unwire_instance(&l.name).map_err(NetworkError::HostLink)?;
                        report.removed_links.push(l.name.clone());
                    }
                }
                _ => {
                    if l.alias.as_deref().is_none_or(|a| !a.starts_with("lull:")) {
                        warn!(
                            link = l.name,
                            "a link with lull's name prefix that lull did not make: left alone"
                        );
                        report.foreign_links.push(l.name.clone());
                    }
                }
            }
        }

        // Namespaces of dead instances go.
        let mut live_namespaces: HashSet<String> = HashSet::new();
        match fs::read_dir(&self.config.netns_dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if live_ids.contains(&name) {
                        live_namespaces.insert(name);
                        continue;
                    }
                    match NetNs::open(&self.config.netns_dir, &name) {
                        Ok(netns) => netns.destroy().map_err(|source| NetworkError::Namespace {
                            instance: name.clone(),
                            source,
                        })?,
                        // An empty mount point left by a crash in the middle of a create.
                        Err(NetnsError::NotANamespace { path }) => remove_file(&path)?,
                        Err(NetnsError::NotFound { .. }) => continue,
                        Err(source) => {
                            return Err(NetworkError::Namespace {
                                instance: name,
                                source,
                            });
                        }
                    }
                    report.removed_namespaces.push(name);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(NetworkError::Io {
                    what: "list",
                    path: self.config.netns_dir.clone(),
                    source,
                });
            }
        }

        // Files of dead instances go.
        if let Ok(entries) = fs::read_dir(&self.config.files_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !live_ids.contains(&name) {
                    self.remove_files(&name)?;
                }
            }
        }

        // Addresses of dead instances go back.
        let mut ipam = self.open_ipam()?;
        report.released_addresses = ipam.reconcile(&live_ids).map_err(NetworkError::State)?;
        for (addr, _) in &report.released_addresses {
            forget_neighbours(&self.config, *addr);
        }

        // Live instances: adopt, rewire, or report lost.
        attachments.clear();
        self.pending().clear();
        let mut peers = Vec::new();
        for l in live {
            let instance = l.instance.as_str();
            let addr = ipam.address_of(instance);
            let netns = if live_namespaces.contains(instance) {
                NetNs::open(&self.config.netns_dir, instance).map_err(|e| e.to_string())
            } else {
                Err("gone".to_string())
            };
            let (addr, netns) = match (addr, netns) {
                (Some(addr), Ok(netns)) => (addr, netns),
                (addr, netns) => {
                    // Its namespace or its address record is unusable: take what is left of its
                    // network away (so an address it may still hold is not handed out twice,
                    // and no peer pair outlives it) and have the caller restart it.
                    warn!(
                        instance,
                        address = ?addr,
                        namespace = ?netns.err(),
                        "the instance's network cannot be adopted: it must be restarted"
                    );
                    remove_instance_locked(&self.config, instance, &mut ipam)?;
                    report.lost.push(instance.to_string());
                    continue;
                }
            };
            let host_ifname = match live_links.get(instance) {
                Some(name) => {
                    report.adopted.push(instance.to_string());
                    name.clone()
                }
                None => {
                    // A crash between creating the namespace and wiring it: finish the job.
                    let name = self.wire_link(&netns, instance, addr).map_err(|source| {
                        NetworkError::Link {
                            instance: instance.to_string(),
                            source,
                        }
                    })?;
                    report.rewired.push(instance.to_string());
                    name
                }
            };
            let hostname = instance.to_string();
            let (resolv_conf, hosts) = match (
                self.files_dir(instance).join("resolv.conf"),
                self.files_dir(instance).join("hosts"),
            ) {
                (r, h) if r.exists() && h.exists() => (r, h),
                _ => self.write_files(instance, &hostname, addr)?,
            };
            if l.allow_peers {
                peers.extend(Self::peer_pairs(&attachments, instance, &l.service, addr));
            }
            attachments.insert(
                instance.to_string(),
                Attachment {
                    instance: instance.to_string(),
                    service: l.service.clone(),
                    allow_peers: l.allow_peers,
                    netns: netns.path().to_path_buf(),
                    addr,
                    addr6: self.config.addr6_for(addr),
                    gateway: self.bridge.gateway(),
                    host_ifname,
                    resolv_conf,
                    hosts,
                },
            );
        }
        // The peer set is rebuilt from what runs now.
        let stale: Vec<_> = self
            .firewall
            .peers()?
            .into_iter()
            .filter(|p| !peers.contains(p))
            .collect();
        if !stale.is_empty() {
            self.firewall.revoke_peers(&stale)?;
        }
        if !peers.is_empty() {
            self.firewall.allow_peers(&peers)?;
        }
        info!(
            adopted = report.adopted.len(),
            rewired = report.rewired.len(),
            lost = report.lost.len(),
            removed_links = report.removed_links.len(),
            removed_namespaces = report.removed_namespaces.len(),
            released = report.released_addresses.len(),
            foreign = report.foreign_links.len(),
            "reconciled instance networks"
        );
        Ok(report)
    }

    fn attachment(&self, instance: &str) -> Option<Attachment> {
        self.attachments
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(instance)
            .cloned()
    }
}

/// Removes `instance`'s network from the host, whatever state it is in and whether or not a
/// network was started in this process: its veth pair (found by its alias), namespace, files,
/// address and the peer pairs naming that address. Nothing of it left is fine.
pub fn remove_instance_network(config: &NetworkConfig, instance: &str) -> Result<(), NetworkError> {
    let _lock = lock_state(config)?;
    let mut ipam = open_ipam(config)?;
    remove_instance_locked(config, instance, &mut ipam)
}

/// [`remove_instance_network`] under a lock the caller holds.
fn remove_instance_locked(
    config: &NetworkConfig,
    instance: &str,
    ipam: &mut Ipam,
) -> Result<(), NetworkError> {
    let link_error = |source| NetworkError::Link {
        instance: instance.to_string(),
        source,
    };
    if let Some(link) = find_link(config, instance).map_err(link_error)? {
        link::unwire_instance(&link.name).map_err(link_error)?;
    }
    match NetNs::open(&config.netns_dir, instance) {
        Ok(netns) => netns.destroy().map_err(|source| NetworkError::Namespace {
            instance: instance.to_string(),
            source,
        })?,
        Err(NetnsError::NotFound { .. }) => {}
        Err(NetnsError::NotANamespace { path }) => remove_file(&path)?,
        Err(source) => {
            return Err(NetworkError::Namespace {
                instance: instance.to_string(),
                source,
            });
        }
    }
    remove_files(config, instance)?;
    let released = ipam
        .release(instance)
        .map_err(|source| NetworkError::Ipam {
            instance: instance.to_string(),
            source,
        })?;
    if let Some(addr) = released {
        forget_neighbours(config, addr);
        let revoked = firewall::revoke_address(&config.table, addr)?;
        debug!(instance, %addr, revoked, "released the address and its peer pairs");
    }
    Ok(())
}

/// Removes the host's permanent neighbour entries for `addr` (see
/// [`link::forget_instance_neighbours`]); a failure is only logged, since an entry left
/// behind is right for the next instance given the address.
fn forget_neighbours(config: &NetworkConfig, addr: Ipv4Addr) {
    let mut addrs = vec![IpAddr::V4(addr)];
    addrs.extend(config.addr6_for(addr).map(IpAddr::V6));
    if let Err(e) = link::forget_instance_neighbours(&config.bridge, &addrs) {
        warn!(%addr, error = %e, "could not remove the neighbour entries of a released address");
    }
}

/// Removes everything lull's network has on the host, with no network started: every
/// instance's network (links by alias, namespaces, files, addresses), the firewall table and
/// the bridge. Links, tables and bridges without lull's marks are refused, never deleted.
pub fn remove_host_network(config: &NetworkConfig) -> Result<(), NetworkError> {
    config.validate()?;
    let _lock = lock_state(config)?;
    let mut ipam = open_ipam(config)?;
    let mut instances: Vec<String> = ipam.allocations().map(|(_, o)| o.to_string()).collect();
    for l in link::host_links(&config.veth_prefix).map_err(NetworkError::HostLink)? {
        if let Some(owner) = l
            .alias
            .as_deref()
            .and_then(|a| instance_of_alias(&config.bridge, a))
        {
            instances.push(owner.to_string());
        }
    }
    for dir in [&config.netns_dir, &config.files_dir] {
        if let Ok(entries) = fs::read_dir(dir) {
            instances.extend(
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned()),
            );
        }
    }
    instances.sort();
    instances.dedup();
    for instance in &instances {
        remove_instance_locked(config, instance, &mut ipam)?;
    }
    let table = firewall::remove_table(&config.table)?;
    let bridge = link::remove_bridge(&config.bridge).map_err(NetworkError::HostLink)?;
    info!(
        instances = instances.len(),
        table, bridge, "removed the instance network"
    );
    Ok(())
}

fn lock_state(config: &NetworkConfig) -> Result<Flock<File>, NetworkError> {
    let path = lock_path(&config.ipam_file);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|source| NetworkError::Io {
            what: "create directory",
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| NetworkError::Io {
            what: "open lock file",
            path: path.clone(),
            source,
        })?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| NetworkError::Io {
        what: "lock",
        path,
        source: errno.into(),
    })
}

fn open_ipam(config: &NetworkConfig) -> Result<Ipam, NetworkError> {
    Ipam::open(&config.ipam_file, config.subnet).map_err(NetworkError::State)
}

/// The host end of `instance`'s veth pair, found by its alias.
fn find_link(config: &NetworkConfig, instance: &str) -> Result<Option<HostLink>, LinkError> {
    let first = veth_name(&config.veth_prefix, instance, 0);
    let is_its = |l: &HostLink| {
        l.is_veth()
            && l.alias
                .as_deref()
                .and_then(|a| instance_of_alias(&config.bridge, a))
                == Some(instance)
    };
    if let Some(link) = link::host_link(&first)?
        && is_its(&link)
    {
        return Ok(Some(link));
    }
    Ok(link::host_links(&config.veth_prefix)?
        .into_iter()
        .find(is_its))
}

fn remove_files(config: &NetworkConfig, instance: &str) -> Result<(), NetworkError> {
    let dir = config.files_dir.join(instance);
    match fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetworkError::Io {
            what: "remove",
            path: dir,
            source,
        }),
    }
}

/// The part of [`HostNetwork::start`] after the bridge exists: its IPv6 address, forwarding,
/// the firewall table.
fn finish_start(
    config: &NetworkConfig,
    mut bridge: Bridge,
    uplink: &str,
) -> Result<(Bridge, Firewall, bool), NetworkError> {
    if let Some((gateway6, prefix6)) = config.gateway6() {
        bridge
            .ensure_ipv6(gateway6, prefix6)
            .map_err(NetworkError::HostLink)?;
    }
    let forwarding_enabled = firewall::enable_forwarding(config.subnet6.is_some())?;
    if forwarding_enabled {
        info!(
            "switched on IP forwarding (net.ipv4.ip_forward) so instances can reach the \
             outside through {uplink}"
        );
    }
    let firewall = Firewall::install(firewall_config(config, uplink))?;
    Ok((bridge, firewall, forwarding_enabled))
}

fn lock_path(ipam_file: &Path) -> PathBuf {
    let mut name = ipam_file
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".lock");
    ipam_file.with_file_name(name)
}

fn remove_file(path: &Path) -> Result<(), NetworkError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetworkError::Io {
            what: "remove",
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn firewall_config(config: &NetworkConfig, uplink: &str) -> FirewallConfig {
    FirewallConfig {
        table: config.table.clone(),
        bridge: config.bridge.clone(),
        subnet: config.subnet,
        subnet6: config.subnet6,
        uplink: uplink.to_string(),
        host_ports: config.host_ports.clone(),
        allow_metadata: config.allow_metadata,
    }
}

/// Refuses a subnet that overlaps a route already on the host, other than lull's own bridge's.
fn check_subnet_is_free(config: &NetworkConfig) -> Result<(), NetworkError> {
    let bridge_index = link::host_link(&config.bridge)
        .map_err(NetworkError::HostLink)?
        .map(|l| l.index);
    let links = link::host_links("").map_err(NetworkError::HostLink)?;
    for route in routes::ipv4_routes().map_err(NetworkError::HostLink)? {
        if route.oif.is_some() && route.oif == bridge_index {
            continue;
        }
        if route.overlaps(&config.subnet) {
            let interface = route
                .oif
                .and_then(|oif| links.iter().find(|l| l.index == oif))
                .map_or_else(|| "no interface".to_string(), |l| l.name.clone());
            return Err(NetworkError::SubnetOverlap {
                subnet: config.subnet,
                route: route.to_string(),
                interface,
            });
        }
    }
    Ok(())
}

/// The host's resolver settings made usable from inside an instance; when nothing usable is
/// left, a file that says so (the instance then has no DNS, which it reports on its own).
fn instance_resolv_conf(config: &NetworkConfig) -> String {
    let host = fs::read_to_string(&config.host_resolv_conf).unwrap_or_default();
    let upstreams = if config.dns.is_empty() {
        fs::read_to_string(&config.resolved_conf)
            .map(|text| resolv::upstreams_from_systemd_resolved(&text))
            .unwrap_or_default()
    } else {
        config.dns.clone()
    };
    match resolv::instance_resolv_conf(&host, &upstreams) {
        Ok(text) => text,
        Err(e) => {
            warn!(error = %e, "instances get no nameserver");
            format!("# generated by lull: {e}\n")
        }
    }
}
