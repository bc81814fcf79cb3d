//! The streaming exec: output as it is written, stdin, TTY with resize, signals, cancel, disconnects,
//! timeouts, errors, large output, many streams at once, and `sandboxctl exec -it` on a real pty.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::Stdio;

use sandbox_tests::sandbox_proto::exec_stream::{BlockingExecStream, StreamEvent};
use sandbox_tests::sandbox_proto::stream::{ExecExit, ExecStreamInit};
use sandbox_tests::sandbox_proto::{ErrorCode, SandboxStatus};
use sandbox_tests::{busybox, create, create_idle, exec, expect_api_error, wait_exited, Daemon};

fn init(argv: &[&str]) -> ExecStreamInit {
    ExecStreamInit {
        command: argv.iter().map(|s| s.to_string()).collect(),
        ..ExecStreamInit::default()
    }
}

/// Reads events until `pred` holds for the stdout collected so far (stderr read meanwhile is dropped;
/// see [`read_until_both`]).
fn read_until(s: &mut BlockingExecStream, out: &mut Vec<u8>, pred: impl Fn(&str) -> bool) {
    read_until_both(s, out, &mut Vec::new(), pred)
}

/// Reads events until `pred` holds for the stdout collected so far, collecting stderr too.
fn read_until_both(
    s: &mut BlockingExecStream,
    out: &mut Vec<u8>,
    err: &mut Vec<u8>,
    pred: impl Fn(&str) -> bool,
) {
    while !pred(&String::from_utf8_lossy(out)) {
        match s.next().expect("stream event") {
            Some(StreamEvent::Stdout(d)) => out.extend_from_slice(&d),
            Some(StreamEvent::Stderr(d)) => err.extend_from_slice(&d),
            Some(StreamEvent::Ready(_)) => {}
            other => panic!(
                "stream ended before the expected output ({:?}): {other:?}",
                String::from_utf8_lossy(out)
            ),
        }
    }
}

/// Reads to the end: stdout, stderr, and the exit.
fn finish(s: &mut BlockingExecStream) -> (Vec<u8>, Vec<u8>, ExecExit) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match s.next().expect("stream event") {
            Some(StreamEvent::Stdout(d)) => out.extend_from_slice(&d),
            Some(StreamEvent::Stderr(d)) => err.extend_from_slice(&d),
            Some(StreamEvent::Ready(_)) => {}
            Some(StreamEvent::Exit(x)) => return (out, err, x),
            None => panic!("stream ended without Exit"),
        }
    }
}

#[test]
fn output_arrives_while_the_command_runs_and_stdin_reaches_it() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "st-live");
    let mut i = init(&[
        "sh",
        "-c",
        "echo first; echo warn >&2; read x; echo got-$x; exit 3",
    ]);
    i.stdin = true;
    let (mut s, ready) = c.exec_stream(&sb.id, &i).expect("stream");
    assert!(ready.pid > 0);
    // "first" arrives while the command is blocked reading stdin: it is streamed, not collected.
    let (mut out, mut err) = (Vec::new(), Vec::new());
    read_until_both(&mut s, &mut out, &mut err, |o| o.contains("first\n"));
    s.write_stdin(b"abc\n").expect("stdin");
    let (rest, rest_err, exit) = finish(&mut s);
    out.extend_from_slice(&rest);
    err.extend_from_slice(&rest_err);
    assert_eq!(String::from_utf8_lossy(&out), "first\ngot-abc\n");
    assert_eq!(String::from_utf8_lossy(&err), "warn\n");
    assert_eq!(exit.exit_code, 3);
    assert!(!exit.timed_out && !exit.cancelled);
}

#[test]
fn stdin_close_ends_input_and_large_streams_are_exact() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "st-big");
    // 8 MiB in through stdin, counted inside.
    let mut i = init(&["wc", "-c"]);
    i.stdin = true;
    let (mut s, _) = c.exec_stream(&sb.id, &i).expect("stream");
    let mut w = s.writer().expect("writer");
    let feeder = std::thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..8 {
            w.write_stdin(&chunk).expect("stdin");
        }
        w.close_stdin().expect("close");
    });
    let (out, _, exit) = finish(&mut s);
    feeder.join().expect("feeder");
    assert_eq!(
        String::from_utf8_lossy(&out).trim(),
        (8u64 << 20).to_string()
    );
    assert_eq!(exit.exit_code, 0);

    // 200 MiB out: every byte arrives, in order.
    let (mut s, _) = c
        .exec_stream(&sb.id, &init(&["head", "-c", "209715200", "/dev/zero"]))
        .expect("stream");
    let mut n = 0u64;
    loop {
        match s.next().expect("event") {
            Some(StreamEvent::Stdout(d)) => {
                assert!(d.iter().all(|b| *b == 0));
                n += d.len() as u64;
            }
            Some(StreamEvent::Exit(x)) => {
                assert_eq!(x.exit_code, 0);
                break;
            }
            Some(_) => {}
            None => panic!("no exit"),
        }
    }
    assert_eq!(n, 200 << 20);
}

