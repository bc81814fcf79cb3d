//! The firewall: one nftables table owned by sandboxd (`inet <table>`), driven in-process through
//! libnftables (`libnftables.so.1`, loaded at run time: the daemon runs without it when networking is off).
//!
//! # Layout
//!
//! The chains are fixed; everything that belongs to one sandbox is an element of a shared set or map keyed by
//! the sandbox's address, so adding or removing a sandbox is one small transaction of element changes (about
//! 0.2 ms) and never touches a chain:
//!
//! - `egress_vmap` (address → verdict): `accept` (egress open), `jump egress_deny` (deny) or
//!   `jump egress_allowlist_<k>` (allow-list).
//! - `egress_allow_<k>` (`saddr . daddr . proto . dport`, intervals): the allow-lists, in [`ALLOW_SHARDS`]
//!   sets (`k` = address % shards) looked up by as many chains `egress_allowlist_<k>`, because nft 1.0.6
//!   deletes interval elements in time proportional to the set's size.
//! - `egress_dns` (`saddr . daddr . proto . dport`) and `egress_dns_any` (`saddr . daddr . proto`), both
//!   with per-element timeouts: the destinations the daemon's DNS forwarder opened for a sandbox with
//!   `dns_name` rules (with and without ports), added before it relays an answer (see [`DnsGrant`]); the
//!   kernel drops them when they expire. Looked up by every `egress_allowlist_<k>` chain.
//! - `ingress_open` (addresses): sandboxes that accept new inbound connections.
//! - `published` (`host address . proto . host port` → `sandbox address . port`): published ports;
//!   `published_any` (`proto . host port` → `sandbox address . port`): those published on `0.0.0.0`.
//! - `session_peers` (`source . destination`): ordered pairs of sandboxes that may reach each other (both
//!   opted in with `session_peers` and in the same session). A sandbox joining a group of `k` adds `2k`
//!   elements, and leaving removes those with the members left: the set is always every ordered pair of each
//!   group's current members, so an address handed out again never inherits a pair.
//!
//! Rules, in hook order:
//!
//! - raw prerouting: `127.0.0.0/8` only from `lo` (the bridge has `route_localnet=1` so that published ports
//!   work on 127.0.0.1; this is the guard against CVE-2020-8558).
//! - nat prerouting (priority dstnat) and nat output (priority -100: nft 1.0.6 rejects `dstnat` on output):
//!   DNAT of local destinations through `published`.
//! - filter forward: bridge to bridge (sandbox to sandbox) accepted for the pairs in `session_peers`,
//!   rejected otherwise. The bridge ports are isolated, so such traffic cannot go port to port: the bridge
//!   answers ARP for every address with private-VLAN proxy ARP and routes it (see `link::ensure_bridge`);
//!   the ICMP redirects that would send a sandbox to its peer directly are dropped in filter output;
//!   to a sandbox: established, DNAT'd (published) or `ingress_open`, else drop; from a sandbox: established
//!   accepted, link-local and the sandbox subnet rejected, then the source address's verdict in `egress_vmap`;
//!   an unknown source is dropped.
//! - filter input from the bridge (a sandbox talking to one of the host's own addresses): established
//!   accepted, DNS (udp and tcp port 53) to the gateway's address accepted (the daemon's forwarder), else
//!   rejected: see [`host_services`].
//! - filter output, new connections from the host out through the bridge: DNAT'd (published, e.g. from
//!   127.0.0.1) or `ingress_open` accepted, else dropped; ICMP redirects into the bridge dropped.
//! - nat postrouting: masquerade of the subnet out of any other interface (egress), and of the host's own
//!   addresses into the bridge (the host reaching a published port through 127.0.0.1).
//!
//! Rejections use `icmpx admin-prohibited`, so a blocked connection fails at once instead of timing out.
//!
//! # Transactions
//!
//! Every [`Firewall`] call is one libnftables buffer, i.e. one kernel transaction: it applies entirely or not
//! at all. [`Firewall::install`] replaces the whole table atomically (`add table; delete table; table {..}`),
//! which is how the daemon reconciles at start. nft 1.0.6 has no `destroy` (delete-if-present), so removing
//! an element that is not there fails the whole batch: [`Firewall::remove_sandbox`] first tries the single
//! transaction [`render_remove`] gives (the exact inverse of [`render_add`]) and, only if that fails, deletes
//! the elements one by one, ignoring those already gone.
//!
//! Adding an element whose key exists with a different value fails (`File exists`): changing a sandbox's
//! policy is a remove followed by an add, and an address must not be reused before its elements are removed.
//!
//! # Text, not JSON
//!
//! Commands are nft's own language, rendered only from typed values (addresses, prefixes, ports, enums) and
//! from names checked by [`check_table_name`] / [`check_interface_name`], so no input can inject syntax.
//!
//! The libnftables context belongs to the network namespace of the thread that called [`Firewall::open`] (its
//! netlink socket is opened there).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{c_char, c_int, CStr, CString};
use std::fmt::{self, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ptr::NonNull;
use std::str::FromStr;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Instant;

use ipnet::{Ipv4Net, Ipv6Net};
use libloading::Library;
use serde::{Deserialize, Serialize};

/// The shared object loaded at run time (Debian package `libnftables1`, pulled in by `nftables`).
pub const LIBRARY: &str = "libnftables.so.1";

/// Longest table name accepted (the kernel allows 255 bytes; ours are short).
pub const MAX_TABLE_NAME: usize = 64;

/// Longest interface name (`IFNAMSIZ` - 1).
pub const MAX_INTERFACE_NAME: usize = 15;

/// Errors of the firewall.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// libnftables could not be loaded or initialised (a missing library says to install `nftables`).
    #[error("nftables is unavailable: {0}")]
    Unavailable(String),
    /// A table or interface name that cannot be put into rule text.
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: &'static str,
    },
    /// A plan or sandbox whose rules cannot be rendered (address outside the subnet, port 0, duplicate
    /// published port, ...).
    #[error("invalid firewall rules: {0}")]
    InvalidRule(String),
    /// nft refused the commands; the text is nft's own error message (with the offending command).
    #[error("nft: {0}")]
    Command(String),
}

// ---------------------------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------------------------

/// The daemon's network: the table, the bridge, the sandbox subnet and its gateway (the bridge's address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPlan {
    /// Name of the `inet` table (letters, digits, `_`, `.`, `-`; starts with a letter; not an nft keyword).
    pub table: String,
    /// The host bridge the sandboxes are attached to.
    pub bridge: String,
    /// The sandbox subnet.
    pub subnet: Ipv4Net,
    /// The bridge's address on `subnet`.
    pub gateway: Ipv4Addr,
    /// The IPv6 subnet, where configured.
    pub v6: Option<Plan6>,
}

/// The daemon's IPv6 subnet and the bridge's address on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan6 {
    pub subnet: Ipv6Net,
    pub gateway: Ipv6Addr,
}

/// A transport protocol of an allow-list rule or a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// Both protocols, in rendering order.
    pub const ALL: [Proto; 2] = [Proto::Tcp, Proto::Udp];

    /// nft's (and the API's) name of the protocol.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Proto {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            other => Err(format!("unknown protocol {other:?} (expected tcp or udp)")),
        }
    }
}

/// One allow-listed egress destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    /// Destination network (host bits are ignored).
    pub net: Ipv4Net,
    pub proto: Proto,
    /// Inclusive destination port range; `None`: all ports.
    pub ports: Option<(u16, u16)>,
}

/// A sandbox's egress policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Egress {
    /// Anywhere except link-local, the sandbox subnet and the host's own addresses.
    #[default]
    Open,
    /// Nothing (replies to inbound connections still flow).
    Deny,
    /// Only these destinations. Overlapping rules are fine: they are merged into disjoint elements.
    Allow(Vec<AllowRule>),
}

/// A published port: `host_ip:host_port/proto` on the host is forwarded to `<sandbox address>:port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// A local address of the host, or `0.0.0.0`: every one of them.
    pub host_ip: Ipv4Addr,
    pub host_port: u16,
    pub proto: Proto,
    /// The port inside the sandbox.
    pub port: u16,
}

/// A destination the DNS forwarder opens for a sandbox for a while: `ip daddr` with `proto` on `port` (all
/// ports when `None`), until `timeout_secs` from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DnsGrant {
    /// The sandbox's address (the source of its traffic).
    pub sandbox: Ipv4Addr,
    /// An address a name it may reach resolved to.
    pub dest: Ipv4Addr,
    pub proto: Proto,
    /// One destination port; `None`: every port.
    pub port: Option<u16>,
}

impl DnsGrant {
    /// The set holding it.
    fn set(&self) -> &'static str {
        match self.port {
            Some(_) => EGRESS_DNS,
            None => EGRESS_DNS_ANY,
        }
    }

    /// Its key in that set.
    fn key(&self) -> String {
        match self.port {
            Some(p) => format!("{} . {} . {} . {p}", self.sandbox, self.dest, self.proto),
            None => format!("{} . {} . {}", self.sandbox, self.dest, self.proto),
        }
    }
}

/// Longest a DNS grant lasts (`timeout` of its element), whatever the record's TTL.
pub const DNS_GRANT_MAX_SECS: u32 = 3600;

/// What the firewall knows about one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRules {
    /// The sandbox's address on the subnet: the key of all its elements.
    pub address: Ipv4Addr,
    /// Its IPv6 address, where the plan has an IPv6 subnet: the key of its IPv6 egress verdict (open, or
    /// `egress_deny` for deny and allow-lists, which are IPv4) and ingress elements.
    pub address6: Option<Ipv6Addr>,
    /// Host end of its veth pair; used as the comment of its elements (so `nft list table` says whose they are).
    pub host_if: String,
    pub egress: Egress,
    /// New inbound connections accepted (`deny_ingress = false`).
    pub ingress_open: bool,
    pub published: Vec<Published>,
    /// Its session, when it opted in to sandbox-to-sandbox traffic with the other members (`session_peers`):
    /// [`render_table`] pairs the sandboxes of each group; [`render_add`] and [`render_remove`] take the
    /// group's other members as an argument. Never rendered.
    pub peer_group: Option<String>,
}

