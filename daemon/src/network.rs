//! Sandbox networking in the daemon: the bridge and firewall table it owns, address allocation, the
//! validation of network options and published ports, and the placeholder sockets that hold published host
//! ports.
//!
//! The links themselves are made by each sandbox's supervisor (see `sandbox_runtime::net`); the daemon
//! decides the address and the veth's name, and adds the sandbox's firewall elements before its init runs.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};

use std::net::Ipv6Addr;

use ipnet::{Ipv4Net, Ipv6Net};
use sandbox_proto::{ApiError, ErrorCode, ExposedPort, NetworkInfo, NetworkOptions, ServiceSpec};
use sandbox_runtime::net::nft::{
    AllowRule, Egress, Firewall, NetPlan, Plan6, Proto, Published, SandboxRules,
};
use sandbox_runtime::net::{Attach6, NetAttach};
use serde::{Deserialize, Serialize};

use crate::config::{NetworkConfig, NetworkMode};
use crate::dns::{DnsClients, DnsRule, Forwarder, NamePattern};

/// Most `dns_name` rules one sandbox may have.
pub const MAX_DNS_NAMES: usize = 64;

/// Errors setting up the daemon's networking at start.
#[derive(Debug, thiserror::Error)]
pub enum NetworkInitError {
    /// The firewall library could not be loaded.
    #[error("nftables: {0}")]
    Firewall(#[from] sandbox_runtime::net::nft::NftError),
    /// Links (bridge, sysctls).
    #[error("{0}")]
    Link(#[from] sandbox_runtime::net::link::LinkError),
    /// The configured IPv6 subnet collides with the host's networks.
    #[error("network.subnet6 {subnet} overlaps {other}, a network this host already has; configure another [network] subnet6")]
    Overlap6 {
        /// Ours.
        subnet: Ipv6Net,
        /// The host's.
        other: Ipv6Net,
    },
    /// The configured subnet collides with the host's networks.
    #[error("network.subnet {subnet} overlaps {other}, a network this host already has; configure another [network] subnet")]
    Overlap {
        /// Ours.
        subnet: Ipv4Net,
        /// The host's.
        other: Ipv4Net,
    },
}

/// What a sandbox's record keeps of its network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRecord {
    /// The sandbox's address on the bridge.
    pub address: Ipv4Addr,
    /// The host end of its veth.
    pub host_if: String,
    /// The policy as given (defaults filled in).
    pub policy: NetworkOptions,
    /// Published ports as set up.
    #[serde(default)]
    pub exposed: Vec<ExposedPort>,
    /// Its gateway (the bridge's address).
    pub gateway: Ipv4Addr,
    /// The nameservers in its `/etc/resolv.conf`.
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// Its IPv6 address, where the daemon has an IPv6 subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<Ipv6Addr>,
    /// Its IPv6 gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<Ipv6Addr>,
    /// Its session, when it opted in to traffic with the session's other opted-in sandboxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_group: Option<String>,
}

impl NetRecord {
    /// The sandbox's network as shown in its info.
    pub fn info(&self) -> NetworkInfo {
        NetworkInfo {
            mode: "bridge".to_owned(),
            address: Some(self.address.to_string()),
            gateway: Some(self.gateway.to_string()),
            address6: self.address6.map(|a| a.to_string()),
            gateway6: self.gateway6.map(|a| a.to_string()),
            interface: Some("eth0".to_owned()),
            host_interface: Some(self.host_if.clone()),
            dns: self.dns.iter().map(ToString::to_string).collect(),
            policy: self.policy.clone(),
        }
    }
}

/// An address and veth name reserved for a sandbox (or a pooled supervisor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The address.
    pub address: Ipv4Addr,
    /// The host end of the veth.
    pub host_if: String,
}

/// A validated policy: what the firewall enforces for one sandbox.
#[derive(Debug, Clone)]
pub struct Policy {
    /// As given, defaults filled in (recorded and shown).
    pub options: NetworkOptions,
    egress: Egress,
    /// The `dns_name` rules (served by the DNS forwarder).
    dns: Vec<DnsRule>,
    services: Vec<(Proto, u16, Ipv4Addr, u16)>,
    /// The session whose opted-in sandboxes this one may reach (see [`Policy::join_session`]).
    peer_group: Option<String>,
}

/// Longest session id accepted as a peer group (it is only compared, never rendered).
const MAX_SESSION_ID: usize = 256;