#[test]
fn tty_mode_has_a_terminal_that_resizes() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "st-tty");
    // An exec first: the terminal below then runs on a helper that served a command already (its
    // stdio passed over its socket), the common case.
    assert_eq!(exec(&c, &sb.id, &["echo", "warm"]).stdout, "warm\n");
    let mut i = init(&["sh"]);
    i.stdin = true;
    i.tty = true;
    i.width = Some(100);
    i.height = Some(30);
    let (mut s, _) = c.exec_stream(&sb.id, &i).expect("stream");
    let mut out = Vec::new();
    s.write_stdin(b"tty; stty size; echo mark-$((40+2))\n")
        .expect("stdin");
    read_until(&mut s, &mut out, |o| o.contains("mark-42"));
    let text = String::from_utf8_lossy(&out).to_string();
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("30 100"), "{text}");
    let mut w = s.writer().expect("writer");
    w.resize(120, 40).expect("resize");
    s.write_stdin(b"stty size; echo mark-$((50+3))\n")
        .expect("stdin");
    read_until(&mut s, &mut out, |o| o.contains("mark-53"));
    let text = String::from_utf8_lossy(&out).to_string();
    assert!(text.contains("40 120"), "{text}");
    s.write_stdin(b"exit 7\n").expect("stdin");
    let (_, err, exit) = finish(&mut s);
    assert!(err.is_empty(), "a TTY has no separate stderr");
    assert_eq!(exit.exit_code, 7);
}

#[test]
fn signal_cancel_and_disconnect_end_the_process_tree() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "st-cancel");

    // A signal reaches the process.
    let (mut s, _) = c
        .exec_stream(
            &sb.id,
            &init(&[
                "sh",
                "-c",
                "trap 'echo term; exit 5' TERM; echo ready; while :; do :; done",
            ]),
        )
        .expect("stream");
    let mut out = Vec::new();
    read_until(&mut s, &mut out, |o| o.contains("ready"));
    s.writer().expect("w").signal(15).expect("signal");
    let (rest, _, exit) = finish(&mut s);
    assert!(String::from_utf8_lossy(&rest).contains("term"));
    assert_eq!(exit.exit_code, 5);

    // Cancel kills the whole tree, background children included.
    let (mut s, _) = c
        .exec_stream(
            &sb.id,
            &init(&["sh", "-c", "sleep 1001 & sleep 1002 & echo up; wait"]),
        )
        .expect("stream");
    let mut out = Vec::new();
    read_until(&mut s, &mut out, |o| o.contains("up"));
    s.cancel().expect("cancel");
    let (_, _, exit) = finish(&mut s);
    assert!(exit.cancelled, "{exit:?}");
    assert_eq!(exit.signal, Some(9));
    let ps = exec(&c, &sb.id, &["ps", "-o", "args"]);
    assert!(!ps.stdout.contains("sleep 100"), "{}", ps.stdout);

    // A client that goes away: its process tree is killed. The probe loops until the process is gone
    // (bounded by its own timeout, which would fail the test).
    let (mut s, _) = c
        .exec_stream(&sb.id, &init(&["sh", "-c", "echo up; exec sleep 1003"]))
        .expect("stream");
    let mut out = Vec::new();
    read_until(&mut s, &mut out, |o| o.contains("up"));
    drop(s);
    let mut probe = sandbox_tests::exec_req(&[
        "sh",
        "-c",
        "while ps -o args | grep -q '^sleep 1003'; do :; done; echo gone",
    ]);
    probe.timeout_seconds = Some(60.0);
    let r = c.exec(&sb.id, &probe).expect("probe");
    assert_eq!(r.stdout, "gone\n");
}

