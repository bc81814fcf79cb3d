//! The DNS forwarder behind `dns_name` egress rules.
//!
//! A sandbox whose allow-list has `dns_name` rules gets the bridge's gateway as its only nameserver. The
//! forwarder listens there (udp and tcp port 53, in the host's network namespace), knows the sandbox by the
//! source address of the query (a sandbox cannot change its address: its network namespace belongs to the
//! host's user namespace, so it has no `CAP_NET_ADMIN`/`CAP_NET_RAW` there), and:
//!
//! - answers `REFUSED` to a name its rules do not match, and to every query from a source without
//!   `dns_name` rules (those sandboxes use the upstream resolvers directly: the forwarder gives them
//!   nothing);
//! - forwards an allowed query to the upstream resolvers (5 s in all, then `SERVFAIL`), follows the CNAME
//!   chain of the answer from the name asked, and, before relaying the answer, opens every IPv4 address
//!   (A record) at the end of it to that sandbox on the rule's protocols and ports for max(TTL, 30 s), at
//!   most an hour ([`DnsGrant`] elements with a timeout in the firewall table).
//!
//! Names: a rule `example.org` matches exactly that name; `*.example.org` matches every name below it
//! (`a.example.org`, `a.b.example.org`) but not `example.org` itself. Names are compared in lower case,
//! without the final dot.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{Name, RData};
use sandbox_runtime::net::nft::{DnsGrant, Firewall, NetPlan, Proto, DNS_GRANT_MAX_SECS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

/// Longest name (RFC 1035, in text without the final dot).
pub const MAX_NAME_LEN: usize = 253;
/// Shortest time an answer's addresses stay open, whatever its TTL.
pub const MIN_GRANT_SECS: u32 = 30;
/// How long an allowed query may take upstream before the sandbox gets `SERVFAIL`.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Queries being answered at once (UDP queries beyond are dropped; the client retries).
const MAX_INFLIGHT: usize = 256;
/// TCP connections at once (more are closed at once).
const MAX_TCP_CONNECTIONS: usize = 64;
/// Queries on one TCP connection, and how long it may stay idle.
const TCP_QUERIES_PER_CONNECTION: usize = 64;
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Largest UDP query read (a longer one is cut and answered `FORMERR`).
const MAX_UDP_QUERY: usize = 4096;
/// Open destinations kept per sandbox (expired ones are pruned first); beyond, queries get `SERVFAIL`.
const MAX_GRANTS_PER_SANDBOX: usize = 8192;
/// Longest CNAME chain followed.
const MAX_CNAME_CHAIN: usize = 16;

/// A validated `dns_name` pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NamePattern {
    /// Exactly this name.
    Exact(String),
    /// Every name strictly below this one (`*.example.org` → `example.org`).
    Below(String),
}

impl std::fmt::Display for NamePattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NamePattern::Exact(n) => f.write_str(n),
            NamePattern::Below(n) => write!(f, "*.{n}"),
        }
    }
}

/// Checks a host name (lower case already): labels of 1 to 63 letters, digits and `-` (not at either end),
/// at most [`MAX_NAME_LEN`] characters in all.
fn check_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty name".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("longer than {MAX_NAME_LEN} characters"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label (two dots in a row, or a leading dot)".into());
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} is longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(format!(
                "label {label:?} has characters other than letters, digits and '-'"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with '-'"));
        }
    }
    Ok(())
}

impl NamePattern {
    /// Parses `host.name` or `*.host.name` (case-insensitive, one final dot allowed).
    pub fn parse(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        let lower = lower.strip_suffix('.').unwrap_or(&lower);
        if let Some(rest) = lower.strip_prefix("*.") {
            check_hostname(rest)?;
            if rest.len() + 2 > MAX_NAME_LEN {
                return Err(format!("longer than {MAX_NAME_LEN} characters"));
            }
            return Ok(NamePattern::Below(rest.to_owned()));
        }
        if lower.contains('*') {
            return Err(
                "a wildcard is only allowed as the whole first label (*.example.org)".into(),
            );
        }
        check_hostname(lower)?;
        Ok(NamePattern::Exact(lower.to_owned()))
    }