impl Policy {
    /// With `session_peers`, the sandbox's session (the value of its `sandboxd.session` annotation) becomes
    /// its peer group; without the annotation that is an error naming `network.session_peers`.
    pub fn join_session(&mut self, session: Option<&str>) -> Result<(), ApiError> {
        if !self.options.session_peers {
            return Ok(());
        }
        match session {
            Some(s) if !s.is_empty() && s.len() <= MAX_SESSION_ID => {
                self.peer_group = Some(s.to_owned());
                Ok(())
            }
            Some(_) => Err(ApiError::invalid_argument(
                "network.session_peers",
                format!("the sandboxd.session annotation must be 1-{MAX_SESSION_ID} bytes"),
            )),
            None => Err(ApiError::invalid_argument(
                "network.session_peers",
                "session_peers needs the sandbox's sandboxd.session annotation: create it through a Session",
            )),
        }
    }

    /// Whether the sandbox needs an address (always, in bridge mode: published ports need one even when
    /// egress is denied).
    pub fn services(&self) -> usize {
        self.services.len()
    }
}

/// A bound, never-listening socket holding a published host port, so that another program (or sandbox)
/// binding it gets `EADDRINUSE` while the sandbox has it.
#[derive(Debug)]
struct Placeholder(#[allow(dead_code)] OwnedFd);

/// How many leases one write of the allocation cursor covers.
const LEASE_BATCH: u32 = 32;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    /// Index (from the subnet's start) at or past the last address handed out: allocation goes on after it,
    /// so an address comes back only after the whole subnet was used once (its old veth is long gone then).
    cursor: u32,
}

#[derive(Debug)]
struct Active {
    rules: SandboxRules,
    /// Served by the DNS forwarder.
    dns: bool,
    _ports: Vec<Placeholder>,
}

#[derive(Debug, Default)]
struct State {
    used: HashSet<Ipv4Addr>,
    cursor: u32,
    /// Leases left before the cursor on disk must be moved ahead again.
    unpersisted: u32,
    active: HashMap<String, Active>,
    /// The table has been installed (after recovery); before that, changes only touch `active`.
    installed: bool,
}

impl State {
    /// The addresses of the other active sandboxes in `rules`' peer group (none without one). Called with
    /// the state locked, before `rules`' sandbox joins `active` and after it left: the set in the table then
    /// holds exactly the pairs of the current members.
    fn peers_of(&self, rules: &SandboxRules) -> Vec<Ipv4Addr> {
        let Some(group) = &rules.peer_group else {
            return Vec::new();
        };
        self.active
            .values()
            .filter(|a| {
                a.rules.peer_group.as_ref() == Some(group) && a.rules.address != rules.address
            })
            .map(|a| a.rules.address)
            .collect()
    }
}

/// The daemon's networking (bridge mode).
#[derive(Debug)]
pub struct Network {
    cfg: NetworkConfig,
    plan: NetPlan,
    fw: Arc<Firewall>,
    gateway: Ipv4Addr,
    dns: Vec<Ipv4Addr>,
    /// The sandboxes with `dns_name` rules, as the DNS forwarder knows them.
    dns_clients: Arc<DnsClients>,
    /// The DNS forwarder listens on the gateway.
    forwarding: bool,
    state: StdMutex<State>,
    state_path: PathBuf,
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The host's nameservers usable from a sandbox: IPv4, not loopback (a stub resolver on the host's
/// loopback is out of a sandbox's reach; systemd-resolved's upstream list is used then, as Docker does).
fn host_resolvers() -> Vec<Ipv4Addr> {
    resolvers_in(false)
}

/// The host's IPv4 nameservers, loopback ones too when `loopback` (the DNS forwarder runs in the host's
/// network namespace, where a stub resolver on 127.0.0.53 works).
fn resolvers_in(loopback: bool) -> Vec<Ipv4Addr> {
    let parse = |p: &str| -> Vec<Ipv4Addr> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some("nameserver"))
                    .then(|| w.next())
                    .flatten()
                    .and_then(|a| a.parse::<Ipv4Addr>().ok())
            })
            .filter(|a| (loopback || !a.is_loopback()) && !a.is_unspecified())
            .collect()
    };
    let v = parse("/etc/resolv.conf");
    if v.is_empty() {
        parse("/run/systemd/resolve/resolv.conf")
    } else {
        v
    }
}

fn proto_of(field: &str, p: Option<&str>) -> Result<Option<Proto>, ApiError> {
    match p.map(str::to_ascii_lowercase).as_deref() {
        None => Ok(None),
        Some("tcp") => Ok(Some(Proto::Tcp)),
        Some("udp") => Ok(Some(Proto::Udp)),
        Some(other) => Err(ApiError::invalid_argument(
            field,
            format!("unsupported protocol {other:?}: tcp or udp"),
        )),
    }
}

