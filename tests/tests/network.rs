//! Networking (issue 5): egress through NAT, deny and allow rules, ingress, published ports, sandboxes
//! isolated from each other and from the host, leak-free churn, and a daemon `kill -9` that leaves the
//! sandboxes' networking intact.
//!
//! All traffic stays on this machine: the internet is an [`OutsideWorld`] (a network namespace behind a
//! veth, with HTTP servers and a DNS responder on 198.19.n.0/24), every daemon has its own bridge, subnet
//! and nftables table (see `sandbox_tests::net`).
//!
//! A blocked connection is often dropped, which gives no event: such checks give up after
//! [`BLOCKED_BOUND_SECS`] (see there) and always come with a positive check on the same path, and where
//! the outside world is the destination, with its log showing that nothing arrived.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use sandbox_tests::net::{
    address_of, free_tcp_port, gateway_of, host_global_addresses, http_get_host, http_get_within,
    ip, link_exists, links_with_prefix, net_namespace_mounts, net_namespaces_held_by,
    nft_element_counts, nft_table_state, nslookup, sh_within, start_httpd, tcp_connects,
    udp_roundtrip, wait_links_gone, wget_blocked, wget_ok, OutsideWorld, ALLOWED_NAME,
    BLOCKED_BOUND_SECS, DENIED_NAME, SUCCESS_BOUND_SECS,
};
use sandbox_tests::sandbox_proto::{
    CreateSandboxRequest, EgressRule, ErrorCode, ExposedPort, NetworkOptions, SandboxInfo,
    ServiceSpec,
};
use sandbox_tests::{busybox, create, expect_api_error, field_of, json, sh, Daemon};

fn blocked() -> Duration {
    Duration::from_secs(BLOCKED_BOUND_SECS.into())
}

/// An idle busybox sandbox named `name`.
fn idle(name: &str) -> CreateSandboxRequest {
    let mut r = busybox(None);
    r.name = Some(name.to_owned());
    r
}

/// An idle busybox sandbox with a network policy.
fn with_network(name: &str, network: NetworkOptions) -> CreateSandboxRequest {
    let mut r = idle(name);
    r.network = Some(network);
    r
}

/// An idle busybox sandbox with published ports.
fn with_services(name: &str, services: Vec<ServiceSpec>) -> CreateSandboxRequest {
    let mut r = idle(name);
    r.services = services;
    r
}

fn deny_egress() -> NetworkOptions {
    NetworkOptions {
        deny_egress: true,
        ..NetworkOptions::default()
    }
}

fn open_ingress() -> NetworkOptions {
    NetworkOptions {
        deny_ingress: false,
        ..NetworkOptions::default()
    }
}

fn service(port: u32) -> ServiceSpec {
    ServiceSpec {
        port,
        ..ServiceSpec::default()
    }
}

fn url(ip: Ipv4Addr, port: u16) -> String {
    format!("http://{ip}:{port}/")
}

/// The client address an outside-world HTTP answer names.
fn client_of(body: &str) -> &str {
    body.split_whitespace().next().unwrap_or_default()
}

/// The client field of an outside-world log line.
fn log_client(line: &str) -> &str {
    line.split_whitespace().nth(1).unwrap_or_default()
}

/// Asserts that `addr` is in the daemon's sandbox subnet and is neither the gateway nor the network.
#[track_caller]
fn assert_in_subnet(d: &Daemon, addr: Ipv4Addr) {
    let gw = d.network.gateway.expect("generated subnet");
    assert_eq!(
        addr.octets()[..3],
        gw.octets()[..3],
        "{addr} not in {}",
        d.network.subnet
    );
    assert!(
        addr != gw && addr.octets()[3] != 0 && addr.octets()[3] != 255,
        "{addr}"
    );
}

/// An outside world and a daemon resolving through it, with busybox imported. (Bound as `let (world, d)`, the
/// daemon is dropped first, then the world.)
fn world_and_daemon() -> (OutsideWorld, Daemon) {
    let world = OutsideWorld::start();
    let d = world.daemon(None);
    d.import_busybox();
    (world, d)
}

// ------------------------------------------------------------------------------------------ the fixture

/// A DNS query for an A record of `name` (id 0x5a5a, recursion desired).
fn dns_query(name: &str) -> Vec<u8> {
    let mut q = vec![0x5a, 0x5a, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

#[test]
fn the_outside_world_serves_the_host_and_leaves_nothing_behind() {
    let (netns, host_if);
    {
        let world = OutsideWorld::start();
        netns = world.netns.clone();
        host_if = world.host_if.clone();
        for (ip, port) in [(world.a, 8080), (world.a, 8081), (world.b, 8080)] {
            let body = http_get_host(SocketAddr::from((ip, port)), "/").expect("GET from the host");
            assert_eq!(body, format!("{} {ip}:{port}\n", world.host_addr));
        }
        let answer = udp_roundtrip(
            SocketAddr::from((world.dns, 53)),
            &dns_query(ALLOWED_NAME),
            Duration::from_secs(SUCCESS_BOUND_SECS.into()),
        )
        .expect("DNS answer");
        assert_eq!(answer[..2], [0x5a, 0x5a]);
        assert_eq!(answer[answer.len() - 4..], world.a.octets());
        let echo = udp_roundtrip(
            SocketAddr::from((world.a, 5353)),
            b"not dns",
            Duration::from_secs(SUCCESS_BOUND_SECS.into()),
        )
        .expect("UDP echo");
        assert_eq!(echo, b"not dns");
        // From inside the world: its own servers, and no route to a sandbox subnet.
        let body = world
            .http_get(
                SocketAddr::from((world.b, 8080)),
                Duration::from_secs(SUCCESS_BOUND_SECS.into()),
            )
            .expect("GET inside the world");
        assert_eq!(body, format!("{} {}:8080\n", world.b, world.b));
        let r = world.http_get(SocketAddr::from(([10, 213, 1, 2], 80)), blocked());
        assert_eq!(
            r.expect_err("no route").kind(),
            ErrorKind::NetworkUnreachable
        );
        let log = world.sync_log();
        assert_eq!(log.len(), 6, "{log:#?}");
        assert!(
            log[0].starts_with(&format!("http {} ", world.host_addr)),
            "{log:#?}"
        );
        assert!(
            log.iter()
                .any(|l| l.starts_with("dns ") && l.contains(ALLOWED_NAME)),
            "{log:#?}"
        );
    }
    assert!(!link_exists(&host_if), "{host_if} left");
    assert!(
        !std::path::Path::new("/run/netns").join(&netns).exists(),
        "{netns} left"
    );
}

// ------------------------------------------------------------------------------------------ egress

#[test]
fn egress_goes_out_through_nat_and_names_resolve_with_the_configured_dns() {
    let (world, d) = world_and_daemon();
    let c = d.client();
    let sb = create(&c, &idle("net-egress"));
    let addr = address_of(&sb);
    let gw = gateway_of(&sb);
    assert_in_subnet(&d, addr);
    assert_eq!(Some(gw), d.network.gateway, "{sb:?}");
    let info = sb.network.as_ref().expect("network");
    assert_eq!(info.mode, "bridge");
    assert_eq!(info.interface.as_deref(), Some("eth0"));
    assert_eq!(info.dns, world.dns_servers());
    assert!(
        info.policy.deny_ingress && !info.policy.deny_egress,
        "{info:?}"
    );
    if let Some(h) = &info.host_interface {
        assert!(h.starts_with(&d.network.veth_prefix), "{h}");
        assert!(links_with_prefix(h).contains(h), "{h} is not a host link");
    }

    // Inside: eth0 with the address, a default route through the gateway, resolv.conf and hosts.
    let eth0 = sh(&c, &sb.id, "ip -4 -o addr show dev eth0");
    assert!(eth0.contains(&format!("inet {addr}/24")), "{eth0}");
    let routes = sh(&c, &sb.id, "ip route");
    assert!(routes.contains(&format!("default via {gw}")), "{routes}");
    let resolv = sh(&c, &sb.id, "cat /etc/resolv.conf");
    assert!(
        resolv
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["nameserver", &world.dns.to_string()]),
        "{resolv}"
    );
    let hosts = sh(&c, &sb.id, "cat /etc/hosts");
    assert!(
        hosts.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.first() == Some(&addr.to_string().as_str()) && w.contains(&"net-egress")
        }),
        "{hosts}"
    );

    // HTTP out: the outside sees the host's address on its link (masquerade), never the sandbox's.
    let body = wget_ok(&c, &sb.id, &url(world.a, 8080));
    assert_eq!(client_of(&body), world.host_addr.to_string(), "{body}");
    let body = wget_ok(&c, &sb.id, &url(world.b, 8080));
    assert_eq!(client_of(&body), world.host_addr.to_string(), "{body}");

    // DNS through the configured resolver (UDP), then HTTP by name.
    let out = nslookup(&c, &sb.id, ALLOWED_NAME, None, SUCCESS_BOUND_SECS)
        .unwrap_or_else(|e| panic!("nslookup {ALLOWED_NAME}: {e}"));
    assert!(out.contains(&world.a.to_string()), "{out}");
    let body = wget_ok(&c, &sb.id, &format!("http://{ALLOWED_NAME}:8080/"));
    assert_eq!(client_of(&body), world.host_addr.to_string(), "{body}");
    // UDP to another server and port.
    let out = nslookup(
        &c,
        &sb.id,
        DENIED_NAME,
        Some(&format!("{}:5353", world.a)),
        SUCCESS_BOUND_SECS,
    )
    .unwrap_or_else(|e| panic!("nslookup via {}:5353: {e}", world.a));
    assert!(out.contains(&world.b.to_string()), "{out}");

    let log = world.sync_log();
    assert!(!log.is_empty());
    for l in &log {
        assert_eq!(
            log_client(l),
            world.host_addr.to_string(),
            "{l} (log {log:#?})"
        );
        assert!(!l.contains(&addr.to_string()), "{l}");
    }
    assert!(
        log.iter()
            .any(|l| l.starts_with("dns ") && l.contains(ALLOWED_NAME)),
        "{log:#?}"
    );
}

