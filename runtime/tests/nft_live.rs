//! The firewall against the real kernel, in a scratch network namespace this test creates for one thread
//! (nftables state is per network namespace, so nothing here touches the host's tables). Needs root and
//! libnftables; skipped (with a note) otherwise.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use nix::sched::{unshare, CloneFlags};
use sandbox_runtime::net::nft::{
    render_remove, AllowRule, Egress, Firewall, NetPlan, NftError, Proto, Published, SandboxRules,
};

fn plan() -> NetPlan {
    NetPlan {
        table: "sbxt_nft_live".into(),
        // Never created: rules only name it.
        bridge: "sbxt-br0".into(),
        subnet: "10.213.0.0/16".parse().unwrap(),
        gateway: "10.213.0.1".parse().unwrap(),
        v6: None,
    }
}

fn addr(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 213, 1, 0)) + n)
}

fn open_sandbox(n: u32) -> SandboxRules {
    SandboxRules {
        address: addr(n),
        host_if: format!("sbxt-{n}"),
        egress: Egress::Open,
        ingress_open: false,
        published: vec![Published {
            host_ip: Ipv4Addr::LOCALHOST,
            host_port: 20000 + n as u16,
            proto: Proto::Tcp,
            port: 8000,
        }],
        peer_group: None,
        address6: None,
    }
}

fn allow_sandbox(n: u32) -> SandboxRules {
    let rule = |net: &str, proto, ports| AllowRule {
        net: net.parse().unwrap(),
        proto,
        ports,
    };
    SandboxRules {
        address: addr(n),
        host_if: format!("sbxt-{n}"),
        egress: Egress::Allow(vec![
            rule("198.18.1.0/24", Proto::Tcp, Some((80, 80))),
            rule("198.18.0.0/16", Proto::Tcp, Some((443, 443))), // overlaps the next one
            rule("198.18.1.0/24", Proto::Tcp, None),
            rule("198.18.9.9/32", Proto::Udp, Some((53, 53))),
            rule("0.0.0.0/0", Proto::Udp, Some((123, 123))),
        ]),
        ingress_open: true,
        published: vec![
            Published {
                host_ip: Ipv4Addr::LOCALHOST,
                host_port: 20000 + n as u16,
                proto: Proto::Tcp,
                port: 8000,
            },
            Published {
                host_ip: Ipv4Addr::LOCALHOST,
                host_port: 20000 + n as u16,
                proto: Proto::Udp,
                port: 8000,
            },
        ],
        peer_group: None,
        address6: None,
    }
}

fn deny_sandbox(n: u32) -> SandboxRules {
    SandboxRules {
        address: addr(n),
        host_if: format!("sbxt-{n}"),
        egress: Egress::Deny,
        ingress_open: false,
        published: vec![],
        peer_group: None,
        address6: None,
    }
}

/// Builds sandbox number `n`.
type MakeSandbox = fn(u32) -> SandboxRules;