fn port_of(field: &str, p: u32, zero_ok: bool) -> Result<u16, ApiError> {
    match u16::try_from(p) {
        Ok(0) if zero_ok => Ok(0),
        Ok(p) if p > 0 => Ok(p),
        _ => Err(ApiError::invalid_argument(
            field,
            format!("invalid port {p}: 1 to 65535"),
        )),
    }
}

/// Parses `10.0.0.0/8` or a bare address (a /32).
fn cidr_of(field: &str, s: &str) -> Result<Ipv4Net, ApiError> {
    let s = s.trim();
    let net = if s.contains('/') {
        s.parse::<Ipv4Net>().map_err(|e| {
            ApiError::invalid_argument(field, format!("invalid IPv4 CIDR {s:?}: {e}"))
        })?
    } else {
        let a = s.parse::<Ipv4Addr>().map_err(|e| {
            ApiError::invalid_argument(field, format!("invalid IPv4 CIDR {s:?}: {e}"))
        })?;
        Ipv4Net::new(a, 32).map_err(|e| ApiError::invalid_argument(field, e.to_string()))?
    };
    if net != net.trunc() {
        return Err(ApiError::invalid_argument(
            field,
            format!(
                "invalid IPv4 CIDR {s:?}: host bits are set (did you mean {}?)",
                net.trunc()
            ),
        ));
    }
    Ok(net)
}

/// Checks network options and services (also when networking is off, so that a request means the same
/// everywhere); answers the policy to enforce.
pub fn validate(
    opts: Option<&NetworkOptions>,
    services: &[ServiceSpec],
    publish_host_ip: Ipv4Addr,
) -> Result<Policy, ApiError> {
    let mut options = opts.cloned().unwrap_or_default();
    let mut allow = Vec::new();
    let mut dns = Vec::new();
    for (i, r) in options.egress.iter_mut().enumerate() {
        let f = |name: &str| format!("network.egress[{i}].{name}");
        let protos = match proto_of(&f("protocol"), r.protocol.as_deref())? {
            Some(p) => vec![p],
            None => vec![Proto::Tcp, Proto::Udp],
        };
        let mut ports = Vec::new();
        for (j, p) in r.ports.iter().enumerate() {
            ports.push(port_of(
                &format!("network.egress[{i}].ports[{j}]"),
                *p,
                false,
            )?);
        }
        if ports.len() > 64 {
            return Err(ApiError::invalid_argument(
                f("ports"),
                "at most 64 ports per rule",
            ));
        }
        match (&r.cidr, &r.dns_name) {
            (Some(c), None) => {
                let net = cidr_of(&f("cidr"), c)?;
                for proto in &protos {
                    if ports.is_empty() {
                        allow.push(AllowRule {
                            net,
                            proto: *proto,
                            ports: None,
                        });
                    }
                    for p in &ports {
                        allow.push(AllowRule {
                            net,
                            proto: *proto,
                            ports: Some((*p, *p)),
                        });
                    }
                }
            }
            (None, Some(name)) => {
                let pattern = NamePattern::parse(name).map_err(|e| {
                    ApiError::invalid_argument(
                        f("dns_name"),
                        format!(
                            "invalid DNS name {name:?}: {e} (a host name, or *. and a host name)"
                        ),
                    )
                })?;
                if dns.len() == MAX_DNS_NAMES {
                    return Err(ApiError::invalid_argument(
                        f("dns_name"),
                        format!("at most {MAX_DNS_NAMES} DNS names per sandbox"),
                    ));
                }
                // Recorded and shown as matched: lower case, without the final dot.
                r.dns_name = Some(pattern.to_string());
                dns.push(DnsRule {
                    pattern,
                    protos: protos.clone(),
                    ports: ports.clone(),
                });
            }
            _ => {
                return Err(ApiError::invalid_argument(
                    format!("network.egress[{i}]"),
                    "an egress rule has exactly one of cidr and dns_name",
                ));
            }
        }
    }
    if options.egress.len() > 256 {
        return Err(ApiError::invalid_argument(
            "network.egress",
            "at most 256 egress rules",
        ));
    }
    if options.deny_egress && !options.egress.is_empty() {
        return Err(ApiError::invalid_argument(
            "network.egress",
            "deny_egress and an egress allow-list contradict each other",
        ));
    }
    let egress = if options.deny_egress {
        Egress::Deny
    } else if options.egress.is_empty() {
        Egress::Open
    } else {
        Egress::Allow(allow)
    };
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, s) in services.iter().enumerate() {
        let f = |name: &str| format!("services[{i}].{name}");
        let port = port_of(&f("port"), s.port, false)?;
        let proto = proto_of(&f("protocol"), s.protocol.as_deref())?.unwrap_or(Proto::Tcp);
        let host_port = port_of(&f("host_port"), s.host_port.unwrap_or(0), true)?;
        let host_ip = match &s.host_ip {
            None => publish_host_ip,
            Some(h) => h.parse::<Ipv4Addr>().map_err(|e| {
                ApiError::invalid_argument(f("host_ip"), format!("invalid IPv4 address {h:?}: {e}"))
            })?,
        };
        // 0.0.0.0: every address of the host (its external ones too).
        if host_ip.is_multicast() || host_ip.is_broadcast() {
            return Err(ApiError::invalid_argument(
                f("host_ip"),
                format!("publish on an address of this host (or 0.0.0.0 for all), not {host_ip}"),
            ));
        }
        if !seen.insert((proto, port)) {
            return Err(ApiError::invalid_argument(
                f("port"),
                format!("port {port}/{proto} is published twice"),
            ));
        }
        out.push((proto, port, host_ip, host_port));
    }
    if out.len() > 64 {
        return Err(ApiError::invalid_argument(
            "services",
            "at most 64 published ports",
        ));
    }
    Ok(Policy {
        options,
        egress,
        dns,
        services: out,
        peer_group: None,
    })
}