#[test]
fn deny_egress_blocks_everything_out_but_loopback_works() {
    let (world, d) = world_and_daemon();
    let c = d.client();
    let open = create(&c, &idle("net-open"));
    let closed = create(&c, &with_network("net-closed", deny_egress()));
    assert!(closed.network.as_ref().expect("network").policy.deny_egress);

    wget_blocked(&c, &closed.id, &url(world.a, 8080));
    wget_blocked(&c, &closed.id, &url(world.b, 8080));
    assert!(nslookup(&c, &closed.id, ALLOWED_NAME, None, BLOCKED_BOUND_SECS).is_err());
    let udp_server = format!("{}:5353", world.a);
    assert!(nslookup(
        &c,
        &closed.id,
        ALLOWED_NAME,
        Some(&udp_server),
        BLOCKED_BOUND_SECS
    )
    .is_err());
    // Nothing arrived outside; the open sandbox, on the same daemon, gets through.
    assert_eq!(world.sync_log(), Vec::<String>::new());
    let body = wget_ok(&c, &open.id, &url(world.a, 8080));
    assert_eq!(client_of(&body), world.host_addr.to_string());

    // Loopback inside the closed sandbox works.
    start_httpd(&c, &closed.id, 8000, "local");
    assert_eq!(wget_ok(&c, &closed.id, "http://127.0.0.1:8000/"), "local");

    // The CLI: `run --network none` cannot get out, the same run without it can.
    let target = url(world.a, 8080);
    let secs = BLOCKED_BOUND_SECS.to_string();
    let out = d.ctl(&[
        "run",
        "--rm",
        "--network",
        "none",
        "busybox",
        "--",
        "timeout",
        "-s",
        "KILL",
        &secs,
        "wget",
        "-q",
        "-O",
        "-",
        &target,
    ]);
    assert!(
        !out.status.success(),
        "run --network none got out: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let body = d.ctl_ok(&[
        "run", "--rm", "busybox", "--", "wget", "-q", "-O", "-", &target,
    ]);
    assert_eq!(client_of(&body), world.host_addr.to_string(), "{body}");
    let log = world.sync_log();
    assert_eq!(
        log.len(),
        2,
        "one request from `open`, one from the second run: {log:#?}"
    );
}

