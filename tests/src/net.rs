//! Networking fixtures of the end-to-end tests: each test daemon's own network configuration (bridge,
//! subnet, nftables table, host-veth prefix), the leak checks of its network, and [`OutsideWorld`]: a
//! network namespace reached through the host's routing that stands in for the internet (HTTP servers, a
//! UDP echo and a DNS responder on addresses of a test subnet). All traffic stays on this machine.
//!
//! Names and addresses used here: links and namespaces named `sbxt*` / `sbt*`, addresses in
//! 10.213.0.0/16 (sandbox subnets) and 198.18.0.0/15 (outside worlds). Nothing else of the host is touched,
//! except one policy-routing rule that only matches packets from a test daemon's own sandbox subnet
//! ([`OutsideWorld::route_metadata_from`]).

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::{AsFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use sandbox_proto::client::BlockingClient;
use sandbox_proto::{ExecRequest, SandboxInfo};

use crate::Daemon;

/// The name the outside world's DNS responder answers with [`OutsideWorld::a`].
pub const ALLOWED_NAME: &str = "allowed.test";
/// The name the outside world's DNS responder answers with [`OutsideWorld::b`].
pub const DENIED_NAME: &str = "denied.test";

/// How long a request that is expected to succeed may take before the test gives up on it. Not a
/// threshold: only a safety bound so that a broken network fails the test instead of hanging it.
pub const SUCCESS_BOUND_SECS: u32 = 60;
/// How long a connection that is expected to be blocked is given. A blocked packet that is dropped (not
/// rejected) produces no event at all, so "blocked" can only be concluded after a bound; a connection that
/// should have failed but was merely slower than this would go unnoticed (never a spurious failure).
/// Every negative check is paired with a positive one on the same path.
pub const BLOCKED_BOUND_SECS: u32 = 3;

/// Safety bound of the waits for the kernel to finish a teardown (links of a dead network namespace).
const TEARDOWN_BOUND: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------------------------------ commands

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `ip ARGS`, panicking with its error output on failure; returns stdout.
pub fn ip(args: &[&str]) -> String {
    run(Command::new("ip").args(args)).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `nft ARGS`; returns stdout or the error.
pub fn nft(args: &[&str]) -> Result<String, String> {
    run(Command::new("nft").args(args))
}

// ------------------------------------------------------------------------------------------ host state

/// Names of the host's network interfaces (this process's network namespace).
pub fn host_links() -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir("/sys/class/net")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The host's interfaces whose names start with `prefix`.
pub fn links_with_prefix(prefix: &str) -> Vec<String> {
    host_links()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// True when the host has an interface named `name`.
pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// A subscription to the host's link events (netlink `RTMGRP_LINK`): the event that a link appeared,
/// changed or went away. Used to wait for the kernel's asynchronous removal of the links of a network
/// namespace that died, without polling.
struct LinkEvents(OwnedFd);

impl LinkEvents {
    fn subscribe() -> Self {
        use nix::sys::socket::{
            bind, socket, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
        };
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkRoute,
        )
        .expect("netlink socket");
        // RTMGRP_LINK = 1: link added, changed, removed.
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &NetlinkAddr::new(0, 1),
        )
        .expect("binding the netlink socket to RTMGRP_LINK");
        Self(fd)
    }

    /// Waits up to `timeout` for at least one event, then drains what arrived. Overflow (ENOBUFS) counts
    /// as an event: the caller re-reads the state anyway.
    fn wait(&self, timeout: Duration) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use nix::sys::socket::{recv, MsgFlags};
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => panic!("poll on the netlink socket: {e}"),
        }
        let mut buf = [0u8; 16384];
        loop {
            match recv(
                std::os::fd::AsRawFd::as_raw_fd(&self.0),
                &mut buf,
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => break,
                Ok(_) | Err(nix::errno::Errno::ENOBUFS) | Err(nix::errno::Errno::EINTR) => {}
                Err(_) => break, // EAGAIN: drained
            }
        }
    }
}

/// Waits (on link events, up to `bound`) until `done()` holds; returns whether it does.
pub fn wait_for_links(bound: Duration, mut done: impl FnMut() -> bool) -> bool {
    let events = LinkEvents::subscribe();
    let deadline = Instant::now() + bound;
    loop {
        // Subscribed before the first check: a change after the check wakes the wait below.
        if done() {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return done();
        }
        events.wait(left);
    }
}

/// Waits until the host has no interface starting with `prefix` (the kernel removes a veth pair
/// asynchronously once the network namespace of its peer is gone); returns those left after the bound.
pub fn wait_links_gone(prefix: &str) -> Vec<String> {
    wait_for_links(TEARDOWN_BOUND, || links_with_prefix(prefix).is_empty());
    links_with_prefix(prefix)
}

/// `(family, name)` of every nftables table of the host.
pub fn nft_tables() -> Vec<(String, String)> {
    let text = nft(&["list", "tables"]).unwrap_or_else(|e| panic!("{e}"));
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            (it.next()? == "table").then_some(())?;
            Some((it.next()?.to_owned(), it.next()?.to_owned()))
        })
        .collect()
}

/// The families that have a table named `name`.
pub fn nft_table_families(name: &str) -> Vec<String> {
    nft_tables()
        .into_iter()
        .filter(|(_, n)| n == name)
        .map(|(f, _)| f)
        .collect()
}