/// Binds a never-listening socket on `ip:port` (`port` 0: the kernel picks); answers it and the port.
fn bind_placeholder(proto: Proto, ip: Ipv4Addr, port: u16) -> std::io::Result<(Placeholder, u16)> {
    use nix::sys::socket::{
        bind, getsockname, socket, AddressFamily, SockFlag, SockType, SockaddrIn,
    };
    let ty = match proto {
        Proto::Tcp => SockType::Stream,
        Proto::Udp => SockType::Datagram,
    };
    let fd = socket(AddressFamily::Inet, ty, SockFlag::SOCK_CLOEXEC, None)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(std::net::SocketAddrV4::new(ip, port)),
    )?;
    let bound: SockaddrIn = getsockname(std::os::fd::AsRawFd::as_raw_fd(&fd))?;
    Ok((Placeholder(fd), bound.port()))
}

impl Network {
    /// Sets up bridge mode (None in mode `none`): loads libnftables, checks the subnet against the host's
    /// networks, enables IPv4 forwarding, makes sure the bridge exists. The table is installed by
    /// [`Network::install`] once the surviving sandboxes are known.
    pub async fn start(
        cfg: &NetworkConfig,
        state_dir: &Path,
    ) -> Result<Option<Self>, NetworkInitError> {
        if cfg.mode == NetworkMode::None {
            return Ok(None);
        }
        let fw = Firewall::open()?;
        let subnet = cfg.subnet;
        for other in sandbox_runtime::net::link::host_ipv4_networks(&cfg.bridge).await? {
            if other.contains(&subnet.network()) || subnet.contains(&other.network()) {
                return Err(NetworkInitError::Overlap { subnet, other });
            }
        }
        let gateway = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        let v6 = match cfg.subnet6 {
            Some(subnet6) => {
                for other in sandbox_runtime::net::link::host_ipv6_networks(&cfg.bridge).await? {
                    if other.contains(&subnet6.network()) || subnet6.contains(&other.network()) {
                        return Err(NetworkInitError::Overlap6 {
                            subnet: subnet6,
                            other,
                        });
                    }
                }
                if sandbox_runtime::net::link::set_ipv6_forwarding()? {
                    tracing::info!("enabled IPv6 forwarding (net.ipv6.conf.all.forwarding=1) for sandbox egress; interfaces with accept_ra=1 now ignore router advertisements");
                }
                Some(Plan6 {
                    subnet: subnet6,
                    gateway: Ipv6Addr::from(u128::from(subnet6.network()) + 1),
                })
            }
            None => None,
        };
        if sandbox_runtime::net::link::set_ip_forward()? {
            tracing::info!("enabled IPv4 forwarding (net.ipv4.ip_forward=1) for sandbox egress");
        }
        sandbox_runtime::net::link::ensure_bridge(
            &cfg.bridge,
            gateway,
            subnet.prefix_len(),
            v6.map(|v| (v.gateway, v.subnet.prefix_len())),
        )
        .await?;
        let dns = if cfg.dns.is_empty() {
            host_resolvers()
        } else {
            cfg.dns.clone()
        };
        if dns.is_empty() {
            tracing::warn!("no nameserver for sandboxes: the host has none reachable from a sandbox; set [network] dns");
        }
        let fw = Arc::new(fw);
        let plan = NetPlan {
            table: cfg.nft_table.clone(),
            bridge: cfg.bridge.clone(),
            subnet,
            gateway,
            v6,
        };
        // The DNS forwarder (for `dns_name` rules) on the gateway, now that the bridge has the address.
        let upstreams = if dns.is_empty() {
            resolvers_in(true)
        } else {
            dns.clone()
        };
        let dns_clients = Arc::new(DnsClients::default());
        let forwarder = Arc::new(Forwarder::new(
            dns_clients.clone(),
            fw.clone(),
            plan.clone(),
            &upstreams,
        ));
        let forwarding = match forwarder.serve(gateway).await {
            Ok(()) => {
                tracing::info!(address = %gateway, upstreams = ?upstreams, "DNS forwarder for dns_name egress rules listening on port 53");
                true
            }
            Err(e) => {
                tracing::warn!("the DNS forwarder cannot listen on {gateway}:53 ({e}): egress rules by dns_name are refused");
                false
            }
        };
        let state_path = state_dir.join("network.json");
        let persisted: Persisted = sandbox_runtime::spec::read_json(&state_path)
            .ok()
            .flatten()
            .unwrap_or_default();
        Ok(Some(Self {
            plan,
            cfg: cfg.clone(),
            fw,
            gateway,
            dns,
            dns_clients,
            forwarding,
            state: StdMutex::new(State {
                cursor: persisted.cursor,
                ..State::default()
            }),
            state_path,
        }))
    }

