//! Links: the host bridge and each sandbox's veth pair, through rtnetlink.
//!
//! Daemon side (async, on the daemon's runtime, host network namespace): [`ensure_bridge`], [`delete_link`],
//! [`bridge_ports`], [`host_ipv4_networks`], [`host_ipv6_networks`], [`set_ip_forward`] and
//! [`set_ipv6_forwarding`].
//!
//! Supervisor side (sync, single-threaded process): [`enter_new_netns`] moves the supervisor into a new
//! network namespace (owned by the host's user namespace, so the sandbox's root has no `CAP_NET_ADMIN`
//! over it) and, with a [`NetAttach`], creates the veth pair: host end on the bridge (an isolated port),
//! peer `eth0` created directly inside the new namespace (moving a veth costs ~28 ms, creating it there
//! ~0.5 ms), then configures `eth0` from inside.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::time::Instant;

use futures_util::TryStreamExt;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr, TokioSocket};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::NetAttach;

/// The kernel's `local` routing table (the host's own and broadcast addresses).
const RT_TABLE_LOCAL: u32 = 255;

/// Name of the sandbox's end of its veth pair, inside its network namespace.
pub const SANDBOX_IF: &str = "eth0";

/// Errors of link management.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A netlink request failed.
    #[error("{op}: {source}")]
    Netlink {
        /// What was being done.
        op: String,
        /// Cause.
        #[source]
        source: rtnetlink::Error,
    },
    /// A system call or file operation failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A link of that name exists and is not a bridge.
    #[error("a link named {0} exists and is not a bridge")]
    NotABridge(String),
    /// A link that should exist does not.
    #[error("no link named {0}")]
    NoSuchLink(String),
    /// Not a usable interface name.
    #[error("invalid interface name {0:?} (1 to 15 bytes, no '/', whitespace or ':')")]
    InvalidName(String),
}

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let op = op.into();
    move |source| LinkError::Netlink { op, source }
}

fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> LinkError {
    let op = op.into();
    move |source| LinkError::Io { op, source }
}

/// The errno of a netlink error answer, if it is one.
fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

/// Interface names are used in `/proc/sys` paths and nft rules: only what the kernel accepts and a path
/// cannot misuse.
fn check_ifname(name: &str) -> Result<(), LinkError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(LinkError::InvalidName(name.to_owned()))
    }
}

/// A connection in the current network namespace, its driver spawned on the current tokio runtime.
fn connect() -> Result<Handle, LinkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(io("opening a netlink socket"))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// A blocking netlink socket of the current network namespace, ready to become a [`TokioSocket`]. A
/// socket keeps the namespace it was created in, whichever namespace its user is in later.
fn route_socket() -> Result<Socket, LinkError> {
    let mut s = Socket::new(NETLINK_ROUTE).map_err(io("opening a netlink socket"))?;
    s.bind_auto().map_err(io("binding a netlink socket"))?;
    s.connect(&SocketAddr::new(0, 0))
        .map_err(io("connecting a netlink socket"))?;
    Ok(s)
}

/// A handle over `sock`; must run inside a tokio runtime (the connection's driver is spawned on it).
fn handle_over(sock: Socket) -> Handle {
    // SAFETY: the descriptor comes from `into_raw_fd` of a socket we own: ownership moves to the
    // TokioSocket, nothing else closes it.
    let ts = unsafe { TokioSocket::from_raw_fd(sock.into_raw_fd()) };
    let (conn, handle, _) = rtnetlink::from_socket(ts);
    tokio::spawn(conn);
    handle
}

fn link_name(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_kind(l: &LinkMessage) -> Option<&InfoKind> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

/// The link named `name`, or `None` when there is none.
async fn link_by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>, LinkError> {
    let mut links = h.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(l) => Ok(l),
        Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl(format!("looking up link {name}"))(e)),
    }
}

async fn index_of(h: &Handle, name: &str) -> Result<u32, LinkError> {
    link_by_name(h, name)
        .await?
        .map(|l| l.header.index)
        .ok_or_else(|| LinkError::NoSuchLink(name.to_owned()))
}

fn write_sysctl(path: &str, value: &str) -> Result<(), LinkError> {
    std::fs::write(path, value).map_err(io(format!("writing {path}")))
}