/// The tables named `name` (every family: `inet`, and e.g. a `bridge` table of the same name), as
/// `nft -j list table` prints them, reduced to what must not change when sandboxes come and go: every
/// set's and map's elements (sorted), every chain, and every rule's expressions, without handles and
/// with counters' values cleared. `None` when there is no such table.
pub fn nft_table_state(name: &str) -> Option<serde_json::Value> {
    let families = nft_table_families(name);
    if families.is_empty() {
        return None;
    }
    let mut items = Vec::new();
    for family in families {
        let text = nft(&["-j", "list", "table", &family, name]).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).expect("nft -j prints JSON");
        for item in v["nftables"].as_array().cloned().unwrap_or_default() {
            let Some((kind, body)) = item.as_object().and_then(|o| o.iter().next()) else {
                continue;
            };
            if kind == "metainfo" {
                continue;
            }
            let mut body = body.clone();
            normalise(&mut body);
            if let Some(elems) = body.get_mut("elem").and_then(|e| e.as_array_mut()) {
                elems.sort_by_key(|e| e.to_string());
            }
            items.push(serde_json::json!({ kind: body }));
        }
    }
    items.sort_by_key(|i| i.to_string());
    Some(serde_json::Value::Array(items))
}

fn normalise(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            o.remove("handle");
            if o.contains_key("counter") {
                o.insert("counter".into(), serde_json::Value::Null);
            }
            for (k, x) in o.iter_mut() {
                if k == "packets" || k == "bytes" {
                    *x = serde_json::Value::Null;
                } else {
                    normalise(x);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(normalise),
        _ => {}
    }
}

/// The number of elements in every set and map of the table (`name -> count`).
pub fn nft_element_counts(table: &str) -> Vec<(String, usize)> {
    let Some(state) = nft_table_state(table) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in state.as_array().into_iter().flatten() {
        for kind in ["set", "map"] {
            if let Some(s) = item.get(kind) {
                let name = s["name"].as_str().unwrap_or_default().to_owned();
                let n = s["elem"].as_array().map_or(0, Vec::len);
                out.push((name, n));
            }
        }
    }
    out
}

/// Inode of this process's network namespace (the host's).
pub fn host_netns() -> String {
    fs::read_link("/proc/self/ns/net")
        .expect("reading /proc/self/ns/net")
        .display()
        .to_string()
}

/// Network namespaces (`net:[inode]`) other than the host's that process `pid` holds open through a file
/// descriptor or one of its threads.
pub fn net_namespaces_held_by(pid: i32) -> BTreeSet<String> {
    let host = host_netns();
    let mut out = BTreeSet::new();
    let mut links = Vec::new();
    if let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) {
        links.extend(rd.flatten().map(|e| e.path()));
    }
    if let Ok(rd) = fs::read_dir(format!("/proc/{pid}/task")) {
        links.extend(rd.flatten().map(|e| e.path().join("ns/net")));
    }
    for l in links {
        if let Ok(t) = fs::read_link(&l) {
            let t = t.display().to_string();
            if t.starts_with("net:[") && t != host {
                out.insert(t);
            }
        }
    }
    out
}

/// `(mount point, namespace)` of every network namespace kept alive by a bind mount (nsfs), except the
/// outside worlds' (`/run/netns/sbxt-out-*`).
pub fn net_namespace_mounts() -> BTreeSet<String> {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("reading mountinfo");
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split(' ').next()? == "nsfs").then_some(())?;
            let f: Vec<&str> = pre.split(' ').collect();
            let (root, mp) = (*f.get(3)?, *f.get(4)?);
            (root.starts_with("net:[") && !mp.starts_with("/run/netns/sbxt-out-"))
                .then(|| format!("{mp} {root}"))
        })
        .collect()
}

// ------------------------------------------------------------------------------------------ claims

/// An index (of a subnet or an outside world) claimed by this process: an exclusive `flock` on a file
/// under the system's temporary directory, held as long as the value lives. Two test processes running
/// at once never get the same index; a crashed one's claim ends with it.
#[derive(Debug)]
pub struct Claim {
    /// The index.
    pub index: u8,
    _lock: Flock<File>,
}