    /// The gateway (the bridge's address).
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// Prefix length of the subnet.
    pub fn prefix_len(&self) -> u8 {
        self.cfg.subnet.prefix_len()
    }

    /// Reserves the next free address and a veth name.
    pub fn lease(&self) -> Result<Lease, ApiError> {
        let subnet = self.cfg.subnet;
        let base = u32::from(subnet.network());
        // Network address, gateway (+1) and broadcast are never handed out.
        let count = (1u64 << (32 - subnet.prefix_len())) as u32 - 3;
        let mut st = lock(&self.state);
        for step in 1..=count {
            let idx = (st.cursor.wrapping_add(step)) % count;
            let addr = Ipv4Addr::from(base + 2 + idx);
            if st.used.insert(addr) {
                st.cursor = idx;
                // The cursor on disk runs ahead of the one in memory by up to LEASE_BATCH addresses, so only
                // one lease in LEASE_BATCH writes it: after a crash allocation resumes past every address
                // handed out before (skipping at most LEASE_BATCH).
                if st.unpersisted == 0 {
                    let ahead = (idx + LEASE_BATCH) % count;
                    if let Err(e) = sandbox_runtime::spec::write_json_replace(
                        &self.state_path,
                        &Persisted { cursor: ahead },
                    ) {
                        tracing::warn!("writing {}: {e}", self.state_path.display());
                    }
                    st.unpersisted = LEASE_BATCH;
                }
                st.unpersisted -= 1;
                let host_if = self.veth_name();
                return Ok(Lease {
                    address: addr,
                    host_if,
                });
            }
        }
        Err(ApiError::new(
            ErrorCode::ResourceExhausted,
            format!(
                "every address of the sandbox subnet {} is in use; remove sandboxes or configure a larger [network] subnet",
                subnet
            ),
        )
        .with_details(serde_json::json!({"resource": "addresses"})))
    }

    /// The nameservers of a sandbox with `policy` (its `/etc/resolv.conf`): with `dns_name` rules the
    /// gateway's forwarder (which alone knows what the sandbox may resolve), else the network's.
    pub fn nameservers(&self, policy: &Policy) -> Vec<Ipv4Addr> {
        if policy.dns.is_empty() {
            self.dns.clone()
        } else {
            vec![self.gateway]
        }
    }

    /// The IPv6 address that goes with a sandbox's IPv4 address: the IPv6 subnet's start plus the IPv4
    /// address's index in its subnet (so IPv6 addresses need no allocation of their own).
    fn address6(&self, address: Ipv4Addr) -> Option<Ipv6Addr> {
        let v6 = self.plan.v6?;
        let index = u32::from(address).wrapping_sub(u32::from(self.plan.subnet.network()));
        Some(Ipv6Addr::from(
            u128::from(v6.subnet.network()) + u128::from(index),
        ))
    }

    /// A fresh name for a veth's host end: the prefix and 8 random hex characters.
    fn veth_name(&self) -> String {
        format!(
            "{}{}",
            self.cfg.veth_prefix,
            &crate::manager::random_id()[..8]
        )
    }

    /// The same address with a fresh veth name.
    pub fn renamed(&self, address: &Ipv4Addr) -> Lease {
        Lease {
            address: *address,
            host_if: self.veth_name(),
        }
    }

    /// Returns an address that was leased but never activated (a pooled supervisor that went away, a
    /// failed create).
    pub fn unlease(&self, lease: &Lease) {
        lock(&self.state).used.remove(&lease.address);
    }