#[test]
fn timeouts_errors_and_many_streams() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "st-err");

    let mut i = init(&["sleep", "1000"]);
    i.timeout_seconds = Some(0.5);
    let (mut s, _) = c.exec_stream(&sb.id, &i).expect("stream");
    let (_, _, exit) = finish(&mut s);
    assert!(exit.timed_out);
    assert_eq!(exit.exit_code, 137);

    // Unknown sandbox: a plain HTTP 404 before the upgrade.
    let e = c.exec_stream("nope", &init(&["true"])).map(|_| ());
    expect_api_error(e, ErrorCode::SandboxNotFound, 404);
    // Bad init: an Error frame after the upgrade.
    expect_api_error(
        c.exec_stream(&sb.id, &init(&[])).map(|_| ()),
        ErrorCode::InvalidArgument,
        400,
    );
    let mut bad = init(&["pwd"]);
    bad.cwd = Some("relative".into());
    expect_api_error(
        c.exec_stream(&sb.id, &bad).map(|_| ()),
        ErrorCode::InvalidArgument,
        400,
    );
    // A missing program: exit 127 like a shell.
    let (mut s, _) = c
        .exec_stream(&sb.id, &init(&["/no/such/program"]))
        .expect("stream");
    assert_eq!(finish(&mut s).2.exit_code, 127);

    // 16 streams at once, each with its own output.
    let handles: Vec<_> = (0..16)
        .map(|n| {
            let socket = d.socket.clone();
            let id = sb.id.clone();
            std::thread::spawn(move || {
                let (mut s, _) = BlockingExecStream::start(
                    &socket,
                    &id,
                    &init(&["sh", "-c", &format!("seq 1 {}", 1000 + n)]),
                )
                .expect("stream");
                let (out, _, exit) = finish(&mut s);
                assert_eq!(exit.exit_code, 0);
                let lines = String::from_utf8_lossy(&out).lines().count();
                assert_eq!(lines, 1000 + n);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("stream thread");
    }

    // Not running.
    let done = create(&c, &busybox(Some(&["true"])));
    assert_eq!(wait_exited(&c, &done.id).status, SandboxStatus::Completed);
    expect_api_error(
        c.exec_stream(&done.id, &init(&["true"])).map(|_| ()),
        ErrorCode::SandboxNotRunning,
        409,
    );
}

/// `sandboxctl exec -it NAME sh` driven through a real pseudo-terminal: prompt, commands, resize
/// (SIGWINCH), exit status.
#[test]
fn sandboxctl_exec_it_is_an_interactive_shell() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    create_idle(&c, "st-shell");
    assert_eq!(exec(&c, "st-shell", &["true"]).exit_code, 0);
    let pty = nix::pty::openpty(
        Some(&nix::pty::Winsize {
            ws_row: 25,
            ws_col: 90,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }),
        None,
    )
    .expect("openpty");
    let slave = std::fs::File::from(pty.slave);
    let mut cmd = std::process::Command::new(sandbox_tests::bin_dir().join("sandboxctl"));
    cmd.args(["exec", "-it", "st-shell", "sh"])
        .env(sandbox_tests::sandbox_proto::SOCKET_ENV, &d.socket)
        .stdin(Stdio::from(slave.try_clone().expect("dup")))
        .stdout(Stdio::from(slave.try_clone().expect("dup")))
        .stderr(Stdio::from(slave.try_clone().expect("dup")));
    // In the child, after stdin/stdout/stderr are the slave: a new session whose controlling terminal
    // is that slave, so that a resize of the master sends it SIGWINCH.
    let hook = || -> std::io::Result<()> {
        nix::unistd::setsid()?;
        // SAFETY: TIOCSCTTY takes an integer argument and no pointer; fd 0 is the slave.
        let rc = unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec and only calls setsid and ioctl, which are
    // async-signal-safe and touch no memory shared with other threads.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, hook);
    }
    let mut child = cmd.spawn().expect("sandboxctl exec -it");
    // Only sandboxctl may hold the terminal's slave side, or its end would never be seen.
    drop(cmd);
    drop(slave);
    let mut master = std::fs::File::from(pty.master);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    master
        .write_all(b"stty size; echo ok-$((6*7))\n")
        .expect("write");
    while !String::from_utf8_lossy(&seen).contains("ok-42") {
        let n = master
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read pty: {e}; seen: {}", String::from_utf8_lossy(&seen)));
        assert!(n > 0, "pty closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).contains("25 90"));
    // Resize the outer terminal: sandboxctl gets SIGWINCH and passes the size on. That is
    // asynchronous: ask until the shell sees the new size (each answer is an event, no sleeping).
    let ws = libc::winsize {
        ws_row: 33,
        ws_col: 111,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a live local; the fd is the open master.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(rc, 0);
    let mut resized = false;
    for round in 0..1000 {
        master
            .write_all(format!("echo r{round}-$(stty size | tr ' ' x)-end\n").as_bytes())
            .expect("write");
        let (new, old) = (
            format!("r{round}-33x111-end"),
            format!("r{round}-25x90-end"),
        );
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&seen).to_string();
            if text.contains(&new) {
                resized = true;
                break;
            }
            if text.contains(&old) {
                break;
            }
            let n = master
                .read(&mut buf)
                .unwrap_or_else(|e| panic!("read pty: {e}; seen: {text}"));
            assert!(n > 0, "pty closed: {text}");
            seen.extend_from_slice(&buf[..n]);
        }
        if resized {
            break;
        }
    }
    assert!(resized, "the shell never saw the new size");
    master.write_all(b"exit 3\n").expect("write");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(3));
}

fn hwm_kib(d: &Daemon) -> u64 {
    sandbox_tests::proc_status_field(d.pid(), "VmHWM")
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .expect("VmHWM")
}

/// A stdin flood into a command that never reads, and 1 GiB of output from a unary exec: the daemon's
/// memory stays bounded, the exec ends (timeout / truncation flag), nothing is left behind.
#[test]
fn floods_in_and_out_keep_the_daemon_bounded() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "st-flood");
    let before = hwm_kib(&d);

    // 256 MiB offered to `sleep`, which reads nothing: the writes stall (flow control), the timeout
    // kills the command, and the rest of the input is discarded.
    let mut i = init(&["sleep", "1000"]);
    i.stdin = true;
    i.timeout_seconds = Some(1.0);
    let (mut s, _) = c.exec_stream(&sb.id, &i).expect("stream");
    let mut w = s.writer().expect("writer");
    let flood = std::thread::spawn(move || {
        let chunk = vec![b'y'; 1 << 20];
        for _ in 0..256 {
            if w.write_stdin(&chunk).is_err() {
                break;
            }
        }
    });
    let (_, _, exit) = finish(&mut s);
    assert!(exit.timed_out, "{exit:?}");
    flood.join().expect("flood");

    // 1 GiB of output, unary, kept to 1 MiB with the truncation flag.
    let mut req = sandbox_tests::exec_req(&["head", "-c", "1073741824", "/dev/zero"]);
    req.max_output_bytes = Some(1 << 20);
    let r = c.exec(&sb.id, &req).expect("exec");
    assert_eq!(r.exit_code, 0);
    assert!(r.stdout_truncated);
    assert_eq!(r.stdout_bytes().len(), 1 << 20);

    let growth = hwm_kib(&d).saturating_sub(before);
    assert!(
        growth < 64 * 1024,
        "daemon peak memory grew by {growth} KiB"
    );
}

