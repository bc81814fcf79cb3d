//! Sandbox networking: the host bridge and each sandbox's veth ([`link`]), and the firewall: one nftables
//! table owned by sandboxd ([`nft`]).
//!
//! Each sandbox's network namespace is created by its supervisor (real root, before it clones the init), so
//! it belongs to the host's user namespace: the sandbox's root has no `CAP_NET_ADMIN` over it and can change
//! neither its address nor its routes, nor open raw sockets. The supervisor creates the veth pair (host end on
//! the bridge, peer `eth0` inside) and configures it before the sandbox's init runs.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

pub mod link;
pub mod nft;

/// Environment variable carrying a supervisor's [`NetAttach`] (JSON). Absent: the sandbox gets loopback only.
pub const NET_ENV: &str = "SANDBOXD_SHIM_NET";

/// How a supervisor attaches its sandbox's network namespace to the host bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetAttach {
    /// The host bridge (exists, up, with the gateway address).
    pub bridge: String,
    /// Name of the host end of the veth pair (at most 15 bytes); the peer is `eth0` inside.
    pub host_if: String,
    /// The sandbox's address on the bridge's subnet.
    pub address: Ipv4Addr,
    /// Prefix length of the subnet.
    pub prefix_len: u8,
    /// The bridge's address: the sandbox's default route.
    pub gateway: Ipv4Addr,
    /// IPv6, where the daemon has an IPv6 subnet; without it the sandbox has no IPv6 at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v6: Option<Attach6>,
}

/// A sandbox's IPv6 side: its address (a /128 on `eth0`) and the bridge's address, its only on-link
/// neighbour and default route. Everything, other sandboxes of the subnet included, goes through the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attach6 {
    pub address: Ipv6Addr,
    pub gateway: Ipv6Addr,
}
