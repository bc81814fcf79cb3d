//! Checks that `openapi.yaml` documents exactly the API: its routes, and, for every wire type, the field
//! names and enum values serde produces. Simple line parsing; no YAML parser.

use std::collections::{BTreeMap, BTreeSet};

use sandbox_proto::client::openapi_routes;
use sandbox_proto::*;

fn route(m: &str, p: &str) -> (String, String) {
    (m.to_owned(), p.to_owned())
}

#[test]
fn routes_are_exactly_the_api() {
    let expected: BTreeSet<(String, String)> = [
        route("GET", "/v1/version"),
        route("POST", "/v1/sandboxes"),
        route("GET", "/v1/sandboxes"),
        route("GET", "/v1/sandboxes/{id}"),
        route("DELETE", "/v1/sandboxes/{id}"),
        route("POST", "/v1/sandboxes/{id}/stop"),
        route("POST", "/v1/sandboxes/{id}/wait"),
        route("POST", "/v1/sandboxes/{id}/exec"),
        route("GET", "/v1/sandboxes/{id}/logs"),
        route("POST", "/v1/images/import"),
        route("GET", "/v1/images"),
        route("GET", "/v1/images/{ref}"),
        route("DELETE", "/v1/images/{ref}"),
    ]
    .into_iter()
    .collect();
    let listed = openapi_routes(OPENAPI_YAML);
    let got: BTreeSet<_> = listed.iter().cloned().collect();
    assert_eq!(
        got.len(),
        listed.len(),
        "a route is listed twice: {listed:?}"
    );
    assert_eq!(got, expected);
    assert!(OPENAPI_YAML.starts_with("openapi: 3.0.3\n"));
}

/// The lines of `components: schemas: <name>:`, i.e. everything indented deeper than the name.
fn schema_block(name: &str) -> Vec<&'static str> {
    let mut lines = OPENAPI_YAML.lines();
    let mut in_components = false;
    let mut in_schemas = false;
    for line in lines.by_ref() {
        if line == "components:" {
            in_components = true;
        } else if in_components && line == "  schemas:" {
            in_schemas = true;
        } else if in_schemas && line == format!("    {name}:") {
            return lines
                .take_while(|l| l.trim().is_empty() || l.starts_with("      "))
                .collect();
        }
    }
    panic!("schema {name} not found in openapi.yaml");
}

/// Property names of an object schema (keys indented by 8 under `properties:`).
fn properties(name: &str) -> BTreeSet<String> {
    let block = schema_block(name);
    let mut out = BTreeSet::new();
    let mut in_props = false;
    for l in block {
        if l.starts_with("      ") && !l.starts_with("       ") {
            in_props = l.trim() == "properties:";
            continue;
        }
        if in_props && l.starts_with("        ") && !l.starts_with("         ") {
            if let Some(k) = l.trim().strip_suffix(':') {
                out.insert(k.to_owned());
            }
        }
    }
    out
}