    /// What the supervisor needs to make the sandbox's link.
    pub fn attach(&self, lease: &Lease) -> NetAttach {
        NetAttach {
            bridge: self.cfg.bridge.clone(),
            host_if: lease.host_if.clone(),
            address: lease.address,
            prefix_len: self.cfg.subnet.prefix_len(),
            gateway: self.gateway,
            v6: self
                .address6(lease.address)
                .zip(self.plan.v6)
                .map(|(a, v6)| Attach6 {
                    address: a,
                    gateway: v6.gateway,
                }),
        }
    }

    /// Binds the published ports and adds the sandbox's firewall elements (before its init runs). On error
    /// nothing stays bound or added.
    pub fn activate(
        &self,
        id: &str,
        lease: &Lease,
        policy: &Policy,
    ) -> Result<NetRecord, ApiError> {
        if !policy.dns.is_empty() && !self.forwarding {
            return Err(ApiError::new(
                ErrorCode::NetworkError,
                format!(
                    "egress rules by dns_name need the daemon's DNS forwarder, which could not listen on {}:53 (see the daemon's log)",
                    self.gateway
                ),
            ));
        }
        let mut ports = Vec::new();
        let mut published = Vec::new();
        let mut exposed = Vec::new();
        for (i, (proto, port, host_ip, host_port)) in policy.services.iter().enumerate() {
            let (ph, bound) = bind_placeholder(*proto, *host_ip, *host_port).map_err(|e| {
                match e.raw_os_error() {
                    Some(libc::EADDRINUSE) => ApiError::new(
                        ErrorCode::PortInUse,
                        format!("{host_ip}:{host_port}/{proto} is already in use on this host"),
                    )
                    .with_details(serde_json::json!({"field": format!("services[{i}].host_port"), "host_ip": host_ip.to_string(), "host_port": host_port})),
                    Some(libc::EADDRNOTAVAIL) => ApiError::invalid_argument(
                        format!("services[{i}].host_ip"),
                        format!("{host_ip} is not an address of this host"),
                    ),
                    Some(libc::EACCES) => ApiError::invalid_argument(
                        format!("services[{i}].host_port"),
                        format!("binding {host_ip}:{host_port}/{proto}: {e}"),
                    ),
                    _ => ApiError::new(
                        ErrorCode::NetworkError,
                        format!("binding {host_ip}:{host_port}/{proto}: {e}"),
                    ),
                }
            })?;
            ports.push(ph);
            published.push(Published {
                host_ip: *host_ip,
                host_port: bound,
                proto: *proto,
                port: *port,
            });
            exposed.push(ExposedPort {
                port: *port,
                protocol: proto.to_string(),
                host_ip: host_ip.to_string(),
                host_port: bound,
            });
        }
        let rules = SandboxRules {
            address: lease.address,
            address6: self.address6(lease.address),
            host_if: lease.host_if.clone(),
            egress: policy.egress.clone(),
            ingress_open: !policy.options.deny_ingress,
            published,
            peer_group: policy.peer_group.clone(),
        };
        let mut st = lock(&self.state);
        if st.installed {
            let peers = st.peers_of(&rules);
            self.fw
                .add_sandbox(&self.plan, &rules, &peers)
                .map_err(|e| {
                    ApiError::new(
                        ErrorCode::NetworkError,
                        format!("adding the sandbox's firewall rules: {e}"),
                    )
                })?;
        }
        st.used.insert(lease.address);
        let dns = !policy.dns.is_empty();
        let nameservers = self.nameservers(policy);
        self.dns_clients.set(lease.address, policy.dns.clone());
        st.active.insert(
            id.to_owned(),
            Active {
                rules,
                dns,
                _ports: ports,
            },
        );
        Ok(NetRecord {
            address: lease.address,
            host_if: lease.host_if.clone(),
            policy: policy.options.clone(),
            exposed,
            gateway: self.gateway,
            dns: nameservers,
            peer_group: policy.peer_group.clone(),
            address6: self.address6(lease.address),
            gateway6: self.plan.v6.map(|v| v.gateway),
        })
    }

