//! The network settings every command that starts or removes instances shares, and the host
//! network they set up.

use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result};
use clap::Args;
use lull_netns::firewall::HostPort;
use lull_netns::ipam::Subnet;
use lull_netns::network::{
    DEFAULT_BRIDGE, DEFAULT_SUBNET, DEFAULT_TABLE, DEFAULT_VETH_PREFIX, HostNetwork, NetworkConfig,
};

#[derive(Debug, Clone, Args)]
pub struct NetworkArgs {
    /// The host bridge instances are attached to.
    #[arg(long, global = true, env = "LULL_BRIDGE", default_value = DEFAULT_BRIDGE)]
    pub bridge: String,
    /// The instances' IPv4 subnet (the bridge takes its first address).
    #[arg(long, global = true, env = "LULL_SUBNET", default_value = DEFAULT_SUBNET, value_parser = parse_subnet)]
    pub subnet: Subnet,
    /// An IPv6 unique local subnet for instances as well (e.g. fd00:6c75:6c6c::/64).
    #[arg(long, global = true, env = "LULL_SUBNET6", value_parser = parse_subnet6)]
    pub subnet6: Option<(std::net::Ipv6Addr, u8)>,
    /// The nftables table (family inet) lull keeps its rules in.
    #[arg(long, global = true, env = "LULL_NFT_TABLE", default_value = DEFAULT_TABLE)]
    pub nft_table: String,
    /// Prefix of the host ends of instances' veth pairs.
    #[arg(long, global = true, env = "LULL_VETH_PREFIX", default_value = DEFAULT_VETH_PREFIX)]
    pub veth_prefix: String,
    /// The interface egress leaves by (default: the one carrying the default route).
    #[arg(long, global = true, env = "LULL_UPLINK")]
    pub uplink: Option<String>,
    /// A host port instances may connect to, as PORT or PORT/udp; repeatable.
    #[arg(long = "allow-host-port", global = true, value_parser = parse_host_port)]
    pub host_ports: Vec<HostPort>,
    /// Let instances reach link-local addresses (169.254.0.0/16, cloud metadata services).
    #[arg(long, global = true)]
    pub allow_metadata: bool,
    /// A nameserver for instances when the host has only loopback ones; repeatable.
    #[arg(long = "dns", global = true, env = "LULL_DNS", value_delimiter = ',')]
    pub dns: Vec<IpAddr>,
}

impl NetworkArgs {
    pub fn config(&self, data_dir: &Path, run_dir: &Path) -> NetworkConfig {
        let mut config = NetworkConfig::new(data_dir, run_dir);
        config.bridge = self.bridge.clone();
        config.subnet = self.subnet;
        config.subnet6 = self.subnet6;
        config.table = self.nft_table.clone();
        config.veth_prefix = self.veth_prefix.clone();
        config.uplink = self.uplink.clone();
        config.host_ports = self.host_ports.clone();
        config.allow_metadata = self.allow_metadata;
        config.dns = self.dns.clone();
        config
    }

    /// Sets the host network up (the bridge and table are adopted when there; the table is
    /// rewritten from these settings, keeping its peer pairs), telling the operator about
    /// firewalls that would drop instances' traffic. Blocks the calling worker thread
    /// (`block_in_place`): the netlink and nft work runs on threads of its own.
    pub fn start(&self, data_dir: &Path, run_dir: &Path) -> Result<HostNetwork> {
        let config = self.config(data_dir, run_dir);
        let (network, report) = tokio::task::block_in_place(|| HostNetwork::start(config))
            .context("set up the instance network")?;
        if report.forwarding_enabled {
            eprintln!("note: switched on IP forwarding so instances can reach the outside");
        }
        for conflict in &report.conflicts {
            eprintln!("warning: {conflict}");
        }
        Ok(network)
    }
}

fn parse_subnet(s: &str) -> Result<Subnet, String> {
    Subnet::parse(s).map_err(|e| e.to_string())
}

fn parse_subnet6(s: &str) -> Result<(std::net::Ipv6Addr, u8), String> {
    let (addr, prefix) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not ADDRESS/PREFIX"))?;
    let addr = addr
        .parse()
        .map_err(|e| format!("{addr:?} is not an IPv6 address: {e}"))?;
    let prefix = prefix
        .parse()
        .map_err(|e| format!("{prefix:?} is not a prefix length: {e}"))?;
    Ok((addr, prefix))
}

fn parse_host_port(s: &str) -> Result<HostPort, String> {
    s.parse::<HostPort>().map_err(|e| e.to_string())
}

#[derive(Debug, clap::Subcommand)]
pub enum NetworkCommand {
    /// Set the instance network up (bridge, firewall table, forwarding) and report what is in
    /// its way.
    Up,
    /// Remove the instance network: the firewall table, the bridge and any instance network
    /// left over. Refused while instances hold addresses, unless --force.
    Down {
        /// Remove it even though instances hold addresses (they lose their network).
        #[arg(long)]
        force: bool,
    },
}

pub fn run(
    command: &NetworkCommand,
    args: &NetworkArgs,
    data_dir: &Path,
    run_dir: &Path,
) -> Result<std::process::ExitCode> {
    match command {
        NetworkCommand::Up => {
            let network = args.start(data_dir, run_dir)?;
            let config = network.config();
            println!(
                "bridge {} ({}/{}), subnet {}, uplink {}, table inet {}",
                config.bridge,
                network.bridge().gateway(),
                network.bridge().prefix(),
                config.subnet,
                network.uplink(),
                config.table
            );
        }
        NetworkCommand::Down { force } => {
            let config = args.config(data_dir, run_dir);
            let ipam = lull_netns::ipam::Ipam::open(&config.ipam_file, config.subnet)
                .context("read the address allocations")?;
            let held: Vec<String> = ipam
                .allocations()
                .map(|(addr, owner)| format!("{owner} ({addr})"))
                .collect();
            if !held.is_empty() && !force {
                anyhow::bail!(
                    "instances hold addresses: {}; remove them first, or pass --force",
                    held.join(", ")
                );
            }
            tokio::task::block_in_place(|| lull_netns::network::remove_host_network(&config))
                .context("remove the instance network")?;
            println!(
                "removed bridge {} and table inet {}",
                config.bridge, config.table
            );
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