    /// Whether `name` (normalised: see [`normalise`]) matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Exact(n) => name == n,
            NamePattern::Below(n) => name
                .strip_suffix(n.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }
}

/// A name as asked, in the form patterns match: ASCII lower case, without the final dot.
pub fn normalise(name: &Name) -> String {
    let s = name.to_ascii().to_ascii_lowercase();
    match s.strip_suffix('.') {
        Some(t) => t.to_owned(),
        None => s,
    }
}

/// One `dns_name` rule: the addresses its names resolve to are opened on these protocols and ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsRule {
    pub pattern: NamePattern,
    pub protos: Vec<Proto>,
    /// Empty: every port.
    pub ports: Vec<u16>,
}

impl DnsRule {
    fn grants(&self, sandbox: Ipv4Addr, dest: Ipv4Addr) -> Vec<DnsGrant> {
        let mut out = Vec::new();
        for &proto in &self.protos {
            if self.ports.is_empty() {
                out.push(DnsGrant {
                    sandbox,
                    dest,
                    proto,
                    port: None,
                });
            }
            for &p in &self.ports {
                out.push(DnsGrant {
                    sandbox,
                    dest,
                    proto,
                    port: Some(p),
                });
            }
        }
        out
    }
}

#[derive(Debug)]
struct Client {
    rules: Arc<Vec<DnsRule>>,
    /// What was opened for it, and until when.
    grants: HashMap<DnsGrant, Instant>,
}

/// The sandboxes with `dns_name` rules, by address, with what the forwarder opened for them. Grants are
/// added and removed in the firewall under this lock, so that none is added for a sandbox that is gone.
#[derive(Debug, Default)]
pub struct DnsClients {
    inner: StdMutex<HashMap<Ipv4Addr, Client>>,
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DnsClients {
    /// Starts answering `address` with these rules (none: the sandbox is not served).
    pub fn set(&self, address: Ipv4Addr, rules: Vec<DnsRule>) {
        let mut m = lock(&self.inner);
        if rules.is_empty() {
            m.remove(&address);
            return;
        }
        m.insert(
            address,
            Client {
                rules: Arc::new(rules),
                grants: HashMap::new(),
            },
        );
    }

    /// Stops answering `address` and closes what is still open for it (`revoke` gets the unexpired grants).
    pub fn remove(&self, address: Ipv4Addr, revoke: impl FnOnce(&[DnsGrant])) {
        let mut m = lock(&self.inner);
        if let Some(c) = m.remove(&address) {
            let now = Instant::now();
            let live: Vec<DnsGrant> = c
                .grants
                .into_iter()
                .filter(|(_, until)| *until > now)
                .map(|(g, _)| g)
                .collect();
            revoke(&live);
        }
    }

    /// Forgets every grant (the table was replaced: its timeout sets are empty).
    pub fn forget_grants(&self) {
        for c in lock(&self.inner).values_mut() {
            c.grants.clear();
        }
    }

    fn rules(&self, address: Ipv4Addr) -> Option<Arc<Vec<DnsRule>>> {
        lock(&self.inner).get(&address).map(|c| c.rules.clone())
    }

    /// Opens `grants` for `address` for `secs` through `apply` unless they are already open at least as long;
    /// false if the sandbox is gone, it has too many, or `apply` failed.
    fn open(
        &self,
        address: Ipv4Addr,
        grants: Vec<DnsGrant>,
        secs: u32,
        apply: impl FnOnce(&[DnsGrant], u32) -> bool,
    ) -> bool {
        let mut m = lock(&self.inner);
        let Some(c) = m.get_mut(&address) else {
            return false;
        };
        let now = Instant::now();
        let until = now + Duration::from_secs(secs.into());
        let todo: Vec<DnsGrant> = grants
            .into_iter()
            .filter(|g| c.grants.get(g).is_none_or(|t| *t < until))
            .collect();
        if todo.is_empty() {
            return true;
        }
        if c.grants.len() + todo.len() > MAX_GRANTS_PER_SANDBOX {
            c.grants.retain(|_, t| *t > now);
            if c.grants.len() + todo.len() > MAX_GRANTS_PER_SANDBOX {
                tracing::warn!(sandbox = %address, "the DNS forwarder has opened too many destinations for this sandbox");
                return false;
            }
        }
        if !apply(&todo, secs) {
            return false;
        }
        for g in todo {
            c.grants.insert(g, until);
        }
        true
    }
}

/// How a query came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// What the forwarder needs: its clients, the firewall, the upstream resolvers.
#[derive(Debug)]
pub struct Forwarder {
    clients: Arc<DnsClients>,
    fw: Arc<Firewall>,
    plan: NetPlan,
    upstreams: Vec<SocketAddr>,
    inflight: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    ids: AtomicU64,
    seed: std::collections::hash_map::RandomState,
}

impl Forwarder {
    /// A forwarder for `clients`, asking `upstreams` (port 53).
    pub fn new(
        clients: Arc<DnsClients>,
        fw: Arc<Firewall>,
        plan: NetPlan,
        upstreams: &[Ipv4Addr],
    ) -> Self {
        Self {
            clients,
            fw,
            plan,
            upstreams: upstreams
                .iter()
                .map(|a| SocketAddr::V4(SocketAddrV4::new(*a, 53)))
                .collect(),
            inflight: Arc::new(Semaphore::new(MAX_INFLIGHT)),
            connections: Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS)),
            ids: AtomicU64::new(0),
            seed: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Binds udp and tcp `address:53` and serves them in background tasks (for the rest of the process).
    pub async fn serve(self: Arc<Self>, address: Ipv4Addr) -> std::io::Result<()> {
        let at = SocketAddr::V4(SocketAddrV4::new(address, 53));
        let udp = Arc::new(UdpSocket::bind(at).await?);
        let tcp = TcpListener::bind(at).await?;
        tokio::spawn(self.clone().serve_udp(udp));
        tokio::spawn(self.serve_tcp(tcp));
        Ok(())
    }