/// A client that breaks the protocol after the start gets an `Error` frame (INVALID_REQUEST), and its
/// command is cancelled.
#[test]
fn a_broken_frame_gets_a_clear_error_and_cancels() {
    use sandbox_tests::sandbox_proto::stream::{self as frames, Kind, HEADER_LEN};
    use std::io::BufRead;
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create_idle(&c, "st-garbage");
    let sock = std::os::unix::net::UnixStream::connect(&d.socket).expect("connect");
    let mut w = sock.try_clone().expect("clone");
    let mut r = std::io::BufReader::new(sock);
    write!(
        w,
        "POST /v1/sandboxes/{}/exec/stream HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: {}\r\nContent-Length: 0\r\n\r\n",
        sb.id,
        frames::UPGRADE_TOKEN
    )
    .expect("request");
    let mut line = String::new();
    r.read_line(&mut line).expect("status");
    assert!(line.starts_with("HTTP/1.1 101"), "{line}");
    while line != "\r\n" {
        line.clear();
        r.read_line(&mut line).expect("head");
    }
    let next = |r: &mut std::io::BufReader<std::os::unix::net::UnixStream>| {
        let mut h = [0u8; HEADER_LEN];
        r.read_exact(&mut h).expect("frame header");
        let (kind, len) = frames::parse_header(&h).expect("valid header");
        let mut p = vec![0u8; len];
        r.read_exact(&mut p).expect("payload");
        (kind, p)
    };
    w.write_all(&frames::encode_json(Kind::Init, &init(&["sleep", "1004"])))
        .expect("init");
    assert_eq!(next(&mut r).0, Kind::Ready);
    w.write_all(&[99, 0, 0, 0, 0]).expect("garbage");
    let (kind, payload) = next(&mut r);
    assert_eq!(kind, Kind::Error);
    let err: sandbox_tests::sandbox_proto::ApiError =
        serde_json::from_slice(&payload).expect("error json");
    assert_eq!(err.code, ErrorCode::InvalidRequest);
    assert!(err.message.contains("frame"), "{}", err.message);
    // The command is gone (the probe loops until it is, bounded by its own timeout).
    let mut probe = sandbox_tests::exec_req(&[
        "sh",
        "-c",
        "while ps -o args | grep -q '^sleep 1004'; do :; done; echo gone",
    ]);
    probe.timeout_seconds = Some(60.0);
    assert_eq!(c.exec(&sb.id, &probe).expect("probe").stdout, "gone\n");
}
