//! Request and response bodies of the HTTP API.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Lifecycle state of a sandbox.
///
/// `PENDING -> CREATING -> RUNNING -> TERMINATING -> COMPLETED | FAILED`, and `TERMINATED` when stopped
/// by a user or killed by its lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SandboxStatus {
    /// Accepted, not yet being created.
    Pending,
    /// Namespaces, cgroups and rootfs are being set up.
    Creating,
    /// The sandbox's init is running.
    Running,
    /// A stop was requested; waiting for the main process to exit.
    Terminating,
    /// The main process exited with code 0.
    Completed,
    /// The main process exited non-zero, was killed by a signal or OOM, or the sandbox could not start.
    Failed,
    /// Stopped by a user request (or its lifetime) before the main process ended on its own.
    Terminated,
}

impl SandboxStatus {
    /// True for COMPLETED, FAILED and TERMINATED.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Terminated)
    }

    /// The wire name, e.g. `RUNNING`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Creating => "CREATING",
            Self::Running => "RUNNING",
            Self::Terminating => "TERMINATING",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
            Self::Terminated => "TERMINATED",
        }
    }

    /// Parses a wire name (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        let all = [
            Self::Pending,
            Self::Creating,
            Self::Running,
            Self::Terminating,
            Self::Completed,
            Self::Failed,
            Self::Terminated,
        ];
        all.into_iter().find(|v| v.as_str().eq_ignore_ascii_case(s))
    }
}

impl std::fmt::Display for SandboxStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Resource limits as the user writes them (`"512Mi"`, `"0.5"`, `"500m"`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Memory limit, a Kubernetes-style quantity: `"256Mi"`, `"1G"`, `"1048576"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// CPU limit in cores: `"0.5"`, `"2"`, `"500m"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Maximum number of processes (tasks) in the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<i64>,
    /// What the sandbox is guaranteed (cgroup weight and soft memory limit). The top-level `cpu` and
    /// `memory` count as both request and limit; a value here overrides the request only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<ResourceValues>,
    /// Hard limits enforced by the cgroup. A value here overrides the top-level one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ResourceValues>,
}

/// One set of resource quantities, as in `resources.requests` and `resources.limits`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceValues {
    /// Memory, a Kubernetes-style quantity: `"512Mi"`, `"1G"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// CPU in cores: `"0.5"`, `"2"`, `"500m"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Maximum number of processes (limits only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<i64>,
}

/// Resource limits after parsing, as applied to the sandbox's cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceLimits {
    /// Memory limit in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CPU limit in millicores (1000 = one core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u64>,
    /// Maximum number of tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
}

impl ResourceLimits {
    /// True when nothing is set.
    pub fn is_empty(&self) -> bool {
        self.memory_bytes.is_none() && self.cpu_millis.is_none() && self.pids.is_none()
    }
}

/// Body of `POST /v1/sandboxes`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSandboxRequest {
    /// Image reference; `busybox` means `docker.io/library/busybox:latest`.
    pub image: String,
    /// Unique name, also the sandbox's hostname. Default: `sb-` + the first 8 characters of the id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The main process: `command[0]` and its arguments, prefixed by the image's Entrypoint.
    /// Absent (and `use_image_command` false): the sandbox idles until stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Run the image's Entrypoint + Cmd when `command` is absent.
    #[serde(default)]
    pub use_image_command: bool,
    /// Extra environment, merged over the image's Env.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory of the main process (default: the image's WorkingDir, else `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// `user[:group]`, names or numbers, resolved in the image (default: the image's User, else root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Resource limits.
    #[serde(default)]
    pub resources: Resources,
    /// Free-form tags for listing and filtering.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Remove the sandbox (state, logs) as soon as its main process has exited and been waited for.
    #[serde(default)]
    pub auto_remove: bool,
    /// When to pull the image from its registry (default: only when it is not stored here).
    #[serde(default, skip_serializing_if = "PullPolicy::is_default")]
    pub pull: PullPolicy,
    /// Stop the sandbox (TERMINATED) this many seconds after it was created, also across daemon restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime_seconds: Option<f64>,
    /// Free-form key/value metadata, returned as given.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Files placed read-only in the sandbox at creation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounted_files: Vec<MountedFile>,
    /// Size-limited scratch volumes (tmpfs), writable, gone with the sandbox.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeSpec>,
    /// Network policy (default: egress open, ingress denied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkOptions>,
    /// Ports of the sandbox published on a host address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceSpec>,
}