/// Claims an index of `kind` in `range` (skipping `skip` and indexes for which `in_use` says the host
/// still has something, e.g. leftovers of an earlier, killed run), starting at a place derived from this
/// process's pid and a counter.
fn claim(
    kind: &str,
    range: std::ops::RangeInclusive<u8>,
    skip: &[u8],
    in_use: impl Fn(u8) -> bool,
) -> Claim {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join("sbxt-locks");
    fs::create_dir_all(&dir).expect("creating the test lock directory");
    let (lo, hi) = (*range.start() as usize, *range.end() as usize);
    let span = hi - lo + 1;
    let start = (std::process::id() as usize * 7 + COUNTER.fetch_add(1, Ordering::Relaxed)) % span;
    for k in 0..span {
        let index = (lo + (start + k) % span) as u8;
        if skip.contains(&index) {
            continue;
        }
        let path = dir.join(format!("{kind}-{index}.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
            continue; // another test process has it
        };
        if in_use(index) {
            continue;
        }
        return Claim { index, _lock: lock };
    }
    panic!("no free {kind} index in {range:?}: too many test daemons or leftovers of earlier runs");
}

// ------------------------------------------------------------------------------------------ daemon config

/// What a test daemon's generated `[network]` section holds beyond its unique names.
#[derive(Debug, Clone, Default)]
pub struct NetSettings {
    /// `dns`: the sandboxes' nameservers (empty: the daemon's default, the host's resolvers).
    pub dns: Vec<String>,
    /// Prefix length of the subnet inside the claimed /24 (24 when 0): e.g. 28 for a 14-address pool.
    pub prefix_len: u8,
    /// Further `key = value` lines of the `[network]` section.
    pub extra: String,
    /// An IPv6 subnet too (`subnet6 = "fd5b:d0c0:XX::/64"`, XX the claimed index).
    pub ipv6: bool,
}

/// A test daemon's network as configured: what its leak checks look for.
#[derive(Debug)]
pub struct DaemonNetwork {
    /// `mode = "bridge"` (the daemon owns a bridge and a table); false for `mode = "none"`.
    pub managed: bool,
    /// The bridge.
    pub bridge: String,
    /// The sandbox subnet (`10.213.X.0/24`).
    pub subnet: String,
    /// The gateway (the bridge's address), when the subnet was generated here.
    pub gateway: Option<Ipv4Addr>,
    /// The IPv6 subnet and gateway, when one was generated here.
    pub subnet6: Option<(String, Ipv6Addr)>,
    /// The nftables table (`inet`).
    pub nft_table: String,
    /// Prefix of the host ends of the sandboxes' veth pairs.
    pub veth_prefix: String,
    /// Keeps the subnet index claimed while the daemon lives.
    pub claim: Option<Claim>,
}

/// Sandbox subnets the tests never use (kept for manual experiments).
const RESERVED_SUBNETS: [u8; 3] = [0, 77, 99];

impl DaemonNetwork {
    /// A unique network for a test daemon and the `[network]` section that configures it.
    pub fn generate(settings: &NetSettings) -> (Self, String) {
        let taken = |x: u8| {
            let addrs = run(Command::new("ip").args(["-4", "-o", "addr"])).unwrap_or_default();
            let routes = run(Command::new("ip").args(["-4", "route"])).unwrap_or_default();
            let net = format!("10.213.{x}.");
            link_exists(&format!("sbxtb{x:02x}"))
                || !links_with_prefix(&format!("sbt{x:02x}")).is_empty()
                || addrs.contains(&net)
                || routes.contains(&net)
                || !nft_table_families(&format!("sbxt_{x:02x}")).is_empty()
        };
        let claim = claim("subnet", 1..=254, &RESERVED_SUBNETS, taken);
        let x = claim.index;
        let prefix_len = if settings.prefix_len == 0 {
            24
        } else {
            settings.prefix_len
        };
        assert!(
            (24..=29).contains(&prefix_len),
            "prefix length {prefix_len}"
        );
        let net = Self {
            managed: true,
            bridge: format!("sbxtb{x:02x}"),
            subnet: format!("10.213.{x}.0/{prefix_len}"),
            gateway: Some(Ipv4Addr::new(10, 213, x, 1)),
            subnet6: settings.ipv6.then(|| {
                (
                    format!("fd5b:d0c0:{x:x}::/64"),
                    Ipv6Addr::new(0xfd5b, 0xd0c0, u16::from(x), 0, 0, 0, 0, 1),
                )
            }),
            nft_table: format!("sbxt_{x:02x}"),
            veth_prefix: format!("sbt{x:02x}"),
            claim: Some(claim),
        };
        let mut section = format!(
            "\n[network]\nmode = \"bridge\"\nbridge = \"{}\"\nsubnet = \"{}\"\nnft_table = \"{}\"\nveth_prefix = \"{}\"\n",
            net.bridge, net.subnet, net.nft_table, net.veth_prefix
        );
        if let Some((subnet6, _)) = &net.subnet6 {
            section.push_str(&format!("subnet6 = \"{subnet6}\"\n"));
        }
        if !settings.dns.is_empty() {
            let list: Vec<String> = settings.dns.iter().map(|d| format!("{d:?}")).collect();
            section.push_str(&format!("dns = [{}]\n", list.join(", ")));
        }
        section.push_str(&settings.extra);
        if !section.ends_with('\n') {
            section.push('\n');
        }
        (net, section)
    }

    /// The network a caller's own `[network]` section configures (the daemon's defaults for what it
    /// leaves out), or None when `config` has no such section.
    pub fn from_config(config: &str) -> Option<Self> {
        let mut in_section = false;
        let mut found = false;
        let mut kv = std::collections::BTreeMap::new();
        for line in config.lines() {
            let t = line.trim();
            if t.starts_with('[') {
                in_section = t.starts_with("[network]") || t.starts_with("[network.");
                found |= in_section;
                continue;
            }
            if !in_section {
                continue;
            }
            if let Some((k, v)) = t.split_once('=') {
                // A basic string up to its closing quote, or a bare value up to a comment.
                let v = v.trim();
                let v = match v.strip_prefix('"') {
                    Some(rest) => rest.split('"').next().unwrap_or_default(),
                    None => v.split('#').next().unwrap_or_default().trim(),
                }
                .to_owned();
                kv.insert(k.trim().to_owned(), v);
            }
        }
        if !found {
            return None;
        }
        let get = |k: &str, d: &str| kv.get(k).cloned().unwrap_or_else(|| d.to_owned());
        Some(Self {
            managed: get("mode", "bridge") != "none",
            bridge: get("bridge", "sandboxd0"),
            subnet: get("subnet", "10.88.0.0/16"),
            gateway: None,
            subnet6: None,
            nft_table: get("nft_table", "sandboxd"),
            veth_prefix: get("veth_prefix", "sbx"),
            claim: None,
        })
    }

    /// What is left of this network on the host after its daemon stopped: veths (after waiting for the
    /// kernel to finish tearing down dead namespaces), the bridge, the table. When `remove`, removes them.
    pub fn leftovers(&self, remove: bool) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.managed {
            return problems;
        }
        let veths = wait_links_gone(&self.veth_prefix);
        if !veths.is_empty() {
            problems.push(format!(
                "veths {veths:?} (prefix {}) left after the daemon stopped",
                self.veth_prefix
            ));
        }
        if link_exists(&self.bridge) {
            problems.push(format!(
                "bridge {} left after the daemon stopped",
                self.bridge
            ));
        }
        let families = nft_table_families(&self.nft_table);
        if !families.is_empty() {
            problems.push(format!(
                "nftables table {} ({families:?}) left after the daemon stopped",
                self.nft_table
            ));
        }
        if remove {
            self.remove_leftovers();
        }
        problems
    }

    /// Deletes this network's veths, bridge and tables (of every family), if any.
    pub fn remove_leftovers(&self) {
        if !self.managed || self.claim.is_none() {
            // Names the test did not generate: never delete what might be someone else's.
            return;
        }
        for l in links_with_prefix(&self.veth_prefix) {
            let _ = run(Command::new("ip").args(["link", "del", &l]));
        }
        if link_exists(&self.bridge) {
            let _ = run(Command::new("ip").args(["link", "del", &self.bridge]));
        }
        for f in nft_table_families(&self.nft_table) {
            let _ = nft(&["delete", "table", &f, &self.nft_table]);
        }
    }
}

