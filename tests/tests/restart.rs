//! Restart survival: sandboxes outlive a `kill -9` of the daemon and are re-adopted; half-created ones
//! are cleaned up at start.

use std::io::Write as _;

use sandbox_tests::sandbox_proto::{ErrorCode, SandboxStatus};
use sandbox_tests::{
    busybox, create, create_idle, exec, expect_api_error, sh, wait_pid_exit, Daemon,
};

#[test]
fn sandboxes_survive_a_daemon_kill_and_report_exits_that_happened_meanwhile() {
    let mut d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let a = create_idle(&c, "rs-a");
    // B's main waits for a line on a FIFO. The FIFO is made by an exec below; the main's loop runs inside
    // the sandbox because nothing outside can be told when a file appears there.
    let mut req = busybox(Some(&[
        "sh",
        "-c",
        "while [ ! -p /tmp/f ]; do usleep 1000; done; read x < /tmp/f; exit 7",
    ]));
    req.name = Some("rs-b".into());
    let b = create(&c, &req);
    sh(&c, &b.id, "mkfifo /tmp/f");

    let b_dir = d.sandbox_dir(&b.id);
    let shim: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b_dir.join("shim.json")).expect("shim.json"))
            .expect("shim.json is JSON");
    let shim_pid = shim["pid"].as_i64().expect("shim pid") as i32;
    let a_init = a.pid.expect("pid of A") as i32;

    let b_init = b.pid.expect("pid of B") as i32;

    d.kill9();
    // While the daemon is down: B's main gets its line and exits. The FIFO is opened through the
    // sandbox's own root (`/proc/<init>/root`): a FIFO opened through the overlay is a different pipe from
    // the same FIFO opened in the upper directory. Opening it for writing waits until B's main has it
    // open for reading; done in a thread so that a broken sandbox fails the test instead of hanging it.
    let fifo = std::path::PathBuf::from(format!("/proc/{b_init}/root/tmp/f"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .and_then(|mut w| w.write_all(b"go\n"))
            .map_err(|e| format!("writing to {}: {e}", fifo.display()));
        let _ = tx.send(r);
    });
    rx.recv_timeout(std::time::Duration::from_secs(120))
        .expect("B's main never opened its FIFO")
        .expect("writing B's FIFO");
    wait_pid_exit(shim_pid);
    assert!(
        b_dir.join("exit.json").exists(),
        "the supervisor recorded no exit"
    );
    // A is untouched by the daemon's death.
    assert!(std::path::Path::new(&format!("/proc/{a_init}")).exists());

    d.restart();
    let c = d.client();
    let b2 = c.get("rs-b").expect("B after restart");
    assert_eq!(b2.status, SandboxStatus::Failed, "{b2:?}");
    assert_eq!(b2.exit.as_ref().and_then(|e| e.code), Some(7), "{b2:?}");
    let a2 = c.get("rs-a").expect("A after restart");
    assert_eq!(a2.status, SandboxStatus::Running);
    assert_eq!(a2.pid, a.pid);
    assert_eq!(exec(&c, &a.id, &["echo", "ok"]).stdout, "ok\n");
    let names: Vec<String> = c
        .list(&[], None)
        .expect("list")
        .sandboxes
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&"rs-a".to_owned()) && names.contains(&"rs-b".to_owned()));
    // B's cgroup went away with it; A's is there.
    let cgs: Vec<String> = d
        .sandbox_cgroups()
        .iter()
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert!(!cgs.contains(&b.id), "{cgs:?}");
    assert!(cgs.contains(&a.id), "{cgs:?}");
    d.assert_only_sandboxes(&{
        let mut v = [a.id.as_str(), b.id.as_str()];
        v.sort();
        v
    });

    // A re-adopted sandbox is still supervised: stop works and records the outcome.
    let stopped = c.stop(&a.id, Some(30.0)).expect("stop A");
    assert_eq!(stopped.status, SandboxStatus::Terminated);
}

#[test]
fn a_graceful_restart_keeps_sandboxes_running() {
    let mut d = Daemon::start();
    d.import_busybox();
    let a = create_idle(&d.client(), "rs-graceful");
    d.restart(); // SIGTERM, then start again
    let c = d.client();
    let info = c.get(&a.id).expect("get");
    assert_eq!(info.status, SandboxStatus::Running);
    assert_eq!(sh(&c, &a.id, "hostname").trim(), "rs-graceful");
    // Images survive too.
    assert!(!c.images().expect("images").images.is_empty());
}

#[test]
fn half_created_sandboxes_are_cleaned_up_at_start() {
    let mut d = Daemon::start();
    d.import_busybox();
    let keep = create_idle(&d.client(), "rs-keep");
    d.kill9();

    let orphan = "0123456789abcdef";
    std::fs::create_dir_all(d.sandbox_dir(orphan).join("upper")).expect("orphan dir");
    let mut made = Vec::new();
    for ctl in ["memory", "pids", "cpu"] {
        let dir = d.cgroup_parent_of(ctl).join(orphan);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        made.push(dir);
    }
    // A second kind: a record that says creation never finished.
    let creating = "fedcba9876543210";
    let rec_src = std::fs::read(d.sandbox_dir(&keep.id).join("sandbox.json")).expect("record");
    let mut rec: serde_json::Value = serde_json::from_slice(&rec_src).expect("json");
    rec["id"] = creating.into();
    rec["name"] = "rs-creating".into();
    rec["status"] = "CREATING".into();
    rec["init"] = serde_json::Value::Null;
    rec["shim"] = serde_json::Value::Null;
    rec["cgroup"] = serde_json::Value::Null;
    std::fs::create_dir(d.sandbox_dir(creating)).expect("dir");
    std::fs::write(
        d.sandbox_dir(creating).join("sandbox.json"),
        serde_json::to_vec(&rec).expect("encode"),
    )
    .expect("write record");
    let pids_dir = d.cgroup_parent_of("pids").join(creating);
    std::fs::create_dir(&pids_dir).expect("mkdir");
    made.push(pids_dir);

    d.restart();
    for dir in &made {
        assert!(!dir.exists(), "{} survived the restart", dir.display());
    }
    d.assert_only_sandboxes(&[&keep.id]);
    let c = d.client();
    expect_api_error(c.get("rs-creating"), ErrorCode::SandboxNotFound, 404);
    let list = c.list(&[], None).expect("list").sandboxes;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id, keep.id);
    assert_eq!(list[0].status, SandboxStatus::Running);
}
