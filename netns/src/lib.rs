//! Network namespaces, veth pairs, the bridge and egress NAT for instances (filled by the networking issue).