/// `required: [a, b]` of an object schema.
fn required(name: &str) -> BTreeSet<String> {
    schema_block(name)
        .into_iter()
        .find_map(|l| l.strip_prefix("      required: ["))
        .map(|r| {
            r.trim_end_matches(']')
                .split(',')
                .map(|s| s.trim().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Values of a string enum schema (`- VALUE` lines under `enum:`).
fn enum_values(name: &str) -> Vec<String> {
    let block = schema_block(name);
    let mut out = Vec::new();
    let mut in_enum = false;
    for l in block {
        if l.starts_with("      ") && !l.starts_with("       ") {
            in_enum = l.trim() == "enum:";
            continue;
        }
        if in_enum {
            if let Some(v) = l.trim().strip_prefix("- ") {
                out.push(v.to_owned());
            }
        }
    }
    out
}

fn keys(v: &impl serde::Serialize) -> BTreeSet<String> {
    match serde_json::to_value(v).expect("serialise") {
        serde_json::Value::Object(m) => m.keys().cloned().collect(),
        other => panic!("not an object: {other}"),
    }
}

fn wire(v: &impl serde::Serialize) -> String {
    match serde_json::to_value(v).expect("serialise") {
        serde_json::Value::String(s) => s,
        other => panic!("not a string: {other}"),
    }
}

/// Checks the documented properties equal the serialised keys of a fully populated value, and that the
/// documented required fields are exactly those serde always writes (the keys of a minimal value).
fn check_object(name: &str, full: &impl serde::Serialize, minimal: &impl serde::Serialize) {
    assert_eq!(properties(name), keys(full), "properties of schema {name}");
    let always: BTreeSet<String> = keys(minimal);
    let req = required(name);
    assert!(
        req.is_subset(&always),
        "schema {name}: required {req:?} not always written ({always:?})"
    );
}

fn full_sandbox() -> SandboxInfo {
    SandboxInfo {
        id: "0123456789abcdef".into(),
        name: "web".into(),
        image: "docker.io/library/busybox:latest".into(),
        image_digest: "sha256:00".into(),
        status: SandboxStatus::Failed,
        status_reason: Some("r".into()),
        command: vec!["sh".into()],
        created_at: "t".into(),
        started_at: Some("t".into()),
        status_updated_at: "t".into(),
        finished_at: Some("t".into()),
        exit: Some(full_exit()),
        pid: Some(1),
        limits: full_limits(),
        host_uid: 100_000,
        tags: vec!["t".into()],
        auto_remove: true,
    }
}

fn full_exit() -> ExitInfo {
    ExitInfo {
        code: Some(1),
        signal: Some(9),
        oom_killed: true,
        reason: "r".into(),
    }
}

fn full_limits() -> ResourceLimits {
    ResourceLimits {
        memory_bytes: Some(1),
        cpu_millis: Some(1),
        pids: Some(1),
    }
}

fn full_image() -> ImageInfo {
    ImageInfo {
        references: vec!["r".into()],
        digest: "d".into(),
        config_digest: "c".into(),
        size: 1,
        created: Some("t".into()),
        platform: "linux/amd64".into(),
        layers: vec!["l".into()],
    }
}

#[test]
fn object_schemas_match_serde() {
    let full_resources = Resources {
        memory: Some("1".into()),
        cpu: Some("1".into()),
        pids: Some(1),
    };
    check_object("Resources", &full_resources, &Resources::default());
    check_object("ResourceLimits", &full_limits(), &ResourceLimits::default());
    let full_create = CreateSandboxRequest {
        image: "busybox".into(),
        name: Some("n".into()),
        command: Some(vec!["sh".into()]),
        use_image_command: true,
        env: BTreeMap::from([("A".into(), "B".into())]),
        cwd: Some("/".into()),
        user: Some("0".into()),
        resources: full_resources,
        tags: vec!["t".into()],
        auto_remove: true,
    };
    check_object(
        "CreateSandboxRequest",
        &full_create,
        &CreateSandboxRequest::default(),
    );
    check_object(
        "ExitInfo",
        &full_exit(),
        &ExitInfo {
            reason: "r".into(),
            ..ExitInfo::default()
        },
    );
    let minimal_sandbox = SandboxInfo {
        status_reason: None,
        started_at: None,
        finished_at: None,
        exit: None,
        pid: None,
        tags: vec![],
        ..full_sandbox()
    };
    check_object("SandboxInfo", &full_sandbox(), &minimal_sandbox);
    let list = SandboxList {
        sandboxes: vec![full_sandbox()],
    };
    check_object("SandboxList", &list, &list);
    check_object(
        "StopRequest",
        &StopRequest {
            grace_seconds: Some(1.0),
        },
        &StopRequest::default(),
    );
    check_object(
        "WaitRequest",
        &WaitRequest {
            condition: WaitCondition::Running,
            timeout_seconds: Some(1.0),
        },
        &WaitRequest::default(),
    );
    let full_exec = ExecRequest {
        command: vec!["sh".into()],
        cwd: Some("/".into()),
        env: BTreeMap::from([("A".into(), "B".into())]),
        user: Some("0".into()),
        timeout_seconds: Some(1.0),
        max_output_bytes: Some(1),
        stdin: Some("x".into()),
    };
    check_object("ExecRequest", &full_exec, &ExecRequest::default());
    let full_result = ExecResult {
        signal: Some(9),
        ..ExecResult::default()
    };
    check_object("ExecResult", &full_result, &ExecResult::default());
    check_object("LogsResult", &LogsResult::default(), &LogsResult::default());
    check_object(
        "ExecTimeoutDetails",
        &LogsResult::default(),
        &LogsResult::default(),
    );
    check_object(
        "ImportImageRequest",
        &ImportImageRequest {
            path: "/p".into(),
            reference: Some("r".into()),
        },
        &ImportImageRequest::default(),
    );
    let minimal_image = ImageInfo {
        created: None,
        ..full_image()
    };
    check_object("ImageInfo", &full_image(), &minimal_image);
    let images = ImageList {
        images: vec![full_image()],
    };
    check_object("ImageList", &images, &images);
    let version = VersionInfo {
        version: "0".into(),
        api_version: "v1".into(),
        cgroup_version: "v2".into(),
    };
    check_object("VersionInfo", &version, &version);
    let err = ApiError::new(ErrorCode::Internal, "m").with_details(serde_json::json!({}));
    check_object("ApiError", &err, &ApiError::new(ErrorCode::Internal, "m"));
    let body = ErrorBody { error: err };
    check_object("ErrorBody", &body, &body);
}

/// Every error code, by an exhaustive match: adding a variant breaks this until it is listed here.
fn all_error_codes() -> Vec<ErrorCode> {
    use ErrorCode::*;
    let all = [
        InvalidRequest,
        InvalidArgument,
        SandboxNotFound,
        SandboxNotRunning,
        SandboxRunning,
        NameConflict,
        ImageNotFound,
        InvalidImage,
        DigestMismatch,
        ImageInUse,
        StartFailed,
        ExecTimeout,
        WaitTimeout,
        ResourceExhausted,
        Internal,
        NotFound,
    ];
    for c in all {
        match c {
            InvalidRequest | InvalidArgument | SandboxNotFound | SandboxNotRunning
            | SandboxRunning | NameConflict | ImageNotFound | InvalidImage | DigestMismatch
            | ImageInUse | StartFailed | ExecTimeout | WaitTimeout | ResourceExhausted
            | Internal | NotFound => {}
        }
    }
    all.to_vec()
}

#[test]
fn enum_schemas_match_serde() {
    let statuses = [
        SandboxStatus::Pending,
        SandboxStatus::Creating,
        SandboxStatus::Running,
        SandboxStatus::Terminating,
        SandboxStatus::Completed,
        SandboxStatus::Failed,
        SandboxStatus::Terminated,
    ];
    for s in statuses {
        // Exhaustiveness guard.
        match s {
            SandboxStatus::Pending
            | SandboxStatus::Creating
            | SandboxStatus::Running
            | SandboxStatus::Terminating
            | SandboxStatus::Completed
            | SandboxStatus::Failed
            | SandboxStatus::Terminated => {}
        }
    }
    let w: Vec<String> = statuses.iter().map(wire).collect();
    assert_eq!(enum_values("SandboxStatus"), w);

    let w: Vec<String> = [
        WaitCondition::Exited,
        WaitCondition::Running,
        WaitCondition::Removed,
    ]
    .iter()
    .map(wire)
    .collect();
    assert_eq!(enum_values("WaitCondition"), w);
    assert_eq!(w, ["exited", "running", "removed"]);

    let w: Vec<String> = [OutputEncoding::Utf8, OutputEncoding::Base64]
        .iter()
        .map(wire)
        .collect();
    assert_eq!(enum_values("OutputEncoding"), w);
    assert_eq!(w, ["utf8", "base64"]);

    let codes = all_error_codes();
    let w: Vec<String> = codes.iter().map(wire).collect();
    assert_eq!(enum_values("ErrorCode"), w);
    // The description lists each code with its HTTP status.
    let block = schema_block("ErrorCode").join("\n");
    for c in codes {
        let entry = format!("{} {}", c.as_str(), c.http_status());
        assert!(
            block.contains(&entry),
            "ErrorCode description lacks {entry:?}"
        );
        assert_eq!(wire(&c), c.as_str());
    }
}

#[test]
fn every_ref_resolves() {
    let mut schemas = BTreeSet::new();
    let mut in_schemas = false;
    for l in OPENAPI_YAML.lines() {
        if l == "  schemas:" {
            in_schemas = true;
            continue;
        }
        if in_schemas && l.starts_with("    ") && !l.starts_with("     ") {
            schemas.insert(l.trim().trim_end_matches(':').to_owned());
        }
    }
    for l in OPENAPI_YAML.lines() {
        if let Some(r) = l.trim().strip_prefix("$ref: '#/components/") {
            let r = r.trim_end_matches('\'');
            let (kind, name) = r.split_once('/').expect("kind/name");
            let header = format!("  {kind}:");
            assert!(
                OPENAPI_YAML.lines().any(|l| l == header),
                "no components.{kind}"
            );
            if kind == "schemas" {
                assert!(schemas.contains(name), "dangling $ref {r}");
            } else {
                let def = format!("    {name}:");
                assert!(OPENAPI_YAML.lines().any(|l| l == def), "dangling $ref {r}");
            }
        }
    }
}