/// Network policy of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOptions {
    /// Nothing leaves the sandbox (loopback and answers to published ports only).
    #[serde(default)]
    pub deny_egress: bool,
    /// New connections into the sandbox are refused except through its published ports (default true).
    #[serde(default = "yes")]
    pub deny_ingress: bool,
    /// When not empty, an allow-list: only these destinations are reachable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressRule>,
    /// The opt-in to sandbox-to-sandbox traffic: this sandbox and the other sandboxes of its session (the
    /// same `sandboxd.session` annotation) that opted in too may connect to each other, both ways, on every
    /// port, whatever their egress and ingress policies. Needs the annotation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub session_peers: bool,
}

fn yes() -> bool {
    true
}

impl Default for NetworkOptions {
    fn default() -> Self {
        Self {
            deny_egress: false,
            deny_ingress: true,
            egress: Vec::new(),
            session_peers: false,
        }
    }
}

/// One allowed outbound destination: a CIDR or a DNS name, optionally limited to ports and a protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressRule {
    /// IPv4 network (`10.0.0.0/8`) or address (`192.0.2.7`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// A DNS name: the addresses the sandbox resolves it to (through the daemon's resolver) become reachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_name: Option<String>,
    /// Destination ports (all when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u32>,
    /// `tcp` or `udp` (both when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// A port of the sandbox published on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// The port inside the sandbox.
    pub port: u32,
    /// `tcp` (default) or `udp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The host port (absent or 0: one the kernel picks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u32>,
    /// The host address (default: the daemon's `publish_host_ip`, 127.0.0.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
}

/// A published port as set up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposedPort {
    /// The port inside the sandbox.
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// The host address it is published on.
    pub host_ip: String,
    /// The host port.
    pub host_port: u16,
}

/// The sandbox's network as set up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInfo {
    /// `bridge` (an address on the daemon's bridge) or `none` (loopback only).
    pub mode: String,
    /// The sandbox's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Its default gateway (the bridge's address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Its IPv6 address, where the daemon has an IPv6 subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<String>,
    /// Its IPv6 default gateway (the bridge's IPv6 address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<String>,
    /// The interface inside (`eth0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// The host end of its veth pair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_interface: Option<String>,
    /// Nameservers in its `/etc/resolv.conf`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
    /// The policy it was created with.
    pub policy: NetworkOptions,
}

/// A file placed read-only in the sandbox at creation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountedFile {
    /// Absolute path inside the sandbox; parent directories are created.
    pub mount_path: String,
    /// The content, standard base64.
    pub file_content: String,
    /// Permission bits (default `0o444`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

/// A scratch volume: a tmpfs of at most `size` bytes at `mount_path`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// Name, unique within the sandbox (`[A-Za-z0-9_.-]`, at most 63 characters).
    pub name: String,
    /// Absolute path inside the sandbox.
    pub mount_path: String,
    /// Size limit, a quantity (`"64Mi"`, `"1G"`).
    pub size: String,
}

/// Answer of `PUT /v1/sandboxes/{id}/files`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// The absolute path inside the sandbox, as given.
    pub path: String,
    /// Bytes written.
    pub size: u64,
    /// Permission bits of the file.
    pub mode: u32,
}

/// One record of `GET /v1/sandboxes/{id}/logs/stream` (NDJSON, one per line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The bytes, as text (or base64 when `encoding` says so). A line keeps its trailing newline; a
    /// record without one is a partial line.
    pub data: String,
    /// Encoding of `data`.
    #[serde(default, skip_serializing_if = "is_text")]
    pub encoding: OutputEncoding,
    /// When the daemon's supervisor read the bytes (RFC 3339, nanoseconds); only with `timestamps=true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
}

fn is_text(e: &OutputEncoding) -> bool {
    *e == OutputEncoding::Utf8
}

impl LogEntry {
    /// The decoded bytes of `data`.
    pub fn bytes(&self) -> Vec<u8> {
        decode(self.encoding, &self.data)
    }

    /// True for stderr.
    pub fn is_stderr(&self) -> bool {
        self.stream == "stderr"
    }
}