/// Creates the bridge `name` if it does not exist (an existing link of that name that is not a bridge is
/// an error), gives it `gateway/prefix_len` unless it has it already (other addresses are left alone),
/// brings it up and sets its `route_localnet` (published ports on 127.0.0.1 are DNATed through it).
/// With `v6` (gateway, prefix length) it gets that IPv6 address too (no DAD, no router advertisements
/// accepted); without, IPv6 is disabled on it. Returns its interface index.
pub async fn ensure_bridge(
    name: &str,
    gateway: Ipv4Addr,
    prefix_len: u8,
    v6: Option<(Ipv6Addr, u8)>,
) -> Result<u32, LinkError> {
    check_ifname(name)?;
    let h = connect()?;
    let index = match link_by_name(&h, name).await? {
        Some(l) if link_kind(&l) == Some(&InfoKind::Bridge) => l.header.index,
        Some(_) => return Err(LinkError::NotABridge(name.to_owned())),
        None => {
            match h.link().add(LinkBridge::new(name).build()).execute().await {
                Ok(()) => {}
                // Created meanwhile by someone else: checked below like an existing one.
                Err(e) if errno_of(&e) == Some(libc::EEXIST) => {}
                Err(e) => return Err(nl(format!("creating bridge {name}"))(e)),
            }
            match link_by_name(&h, name).await? {
                Some(l) if link_kind(&l) == Some(&InfoKind::Bridge) => l.header.index,
                Some(_) => return Err(LinkError::NotABridge(name.to_owned())),
                None => return Err(LinkError::NoSuchLink(name.to_owned())),
            }
        }
    };

    let conf6 = |key: &str| format!("/proc/sys/net/ipv6/conf/{name}/{key}");
    match v6 {
        Some(_) => {
            // Before the address: it is usable at once (no duplicate address detection), and the bridge is
            // the router, never configured by someone else's advertisements.
            write_sysctl(&conf6("disable_ipv6"), "0")?;
            write_sysctl(&conf6("accept_dad"), "0")?;
            write_sysctl(&conf6("accept_ra"), "0")?;
        }
        // Sandboxes are IPv4-only: no IPv6 (link-local, neighbour discovery) on the bridge. A host without
        // IPv6 has no such file.
        None if std::path::Path::new(&conf6("disable_ipv6")).exists() => {
            write_sysctl(&conf6("disable_ipv6"), "1")?;
        }
        None => {}
    }
    let mut wanted = vec![(IpAddr::V4(gateway), prefix_len)];
    wanted.extend(v6.map(|(gw, len)| (IpAddr::V6(gw), len)));
    let mut addrs = h.address().get().set_link_index_filter(index).execute();
    while let Some(a) = addrs
        .try_next()
        .await
        .map_err(nl(format!("listing the addresses of {name}")))?
    {
        wanted.retain(|(ip, len)| {
            !(a.header.prefix_len == *len
                && a.attributes.iter().any(|at| {
                    matches!(at, AddressAttribute::Local(x) | AddressAttribute::Address(x) if x == ip)
                }))
        });
    }
    for (ip, len) in wanted {
        match h.address().add(index, ip, len).execute().await {
            Ok(()) => {}
            Err(e) if errno_of(&e) == Some(libc::EEXIST) => {}
            Err(e) => return Err(nl(format!("adding {ip}/{len} to {name}"))(e)),
        }
    }
    // A fixed MAC: a bridge without one takes the lowest MAC of its ports, which changes as sandboxes come
    // and go, and running sandboxes would keep sending to a gateway MAC the bridge no longer has.
    h.link()
        .set(
            LinkUnspec::new_with_index(index)
                .address(bridge_mac(name).to_vec())
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(nl(format!("bringing {name} up")))?;
    write_sysctl(
        &format!("/proc/sys/net/ipv4/conf/{name}/route_localnet"),
        "1",
    )?;
    // The ports are isolated, so a sandbox's ARP request for another sandbox reaches only the bridge: with
    // private-VLAN proxy ARP the host answers it with the bridge's MAC (at once: no proxy delay), and
    // sandbox-to-sandbox traffic is routed through the host, where the firewall's forward chain lets only
    // session peers through. Without it such traffic would die unanswered at ARP (seconds, not a refusal).
    write_sysctl(
        &format!("/proc/sys/net/ipv4/conf/{name}/proxy_arp_pvlan"),
        "1",
    )?;
    write_sysctl(&format!("/proc/sys/net/ipv4/neigh/{name}/proxy_delay"), "0")?;
    Ok(index)
}

/// The bridge's MAC: locally administered, unicast, derived from its name (stable across daemon restarts).
fn bridge_mac(name: &str) -> [u8; 6] {
    // FNV-1a, 64 bits.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

/// Deletes the link `name`; absent is fine.
pub async fn delete_link(name: &str) -> Result<(), LinkError> {
    check_ifname(name)?;
    let h = connect()?;
    let Some(l) = link_by_name(&h, name).await? else {
        return Ok(());
    };
    match h.link().del(l.header.index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(nl(format!("deleting link {name}"))(e)),
    }
}

/// Names of the links whose controller is the bridge `bridge` (none when it does not exist).
pub async fn bridge_ports(bridge: &str) -> Result<Vec<String>, LinkError> {
    check_ifname(bridge)?;
    let h = connect()?;
    let Some(br) = link_by_name(&h, bridge).await? else {
        return Ok(Vec::new());
    };
    let br = br.header.index;
    let mut ports = Vec::new();
    let mut links = h.link().get().execute();
    while let Some(l) = links.try_next().await.map_err(nl("listing links"))? {
        let on_bridge = l
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::Controller(c) if *c == br));
        if on_bridge {
            if let Some(n) = link_name(&l) {
                ports.push(n.to_owned());
            }
        }
    }
    Ok(ports)
}

