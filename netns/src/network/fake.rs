//! [`FakeNetwork`]: the bookkeeping of [`super::HostNetwork`] (addresses, one attachment per
//! instance, peers, reconcile) in memory, for tests of code that drives instance networks.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::sync::Mutex;

use super::names::veth_name;
use super::{
    AttachRequest, Attachment, InstanceNetwork, LiveInstance, NetworkConfig, NetworkError,
    ReconcileReport,
};
use crate::ipam::IpamError;

#[derive(Debug, Default)]
struct State {
    attachments: BTreeMap<String, Attachment>,
    /// Allowed (source, destination) pairs, as the firewall's peer set would hold them.
    peers: BTreeSet<(Ipv4Addr, Ipv4Addr)>,
    /// Instance ids whose next attach fails (to test callers' error paths).
    fail_next: HashSet<String>,
    /// Attachments left behind by a simulated crash: present, but no longer in `attachments`.
    leftovers: BTreeMap<String, Attachment>,
}

/// Instance networking in memory.
#[derive(Debug)]
pub struct FakeNetwork {
    config: NetworkConfig,
    state: Mutex<State>,
}

impl FakeNetwork {
    pub fn new(config: NetworkConfig) -> FakeNetwork {
        FakeNetwork {
            config,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the next attach of `instance` fail as if its veth pair could not be made.
    pub fn fail_next_attach(&self, instance: &str) {
        self.state().fail_next.insert(instance.to_string());
    }

    /// Whether `from` may open connections to `to`, by the rules the real firewall applies to
    /// instance-to-instance traffic.
    pub fn can_connect(&self, from: &str, to: &str) -> bool {
        let state = self.state();
        match (state.attachments.get(from), state.attachments.get(to)) {
            (Some(a), Some(b)) => state.peers.contains(&(a.addr, b.addr)),
            _ => false,
        }
    }

    /// Forgets the in-memory view while keeping everything "on the host", as a crash of the
    /// process holding the network would.
    pub fn simulate_crash(&self) {
        let mut state = self.state();
        let attachments = std::mem::take(&mut state.attachments);
        state.leftovers.extend(attachments);
    }

    /// Every instance whose network exists, attached or left over.
    pub fn instances(&self) -> Vec<String> {
        let state = self.state();
        state
            .attachments
            .keys()
            .chain(state.leftovers.keys())
            .cloned()
            .collect()
    }

    fn used(state: &State) -> BTreeSet<Ipv4Addr> {
        state
            .attachments
            .values()
            .chain(state.leftovers.values())
            .map(|a| a.addr)
            .collect()
    }
}

impl InstanceNetwork for FakeNetwork {
    fn attach(&self, request: &AttachRequest) -> Result<Attachment, NetworkError> {
        let instance = request.instance.clone();
        crate::check_name(&instance).map_err(|source| NetworkError::Namespace {
            instance: instance.clone(),
            source,
        })?;
        let mut state = self.state();
        if state.attachments.contains_key(&instance) || state.leftovers.contains_key(&instance) {
            return Err(NetworkError::AlreadyAttached { instance });
        }
        let used = Self::used(&state);
        let subnet = self.config.subnet;
        let addr = subnet
            .instance_addresses()
            .find(|a| !used.contains(a))
            .ok_or_else(|| NetworkError::Ipam {
                instance: instance.clone(),
                source: IpamError::Exhausted {
                    subnet,
                    in_use: used.len(),
                },
            })?;
        if state.fail_next.remove(&instance) {
            return Err(NetworkError::Link {
                instance: instance.clone(),
                source: crate::link::LinkError::Vanished {
                    name: veth_name(&self.config.veth_prefix, &instance, 0),
                },
            });
        }
        let files = self.config.files_dir.join(&instance);
        let attachment = Attachment {
            instance: instance.clone(),
            service: request.service.clone(),
            allow_peers: request.allow_peers,
            netns: self.config.netns_dir.join(&instance),
            addr,
            addr6: self.config.addr6_for(addr),
            gateway: subnet.gateway(),
            host_ifname: veth_name(&self.config.veth_prefix, &instance, 0),
            resolv_conf: files.join("resolv.conf"),
            hosts: files.join("hosts"),
        };
        if request.allow_peers {
            let peers: Vec<Ipv4Addr> = state
                .attachments
                .values()
                .filter(|a| a.service == request.service && a.allow_peers)
                .map(|a| a.addr)
                .collect();
            for peer in peers {
                state.peers.insert((addr, peer));
                state.peers.insert((peer, addr));
            }
        }
        state.attachments.insert(instance, attachment.clone());
        Ok(attachment)
    }

    fn detach(&self, instance: &str) -> Result<(), NetworkError> {
        let mut state = self.state();
        let removed = state
            .attachments
            .remove(instance)
            .or_else(|| state.leftovers.remove(instance));
        if let Some(a) = removed {
            state.peers.retain(|(s, d)| *s != a.addr && *d != a.addr);
        }
        Ok(())
    }

    fn reconcile(&self, live: &[LiveInstance]) -> Result<ReconcileReport, NetworkError> {
        let mut state = self.state();
        let mut report = ReconcileReport::default();
        let mut all = std::mem::take(&mut state.attachments);
        all.extend(std::mem::take(&mut state.leftovers));
        state.peers.clear();
        for (id, attachment) in all {
            match live.iter().find(|l| l.instance == id) {
                Some(l) => {
                    let mut attachment = attachment;
                    attachment.service = l.service.clone();
                    attachment.allow_peers = l.allow_peers;
                    report.adopted.push(id.clone());
                    state.attachments.insert(id, attachment);
                }
                None => {
                    report.removed_links.push(attachment.host_ifname.clone());
                    report.removed_namespaces.push(id.clone());
                    report.released_addresses.push((attachment.addr, id));
                }
            }
        }
        for l in live {
            if !state.attachments.contains_key(&l.instance) {
                report.lost.push(l.instance.clone());
            }
        }
        let peers: Vec<(Ipv4Addr, Ipv4Addr)> = {
            let list: Vec<&Attachment> = state
                .attachments
                .values()
                .filter(|a| a.allow_peers)
                .collect();
            list.iter()
                .flat_map(|a| {
                    list.iter()
                        .filter(|b| b.service == a.service && b.instance != a.instance)
                        .map(|b| (a.addr, b.addr))
                })
                .collect()
        };
        state.peers.extend(peers);
        Ok(report)
    }

    fn attachment(&self, instance: &str) -> Option<Attachment> {
        self.state().attachments.get(instance).cloned()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::ipam::Subnet;

    fn network(subnet: &str) -> FakeNetwork {
        let mut config = NetworkConfig::new(Path::new("/data"), Path::new("/run"));
        config.subnet = Subnet::parse(subnet).unwrap();
        FakeNetwork::new(config)
    }

    fn request(instance: &str, service: &str, allow_peers: bool) -> AttachRequest {
        AttachRequest {
            instance: instance.into(),
            service: service.into(),
            allow_peers,
            hostname: instance.into(),
        }
    }

    #[test]
    fn addresses_are_distinct_and_exhaustion_is_an_error() {
        let net = network("10.9.0.0/29");
        let addrs: BTreeSet<_> = (0..5)
            .map(|i| {
                net.attach(&request(&format!("i{i}"), "s", false))
                    .unwrap()
                    .addr
            })
            .collect();
        assert_eq!(addrs.len(), 5);
        let err = net.attach(&request("i5", "s", false)).unwrap_err();
        assert!(err.to_string().contains("exhausted"), "{err}");
        assert!(matches!(
            net.attach(&request("i0", "s", false)),
            Err(NetworkError::AlreadyAttached { .. })
        ));
        net.detach("i0").unwrap();
        net.attach(&request("i5", "s", false)).unwrap();
    }

    #[test]
    fn peers_follow_services_and_the_flag() {
        let net = network("10.9.0.0/24");
        net.attach(&request("a1", "a", true)).unwrap();
        net.attach(&request("a2", "a", true)).unwrap();
        net.attach(&request("b1", "b", false)).unwrap();
        net.attach(&request("b2", "b", false)).unwrap();
        assert!(net.can_connect("a1", "a2") && net.can_connect("a2", "a1"));
        assert!(!net.can_connect("a1", "b1") && !net.can_connect("b1", "a1"));
        assert!(!net.can_connect("b1", "b2"));
        net.detach("a2").unwrap();
        assert!(!net.can_connect("a1", "a2"));
    }

    #[test]
    fn reconcile_after_a_crash_keeps_the_live_and_drops_the_rest() {
        let net = network("10.9.0.0/24");
        for id in ["x", "y", "z"] {
            net.attach(&request(id, "s", true)).unwrap();
        }
        net.simulate_crash();
        assert!(net.attachment("x").is_none());
        let live = |id: &str| LiveInstance {
            instance: id.into(),
            service: "s".into(),
            allow_peers: true,
        };
        let report = net
            .reconcile(&[live("x"), live("z"), live("gone")])
            .unwrap();
        assert_eq!(report.adopted, vec!["x", "z"]);
        assert_eq!(report.removed_namespaces, vec!["y"]);
        assert_eq!(report.lost, vec!["gone"]);
        assert!(net.can_connect("x", "z"));
        assert_eq!(net.instances(), vec!["x", "z"]);
    }

    #[test]
    fn injected_failures_leave_nothing() {
        let net = network("10.9.0.0/24");
        net.fail_next_attach("w");
        assert!(net.attach(&request("w", "s", false)).is_err());
        assert!(net.instances().is_empty());
        net.attach(&request("w", "s", false)).unwrap();
    }
}