    /// A random query id for upstream.
    fn new_id(&self) -> u16 {
        let mut h = self.seed.build_hasher();
        h.write_u64(self.ids.fetch_add(1, Ordering::Relaxed));
        h.finish() as u16
    }

    async fn serve_udp(self: Arc<Self>, sock: Arc<UdpSocket>) {
        let mut buf = vec![0u8; MAX_UDP_QUERY];
        loop {
            let (n, peer) = match sock.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("DNS forwarder (udp): {e}");
                    tokio::task::yield_now().await;
                    continue;
                }
            };
            let Ok(permit) = self.inflight.clone().try_acquire_owned() else {
                continue;
            };
            let query = buf[..n].to_vec();
            let (me, sock) = (self.clone(), sock.clone());
            tokio::spawn(async move {
                let _permit = permit;
                if let Some(answer) = me.answer(peer, &query, Transport::Udp).await {
                    let _ = sock.send_to(&answer, peer).await;
                }
            });
        }
    }

    async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (conn, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("DNS forwarder (tcp): {e}");
                    tokio::task::yield_now().await;
                    continue;
                }
            };
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                me.tcp_connection(conn, peer).await;
            });
        }
    }

    async fn tcp_connection(&self, mut conn: TcpStream, peer: SocketAddr) {
        for _ in 0..TCP_QUERIES_PER_CONNECTION {
            let Ok(Ok(Some(query))) = tokio::time::timeout(TCP_IDLE, read_framed(&mut conn)).await
            else {
                return;
            };
            let Ok(_permit) = self.inflight.acquire().await else {
                return;
            };
            let Some(answer) = self.answer(peer, &query, Transport::Tcp).await else {
                return;
            };
            if write_framed(&mut conn, &answer).await.is_err() {
                return;
            }
        }
    }

    /// The answer to one query from `peer` (None: drop it).
    async fn answer(
        &self,
        peer: SocketAddr,
        query: &[u8],
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let SocketAddr::V4(peer) = peer else {
            return None;
        };
        let source = *peer.ip();
        let msg = match Message::from_vec(query) {
            Ok(m) => m,
            Err(_) => {
                // Unparseable: FORMERR if it has a query's header, else nothing.
                if query.len() < 12 || query[2] & 0x80 != 0 {
                    return None;
                }
                let id = u16::from_be_bytes([query[0], query[1]]);
                return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                    .to_vec()
                    .ok();
            }
        };
        if msg.metadata.message_type != MessageType::Query {
            return None;
        }
        let error = |code: ResponseCode| -> Option<Vec<u8>> {
            let mut m = Message::error_msg(msg.metadata.id, msg.metadata.op_code, code);
            m.metadata.recursion_desired = msg.metadata.recursion_desired;
            m.metadata.recursion_available = true;
            m.queries = msg.queries.clone();
            m.to_vec().ok()
        };
        if msg.metadata.op_code != OpCode::Query {
            return error(ResponseCode::NotImp);
        }
        let [question] = &msg.queries[..] else {
            return error(ResponseCode::FormErr);
        };
        let name = normalise(&question.name);
        let Some(rules) = self.clients.rules(source) else {
            tracing::debug!(%source, %name, "DNS query refused: the source has no dns_name rules");
            return error(ResponseCode::Refused);
        };
        let matched: Vec<&DnsRule> = rules.iter().filter(|r| r.pattern.matches(&name)).collect();
        if matched.is_empty() {
            tracing::debug!(%source, %name, "DNS query refused: not in the sandbox's allow-list");
            return error(ResponseCode::Refused);
        }
        let Some(mut reply) = self.upstream(query, transport).await else {
            tracing::debug!(%source, %name, "DNS query failed upstream");
            return error(ResponseCode::ServFail);
        };
        let Ok(resp) = Message::from_vec(&reply) else {
            return error(ResponseCode::ServFail);
        };
        if resp.queries.len() != 1 || normalise(&resp.queries[0].name) != name {
            return error(ResponseCode::ServFail);
        }
        let mut by_timeout: BTreeMap<u32, Vec<DnsGrant>> = BTreeMap::new();
        for (addr, ttl) in resolved_addresses(&resp, &name) {
            let secs = ttl.clamp(MIN_GRANT_SECS, DNS_GRANT_MAX_SECS);
            let grants = by_timeout.entry(secs).or_default();
            for r in &matched {
                grants.extend(r.grants(source, addr));
            }
        }
        for (secs, mut grants) in by_timeout {
            grants.sort_unstable();
            grants.dedup();
            let opened = self.clients.open(source, grants, secs, |todo, secs| {
                match self.fw.add_dns_grants(&self.plan, todo, secs) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(%source, %name, "opening the resolved addresses: {e}");
                        false
                    }
                }
            });
            if !opened {
                return error(ResponseCode::ServFail);
            }
        }
        // The client's id back (upstream got a fresh one).
        reply[..2].copy_from_slice(&msg.metadata.id.to_be_bytes());
        Some(reply)
    }

    /// Asks the upstream resolvers in turn, [`UPSTREAM_TIMEOUT`] in all; the answer has the upstream id. By
    /// udp first; a client that came by tcp gets the whole answer by tcp when the udp one is truncated or
    /// missing, a udp client gets the truncated one (and asks again by tcp).
    async fn upstream(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let mut q = query.to_vec();
        let id = self.new_id();
        q[..2].copy_from_slice(&id.to_be_bytes());
        let n = self.upstreams.len().max(1) as u32;
        let per = UPSTREAM_TIMEOUT / n;
        tokio::time::timeout(UPSTREAM_TIMEOUT, async {
            for up in &self.upstreams {
                let udp = match tokio::time::timeout(per, udp_exchange(*up, &q, id)).await {
                    Ok(Ok(r)) => Some(r),
                    _ => None,
                };
                let truncated = udp.as_ref().is_some_and(|r| r[2] & 0x02 != 0);
                if transport == Transport::Udp || (udp.is_some() && !truncated) {
                    if udp.is_some() {
                        return udp;
                    }
                    continue;
                }
                if let Ok(Ok(r)) = tokio::time::timeout(per, tcp_exchange(*up, &q, id)).await {
                    return Some(r);
                }
                if udp.is_some() {
                    return udp;
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
    }
}

/// The IPv4 addresses (with their TTLs) the answer gives for `name`, following its CNAME chain.
fn resolved_addresses(resp: &Message, name: &str) -> Vec<(Ipv4Addr, u32)> {
    let mut chain = vec![name.to_owned()];
    for _ in 0..MAX_CNAME_CHAIN {
        let mut grew = false;
        for r in &resp.answers {
            if let RData::CNAME(target) = &r.data {
                let (owner, target) = (normalise(&r.name), normalise(&target.0));
                if chain.contains(&owner) && !chain.contains(&target) {
                    chain.push(target);
                    grew = true;
                }
            }
        }
        if !grew {
            break;
        }
    }
    resp.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) if chain.contains(&normalise(&r.name)) => Some((a.0, r.ttl)),
            _ => None,
        })
        .collect()
}

