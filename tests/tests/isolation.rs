//! Isolation, checked from inside a sandbox (and from the host where the host has the answer).

use std::path::{Path, PathBuf};

use sandbox_tests::sandbox_proto::{ImportImageRequest, SandboxStatus};
use sandbox_tests::{busybox, create, create_idle, exec, proc_status_field, sh, Daemon};

#[test]
fn pid_namespace_init_and_host_processes_invisible() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "iso-pid");

    let r = exec(&c, &sb.id, &["cat", "/proc/1/cmdline"]);
    assert_eq!(
        r.stdout_bytes(),
        b"sandboxd\0shim\0",
        "pid 1 is the sandbox's init"
    );

    // Only the sandbox's processes: its init, the exec'd shell and ps itself.
    let pids = sh(&c, &sb.id, "ls /proc | grep -E '^[0-9]+$'");
    let pids: Vec<u32> = pids.lines().map(|l| l.parse().expect("pid")).collect();
    assert!(pids.contains(&1), "{pids:?}");
    assert!(
        pids.len() < 10,
        "too many processes visible inside: {pids:?}"
    );
    let ps = sh(&c, &sb.id, "ps");
    assert!(ps.lines().count() - 1 < 10, "{ps}");

    // The test's own process (and the daemon) are not visible by name.
    let own_comm = std::fs::read_to_string("/proc/self/comm").expect("comm");
    let comms = sh(&c, &sb.id, "cat /proc/[0-9]*/comm");
    assert!(
        !comms.lines().any(|l| l == own_comm.trim()),
        "host process {own_comm:?} visible inside:\n{comms}"
    );
    // And the host pid of the test is not a process there (pids are namespaced).
    let me = std::process::id();
    if me > 10 {
        let r = exec(&c, &sb.id, &["test", "-e", &format!("/proc/{me}/status")]);
        assert_ne!(r.exit_code, 0, "host pid {me} exists inside");
    }
}

#[test]
fn hostname_users_and_uid_map() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "iso-user");

    assert_eq!(sh(&c, &sb.id, "hostname").trim(), "iso-user");
    assert_eq!(sh(&c, &sb.id, "id -u").trim(), "0");
    assert_ne!(sb.host_uid, 0, "root inside must not be root outside");

    // The host sees the sandbox's init running as host_uid.
    let pid = sb.pid.expect("pid of a running sandbox") as i32;
    let uid = proc_status_field(pid, "Uid");
    let uids: Vec<u32> = uid
        .split_whitespace()
        .map(|u| u.parse().expect("uid"))
        .collect();
    assert_eq!(
        uids,
        vec![sb.host_uid; 4],
        "Uid line of the init on the host: {uid}"
    );
    let gid = proc_status_field(pid, "Gid");
    assert!(
        !gid.split_whitespace().any(|g| g == "0"),
        "init has gid 0 on the host: {gid}"
    );

    let map = sh(&c, &sb.id, "cat /proc/self/uid_map");
    let fields: Vec<&str> = map.split_whitespace().collect();
    assert_eq!(fields, ["0", &sb.host_uid.to_string(), "65536"], "{map}");
    let map = sh(&c, &sb.id, "cat /proc/self/gid_map");
    let fields: Vec<&str> = map.split_whitespace().collect();
    assert_eq!(fields, ["0", &sb.host_uid.to_string(), "65536"], "{map}");

    // A second sandbox gets a distinct range.
    let other = create_idle(&c, "iso-user2");
    assert_ne!(other.host_uid, sb.host_uid);
    assert!(other.host_uid.abs_diff(sb.host_uid) >= 65536);
}

#[test]
fn read_only_proc_sys_no_mount_no_userns() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "iso-ro");

    let r = exec(
        &c,
        &sb.id,
        &["sh", "-c", "echo evil > /proc/sys/kernel/hostname"],
    );
    assert_ne!(r.exit_code, 0, "writing /proc/sys succeeded");
    assert!(r.stderr.contains("Read-only file system"), "{r:?}");
    assert_eq!(sh(&c, &sb.id, "hostname").trim(), "iso-ro");

    // /tmp exists in the image (the image has no /mnt, so mounting there would fail for the wrong reason).
    let r = exec(&c, &sb.id, &["mount", "-t", "tmpfs", "x", "/tmp"]);
    assert_ne!(r.exit_code, 0, "mount succeeded: {r:?}");
    assert_eq!(
        sh(&c, &sb.id, "grep -c ' /tmp ' /proc/mounts || true").trim(),
        "0",
        "something got mounted on /tmp"
    );
    let r = exec(&c, &sb.id, &["unshare", "-U", "true"]);
    assert_ne!(r.exit_code, 0, "unshare -U succeeded: {r:?}");
    // /sys is read-only too.
    let r = exec(
        &c,
        &sb.id,
        &["sh", "-c", "echo 1 > /sys/kernel/uevent_helper"],
    );
    assert_ne!(r.exit_code, 0, "{r:?}");
}

