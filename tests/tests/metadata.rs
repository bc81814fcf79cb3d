//! Lifetimes (also across daemon restarts), resource requests and limits, annotations and list filters.

use std::collections::BTreeMap;

use sandbox_tests::sandbox_proto::client::BlockingClient;
use sandbox_tests::sandbox_proto::{
    ErrorCode, ResourceValues, Resources, SandboxInfo, SandboxStatus, WaitCondition, WaitRequest,
};
use sandbox_tests::{busybox, create, create_idle, expect_api_error, Daemon};

/// Waits (bounded by the wait endpoint's timeout, not by sleeping) until the sandbox has ended.
fn wait_end(c: &BlockingClient, id: &str) -> SandboxInfo {
    c.wait(
        id,
        WaitRequest {
            condition: WaitCondition::Exited,
            timeout_seconds: Some(120.0),
        },
    )
    .unwrap_or_else(|e| panic!("waiting for {id}: {e}"))
}

fn assert_lifetime_end(info: &SandboxInfo) {
    assert_eq!(info.status, SandboxStatus::Terminated, "{info:?}");
    let reason = info.status_reason.as_deref().unwrap_or_default();
    assert!(reason.contains("lifetime"), "{reason:?}");
}

#[test]
fn max_lifetime_ends_sandboxes_terminated() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let mut idle = busybox(None);
    idle.max_lifetime_seconds = Some(1.0);
    let idle = create(&c, &idle);
    assert_eq!(idle.max_lifetime_seconds, Some(1.0));
    assert!(idle.expires_at.is_some(), "{idle:?}");
    let mut busy = busybox(Some(&["sleep", "1000"]));
    busy.max_lifetime_seconds = Some(1.5);
    let busy = create(&c, &busy);
    for id in [&idle.id, &busy.id] {
        assert_lifetime_end(&wait_end(&c, id));
    }
    // A sandbox without a lifetime is untouched, and bad lifetimes are refused.
    let plain = create_idle(&c, "md-plain");
    assert_eq!(plain.expires_at, None);
    for bad in [0.0, -3.0, 1e12] {
        let mut req = busybox(None);
        req.max_lifetime_seconds = Some(bad);
        let e = expect_api_error(c.create(&req), ErrorCode::InvalidArgument, 400);
        assert_eq!(e.details.expect("details")["field"], "max_lifetime_seconds");
    }
    assert_eq!(
        c.get(&plain.id).expect("get").status,
        SandboxStatus::Running
    );
}

#[test]
fn lifetimes_hold_across_daemon_restarts() {
    let mut d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    // A runs out while the daemon is down; B only after the daemon is back (its timer is re-armed).
    let mut a = busybox(Some(&["sleep", "1000"]));
    a.max_lifetime_seconds = Some(3600.0);
    let a = create(&c, &a);
    let mut b = busybox(None);
    b.max_lifetime_seconds = Some(12.0);
    let b = create(&c, &b);
    d.kill9();
    // The condition under test: A's deadline passes while no daemon runs. Rather than waiting for the
    // wall clock, move the persisted deadline into the past, as the clock would have.
    let rec_path = d.sandbox_dir(&a.id).join("sandbox.json");
    let mut rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&rec_path).expect("record")).expect("json");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    assert!(rec["deadline_ms"].as_u64().expect("deadline") > now_ms);
    rec["deadline_ms"] = serde_json::json!(now_ms - 1000);
    std::fs::write(&rec_path, serde_json::to_vec(&rec).expect("json")).expect("write record");
    // Nobody enforced it meanwhile: A's init still runs.
    let a_init = a.pid.expect("pid");
    assert!(
        std::path::Path::new(&format!("/proc/{a_init}")).exists(),
        "A ended without a daemon"
    );
    d.restart();
    let c = d.client();
    assert_lifetime_end(&wait_end(&c, &a.id));
    let b_now = c.get(&b.id).expect("B");
    assert_eq!(b_now.status, SandboxStatus::Running, "{b_now:?}");
    assert_lifetime_end(&wait_end(&c, &b.id));
}