/// The networks the host already uses, for the daemon's subnet-overlap checks: the network of every
/// address on a host link and the destination of every non-default route (all tables but `local`, whose
/// entries are the host's own addresses), except those of the link `exclude_bridge`. IPv6 link-local
/// (`fe80::/10`) and multicast networks are left out (every link has them). Sorted, without duplicates.
async fn host_networks(exclude_bridge: &str) -> Result<Vec<IpNet>, LinkError> {
    check_ifname(exclude_bridge)?;
    let h = connect()?;
    let excluded = link_by_name(&h, exclude_bridge)
        .await?
        .map(|l| l.header.index);
    let mut nets = Vec::new();
    let mut addrs = h.address().get().execute();
    while let Some(a) = addrs.try_next().await.map_err(nl("listing addresses"))? {
        if Some(a.header.index) == excluded {
            continue;
        }
        for at in &a.attributes {
            if let AddressAttribute::Local(ip) | AddressAttribute::Address(ip) = at {
                if let Ok(n) = IpNet::new(*ip, a.header.prefix_len) {
                    nets.push(n.trunc());
                }
            }
        }
    }
    for query in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let mut routes = h.route().get(query).execute();
        while let Some(r) = routes.try_next().await.map_err(nl("listing routes"))? {
            let table = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(r.header.table));
            if table == RT_TABLE_LOCAL || r.header.destination_prefix_length == 0 {
                continue;
            }
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            if excluded.is_some() && oif == excluded {
                continue;
            }
            let dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
                RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
                _ => None,
            });
            if let Some(ip) = dst {
                if let Ok(n) = IpNet::new(ip, r.header.destination_prefix_length) {
                    nets.push(n.trunc());
                }
            }
        }
    }
    let link_local: Ipv6Net =
        Ipv6Net::new(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10).unwrap_or_default();
    nets.retain(|n| match n {
        IpNet::V6(n) => !link_local.contains(&n.network()) && !n.network().is_multicast(),
        IpNet::V4(_) => true,
    });
    nets.sort();
    nets.dedup();
    Ok(nets)
}

/// The host's IPv4 networks (see [`host_networks`]).
pub async fn host_ipv4_networks(exclude_bridge: &str) -> Result<Vec<Ipv4Net>, LinkError> {
    Ok(host_networks(exclude_bridge)
        .await?
        .into_iter()
        .filter_map(|n| match n {
            IpNet::V4(n) => Some(n),
            IpNet::V6(_) => None,
        })
        .collect())
}

/// The host's IPv6 networks (see [`host_networks`]).
pub async fn host_ipv6_networks(exclude_bridge: &str) -> Result<Vec<Ipv6Net>, LinkError> {
    Ok(host_networks(exclude_bridge)
        .await?
        .into_iter()
        .filter_map(|n| match n {
            IpNet::V6(n) => Some(n),
            IpNet::V4(_) => None,
        })
        .collect())
}