#[test]
fn capabilities_no_new_privs_seccomp() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "iso-caps");

    let status = sh(&c, &sb.id, "cat /proc/self/status");
    let field = |k: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:")))
            .unwrap_or_else(|| panic!("no {k} in:\n{status}"))
            .trim()
            .to_owned()
    };
    // Docker's default 14 capabilities.
    assert_eq!(field("CapBnd"), "00000000a80425fb");
    assert_eq!(field("CapEff"), "00000000a80425fb");
    assert_eq!(field("CapPrm"), "00000000a80425fb");
    assert_eq!(field("CapInh"), "0000000000000000");
    assert_eq!(field("CapAmb"), "0000000000000000");
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(field("Seccomp"), "2");

    // A non-root user has no effective capabilities.
    let r = sandbox_tests::sandbox_proto::ExecRequest {
        user: Some("app".into()),
        ..sandbox_tests::exec_req(&["grep", "-E", "^Cap(Eff|Prm|Amb|Inh)", "/proc/self/status"])
    };
    let r = c.exec(&sb.id, &r).expect("exec as app");
    for l in r.stdout.lines() {
        assert!(l.ends_with("0000000000000000"), "{}", r.stdout);
    }
}

/// Daemon configuration without sandbox networking: every sandbox is loopback-only.
const NO_NETWORK: &str = "[network]\nmode = \"none\"\n";

#[test]
fn minimal_dev_loopback_only_and_masked_paths() {
    let d = Daemon::start_with_config(Some(NO_NETWORK));
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "iso-dev");

    let mut dev: Vec<String> = sh(&c, &sb.id, "ls -A /dev")
        .lines()
        .map(str::to_owned)
        .collect();
    dev.sort();
    let mut want = [
        "null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm", "mqueue", "fd",
        "stdin", "stdout", "stderr", "core",
    ];
    want.sort();
    assert_eq!(dev, want);

    // Network: a fresh namespace with only the loopback, up; /sys is a read-only sysfs of that namespace.
    let mounts = sh(&c, &sb.id, "cat /proc/mounts");
    let sys = mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(1) == Some(&"/sys"))
        .unwrap_or_else(|| panic!("no /sys mount:\n{mounts}"));
    assert_eq!(sys[2], "sysfs", "{mounts}");
    let opts: Vec<&str> = sys[3].split(',').collect();
    for o in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(opts.contains(&o), "/sys lacks {o}: {}", sys[3]);
    }
    let ifaces = sh(&c, &sb.id, "ls /sys/class/net");
    assert_eq!(ifaces.split_whitespace().collect::<Vec<_>>(), ["lo"]);
    let state = sh(&c, &sb.id, "cat /sys/class/net/lo/operstate");
    assert!(matches!(state.trim(), "unknown" | "up"), "lo is {state:?}");
    let flags = sh(&c, &sb.id, "cat /sys/class/net/lo/flags");
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).expect("flags");
    assert_eq!(flags & 1, 1, "IFF_UP not set on lo");
    let dev = sh(&c, &sb.id, "cat /proc/net/dev");
    let names: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(names, ["lo"], "{dev}");
    // Not networked: the image's resolv.conf, and hosts without an address of the sandbox's.
    assert_eq!(
        sh(&c, &sb.id, "grep -c resolv.conf /proc/mounts || true").trim(),
        "0"
    );
    let hosts = sh(&c, &sb.id, "cat /etc/hosts");
    assert!(
        hosts
            .lines()
            .all(|l| l.starts_with("127.0.0.1") || l.starts_with("::1")),
        "{hosts}"
    );

    // Masked /proc files read as empty inside (only those the host kernel has and that have content).
    let mut checked = 0;
    for p in ["/proc/kcore", "/proc/timer_list", "/proc/sched_debug"] {
        let host = std::fs::read(p).map(|v| v.len()).unwrap_or(0);
        if host == 0 {
            continue;
        }
        let n = sh(&c, &sb.id, &format!("wc -c < {p}"));
        assert_eq!(n.trim(), "0", "{p} is not masked");
        checked += 1;
    }
    assert!(checked > 0, "no masked /proc file to check on this host");
}