fn median(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn list(fw: &Firewall, p: &NetPlan) -> String {
    fw.run(&format!("list table inet {}", p.table)).unwrap()
}

fn scenario() {
    let fw = match Firewall::open() {
        Ok(fw) => fw,
        Err(NftError::Unavailable(e)) => {
            eprintln!("skipping nft_live: {e}");
            return;
        }
        Err(e) => panic!("opening the firewall: {e}"),
    };
    let p = plan();
    assert!(!fw.table_exists(&p.table).unwrap());
    fw.remove_table(&p.table).unwrap(); // absent: fine

    // Install (empty), add an open and an allow-list sandbox.
    let t0 = Instant::now();
    fw.install(&p, &[]).unwrap();
    eprintln!("install (empty table): {:?}", t0.elapsed());
    assert!(fw.table_exists(&p.table).unwrap());
    let (a, b) = (open_sandbox(1), allow_sandbox(2));
    fw.add_sandbox(&p, &a, &[]).unwrap();
    fw.add_sandbox(&p, &b, &[]).unwrap();
    let out = list(&fw, &p);
    for needle in [
        "10.213.1.1 comment \"sbxt-1\" : accept",
        "10.213.1.2 comment \"sbxt-2\" : jump egress_allowlist_2",
        "10.213.1.2 . 198.18.1.0/24 . tcp . 0-65535",
        "10.213.1.2 . 198.18.9.9 . udp . 53",
        "10.213.1.2 . 0.0.0.0/0 . udp . 123",
        "127.0.0.1 . tcp . 20001 comment \"sbxt-1\" : 10.213.1.1 . 8000",
        "127.0.0.1 . udp . 20002 comment \"sbxt-2\" : 10.213.1.2 . 8000",
        "10.213.1.2 comment \"sbxt-2\"",
        "type nat hook output priority -100; policy accept;",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in\n{out}");
    }
    eprintln!("--- after adding an open and an allow-list sandbox:\n{out}");

    // A second sandbox on a taken address or published port fails as a whole: none of its elements stay.
    let mut clash = deny_sandbox(3);
    clash.published = a.published.clone();
    clash.published[0].port = 9000;
    let err = fw.add_sandbox(&p, &clash, &[]).unwrap_err();
    assert!(matches!(err, NftError::Command(_)), "{err}");
    assert!(err.to_string().contains("File exists"), "{err}");
    assert!(!list(&fw, &p).contains("10.213.1.3"));

    // Remove one; removing it again (nothing left) is fine too.
    fw.remove_sandbox(&p, &b, &[]).unwrap();
    let out = list(&fw, &p);
    assert!(!out.contains("10.213.1.2"), "{out}");
    assert!(out.contains("10.213.1.1 comment"), "{out}");
    fw.remove_sandbox(&p, &b, &[]).unwrap();

    // Atomic reinstall with a different population; then removing a sandbox that the new table lacks
    // partially (a's vmap entry is present, its published port is not) removes what is there.
    let mut a_without_port = a.clone();
    a_without_port.published.clear();
    fw.install(&p, &[a_without_port, deny_sandbox(3), b.clone()])
        .unwrap();
    let out = list(&fw, &p);
    assert!(
        out.contains("10.213.1.3 comment \"sbxt-3\" : jump egress_deny"),
        "{out}"
    );
    assert!(out.contains("10.213.1.2 . 198.18.9.9 . udp . 53"), "{out}");
    assert!(!out.contains("20001"), "{out}");
    fw.remove_sandbox(&p, &a, &[]).unwrap();
    assert!(!list(&fw, &p).contains("10.213.1.1"));

    // Policy change = remove + add.
    fw.remove_sandbox(&p, &deny_sandbox(3), &[]).unwrap();
    fw.add_sandbox(&p, &open_sandbox(3), &[]).unwrap();
    assert!(list(&fw, &p).contains("10.213.1.3 comment \"sbxt-3\" : accept"));

    // Session peers: the set always holds every ordered pair of the group's current members.
    let peer = |n: u32| SandboxRules {
        peer_group: Some("s1".into()),
        ..deny_sandbox(n)
    };
    fw.add_sandbox(&p, &peer(11), &[]).unwrap();
    fw.add_sandbox(&p, &peer(12), &[addr(11)]).unwrap();
    fw.add_sandbox(&p, &peer(13), &[addr(11), addr(12)])
        .unwrap();
    let pairs = |fw: &Firewall| -> usize {
        let out = fw
            .run(&format!("list set inet {} session_peers", p.table))
            .unwrap();
        out.matches(" . 10.213.1.1").count()
    };
    assert_eq!(pairs(&fw), 6, "{}", list(&fw, &p));
    // 12 leaves: its pairs with 11 and 13 go, 11 <-> 13 stays.
    fw.remove_sandbox(&p, &peer(12), &[addr(11), addr(13)])
        .unwrap();
    let out = list(&fw, &p);
    assert_eq!(pairs(&fw), 2, "{out}");
    assert!(out.contains("10.213.1.11 . 10.213.1.13"), "{out}");
    assert!(out.contains("10.213.1.13 . 10.213.1.11"), "{out}");
    assert!(!out.contains("10.213.1.12"), "{out}");
    // A reinstall pairs the groups from the list.
    fw.install(&p, &[peer(11), peer(12), peer(13), open_sandbox(3)])
        .unwrap();
    assert_eq!(pairs(&fw), 6);
    for n in [11, 12] {
        let rest: Vec<Ipv4Addr> = (n + 1..=13).map(addr).collect();
        fw.remove_sandbox(&p, &peer(n), &rest).unwrap();
    }
    fw.remove_sandbox(&p, &peer(13), &[]).unwrap();
    assert_eq!(pairs(&fw), 0, "{}", list(&fw, &p));

    // A port published on every address (0.0.0.0).
    let mut everywhere = deny_sandbox(5);
    everywhere.published.push(Published {
        host_ip: Ipv4Addr::UNSPECIFIED,
        host_port: 20005,
        proto: Proto::Udp,
        port: 53,
    });
    fw.add_sandbox(&p, &everywhere, &[]).unwrap();
    let out = list(&fw, &p);
    assert!(
        out.contains("udp . 20005 comment \"sbxt-5\" : 10.213.1.5 . 53"),
        "{out}"
    );
    fw.remove_sandbox(&p, &everywhere, &[]).unwrap();
    assert!(!list(&fw, &p).contains("20005"));

    // IPv6: the table with an IPv6 subnet is accepted by the kernel, and a sandbox's IPv6 elements come and go.
    let mut p6 = p.clone();
    p6.v6 = Some(sandbox_runtime::net::nft::Plan6 {
        subnet: "fd5b:d0c0:213::/64".parse().unwrap(),
        gateway: "fd5b:d0c0:213::1".parse().unwrap(),
    });
    let with6 = |mut sb: SandboxRules, n: u32| {
        sb.address6 = Some(format!("fd5b:d0c0:213::{n:x}").parse().unwrap());
        sb
    };
    fw.install(&p6, &[with6(open_sandbox(3), 3)]).unwrap();
    let sb = with6(allow_sandbox(4), 4);
    fw.add_sandbox(&p6, &sb, &[]).unwrap();
    let out = list(&fw, &p6);
    for needle in [
        "fd5b:d0c0:213::3 comment \"sbxt-3\" : accept",
        "fd5b:d0c0:213::4 comment \"sbxt-4\" : jump egress_deny",
        "ip6 saddr fd5b:d0c0:213::/64 masquerade",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in\n{out}");
    }
    fw.remove_sandbox(&p6, &sb, &[]).unwrap();
    assert!(!list(&fw, &p6).contains("fd5b:d0c0:213::4"));
    fw.install(&p, &[open_sandbox(3)]).unwrap();

    // Timing: add/remove one sandbox with 0, 200 and 1000 others present (half allow-list, half open).
    let others: Vec<SandboxRules> = (100..1100)
        .map(|n| {
            if n % 2 == 0 {
                allow_sandbox(n)
            } else {
                open_sandbox(n)
            }
        })
        .collect();
    for present in [0, 200, 1000] {
        let t0 = Instant::now();
        fw.install(&p, &others[..present]).unwrap();
        eprintln!(
            "install ({present} sandboxes, atomic replace): {:?}",
            t0.elapsed()
        );
        let kinds: [(&str, MakeSandbox); 3] = [
            ("open + 1 published port", open_sandbox),
            (
                "allow-list (5 rules) + ingress + 2 published",
                allow_sandbox,
            ),
            ("deny", deny_sandbox),
        ];
        for (name, make) in kinds {
            let (mut adds, mut removes) = (Vec::new(), Vec::new());
            for n in 0..50 {
                let sb = make(2000 + n);
                let t0 = Instant::now();
                fw.add_sandbox(&p, &sb, &[]).unwrap();
                let t1 = Instant::now();
                // The single transaction (remove_sandbox would fall back silently).
                fw.run(&render_remove(&p, &sb, &[]).unwrap()).unwrap();
                adds.push(t1 - t0);
                removes.push(t1.elapsed());
            }
            let (amax, rmax) = (*adds.iter().max().unwrap(), *removes.iter().max().unwrap());
            eprintln!(
                "{name} (+{present} present): add median {:?} max {amax:?}; remove median {:?} max {rmax:?}",
                median(&mut adds),
                median(&mut removes)
            );
        }
    }

    let t0 = Instant::now();
    fw.remove_table(&p.table).unwrap();
    eprintln!("remove_table: {:?}", t0.elapsed());
    assert!(!fw.table_exists(&p.table).unwrap());
    fw.remove_table(&p.table).unwrap();
}

#[test]
fn nft_live() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipping nft_live: needs root");
        return;
    }
    // The scratch network namespace belongs to this thread only (and dies with it); the firewall is opened
    // inside it, so its netlink socket and every table it sees are the scratch namespace's.
    std::thread::spawn(|| {
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        scenario();
    })
    .join()
    .unwrap();
}
