//! Checks that `openapi.yaml` documents exactly the API: its routes, and, for every wire type, the field
//! names, required fields and enum values serde produces. Simple line parsing; no YAML parser.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde::Serialize;

use sandbox_proto::client::openapi_routes;
use sandbox_proto::*;

fn route(m: &str, p: &str) -> (String, String) {
    (m.to_owned(), p.to_owned())
}

#[test]
fn routes_are_exactly_the_api() {
    let expected: BTreeSet<(String, String)> = [
        route("GET", "/v1/version"),
        route("GET", "/v1/system/df"),
        route("POST", "/v1/sandboxes"),
        route("GET", "/v1/sandboxes"),
        route("GET", "/v1/sandboxes/{id}"),
        route("DELETE", "/v1/sandboxes/{id}"),
        route("POST", "/v1/sandboxes/{id}/stop"),
        route("POST", "/v1/sandboxes/{id}/wait"),
        route("POST", "/v1/sandboxes/{id}/exec"),
        route("POST", "/v1/sandboxes/{id}/exec/stream"),
        route("GET", "/v1/sandboxes/{id}/logs"),
        route("GET", "/v1/sandboxes/{id}/logs/stream"),
        route("GET", "/v1/sandboxes/{id}/files"),
        route("PUT", "/v1/sandboxes/{id}/files"),
        route("POST", "/v1/images/import"),
        route("POST", "/v1/images/pull"),
        route("POST", "/v1/images/prune"),
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

/// The lines of property `prop` of schema `name` (everything indented deeper than the property's key).
fn property_block(name: &str, prop: &str) -> Vec<&'static str> {
    let key = format!("        {prop}:");
    let mut lines = schema_block(name).into_iter();
    let mut found = false;
    for l in lines.by_ref() {
        if l == key {
            found = true;
            break;
        }
    }
    assert!(found, "schema {name} has no property {prop}");
    lines
        .take_while(|l| l.trim().is_empty() || l.starts_with("          "))
        .collect()
}

/// Whether an object schema says `additionalProperties: false` (at its top level).
fn closed(name: &str) -> bool {
    schema_block(name).contains(&"      additionalProperties: false")
}

/// Names of the schemas some check below has compared with serde (see `every_schema_is_checked`).
static CHECKED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn checked(name: &str) {
    CHECKED.lock().unwrap().insert(name.to_owned());
}

fn json_object(v: &impl Serialize) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(v).expect("serialise") {
        serde_json::Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn keys(v: &impl Serialize) -> BTreeSet<String> {
    json_object(v).keys().cloned().collect()
}

fn wire(v: &impl Serialize) -> String {
    match serde_json::to_value(v).expect("serialise") {
        serde_json::Value::String(s) => s,
        other => panic!("not a string: {other}"),
    }
}

/// The keys of `full`'s JSON without which `T` does not deserialise.
fn needed_keys<T: Serialize + DeserializeOwned>(full: &T) -> BTreeSet<String> {
    let obj = json_object(full);
    obj.keys()
        .filter(|k| {
            let mut less = obj.clone();
            less.remove(*k);
            serde_json::from_value::<T>(serde_json::Value::Object(less)).is_err()
        })
        .cloned()
        .collect()
}

/// Checks an object schema against serde:
/// - the documented properties equal the serialised keys of a fully populated value;
/// - the documented required fields include every field serde cannot do without when reading, and are
///   all always written (the keys of a minimal value); for a request body (`additionalProperties: false`)
///   they are exactly the fields serde cannot do without;
/// - `additionalProperties: false` is documented exactly when serde refuses unknown fields.
fn check_object<T: Serialize + DeserializeOwned>(name: &str, full: &T, minimal: &T) {
    checked(name);
    assert_eq!(properties(name), keys(full), "properties of schema {name}");
    serde_json::from_value::<T>(serde_json::to_value(full).unwrap())
        .unwrap_or_else(|e| panic!("schema {name}: the full value does not read back: {e}"));
    let always: BTreeSet<String> = keys(minimal);
    let needed = needed_keys(full);
    let req = required(name);
    assert!(
        req.is_subset(&always),
        "schema {name}: required {req:?} not always written ({always:?})"
    );
    assert!(
        needed.is_subset(&req),
        "schema {name}: serde needs {needed:?}, the schema requires only {req:?}"
    );
    let mut extra = json_object(full);
    extra.insert("x_unknown_field".into(), serde_json::Value::Bool(true));
    let refuses_unknown = serde_json::from_value::<T>(serde_json::Value::Object(extra)).is_err();
    assert_eq!(
        closed(name),
        refuses_unknown,
        "schema {name}: additionalProperties: false iff serde denies unknown fields"
    );
    if refuses_unknown {
        assert_eq!(req, needed, "request schema {name}: required fields");
    }
}

/// Checks a string enum schema lists exactly these values, in this order, as serde writes them.
fn check_enum<T: Serialize>(name: &str, values: &[T]) -> Vec<String> {
    checked(name);
    let w: Vec<String> = values.iter().map(wire).collect();
    assert_eq!(enum_values(name), w, "values of enum schema {name}");
    w
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
        annotations: BTreeMap::from([("k".into(), "v".into())]),
        max_lifetime_seconds: Some(1.0),
        expires_at: Some("t".into()),
        requests: full_limits(),
        mounted_files: vec!["/etc/app.conf".into()],
        volumes: vec![full_volume()],
        network: Some(full_network_info()),
        exposed_ports: vec![full_exposed()],
    }
}

fn full_network_options() -> NetworkOptions {
    NetworkOptions {
        deny_egress: true,
        deny_ingress: false,
        egress: vec![full_egress_rule()],
        session_peers: true,
    }
}

fn full_egress_rule() -> EgressRule {
    EgressRule {
        cidr: Some("10.0.0.0/8".into()),
        dns_name: Some("example.org".into()),
        ports: vec![443],
        protocol: Some("tcp".into()),
    }
}

fn full_service() -> ServiceSpec {
    ServiceSpec {
        port: 8000,
        protocol: Some("tcp".into()),
        host_port: Some(18000),
        host_ip: Some("127.0.0.1".into()),
    }
}

fn full_exposed() -> ExposedPort {
    ExposedPort {
        port: 8000,
        protocol: "tcp".into(),
        host_ip: "127.0.0.1".into(),
        host_port: 18000,
    }
}

fn full_network_info() -> NetworkInfo {
    NetworkInfo {
        mode: "bridge".into(),
        address: Some("10.88.0.2".into()),
        gateway: Some("10.88.0.1".into()),
        address6: Some("fd00:88::2".into()),
        gateway6: Some("fd00:88::1".into()),
        interface: Some("eth0".into()),
        host_interface: Some("sbx01234567".into()),
        dns: vec!["192.0.2.53".into()],
        policy: full_network_options(),
    }
}

fn full_volume() -> VolumeSpec {
    VolumeSpec {
        name: "scratch".into(),
        mount_path: "/scratch".into(),
        size: "64Mi".into(),
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
        repo_digests: vec!["docker.io/library/busybox@sha256:00".into()],
    }
}

fn full_layer() -> LayerProgress {
    LayerProgress {
        digest: "sha256:01".into(),
        size: 10,
        status: LayerStatus::Downloading,
        downloaded: 5,
    }
}

fn full_pull_result() -> PullResult {
    PullResult {
        image: full_image(),
        resolved_digest: "sha256:02".into(),
        downloaded_bytes: 10,
        layers_downloaded: 1,
        layers_present: 1,
        joined: true,
    }
}

#[test]
fn object_schemas_match_serde() {
    let full_resources = Resources {
        memory: Some("1".into()),
        cpu: Some("1".into()),
        pids: Some(1),
        requests: Some(ResourceValues {
            memory: Some("1".into()),
            cpu: Some("1".into()),
            pids: None,
        }),
        limits: Some(ResourceValues {
            memory: Some("1".into()),
            cpu: Some("1".into()),
            pids: Some(1),
        }),
    };
    check_object("Resources", &full_resources, &Resources::default());
    check_object(
        "ResourceValues",
        &ResourceValues {
            memory: Some("1".into()),
            cpu: Some("1".into()),
            pids: Some(1),
        },
        &ResourceValues::default(),
    );
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
        pull: PullPolicy::Always,
        max_lifetime_seconds: Some(1.0),
        annotations: BTreeMap::from([("k".into(), "v".into())]),
        mounted_files: vec![MountedFile {
            mount_path: "/etc/app.conf".into(),
            file_content: "aGk=".into(),
            mode: Some(0o444),
        }],
        volumes: vec![full_volume()],
        network: Some(full_network_options()),
        services: vec![full_service()],
    };
    check_object(
        "CreateSandboxRequest",
        &full_create,
        &CreateSandboxRequest::default(),
    );
    check_object(
        "MountedFile",
        &full_create.mounted_files[0],
        &MountedFile {
            mode: None,
            ..full_create.mounted_files[0].clone()
        },
    );
    check_object("VolumeSpec", &full_volume(), &full_volume());
    check_object(
        "NetworkOptions",
        &full_network_options(),
        &NetworkOptions::default(),
    );
    check_object("EgressRule", &full_egress_rule(), &EgressRule::default());
    check_object(
        "ServiceSpec",
        &full_service(),
        &ServiceSpec {
            port: 8000,
            ..ServiceSpec::default()
        },
    );
    check_object("ExposedPort", &full_exposed(), &full_exposed());
    check_object(
        "NetworkInfo",
        &full_network_info(),
        &NetworkInfo {
            mode: "none".into(),
            ..NetworkInfo::default()
        },
    );
    let file_info = FileInfo {
        path: "/data/x".into(),
        size: 1,
        mode: 0o644,
    };
    check_object("FileInfo", &file_info, &file_info);
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
        network: None,
        exposed_ports: vec![],
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
    let full_init = sandbox_proto::stream::ExecStreamInit {
        command: vec!["sh".into()],
        cwd: Some("/".into()),
        env: BTreeMap::from([("A".into(), "B".into())]),
        user: Some("0".into()),
        timeout_seconds: Some(1.0),
        stdin: true,
        tty: true,
        width: Some(80),
        height: Some(24),
    };
    check_object(
        "ExecStreamInit",
        &full_init,
        &sandbox_proto::stream::ExecStreamInit::default(),
    );
    let full_exit = sandbox_proto::stream::ExecExit {
        exit_code: 137,
        signal: Some(9),
        timed_out: true,
        cancelled: true,
        duration_ms: 1.0,
    };
    check_object(
        "ExecExit",
        &full_exit,
        &sandbox_proto::stream::ExecExit {
            signal: None,
            ..full_exit.clone()
        },
    );
    check_object("LogsResult", &LogsResult::default(), &LogsResult::default());
    check_object(
        "LogEntry",
        &LogEntry {
            stream: "stderr".into(),
            data: "AAE=".into(),
            encoding: OutputEncoding::Base64,
            timestamp: Some("2026-01-02T03:04:05.123456789Z".into()),
        },
        &LogEntry {
            stream: "stdout".into(),
            data: "line\n".into(),
            encoding: OutputEncoding::Utf8,
            timestamp: None,
        },
    );
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
        repo_digests: vec![],
        ..full_image()
    };
    check_object("ImageInfo", &full_image(), &minimal_image);
    let images = ImageList {
        images: vec![full_image()],
    };
    check_object("ImageList", &images, &images);
    check_object(
        "PullImageRequest",
        &PullImageRequest {
            reference: "python:3.11".into(),
            platform: Some("linux/arm64/v8".into()),
        },
        &PullImageRequest::default(),
    );
    check_object("LayerProgress", &full_layer(), &full_layer());
    let minimal_pull = PullResult {
        joined: false,
        ..full_pull_result()
    };
    check_object("PullResult", &full_pull_result(), &minimal_pull);
    check_object(
        "PruneImagesRequest",
        &PruneImagesRequest { all: true },
        &PruneImagesRequest::default(),
    );
    let report = PruneReport {
        images_removed: vec!["sha256:03".into()],
        blobs_removed: 1,
        layers_removed: 1,
        reclaimed_bytes: 1,
    };
    check_object("PruneReport", &report, &PruneReport::default());
    let usage = ImageUsage {
        references: vec!["r".into()],
        digest: "sha256:04".into(),
        total_bytes: 2,
        unique_bytes: 1,
        sandboxes: 1,
    };
    check_object(
        "ImageUsage",
        &usage,
        &ImageUsage {
            references: vec![],
            ..usage.clone()
        },
    );
    let df = DiskUsage {
        images: vec![usage],
        blobs: 1,
        blob_bytes: 1,
        layers: 1,
        layer_bytes: 1,
        reclaimable_bytes: 1,
    };
    check_object("DiskUsage", &df, &DiskUsage::default());
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
        RegistryUnreachable,
        RegistryError,
        RegistryUnauthorized,
        PlatformNotFound,
        PullTimeout,
        HostileLayer,
        FileNotFound,
        FileReadOnly,
        FileError,
        PortInUse,
        NetworkError,
        Internal,
        NotFound,
    ];
    for c in all {
        match c {
            InvalidRequest | InvalidArgument | SandboxNotFound | SandboxNotRunning
            | SandboxRunning | NameConflict | ImageNotFound | InvalidImage | DigestMismatch
            | ImageInUse | StartFailed | ExecTimeout | WaitTimeout | ResourceExhausted
            | RegistryUnreachable | RegistryError | RegistryUnauthorized | PlatformNotFound
            | PullTimeout | HostileLayer | FileNotFound | FileReadOnly | FileError | PortInUse
            | NetworkError | Internal | NotFound => {}
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
    check_enum("SandboxStatus", &statuses);

    let w = check_enum(
        "WaitCondition",
        &[
            WaitCondition::Exited,
            WaitCondition::Running,
            WaitCondition::Removed,
        ],
    );
    assert_eq!(w, ["exited", "running", "removed"]);

    let w = check_enum(
        "OutputEncoding",
        &[OutputEncoding::Utf8, OutputEncoding::Base64],
    );
    assert_eq!(w, ["utf8", "base64"]);

    let policies = [PullPolicy::Missing, PullPolicy::Always, PullPolicy::Never];
    for p in policies {
        match p {
            PullPolicy::Missing | PullPolicy::Always | PullPolicy::Never => {}
        }
    }
    let w = check_enum("PullPolicy", &policies);
    assert_eq!(w, ["missing", "always", "never"]);
    // The default is documented, and is the one serde leaves out.
    assert!(schema_block("PullPolicy").contains(&"      default: missing"));
    assert_eq!(PullPolicy::default(), PullPolicy::Missing);

    let layer_statuses = [
        LayerStatus::Waiting,
        LayerStatus::Downloading,
        LayerStatus::Exists,
        LayerStatus::Done,
    ];
    for s in layer_statuses {
        match s {
            LayerStatus::Waiting
            | LayerStatus::Downloading
            | LayerStatus::Exists
            | LayerStatus::Done => {}
        }
    }
    let w = check_enum("LayerStatus", &layer_statuses);
    assert_eq!(w, ["waiting", "downloading", "exists", "done"]);

    let codes = all_error_codes();
    check_enum("ErrorCode", &codes);
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

/// Every progress event, by an exhaustive match: adding a variant breaks this until it is listed here.
fn all_pull_events() -> Vec<PullEvent> {
    let all = vec![
        PullEvent::Resolved {
            reference: "docker.io/library/python:3.11".into(),
            resolved_digest: "sha256:05".into(),
            digest: "sha256:06".into(),
            platform: "linux/amd64".into(),
            layers: vec![full_layer()],
        },
        PullEvent::Layer(full_layer()),
        PullEvent::Done(full_pull_result()),
        PullEvent::Error {
            error: ApiError::new(ErrorCode::HostileLayer, "m")
                .with_details(serde_json::json!({"entry": "../x"})),
        },
    ];
    for e in &all {
        match e {
            PullEvent::Resolved { .. }
            | PullEvent::Layer(_)
            | PullEvent::Done(_)
            | PullEvent::Error { .. } => {}
        }
    }
    all
}

/// `PullEvent` is a `oneOf` with a `type` discriminator: one object schema per variant, each with its
/// `type` as a one-value enum and the variant's fields (flattened for the newtype variants).
#[test]
fn pull_event_schema_matches_serde() {
    checked("PullEvent");
    let block = schema_block("PullEvent");
    let one_of: Vec<String> = block
        .iter()
        .filter_map(|l| l.strip_prefix("        - $ref: '#/components/schemas/"))
        .map(|r| r.trim_end_matches('\'').to_owned())
        .collect();
    assert!(block.contains(&"      oneOf:"));
    assert!(block.contains(&"      discriminator:"));
    assert!(block.contains(&"        propertyName: type"));
    let mapping: BTreeMap<String, String> = block
        .iter()
        .filter(|l| l.starts_with("          ") && !l.starts_with("           "))
        .filter_map(|l| l.trim().split_once(": '#/components/schemas/"))
        .map(|(k, v)| (k.to_owned(), v.trim_end_matches('\'').to_owned()))
        .collect();

    let mut tags = Vec::new();
    for event in all_pull_events() {
        let json = serde_json::to_value(&event).unwrap();
        let tag = json["type"].as_str().expect("a `type` string").to_owned();
        let schema = mapping
            .get(&tag)
            .unwrap_or_else(|| panic!("PullEvent discriminator has no mapping for {tag:?}"));
        let mut minimal = event.clone();
        if let PullEvent::Done(r) = &mut minimal {
            r.joined = false;
        }
        check_object(schema, &event, &minimal);
        assert_eq!(
            property_block(schema, "type"),
            [
                "          type: string",
                &format!("          enum: [{tag}]")
            ],
            "schema {schema}: `type` is the one value {tag:?}"
        );
        assert!(required(schema).contains("type"), "{schema} requires type");
        // A line reads back as the same event.
        let line = serde_json::to_string(&event).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<PullEvent>(&line).unwrap(), event);
        tags.push((tag, schema.clone()));
    }
    let mapped: Vec<(String, String)> = mapping.into_iter().collect();
    let mut sorted_tags = tags.clone();
    sorted_tags.sort();
    assert_eq!(mapped, sorted_tags, "discriminator mapping");
    let listed: Vec<String> = tags.into_iter().map(|(_, s)| s).collect();
    assert_eq!(
        one_of, listed,
        "oneOf lists every variant, in declaration order"
    );
}

/// Every schema of the document is compared with serde by one of the checks above.
#[test]
fn every_schema_is_checked() {
    object_schemas_match_serde();
    enum_schemas_match_serde();
    pull_event_schema_matches_serde();
    let checked = CHECKED.lock().unwrap().clone();
    let mut documented = BTreeSet::new();
    let mut in_schemas = false;
    for l in OPENAPI_YAML.lines() {
        if l == "  schemas:" {
            in_schemas = true;
        } else if in_schemas && l.starts_with("    ") && !l.starts_with("     ") {
            documented.insert(l.trim().trim_end_matches(':').to_owned());
        }
    }
    // `ExecTimeoutDetails` is checked against `LogsResult`, which has the same shape.
    assert_eq!(
        documented, checked,
        "schemas without a serde check (or checks without a schema)"
    );
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
        // `$ref: '#/...'` and discriminator mappings (`tag: '#/...'`).
        if let Some((_, r)) = l.split_once("'#/components/") {
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