// ---------------------------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------------------------

fn check_name(what: &'static str, name: &str, max: usize) -> Result<(), NftError> {
    let err = |reason| {
        Err(NftError::InvalidName {
            what,
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return err("empty");
    }
    if name.len() > max {
        return err(if max == MAX_INTERFACE_NAME {
            "longer than 15 bytes"
        } else {
            "longer than 64 bytes"
        });
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return err("only ASCII letters, digits, '_', '.' and '-' are allowed");
    }
    Ok(())
}

/// Checks a table name: 1 to 64 bytes of `[A-Za-z0-9_.-]`, starting with a letter (nft does not accept quoted
/// table names, and an unquoted one cannot start with a digit). nft keywords (`counter`, `inet`, ...) are not
/// detected here: nft refuses them when the table is installed.
pub fn check_table_name(name: &str) -> Result<(), NftError> {
    check_name("table", name, MAX_TABLE_NAME)?;
    if !name.as_bytes()[0].is_ascii_alphabetic() {
        return Err(NftError::InvalidName {
            what: "table",
            name: name.to_owned(),
            reason: "must start with a letter",
        });
    }
    Ok(())
}

/// Checks an interface name: 1 to 15 bytes of `[A-Za-z0-9_.-]`.
pub fn check_interface_name(name: &str) -> Result<(), NftError> {
    check_name("interface", name, MAX_INTERFACE_NAME)
}

// ---------------------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------------------

const EGRESS_VMAP: &str = "egress_vmap";
/// Prefix of the allow-list sets (`egress_allow_<shard>`).
const EGRESS_ALLOW: &str = "egress_allow";
const INGRESS_OPEN: &str = "ingress_open";
const EGRESS_DNS: &str = "egress_dns";
const EGRESS_DNS_ANY: &str = "egress_dns_any";
const PUBLISHED: &str = "published";
const PUBLISHED_ANY: &str = "published_any";
const SESSION_PEERS: &str = "session_peers";
const EGRESS_VMAP6: &str = "egress_vmap6";
const INGRESS_OPEN6: &str = "ingress_open6";
const CHAIN_DENY: &str = "egress_deny";
/// Prefix of the allow-list chains (`egress_allowlist_<shard>`).
const CHAIN_ALLOWLIST: &str = "egress_allowlist";

/// Number of allow-list sets (and chains): a sandbox's allow-list lives in shard `address % ALLOW_SHARDS`.
///
/// nft 1.0.6 deletes interval elements in time proportional to the size of the set times the number deleted
/// (measured: 6 elements out of a 600-element set 15 ms, out of 3000 75 ms; 0.2 ms when the set is small),
/// and the firewall is locked meanwhile. 16 sets keep that near 1 ms at 600 elements, 5 ms at 3000, for a
/// few µs more per transaction.
pub const ALLOW_SHARDS: u32 = 16;

fn allow_shard(address: Ipv4Addr) -> u32 {
    u32::from(address) % ALLOW_SHARDS
}

/// One element of a per-sandbox set or map.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Element {
    set: String,
    /// The key: all that `delete element` needs.
    key: String,
    /// Comment shown by `nft list` (the sandbox's host interface).
    comment: Option<String>,
    /// The mapped value, for maps.
    value: Option<String>,
}

impl Element {
    /// The element as written in `add element` and in a set's `elements = { }`.
    fn full(&self) -> String {
        let mut s = self.key.clone();
        if let Some(c) = &self.comment {
            // `c` is a checked interface name: no quote or backslash can appear in it.
            let _ = write!(s, " comment \"{c}\"");
        }
        if let Some(v) = &self.value {
            let _ = write!(s, " : {v}");
        }
        s
    }
}

fn check_plan(plan: &NetPlan) -> Result<(), NftError> {
    check_table_name(&plan.table)?;
    check_interface_name(&plan.bridge)?;
    if !plan.subnet.contains(&plan.gateway) {
        return Err(NftError::InvalidRule(format!(
            "the gateway {} is not in the subnet {}",
            plan.gateway, plan.subnet
        )));
    }
    if let Some(v6) = &plan.v6 {
        if !v6.subnet.contains(&v6.gateway) {
            return Err(NftError::InvalidRule(format!(
                "the gateway {} is not in the subnet {}",
                v6.gateway, v6.subnet
            )));
        }
    }
    Ok(())
}

/// Renders an address range `lo..=hi` as an address, a prefix or a range.
fn addr_range(lo: u32, hi: u32) -> String {
    if lo == hi {
        return Ipv4Addr::from(lo).to_string();
    }
    let size = u64::from(hi) - u64::from(lo) + 1;
    if size.is_power_of_two() && u64::from(lo) % size == 0 {
        let len = 32 - size.trailing_zeros();
        return format!("{}/{len}", Ipv4Addr::from(lo));
    }
    format!("{}-{}", Ipv4Addr::from(lo), Ipv4Addr::from(hi))
}

fn port_range((lo, hi): (u16, u16)) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}-{hi}")
    }
}