#[test]
fn an_allow_list_lets_only_its_destinations_through() {
    let (world, d) = world_and_daemon();
    let c = d.client();
    let rules = vec![
        EgressRule {
            cidr: Some(format!("{}/32", world.a)),
            ports: vec![8080],
            protocol: Some("tcp".into()),
            ..EgressRule::default()
        },
        EgressRule {
            cidr: Some(format!("198.19.{}.0/24", world.n)),
            ports: vec![5353],
            protocol: Some("udp".into()),
            ..EgressRule::default()
        },
    ];
    let sb = create(
        &c,
        &with_network(
            "net-allow",
            NetworkOptions {
                egress: rules,
                ..NetworkOptions::default()
            },
        ),
    );
    assert_eq!(
        sb.network.as_ref().expect("network").policy.egress.len(),
        2,
        "{sb:?}"
    );

    // In the list: A:8080/tcp and 198.19.n.0/24:5353/udp.
    let body = wget_ok(&c, &sb.id, &url(world.a, 8080));
    assert_eq!(client_of(&body), world.host_addr.to_string());
    let udp_server = format!("{}:5353", world.a);
    let out = nslookup(
        &c,
        &sb.id,
        ALLOWED_NAME,
        Some(&udp_server),
        SUCCESS_BOUND_SECS,
    )
    .unwrap_or_else(|e| panic!("UDP to {udp_server} is in the list: {e}"));
    assert!(out.contains(&world.a.to_string()), "{out}");
    // Not in the list: another port of A, the same port of B, UDP to another port (the resolver).
    wget_blocked(&c, &sb.id, &url(world.a, 8081));
    wget_blocked(&c, &sb.id, &url(world.b, 8080));
    assert!(nslookup(&c, &sb.id, ALLOWED_NAME, None, BLOCKED_BOUND_SECS).is_err());
    let log = world.sync_log();
    assert!(!log.iter().any(|l| l.contains(":8081 ")), "{log:#?}");
    assert!(
        !log.iter().any(|l| l.contains(&format!(" {}:", world.b))),
        "{log:#?}"
    );
    assert!(
        !log.iter()
            .any(|l| l.contains(&format!(" {}:53 ", world.dns))),
        "{log:#?}"
    );

    // The list is the sandbox's own: another sandbox of the daemon reaches A:8081.
    let other = create(&c, &idle("net-any"));
    wget_ok(&c, &other.id, &url(world.a, 8081));

    // The CLI's --egress-allow.
    let ok = format!("http://{}:8080/", world.a);
    let denied = format!("http://{}:8081/", world.a);
    let secs = BLOCKED_BOUND_SECS.to_string();
    let script = format!(
        "wget -q -O - {ok} && ! timeout -s KILL {secs} wget -q -O - {denied} && echo denied-as-expected"
    );
    let rule = format!("{}/32:8080/tcp", world.a);
    let out = d.ctl_ok(&[
        "run",
        "--rm",
        "--egress-allow",
        &rule,
        "busybox",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert!(out.contains("denied-as-expected"), "{out}");
}

/// An egress rule by DNS name.
fn dns_rule(name: &str, ports: Vec<u32>, protocol: Option<&str>) -> EgressRule {
    EgressRule {
        dns_name: Some(name.into()),
        ports,
        protocol: protocol.map(Into::into),
        ..EgressRule::default()
    }
}

/// The nameservers of a sandbox's resolv.conf.
fn nameservers(c: &sandbox_tests::sandbox_proto::client::BlockingClient, id: &str) -> Vec<String> {
    sh(c, id, "cat /etc/resolv.conf")
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .map(|a| a.trim().to_owned())
        .collect()
}

/// The response code of a DNS answer.
fn rcode(answer: &[u8]) -> u8 {
    answer[3] & 0x0f
}

/// Elements of the daemon's DNS timeout sets.
fn dns_elements(table: &str) -> usize {
    nft_element_counts(table)
        .into_iter()
        .filter(|(set, _)| set.starts_with("egress_dns"))
        .map(|(_, n)| n)
        .sum()
}

#[test]
fn a_dns_allow_list_opens_what_the_name_resolves_to_and_nothing_else() {
    let (world, d) = world_and_daemon();
    let c = d.client();
    let sb = create(
        &c,
        &with_network(
            "net-dns-allow",
            NetworkOptions {
                egress: vec![dns_rule(ALLOWED_NAME, vec![], None)],
                ..NetworkOptions::default()
            },
        ),
    );
    // Its resolver is the daemon's forwarder on the gateway.
    let gw = gateway_of(&sb);
    assert_eq!(
        sb.network.as_ref().expect("network").dns,
        [gw.to_string()],
        "{sb:?}"
    );
    assert_eq!(nameservers(&c, &sb.id), [gw.to_string()]);
    // Before it was resolved, A is not reachable.
    wget_blocked(&c, &sb.id, &url(world.a, 8080));
    assert_eq!(dns_elements(&d.network.nft_table), 0);
    let out = nslookup(&c, &sb.id, ALLOWED_NAME, None, SUCCESS_BOUND_SECS)
        .unwrap_or_else(|e| panic!("{ALLOWED_NAME} is allowed: {e}"));
    assert!(out.contains(&world.a.to_string()), "{out}");
    let body = wget_ok(&c, &sb.id, &format!("http://{ALLOWED_NAME}:8080/"));
    assert_eq!(client_of(&body), world.host_addr.to_string());
    // A rule without ports opens every port (tcp and udp) of the address.
    wget_ok(&c, &sb.id, &url(world.a, 8081));
    let udp_server = format!("{}:5353", world.a);
    nslookup(
        &c,
        &sb.id,
        DENIED_NAME,
        Some(&udp_server),
        SUCCESS_BOUND_SECS,
    )
    .unwrap_or_else(|e| panic!("udp to {udp_server}: {e}"));
    assert!(dns_elements(&d.network.nft_table) > 0);
    // By tcp too (busybox `nc` with a length-prefixed query): the answer ends with A's address.
    let q = dns_query(ALLOWED_NAME);
    let framed: String = (q.len() as u16)
        .to_be_bytes()
        .iter()
        .chain(&q)
        .map(|b| format!("\\{b:03o}"))
        .collect();
    let out = sh(
        &c,
        &sb.id,
        &format!(
            "printf '{framed}' | timeout -s KILL {SUCCESS_BOUND_SECS} nc {gw} 53 | od -An -tu1 -v"
        ),
    );
    let bytes: Vec<u8> = out
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(bytes.len() > 16, "{out}");
    assert_eq!(bytes[bytes.len() - 4..], world.a.octets(), "{out}");
    assert_eq!(bytes[2..4], [0x5a, 0x5a], "{out}");
    // The other name is refused and its address stays closed.
    assert!(nslookup(&c, &sb.id, DENIED_NAME, None, BLOCKED_BOUND_SECS).is_err());
    wget_blocked(&c, &sb.id, &format!("http://{DENIED_NAME}:8080/"));
    wget_blocked(&c, &sb.id, &url(world.b, 8080));
    // Direct DNS to the outside resolver (a tunnel around the list) is closed too.
    let direct = format!("{}:53", world.dns);
    assert!(nslookup(&c, &sb.id, ALLOWED_NAME, Some(&direct), BLOCKED_BOUND_SECS).is_err());
    let log = world.sync_log();
    assert!(
        !log.iter()
            .any(|l| l.contains(DENIED_NAME) && l.contains(&format!(" {}:53 ", world.dns))),
        "{log:#?}"
    );
    assert!(
        !log.iter().any(|l| l.contains(&format!(" {}:", world.b))),
        "{log:#?}"
    );
    // The resolver saw the forwarder's queries (from the host), never one from the sandbox itself.
    assert!(
        log.iter()
            .filter(|l| l.contains(&format!(" {}:53 ", world.dns)))
            .all(|l| log_client(l) == world.host_addr.to_string()),
        "{log:#?}"
    );

    // Removing the sandbox closes what its names opened.
    c.delete(&sb.id, true).expect("delete");
    assert_eq!(dns_elements(&d.network.nft_table), 0);
}

#[test]
fn dns_rules_keep_their_ports_and_wildcards_match_names_below() {
    let (world, d) = world_and_daemon();
    let c = d.client();
    // `*.test` (both names of the world) on tcp 8080 only, plus a cidr rule for A's udp 5353.
    let sb = create(
        &c,
        &with_network(
            "net-dns-ports",
            NetworkOptions {
                egress: vec![
                    dns_rule("*.TEST.", vec![8080], Some("tcp")),
                    EgressRule {
                        cidr: Some(format!("{}/32", world.a)),
                        ports: vec![5353],
                        protocol: Some("udp".into()),
                        ..EgressRule::default()
                    },
                ],
                ..NetworkOptions::default()
            },
        ),
    );
    // Recorded as matched: lower case, no final dot.
    assert_eq!(
        sb.network.as_ref().expect("network").policy.egress[0]
            .dns_name
            .as_deref(),
        Some("*.test")
    );
    for (name, addr) in [(ALLOWED_NAME, world.a), (DENIED_NAME, world.b)] {
        let out = nslookup(&c, &sb.id, name, None, SUCCESS_BOUND_SECS)
            .unwrap_or_else(|e| panic!("{name} is below *.test: {e}"));
        assert!(out.contains(&addr.to_string()), "{out}");
        wget_ok(&c, &sb.id, &format!("http://{name}:8080/"));
        // Another port of the same address stays closed.
        wget_blocked(&c, &sb.id, &url(addr, 8081));
    }
    // The name `test` itself is not below `*.test`; the cidr rule works next to the names.
    assert!(nslookup(&c, &sb.id, "test", None, BLOCKED_BOUND_SECS).is_err());
    nslookup(
        &c,
        &sb.id,
        ALLOWED_NAME,
        Some(&format!("{}:5353", world.a)),
        SUCCESS_BOUND_SECS,
    )
    .expect("udp to A:5353 is in the cidr rule");
    let log = world.sync_log();
    assert!(!log.iter().any(|l| l.contains(":8081 ")), "{log:#?}");
}

#[test]
fn after_a_daemon_restart_dns_rule_sandboxes_resolve_again() {
    let world = OutsideWorld::start();
    let mut d = world.daemon(None);
    d.import_busybox();
    let c = d.client();
    let sb = create(
        &c,
        &with_network(
            "net-dns-restart",
            NetworkOptions {
                egress: vec![dns_rule(ALLOWED_NAME, vec![8080], Some("tcp"))],
                ..NetworkOptions::default()
            },
        ),
    );
    nslookup(&c, &sb.id, ALLOWED_NAME, None, SUCCESS_BOUND_SECS).expect("allowed");
    wget_ok(&c, &sb.id, &url(world.a, 8080));
    d.kill9();
    d.restart();
    let c = d.client();
    // The table was replaced: what the name opened is closed until the sandbox resolves it again.
    assert_eq!(dns_elements(&d.network.nft_table), 0);
    wget_blocked(&c, &sb.id, &url(world.a, 8080));
    assert!(nslookup(&c, &sb.id, DENIED_NAME, None, BLOCKED_BOUND_SECS).is_err());
    let out = nslookup(&c, &sb.id, ALLOWED_NAME, None, SUCCESS_BOUND_SECS)
        .unwrap_or_else(|e| panic!("the restarted forwarder serves the recovered sandbox: {e}"));
    assert!(out.contains(&world.a.to_string()), "{out}");
    wget_ok(&c, &sb.id, &url(world.a, 8080));
    wget_blocked(&c, &sb.id, &url(world.b, 8080));
}

#[test]
fn sandboxes_without_dns_rules_get_nothing_from_the_forwarder() {
    let (world, d) = world_and_daemon();
    let c = d.client();
    let open = create(&c, &idle("net-dns-open"));
    let cidr_only = create(
        &c,
        &with_network(
            "net-dns-cidr",
            NetworkOptions {
                egress: vec![EgressRule {
                    cidr: Some(format!("{}/32", world.dns)),
                    ports: vec![53],
                    protocol: Some("udp".into()),
                    ..EgressRule::default()
                }],
                ..NetworkOptions::default()
            },
        ),
    );
    let gw = gateway_of(&open);
    let forwarder = gw.to_string();
    for sb in [&open, &cidr_only] {
        // They keep the upstream resolver, and resolve through it as before.
        assert_eq!(nameservers(&c, &sb.id), world.dns_servers());
        let out = nslookup(&c, &sb.id, ALLOWED_NAME, None, SUCCESS_BOUND_SECS)
            .unwrap_or_else(|e| panic!("{}: {e}", sb.id));
        assert!(out.contains(&world.a.to_string()), "{out}");
        // The forwarder answers them REFUSED.
        let r = nslookup(
            &c,
            &sb.id,
            ALLOWED_NAME,
            Some(&forwarder),
            SUCCESS_BOUND_SECS,
        )
        .expect_err("the forwarder refuses sandboxes without dns_name rules");
        assert!(r.contains("REFUSED"), "{r}");
    }
    // The cidr-only sandbox gained nothing: A stays closed although its name was resolved.
    wget_blocked(&c, &cidr_only.id, &url(world.a, 8080));
    assert_eq!(dns_elements(&d.network.nft_table), 0);
    wget_ok(&c, &open.id, &url(world.a, 8080));

    // From the host (not a sandbox): REFUSED by udp and by tcp; garbage gets FORMERR or nothing.
    let at = SocketAddr::from((gw, 53));
    let bound = Duration::from_secs(SUCCESS_BOUND_SECS.into());
    let answer = udp_roundtrip(at, &dns_query(ALLOWED_NAME), bound).expect("udp answer");
    assert_eq!(
        (answer[..2].to_vec(), rcode(&answer)),
        (vec![0x5a, 0x5a], 5)
    );
    let mut garbage = dns_query(ALLOWED_NAME);
    garbage.truncate(15);
    let answer = udp_roundtrip(at, &garbage, bound).expect("udp answer");
    assert_eq!(rcode(&answer), 1, "FORMERR");
    let mut conn = TcpStream::connect_timeout(&at, bound).expect("tcp to the forwarder");
    conn.set_read_timeout(Some(bound)).expect("timeout");
    let q = dns_query(ALLOWED_NAME);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    std::io::Write::write_all(&mut conn, &framed).expect("write");
    let mut len = [0u8; 2];
    std::io::Read::read_exact(&mut conn, &mut len).expect("length");
    let mut answer = vec![0u8; u16::from_be_bytes(len).into()];
    std::io::Read::read_exact(&mut conn, &mut answer).expect("answer");
    assert_eq!(
        (answer[..2].to_vec(), rcode(&answer)),
        (vec![0x5a, 0x5a], 5)
    );
}

#[test]
fn link_local_metadata_addresses_are_blocked() {
    let (world, d) = world_and_daemon();
    let c = d.client();
    // 169.254.169.254 from this daemon's sandboxes is routed to the outside world's stand-in (never
    // off the machine), so a missing block would show there.
    world.route_metadata_from(&d.network.subnet);
    let sb = create(&c, &idle("net-metadata"));
    let addr = address_of(&sb);
    let route = ip(&[
        "route",
        "get",
        &world.metadata.to_string(),
        "from",
        &addr.to_string(),
        "iif",
        &d.network.bridge,
    ]);
    assert!(
        route.contains(&world.host_if),
        "the stand-in is not where the sandbox's packets would go: {route}"
    );

    wget_blocked(&c, &sb.id, &url(world.metadata, 80));
    assert!(!tcp_connects(
        &c,
        &sb.id,
        world.metadata,
        80,
        BLOCKED_BOUND_SECS
    ));
    assert_eq!(world.requests_to(world.metadata, 80), Vec::<String>::new());
    // The sandbox does get out otherwise.
    wget_ok(&c, &sb.id, &url(world.a, 8080));
}

#[test]
fn running_sandboxes_keep_their_gateway_while_others_come_and_go() {
    let (world, d) = world_and_daemon();
    let c = d.client();
    let steady = create(&c, &idle("net-steady"));
    let gw = gateway_of(&steady);
    // After some traffic the sandbox's neighbour cache holds the gateway's (the bridge's) MAC.
    wget_ok(&c, &steady.id, &url(world.a, 8080));
    let bridge = std::path::Path::new("/sys/class/net").join(&d.network.bridge);
    let read = |f: &str| {
        std::fs::read_to_string(bridge.join(f))
            .unwrap_or_else(|e| panic!("{}/{f}: {e}", bridge.display()))
            .trim()
            .to_owned()
    };
    let mac = read("address");
    let neigh = sh(&c, &steady.id, &format!("ip neigh show {gw}"));
    assert!(
        neigh.contains(&mac),
        "gateway {gw} at {mac}, the sandbox has: {neigh}"
    );
    // A bridge whose MAC was not set takes the lowest MAC of its ports, so it would change as veths
    // join and leave, and running sandboxes would send to a MAC the bridge no longer has until their
    // neighbour entry expires. The daemon sets the bridge's MAC (addr_assign_type 3, NET_ADDR_SET).
    assert_eq!(
        read("addr_assign_type"),
        "3",
        "the bridge's MAC follows its ports"
    );
    for _ in 0..20 {
        let sb = create(&c, &busybox(None));
        c.delete(&sb.id, true).expect("delete");
    }
    assert_eq!(
        read("address"),
        mac,
        "the bridge's MAC changed with its ports"
    );
    let body = wget_ok(&c, &steady.id, &url(world.a, 8080));
    assert_eq!(client_of(&body), world.host_addr.to_string());
}

// ------------------------------------------------------------------------------------------ ingress

#[test]
fn ingress_is_denied_by_default_and_open_with_deny_ingress_false() {
    let (world, d) = world_and_daemon();
    let c = d.client();
    // The world can address sandboxes directly: only the firewall keeps it out.
    world.route_to(&d.network.subnet);
    let closed = create(&c, &idle("net-in-closed"));
    let open = create(&c, &with_network("net-in-open", open_ingress()));
    assert!(!open.network.as_ref().expect("network").policy.deny_ingress);
    start_httpd(&c, &closed.id, 8000, "closed");
    start_httpd(&c, &open.id, 8000, "open");
    // Both servers answer inside.
    assert_eq!(wget_ok(&c, &closed.id, "http://127.0.0.1:8000/"), "closed");
    assert_eq!(wget_ok(&c, &open.id, "http://127.0.0.1:8000/"), "open");

    let closed_at = SocketAddr::from((address_of(&closed), 8000));
    let open_at = SocketAddr::from((address_of(&open), 8000));
    // From the host.
    let r = http_get_within(closed_at, "/", blocked());
    assert!(r.is_err(), "the host reached {closed_at}: {r:?}");
    assert_eq!(
        http_get_host(open_at, "/").expect("host to the open sandbox"),
        "open"
    );
    // From the outside world.
    let r = world.http_get(closed_at, blocked());
    assert!(r.is_err(), "the outside reached {closed_at}: {r:?}");
    let r = world.http_get(open_at, Duration::from_secs(SUCCESS_BOUND_SECS.into()));
    assert_eq!(r.expect("outside to the open sandbox"), "open");

    // The CLI's --allow-ingress.
    let id = d.ctl_ok(&[
        "run",
        "-d",
        "--allow-ingress",
        "--name",
        "net-in-cli",
        "busybox",
    ]);
    let info = c.get(id.trim()).expect("get");
    assert!(
        !info.network.as_ref().expect("network").policy.deny_ingress,
        "{info:?}"
    );
    start_httpd(&c, &info.id, 8000, "cli");
    let at = SocketAddr::from((address_of(&info), 8000));
    assert_eq!(
        http_get_host(at, "/").expect("host to --allow-ingress"),
        "cli"
    );
}

// ------------------------------------------------------------------------------------------ published ports

/// Asserts the one exposed port of `info` and returns it.
#[track_caller]
fn one_exposed(info: &SandboxInfo, port: u16, protocol: &str) -> ExposedPort {
    let p = info
        .exposed_ports
        .iter()
        .find(|p| p.port == port && p.protocol == protocol)
        .unwrap_or_else(|| panic!("no {port}/{protocol} in {:?}", info.exposed_ports))
        .clone();
    assert_eq!(p.host_ip, "127.0.0.1", "{p:?}");
    assert_ne!(p.host_port, 0, "{p:?}");
    p
}

#[test]
fn a_published_tcp_port_is_reachable_from_the_host_and_released_at_removal() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create(&c, &with_services("net-pub", vec![service(8000)]));
    assert_eq!(sb.exposed_ports.len(), 1, "{sb:?}");
    let p = one_exposed(&sb, 8000, "tcp");
    assert_eq!(c.get(&sb.id).expect("get").exposed_ports, sb.exposed_ports);
    start_httpd(&c, &sb.id, 8000, "published");
    let host = SocketAddr::from((Ipv4Addr::LOCALHOST, p.host_port));
    assert_eq!(
        http_get_host(host, "/").expect("published port"),
        "published"
    );
    // Only through the published port: the sandbox's own address is closed (ingress denied).
    let direct = SocketAddr::from((address_of(&sb), 8000));
    assert!(
        http_get_within(direct, "/", blocked()).is_err(),
        "{direct} reachable"
    );

    // A host port asked for.
    let want = free_tcp_port();
    let mut svc = service(8000);
    svc.host_port = Some(want.into());
    let sb2 = create(&c, &with_services("net-pub2", vec![svc]));
    assert_eq!(one_exposed(&sb2, 8000, "tcp").host_port, want);
    start_httpd(&c, &sb2.id, 8000, "second");
    let host2 = SocketAddr::from((Ipv4Addr::LOCALHOST, want));
    assert_eq!(http_get_host(host2, "/").expect("published port"), "second");
    // Held while published (another program cannot take it), free again once the sandbox is gone.
    let e = TcpListener::bind(host2).expect_err("the published port is held");
    assert_eq!(e.kind(), ErrorKind::AddrInUse, "{e}");
    c.delete(&sb2.id, true).expect("delete");
    TcpListener::bind(host2).expect("the host port is free after removal");
    assert!(http_get_within(host2, "/", blocked()).is_err());
    // The first one is unaffected.
    assert_eq!(
        http_get_host(host, "/").expect("published port"),
        "published"
    );
}

#[test]
fn a_port_published_on_every_address_is_reachable_from_outside_the_host() {
    let world = OutsideWorld::start();
    let d = world.daemon(None);
    d.import_busybox();
    let c = d.client();
    let mut svc = service(8000);
    svc.host_ip = Some("0.0.0.0".into());
    let sb = create(&c, &with_services("net-pub-all", vec![svc]));
    let [p] = sb.exposed_ports.as_slice() else {
        panic!("{sb:?}")
    };
    assert_eq!((p.port, p.host_ip.as_str()), (8000, "0.0.0.0"));
    start_httpd(&c, &sb.id, 8000, "everywhere");
    // From the host, on loopback and on another of its addresses.
    for ip in [Ipv4Addr::LOCALHOST, world.host_addr] {
        let at = SocketAddr::from((ip, p.host_port));
        assert_eq!(
            http_get_host(at, "/").expect("published port"),
            "everywhere"
        );
    }
    // From another machine (the outside world's namespace) through the host's address on its link.
    let fetch = "import sys, urllib.request; \
                 print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode(), end='')";
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &world.netns, "python3", "-c", fetch])
        .arg(format!("http://{}:{}/", world.host_addr, p.host_port))
        .output()
        .expect("running python3 in the outside world");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "everywhere");
    // The port is taken on every address: a second sandbox cannot publish it on one of them.
    let mut clash = service(8000);
    clash.host_port = Some(p.host_port.into());
    let e = expect_api_error(
        c.create(&with_services("net-pub-clash", vec![clash])),
        ErrorCode::PortInUse,
        409,
    );
    assert_eq!(field_of(&e), "services[0].host_port");
    c.delete(&sb.id, true).expect("delete");
    assert!(http_get_within(
        SocketAddr::from((world.host_addr, p.host_port)),
        "/",
        blocked()
    )
    .is_err());
}