/// Turns IPv6 forwarding on (`net.ipv6.conf.all.forwarding`); answers whether it was off. Note the kernel's
/// rule: an interface with `accept_ra = 1` ignores router advertisements while forwarding is on (a host
/// configured by SLAAC needs `accept_ra = 2` on that interface).
pub fn set_ipv6_forwarding() -> Result<bool, LinkError> {
    switch_on("/proc/sys/net/ipv6/conf/all/forwarding")
}

/// Sets `net.ipv4.ip_forward` to 1 (in the current network namespace). Returns whether it was 0.
pub fn set_ip_forward() -> Result<bool, LinkError> {
    switch_on("/proc/sys/net/ipv4/ip_forward")
}

/// Writes `1` to a boolean sysctl unless it is `1` already; answers whether it was off.
fn switch_on(path: &str) -> Result<bool, LinkError> {
    let was = std::fs::read_to_string(path).map_err(io(format!("reading {path}")))?;
    if was.trim() == "1" {
        return Ok(false);
    }
    write_sysctl(path, "1")?;
    Ok(true)
}

/// Moves the calling (single-threaded) process into a new network namespace and sets it up:
/// - loopback up; `net.ipv4.ip_unprivileged_port_start=0` and `net.ipv4.ping_group_range=0 2147483647`
///   (the namespace belongs to the host's user namespace, so the sandbox's root would otherwise be
///   refused ports below 1024 and ICMP echo sockets);
/// - with `attach`: the veth pair, host end `attach.host_if` an isolated port of `attach.bridge` (up),
///   peer [`SANDBOX_IF`] created directly in the new namespace, up, with `address/prefix_len` and a
///   default route via `gateway`; with `attach.v6` its IPv6 address (/128), a route to the IPv6 gateway and
///   the default route via it, else IPv6 disabled on it.
///
/// The tokio runtime that drives netlink is built and dropped in here: no thread survives the call (the
/// supervisor clones the sandbox's init right after). On failure the process may be left in the new
/// namespace; whatever was created there dies with it.
pub fn enter_new_netns(attach: Option<&NetAttach>) -> Result<(), LinkError> {
    let t0 = Instant::now();
    let host_sock = match attach {
        Some(a) => {
            check_ifname(&a.bridge)?;
            check_ifname(&a.host_if)?;
            Some(route_socket()?)
        }
        None => None,
    };
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| io("unshare(CLONE_NEWNET)")(e.into()))?;
    crate::sys::loopback_up().map_err(io("bringing loopback up"))?;
    // /proc/sys/net shows the namespace of whoever opens it: now the new one.
    write_sysctl("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0")?;
    write_sysctl("/proc/sys/net/ipv4/ping_group_range", "0 2147483647")?;
    if let (Some(a), Some(host_sock)) = (attach, host_sock) {
        if a.v6.is_some() {
            // eth0 (created below, with this namespace's defaults) takes its address as given, at once (no
            // duplicate address detection), and nothing from router advertisements.
            for (key, value) in [("accept_dad", "0"), ("accept_ra", "0"), ("autoconf", "0")] {
                write_sysctl(&format!("/proc/sys/net/ipv6/conf/default/{key}"), value)?;
            }
        } else {
            // The sandbox gets IPv4 only: its eth0 neither sends nor accepts IPv6, not even link-local.
            // Absent when the kernel has no IPv6.
            match std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1") {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io("writing /proc/sys/net/ipv6/conf/default/disable_ipv6")(
                        e,
                    ));
                }
                _ => {}
            }
        }
        let inside_sock = route_socket()?;
        // thread-self: the calling thread's namespace (the same as the process's in the supervisor).
        let ns = std::fs::File::open("/proc/thread-self/ns/net")
            .map_err(io("opening /proc/thread-self/ns/net"))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(io("building a tokio runtime"))?;
        let r = rt.block_on(async {
            let host = handle_over(host_sock);
            let inside = handle_over(inside_sock);
            attach_veth(&host, &inside, a, ns.as_raw_fd()).await
        });
        // Dropping the runtime drops the connections' tasks, and with them the sockets.
        drop(rt);
        r?;
    }
    tracing::debug!(
        attached = attach.is_some(),
        micros = t0.elapsed().as_micros() as u64,
        "entered a new network namespace"
    );
    Ok(())
}