    /// Takes a recovered (still running) sandbox back: its address stays used, its ports bound again, its
    /// rules go into the table at [`Network::install`].
    pub fn adopt(&self, id: &str, rec: &NetRecord) {
        let policy = match validate(Some(&rec.policy), &[], self.cfg.publish_host_ip) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(%id, "the recorded network policy no longer validates: {e}");
                return;
            }
        };
        let mut ports = Vec::new();
        let mut published = Vec::new();
        for x in &rec.exposed {
            let proto = if x.protocol == "udp" {
                Proto::Udp
            } else {
                Proto::Tcp
            };
            let Ok(ip) = x.host_ip.parse::<Ipv4Addr>() else {
                continue;
            };
            match bind_placeholder(proto, ip, x.host_port) {
                Ok((ph, _)) => ports.push(ph),
                Err(e) => {
                    tracing::warn!(%id, "holding published port {ip}:{}/{proto} again: {e}", x.host_port)
                }
            }
            published.push(Published {
                host_ip: ip,
                host_port: x.host_port,
                proto,
                port: x.port,
            });
        }
        let mut st = lock(&self.state);
        st.used.insert(rec.address);
        let dns = !policy.dns.is_empty();
        self.dns_clients.set(rec.address, policy.dns);
        st.active.insert(
            id.to_owned(),
            Active {
                dns,
                rules: SandboxRules {
                    address: rec.address,
                    address6: rec.address6.filter(|_| self.plan.v6.is_some()),
                    host_if: rec.host_if.clone(),
                    egress: policy.egress,
                    ingress_open: !rec.policy.deny_ingress,
                    published,
                    peer_group: rec.peer_group.clone(),
                },
                _ports: ports,
            },
        );
    }

    /// Replaces the table with one holding the active sandboxes' rules (one atomic transaction), removes
    /// bridge ports no active sandbox owns (a crashed daemon's pooled supervisors), and from now on applies
    /// changes to the table directly.
    pub async fn install(&self) -> Result<(), ApiError> {
        let keep: HashSet<String> = {
            let mut st = lock(&self.state);
            let rules: Vec<SandboxRules> = st.active.values().map(|a| a.rules.clone()).collect();
            self.fw.install(&self.plan, &rules).map_err(|e| {
                ApiError::new(
                    ErrorCode::NetworkError,
                    format!("installing the firewall table: {e}"),
                )
            })?;
            st.installed = true;
            // The new table's DNS sets are empty: sandboxes open their destinations again by resolving.
            self.dns_clients.forget_grants();
            st.active
                .values()
                .map(|a| a.rules.host_if.clone())
                .collect()
        };
        if let Ok(ports) = sandbox_runtime::net::link::bridge_ports(&self.cfg.bridge).await {
            for p in ports {
                if p.starts_with(&self.cfg.veth_prefix)
                    && !keep.contains(&p)
                    && !self.is_leased_if(&p)
                {
                    tracing::info!(link = %p, "removing a stale sandbox link");
                    let _ = sandbox_runtime::net::link::delete_link(&p).await;
                }
            }
        }
        Ok(())
    }

    fn is_leased_if(&self, _name: &str) -> bool {
        // Pooled supervisors are started after `install`; their links are new.
        false
    }

    /// Removes a sandbox's rules, releases its ports and its address (at its end, or when its creation
    /// failed after `activate`).
    pub fn release(&self, id: &str) {
        let mut st = lock(&self.state);
        if let Some(a) = st.active.remove(id) {
            if a.dns {
                let installed = st.installed;
                self.dns_clients.remove(a.rules.address, |grants| {
                    if installed {
                        if let Err(e) = self.fw.remove_dns_grants(&self.plan, grants) {
                            tracing::warn!(%id, "closing the destinations the DNS forwarder opened: {e}");
                        }
                    }
                });
            }
            if st.installed {
                let peers = st.peers_of(&a.rules);
                if let Err(e) = self.fw.remove_sandbox(&self.plan, &a.rules, &peers) {
                    tracing::warn!(%id, "removing the sandbox's firewall rules: {e}");
                }
            }
            st.used.remove(&a.rules.address);
        }
    }

    /// Whether any sandbox still has network state.
    pub fn idle(&self) -> bool {
        lock(&self.state).active.is_empty()
    }

    /// At a clean stop with no sandbox left: removes the table and the bridge.
    pub async fn teardown(&self) {
        if !self.idle() {
            return;
        }
        if let Err(e) = self.fw.remove_table(&self.plan.table) {
            tracing::warn!("removing the firewall table: {e}");
        }
        if let Err(e) = sandbox_runtime::net::link::delete_link(&self.cfg.bridge).await {
            tracing::warn!("removing the bridge: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandbox_proto::EgressRule;

    fn svc(port: u32) -> ServiceSpec {
        ServiceSpec {
            port,
            ..ServiceSpec::default()
        }
    }

    #[test]
    fn validation_names_the_field() {
        let lo = Ipv4Addr::LOCALHOST;
        let bad = |opts: NetworkOptions, services: Vec<ServiceSpec>, field: &str| {
            let e = validate(Some(&opts), &services, lo).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{e:?}");
            assert_eq!(e.details.unwrap()["field"], field);
        };
        let rule = |cidr: &str, proto: Option<&str>, ports: Vec<u32>| EgressRule {
            cidr: Some(cidr.into()),
            protocol: proto.map(Into::into),
            ports,
            ..EgressRule::default()
        };
        let with = |rules: Vec<EgressRule>| NetworkOptions {
            egress: rules,
            ..NetworkOptions::default()
        };
        bad(
            with(vec![rule("10.0.0.0/33", None, vec![])]),
            vec![],
            "network.egress[0].cidr",
        );
        bad(
            with(vec![rule("10.0.0.1/8", None, vec![])]),
            vec![],
            "network.egress[0].cidr",
        );
        bad(
            with(vec![rule("nonsense", None, vec![])]),
            vec![],
            "network.egress[0].cidr",
        );
        bad(
            with(vec![
                rule("10.0.0.0/8", None, vec![]),
                rule("10.0.0.0/8", Some("icmp"), vec![]),
            ]),
            vec![],
            "network.egress[1].protocol",
        );
        bad(
            with(vec![rule("10.0.0.0/8", None, vec![70000])]),
            vec![],
            "network.egress[0].ports[0]",
        );
        bad(
            with(vec![rule("10.0.0.0/8", None, vec![0])]),
            vec![],
            "network.egress[0].ports[0]",
        );
        bad(NetworkOptions::default(), vec![svc(0)], "services[0].port");
        bad(
            NetworkOptions::default(),
            vec![svc(80), svc(80)],
            "services[1].port",
        );
        bad(
            NetworkOptions::default(),
            vec![ServiceSpec {
                port: 80,
                protocol: Some("sctp".into()),
                ..ServiceSpec::default()
            }],
            "services[0].protocol",
        );
        bad(
            NetworkOptions::default(),
            vec![ServiceSpec {
                port: 80,
                host_ip: Some("255.255.255.255".into()),
                ..ServiceSpec::default()
            }],
            "services[0].host_ip",
        );
        let all = ServiceSpec {
            port: 80,
            host_ip: Some("0.0.0.0".into()),
            ..ServiceSpec::default()
        };
        assert_eq!(
            validate(None, &[all], lo).unwrap().services[0].2,
            Ipv4Addr::UNSPECIFIED
        );
        let p = validate(
            Some(&with(vec![rule("192.0.2.7", Some("TCP"), vec![443, 80])])),
            &[svc(8000)],
            lo,
        )
        .unwrap();
        match p.egress {
            Egress::Allow(r) => {
                assert_eq!(r.len(), 2);
                assert_eq!(r[0].net.to_string(), "192.0.2.7/32");
                assert_eq!(r[0].ports, Some((443, 443)));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p.services, vec![(Proto::Tcp, 8000, lo, 0)]);
        let any = validate(Some(&with(vec![rule("10.0.0.0/8", None, vec![])])), &[], lo).unwrap();
        match any.egress {
            Egress::Allow(r) => assert_eq!(r.len(), 2, "tcp and udp"),
            other => panic!("{other:?}"),
        }
        // DNS names: checked, normalised, at most 64.
        let name = |n: &str| EgressRule {
            dns_name: Some(n.into()),
            ..EgressRule::default()
        };
        bad(
            with(vec![name("a..b")]),
            vec![],
            "network.egress[0].dns_name",
        );
        bad(
            with(vec![rule("10.0.0.0/8", None, vec![]), name("*")]),
            vec![],
            "network.egress[1].dns_name",
        );
        bad(
            with((0..65).map(|i| name(&format!("n{i}.org"))).collect()),
            vec![],
            "network.egress[64].dns_name",
        );
        let both = EgressRule {
            cidr: Some("10.0.0.0/8".into()),
            ..name("a.org")
        };
        bad(with(vec![both]), vec![], "network.egress[0]");
        let p = validate(
            Some(&with(vec![
                name("Example.ORG."),
                EgressRule {
                    ports: vec![443],
                    protocol: Some("tcp".into()),
                    ..name("*.cdn.example.net")
                },
            ])),
            &[],
            lo,
        )
        .unwrap();
        assert_eq!(p.options.egress[0].dns_name.as_deref(), Some("example.org"));
        assert!(matches!(&p.egress, Egress::Allow(r) if r.is_empty()));
        assert_eq!(p.dns.len(), 2);
        assert_eq!(p.dns[0].protos, [Proto::Tcp, Proto::Udp]);
        assert!(p.dns[0].ports.is_empty());
        assert_eq!(
            (p.dns[1].protos.as_slice(), p.dns[1].ports.as_slice()),
            (&[Proto::Tcp][..], &[443][..])
        );
        assert!(p.dns[1].pattern.matches("a.cdn.example.net"));
        let deny = NetworkOptions {
            deny_egress: true,
            ..NetworkOptions::default()
        };
        assert!(matches!(
            validate(Some(&deny), &[], lo).unwrap().egress,
            Egress::Deny
        ));
    }
}