/// The sandbox's network namespace belongs to the host's user namespace (its supervisor created it): the
/// sandbox's root, although it holds CAP_NET_ADMIN and CAP_NET_RAW in its own user namespace, can change
/// neither addresses, routes nor links, open no packet or raw socket, and write no network sysctl. It sees
/// its own devices only (lo and eth0 with its address). What the supervisor set up for it: ports below
/// 1024 and ICMP echo sockets are open to every user; resolv.conf and hosts name its network.
#[test]
fn network_namespace_not_reconfigurable_from_inside() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "iso-net");
    let net = sb.network.clone().expect("network info");
    assert_eq!(net.mode, "bridge", "{net:?}");
    let address = net.address.clone().expect("address");

    // The namespace is not the host's, and only the sandbox's own devices are in it.
    let pid = sb.pid.expect("pid") as i32;
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("init netns"),
        std::fs::read_link("/proc/self/ns/net").expect("own netns"),
        "the sandbox shares the host's network namespace"
    );
    let ifaces = sh(&c, &sb.id, "ls /sys/class/net");
    assert_eq!(
        ifaces.split_whitespace().collect::<Vec<_>>(),
        ["eth0", "lo"]
    );
    let dev = sh(&c, &sb.id, "cat /proc/net/dev");
    let mut names: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["eth0", "lo"], "{dev}");
    let addrs = sh(&c, &sb.id, "ip -o -4 addr show dev eth0");
    assert!(addrs.contains(&format!("inet {address}/")), "{addrs}");

    let denied = |argv: &[&str], what: &str| {
        let r = exec(&c, &sb.id, argv);
        assert_ne!(r.exit_code, 0, "{what} succeeded: {r:?}");
        assert!(
            r.stderr.contains("Operation not permitted"),
            "{what}: expected EPERM, got {r:?}"
        );
    };
    denied(
        &["ip", "addr", "add", "198.18.7.1/32", "dev", "eth0"],
        "adding an address",
    );
    denied(
        &["ip", "addr", "add", "198.18.7.1/32", "dev", "lo"],
        "adding an address to lo",
    );
    denied(&["ip", "link", "set", "eth0", "down"], "taking eth0 down");
    denied(
        &["ip", "link", "set", "eth0", "address", "02:00:00:00:00:01"],
        "changing the MAC address",
    );
    denied(
        &["ip", "route", "add", "198.18.8.0/24", "dev", "eth0"],
        "adding a route",
    );
    // AF_PACKET socket.
    denied(
        &["arping", "-c", "1", "-w", "1", "-I", "eth0", "198.18.7.2"],
        "a packet socket",
    );
    assert_eq!(
        sh(&c, &sb.id, "ip -o addr | grep -c 198.18.7.1 || true").trim(),
        "0"
    );
    for dev in ["lo", "eth0"] {
        let flags = sh(&c, &sb.id, &format!("cat /sys/class/net/{dev}/flags"));
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).expect("flags");
        assert_eq!(flags & 1, 1, "{dev} went down");
    }

    // Network sysctls: permission denied (checked before the read-only /proc/sys mount, with an
    // append, which does not truncate); a namespace of its own would have let root in and failed on the
    // read-only mount instead.
    let r = exec(
        &c,
        &sb.id,
        &["sh", "-c", "echo 1 >> /proc/sys/net/ipv4/ip_forward"],
    );
    assert_ne!(r.exit_code, 0, "{r:?}");
    assert!(r.stderr.contains("Permission denied"), "{r:?}");
    // Sysfs attributes of the namespace's devices are not writable either.
    let r = exec(
        &c,
        &sb.id,
        &["sh", "-c", "echo 1000 >> /sys/class/net/eth0/mtu"],
    );
    assert_ne!(r.exit_code, 0, "{r:?}");

    // Set up by the supervisor for the sandbox.
    assert_eq!(
        sh(
            &c,
            &sb.id,
            "cat /proc/sys/net/ipv4/ip_unprivileged_port_start"
        )
        .trim(),
        "0"
    );
    // A port below 1024, also for a user without capabilities.
    let r = c
        .exec(
            &sb.id,
            &sandbox_tests::sandbox_proto::ExecRequest {
                user: Some("app".into()),
                ..sandbox_tests::exec_req(&["httpd", "-p", "127.0.0.1:80", "-h", "/tmp"])
            },
        )
        .expect("exec httpd");
    assert_eq!(r.exit_code, 0, "binding port 80 as app: {r:?}");
    assert!(
        sh(&c, &sb.id, "netstat -ltn").contains("127.0.0.1:80 "),
        "nothing listens on port 80"
    );
    // ICMP echo sockets for every group: read from the host (inside, host gids show as the overflow gid;
    // and busybox's ping only tries a raw socket).
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).expect("open netns");
    let range = std::thread::spawn(move || {
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range").expect("read")
    })
    .join()
    .expect("thread");
    assert_eq!(
        range.split_whitespace().collect::<Vec<_>>(),
        ["0", "2147483647"]
    );
    // A raw socket, even as root inside (busybox's ping uses one).
    let r = exec(&c, &sb.id, &["ping", "-c", "1", "127.0.0.1"]);
    assert_ne!(r.exit_code, 0, "raw ICMP socket: {r:?}");
    assert!(r.stderr.contains("permission denied"), "{r:?}");

    // resolv.conf: the daemon's nameservers; hosts: the sandbox's address under its name.
    let resolv = sh(&c, &sb.id, "cat /etc/resolv.conf");
    let servers: Vec<&str> = resolv
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .collect();
    assert_eq!(servers, net.dns, "{resolv}");
    let hosts = sh(&c, &sb.id, "cat /etc/hosts");
    assert!(
        hosts.lines().any(|l| l == format!("{address}\tiso-net")),
        "{hosts}"
    );
}