async fn attach_veth(
    host: &Handle,
    inside: &Handle,
    a: &NetAttach,
    ns_fd: std::os::fd::RawFd,
) -> Result<(), LinkError> {
    let bridge = index_of(host, &a.bridge).await?;
    // The peer must not be brought up here: a veth peer created up in another namespace gets ENOTCONN.
    let peer = LinkUnspec::new_with_name(SANDBOX_IF)
        .setns_by_fd(ns_fd)
        .build();
    let msg = LinkVeth::new(&a.host_if, SANDBOX_IF)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .controller(bridge)
        .up()
        .build();
    host.link()
        .add(msg)
        .execute()
        .await
        .map_err(nl(format!("creating veth {} on {}", a.host_if, a.bridge)))?;
    // Isolated ports never exchange frames with each other, only with the bridge itself (non-isolated).
    let port = LinkBridgePort::new(0)
        .name(a.host_if.clone())
        .append_info_data(InfoBridgePort::Isolated(true))
        .build();
    host.link()
        .set_port(port)
        .execute()
        .await
        .map_err(nl(format!("isolating bridge port {}", a.host_if)))?;

    let eth = index_of(inside, SANDBOX_IF).await?;
    inside
        .link()
        .set(LinkUnspec::new_with_index(eth).up().build())
        .execute()
        .await
        .map_err(nl(format!("bringing {SANDBOX_IF} up")))?;
    inside
        .address()
        .add(eth, IpAddr::V4(a.address), a.prefix_len)
        .execute()
        .await
        .map_err(nl(format!(
            "adding {}/{} to {SANDBOX_IF}",
            a.address, a.prefix_len
        )))?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(a.gateway)
        .output_interface(eth)
        .build();
    inside
        .route()
        .add(route)
        .execute()
        .await
        .map_err(nl(format!("adding the default route via {}", a.gateway)))?;
    if let Some(v6) = &a.v6 {
        // A /128 and the gateway as the only on-link neighbour: the sandbox never resolves another
        // sandbox's address itself, everything goes through the host (and its firewall).
        inside
            .address()
            .add(eth, IpAddr::V6(v6.address), 128)
            .execute()
            .await
            .map_err(nl(format!("adding {}/128 to {SANDBOX_IF}", v6.address)))?;
        let to_gateway = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(v6.gateway, 128)
            .output_interface(eth)
            .build();
        let default = RouteMessageBuilder::<Ipv6Addr>::new()
            .gateway(v6.gateway)
            .output_interface(eth)
            .build();
        for (route, what) in [
            (to_gateway, "the route to"),
            (default, "the default route via"),
        ] {
            inside
                .route()
                .add(route)
                .execute()
                .await
                .map_err(nl(format!("adding {what} {}", v6.gateway)))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Live tests, as root only, each in scratch network namespaces it creates itself: a thread that
    //! unshares `CLONE_NEWNET` stands in for the host, and threads it spawns (which start in its namespace)
    //! stand in for supervisors. The real host's links are only ever read.

    use std::net::{Ipv4Addr, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    use futures_util::StreamExt;
    use netlink_packet_route::link::InfoPortData;
    use netlink_packet_route::RouteNetlinkMessage;
    use rtnetlink::packet_core::NetlinkPayload;

    use super::*;

    static NEXT: AtomicU32 = AtomicU32::new(0);

    /// A short unique suffix for names (tests of several processes may run at once).
    fn unique() -> String {
        format!(
            "{}{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn is_root() -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        eprintln!("skipped: needs root");
        false
    }

    fn netns_of_thread() -> std::fs::Metadata {
        std::fs::metadata("/proc/thread-self/ns/net").expect("stat own netns")
    }

    fn same_ns(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
        use std::os::unix::fs::MetadataExt;
        a.ino() == b.ino() && a.dev() == b.dev()
    }

    /// Runs `f` on a new thread in a new network namespace (which dies with the thread).
    fn in_scratch_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let host = netns_of_thread();
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare NEWNET");
            assert!(
                !same_ns(&host, &netns_of_thread()),
                "still in the host's netns"
            );
            f()
        })
        .join()
        .expect("scratch thread")
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    fn sysctl(path: &str) -> String {
        std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .trim()
            .to_owned()
    }

    async fn link_names(h: &Handle) -> Vec<String> {
        let mut names = Vec::new();
        let mut links = h.link().get().execute();
        while let Some(l) = links.try_next().await.expect("links") {
            names.extend(link_name(&l).map(str::to_owned));
        }
        names.sort();
        names
    }

    fn is_up(l: &LinkMessage) -> bool {
        l.header
            .flags
            .contains(netlink_packet_route::link::LinkFlags::Up)
    }

    fn port_isolated(l: &LinkMessage) -> bool {
        l.attributes.iter().any(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().any(|i| {
                matches!(i, LinkInfo::PortData(InfoPortData::BridgePort(p))
                    if p.contains(&InfoBridgePort::Isolated(true)))
            }),
            _ => false,
        })
    }

    /// Checked inside a sandbox's namespace after `enter_new_netns(Some(..))`.
    fn check_inside(address: Ipv4Addr, gateway: Ipv4Addr, ipv6: bool) {
        runtime().block_on(async {
            let h = connect().expect("netlink");
            assert_eq!(link_names(&h).await, ["eth0", "lo"]);
            let lo = link_by_name(&h, "lo").await.unwrap().expect("lo");
            assert!(is_up(&lo), "lo is down");
            let eth = link_by_name(&h, SANDBOX_IF).await.unwrap().expect("eth0");
            assert!(is_up(&eth), "eth0 is down");
            let mut found = false;
            let mut addrs = h
                .address()
                .get()
                .set_link_index_filter(eth.header.index)
                .execute();
            while let Some(a) = addrs.try_next().await.expect("addresses") {
                if a.attributes
                    .contains(&AddressAttribute::Local(IpAddr::V4(address)))
                {
                    assert_eq!(a.header.prefix_len, 24);
                    found = true;
                }
            }
            assert!(found, "eth0 lacks {address}");
            let mut default_via = None;
            let mut routes = h
                .route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute();
            while let Some(r) = routes.try_next().await.expect("routes") {
                if r.header.destination_prefix_length != 0 || r.header.table != 254 {
                    continue;
                }
                let gw = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(*g),
                    _ => None,
                });
                let oif = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                });
                default_via = Some((gw, oif));
            }
            assert_eq!(default_via, Some((Some(gateway), Some(eth.header.index))));
        });
        if std::path::Path::new("/proc/sys/net/ipv6").exists() {
            let off = if ipv6 { "0" } else { "1" };
            assert_eq!(sysctl("/proc/sys/net/ipv6/conf/eth0/disable_ipv6"), off);
            if ipv6 {
                assert_eq!(sysctl("/proc/sys/net/ipv6/conf/eth0/accept_ra"), "0");
            }
        }
        assert_eq!(sysctl("/proc/sys/net/ipv4/ip_unprivileged_port_start"), "0");
        assert_eq!(
            sysctl("/proc/sys/net/ipv4/ping_group_range")
                .split_whitespace()
                .collect::<Vec<_>>(),
            ["0", "2147483647"]
        );
    }

    #[test]
    fn interface_names_are_checked() {
        for ok in ["sandboxd0", "sbxs-0123456789", "a"] {
            assert!(check_ifname(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "eth0:1",
            "sbxs-0123456789a",
            "x\n",
        ] {
            assert!(check_ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn loopback_only_namespace() {
        if !is_root() {
            return;
        }
        in_scratch_netns(|| {
            let outer = netns_of_thread();
            std::thread::spawn(move || {
                enter_new_netns(None).expect("enter_new_netns");
                assert!(!same_ns(&outer, &netns_of_thread()));
                runtime().block_on(async {
                    let h = connect().expect("netlink");
                    assert_eq!(link_names(&h).await, ["lo"]);
                    let lo = link_by_name(&h, "lo").await.unwrap().expect("lo");
                    assert!(is_up(&lo), "lo is down");
                });
                assert_eq!(sysctl("/proc/sys/net/ipv4/ip_unprivileged_port_start"), "0");
                // Loopback works, and ports below 1024 are open to everybody.
                let l = TcpListener::bind("127.0.0.1:80").expect("bind 127.0.0.1:80");
                TcpStream::connect(l.local_addr().unwrap()).expect("connect over lo");
            })
            .join()
            .expect("sandbox thread");
        });
    }

    /// The bridge and one attached sandbox, end to end: addresses, route, isolated port, a TCP connection
    /// from the sandbox to the gateway, and the pair gone with the sandbox's namespace.
    #[test]
    fn bridge_and_attached_sandbox() {
        if !is_root() {
            return;
        }
        let n = unique();
        let bridge = format!("sbxt-br{n}");
        let host_if = format!("sbxt-v{n}");
        let (br2, hif2) = (bridge.clone(), host_if.clone());
        let gateway = Ipv4Addr::new(10, 213, 77, 1);
        let address = Ipv4Addr::new(10, 213, 77, 10);
        let gateway6 = Ipv6Addr::new(0xfd5b, 0xd0c0, 0x77, 0, 0, 0, 0, 1);
        let address6 = Ipv6Addr::new(0xfd5b, 0xd0c0, 0x77, 0, 0, 0, 0, 0x10);
        in_scratch_netns(move || {
            let (bridge, host_if) = (br2, hif2);
            let rt = runtime();
            let index = rt
                .block_on(ensure_bridge(&bridge, gateway, 24, Some((gateway6, 64))))
                .expect("ensure_bridge");
            // Idempotent.
            let again = rt
                .block_on(ensure_bridge(&bridge, gateway, 24, Some((gateway6, 64))))
                .expect("ensure_bridge again");
            assert_eq!(index, again);
            assert_eq!(
                sysctl(&format!("/proc/sys/net/ipv4/conf/{bridge}/route_localnet")),
                "1"
            );
            let net: Ipv4Net = "10.213.77.0/24".parse().unwrap();
            let nets = rt.block_on(host_ipv4_networks("lo")).expect("networks");
            assert!(nets.contains(&net), "{nets:?}");
            let nets = rt.block_on(host_ipv4_networks(&bridge)).expect("networks");
            assert!(!nets.contains(&net), "{nets:?}");
            let net6: Ipv6Net = "fd5b:d0c0:77::/64".parse().unwrap();
            let nets6 = rt.block_on(host_ipv6_networks("lo")).expect("networks");
            assert!(nets6.contains(&net6), "{nets6:?}");
            assert!(nets6.iter().all(
                |n| !n.network().is_multicast() && n.network().segments()[0] & 0xffc0 != 0xfe80
            ));
            let nets6 = rt.block_on(host_ipv6_networks(&bridge)).expect("networks");
            assert!(!nets6.contains(&net6), "{nets6:?}");
            assert!(rt.block_on(bridge_ports(&bridge)).unwrap().is_empty());

            // The gateway answers TCP; the pair's removal is announced on a link monitor.
            let listener = TcpListener::bind((gateway, 0)).expect("listen on the gateway");
            let port = listener.local_addr().unwrap().port();
            let listener6 = TcpListener::bind((gateway6, 0)).expect("listen on the IPv6 gateway");
            let port6 = listener6.local_addr().unwrap().port();
            let (mon_conn, _mon, mut events) = rt
                .block_on(async {
                    rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Link])
                })
                .expect("link monitor");
            rt.spawn(mon_conn);

            let attach = NetAttach {
                bridge: bridge.clone(),
                host_if: host_if.clone(),
                address,
                prefix_len: 24,
                gateway,
                v6: Some(crate::net::Attach6 {
                    address: address6,
                    gateway: gateway6,
                }),
            };
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let sandbox = std::thread::spawn(move || {
                enter_new_netns(Some(&attach)).expect("enter_new_netns");
                check_inside(address, gateway, true);
                TcpStream::connect_timeout(&(gateway, port).into(), Duration::from_secs(10))
                    .expect("connect to the gateway");
                TcpStream::connect_timeout(&(gateway6, port6).into(), Duration::from_secs(10))
                    .expect("connect to the IPv6 gateway");
                // Stay (and keep the namespace) until the host side has looked.
                let _ = rx.recv();
            });
            let (peer, from) = listener.accept().expect("accept");
            assert_eq!(from.ip(), std::net::IpAddr::V4(address));
            drop(peer);
            let (peer, from) = listener6.accept().expect("accept IPv6");
            assert_eq!(from.ip(), std::net::IpAddr::V6(address6));
            drop(peer);

            let ports = rt.block_on(bridge_ports(&bridge)).expect("ports");
            assert_eq!(ports, std::slice::from_ref(&host_if));
            rt.block_on(async {
                let h = connect().unwrap();
                let l = link_by_name(&h, &host_if).await.unwrap().expect("host end");
                assert!(is_up(&l), "host end is down");
                assert!(port_isolated(&l), "port not isolated: {:?}", l.attributes);
            });

            // The sandbox's namespace dies with its thread: the kernel removes the pair.
            drop(tx);
            sandbox.join().expect("sandbox thread");
            rt.block_on(async {
                let gone = async {
                    while let Some((msg, _)) = events.next().await {
                        if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) =
                            msg.payload
                        {
                            if link_name(&l) == Some(host_if.as_str()) {
                                return;
                            }
                        }
                    }
                    panic!("link monitor ended");
                };
                tokio::time::timeout(Duration::from_secs(20), gone)
                    .await
                    .expect("the host end outlived the sandbox's namespace");
            });
            assert!(rt.block_on(bridge_ports(&bridge)).unwrap().is_empty());

            // delete_link: absent is fine, present goes.
            rt.block_on(delete_link(&host_if)).expect("delete absent");
            rt.block_on(delete_link(&bridge)).expect("delete bridge");
            rt.block_on(async {
                let h = connect().unwrap();
                assert!(link_by_name(&h, &bridge).await.unwrap().is_none());
            });
        });
        // Nothing of it ever existed in the real host's namespace.
        runtime().block_on(async {
            let h = connect().unwrap();
            assert!(link_by_name(&h, &bridge).await.unwrap().is_none());
            assert!(link_by_name(&h, &host_if).await.unwrap().is_none());
        });
    }

    #[test]
    fn ensure_bridge_refuses_other_kinds_and_ip_forward() {
        if !is_root() {
            return;
        }
        let host_forward = sysctl("/proc/sys/net/ipv4/ip_forward");
        in_scratch_netns(|| {
            let rt = runtime();
            let name = format!("sbxt-x{}", unique());
            rt.block_on(async {
                let h = connect().unwrap();
                h.link()
                    .add(LinkVeth::new(&name, &format!("{name}p")).build())
                    .execute()
                    .await
                    .expect("veth");
            });
            match rt.block_on(ensure_bridge(
                &name,
                Ipv4Addr::new(10, 213, 78, 1),
                24,
                None,
            )) {
                Err(LinkError::NotABridge(n)) => assert_eq!(n, name),
                other => panic!("{other:?}"),
            }
            assert!(matches!(
                rt.block_on(ensure_bridge(
                    "a/b",
                    Ipv4Addr::new(10, 213, 78, 1),
                    24,
                    None
                )),
                Err(LinkError::InvalidName(_))
            ));
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "0").expect("reset ip_forward");
            assert!(set_ip_forward().expect("set"), "was 0");
            assert!(!set_ip_forward().expect("set again"), "already 1");
            assert_eq!(sysctl("/proc/sys/net/ipv4/ip_forward"), "1");
        });
        assert_eq!(
            sysctl("/proc/sys/net/ipv4/ip_forward"),
            host_forward,
            "the host's ip_forward changed"
        );
    }

    /// Durations of `enter_new_netns`, with and without a link (`--nocapture` shows them).
    #[test]
    fn enter_new_netns_durations() {
        if !is_root() {
            return;
        }
        let n = unique();
        in_scratch_netns(move || {
            let bridge = format!("sbxt-br{n}");
            runtime()
                .block_on(ensure_bridge(
                    &bridge,
                    Ipv4Addr::new(10, 213, 79, 1),
                    24,
                    None,
                ))
                .expect("bridge");
            let mut plain = Vec::new();
            let mut attached = Vec::new();
            for i in 0..20u8 {
                plain.push(
                    std::thread::spawn(|| {
                        let t = Instant::now();
                        enter_new_netns(None).expect("enter");
                        t.elapsed()
                    })
                    .join()
                    .unwrap(),
                );
                let attach = NetAttach {
                    bridge: bridge.clone(),
                    host_if: format!("sbxt-d{n}-{i}"),
                    address: Ipv4Addr::new(10, 213, 79, 10 + i),
                    prefix_len: 24,
                    gateway: Ipv4Addr::new(10, 213, 79, 1),
                    v6: None,
                };
                attached.push(
                    std::thread::spawn(move || {
                        let t = Instant::now();
                        enter_new_netns(Some(&attach)).expect("enter");
                        t.elapsed()
                    })
                    .join()
                    .unwrap(),
                );
            }
            let median = |v: &mut Vec<Duration>| {
                v.sort();
                (v[v.len() / 2], v[v.len() * 9 / 10])
            };
            let (pm, p90) = median(&mut plain);
            let (am, a90) = median(&mut attached);
            eprintln!("enter_new_netns(None): median {pm:?}, p90 {p90:?}");
            eprintln!("enter_new_netns(Some): median {am:?}, p90 {a90:?}");
        });
    }
}