// ------------------------------------------------------------------------------------------ outside world

/// The test's stand-in for the internet: network namespace `sbxt-out-<n>`, connected to the host by the
/// veth `sbxto<n>` (host 198.18.n.1/30, outside 198.18.n.2/30), with the "remote" addresses 198.19.n.10,
/// .11 and .53 (and 169.254.169.254) on its loopback, routed from the host through the veth; for IPv6 the
/// veth has 2001:db8:18:n::1/64 (host) and ::2 (outside), and 2001:db8:19:n::10 is the remote address. It has
/// no route back to any sandbox subnet: only the daemon's masquerade lets answers return.
///
/// Services (a python3 stdlib script, `outside_world.py`, one process):
/// - HTTP on `a:8080`, `a:8081`, `b:8080`, `[a6]:8080` and `169.254.169.254:80`, answering `CLIENT_IP SERVER_IP:PORT`,
///   except under `/simple/` and `/packages/`: a PEP 503 package index with one project, a tiny stand-in
///   for `torch` (version 2.99.0, not PyTorch) built by the script ([`OutsideWorld::pip_index`]);
/// - UDP on `a:5353`: DNS answers to DNS queries, else an echo;
/// - DNS on `dns:53/udp`: [`ALLOWED_NAME`] → `a`, [`DENIED_NAME`] → `b`, NXDOMAIN otherwise.
///
/// Every request is logged ([`OutsideWorld::log`]). Dropping it kills the server and removes the
/// namespace, the veth and any route or rule it added.
#[derive(Debug)]
pub struct OutsideWorld {
    /// The world's index `n`.
    pub n: u8,
    /// Its network namespace (`sbxt-out-<n>`).
    pub netns: String,
    /// The host end of its veth (`sbxto<n>`).
    pub host_if: String,
    /// The host's address on the veth (198.18.n.1): what the outside sees as the source of masqueraded
    /// sandbox traffic.
    pub host_addr: Ipv4Addr,
    /// The outside's address on the veth (198.18.n.2).
    pub peer_addr: Ipv4Addr,
    /// The host's IPv6 address on the veth (2001:db8:18:n::1/64): the source of masqueraded IPv6 traffic.
    pub host_addr6: Ipv6Addr,
    /// The outside's IPv6 address on the veth (2001:db8:18:n::2).
    pub peer_addr6: Ipv6Addr,
    /// "Remote" IPv6 server A6 (2001:db8:19:n::10): HTTP 8080.
    pub a6: Ipv6Addr,
    /// "Remote" server A (198.19.n.10): HTTP 8080 and 8081, UDP 5353.
    pub a: Ipv4Addr,
    /// "Remote" server B (198.19.n.11): HTTP 8080.
    pub b: Ipv4Addr,
    /// The DNS responder (198.19.n.53:53/udp).
    pub dns: Ipv4Addr,
    /// A metadata-service stand-in (169.254.169.254:80), reachable only through
    /// [`OutsideWorld::route_metadata_from`].
    pub metadata: Ipv4Addr,
    server: Option<Child>,
    log: Arc<(Mutex<Vec<String>>, Condvar)>,
    rules: Mutex<Vec<u32>>,
    markers: AtomicUsize,
    _dir: tempfile::TempDir,
    _claim: Claim,
}

