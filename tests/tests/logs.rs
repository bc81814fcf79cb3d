//! The main process's log: timestamps, tail, stream separation, follow, the size bound, binary output,
//! and logs that outlive a daemon restart.
//!
//! Synchronisation is by content only: a main process that must write more after the test started
//! reading waits (inside the sandbox) for a file the test creates with an exec.

use sandbox_tests::sandbox_proto::client::{BlockingClient, LogStreamOptions};
use sandbox_tests::sandbox_proto::{LogEntry, OutputEncoding, SandboxStatus};
use sandbox_tests::{busybox, create, wait_exited, wait_pid_exit, Daemon};

fn entries(c: &BlockingClient, id: &str, opts: LogStreamOptions) -> Vec<LogEntry> {
    c.logs_stream(id, opts)
        .expect("logs stream")
        .map(|e| e.expect("log entry"))
        .collect()
}

fn texts<'a>(v: impl IntoIterator<Item = &'a LogEntry>) -> Vec<String> {
    v.into_iter()
        .map(|e| String::from_utf8_lossy(&e.bytes()).into_owned())
        .collect()
}

fn of(v: &[LogEntry], stream: &str) -> Vec<String> {
    texts(v.iter().filter(|e| e.stream == stream))
}

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ` as a comparable number of nanoseconds of the day plus the date.
fn parse_ts(ts: &str) -> (String, u64) {
    assert_eq!(ts.len(), 30, "{ts}");
    assert!(
        ts.ends_with('Z') && &ts[10..11] == "T" && &ts[19..20] == ".",
        "{ts}"
    );
    let hms: Vec<u64> = ts[11..19]
        .split(':')
        .map(|p| p.parse().expect("number"))
        .collect();
    let frac: u64 = ts[20..29].parse().expect("nanoseconds");
    let ns = ((hms[0] * 60 + hms[1]) * 60 + hms[2]) * 1_000_000_000 + frac;
    (ts[..10].to_owned(), ns)
}

#[test]
fn timestamps_streams_and_tail() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create(
        &c,
        &busybox(Some(&[
            "sh",
            "-c",
            "for i in 1 2 3 4 5; do echo out$i; done; echo err1 >&2; echo err2 >&2; printf no-newline",
        ])),
    );
    assert_eq!(wait_exited(&c, &sb.id).status, SandboxStatus::Completed);

    let all = entries(
        &c,
        &sb.id,
        LogStreamOptions {
            timestamps: true,
            ..LogStreamOptions::default()
        },
    );
    assert_eq!(
        of(&all, "stdout"),
        [
            "out1\n",
            "out2\n",
            "out3\n",
            "out4\n",
            "out5\n",
            "no-newline"
        ]
    );
    assert_eq!(of(&all, "stderr"), ["err1\n", "err2\n"]);
    // Every entry is stamped, and the stamps never go back.
    let stamps: Vec<(String, u64)> = all
        .iter()
        .map(|e| parse_ts(e.timestamp.as_deref().expect("timestamp")))
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "{stamps:?}");
    // Without `timestamps`, none.
    let plain = entries(&c, &sb.id, LogStreamOptions::default());
    assert_eq!(plain.len(), all.len());
    assert!(plain.iter().all(|e| e.timestamp.is_none()));

    // The last N lines, per stream and over both; the partial last line counts as a line.
    let only_out = LogStreamOptions {
        stderr: false,
        tail_lines: Some(2),
        ..LogStreamOptions::default()
    };
    assert_eq!(
        texts(&entries(&c, &sb.id, only_out)),
        ["out5\n", "no-newline"]
    );
    let only_err = LogStreamOptions {
        stdout: false,
        tail_lines: Some(1),
        ..LogStreamOptions::default()
    };
    assert_eq!(texts(&entries(&c, &sb.id, only_err)), ["err2\n"]);
    let last3 = entries(
        &c,
        &sb.id,
        LogStreamOptions {
            tail_lines: Some(3),
            ..LogStreamOptions::default()
        },
    );
    assert_eq!(texts(&last3), texts(&all[all.len() - 3..]));
    let none = LogStreamOptions {
        tail_lines: Some(0),
        ..LogStreamOptions::default()
    };
    assert!(entries(&c, &sb.id, none).is_empty());

    // The collected answer reads the same store.
    let logs = c.logs(&sb.id).expect("logs");
    assert_eq!(logs.stdout, "out1\nout2\nout3\nout4\nout5\nno-newline");
    assert_eq!(logs.stderr, "err1\nerr2\n");

    // sandboxctl: stdout entries to stdout, stderr ones to stderr; --tail and -t.
    let out = d.ctl(&["logs", &sb.name]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "out1\nout2\nout3\nout4\nout5\nno-newline"
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err1\nerr2\n");
    let out = d.ctl(&["logs", "--tail", "1", "-t", &sb.id]);
    assert!(out.status.success());
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let (ts, rest) = line.split_once(' ').expect("timestamp prefix");
    parse_ts(ts);
    assert_eq!(rest, "no-newline");
    assert!(out.stderr.is_empty());
}

#[test]
fn follow_streams_new_lines_and_ends_with_the_sandbox() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let sb = create(
        &c,
        &busybox(Some(&[
            "sh",
            "-c",
            "echo before; while [ ! -e /tmp/go ]; do usleep 1000; done; echo after-out; echo after-err >&2",
        ])),
    );
    let mut follow = c
        .logs_stream(
            &sb.id,
            LogStreamOptions {
                follow: true,
                ..LogStreamOptions::default()
            },
        )
        .expect("follow");
    let first = follow.next().expect("an entry").expect("entry");
    assert_eq!(texts([&first]), ["before\n"]);
    // Only now may the main process go on: what follows was written after the stream started. (Through
    // the files API: an exec that ends its sandbox would race the sandbox's end.)
    c.write_file(&sb.id, "/tmp/go", b"", None).expect("go");
    let rest: Vec<LogEntry> = follow.map(|e| e.expect("entry")).collect();
    assert_eq!(of(&rest, "stdout"), ["after-out\n"]);
    assert_eq!(of(&rest, "stderr"), ["after-err\n"]);
    // The stream ended because the sandbox did.
    let info = c.get(&sb.id).expect("get");
    assert_eq!(info.status, SandboxStatus::Completed, "{info:?}");

    // Following a finished sandbox sends everything and ends; so does `sandboxctl logs -f`.
    let again = entries(
        &c,
        &sb.id,
        LogStreamOptions {
            follow: true,
            ..LogStreamOptions::default()
        },
    );
    assert_eq!(again.len(), 3);
    let out = d.ctl(&["logs", "-f", &sb.id]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "before\nafter-out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "after-err\n");
}

#[test]
fn the_log_is_bounded_and_keeps_its_tail() {
    const MAX: u64 = 64 << 10;
    let d = Daemon::start_with_config(Some(&format!("[logs]\nmax_bytes = {MAX}\n")));
    d.import_busybox();
    let c = d.client();
    // About 590 KB of lines, nine times the bound, and a long line without newline at the end.
    let sb = create(
        &c,
        &busybox(Some(&[
            "sh",
            "-c",
            "seq 1 100000; head -c 20000 /dev/zero | tr '\\0' x",
        ])),
    );
    assert_eq!(wait_exited(&c, &sb.id).status, SandboxStatus::Completed);
    let dir = d.sandbox_dir(&sb.id);
    let size = |f: &str| std::fs::metadata(dir.join(f)).map_or(0, |m| m.len());
    let on_disk = size("main.log") + size("main.log.1");
    assert!(on_disk <= MAX, "{on_disk} bytes on disk, bound {MAX}");
    assert!(on_disk > MAX / 4, "{on_disk} bytes on disk");

    // The tail is intact: consecutive numbers up to 100000, then the long line in 16 KiB pieces.
    let logs = c.logs(&sb.id).expect("logs");
    let (numbers, xs) = logs
        .stdout
        .rsplit_once('\n')
        .expect("lines before the long one");
    assert_eq!(xs.len(), 20000);
    assert!(xs.bytes().all(|b| b == b'x'));
    let nums: Vec<u64> = numbers
        .lines()
        .skip(1) // the first line kept may be the end of a line cut by the rotation
        .map(|l| l.parse().expect("a number"))
        .collect();
    assert!(nums.len() > 100, "{} lines kept", nums.len());
    assert_eq!(nums.last(), Some(&100_000));
    assert!(
        nums.windows(2).all(|w| w[1] == w[0] + 1),
        "a gap in the tail"
    );
    let tail = entries(
        &c,
        &sb.id,
        LogStreamOptions {
            tail_lines: Some(2),
            ..LogStreamOptions::default()
        },
    );
    let t = texts(&tail);
    assert_eq!(t[0], "100000\n");
    // The long line comes in pieces of at most 16 KiB.
    assert_eq!(t[1..].concat(), xs);
    assert!(t[1..].iter().all(|p| p.len() <= 16 << 10) && t.len() >= 3);
}

#[test]
fn binary_output_survives() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    // Every byte value, twice, through printf's octal escapes.
    let fmt: String = (0..=255u32).map(|b| format!("\\{b:03o}")).collect();
    let fmt = format!("{fmt}{fmt}");
    let sb = create(
        &c,
        &busybox(Some(&[
            "sh",
            "-c",
            "printf \"$0\"; printf '\\377\\376' >&2",
            &fmt,
        ])),
    );
    assert_eq!(wait_exited(&c, &sb.id).status, SandboxStatus::Completed);
    let want: Vec<u8> = (0..=255u8).chain(0..=255u8).collect();
    let logs = c.logs(&sb.id).expect("logs");
    assert_eq!(logs.encoding, OutputEncoding::Base64);
    assert_eq!(logs.stdout_bytes(), want);
    assert_eq!(logs.stderr_bytes(), [0xff, 0xfe]);
    let all = entries(&c, &sb.id, LogStreamOptions::default());
    let out: Vec<u8> = all
        .iter()
        .filter(|e| !e.is_stderr())
        .flat_map(LogEntry::bytes)
        .collect();
    assert_eq!(out, want);
    assert!(all
        .iter()
        .any(|e| e.encoding == OutputEncoding::Base64 && e.is_stderr()));
    let out = d.ctl(&["logs", &sb.id]);
    assert_eq!(out.stdout, want);
    assert_eq!(out.stderr, [0xff, 0xfe]);
}

#[test]
fn logs_survive_a_daemon_kill() {
    let mut d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let script = "echo one; while [ ! -e /tmp/go ]; do usleep 1000; done; echo two; echo err2 >&2";
    let mut ra = busybox(Some(&["sh", "-c", script]));
    ra.name = Some("lg-a".into());
    let a = create(&c, &ra);
    let mut rb = busybox(Some(&["sh", "-c", script]));
    rb.name = Some("lg-b".into());
    let b = create(&c, &rb);
    for id in [&a.id, &b.id] {
        // The first line is logged: read it through a follow that is dropped at once.
        let first = c
            .logs_stream(
                id,
                LogStreamOptions {
                    follow: true,
                    ..LogStreamOptions::default()
                },
            )
            .expect("follow")
            .next()
            .expect("an entry")
            .expect("entry");
        assert_eq!(texts([&first]), ["one\n"]);
    }
    let shim: serde_json::Value = serde_json::from_slice(
        &std::fs::read(d.sandbox_dir(&a.id).join("shim.json")).expect("shim.json"),
    )
    .expect("json");
    let a_shim = shim["pid"].as_i64().expect("pid") as i32;
    let a_init = a.pid.expect("pid");

    d.kill9();
    // While the daemon is down, A goes on and ends: its supervisor logs the rest on its own. The file is
    // made through the sandbox's own root.
    std::fs::write(format!("/proc/{a_init}/root/tmp/go"), b"").expect("creating A's go file");
    wait_pid_exit(a_shim);

    d.restart();
    let c = d.client();
    let a2 = c.get(&a.id).expect("A");
    assert_eq!(a2.status, SandboxStatus::Completed, "{a2:?}");
    let logs = c.logs(&a.id).expect("logs of A");
    assert_eq!(
        (logs.stdout.as_str(), logs.stderr.as_str()),
        ("one\ntwo\n", "err2\n")
    );
    let all = entries(
        &c,
        &a.id,
        LogStreamOptions {
            follow: true,
            timestamps: true,
            ..LogStreamOptions::default()
        },
    );
    assert_eq!(texts(&all).len(), 3);

    // B still runs under the new daemon: following it works as before.
    let mut follow = c
        .logs_stream(
            &b.id,
            LogStreamOptions {
                follow: true,
                ..LogStreamOptions::default()
            },
        )
        .expect("follow B");
    assert_eq!(
        texts([&follow.next().expect("entry").expect("entry")]),
        ["one\n"]
    );
    c.write_file(&b.id, "/tmp/go", b"", None).expect("go B");
    let rest: Vec<LogEntry> = follow.map(|e| e.expect("entry")).collect();
    assert_eq!(of(&rest, "stdout"), ["two\n"]);
    assert_eq!(of(&rest, "stderr"), ["err2\n"]);
    assert_eq!(c.get(&b.id).expect("B").status, SandboxStatus::Completed);
}