#[test]
fn published_udp_and_tcp_ports_of_a_python_sandbox() {
    let d = Daemon::start_mirrored("");
    let c = d.client();
    let mut req = CreateSandboxRequest {
        image: "python:3.11".into(),
        name: Some("net-py".into()),
        ..CreateSandboxRequest::default()
    };
    req.services = vec![
        ServiceSpec {
            port: 8000,
            protocol: Some("udp".into()),
            ..ServiceSpec::default()
        },
        service(8001),
    ];
    let sb = create(&c, &req);
    let udp = one_exposed(&sb, 8000, "udp");
    let tcp = one_exposed(&sb, 8001, "tcp");
    // Servers that bind, then put themselves in the background: listening when the exec returns.
    let script = r#"
import http.server, os, socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", 8000))
os.chdir("/tmp")
with open("index.html", "w") as f:
    f.write("from python")
h = http.server.HTTPServer(("0.0.0.0", 8001), http.server.SimpleHTTPRequestHandler)
if os.fork():
    os._exit(0)
os.setsid()
if os.fork() == 0:
    h.serve_forever()
while True:
    data, peer = u.recvfrom(2048)
    u.sendto(b"echo:" + data, peer)
"#;
    let (code, out, err) = sh_within(
        &c,
        &sb.id,
        SUCCESS_BOUND_SECS,
        &format!("python3 -c '{script}' </dev/null >/dev/null 2>&1"),
    );
    assert_eq!(code, 0, "{out} {err}");
    let answer = udp_roundtrip(
        SocketAddr::from((Ipv4Addr::LOCALHOST, udp.host_port)),
        b"ping",
        Duration::from_secs(SUCCESS_BOUND_SECS.into()),
    )
    .expect("UDP through the published port");
    assert_eq!(answer, b"echo:ping");
    let body = http_get_host(SocketAddr::from((Ipv4Addr::LOCALHOST, tcp.host_port)), "/")
        .expect("TCP through the published port");
    assert_eq!(body, "from python");
    // A UDP port is held as such while published.
    let e = UdpSocket::bind(("127.0.0.1", udp.host_port)).expect_err("held");
    assert_eq!(e.kind(), ErrorKind::AddrInUse, "{e}");
}