/// When `POST /v1/sandboxes` pulls its image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PullPolicy {
    /// Pull only if no image of that reference is stored (Docker's `missing`).
    #[default]
    Missing,
    /// Always ask the registry for the reference first (new layers are downloaded, present ones are not).
    Always,
    /// Never pull; a missing image is `IMAGE_NOT_FOUND`.
    Never,
}

impl PullPolicy {
    /// Whether this is the default policy (`missing`).
    pub fn is_default(&self) -> bool {
        *self == Self::Missing
    }
}

/// How the main process ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code when it exited normally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// Signal number when it was killed by a signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// True when the memory cgroup recorded an OOM kill.
    #[serde(default)]
    pub oom_killed: bool,
    /// Human-readable reason: `exited with code 3`, `killed by signal 9 (SIGKILL)`, `OOM killed`...
    pub reason: String,
}

impl ExitInfo {
    /// The shell-style exit status: the code, or 128 + signal.
    pub fn shell_status(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}

/// Everything the daemon knows about one sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxInfo {
    /// Unique id (16 hex characters).
    pub id: String,
    /// Unique name; also the hostname inside.
    pub name: String,
    /// The image reference as normalised (`docker.io/library/busybox:latest`).
    pub image: String,
    /// Digest of the image manifest.
    pub image_digest: String,
    /// Current state.
    pub status: SandboxStatus,
    /// Why the sandbox is in this state (failure or stop reason), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    /// The full argv of the main process (empty when idle).
    pub command: Vec<String>,
    /// RFC 3339 timestamps.
    pub created_at: String,
    /// When the sandbox reached RUNNING.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When the status last changed.
    pub status_updated_at: String,
    /// When the main process ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Exit details once terminal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitInfo>,
    /// Host pid of the sandbox's init while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Applied limits.
    pub limits: ResourceLimits,
    /// Host uid that root inside the sandbox maps to (the range has 65536 ids).
    pub host_uid: u32,
    /// Tags given at creation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Whether the sandbox is removed once its main process has exited.
    #[serde(default)]
    pub auto_remove: bool,
    /// Annotations given at creation.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The lifetime given at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime_seconds: Option<f64>,
    /// When the lifetime runs out (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Guaranteed resources (cgroup weight, soft memory limit).
    #[serde(default, skip_serializing_if = "ResourceLimits::is_empty")]
    pub requests: ResourceLimits,
    /// Paths of the read-only mounted files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounted_files: Vec<String>,
    /// Scratch volumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeSpec>,
    /// Its network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkInfo>,
    /// Its published ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposed_ports: Vec<ExposedPort>,
}

/// Body of `GET /v1/sandboxes`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SandboxList {
    /// Sandboxes, oldest first.
    pub sandboxes: Vec<SandboxInfo>,
}

/// Body of `POST /v1/sandboxes/{id}/stop`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Seconds between SIGTERM and SIGKILL (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_seconds: Option<f64>,
}

/// What `POST /v1/sandboxes/{id}/wait` waits for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitCondition {
    /// Until a terminal state (COMPLETED, FAILED, TERMINATED).
    #[default]
    Exited,
    /// Until RUNNING (or terminal, if it never gets there).
    Running,
    /// Until the sandbox has been removed (by a delete, or by `auto_remove` after its exit); answers with
    /// its last state. Unknown ids answer `SANDBOX_NOT_FOUND`, as for the other conditions.
    Removed,
}

/// Body of `POST /v1/sandboxes/{id}/wait`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitRequest {
    /// What to wait for.
    #[serde(default)]
    pub condition: WaitCondition,
    /// Give up after this many seconds with `WAIT_TIMEOUT` (default: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<f64>,
}

/// Body of `POST /v1/sandboxes/{id}/exec` (unary).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// argv; `command[0]` is looked up in the sandbox's PATH.
    pub command: Vec<String>,
    /// Working directory inside the sandbox (default: the main process's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Extra environment, merged over the sandbox's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// `user[:group]` inside the sandbox (default: the main process's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Kill the whole process tree after this many seconds and answer `EXEC_TIMEOUT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<f64>,
    /// Keep at most this many bytes of each of stdout and stderr (default 16 MiB); the rest is drained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<u64>,
    /// Bytes written to the process's stdin, then closed (default: empty stdin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