fn python3() -> PathBuf {
    let debian = PathBuf::from("/usr/bin/python3");
    if debian.exists() {
        debian
    } else {
        PathBuf::from("python3")
    }
}

impl OutsideWorld {
    /// Creates the namespace, the veth, the routes and starts the servers; returns once every server
    /// socket is bound (the script prints `ready`).
    pub fn start() -> Self {
        let taken = |n: u8| {
            let addrs = run(Command::new("ip").args(["-4", "-o", "addr"])).unwrap_or_default();
            let routes = run(Command::new("ip").args(["-4", "route"])).unwrap_or_default();
            let rules = run(Command::new("ip").args(["rule"])).unwrap_or_default();
            Path::new("/run/netns")
                .join(format!("sbxt-out-{n}"))
                .exists()
                || link_exists(&format!("sbxto{n}"))
                || addrs.contains(&format!("198.18.{n}."))
                || routes.contains(&format!("198.19.{n}."))
                || routes.contains(&format!("198.18.{n}."))
                || rules
                    .lines()
                    .any(|l| l.starts_with(&format!("{}:", rule_pref(n))))
        };
        let claim = claim("world", 1..=254, &[], taken);
        let n = claim.index;
        let dir = tempfile::Builder::new()
            .prefix("sbxt-world-")
            .tempdir()
            .expect("temp dir");
        let mut w = Self {
            n,
            netns: format!("sbxt-out-{n}"),
            host_if: format!("sbxto{n}"),
            host_addr: Ipv4Addr::new(198, 18, n, 1),
            peer_addr: Ipv4Addr::new(198, 18, n, 2),
            host_addr6: Ipv6Addr::new(0x2001, 0xdb8, 0x18, u16::from(n), 0, 0, 0, 1),
            peer_addr6: Ipv6Addr::new(0x2001, 0xdb8, 0x18, u16::from(n), 0, 0, 0, 2),
            a6: Ipv6Addr::new(0x2001, 0xdb8, 0x19, u16::from(n), 0, 0, 0, 0x10),
            a: Ipv4Addr::new(198, 19, n, 10),
            b: Ipv4Addr::new(198, 19, n, 11),
            dns: Ipv4Addr::new(198, 19, n, 53),
            metadata: Ipv4Addr::new(169, 254, 169, 254),
            server: None,
            log: Arc::new((Mutex::new(Vec::new()), Condvar::new())),
            rules: Mutex::new(Vec::new()),
            markers: AtomicUsize::new(0),
            _dir: dir,
            _claim: claim,
        };
        // From here on, Drop undoes whatever was made, also when a step panics.
        w.build();
        w.spawn_servers();
        w
    }