#[test]
fn sandboxctl_run_publishes_ports_and_inspect_shows_them() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let port = free_tcp_port();
    let uport = free_tcp_port();
    let id = d
        .ctl_ok(&[
            "run",
            "-d",
            "--name",
            "net-cli",
            "-p",
            &format!("127.0.0.1:{port}:8000"),
            "-p",
            &format!("{uport}:8001/udp"),
            "busybox",
        ])
        .trim()
        .to_owned();
    start_httpd(&c, &id, 8000, "cli");
    let body = http_get_host(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), "/")
        .expect("the port published by sandboxctl run -p");
    assert_eq!(body, "cli");
    let info = json(d.ctl_ok(&["inspect", "net-cli"]).as_bytes());
    let address: Ipv4Addr = info["network"]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("inspect shows no address: {info}"))
        .parse()
        .expect("an IPv4 address");
    assert_in_subnet(&d, address);
    let ports = info["exposed_ports"].as_array().expect("exposed_ports");
    let want_tcp = serde_json::json!({"port": 8000, "protocol": "tcp", "host_ip": "127.0.0.1", "host_port": port});
    let want_udp = serde_json::json!({"port": 8001, "protocol": "udp", "host_ip": "127.0.0.1", "host_port": uport});
    assert!(ports.contains(&want_tcp), "{info}");
    assert!(ports.contains(&want_udp), "{info}");
}