#[test]
fn init_reaps_orphans() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "reaper");
    // Each round: an intermediate shell starts a background child and exits at once, so the child is
    // orphaned and re-parented to the sandbox's init. The child holds the write end of a FIFO that the
    // exec reads to end-of-file: when the exec returns, every orphan has exited.
    for i in 0..5 {
        let script = format!(
            "mkfifo /tmp/z{i} && sh -c 'sleep 0 > /tmp/z{i} & sleep 0 > /tmp/z{i} & exit 0' && cat /tmp/z{i}"
        );
        sh(&c, &sb.id, &script);
    }
    let ps = sh(&c, &sb.id, "ps -o pid,ppid,stat,comm");
    for line in ps.lines().skip(1) {
        let stat = line.split_whitespace().nth(2).unwrap_or("");
        assert!(!stat.starts_with('Z'), "zombie left in the sandbox:\n{ps}");
    }
    // Also from the host: no zombie in the sandbox's pid namespace.
    let pid = sb.pid.expect("pid") as i32;
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).expect("ns link");
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if std::fs::read_link(format!("/proc/{p}/ns/pid"))
            .ok()
            .as_ref()
            != Some(&ns)
        {
            continue;
        }
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            let state = stat
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start())
                .unwrap_or("");
            assert!(!state.starts_with('Z'), "zombie {p}: {stat}");
        }
    }
    assert_eq!(c.get(&sb.id).expect("get").status, SandboxStatus::Running);
}

/// Adds a layer of symlinks that point through the host root still attached during setup
/// (`/.sandboxd-oldroot`) at the mount points the init sets up, on top of the busybox image.
fn hostile_symlink_image(dir: &Path, proc_target: &str, hosts_target: &str, sys_target: &str) {
    sandbox_tests::busybox_with_symlinks(
        dir,
        &[
            ("proc", proc_target),
            ("etc/hosts", hosts_target),
            ("sys", sys_target),
        ],
    );
}

/// An image's symlinks must never steer the init's setup out of the sandbox: `/proc` and `/etc/hosts`
/// pointing through the attached host root are replaced inside the overlay, and nothing is created on
/// the host. Nor the supervisor's, which mounts sysfs on `/sys` with the host's root as `/`: a `/sys`
/// symlink to a host directory is replaced too.
#[test]
fn image_symlinks_cannot_redirect_setup_to_the_host() {
    let d = Daemon::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let tag = format!(
        "{}-{}",
        std::process::id(),
        tmp.path().display().to_string().len()
    );
    let host_proc = PathBuf::from(format!("/tmp/sandboxd-evil-proc-{tag}"));
    let host_hosts = PathBuf::from(format!("/tmp/sandboxd-evil-hosts-{tag}"));
    let host_sys = tmp.path().join("host-sys");
    std::fs::create_dir(&host_sys).expect("mkdir host-sys");
    let img = tmp.path().join("hostile");
    hostile_symlink_image(
        &img,
        &format!("/.sandboxd-oldroot{}", host_proc.display()),
        &format!("/.sandboxd-oldroot{}", host_hosts.display()),
        &host_sys.display().to_string(),
    );
    let c = d.client();
    c.import_image(&ImportImageRequest {
        path: img.display().to_string(),
        reference: Some("hostile:1".into()),
    })
    .expect("import");
    let mut req = busybox(None);
    req.image = "hostile:1".into();
    let sb = create(&c, &req);
    assert!(
        !host_proc.exists(),
        "{} was created on the host",
        host_proc.display()
    );
    assert!(
        !host_hosts.exists(),
        "{} was created on the host",
        host_hosts.display()
    );
    let out = sh(
        &c,
        &sb.id,
        "test -d /proc/self && grep -c '^127.0.0.1' /etc/hosts",
    );
    assert_eq!(out.trim(), "1");
    let out = sh(
        &c,
        &sb.id,
        "test -d /sys && ! test -L /sys && ls /sys/class/net",
    );
    assert!(out.lines().any(|l| l == "lo"), "{out}");
    assert_eq!(
        std::fs::read_dir(&host_sys).expect("host-sys").count(),
        0,
        "something was created in the host directory the image's /sys pointed at"
    );
    c.delete(&sb.id, true).expect("delete");
    d.assert_only_sandboxes(&[]);
}