/// Sorted, disjoint, non-adjacent union of inclusive port ranges.
fn merge_ports(mut ranges: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    ranges.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match out.last_mut() {
            Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// One disjoint box of an allow-list: protocol, address range, port range.
type AllowBox = (Proto, (u32, u32), (u16, u16));

/// An allow-list rule as inclusive (address range, port range).
type Rect = ((u32, u32), (u16, u16));

/// Whether two inclusive ranges overlap or are adjacent.
fn touch(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 <= b.1 + 1 && b.0 <= a.1 + 1
}

/// The union of `rules` as disjoint (address range × port range) boxes per protocol.
///
/// The kernel's concatenated interval sets refuse an element that overlaps an existing one (`File exists`),
/// e.g. `198.18.1.0/24 . tcp . 0-65535` next to `198.18.0.0/16 . tcp . 443`. Rules are grouped into clusters
/// that overlap or touch; a cluster of one rule is kept as it is. A larger cluster is cut along the address
/// line at each of its rules' boundaries, each piece gets the union of the ports of the rules covering it, and
/// adjacent pieces with the same ports are joined again: the same packets, without overlaps. The result is
/// sorted, so [`render_remove`] deletes exactly what [`render_add`] added.
fn allow_boxes(rules: &[AllowRule]) -> Result<Vec<AllowBox>, NftError> {
    let mut out = Vec::new();
    for proto in Proto::ALL {
        let mut rects: Vec<Rect> = Vec::new();
        for r in rules.iter().filter(|r| r.proto == proto) {
            let ports = r.ports.unwrap_or((0, u16::MAX));
            if ports.0 > ports.1 {
                return Err(NftError::InvalidRule(format!(
                    "allow-list port range {}-{} is empty",
                    ports.0, ports.1
                )));
            }
            let net = r.net.trunc();
            rects.push((
                (u32::from(net.network()), u32::from(net.broadcast())),
                ports,
            ));
        }
        // Clusters: union-find over "overlaps or touches in both dimensions".
        let mut parent: Vec<usize> = (0..rects.len()).collect();
        fn root(parent: &mut [usize], mut i: usize) -> usize {
            while parent[i] != i {
                parent[i] = parent[parent[i]];
                i = parent[i];
            }
            i
        }
        let wide = |r: &Rect| {
            (
                (u64::from(r.0 .0), u64::from(r.0 .1)),
                (u64::from(r.1 .0), u64::from(r.1 .1)),
            )
        };
        for i in 0..rects.len() {
            for j in i + 1..rects.len() {
                let (a, b) = (wide(&rects[i]), wide(&rects[j]));
                if touch(a.0, b.0) && touch(a.1, b.1) {
                    let (ri, rj) = (root(&mut parent, i), root(&mut parent, j));
                    parent[ri] = rj;
                }
            }
        }
        let mut clusters: BTreeMap<usize, Vec<Rect>> = BTreeMap::new();
        for (i, r) in rects.iter().enumerate() {
            clusters.entry(root(&mut parent, i)).or_default().push(*r);
        }
        let mut boxes: Vec<Rect> = Vec::new();
        for cluster in clusters.into_values() {
            if let [single] = cluster[..] {
                boxes.push(single);
            } else {
                boxes.extend(disjoint(&cluster));
            }
        }
        boxes.sort_unstable();
        out.extend(boxes.into_iter().map(|(a, p)| (proto, a, p)));
    }
    Ok(out)
}

/// Disjoint boxes covering exactly the union of `rects` (see [`allow_boxes`]).
fn disjoint(rects: &[Rect]) -> Vec<Rect> {
    let mut cuts: Vec<u64> = rects
        .iter()
        .flat_map(|&((lo, hi), _)| [u64::from(lo), u64::from(hi) + 1])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    // Address ranges, each with its sorted disjoint port ranges.
    type Piece = ((u32, u32), Vec<(u16, u16)>);
    let mut pieces: Vec<Piece> = Vec::new();
    for w in cuts.windows(2) {
        // Both fit: cuts are addresses or an address + 1, and w[1] > w[0].
        let (lo, hi) = (w[0] as u32, (w[1] - 1) as u32);
        let ports: Vec<(u16, u16)> = rects
            .iter()
            .filter(|&&((a, b), _)| a <= lo && hi <= b)
            .map(|&(_, p)| p)
            .collect();
        if ports.is_empty() {
            continue;
        }
        let ports = merge_ports(ports);
        match pieces.last_mut() {
            Some(last) if u64::from(last.0 .1) + 1 == u64::from(lo) && last.1 == ports => {
                last.0 .1 = hi
            }
            _ => pieces.push(((lo, hi), ports)),
        }
    }
    pieces
        .into_iter()
        .flat_map(|(addrs, ports)| ports.into_iter().map(move |p| (addrs, p)))
        .collect()
}

fn check_sandbox_address(plan: &NetPlan, address: Ipv4Addr) -> Result<(), NftError> {
    if !plan.subnet.contains(&address) || address == plan.gateway {
        return Err(NftError::InvalidRule(format!(
            "sandbox address {address} is not a host address of {} other than the gateway {}",
            plan.subnet, plan.gateway
        )));
    }
    Ok(())
}

/// The elements one sandbox owns, in the order they are added (allow-list, egress verdict, ingress,
/// published ports, session peer pairs with each of `peers` both ways; removed in reverse). `peers` are the
/// other current members of its peer group (empty without one).
fn sandbox_elements(
    plan: &NetPlan,
    sb: &SandboxRules,
    peers: &[Ipv4Addr],
) -> Result<Vec<Element>, NftError> {
    check_interface_name(&sb.host_if)?;
    check_sandbox_address(plan, sb.address)?;
    if !peers.is_empty() && sb.peer_group.is_none() {
        return Err(NftError::InvalidRule(format!(
            "sandbox {} has session peers but no peer group",
            sb.address
        )));
    }
    let addr = sb.address.to_string();
    let comment = Some(sb.host_if.clone());
    let mut out = Vec::new();

    if let Egress::Allow(rules) = &sb.egress {
        for (proto, (lo, hi), ports) in allow_boxes(rules)? {
            out.push(Element {
                set: format!("{EGRESS_ALLOW}_{}", allow_shard(sb.address)),
                key: format!(
                    "{addr} . {} . {proto} . {}",
                    addr_range(lo, hi),
                    port_range(ports)
                ),
                comment: None,
                value: None,
            });
        }
    }
    let verdict = match sb.egress {
        Egress::Open => "accept".to_owned(),
        Egress::Deny => format!("jump {CHAIN_DENY}"),
        Egress::Allow(_) => format!("jump {CHAIN_ALLOWLIST}_{}", allow_shard(sb.address)),
    };
    out.push(Element {
        set: EGRESS_VMAP.into(),
        key: addr.clone(),
        comment: comment.clone(),
        value: Some(verdict),
    });
    if sb.ingress_open {
        out.push(Element {
            set: INGRESS_OPEN.into(),
            key: addr.clone(),
            comment: comment.clone(),
            value: None,
        });
    }
    if let Some(a6) = sb.address6 {
        match &plan.v6 {
            Some(v6) if v6.subnet.contains(&a6) && a6 != v6.gateway => {}
            _ => {
                return Err(NftError::InvalidRule(format!(
                    "sandbox address {a6} is not a host address of the IPv6 subnet (if any) other than its gateway"
                )))
            }
        }
        // IPv6 allow-lists are not supported: an allow-list sandbox reaches no IPv6 destination.
        let verdict = match sb.egress {
            Egress::Open => "accept".to_owned(),
            Egress::Deny | Egress::Allow(_) => format!("jump {CHAIN_DENY}"),
        };
        out.push(Element {
            set: EGRESS_VMAP6.into(),
            key: a6.to_string(),
            comment: comment.clone(),
            value: Some(verdict),
        });
        if sb.ingress_open {
            out.push(Element {
                set: INGRESS_OPEN6.into(),
                key: a6.to_string(),
                comment: comment.clone(),
                value: None,
            });
        }
    }
    let mut keys = BTreeSet::new();
    for p in &sb.published {
        if p.host_port == 0 || p.port == 0 {
            return Err(NftError::InvalidRule(format!(
                "published port {}:{}/{} -> {}: port 0",
                p.host_ip, p.host_port, p.proto, p.port
            )));
        }
        if !keys.insert((p.host_ip, p.proto, p.host_port)) {
            return Err(NftError::InvalidRule(format!(
                "{}:{}/{} is published twice",
                p.host_ip, p.host_port, p.proto
            )));
        }
        // 0.0.0.0: every local address, in a map of its own (keyed without the address).
        let (set, key) = if p.host_ip.is_unspecified() {
            (PUBLISHED_ANY, format!("{} . {}", p.proto, p.host_port))
        } else {
            (
                PUBLISHED,
                format!("{} . {} . {}", p.host_ip, p.proto, p.host_port),
            )
        };
        out.push(Element {
            set: set.into(),
            key,
            comment: comment.clone(),
            value: Some(format!("{addr} . {}", p.port)),
        });
    }
    let mut seen = BTreeSet::new();
    for &peer in peers {
        check_sandbox_address(plan, peer)?;
        if peer == sb.address || !seen.insert(peer) {
            return Err(NftError::InvalidRule(format!(
                "session peer {peer} of {} is the sandbox itself or given twice",
                sb.address
            )));
        }
        for (from, to) in [(sb.address, peer), (peer, sb.address)] {
            out.push(Element {
                set: SESSION_PEERS.into(),
                key: format!("{from} . {to}"),
                comment: comment.clone(),
                value: None,
            });
        }
    }
    Ok(out)
}

/// Groups elements by set, sets in the order of their first element.
fn by_set(elements: &[Element]) -> Vec<(&str, Vec<&Element>)> {
    let mut groups: Vec<(&str, Vec<&Element>)> = Vec::new();
    for e in elements {
        match groups.iter_mut().find(|(set, _)| *set == e.set) {
            Some((_, es)) => es.push(e),
            None => groups.push((&e.set, vec![e])),
        }
    }
    groups
}

/// Rules accepting sandbox → host traffic to services the host offers on the bridge, inserted in
/// `sandbox_to_host` before its final reject: DNS (udp and tcp) to the gateway's address, where the daemon's
/// forwarder listens (it answers `REFUSED` to sandboxes without `dns_name` rules).
pub fn host_services(plan: &NetPlan) -> Vec<String> {
    vec![format!(
        "ip daddr {} meta l4proto {{ tcp, udp }} th dport 53 accept comment \"the DNS forwarder of sandboxd\"",
        plan.gateway
    )]
}

/// One transaction opening `grants` for `timeout_secs` (clamped to 1..=[`DNS_GRANT_MAX_SECS`]). An element
/// already there gets the new timeout: each is added (so that the delete cannot fail), deleted and added
/// again with its timeout, all in the same transaction.
pub fn render_dns_grants(
    plan: &NetPlan,
    grants: &[DnsGrant],
    timeout_secs: u32,
) -> Result<String, NftError> {
    check_plan(plan)?;
    let secs = timeout_secs.clamp(1, DNS_GRANT_MAX_SECS);
    let t = &plan.table;
    let mut s = String::new();
    for g in grants {
        if !plan.subnet.contains(&g.sandbox) || g.sandbox == plan.gateway {
            return Err(NftError::InvalidRule(format!(
                "DNS grant for {}, not a sandbox address of {}",
                g.sandbox, plan.subnet
            )));
        }
        if g.port == Some(0) {
            return Err(NftError::InvalidRule("DNS grant for port 0".into()));
        }
        let (set, key) = (g.set(), g.key());
        let _ = writeln!(s, "add element inet {t} {set} {{ {key} timeout {secs}s }}");
        let _ = writeln!(s, "delete element inet {t} {set} {{ {key} }}");
        let _ = writeln!(s, "add element inet {t} {set} {{ {key} timeout {secs}s }}");
    }
    Ok(s)
}

/// The commands deleting `grants`, one per element.
fn dns_revoke_commands(plan: &NetPlan, grants: &[DnsGrant]) -> Result<Vec<String>, NftError> {
    check_plan(plan)?;
    Ok(grants
        .iter()
        .map(|g| {
            format!(
                "delete element inet {} {} {{ {} }}",
                plan.table,
                g.set(),
                g.key()
            )
        })
        .collect())
}

/// The whole table, with every given sandbox's elements, as one atomic replace: `add table` (so that the
/// `delete` cannot fail), `delete table`, then the table's definition. Applied in one transaction, the old
/// table (if any) is replaced without a moment without rules.
pub fn render_table(plan: &NetPlan, sandboxes: &[SandboxRules]) -> Result<String, NftError> {
    check_plan(plan)?;
    let mut elements: Vec<Element> = Vec::new();
    let mut owners: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
    let mut published: BTreeMap<String, &str> = BTreeMap::new();
    // Each sandbox pairs with the members of its group listed before it: every pair once.
    let mut groups: BTreeMap<&str, Vec<Ipv4Addr>> = BTreeMap::new();
    for sb in sandboxes {
        if let Some(other) = owners.insert(sb.address, &sb.host_if) {
            return Err(NftError::InvalidRule(format!(
                "address {} is used by both {other} and {}",
                sb.address, sb.host_if
            )));
        }
        let earlier = match &sb.peer_group {
            Some(g) => {
                let members = groups.entry(g).or_default();
                let earlier = members.clone();
                members.push(sb.address);
                earlier
            }
            None => Vec::new(),
        };
        let es = sandbox_elements(plan, sb, &earlier)?;
        for e in es
            .iter()
            .filter(|e| e.set == PUBLISHED || e.set == PUBLISHED_ANY)
        {
            if let Some(other) = published.insert(e.key.clone(), &sb.host_if) {
                return Err(NftError::InvalidRule(format!(
                    "published port {} is used by both {other} and {}",
                    e.key, sb.host_if
                )));
            }
        }
        elements.extend(es);
    }
    let groups = by_set(&elements);
    let elems = |set: &str| -> String {
        match groups.iter().find(|(s, _)| *s == set) {
            Some((_, es)) => {
                let list: Vec<String> = es.iter().map(|e| e.full()).collect();
                format!("\t\telements = {{ {} }}\n", list.join(",\n\t\t\t     "))
            }
            None => String::new(),
        }
    };

    let NetPlan {
        table: t,
        bridge: br,
        gateway: gw,
        ..
    } = plan;
    let subnet = plan.subnet.trunc();
    let reject = "reject with icmpx admin-prohibited";
    let services: String = host_services(plan)
        .iter()
        .map(|r| format!("\t\t{r}\n"))
        .collect();
    let (vmap_elems, ingress_elems, published_elems, peer_elems) = (
        elems(EGRESS_VMAP),
        elems(INGRESS_OPEN),
        elems(PUBLISHED),
        elems(SESSION_PEERS),
    );
    let (vmap6_elems, ingress6_elems) = (elems(EGRESS_VMAP6), elems(INGRESS_OPEN6));
    let published_any_elems = elems(PUBLISHED_ANY);
    // IPv6: blocked destinations (link-local, the AWS metadata address, the subnet) and the masquerade of
    // the subnet; the sets exist (empty) without an IPv6 subnet, so that the chains are the same.
    let (blocked6, masquerade6, described6) = match &plan.v6 {
        Some(v6) => (
            format!("fe80::/10, fd00:ec2::254, {}", v6.subnet.trunc()),
            format!(
                "\t\toifname != \"{br}\" ip6 saddr {} masquerade comment \"sandbox egress, IPv6\"\n",
                v6.subnet.trunc()
            ),
            format!(" {}", v6.subnet.trunc()),
        ),
        None => (
            "fe80::/10, fd00:ec2::254".to_owned(),
            String::new(),
            String::new(),
        ),
    };
    let (mut allow_sets, mut allow_chains) = (String::new(), String::new());
    for k in 0..ALLOW_SHARDS {
        let set = format!("{EGRESS_ALLOW}_{k}");
        let set_elems = elems(&set);
        let _ = write!(
            allow_sets,
            r#"
	set {set} {{
		type ipv4_addr . ipv4_addr . inet_proto . inet_service
		flags interval
		comment "allow-lists of the sandboxes with address % {ALLOW_SHARDS} = {k}: sandbox . destination . protocol . port(s)"
{set_elems}	}}
"#
        );
        let _ = write!(
            allow_chains,
            r#"
	chain {CHAIN_ALLOWLIST}_{k} {{
		ip saddr . ip daddr . meta l4proto . th dport @{set} accept comment "allow-listed"
		ip saddr . ip daddr . meta l4proto . th dport @{EGRESS_DNS} accept comment "resolved by the DNS forwarder"
		ip saddr . ip daddr . meta l4proto @{EGRESS_DNS_ANY} accept comment "resolved by the DNS forwarder, every port"
		counter {reject} comment "not in the sandbox's allow-list"
	}}
"#
        );
    }

    Ok(format!(
        r#"add table inet {t}
delete table inet {t}
table inet {t} {{
	comment "sandboxd: {br} {subnet} gateway {gw}{described6}; generated, do not edit"

	set blocked_dst {{
		type ipv4_addr
		flags interval
		auto-merge
		comment "destinations no sandbox may reach: link-local (cloud metadata) and the sandbox subnet"
		elements = {{ 169.254.0.0/16, {subnet} }}
	}}

	set blocked_dst6 {{
		type ipv6_addr
		flags interval
		auto-merge
		comment "IPv6 destinations no sandbox may reach: link-local, metadata (fd00:ec2::254) and the sandbox subnet"
		elements = {{ {blocked6} }}
	}}

	map {EGRESS_VMAP6} {{
		type ipv6_addr : verdict
		comment "sandbox IPv6 address -> egress policy: accept (open) or jump {CHAIN_DENY} (deny, and allow-lists, which are IPv4)"
{vmap6_elems}	}}

	set {INGRESS_OPEN6} {{
		type ipv6_addr
		comment "sandbox IPv6 addresses accepting new inbound connections"
{ingress6_elems}	}}

	map {EGRESS_VMAP} {{
		type ipv4_addr : verdict
		comment "sandbox address -> egress policy: accept (open), jump {CHAIN_DENY}, jump {CHAIN_ALLOWLIST}_<address % {ALLOW_SHARDS}>"
{vmap_elems}	}}
{allow_sets}
	set {EGRESS_DNS} {{
		type ipv4_addr . ipv4_addr . inet_proto . inet_service
		flags timeout
		comment "opened by the DNS forwarder until the answer's TTL (at least 30 s): sandbox . address . protocol . port"
	}}

	set {EGRESS_DNS_ANY} {{
		type ipv4_addr . ipv4_addr . inet_proto
		flags timeout
		comment "opened by the DNS forwarder, rules without ports: sandbox . address . protocol"
	}}

	set {INGRESS_OPEN} {{
		type ipv4_addr
		comment "sandboxes accepting new inbound connections (deny_ingress = false)"
{ingress_elems}	}}

	map {PUBLISHED} {{
		type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service
		comment "published ports: host address . protocol . host port -> sandbox address . port"
{published_elems}	}}

	map {PUBLISHED_ANY} {{
		type inet_proto . inet_service : ipv4_addr . inet_service
		comment "ports published on every host address (0.0.0.0): protocol . host port -> sandbox address . port"
{published_any_elems}	}}

	set {SESSION_PEERS} {{
		type ipv4_addr . ipv4_addr
		comment "sandboxes of one session that both opted in (session_peers): source . destination, both ways"
{peer_elems}	}}

	chain raw_prerouting {{
		type filter hook prerouting priority raw; policy accept;
		iifname != "lo" ip daddr 127.0.0.0/8 counter drop comment "127.0.0.0/8 only from lo: guard for route_localnet on {br} (CVE-2020-8558)"
	}}

	chain nat_prerouting {{
		type nat hook prerouting priority dstnat; policy accept;
		fib daddr type local dnat ip to ip daddr . meta l4proto . th dport map @{PUBLISHED} comment "published ports"
		meta nfproto ipv4 fib daddr type local dnat ip to meta l4proto . th dport map @{PUBLISHED_ANY} comment "published on 0.0.0.0"
	}}

	chain nat_output {{
		type nat hook output priority -100; policy accept;
		fib daddr type local dnat ip to ip daddr . meta l4proto . th dport map @{PUBLISHED} comment "published ports, from the host itself"
		meta nfproto ipv4 fib daddr type local dnat ip to meta l4proto . th dport map @{PUBLISHED_ANY} comment "published on 0.0.0.0, from the host itself"
	}}

	chain nat_postrouting {{
		type nat hook postrouting priority srcnat; policy accept;
		oifname != "{br}" ip saddr {subnet} masquerade comment "sandbox egress"
{masquerade6}		oifname "{br}" fib saddr type local masquerade comment "the host (e.g. 127.0.0.1) to a published port"
	}}

	chain forward {{
		type filter hook forward priority filter; policy accept;
		iifname "{br}" oifname "{br}" ip saddr . ip daddr @{SESSION_PEERS} accept comment "session peers (routed by the host: the bridge ports are isolated, the bridge answers ARP for them)"
		iifname "{br}" oifname "{br}" counter {reject} comment "sandbox to sandbox"
		oifname "{br}" jump to_sandbox comment "into a sandbox"
		iifname "{br}" jump from_sandbox comment "out of a sandbox"
	}}

	chain to_sandbox {{
		ct state established,related accept
		ct status dnat accept comment "published ports"
		ip daddr @{INGRESS_OPEN} accept comment "ingress allowed"
		ip6 daddr @{INGRESS_OPEN6} accept comment "ingress allowed, IPv6"
		counter drop comment "ingress denied"
	}}

	chain from_sandbox {{
		ct state established,related accept
		ip daddr @blocked_dst counter {reject} comment "link-local or the sandbox subnet"
		ip6 daddr @blocked_dst6 counter {reject} comment "IPv6 link-local, metadata or the sandbox subnet"
		ip saddr vmap @{EGRESS_VMAP} comment "the sandbox's egress policy"
		ip6 saddr vmap @{EGRESS_VMAP6} comment "the sandbox's egress policy, IPv6"
		counter drop comment "unknown source address"
	}}

	chain {CHAIN_DENY} {{
		counter {reject} comment "egress denied"
	}}
{allow_chains}
	chain input {{
		type filter hook input priority filter; policy accept;
		iifname "{br}" jump sandbox_to_host comment "a sandbox to the host's own addresses"
	}}

	chain sandbox_to_host {{
		ct state established,related accept
		icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept comment "IPv6 neighbour discovery with the gateway"
{services}		counter {reject} comment "the host's own addresses"
	}}

	chain output {{
		type filter hook output priority filter; policy accept;
		oifname "{br}" icmp type redirect counter drop comment "a redirect would send a sandbox to its session peer directly, past the isolated ports"
		oifname "{br}" icmpv6 type nd-redirect counter drop comment "the same for IPv6"
		oifname "{br}" ct state new jump host_to_sandbox comment "new connections from the host into a sandbox"
	}}

	chain host_to_sandbox {{
		ct status dnat accept comment "published ports (e.g. 127.0.0.1:port)"
		ip daddr @{INGRESS_OPEN} accept comment "ingress allowed"
		ip6 daddr @{INGRESS_OPEN6} accept comment "ingress allowed, IPv6"
		counter drop comment "ingress denied"
	}}
}}
"#
    ))
}

/// One transaction adding a sandbox's elements.
pub fn render_add(
    plan: &NetPlan,
    sb: &SandboxRules,
    peers: &[Ipv4Addr],
) -> Result<String, NftError> {
    check_plan(plan)?;
    let elements = sandbox_elements(plan, sb, peers)?;
    let mut s = String::new();
    for (set, es) in by_set(&elements) {
        let list: Vec<String> = es.iter().map(|e| e.full()).collect();
        let _ = writeln!(
            s,
            "add element inet {} {set} {{ {} }}",
            plan.table,
            list.join(", ")
        );
    }
    Ok(s)
}

/// The delete commands of a sandbox's elements: one command per set (`per_element` false) or per element.
fn delete_commands(
    plan: &NetPlan,
    sb: &SandboxRules,
    peers: &[Ipv4Addr],
    per_element: bool,
) -> Result<Vec<String>, NftError> {
    check_plan(plan)?;
    let elements = sandbox_elements(plan, sb, peers)?;
    let mut out = Vec::new();
    for (set, es) in by_set(&elements).into_iter().rev() {
        let t = &plan.table;
        if per_element {
            out.extend(
                es.iter()
                    .map(|e| format!("delete element inet {t} {set} {{ {} }}", e.key)),
            );
        } else {
            let keys: Vec<&str> = es.iter().map(|e| e.key.as_str()).collect();
            out.push(format!(
                "delete element inet {t} {set} {{ {} }}",
                keys.join(", ")
            ));
        }
    }
    Ok(out)
}

/// One transaction removing exactly the elements [`render_add`] (or [`render_table`]) created for `sb`, in
/// reverse order, with its pairs with `peers` (the members of its group that remain). It fails as a whole if
/// any of them is missing; see [`Firewall::remove_sandbox`].
pub fn render_remove(
    plan: &NetPlan,
    sb: &SandboxRules,
    peers: &[Ipv4Addr],
) -> Result<String, NftError> {
    Ok(delete_commands(plan, sb, peers, false)?
        .into_iter()
        .map(|c| c + "\n")
        .collect())
}

// ---------------------------------------------------------------------------------------------------------
// libnftables
// ---------------------------------------------------------------------------------------------------------

/// libnftables' opaque `struct nft_ctx`.
#[repr(C)]
struct NftCtx {
    _opaque: [u8; 0],
}

type GetBuffer = unsafe extern "C" fn(*mut NftCtx) -> *const c_char;

/// The libnftables functions we call, with their prototypes from `<nftables/libnftables.h>`.
struct Api {
    ctx_new: unsafe extern "C" fn(u32) -> *mut NftCtx,
    ctx_free: unsafe extern "C" fn(*mut NftCtx),
    buffer_output: unsafe extern "C" fn(*mut NftCtx) -> c_int,
    buffer_error: unsafe extern "C" fn(*mut NftCtx) -> c_int,
    get_output_buffer: GetBuffer,
    get_error_buffer: GetBuffer,
    run_cmd_from_buffer: unsafe extern "C" fn(*mut NftCtx, *const c_char) -> c_int,
    /// Keeps the function pointers above valid. Never unloaded: `API` lives for the whole process (libnftables
    /// points libgmp's allocator at its own functions, so unloading it is not safe anyway).
    _lib: Library,
}

/// The loaded library, shared by every [`Firewall`] (a failed load is retried by the next `open`).
static API: OnceLock<Api> = OnceLock::new();

/// Serialises every call into libnftables, across contexts: `nft_ctx_new` has an unsynchronised one-time
/// initialisation and the interface cache that every command run and `nft_ctx_free` release is global.
static LIBNFTABLES: Mutex<()> = Mutex::new(());

/// Looks a function up in the library; its type is the type of the field the result is assigned to.
macro_rules! symbol {
    ($lib:expr, $name:literal) => {{
        // SAFETY: every use assigns the result to an `Api` field whose type is the C prototype of `$name` in
        // <nftables/libnftables.h>; the pointer stays valid as long as the library, kept in the same `Api`.
        let sym = unsafe { $lib.get(concat!($name, "\0").as_bytes()) }
            .map_err(|e| NftError::Unavailable(format!("{}: {e}", $name)))?;
        *sym
    }};
}

impl Api {
    fn get() -> Result<&'static Api, NftError> {
        if let Some(api) = API.get() {
            return Ok(api);
        }
        let api = Api::load()?;
        // If another thread won the race, ours is dropped: that only decrements the library's refcount.
        Ok(API.get_or_init(|| api))
    }

    fn load() -> Result<Api, NftError> {
        // SAFETY: loading runs the initialisers of libnftables and its dependencies (libmnl, libnftnl, libgmp,
        // libjansson, libxtables), which have no preconditions on the loading program.
        let lib = unsafe { Library::new(LIBRARY) }.map_err(|e| {
            NftError::Unavailable(format!(
                "loading {LIBRARY}: {e}; install Debian's `nftables` package"
            ))
        })?;
        Ok(Api {
            ctx_new: symbol!(lib, "nft_ctx_new"),
            ctx_free: symbol!(lib, "nft_ctx_free"),
            buffer_output: symbol!(lib, "nft_ctx_buffer_output"),
            buffer_error: symbol!(lib, "nft_ctx_buffer_error"),
            get_output_buffer: symbol!(lib, "nft_ctx_get_output_buffer"),
            get_error_buffer: symbol!(lib, "nft_ctx_get_error_buffer"),
            run_cmd_from_buffer: symbol!(lib, "nft_run_cmd_from_buffer"),
            _lib: lib,
        })
    }
}

/// A live `nft_ctx`, created by [`Firewall::open`] and freed by `Firewall`'s `Drop`.
struct CtxPtr(NonNull<NftCtx>);

// SAFETY: an nft_ctx is plain heap state with a netlink socket, not tied to the thread that created it; it is
// only used under `Firewall::ctx`'s mutex (and the global `LIBNFTABLES` lock), never concurrently.
unsafe impl Send for CtxPtr {}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the context half-updated (libnftables calls do not
    // unwind), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// nftables through libnftables: one context (its own netlink socket, in the network namespace of the thread
/// that opened it), used by one thread at a time.
pub struct Firewall {
    api: &'static Api,
    ctx: Mutex<CtxPtr>,
}

impl fmt::Debug for Firewall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Firewall").finish_non_exhaustive()
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        let ctx = self.ctx.get_mut().unwrap_or_else(PoisonError::into_inner);
        let _global = lock(&LIBNFTABLES);
        // SAFETY: the context is live (created in `open`, freed only here, and `&mut self` rules out any other
        // use); the global lock serialises this with every other libnftables call.
        unsafe { (self.api.ctx_free)(ctx.0.as_ptr()) };
    }
}