// ------------------------------------------------------------------------------------------ isolation

#[test]
fn sandboxes_cannot_reach_each_other() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    // Both accept connections from the host: only sandbox-to-sandbox isolation is left between them.
    let a = create(&c, &with_network("net-a", open_ingress()));
    let b = create(&c, &with_network("net-b", open_ingress()));
    let closed = create(&c, &idle("net-c"));
    for (sb, body) in [(&a, "a"), (&b, "b"), (&closed, "c")] {
        start_httpd(&c, &sb.id, 8000, body);
    }
    let (a_addr, b_addr, c_addr) = (address_of(&a), address_of(&b), address_of(&closed));
    assert!(a_addr != b_addr && b_addr != c_addr && a_addr != c_addr);
    assert_eq!(
        http_get_host(SocketAddr::from((a_addr, 8000)), "/").expect("host to a"),
        "a"
    );
    assert_eq!(
        http_get_host(SocketAddr::from((b_addr, 8000)), "/").expect("host to b"),
        "b"
    );

    wget_blocked(&c, &a.id, &url(b_addr, 8000));
    wget_blocked(&c, &b.id, &url(a_addr, 8000));
    wget_blocked(&c, &closed.id, &url(a_addr, 8000));
    wget_blocked(&c, &a.id, &url(c_addr, 8000));
    assert!(!tcp_connects(&c, &a.id, b_addr, 8000, BLOCKED_BOUND_SECS));
    // Each reaches its own address.
    assert_eq!(wget_ok(&c, &a.id, &url(a_addr, 8000)), "a");
}

/// An idle busybox sandbox in session `session` (the annotation a client's Session sets), opted in to its
/// session's peers or not.
fn in_session(name: &str, session: &str, session_peers: bool) -> CreateSandboxRequest {
    let mut r = with_network(
        name,
        NetworkOptions {
            session_peers,
            ..NetworkOptions::default()
        },
    );
    r.annotations
        .insert("sandboxd.session".to_owned(), session.to_owned());
    r
}

fn peer_pairs(table: &str) -> usize {
    nft_element_counts(table)
        .into_iter()
        .filter(|(set, _)| set == "session_peers")
        .map(|(_, n)| n)
        .sum()
}

#[test]
fn session_peers_reach_each_other_and_no_one_else() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let table = d.network.nft_table.clone();
    let a = create(&c, &in_session("peer-a", "s1", true));
    // A peer's own policy does not matter between peers: b may not leave the host, nor accept the host.
    let mut req_b = in_session("peer-b", "s1", true);
    req_b.network.as_mut().unwrap().deny_egress = true;
    let b = create(&c, &req_b);
    let same_session_not_opted_in = create(&c, &in_session("peer-c", "s1", false));
    let other_session = create(&c, &in_session("peer-d", "s2", true));
    let all = [&a, &b, &same_session_not_opted_in, &other_session];
    for (sb, body) in all.iter().zip(["a", "b", "c", "d"]) {
        start_httpd(&c, &sb.id, 8000, body);
    }
    let [a_addr, b_addr, c_addr, d_addr] = all.map(address_of);
    assert_eq!(peer_pairs(&table), 2, "a <-> b only");

    assert_eq!(wget_ok(&c, &a.id, &url(b_addr, 8000)), "b");
    assert_eq!(wget_ok(&c, &b.id, &url(a_addr, 8000)), "a");
    for (from, to) in [
        (&a, c_addr),
        (&same_session_not_opted_in, a_addr),
        (&other_session, a_addr),
        (&a, d_addr),
        (&b, d_addr),
    ] {
        wget_blocked(&c, &from.id, &url(to, 8000));
    }

    // A peer that leaves takes its pairs along; one that joins gets pairs with the members present.
    c.delete(&b.id, true).expect("delete b");
    assert_eq!(peer_pairs(&table), 0);
    let e = create(&c, &in_session("peer-e", "s1", true));
    start_httpd(&c, &e.id, 8000, "e");
    assert_eq!(peer_pairs(&table), 2);
    assert_eq!(wget_ok(&c, &e.id, &url(a_addr, 8000)), "a");
    assert_eq!(wget_ok(&c, &a.id, &url(address_of(&e), 8000)), "e");
    wget_blocked(&c, &e.id, &url(c_addr, 8000));

    // The opt-in needs a session.
    let mut lone = with_network(
        "peer-lone",
        NetworkOptions {
            session_peers: true,
            ..NetworkOptions::default()
        },
    );
    let err = expect_api_error(c.create(&lone), ErrorCode::InvalidArgument, 400);
    assert_eq!(field_of(&err), "network.session_peers");
    lone.annotations
        .insert("sandboxd.session".to_owned(), String::new());
    let err = expect_api_error(c.create(&lone), ErrorCode::InvalidArgument, 400);
    assert_eq!(field_of(&err), "network.session_peers");
    for sb in [&a, &same_session_not_opted_in, &other_session, &e] {
        c.delete(&sb.id, true).expect("delete");
    }
    assert_eq!(peer_pairs(&table), 0);
}

fn address6_of(info: &SandboxInfo) -> Ipv6Addr {
    info.network
        .as_ref()
        .and_then(|n| n.address6.as_deref())
        .unwrap_or_else(|| panic!("no IPv6 address in {info:?}"))
        .parse()
        .expect("an IPv6 address")
}

fn url6(ip: Ipv6Addr, port: u16) -> String {
    format!("http://[{ip}]:{port}/")
}

#[test]
fn ipv6_where_configured_egress_through_nat_ingress_and_isolation() {
    let world = OutsideWorld::start();
    let d = world.daemon6();
    d.import_busybox();
    let c = d.client();
    let (_, gateway6) = d.network.subnet6.clone().expect("an IPv6 subnet");
    let open = create(&c, &with_network("v6-open", open_ingress()));
    let closed = create(&c, &idle("v6-closed"));
    let denied = create(&c, &with_network("v6-deny", deny_egress()));
    let allow_list = create(
        &c,
        &with_network(
            "v6-allow",
            NetworkOptions {
                egress: vec![EgressRule {
                    cidr: Some("0.0.0.0/0".into()),
                    ..EgressRule::default()
                }],
                ..NetworkOptions::default()
            },
        ),
    );
    let (open6, closed6) = (address6_of(&open), address6_of(&closed));
    let net = open.network.as_ref().unwrap();
    assert_eq!(net.gateway6.as_deref(), Some(gateway6.to_string().as_str()));
    // The address is a /128 on eth0 and the gateway the default route.
    let out = sh(
        &c,
        &open.id,
        "ip -6 addr show dev eth0 scope global; ip -6 route show default",
    );
    assert!(out.contains(&format!("inet6 {open6}/128")), "{out}");
    assert!(
        out.contains(&format!("default via {gateway6} dev eth0")),
        "{out}"
    );

    // Egress through NAT: the outside sees the host's address.
    let body = wget_ok(&c, &open.id, &url6(world.a6, 8080));
    assert!(
        body.starts_with(&format!("{} ", world.host_addr6)),
        "{body}"
    );
    // Denied and allow-listed (IPv4 rules) sandboxes reach no IPv6 destination; IPv4 still works for the
    // allow-list.
    wget_blocked(&c, &denied.id, &url6(world.a6, 8080));
    wget_blocked(&c, &allow_list.id, &url6(world.a6, 8080));
    assert!(
        wget_ok(&c, &allow_list.id, &url(world.a, 8080)).starts_with(&world.host_addr.to_string())
    );

    // Ingress from the host: only to the sandbox that opened it.
    for sb in [&open, &closed] {
        start_httpd(&c, &sb.id, 8000, &sb.name);
    }
    assert_eq!(
        http_get_host(SocketAddr::from((open6, 8000)), "/").expect("host to open over IPv6"),
        "v6-open"
    );
    assert!(http_get_within(SocketAddr::from((closed6, 8000)), "/", blocked()).is_err());
    // Sandbox to sandbox: rejected, also towards one that accepts the host.
    wget_blocked(&c, &closed.id, &url6(open6, 8000));
    // The host's own IPv6 addresses: unreachable (a listener on all of them never sees the sandbox).
    let listener = TcpListener::bind("[::]:0").expect("IPv6 listener");
    let port = listener.local_addr().expect("local addr").port();
    for target in [gateway6, world.host_addr6] {
        let (code, _, _) = sh_within(
            &c,
            &open.id,
            BLOCKED_BOUND_SECS,
            &format!("nc {target} {port} -e true"),
        );
        assert_ne!(
            code, 0,
            "the sandbox connected to the host's [{target}]:{port}"
        );
    }
    listener.set_nonblocking(true).expect("nonblocking");
    assert!(matches!(listener.accept(), Err(e) if e.kind() == ErrorKind::WouldBlock));
}