/// One query by udp; the first datagram from the upstream with our id answers it.
async fn udp_exchange(up: SocketAddr, query: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    let sock = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).await?;
    sock.connect(up).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        if n >= 12 && u16::from_be_bytes([buf[0], buf[1]]) == id && buf[2] & 0x80 != 0 {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

/// One query by tcp.
async fn tcp_exchange(up: SocketAddr, query: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    let mut conn = TcpStream::connect(up).await?;
    write_framed(&mut conn, query).await?;
    match read_framed(&mut conn).await? {
        Some(r) if r.len() >= 12 && u16::from_be_bytes([r[0], r[1]]) == id => Ok(r),
        _ => Err(std::io::Error::other("no answer")),
    }
}

/// A length-prefixed message (RFC 1035 4.2.2); None at the end of the stream.
async fn read_framed(conn: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match conn.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    conn.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

async fn write_framed(conn: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| std::io::Error::other("message too long"))?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    conn.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::rdata::{A, CNAME};
    use hickory_proto::rr::{Record, RecordType};

    #[test]
    fn patterns_parse_and_normalise() {
        assert_eq!(
            NamePattern::parse("Example.ORG.").unwrap(),
            NamePattern::Exact("example.org".into())
        );
        assert_eq!(
            NamePattern::parse("*.Example.org").unwrap(),
            NamePattern::Below("example.org".into())
        );
        assert_eq!(NamePattern::parse("*.a.b").unwrap().to_string(), "*.a.b");
        assert!(NamePattern::parse("localhost").is_ok());
        for bad in [
            "",
            ".",
            "*",
            "*.",
            "a..b",
            ".a.b",
            "a*.b",
            "*.*.b",
            "a.*.b",
            "-a.b",
            "a-.b",
            "a_b.c",
            "a b.c",
            "é.fr",
            "a\".b",
            "1.2.3.4/32",
            &format!("{}.org", "a".repeat(64)),
            &["abcdefghi"; 26].join("."),
        ] {
            assert!(NamePattern::parse(bad).is_err(), "{bad:?}");
        }
        // 253 characters is fine, 254 is not.
        let long = format!("{}.{}", vec!["a".repeat(63); 3].join("."), "b".repeat(61));
        assert_eq!(long.len(), 253);
        assert!(NamePattern::parse(&long).is_ok());
        assert!(NamePattern::parse(&format!("b{long}")).is_err());
        assert!(NamePattern::parse(&format!("*.{long}")).is_err());
    }

    #[test]
    fn exact_names_and_subdomain_wildcards_match() {
        let exact = NamePattern::parse("example.org").unwrap();
        assert!(exact.matches("example.org"));
        for no in [
            "www.example.org",
            "example.org.evil",
            "xexample.org",
            "org",
            "",
        ] {
            assert!(!exact.matches(no), "{no}");
        }
        let below = NamePattern::parse("*.example.org").unwrap();
        for yes in ["a.example.org", "a.b.example.org", "www.example.org"] {
            assert!(below.matches(yes), "{yes}");
        }
        for no in [
            "example.org",
            "xexample.org",
            "a.xexample.org",
            ".example.org",
            "a.example.org.evil",
        ] {
            assert!(!below.matches(no), "{no}");
        }
        let name = Name::from_ascii("WWW.Example.ORG.").unwrap();
        assert_eq!(normalise(&name), "www.example.org");
        assert!(below.matches(&normalise(&name)));
    }

    #[test]
    fn grants_follow_the_rule_s_protocols_and_ports() {
        let s: Ipv4Addr = "10.0.0.2".parse().unwrap();
        let d: Ipv4Addr = "192.0.2.1".parse().unwrap();
        let rule = DnsRule {
            pattern: NamePattern::parse("a.b").unwrap(),
            protos: vec![Proto::Tcp, Proto::Udp],
            ports: vec![],
        };
        assert_eq!(
            rule.grants(s, d)
                .iter()
                .map(|g| (g.proto, g.port))
                .collect::<Vec<_>>(),
            [(Proto::Tcp, None), (Proto::Udp, None)]
        );
        let rule = DnsRule {
            protos: vec![Proto::Tcp],
            ports: vec![80, 443],
            ..rule
        };
        assert_eq!(
            rule.grants(s, d)
                .iter()
                .map(|g| (g.proto, g.port))
                .collect::<Vec<_>>(),
            [(Proto::Tcp, Some(80)), (Proto::Tcp, Some(443))]
        );
    }

    fn record(name: &str, ttl: u32, data: RData) -> Record {
        Record::from_rdata(Name::from_ascii(name).unwrap(), ttl, data)
    }

    #[test]
    fn answers_are_followed_through_their_cname_chain() {
        let mut m = Message::response(1, OpCode::Query);
        m.add_query(Query::query(
            Name::from_ascii("www.example.org.").unwrap(),
            RecordType::A,
        ));
        m.add_answer(record(
            "www.example.org.",
            300,
            RData::CNAME(CNAME(Name::from_ascii("cdn.Example.net.").unwrap())),
        ));
        m.add_answer(record(
            "cdn.example.net.",
            60,
            RData::A(A("192.0.2.7".parse().unwrap())),
        ));
        // Not on the chain: ignored.
        m.add_answer(record(
            "other.example.org.",
            60,
            RData::A(A("192.0.2.8".parse().unwrap())),
        ));
        let bytes = m.to_vec().unwrap();
        let parsed = Message::from_vec(&bytes).unwrap();
        assert_eq!(
            resolved_addresses(&parsed, "www.example.org"),
            [("192.0.2.7".parse().unwrap(), 60)]
        );
        assert!(resolved_addresses(&parsed, "nothing.example.org").is_empty());
    }

    #[test]
    fn clients_open_each_grant_once_and_close_them_at_removal() {
        let c = DnsClients::default();
        let a: Ipv4Addr = "10.0.0.2".parse().unwrap();
        let g = DnsGrant {
            sandbox: a,
            dest: "192.0.2.1".parse().unwrap(),
            proto: Proto::Tcp,
            port: None,
        };
        // Unknown sandbox: nothing opened.
        assert!(!c.open(a, vec![g], 30, |_, _| panic!("not for an unknown sandbox")));
        c.set(
            a,
            vec![DnsRule {
                pattern: NamePattern::parse("a.b").unwrap(),
                protos: vec![Proto::Tcp],
                ports: vec![],
            }],
        );
        let mut applied = Vec::new();
        assert!(c.open(a, vec![g], 60, |t, s| {
            applied.push((t.to_vec(), s));
            true
        }));
        // Already open longer: not applied again; longer: applied.
        assert!(c.open(a, vec![g], 30, |_, _| panic!("already open")));
        assert!(c.open(a, vec![g], 90, |t, s| {
            applied.push((t.to_vec(), s));
            true
        }));
        assert_eq!(applied, [(vec![g], 60), (vec![g], 90)]);
        // A failed apply is not recorded.
        let g2 = DnsGrant { port: Some(1), ..g };
        assert!(!c.open(a, vec![g2], 30, |_, _| false));
        let mut revoked = Vec::new();
        c.remove(a, |gs| revoked.extend_from_slice(gs));
        assert_eq!(revoked, [g]);
        assert!(c.rules(a).is_none());
    }
}