    fn build(&self) {
        let ns = self.netns.as_str();
        let host_if = self.host_if.as_str();
        let host_cidr = format!("{}/30", self.host_addr);
        let peer_cidr = format!("{}/30", self.peer_addr);
        let remote = format!("198.19.{}.0/24", self.n);
        ip(&["netns", "add", ns]);
        // The peer is created directly inside the namespace.
        ip(&[
            "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ]);
        ip(&["addr", "add", &host_cidr, "dev", host_if]);
        ip(&["link", "set", host_if, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
        ip(&["-n", ns, "addr", "add", &peer_cidr, "dev", "eth0"]);
        for a in [self.a, self.b, self.dns, self.metadata] {
            ip(&["-n", ns, "addr", "add", &format!("{a}/32"), "dev", "lo"]);
        }
        let peer = self.peer_addr.to_string();
        ip(&["route", "add", &remote, "via", &peer, "dev", host_if]);
        // IPv6 (no duplicate address detection: the servers bind at once).
        let (host6, peer6) = (
            format!("{}/64", self.host_addr6),
            format!("{}/64", self.peer_addr6),
        );
        ip(&["-6", "addr", "add", &host6, "dev", host_if, "nodad"]);
        ip(&[
            "-n", ns, "-6", "addr", "add", &peer6, "dev", "eth0", "nodad",
        ]);
        ip(&[
            "-n",
            ns,
            "-6",
            "addr",
            "add",
            &format!("{}/128", self.a6),
            "dev",
            "lo",
        ]);
        let peer6 = self.peer_addr6.to_string();
        ip(&[
            "-6",
            "route",
            "add",
            &self.remote6(),
            "via",
            &peer6,
            "dev",
            host_if,
        ]);
    }

    /// The "remote" IPv6 network, routed through the veth.
    fn remote6(&self) -> String {
        format!("2001:db8:19:{:x}::/64", self.n)
    }

    fn spawn_servers(&mut self) {
        let script = self._dir.path().join("outside_world.py");
        fs::write(&script, include_str!("outside_world.py")).expect("writing outside_world.py");
        let (a, b, m) = (self.a, self.b, self.metadata);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .arg(python3())
            .arg("-u")
            .arg(&script);
        for hp in [
            format!("{a}:8080"),
            format!("{a}:8081"),
            format!("{b}:8080"),
            format!("{m}:80"),
        ] {
            cmd.arg("--http").arg(hp);
        }
        cmd.arg("--http6").arg(format!("{}:8080", self.a6));
        cmd.arg("--udp-echo")
            .arg(format!("{a}:5353"))
            .arg("--dns")
            .arg(format!("{}:53", self.dns))
            .arg("--name")
            .arg(format!("{ALLOWED_NAME}={a}"))
            .arg("--name")
            .arg(format!("{DENIED_NAME}={b}"));
        let stderr_path = self._dir.path().join("stderr");
        let stderr = File::create(&stderr_path).expect("world stderr file");
        // `ip netns exec` execs the program: the child's pid is the server's.
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("starting the outside world's servers");
        let stdout = child.stdout.take().expect("stdout pipe");
        self.server = Some(child);
        let (tx, rx) = mpsc::channel::<bool>();
        let log = Arc::clone(&self.log);
        std::thread::spawn(move || {
            let mut told = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !told {
                    told = true;
                    let _ = tx.send(line == "ready");
                    continue;
                }
                let (lines, cv) = &*log;
                lines.lock().expect("world log").push(line);
                cv.notify_all();
            }
            if !told {
                let _ = tx.send(false);
            }
        });
        // The script prints "ready" after binding every socket: that line is the event. The bound only
        // turns a hang into a failure.
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(true) => {}
            other => panic!(
                "the outside world's servers did not start ({other:?}): {}",
                fs::read_to_string(&stderr_path).unwrap_or_default()
            ),
        }
    }

    /// The URL of the stand-in package index (`PIP_INDEX_URL`): `http://<a>:8080/simple/`, whose only
    /// project is a tiny stand-in for `torch` (2.99.0, a pure-Python wheel that is not PyTorch).
    pub fn pip_index(&self) -> String {
        format!("http://{}:8080/simple/", self.a)
    }

    /// The nameservers to configure a daemon with (`dns`).
    pub fn dns_servers(&self) -> Vec<String> {
        vec![self.dns.to_string()]
    }

    /// Starts a test daemon whose sandboxes use this world's DNS responder; `config` as in
    /// [`Daemon::start_with_config`].
    pub fn daemon(&self, config: Option<&str>) -> Daemon {
        Daemon::start_with_network(
            NetSettings {
                dns: self.dns_servers(),
                ..NetSettings::default()
            },
            config,
        )
    }

    /// Like [`OutsideWorld::daemon`], with an IPv6 subnet too.
    pub fn daemon6(&self) -> Daemon {
        Daemon::start_with_network(
            NetSettings {
                dns: self.dns_servers(),
                ipv6: true,
                ..NetSettings::default()
            },
            None,
        )
    }

    /// Every line the servers logged so far (`http CLIENT SERVER:PORT PATH`, `udp CLIENT SERVER:PORT`,
    /// `dns CLIENT SERVER:PORT NAME TYPE ANSWER`).
    pub fn log(&self) -> Vec<String> {
        self.log.0.lock().expect("world log").clone()
    }

    /// Makes the log complete up to now: requests the host sends reach the servers after everything
    /// that was sent before, so the host fetches a marker from server A and waits for its line. Returns
    /// the log up to (without) the marker.
    pub fn sync_log(&self) -> Vec<String> {
        let k = self.markers.fetch_add(1, Ordering::Relaxed);
        let path = format!("/marker-{k}");
        let body = http_get_host(SocketAddr::from((self.a, 8080)), &path)
            .unwrap_or_else(|e| panic!("the host cannot reach the outside world: {e}"));
        assert!(body.contains(&self.host_addr.to_string()), "{body}");
        let (lines, cv) = &*self.log;
        let mut guard = lines.lock().expect("world log");
        let deadline = Instant::now() + Duration::from_secs(SUCCESS_BOUND_SECS.into());
        loop {
            if let Some(i) = guard
                .iter()
                .position(|l| l.starts_with("http ") && l.ends_with(&format!(" {path}")))
            {
                return guard[..i]
                    .iter()
                    .filter(|l| !l.contains(" /marker-"))
                    .cloned()
                    .collect();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the marker {path} never reached the log");
            guard = cv.wait_timeout(guard, left).expect("world log").0;
        }
    }

    /// Log lines of requests that reached `server:port` (HTTP, UDP or DNS).
    pub fn requests_to(&self, server: Ipv4Addr, port: u16) -> Vec<String> {
        let needle = format!(" {server}:{port}");
        self.sync_log()
            .into_iter()
            .filter(|l| l.contains(&needle))
            .collect()
    }

    /// Adds a route inside the world to `net` via the host: the world can then address sandboxes
    /// directly (to show that the daemon's firewall, not a missing route, keeps it out).
    pub fn route_to(&self, net: &str) {
        let via = self.host_addr.to_string();
        ip(&["-n", &self.netns, "route", "add", net, "via", &via]);
    }

    /// Routes 169.254.169.254 to this world, for packets from `subnet` only (a policy rule of this world's
    /// own preference and table): if the daemon's link-local block failed, a sandbox's request would reach
    /// this world's stand-in instead of leaving the machine.
    pub fn route_metadata_from(&self, subnet: &str) {
        let table = rule_pref(self.n).to_string();
        let via = self.peer_addr.to_string();
        let dst = format!("{}/32", self.metadata);
        ip(&[
            "route",
            "add",
            &dst,
            "via",
            &via,
            "dev",
            &self.host_if,
            "table",
            &table,
        ]);
        self.rules.lock().expect("rules").push(rule_pref(self.n));
        ip(&[
            "rule", "add", "from", subnet, "lookup", &table, "pref", &table,
        ]);
    }

    /// Runs `f` in a thread inside the world's network namespace (sockets it makes are the world's).
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = Path::new("/run/netns").join(&self.netns);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns =
                    File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
                // setns affects only this thread.
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("joining the outside world's network namespace");
                f()
            })
            .join()
            .expect("thread in the outside world")
        })
    }

    /// An HTTP GET of `/` at `addr`, made from inside the world.
    pub fn http_get(&self, addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
        self.in_netns(|| http_get_within(addr, "/", timeout))
    }
}