#[test]
fn host_addresses_are_unreachable_from_sandboxes() {
    let (world, d) = world_and_daemon();
    let c = d.client();
    let sb = create(&c, &idle("net-host"));
    let addr = address_of(&sb);
    let listener = TcpListener::bind("0.0.0.0:0").expect("listener");
    let port = listener.local_addr().expect("local addr").port();
    let mut targets = vec![gateway_of(&sb), world.host_addr];
    targets.extend(host_global_addresses());
    for t in &targets {
        assert!(
            !tcp_connects(&c, &sb.id, *t, port, BLOCKED_BOUND_SECS),
            "the sandbox connected to the host's {t}:{port}"
        );
    }
    // The host itself reaches every one of them (the listener is there), and the listener never saw the
    // sandbox.
    for t in &targets {
        TcpStream::connect_timeout(
            &SocketAddr::from((*t, port)),
            Duration::from_secs(SUCCESS_BOUND_SECS.into()),
        )
        .unwrap_or_else(|e| panic!("the host cannot connect to its own {t}:{port}: {e}"));
    }
    listener.set_nonblocking(true).expect("nonblocking");
    let mut peers = Vec::new();
    loop {
        match listener.accept() {
            Ok((_, peer)) => peers.push(peer.ip()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("accept: {e}"),
        }
    }
    assert_eq!(peers.len(), targets.len(), "{peers:?}");
    assert!(!peers.contains(&std::net::IpAddr::V4(addr)), "{peers:?}");
    // Egress past the host still works.
    wget_ok(&c, &sb.id, &url(world.a, 8080));
}

// ------------------------------------------------------------------------------------------ bad input

#[test]
fn bad_network_input_is_refused_with_nothing_half_created() {
    let d = Daemon::start_with_config(Some("warm_pool = 0\n"));
    d.import_busybox();
    let c = d.client();
    let prefix = d.network.veth_prefix.clone();
    let table = d.network.nft_table.clone();
    let before = nft_table_state(&table).expect("the daemon's table exists once it runs");
    let nothing_left = |what: &str| {
        assert!(
            c.list(&[], None).expect("list").sandboxes.is_empty(),
            "{what}: a sandbox left"
        );
        assert_eq!(
            wait_links_gone(&prefix),
            Vec::<String>::new(),
            "{what}: veths left"
        );
        assert_eq!(
            nft_table_state(&table).as_ref(),
            Some(&before),
            "{what}: nftables state changed"
        );
        d.assert_only_sandboxes(&[]);
    };
    let egress = |rules: Vec<EgressRule>| NetworkOptions {
        egress: rules,
        ..NetworkOptions::default()
    };
    let cidr = |c: &str| EgressRule {
        cidr: Some(c.into()),
        ..EgressRule::default()
    };
    let ok_rule = cidr("198.18.0.0/15");
    let cases: Vec<(&str, CreateSandboxRequest, &str)> = vec![
        (
            "bad octet",
            with_network("x", egress(vec![cidr("10.0.0.300/8")])),
            "network.egress[0].cidr",
        ),
        (
            "not a cidr",
            with_network("x", egress(vec![cidr("example")])),
            "network.egress[0].cidr",
        ),
        (
            "prefix 33",
            with_network("x", egress(vec![cidr("10.0.0.0/33")])),
            "network.egress[0].cidr",
        ),
        (
            "icmp",
            with_network(
                "x",
                egress(vec![
                    ok_rule.clone(),
                    EgressRule {
                        protocol: Some("icmp".into()),
                        ..cidr("10.0.0.0/8")
                    },
                ]),
            ),
            "network.egress[1].protocol",
        ),
        (
            "sctp",
            with_network(
                "x",
                egress(vec![EgressRule {
                    protocol: Some("sctp".into()),
                    ..cidr("10.0.0.0/8")
                }]),
            ),
            "network.egress[0].protocol",
        ),
        (
            "egress port 0",
            with_network(
                "x",
                egress(vec![EgressRule {
                    ports: vec![0],
                    ..cidr("10.0.0.0/8")
                }]),
            ),
            "network.egress[0].ports",
        ),
        (
            "egress port 70000",
            with_network(
                "x",
                egress(vec![EgressRule {
                    ports: vec![80, 70000],
                    ..cidr("10.0.0.0/8")
                }]),
            ),
            "network.egress[0].ports",
        ),
        (
            "dns name with a space",
            with_network("x", egress(vec![dns_rule("a b.org", vec![], None)])),
            "network.egress[0].dns_name",
        ),
        (
            "dns name with a wildcard inside",
            with_network(
                "x",
                egress(vec![ok_rule.clone(), dns_rule("a.*.org", vec![], None)]),
            ),
            "network.egress[1].dns_name",
        ),
        (
            "dns name too long",
            with_network(
                "x",
                egress(vec![dns_rule(&["abcdefghi"; 26].join("."), vec![], None)]),
            ),
            "network.egress[0].dns_name",
        ),
        (
            "65 dns names",
            with_network(
                "x",
                egress(
                    (0..65)
                        .map(|i| dns_rule(&format!("n{i}.example.org"), vec![], None))
                        .collect(),
                ),
            ),
            "network.egress[64].dns_name",
        ),
        (
            "cidr and dns name in one rule",
            with_network(
                "x",
                egress(vec![EgressRule {
                    cidr: Some("10.0.0.0/8".into()),
                    ..dns_rule("example.org", vec![], None)
                }]),
            ),
            "network.egress[0]",
        ),
        (
            "rule with no destination",
            with_network("x", egress(vec![EgressRule::default()])),
            "network.egress[0]",
        ),
        (
            "service port 0",
            with_services("x", vec![service(0)]),
            "services[0].port",
        ),
        (
            "service port 70000",
            with_services("x", vec![service(8000), service(70000)]),
            "services[1].port",
        ),
        (
            "host port 70000",
            with_services(
                "x",
                vec![ServiceSpec {
                    host_port: Some(70000),
                    ..service(8000)
                }],
            ),
            "services[0].host_port",
        ),
        (
            "service protocol",
            with_services(
                "x",
                vec![ServiceSpec {
                    protocol: Some("sctp".into()),
                    ..service(8000)
                }],
            ),
            "services[0].protocol",
        ),
        (
            "host ip",
            with_services(
                "x",
                vec![ServiceSpec {
                    host_ip: Some("localhost:80".into()),
                    ..service(8000)
                }],
            ),
            "services[0].host_ip",
        ),
    ];
    for (what, req, field) in cases {
        let e = expect_api_error(c.create(&req), ErrorCode::InvalidArgument, 400);
        let got = field_of(&e);
        assert!(
            got.starts_with(field),
            "{what}: field {got:?}, expected {field:?} ({e:?})"
        );
        nothing_left(what);
    }

    // A host port held by another program: TCP, then UDP.
    let held = TcpListener::bind("127.0.0.1:0").expect("listener");
    let held_port = held.local_addr().expect("addr").port();
    let svc = |port: u32, host_port: u16, protocol: &str| ServiceSpec {
        port,
        protocol: Some(protocol.into()),
        host_port: Some(host_port.into()),
        ..ServiceSpec::default()
    };
    let e = expect_api_error(
        c.create(&with_services("x", vec![svc(8000, held_port, "tcp")])),
        ErrorCode::PortInUse,
        409,
    );
    assert!(e.message.contains(&held_port.to_string()), "{e:?}");
    nothing_left("tcp port in use");
    let held_udp = UdpSocket::bind("127.0.0.1:0").expect("udp socket");
    let held_udp_port = held_udp.local_addr().expect("addr").port();
    expect_api_error(
        c.create(&with_services("x", vec![svc(8000, held_udp_port, "udp")])),
        ErrorCode::PortInUse,
        409,
    );
    nothing_left("udp port in use");
    // The first service's port is not kept when the second one fails.
    let free = free_tcp_port();
    expect_api_error(
        c.create(&with_services(
            "x",
            vec![svc(8000, free, "tcp"), svc(8001, held_port, "tcp")],
        )),
        ErrorCode::PortInUse,
        409,
    );
    nothing_left("second port in use");
    TcpListener::bind(("127.0.0.1", free)).expect("the first port was released");

    // Taken by another sandbox, released with it.
    let first = create(&c, &with_services("first", vec![svc(8000, free, "tcp")]));
    expect_api_error(
        c.create(&with_services("second", vec![svc(8000, free, "tcp")])),
        ErrorCode::PortInUse,
        409,
    );
    c.delete(&first.id, true).expect("delete");
    nothing_left("after the first sandbox");
    let second = create(&c, &with_services("second", vec![svc(8000, free, "tcp")]));
    assert_eq!(one_exposed(&second, 8000, "tcp").host_port, free);
    drop((held, held_udp));
}

// ------------------------------------------------------------------------------------------ leaks

#[test]
fn two_hundred_sandboxes_leave_no_veth_rule_or_namespace_behind() {
    // No warm pool: every veth and set element of the daemon belongs to a sandbox of this test.
    let d = Daemon::start_with_config(Some("warm_pool = 0\n"));
    d.import_busybox();
    let c = d.client();
    let prefix = d.network.veth_prefix.clone();
    let table = d.network.nft_table.clone();
    let before = nft_table_state(&table).expect("the daemon's table exists once it runs");
    let mounts_before = net_namespace_mounts();
    assert_eq!(links_with_prefix(&prefix), Vec::<String>::new());
    const ROUNDS: usize = 10;
    const AT_ONCE: usize = 20;
    for round in 0..ROUNDS {
        let sbs: Vec<SandboxInfo> = (0..AT_ONCE).map(|_| create(&c, &busybox(None))).collect();
        let mut addrs: Vec<Ipv4Addr> = sbs.iter().map(address_of).collect();
        addrs.sort();
        addrs.dedup();
        assert_eq!(
            addrs.len(),
            AT_ONCE,
            "addresses shared among live sandboxes"
        );
        for a in &addrs {
            assert_in_subnet(&d, *a);
        }
        if round == 0 {
            // What is counted below is where the sandboxes' state is.
            assert_eq!(links_with_prefix(&prefix).len(), AT_ONCE);
            assert_ne!(
                nft_table_state(&table).as_ref(),
                Some(&before),
                "sandboxes left no trace in {table}"
            );
            let host_ns = sandbox_tests::net::host_netns();
            for sb in &sbs {
                let pid = sb.pid.expect("pid");
                let ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("ns/net");
                assert_ne!(
                    ns.display().to_string(),
                    host_ns,
                    "{} shares the host's netns",
                    sb.id
                );
            }
        }
        for sb in &sbs {
            c.delete(&sb.id, true).expect("delete");
        }
    }
    assert!(c.list(&[], None).expect("list").sandboxes.is_empty());
    d.assert_only_sandboxes(&[]);
    assert_eq!(wait_links_gone(&prefix), Vec::<String>::new(), "veths left");
    assert_eq!(
        nft_table_state(&table),
        Some(before),
        "rules or set elements left (elements now: {:?})",
        nft_element_counts(&table)
    );
    assert_eq!(
        net_namespaces_held_by(d.pid()),
        Default::default(),
        "namespaces held by the daemon"
    );
    let new_mounts: Vec<String> = net_namespace_mounts()
        .difference(&mounts_before)
        .cloned()
        .collect();
    assert_eq!(
        new_mounts,
        Vec::<String>::new(),
        "network namespaces kept by mounts"
    );
}

// ------------------------------------------------------------------------------------------ restart

#[test]
fn a_daemon_kill_and_restart_keeps_sandboxes_networking_intact() {
    let world = OutsideWorld::start();
    let mut d = world.daemon(None);
    d.import_busybox();
    let c = d.client();
    let s1 = create(&c, &idle("rs-net-1"));
    let s2 = create(&c, &with_services("rs-net-2", vec![service(8000)]));
    let shut = create(&c, &with_network("rs-net-3", deny_egress()));
    start_httpd(&c, &s2.id, 8000, "before");
    start_httpd(&c, &s1.id, 8001, "s1");
    let published =
        SocketAddr::from((Ipv4Addr::LOCALHOST, one_exposed(&s2, 8000, "tcp").host_port));
    assert_eq!(http_get_host(published, "/").expect("published"), "before");
    wget_ok(&c, &s1.id, &url(world.a, 8080));

    for sb in [&s1, &s2, &shut] {
        let h = sb.network.as_ref().and_then(|n| n.host_interface.clone());
        assert!(
            h.as_ref().is_none_or(|h| link_exists(h)),
            "{h:?} of {} missing",
            sb.id
        );
    }
    d.kill9();
    // The kernel's state is the daemon's: the published port answers while it is down.
    assert_eq!(
        http_get_host(published, "/").expect("published, daemon down"),
        "before"
    );
    d.restart();
    let c = d.client();

    for (before, name) in [(&s1, "rs-net-1"), (&s2, "rs-net-2"), (&shut, "rs-net-3")] {
        let now = c.get(name).expect("get after restart");
        assert_eq!(now.network, before.network, "{name}");
        assert_eq!(now.exposed_ports, before.exposed_ports, "{name}");
        // Its veth is still there (reconciliation at start removes only links of no sandbox).
        let host_if = now.network.as_ref().and_then(|n| n.host_interface.clone());
        if let Some(h) = host_if {
            assert!(
                link_exists(&h),
                "{name}'s veth {h} is gone after the restart"
            );
        }
    }
    let body = wget_ok(&c, &s1.id, &url(world.a, 8080));
    assert_eq!(client_of(&body), world.host_addr.to_string());
    assert_eq!(
        http_get_host(published, "/").expect("published after restart"),
        "before"
    );
    // Policies survived: s3 still cannot get out, s1 still takes no connection.
    wget_blocked(&c, &shut.id, &url(world.a, 8080));
    let s1_at = SocketAddr::from((address_of(&s1), 8001));
    assert!(
        http_get_within(s1_at, "/", blocked()).is_err(),
        "{s1_at} reachable"
    );
    // The published host port is still s2's.
    let mut again = service(8000);
    again.host_port = Some(published.port().into());
    expect_api_error(
        c.create(&with_services("rs-net-4", vec![again])),
        ErrorCode::PortInUse,
        409,
    );
    // New sandboxes get addresses of their own, and work.
    let taken = [address_of(&s1), address_of(&s2), address_of(&shut)];
    for i in 0..3 {
        let n = create(&c, &idle(&format!("rs-net-new-{i}")));
        let a = address_of(&n);
        assert!(!taken.contains(&a), "{a} given again");
        let body = wget_ok(&c, &n.id, &url(world.a, 8080));
        assert_eq!(client_of(&body), world.host_addr.to_string());
    }
    let log = world.sync_log();
    assert!(
        log.iter()
            .all(|l| log_client(l) == world.host_addr.to_string()),
        "{log:#?}"
    );
    // Deleting after the restart cleans up (checked again by the daemon's leak check).
    for id in [&s1.id, &s2.id, &shut.id] {
        c.delete(id, true).expect("delete");
    }
    let e = TcpListener::bind(published);
    assert!(e.is_ok(), "the published port is free after removal: {e:?}");
}