impl Firewall {
    /// Loads libnftables (once per process) and creates a context with buffered output and errors.
    pub fn open() -> Result<Self, NftError> {
        let api = Api::get()?;
        // libnftables exit()s the whole process if it cannot open its netlink socket: try one first.
        nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Netlink,
            nix::sys::socket::SockType::Raw,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            nix::sys::socket::SockProtocol::NetlinkNetFilter,
        )
        .map_err(|e| NftError::Unavailable(format!("netfilter netlink socket: {e}")))?;

        let _global = lock(&LIBNFTABLES);
        // SAFETY: nft_ctx_new(NFT_CTX_DEFAULT) has no preconditions; its one-time global initialisation is
        // serialised by the global lock.
        let raw = unsafe { (api.ctx_new)(0) };
        let ptr =
            NonNull::new(raw).ok_or_else(|| NftError::Unavailable("nft_ctx_new failed".into()))?;
        // SAFETY: `ptr` is the live context just created, not shared yet.
        let out = unsafe { (api.buffer_output)(ptr.as_ptr()) };
        // SAFETY: as above.
        let err = unsafe { (api.buffer_error)(ptr.as_ptr()) };
        if out != 0 || err != 0 {
            // SAFETY: as above; the context is not used after this.
            unsafe { (api.ctx_free)(ptr.as_ptr()) };
            return Err(NftError::Unavailable(
                "libnftables could not buffer its output".into(),
            ));
        }
        Ok(Firewall {
            api,
            ctx: Mutex::new(CtxPtr(ptr)),
        })
    }

    /// Copies out and rewinds one of the context's buffers.
    fn take_buffer(&self, ctx: &CtxPtr, get: GetBuffer) -> String {
        // SAFETY: the context is live and buffered (see `open`); the caller holds both locks.
        let p = unsafe { get(ctx.0.as_ptr()) };
        if p.is_null() {
            return String::new();
        }
        // SAFETY: libnftables returns a NUL-terminated string owned by the context, valid until the next call
        // on it; it is copied right away, under the locks.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// Runs nft commands (nft's language, one transaction) and returns what they print (e.g. `list` output).
    pub fn run(&self, cmds: &str) -> Result<String, NftError> {
        let c = CString::new(cmds)
            .map_err(|_| NftError::InvalidRule("NUL byte in nft commands".into()))?;
        tracing::trace!(%cmds, "nft");
        let ctx = lock(&self.ctx);
        let _global = lock(&LIBNFTABLES);
        // SAFETY: the context is live (freed only in `Drop`) and used only under these locks; `c` is
        // NUL-terminated and outlives the call.
        let rc = unsafe { (self.api.run_cmd_from_buffer)(ctx.0.as_ptr(), c.as_ptr()) };
        let out = self.take_buffer(&ctx, self.api.get_output_buffer);
        let err = self.take_buffer(&ctx, self.api.get_error_buffer);
        if rc != 0 {
            let err = err.trim_end();
            return Err(NftError::Command(if err.is_empty() {
                format!("failed ({rc}) without a message")
            } else {
                err.to_owned()
            }));
        }
        if !err.trim().is_empty() {
            tracing::debug!(message = %err.trim_end(), "nft warning");
        }
        Ok(out)
    }

    /// Replaces the whole table atomically with one holding `sandboxes` (creates it if absent).
    pub fn install(&self, plan: &NetPlan, sandboxes: &[SandboxRules]) -> Result<(), NftError> {
        let cmds = render_table(plan, sandboxes)?;
        let t0 = Instant::now();
        self.run(&cmds)?;
        tracing::debug!(table = %plan.table, sandboxes = sandboxes.len(), elapsed = ?t0.elapsed(), "nft table installed");
        Ok(())
    }

    /// Adds a sandbox's elements in one transaction (all or nothing). Fails if one of them exists with
    /// another value (same address or published port still in use). `peers`: the other current members of
    /// its peer group.
    pub fn add_sandbox(
        &self,
        plan: &NetPlan,
        sb: &SandboxRules,
        peers: &[Ipv4Addr],
    ) -> Result<(), NftError> {
        let cmds = render_add(plan, sb, peers)?;
        let t0 = Instant::now();
        self.run(&cmds)?;
        tracing::debug!(address = %sb.address, elapsed = ?t0.elapsed(), "nft sandbox added");
        Ok(())
    }

    /// Removes a sandbox's elements. One transaction when they are all present (the normal case); otherwise
    /// (e.g. the table was reinstalled without them, or a previous removal went through) each element is
    /// deleted on its own and those already missing are ignored. A missing table counts as nothing to remove.
    /// `peers`: the members of its peer group that remain.
    pub fn remove_sandbox(
        &self,
        plan: &NetPlan,
        sb: &SandboxRules,
        peers: &[Ipv4Addr],
    ) -> Result<(), NftError> {
        let cmds = render_remove(plan, sb, peers)?;
        let t0 = Instant::now();
        let first = match self.run(&cmds) {
            Ok(_) => {
                tracing::debug!(address = %sb.address, elapsed = ?t0.elapsed(), "nft sandbox removed");
                return Ok(());
            }
            Err(e) => e,
        };
        tracing::debug!(address = %sb.address, error = %first, "nft: removing element by element");
        for cmd in delete_commands(plan, sb, peers, true)? {
            match self.run(&cmd) {
                Ok(_) => {}
                Err(NftError::Command(msg)) if is_missing(&msg) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Opens `grants` (see [`render_dns_grants`]) in one transaction.
    pub fn add_dns_grants(
        &self,
        plan: &NetPlan,
        grants: &[DnsGrant],
        timeout_secs: u32,
    ) -> Result<(), NftError> {
        if grants.is_empty() {
            return Ok(());
        }
        let cmds = render_dns_grants(plan, grants, timeout_secs)?;
        let t0 = Instant::now();
        self.run(&cmds)?;
        tracing::debug!(grants = grants.len(), timeout_secs, elapsed = ?t0.elapsed(), "nft DNS grants added");
        Ok(())
    }

    /// Deletes `grants` (a sandbox that ended before they expired): one transaction, or element by element
    /// ignoring those already gone (expired meanwhile) if that fails.
    pub fn remove_dns_grants(&self, plan: &NetPlan, grants: &[DnsGrant]) -> Result<(), NftError> {
        if grants.is_empty() {
            return Ok(());
        }
        let cmds = dns_revoke_commands(plan, grants)?;
        if self.run(&(cmds.join("\n") + "\n")).is_ok() {
            return Ok(());
        }
        for cmd in cmds {
            match self.run(&cmd) {
                Ok(_) => {}
                Err(NftError::Command(msg)) if is_missing(&msg) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Deletes a table; succeeds if it does not exist.
    pub fn remove_table(&self, table: &str) -> Result<(), NftError> {
        check_table_name(table)?;
        self.run(&format!(
            "add table inet {table}\ndelete table inet {table}\n"
        ))
        .map(drop)
    }

    /// Whether `inet <table>` exists.
    pub fn table_exists(&self, table: &str) -> Result<bool, NftError> {
        check_table_name(table)?;
        let out = self.run("list tables inet")?;
        Ok(out
            .lines()
            .any(|l| l.trim().strip_prefix("table inet ") == Some(table)))
    }
}

/// Whether nft's error says the object was not there (ENOENT). libnftables formats `strerror`, which is
/// English here: nothing in the daemon calls `setlocale`.
fn is_missing(msg: &str) -> bool {
    msg.contains("No such file or directory")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> NetPlan {
        NetPlan {
            table: "sbxt_unit".into(),
            bridge: "sbxt0".into(),
            subnet: "10.213.0.0/24".parse().unwrap(),
            gateway: "10.213.0.1".parse().unwrap(),
            v6: None,
        }
    }

    fn sandbox(addr: &str, egress: Egress) -> SandboxRules {
        SandboxRules {
            address: addr.parse().unwrap(),
            host_if: "sbxt-a".into(),
            egress,
            ingress_open: false,
            published: vec![],
            peer_group: None,
            address6: None,
        }
    }

    fn rule(net: &str, proto: Proto, ports: Option<(u16, u16)>) -> AllowRule {
        AllowRule {
            net: net.parse().unwrap(),
            proto,
            ports,
        }
    }

    #[test]
    fn firewall_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Firewall>();
    }

    #[test]
    fn proto_names() {
        assert_eq!(Proto::Tcp.to_string(), "tcp");
        assert_eq!(Proto::Udp.to_string(), "udp");
        assert_eq!("udp".parse::<Proto>(), Ok(Proto::Udp));
        assert!("icmp".parse::<Proto>().is_err());
        assert_eq!(serde_json::to_string(&Proto::Tcp).unwrap(), "\"tcp\"");
    }

    #[test]
    fn names_are_validated() {
        assert!(check_table_name("sandboxd").is_ok());
        assert!(check_table_name("sbxt_live-1.a").is_ok());
        for bad in [
            "",
            "9abc",
            "_x",
            "a b",
            "a\"b",
            "a;b",
            "a{",
            "a/b",
            &"x".repeat(65),
        ] {
            assert!(
                matches!(check_table_name(bad), Err(NftError::InvalidName { .. })),
                "{bad:?}"
            );
        }
        assert!(check_interface_name("sandboxd0").is_ok());
        assert!(check_interface_name("sbxs-0123456789").is_ok()); // 15 bytes
        for bad in ["", "sbxs-01234567890", "eth*", "a\"", "a b", "é"] {
            assert!(
                matches!(check_interface_name(bad), Err(NftError::InvalidName { .. })),
                "{bad:?}"
            );
        }

        let mut p = plan();
        p.bridge = "br\" accept".into();
        assert!(matches!(
            render_table(&p, &[]),
            Err(NftError::InvalidName {
                what: "interface",
                ..
            })
        ));
        let mut p = plan();
        p.table = "t; flush ruleset".into();
        assert!(matches!(
            render_add(&p, &sandbox("10.213.0.2", Egress::Open), &[]),
            Err(NftError::InvalidName { what: "table", .. })
        ));
        let mut sb = sandbox("10.213.0.2", Egress::Open);
        sb.host_if = "sbxs-a\" : drop".into();
        assert!(matches!(
            render_add(&plan(), &sb, &[]),
            Err(NftError::InvalidName { .. })
        ));
        assert!(matches!(
            render_remove(&plan(), &sb, &[]),
            Err(NftError::InvalidName { .. })
        ));
    }

    #[test]
    fn open_sandbox() {
        let add = render_add(&plan(), &sandbox("10.213.0.2", Egress::Open), &[]).unwrap();
        assert_eq!(
            add,
            "add element inet sbxt_unit egress_vmap { 10.213.0.2 comment \"sbxt-a\" : accept }\n"
        );
        let rm = render_remove(&plan(), &sandbox("10.213.0.2", Egress::Open), &[]).unwrap();
        assert_eq!(
            rm,
            "delete element inet sbxt_unit egress_vmap { 10.213.0.2 }\n"
        );
    }

    #[test]
    fn deny_sandbox() {
        let add = render_add(&plan(), &sandbox("10.213.0.2", Egress::Deny), &[]).unwrap();
        assert!(add.contains("{ 10.213.0.2 comment \"sbxt-a\" : jump egress_deny }"));
    }

    #[test]
    fn allow_rules_with_and_without_ports() {
        let sb = sandbox(
            "10.213.0.3",
            Egress::Allow(vec![
                rule("198.18.1.0/24", Proto::Tcp, Some((80, 80))),
                rule("198.18.1.0/24", Proto::Tcp, Some((443, 443))),
                rule("198.18.2.7/32", Proto::Udp, None),
                rule("198.18.9.0/24", Proto::Tcp, Some((8000, 8100))),
            ]),
        );
        let add = render_add(&plan(), &sb, &[]).unwrap();
        assert_eq!(
            add,
            "add element inet sbxt_unit egress_allow_3 { \
             10.213.0.3 . 198.18.1.0/24 . tcp . 80, \
             10.213.0.3 . 198.18.1.0/24 . tcp . 443, \
             10.213.0.3 . 198.18.9.0/24 . tcp . 8000-8100, \
             10.213.0.3 . 198.18.2.7 . udp . 0-65535 }\n\
             add element inet sbxt_unit egress_vmap { 10.213.0.3 comment \"sbxt-a\" : jump egress_allowlist_3 }\n"
        );
        // An empty allow-list lets nothing out but is still the allow-list chain.
        let add = render_add(&plan(), &sandbox("10.213.0.3", Egress::Allow(vec![])), &[]).unwrap();
        assert_eq!(
            add,
            "add element inet sbxt_unit egress_vmap { 10.213.0.3 comment \"sbxt-a\" : jump egress_allowlist_3 }\n"
        );
        // Host bits are dropped; an empty port range is refused.
        let add = render_add(
            &plan(),
            &sandbox(
                "10.213.0.3",
                Egress::Allow(vec![rule("198.18.1.9/24", Proto::Tcp, None)]),
            ),
            &[],
        )
        .unwrap();
        assert!(add.contains("10.213.0.3 . 198.18.1.0/24 . tcp . 0-65535"));
        assert!(matches!(
            render_add(
                &plan(),
                &sandbox(
                    "10.213.0.3",
                    Egress::Allow(vec![rule("198.18.1.0/24", Proto::Tcp, Some((90, 80)))])
                ),
                &[]
            ),
            Err(NftError::InvalidRule(_))
        ));
    }

    #[test]
    fn overlapping_allow_rules_become_disjoint() {
        // A /16 on 443 plus a /24 inside it on every port, plus a duplicate and an adjacent port range.
        let rules = vec![
            rule("198.18.0.0/16", Proto::Tcp, Some((443, 443))),
            rule("198.18.1.0/24", Proto::Tcp, None),
            rule("198.18.0.0/16", Proto::Tcp, Some((443, 443))),
            rule("198.18.0.0/16", Proto::Tcp, Some((444, 450))),
            rule("0.0.0.0/0", Proto::Udp, Some((53, 53))),
        ];
        let boxes = allow_boxes(&rules).unwrap();
        let shown: Vec<String> = boxes
            .iter()
            .map(|&(p, (lo, hi), ports)| {
                format!("{} {p} {}", addr_range(lo, hi), port_range(ports))
            })
            .collect();
        assert_eq!(
            shown,
            [
                "198.18.0.0/24 tcp 443-450",
                "198.18.1.0/24 tcp 0-65535",
                "198.18.2.0-198.18.255.255 tcp 443-450",
                "0.0.0.0/0 udp 53",
            ]
        );
        // Disjoint per protocol, and every original (address, port) pair is still covered.
        for (i, a) in boxes.iter().enumerate() {
            for b in &boxes[i + 1..] {
                let addr = a.1 .0 <= b.1 .1 && b.1 .0 <= a.1 .1;
                let port = a.2 .0 <= b.2 .1 && b.2 .0 <= a.2 .1;
                assert!(a.0 != b.0 || !(addr && port), "{a:?} overlaps {b:?}");
            }
        }
        for r in &rules {
            let net = r.net.trunc();
            let (lo, hi) = r.ports.unwrap_or((0, u16::MAX));
            for addr in [net.network(), net.broadcast()] {
                for port in [lo, hi] {
                    let a = u32::from(addr);
                    assert!(boxes.iter().any(|&(p, (alo, ahi), (plo, phi))| p == r.proto
                        && alo <= a
                        && a <= ahi
                        && plo <= port
                        && port <= phi));
                }
            }
        }
    }

    #[test]
    fn rules_that_only_share_addresses_are_kept_as_they_are() {
        let rules = vec![
            rule("0.0.0.0/0", Proto::Udp, Some((123, 123))),
            rule("198.18.9.9/32", Proto::Udp, Some((53, 53))),
            rule("198.18.0.0/16", Proto::Tcp, Some((80, 80))),
            rule("198.18.0.0/16", Proto::Tcp, Some((81, 90))), // adjacent ports: joined
        ];
        let boxes = allow_boxes(&rules).unwrap();
        assert_eq!(
            boxes,
            [
                (Proto::Tcp, (0xc612_0000, 0xc612_ffff), (80, 90)),
                (Proto::Udp, (0, u32::MAX), (123, 123)),
                (Proto::Udp, (0xc612_0909, 0xc612_0909), (53, 53)),
            ]
        );
    }

    #[test]
    fn address_ranges() {
        assert_eq!(addr_range(0, u32::MAX), "0.0.0.0/0");
        assert_eq!(addr_range(0x0a00_0001, 0x0a00_0001), "10.0.0.1");
        assert_eq!(addr_range(0x0a00_0000, 0x0a00_00ff), "10.0.0.0/24");
        assert_eq!(addr_range(0x0a00_0001, 0x0a00_0002), "10.0.0.1-10.0.0.2");
        assert_eq!(
            merge_ports(vec![(5, 9), (1, 3), (4, 4), (20, 30), (25, 26)]),
            [(1, 9), (20, 30)]
        );
        assert_eq!(merge_ports(vec![(0, u16::MAX), (7, 7)]), [(0, u16::MAX)]);
    }

    fn full_sandbox() -> SandboxRules {
        SandboxRules {
            address: "10.213.0.4".parse().unwrap(),
            host_if: "sbxt-c".into(),
            egress: Egress::Allow(vec![
                rule("198.18.1.0/24", Proto::Tcp, Some((80, 81))),
                rule("198.18.1.0/24", Proto::Udp, Some((53, 53))),
            ]),
            ingress_open: true,
            published: vec![
                Published {
                    host_ip: Ipv4Addr::LOCALHOST,
                    host_port: 18080,
                    proto: Proto::Tcp,
                    port: 8000,
                },
                Published {
                    host_ip: Ipv4Addr::LOCALHOST,
                    host_port: 18080,
                    proto: Proto::Udp,
                    port: 8000,
                },
            ],
            peer_group: None,
            address6: None,
        }
    }

    #[test]
    fn session_peers_are_pairs_both_ways_and_the_table_pairs_each_group_once() {
        let member = |addr: &str, group: &str| SandboxRules {
            peer_group: Some(group.into()),
            ..sandbox(addr, Egress::Open)
        };
        let a: Ipv4Addr = "10.213.0.2".parse().unwrap();
        let add = render_add(&plan(), &member("10.213.0.3", "s"), &[a]).unwrap();
        assert!(
            add.contains("add element inet sbxt_unit session_peers { 10.213.0.3 . 10.213.0.2 comment \"sbxt-a\", 10.213.0.2 . 10.213.0.3 comment \"sbxt-a\" }"),
            "{add}"
        );
        let rm = render_remove(&plan(), &member("10.213.0.3", "s"), &[a]).unwrap();
        assert!(
            rm.starts_with(
                "delete element inet sbxt_unit session_peers { 10.213.0.3 . 10.213.0.2, 10.213.0.2 . 10.213.0.3 }"
            ),
            "{rm}"
        );
        // Peers without a group, the sandbox itself, a peer twice or outside the subnet: refused.
        assert!(render_add(&plan(), &sandbox("10.213.0.3", Egress::Open), &[a]).is_err());
        let me = member("10.213.0.3", "s");
        for bad in [
            vec![me.address],
            vec![a, a],
            vec!["10.214.0.2".parse().unwrap()],
            vec![plan().gateway],
        ] {
            assert!(render_add(&plan(), &me, &bad).is_err(), "{bad:?}");
        }
        let table = render_table(
            &plan(),
            &[
                member("10.213.0.2", "s"),
                member("10.213.0.3", "t"),
                member("10.213.0.4", "s"),
                member("10.213.0.5", "s"),
                sandbox("10.213.0.6", Egress::Open),
            ],
        )
        .unwrap();
        let set = table
            .split("set session_peers {")
            .nth(1)
            .and_then(|s| s.split('}').next())
            .unwrap();
        // Group s: 3 members, 6 ordered pairs; group t alone: none.
        assert_eq!(set.matches(" comment \"sbxt-a\"").count(), 6, "{set}");
        for (x, y) in [(2, 4), (4, 2), (2, 5), (5, 2), (4, 5), (5, 4)] {
            assert!(
                set.contains(&format!("10.213.0.{x} . 10.213.0.{y} ")),
                "{set}"
            );
        }
        assert!(
            !set.contains("10.213.0.3") && !set.contains("10.213.0.6"),
            "{set}"
        );
    }

    #[test]
    fn ipv6_addresses_get_a_verdict_and_ingress_and_the_subnet_is_masqueraded() {
        let mut p = plan();
        p.v6 = Some(Plan6 {
            subnet: "fd5b:d0c0:1::/64".parse().unwrap(),
            gateway: "fd5b:d0c0:1::1".parse().unwrap(),
        });
        let with6 = |addr: &str, a6: &str, egress: Egress, ingress_open: bool| SandboxRules {
            address6: Some(a6.parse().unwrap()),
            ingress_open,
            ..sandbox(addr, egress)
        };
        let open = with6("10.213.0.2", "fd5b:d0c0:1::2", Egress::Open, true);
        let add = render_add(&p, &open, &[]).unwrap();
        assert!(
            add.contains("add element inet sbxt_unit egress_vmap6 { fd5b:d0c0:1::2 comment \"sbxt-a\" : accept }"),
            "{add}"
        );
        assert!(
            add.contains(
                "add element inet sbxt_unit ingress_open6 { fd5b:d0c0:1::2 comment \"sbxt-a\" }"
            ),
            "{add}"
        );
        // Deny and allow-lists (IPv4 only) reach no IPv6 destination.
        for egress in [Egress::Deny, Egress::Allow(vec![])] {
            let add = render_add(
                &p,
                &with6("10.213.0.3", "fd5b:d0c0:1::3", egress, false),
                &[],
            )
            .unwrap();
            assert!(
                add.contains("fd5b:d0c0:1::3 comment \"sbxt-a\" : jump egress_deny"),
                "{add}"
            );
            assert!(!add.contains("ingress_open6"), "{add}");
        }
        // Outside the subnet, the gateway, or without an IPv6 plan: refused.
        for bad in ["fd5b:d0c0:2::2", "fd5b:d0c0:1::1"] {
            assert!(render_add(&p, &with6("10.213.0.2", bad, Egress::Open, false), &[]).is_err());
        }
        assert!(render_add(&plan(), &open, &[]).is_err());
        let t = render_table(&p, std::slice::from_ref(&open)).unwrap();
        for needle in [
            "elements = { fe80::/10, fd00:ec2::254, fd5b:d0c0:1::/64 }",
            "oifname != \"sbxt0\" ip6 saddr fd5b:d0c0:1::/64 masquerade",
            "ip6 saddr vmap @egress_vmap6",
            "ip6 daddr @blocked_dst6 counter reject",
            "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept",
            "comment \"sandboxd: sbxt0 10.213.0.0/24 gateway 10.213.0.1 fd5b:d0c0:1::/64; generated",
        ] {
            assert!(t.contains(needle), "missing {needle:?} in\n{t}");
        }
        assert!(!render_table(&plan(), &[]).unwrap().contains("ip6 saddr fd"));
    }

    #[test]
    fn remove_is_the_inverse_of_add() {
        let sb = full_sandbox();
        let add = render_add(&plan(), &sb, &[]).unwrap();
        let rm = render_remove(&plan(), &sb, &[]).unwrap();
        // Same sets, reverse order, same keys without comments and values.
        let adds: Vec<&str> = add.lines().collect();
        let rms: Vec<&str> = rm.lines().rev().collect();
        assert_eq!(adds.len(), 4);
        assert_eq!(adds.len(), rms.len());
        for (a, r) in adds.iter().zip(&rms) {
            let a = a.strip_prefix("add element ").unwrap();
            let r = r.strip_prefix("delete element ").unwrap();
            let (a_head, a_elems) = a.split_once(" { ").unwrap();
            let (r_head, r_elems) = r.split_once(" { ").unwrap();
            assert_eq!(a_head, r_head);
            let a_keys: Vec<String> = a_elems
                .trim_end_matches(" }")
                .split(", ")
                .map(|e| {
                    e.split(" comment ")
                        .next()
                        .unwrap()
                        .split(" : ")
                        .next()
                        .unwrap()
                        .to_owned()
                })
                .collect();
            let r_keys: Vec<&str> = r_elems.trim_end_matches(" }").split(", ").collect();
            assert_eq!(a_keys, r_keys);
        }
        assert!(rm.starts_with(
            "delete element inet sbxt_unit published { 127.0.0.1 . tcp . 18080, 127.0.0.1 . udp . 18080 }\n\
             delete element inet sbxt_unit ingress_open { 10.213.0.4 }\n\
             delete element inet sbxt_unit egress_vmap { 10.213.0.4 }\n"
        ));
        // Element by element (the fallback of remove_sandbox): the same keys, one per command.
        let each = delete_commands(&plan(), &sb, &[], true).unwrap();
        assert_eq!(each.len(), 6);
        assert!(each
            .iter()
            .all(|c| c.matches(" . ").count() <= 3 && !c.contains(", ")));
    }

    #[test]
    fn published_and_ingress_elements() {
        let add = render_add(&plan(), &full_sandbox(), &[]).unwrap();
        assert!(add.contains(
            "add element inet sbxt_unit ingress_open { 10.213.0.4 comment \"sbxt-c\" }\n"
        ));
        assert!(add.contains(
            "add element inet sbxt_unit published { 127.0.0.1 . tcp . 18080 comment \"sbxt-c\" : 10.213.0.4 . 8000, \
             127.0.0.1 . udp . 18080 comment \"sbxt-c\" : 10.213.0.4 . 8000 }\n"
        ));
    }

    #[test]
    fn invalid_sandboxes_are_refused() {
        let p = plan();
        for addr in ["10.213.1.2", "10.213.0.1"] {
            assert!(matches!(
                render_add(&p, &sandbox(addr, Egress::Open), &[]),
                Err(NftError::InvalidRule(_))
            ));
        }
        let publish = |host_ip: Ipv4Addr, host_port, port| {
            let mut sb = sandbox("10.213.0.2", Egress::Open);
            sb.published.push(Published {
                host_ip,
                host_port,
                proto: Proto::Tcp,
                port,
            });
            sb
        };
        let any = render_add(&p, &publish(Ipv4Addr::UNSPECIFIED, 80, 81), &[]).unwrap();
        assert!(
            any.contains("add element inet sbxt_unit published_any { tcp . 80 comment \"sbxt-a\" : 10.213.0.2 . 81 }"),
            "{any}"
        );
        assert!(render_add(&p, &publish(Ipv4Addr::LOCALHOST, 0, 80), &[]).is_err());
        assert!(render_add(&p, &publish(Ipv4Addr::LOCALHOST, 80, 0), &[]).is_err());
        let mut twice = publish(Ipv4Addr::LOCALHOST, 80, 80);
        twice.published.push(twice.published[0]);
        assert!(render_add(&p, &twice, &[]).is_err());
        let mut other = p.clone();
        other.gateway = "10.9.9.9".parse().unwrap();
        assert!(render_table(&other, &[]).is_err());
    }

    #[test]
    fn dns_grants_refresh_their_timeout_and_the_chains_look_them_up() {
        let g = |dest: &str, proto, port| DnsGrant {
            sandbox: "10.213.0.5".parse().unwrap(),
            dest: dest.parse().unwrap(),
            proto,
            port,
        };
        let add = render_dns_grants(
            &plan(),
            &[
                g("198.18.1.10", Proto::Tcp, Some(443)),
                g("198.18.1.10", Proto::Udp, None),
            ],
            90,
        )
        .unwrap();
        assert_eq!(
            add,
            "add element inet sbxt_unit egress_dns { 10.213.0.5 . 198.18.1.10 . tcp . 443 timeout 90s }\n\
             delete element inet sbxt_unit egress_dns { 10.213.0.5 . 198.18.1.10 . tcp . 443 }\n\
             add element inet sbxt_unit egress_dns { 10.213.0.5 . 198.18.1.10 . tcp . 443 timeout 90s }\n\
             add element inet sbxt_unit egress_dns_any { 10.213.0.5 . 198.18.1.10 . udp timeout 90s }\n\
             delete element inet sbxt_unit egress_dns_any { 10.213.0.5 . 198.18.1.10 . udp }\n\
             add element inet sbxt_unit egress_dns_any { 10.213.0.5 . 198.18.1.10 . udp timeout 90s }\n"
        );
        // The timeout is capped; grants for non-sandbox sources or port 0 are refused.
        let capped = render_dns_grants(&plan(), &[g("1.2.3.4", Proto::Tcp, None)], 86400).unwrap();
        assert!(capped.contains("timeout 3600s"), "{capped}");
        let mut bad = g("1.2.3.4", Proto::Tcp, None);
        bad.sandbox = "10.213.0.1".parse().unwrap();
        assert!(render_dns_grants(&plan(), &[bad], 30).is_err());
        assert!(render_dns_grants(&plan(), &[g("1.2.3.4", Proto::Tcp, Some(0))], 30).is_err());
        let rm = dns_revoke_commands(&plan(), &[g("1.2.3.4", Proto::Tcp, None)]).unwrap();
        assert_eq!(
            rm,
            ["delete element inet sbxt_unit egress_dns_any { 10.213.0.5 . 1.2.3.4 . tcp }"]
        );

        let t = render_table(&plan(), &[]).unwrap();
        for needle in [
            "set egress_dns {\n\t\ttype ipv4_addr . ipv4_addr . inet_proto . inet_service\n\t\tflags timeout\n",
            "set egress_dns_any {\n\t\ttype ipv4_addr . ipv4_addr . inet_proto\n\t\tflags timeout\n",
            "chain egress_allowlist_7 {\n\t\tip saddr . ip daddr . meta l4proto . th dport @egress_allow_7 accept comment \"allow-listed\"\n\
             \t\tip saddr . ip daddr . meta l4proto . th dport @egress_dns accept comment \"resolved by the DNS forwarder\"\n\
             \t\tip saddr . ip daddr . meta l4proto @egress_dns_any accept comment \"resolved by the DNS forwarder, every port\"\n\
             \t\tcounter reject",
            "\t\tip daddr 10.213.0.1 meta l4proto { tcp, udp } th dport 53 accept",
        ] {
            assert!(t.contains(needle), "missing {needle:?} in\n{t}");
        }
    }

    #[test]
    fn table_rendering() {
        let p = plan();
        let mut a = sandbox("10.213.0.2", Egress::Open);
        a.published.push(Published {
            host_ip: Ipv4Addr::LOCALHOST,
            host_port: 18080,
            proto: Proto::Tcp,
            port: 8000,
        });
        let mut b = sandbox(
            "10.213.0.3",
            Egress::Allow(vec![rule("198.18.1.0/24", Proto::Tcp, Some((443, 443)))]),
        );
        b.host_if = "sbxt-b".into();
        let t = render_table(&p, &[a.clone(), b.clone()]).unwrap();
        assert!(t.starts_with(
            "add table inet sbxt_unit\ndelete table inet sbxt_unit\ntable inet sbxt_unit {\n"
        ));
        for needle in [
            "elements = { 169.254.0.0/16, 10.213.0.0/24 }",
            "elements = { 10.213.0.2 comment \"sbxt-a\" : accept,\n\t\t\t     10.213.0.3 comment \"sbxt-b\" : jump egress_allowlist_3 }",
            "set egress_allow_3 {\n\t\ttype ipv4_addr . ipv4_addr . inet_proto . inet_service\n\t\tflags interval\n\t\tcomment \"allow-lists of the sandboxes with address % 16 = 3: sandbox . destination . protocol . port(s)\"\n\t\telements = { 10.213.0.3 . 198.18.1.0/24 . tcp . 443 }\n\t}",
            "set egress_allow_15 {",
            "chain egress_allowlist_15 {\n\t\tip saddr . ip daddr . meta l4proto . th dport @egress_allow_15 accept",
            "elements = { 127.0.0.1 . tcp . 18080 comment \"sbxt-a\" : 10.213.0.2 . 8000 }",
            "oifname != \"sbxt0\" ip saddr 10.213.0.0/24 masquerade",
            "type nat hook output priority -100;",
            "iifname != \"lo\" ip daddr 127.0.0.0/8 counter drop",
        ] {
            assert!(t.contains(needle), "missing {needle:?} in\n{t}");
        }
        // No sandboxes: no (invalid) empty `elements = { }` (the blocked sets always have some).
        let empty = render_table(&p, &[]).unwrap();
        assert_eq!(empty.matches("elements =").count(), 2);
        // The same address or published port twice is refused.
        let mut dup = b.clone();
        dup.address = a.address;
        assert!(render_table(&p, &[a.clone(), dup]).is_err());
        let mut dup = b;
        dup.published = a.published.clone();
        assert!(render_table(&p, &[a, dup]).is_err());
    }
}