fn rule_pref(n: u8) -> u32 {
    21300 + u32::from(n)
}

impl Drop for OutsideWorld {
    fn drop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pref in self.rules.lock().map(|r| r.clone()).unwrap_or_default() {
            let p = pref.to_string();
            let _ = run(Command::new("ip").args(["rule", "del", "pref", &p]));
            let _ = run(Command::new("ip").args(["route", "flush", "table", &p]));
        }
        let remote = format!("198.19.{}.0/24", self.n);
        let _ = run(Command::new("ip").args(["route", "del", &remote]));
        let _ = run(Command::new("ip").args(["-6", "route", "del", &self.remote6()]));
        if link_exists(&self.host_if) {
            let _ = run(Command::new("ip").args(["link", "del", &self.host_if]));
        }
        let _ = run(Command::new("ip").args(["netns", "del", &self.netns]));
    }
}

// ------------------------------------------------------------------------------------------ probes

/// An HTTP/1.0 GET of `path` at `addr` from the host; the body on a 200.
pub fn http_get_host(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    http_get_within(addr, path, Duration::from_secs(SUCCESS_BOUND_SECS.into()))
}

/// An HTTP/1.0 GET with `timeout` for the connection and every read.
pub fn http_get_within(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head.split(' ').nth(1);
    if !head.starts_with("HTTP/1.") || status != Some("200") {
        return Err(std::io::Error::other(format!("HTTP answer: {head}")));
    }
    Ok(body.to_owned())
}

/// The sandbox's address (`network.address`).
pub fn address_of(info: &SandboxInfo) -> Ipv4Addr {
    info.network
        .as_ref()
        .and_then(|n| n.address.as_deref())
        .unwrap_or_else(|| panic!("no network.address in {info:?}"))
        .parse()
        .expect("network.address is an IPv4 address")
}

/// The sandbox's gateway (`network.gateway`).
pub fn gateway_of(info: &SandboxInfo) -> Ipv4Addr {
    info.network
        .as_ref()
        .and_then(|n| n.gateway.as_deref())
        .unwrap_or_else(|| panic!("no network.gateway in {info:?}"))
        .parse()
        .expect("network.gateway is an IPv4 address")
}

/// Runs `sh -c script` in the sandbox, bounded by `timeout -s KILL secs` inside; `(exit code, stdout,
/// stderr)`.
pub fn sh_within(c: &BlockingClient, id: &str, secs: u32, script: &str) -> (i32, String, String) {
    let req = ExecRequest {
        command: vec![
            "timeout".into(),
            "-s".into(),
            "KILL".into(),
            secs.to_string(),
            "sh".into(),
            "-c".into(),
            script.into(),
        ],
        ..ExecRequest::default()
    };
    let r = c
        .exec(id, &req)
        .unwrap_or_else(|e| panic!("exec `{script}` in {id}: {e}"));
    (r.exit_code, r.stdout, r.stderr)
}

/// `wget` of `url` from inside the sandbox: the body, or the exit code and error output. Busybox's
/// `wget -T` crashes, so the bound is `timeout` around it.
pub fn wget(c: &BlockingClient, id: &str, url: &str, secs: u32) -> Result<String, String> {
    let (code, out, err) = sh_within(c, id, secs, &format!("wget -q -O - '{url}'"));
    if code == 0 {
        Ok(out)
    } else {
        Err(format!("exit {code}: {}", err.trim()))
    }
}

/// Asserts that the sandbox can fetch `url`; returns the body.
#[track_caller]
pub fn wget_ok(c: &BlockingClient, id: &str, url: &str) -> String {
    wget(c, id, url, SUCCESS_BOUND_SECS)
        .unwrap_or_else(|e| panic!("wget {url} from {id} failed: {e}"))
}

/// Asserts that the sandbox cannot fetch `url`.
#[track_caller]
pub fn wget_blocked(c: &BlockingClient, id: &str, url: &str) {
    if let Ok(body) = wget(c, id, url, BLOCKED_BOUND_SECS) {
        panic!("wget {url} from {id} should have been blocked, got {body:?}");
    }
}

/// Whether a TCP connection from the sandbox to `ip:port` is established (busybox `nc`, which runs
/// `true` once connected), within `secs`.
pub fn tcp_connects(c: &BlockingClient, id: &str, ip: Ipv4Addr, port: u16, secs: u32) -> bool {
    sh_within(c, id, secs, &format!("nc {ip} {port} -e true")).0 == 0
}