/// How `stdout`/`stderr` strings are encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputEncoding {
    /// Plain text (the output was valid UTF-8).
    #[default]
    Utf8,
    /// Standard base64 (the output was not valid UTF-8).
    Base64,
}

/// Body of a successful exec answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecResult {
    /// Shell-style status: exit code, or 128 + signal.
    pub exit_code: i32,
    /// The signal that killed the process, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Collected stdout.
    pub stdout: String,
    /// Collected stderr.
    pub stderr: String,
    /// Encoding of `stdout` and `stderr`.
    #[serde(default)]
    pub encoding: OutputEncoding,
    /// True when stdout was cut at `max_output_bytes`.
    #[serde(default)]
    pub stdout_truncated: bool,
    /// True when stderr was cut at `max_output_bytes`.
    #[serde(default)]
    pub stderr_truncated: bool,
    /// Wall time from start to exit.
    pub duration_ms: f64,
}

impl ExecResult {
    /// Builds a result, choosing the encoding from the bytes.
    pub fn from_bytes(stdout: &[u8], stderr: &[u8]) -> Self {
        use base64::Engine as _;
        match (std::str::from_utf8(stdout), std::str::from_utf8(stderr)) {
            (Ok(o), Ok(e)) => Self {
                stdout: o.to_owned(),
                stderr: e.to_owned(),
                encoding: OutputEncoding::Utf8,
                ..Self::default()
            },
            _ => {
                let b = base64::engine::general_purpose::STANDARD;
                Self {
                    stdout: b.encode(stdout),
                    stderr: b.encode(stderr),
                    encoding: OutputEncoding::Base64,
                    ..Self::default()
                }
            }
        }
    }

    /// Decoded stdout bytes.
    pub fn stdout_bytes(&self) -> Vec<u8> {
        decode(self.encoding, &self.stdout)
    }

    /// Decoded stderr bytes.
    pub fn stderr_bytes(&self) -> Vec<u8> {
        decode(self.encoding, &self.stderr)
    }
}

fn decode(enc: OutputEncoding, s: &str) -> Vec<u8> {
    use base64::Engine as _;
    match enc {
        OutputEncoding::Utf8 => s.as_bytes().to_vec(),
        OutputEncoding::Base64 => base64::engine::general_purpose::STANDARD
            .decode(s)
            .unwrap_or_default(),
    }
}

/// Body of `GET /v1/sandboxes/{id}/logs`: what the main process wrote so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogsResult {
    /// stdout of the main process.
    pub stdout: String,
    /// stderr of the main process.
    pub stderr: String,
    /// Encoding of both strings.
    #[serde(default)]
    pub encoding: OutputEncoding,
}

impl LogsResult {
    /// Builds a result, choosing the encoding from the bytes.
    pub fn from_bytes(stdout: &[u8], stderr: &[u8]) -> Self {
        let r = ExecResult::from_bytes(stdout, stderr);
        Self {
            stdout: r.stdout,
            stderr: r.stderr,
            encoding: r.encoding,
        }
    }

    /// Decoded stdout bytes.
    pub fn stdout_bytes(&self) -> Vec<u8> {
        decode(self.encoding, &self.stdout)
    }

    /// Decoded stderr bytes.
    pub fn stderr_bytes(&self) -> Vec<u8> {
        decode(self.encoding, &self.stderr)
    }
}

/// Body of `POST /v1/images/import`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportImageRequest {
    /// Absolute path, on the daemon's host, of an OCI image layout directory, an OCI layout tarball or a
    /// `docker save` tarball (optionally gzip-compressed).
    pub path: String,
    /// Name to store it under (`busybox:latest`); default: the name recorded in the archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// A stored image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Normalised references that point at this image.
    pub references: Vec<String>,
    /// Digest of the manifest (`sha256:...`).
    pub digest: String,
    /// Digest of the image config.
    pub config_digest: String,
    /// Sum of the layers' compressed sizes in bytes.
    pub size: u64,
    /// Creation time from the image config, if recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// Platform, e.g. `linux/amd64`.
    pub platform: String,
    /// Layer (diff id) digests, bottom first.
    pub layers: Vec<String>,
    /// `name@digest` for each repository this image was pulled from, with the digest the registry serves it under
    /// (the index digest for a multi-platform image), as Docker's RepoDigests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repo_digests: Vec<String>,
}