#[test]
fn resources_are_parsed_and_requests_applied() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let bad = |r: Resources, field: &str| {
        let mut req = busybox(None);
        req.resources = r;
        let e = expect_api_error(c.create(&req), ErrorCode::InvalidArgument, 400);
        assert_eq!(e.details.expect("details")["field"], field, "{}", e.message);
    };
    let vals = |cpu: Option<&str>, memory: Option<&str>| {
        Some(ResourceValues {
            cpu: cpu.map(str::to_owned),
            memory: memory.map(str::to_owned),
            pids: None,
        })
    };
    bad(
        Resources {
            limits: vals(None, Some("12Qi")),
            ..Resources::default()
        },
        "resources.limits.memory",
    );
    bad(
        Resources {
            requests: vals(Some("half"), None),
            ..Resources::default()
        },
        "resources.requests.cpu",
    );
    bad(
        Resources {
            memory: Some("1.5.5Gi".into()),
            ..Resources::default()
        },
        "resources.memory",
    );
    bad(
        Resources {
            requests: vals(None, Some("1Gi")),
            limits: vals(None, Some("512Mi")),
            ..Resources::default()
        },
        "resources.requests.memory",
    );
    bad(
        Resources {
            cpu: Some("500m".into()),
            requests: vals(Some("1"), None),
            ..Resources::default()
        },
        "resources.requests.cpu",
    );
    // Nothing of the refused creations is left.
    d.assert_only_sandboxes(&[]);

    let mut req = busybox(None);
    req.resources = Resources {
        cpu: Some("2".into()),
        requests: vals(Some("250m"), Some("32Mi")),
        limits: vals(None, Some("64Mi")),
        ..Resources::default()
    };
    let sb = create(&c, &req);
    assert_eq!(sb.requests.cpu_millis, Some(250));
    assert_eq!(sb.requests.memory_bytes, Some(32 << 20));
    assert_eq!(sb.limits.cpu_millis, Some(2000));
    assert_eq!(sb.limits.memory_bytes, Some(64 << 20));
    let read = |ctl: &str, file: &str| {
        let p = d.cgroup_parent_of(ctl).join(&sb.id).join(file);
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
            .trim()
            .to_owned()
    };
    if c.version().expect("version").cgroup_version == "v1" {
        assert_eq!(read("cpu", "cpu.shares"), "256");
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "200000");
        assert_eq!(
            read("memory", "memory.soft_limit_in_bytes"),
            (32u64 << 20).to_string()
        );
        assert_eq!(
            read("memory", "memory.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
    } else {
        assert_eq!(read("cpu", "cpu.weight"), "10");
        assert_eq!(read("memory", "memory.low"), (32u64 << 20).to_string());
        assert_eq!(read("memory", "memory.max"), (64u64 << 20).to_string());
    }
    // Top-level values are requests too.
    let mut req = busybox(None);
    req.resources = Resources {
        cpu: Some("0.5".into()),
        ..Resources::default()
    };
    let sb2 = create(&c, &req);
    assert_eq!(sb2.requests.cpu_millis, Some(500));
    assert_eq!(sb2.limits.cpu_millis, Some(500));
}

#[test]
fn annotations_and_list_filters() {
    let d = Daemon::start();
    d.import_busybox();
    let c = d.client();
    let make = |name: &str, tags: &[&str]| {
        let mut req = busybox(None);
        req.name = Some(name.into());
        req.tags = tags.iter().map(|t| (*t).to_owned()).collect();
        req.annotations = BTreeMap::from([("owner".to_owned(), format!("{name}@example"))]);
        create(&c, &req)
    };
    let both = make("md-both", &["x", "y"]);
    let x = make("md-x", &["x"]);
    let _y = make("md-y", &["y"]);
    assert_eq!(both.annotations["owner"], "md-both@example");
    assert_eq!(
        c.get("md-x").expect("get").annotations["owner"],
        "md-x@example"
    );
    let names = |l: Vec<SandboxInfo>| l.into_iter().map(|s| s.name).collect::<Vec<_>>();
    let l = c.list_filtered(&[], &["x", "y"]).expect("list");
    assert_eq!(names(l.sandboxes), ["md-both"]);
    let mut l = names(c.list_filtered(&[], &["x"]).expect("list").sandboxes);
    l.sort();
    assert_eq!(l, ["md-both", "md-x"]);
    assert!(c
        .list_filtered(&[], &["x", "nope"])
        .expect("list")
        .sandboxes
        .is_empty());
    // Statuses (any of) and tags (all of) together, on the wire.
    c.stop(&x.id, Some(0.0)).expect("stop");
    let (status, body) = c
        .request_raw("GET", "/v1/sandboxes?tag=x&status=RUNNING,COMPLETED", None)
        .expect("raw list");
    assert_eq!(status, 200);
    let v = sandbox_tests::json(&body);
    let listed: Vec<&str> = v["sandboxes"]
        .as_array()
        .expect("array")
        .iter()
        .map(|s| s["name"].as_str().expect("name"))
        .collect();
    assert_eq!(listed, ["md-both"]);
    let (status, _) = c
        .request_raw("GET", "/v1/sandboxes?tag=x&status=NOPE", None)
        .expect("raw");
    assert_eq!(status, 400);

    // Bad annotations.
    let mut req = busybox(None);
    req.annotations = BTreeMap::from([(String::new(), "v".to_owned())]);
    let e = expect_api_error(c.create(&req), ErrorCode::InvalidArgument, 400);
    assert_eq!(e.details.expect("details")["field"], "annotations");
    req.annotations = BTreeMap::from([("big".to_owned(), "v".repeat(300 << 10))]);
    expect_api_error(c.create(&req), ErrorCode::InvalidArgument, 400);

    // sandboxctl: run --annotation --max-lifetime, ls --tag (repeatable).
    let id = d
        .ctl_ok(&[
            "run",
            "-d",
            "--name",
            "md-cli",
            "--tag",
            "x",
            "--tag",
            "y",
            "--annotation",
            "team=ml",
            "--max-lifetime",
            "600",
            "busybox",
        ])
        .trim()
        .to_owned();
    let info = c.get(&id).expect("get");
    assert_eq!(info.annotations["team"], "ml");
    assert_eq!(info.max_lifetime_seconds, Some(600.0));
    let out = d.ctl_ok(&["ls", "--tag", "x", "--tag", "y"]);
    assert!(out.contains("md-cli") && out.contains("md-both"), "{out}");
    assert!(!out.contains("md-x ") && !out.contains("md-y "), "{out}");
}