/// A DNS query for `name` from inside the sandbox (busybox `nslookup`, to `server` when given, else to the
/// sandbox's resolv.conf): its output, or the exit code and output of a failure.
pub fn nslookup(
    c: &BlockingClient,
    id: &str,
    name: &str,
    server: Option<&str>,
    secs: u32,
) -> Result<String, String> {
    let script = match server {
        Some(s) => format!("nslookup {name} {s}"),
        None => format!("nslookup {name}"),
    };
    let (code, out, err) = sh_within(c, id, secs, &script);
    if code == 0 {
        Ok(out)
    } else {
        Err(format!("exit {code}: {out}{err}"))
    }
}

/// Starts busybox `httpd` on `port` in the sandbox, serving `body` at `/`. httpd binds and listens before
/// it puts itself in the background, so when this returns the port accepts connections.
pub fn start_httpd(c: &BlockingClient, id: &str, port: u16, body: &str) {
    let script = format!(
        "set -e; mkdir -p /srv/www; printf '%s' '{body}' > /srv/www/index.html; \
         httpd -p {port} -h /srv/www </dev/null >/dev/null 2>&1"
    );
    let (code, out, err) = sh_within(c, id, SUCCESS_BOUND_SECS, &script);
    assert_eq!(code, 0, "starting httpd on {port} in {id}: {out} {err}");
}

/// A TCP port of 127.0.0.1 that is free now (the kernel's pick, released at once).
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// Reads one datagram answer to `payload` sent from the host to `addr`, within `timeout`.
pub fn udp_roundtrip(
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> std::io::Result<Vec<u8>> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(timeout))?;
    s.connect(addr)?;
    s.send(payload)?;
    let mut buf = vec![0u8; 2048];
    let n = s.recv(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// The host's global IPv4 addresses outside the test ranges (read only).
pub fn host_global_addresses() -> Vec<Ipv4Addr> {
    let text = run(Command::new("ip").args(["-4", "-o", "addr", "show", "scope", "global"]))
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            it.find(|w| *w == "inet")?;
            let a: Ipv4Addr = it.next()?.split('/').next()?.parse().ok()?;
            let o = a.octets();
            let test = (o[0] == 10 && o[1] == 213) || (o[0] == 198 && (o[1] == 18 || o[1] == 19));
            (!test).then_some(a)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callers_network_section_is_read_with_the_daemons_defaults() {
        assert!(
            DaemonNetwork::from_config("warm_pool = 0\n[pull]\ntimeout_seconds = 2\n").is_none()
        );
        let n = DaemonNetwork::from_config(
            "warm_pool = 0\n\n[network]\nbridge = \"sbxtq\" # comment-free\nveth_prefix = \"sbq\"\n[pull]\nx = 1\n",
        )
        .expect("a [network] section");
        assert!(n.managed);
        assert_eq!(
            (
                n.bridge.as_str(),
                n.nft_table.as_str(),
                n.veth_prefix.as_str()
            ),
            ("sbxtq", "sandboxd", "sbq")
        );
        assert!(n.claim.is_none());
        let none = DaemonNetwork::from_config("[network]\nmode = \"none\"\n").expect("section");
        assert!(!none.managed);
    }

    #[test]
    fn generated_networks_are_unique_and_fit_the_kernels_limits() {
        let (a, sa) = DaemonNetwork::generate(&NetSettings {
            dns: vec!["198.19.1.53".into()],
            ..NetSettings::default()
        });
        let (b, _) = DaemonNetwork::generate(&NetSettings::default());
        assert_ne!(a.subnet, b.subnet);
        assert_ne!(a.bridge, b.bridge);
        assert_ne!(a.nft_table, b.nft_table);
        assert_ne!(a.veth_prefix, b.veth_prefix);
        for n in [&a, &b] {
            assert!(
                n.bridge.len() <= 15 && n.bridge.starts_with("sbxt"),
                "{n:?}"
            );
            assert_eq!(n.veth_prefix.len(), 5, "{n:?}");
            assert!(!n.bridge.starts_with(&n.veth_prefix));
            assert!(
                n.subnet.starts_with("10.213.") && n.subnet.ends_with(".0/24"),
                "{n:?}"
            );
            assert!(!n.subnet.starts_with("10.213.77.") && !n.subnet.starts_with("10.213.99."));
        }
        assert!(sa.contains("dns = [\"198.19.1.53\"]"), "{sa}");
        let parsed = DaemonNetwork::from_config(&sa).expect("the generated section parses");
        assert_eq!(
            (
                parsed.bridge,
                parsed.nft_table,
                parsed.veth_prefix,
                parsed.subnet
            ),
            (
                a.bridge.clone(),
                a.nft_table.clone(),
                a.veth_prefix.clone(),
                a.subnet.clone()
            )
        );
    }

    #[test]
    fn nft_state_ignores_handles_and_counter_values() {
        let mut a = serde_json::json!({"rule": {"handle": 4, "expr": [{"counter": {"packets": 3, "bytes": 180}}]}});
        let mut b = serde_json::json!({"rule": {"handle": 9, "expr": [{"counter": {"packets": 0, "bytes": 0}}]}});
        normalise(&mut a);
        normalise(&mut b);
        assert_eq!(a, b);
    }
}