/// Body of `POST /v1/images/pull`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullImageRequest {
    /// Image reference as Docker reads it: `python:3.11` is `docker.io/library/python:3.11`; a tag or
    /// `@sha256:<digest>` may be given.
    pub reference: String,
    /// `os/arch[/variant]` to choose from a multi-platform index (default: the host's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
}

/// What a layer of a pull is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerStatus {
    /// Queued behind the concurrent download limit.
    Waiting,
    /// Bytes are arriving (and being unpacked as they arrive).
    Downloading,
    /// Already stored (unpacked): nothing is downloaded for it.
    Exists,
    /// Downloaded, verified and unpacked.
    Done,
}

/// Progress of one layer of a pull.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerProgress {
    /// Digest of the (compressed) layer blob.
    pub digest: String,
    /// Size of the blob in bytes, from the manifest.
    pub size: u64,
    /// What the layer is doing.
    pub status: LayerStatus,
    /// Bytes downloaded so far.
    pub downloaded: u64,
}

/// The outcome of a pull.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullResult {
    /// The image as stored.
    pub image: ImageInfo,
    /// The digest the registry resolved the reference to (the index digest for a multi-platform image).
    pub resolved_digest: String,
    /// Bytes downloaded by this pull (0 when everything was present).
    pub downloaded_bytes: u64,
    /// Layers downloaded by this pull.
    pub layers_downloaded: u32,
    /// Layers that were already stored.
    pub layers_present: u32,
    /// True when this request joined a pull of the same reference already in progress.
    #[serde(default)]
    pub joined: bool,
}

/// One line of the `application/x-ndjson` answer of `POST /v1/images/pull?progress=true`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PullEvent {
    /// The reference was resolved to a manifest for the chosen platform.
    Resolved {
        /// The normalised reference.
        reference: String,
        /// The digest the registry serves the reference under (index or manifest).
        resolved_digest: String,
        /// The manifest digest for the chosen platform.
        digest: String,
        /// The chosen platform.
        platform: String,
        /// The layers, bottom first.
        layers: Vec<LayerProgress>,
    },
    /// A layer changed status or made progress.
    Layer(LayerProgress),
    /// The pull succeeded (last line).
    Done(PullResult),
    /// The pull failed (last line).
    Error {
        /// Why.
        error: crate::ApiError,
    },
}

/// Body of `POST /v1/images/prune`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneImagesRequest {
    /// Also remove named images that no sandbox uses (Docker's `image prune --all`).
    #[serde(default)]
    pub all: bool,
}

/// What a prune removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneReport {
    /// Manifest digests of the images removed.
    pub images_removed: Vec<String>,
    /// Blobs removed.
    pub blobs_removed: u64,
    /// Unpacked layers removed.
    pub layers_removed: u64,
    /// Disk space freed, in bytes.
    pub reclaimed_bytes: u64,
}

/// Disk used by one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageUsage {
    /// Normalised references (empty for an image kept only because a sandbox uses it).
    pub references: Vec<String>,
    /// Manifest digest.
    pub digest: String,
    /// Bytes of blobs and unpacked layers this image uses, shared ones included.
    pub total_bytes: u64,
    /// Bytes used by this image only (freed if it alone is removed).
    pub unique_bytes: u64,
    /// Number of live sandboxes that use it.
    pub sandboxes: u64,
}

/// Body of `GET /v1/system/df`: disk used by the image store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUsage {
    /// Per image.
    pub images: Vec<ImageUsage>,
    /// Blobs stored (manifests, configs, compressed layers).
    pub blobs: u64,
    /// Bytes of all blobs.
    pub blob_bytes: u64,
    /// Unpacked layers stored.
    pub layers: u64,
    /// Bytes of all unpacked layers (allocated blocks).
    pub layer_bytes: u64,
    /// Bytes a `prune` would free now.
    pub reclaimable_bytes: u64,
}

/// Body of `GET /v1/images`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageList {
    /// Stored images.
    pub images: Vec<ImageInfo>,
}

/// Body of `GET /v1/version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// Daemon version.
    pub version: String,
    /// API version (`v1`).
    pub api_version: String,
    /// `v1` or `v2`.
    pub cgroup_version: String,
}
