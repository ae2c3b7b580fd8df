//! Instance networking as one capability: [`InstanceNetwork`] gives an instance its namespace,
//! address, veth pair, firewall membership and resolver files, takes them back, and after a
//! crash reconciles what is on the host with the instances that still run.
//!
//! [`HostNetwork`] is the real thing (bridge, rtnetlink, nftables, bind-mounted namespaces);
//! [`FakeNetwork`] keeps the same bookkeeping in memory so the control plane's tests run without
//! root.

mod config;
mod fake;
mod host;
mod names;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

pub use config::{
    ConfigError, DEFAULT_BRIDGE, DEFAULT_SUBNET, DEFAULT_TABLE, DEFAULT_VETH_PREFIX, NetworkConfig,
};
pub use fake::FakeNetwork;
pub use host::{HostNetwork, StartReport, remove_host_network, remove_instance_network};
pub use names::{link_alias, veth_name};

use crate::NetnsError;
use crate::firewall::FirewallError;
use crate::ipam::IpamError;
use crate::link::LinkError;
use crate::resolv::ResolvError;

/// What to attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachRequest {
    /// The instance id: names its namespace and owns its address.
    pub instance: String,
    /// The service the instance belongs to; instances of different services never reach each
    /// other.
    pub service: String,
    /// Whether instances of this service may open connections to each other.
    pub allow_peers: bool,
    /// The instance's hostname, written into its `/etc/hosts`.
    pub hostname: String,
}

/// An instance's network, as attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub instance: String,
    pub service: String,
    pub allow_peers: bool,
    /// The bind-mounted namespace the instance joins.
    pub netns: PathBuf,
    pub addr: Ipv4Addr,
    pub addr6: Option<Ipv6Addr>,
    pub gateway: Ipv4Addr,
    /// The host end of the veth pair.
    pub host_ifname: String,
    /// Files to bind-mount over the instance's `/etc/resolv.conf` and `/etc/hosts`.
    pub resolv_conf: PathBuf,
    pub hosts: PathBuf,
}

impl Attachment {
    /// The files to bind-mount into the instance: (file on the host, path inside).
    pub fn files(&self) -> [(&std::path::Path, &'static str); 2] {
        [
            (self.resolv_conf.as_path(), "/etc/resolv.conf"),
            (self.hosts.as_path(), "/etc/hosts"),
        ]
    }
}

/// An instance that still runs, as the caller knows it at reconcile time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveInstance {
    pub instance: String,
    pub service: String,
    pub allow_peers: bool,
}

/// What [`InstanceNetwork::reconcile`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Live instances whose network was found whole and kept.
    pub adopted: Vec<String>,
    /// Live instances whose namespace was there but whose veth pair was not: wired again.
    pub rewired: Vec<String>,
    /// Live instances whose namespace is gone: their network cannot be recovered, so the caller
    /// must restart them.
    pub lost: Vec<String>,
    /// lull's veth links of instances that no longer run, deleted.
    pub removed_links: Vec<String>,
    /// Namespaces of instances that no longer run, removed.
    pub removed_namespaces: Vec<String>,
    /// Addresses held by instances that no longer run, released.
    pub released_addresses: Vec<(Ipv4Addr, String)>,
    /// Links with lull's name prefix that lull cannot prove are its own: reported, left alone.
    pub foreign_links: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "no uplink: the host has no IPv4 default route to take it from; set the network's \
         uplink interface explicitly"
    )]
    NoUplink,
    #[error("uplink interface {name} does not exist")]
    UplinkMissing { name: String },
    #[error(
        "subnet {subnet} overlaps the host route {route} on {interface}; choose a subnet that no \
         host route uses"
    )]
    SubnetOverlap {
        subnet: crate::ipam::Subnet,
        route: String,
        interface: String,
    },
    #[error("instance {instance}: {source}")]
    Ipam {
        instance: String,
        #[source]
        source: IpamError,
    },
    #[error("instance {instance}: {source}")]
    Namespace {
        instance: String,
        #[source]
        source: NetnsError,
    },
    #[error("instance {instance}: {source}")]
    Link {
        instance: String,
        #[source]
        source: LinkError,
    },
    #[error("instance {instance}: {source}")]
    Resolv {
        instance: String,
        #[source]
        source: ResolvError,
    },
    #[error("host network: {0}")]
    HostLink(#[source] LinkError),
    #[error("firewall: {0}")]
    Firewall(#[from] FirewallError),
    #[error("ipam: {0}")]
    State(#[source] IpamError),
    #[error(
        "instance {instance} already has a network (an instance of that name exists, or was \
         not removed)"
    )]
    AlreadyAttached { instance: String },
    #[error("instance {instance} has no reserved network to wire")]
    NotReserved { instance: String },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Instance networking, real or fake. Calls block (netlink and nft work runs on threads of
/// their own); call them from `spawn_blocking` in async code.
pub trait InstanceNetwork: Send + Sync {
    /// Gives the instance its network. On failure nothing of it is left behind.
    fn attach(&self, request: &AttachRequest) -> Result<Attachment, NetworkError>;
    /// The first half of [`attach`](Self::attach): the address, the namespace and the files,
    /// all an instance's process needs to be created in its namespace. Until
    /// [`wire`](Self::wire), the namespace has only its loopback and `host_ifname` is empty.
    /// The two halves let the veth pair be made while the process is being created. On
    /// failure nothing of it is left behind.
    fn reserve(&self, request: &AttachRequest) -> Result<Attachment, NetworkError> {
        self.attach(request)
    }
    /// The second half: the veth pair and the firewall's peer pairs of a reserved instance;
    /// returns the whole attachment. On failure the reservation is undone too.
    fn wire(&self, instance: &str) -> Result<Attachment, NetworkError> {
        self.attachment(instance)
            .ok_or_else(|| NetworkError::NotReserved {
                instance: instance.to_string(),
            })
    }
    /// Takes the instance's network away. Already gone is fine.
    fn detach(&self, instance: &str) -> Result<(), NetworkError>;
    /// Adopts the networks of `live` instances and removes whatever else lull left on the host
    /// (after a crash).
    fn reconcile(&self, live: &[LiveInstance]) -> Result<ReconcileReport, NetworkError>;
    /// The instance's network, if it is attached.
    fn attachment(&self, instance: &str) -> Option<Attachment>;
}
