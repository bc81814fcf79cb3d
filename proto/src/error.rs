//! Stable error codes and the error body every failed call returns.

use serde::{Deserialize, Serialize};

/// Machine-readable error code. The string form (`SANDBOX_NOT_FOUND`) is stable API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// The body is not valid JSON or not of the expected shape.
    InvalidRequest,
    /// A field has an invalid value; `details.field` names it.
    InvalidArgument,
    /// No sandbox with that id or name.
    SandboxNotFound,
    /// The sandbox is not RUNNING (exec, or anything needing a live sandbox).
    SandboxNotRunning,
    /// The sandbox is still running (delete without force).
    SandboxRunning,
    /// The name is already taken.
    NameConflict,
    /// No image with that reference is stored.
    ImageNotFound,
    /// The input is not a valid image (layout, archive, manifest, config, layer).
    InvalidImage,
    /// A stored digest did not match its content.
    DigestMismatch,
    /// The image is used by a sandbox (remove without force).
    ImageInUse,
    /// The sandbox could not be started (namespaces, mounts, cgroups...).
    StartFailed,
    /// An exec ran past its `timeout_seconds`; its process tree was killed.
    ExecTimeout,
    /// A wait ran past its `timeout_seconds`.
    WaitTimeout,
    /// Out of a resource: uid ranges, disk, pids.
    ResourceExhausted,
    /// The registry (and every mirror) could not be reached: connection refused, DNS, TLS.
    RegistryUnreachable,
    /// The registry answered, but not as the distribution spec says: a 5xx, a truncated or broken body.
    RegistryError,
    /// The registry refused our (anonymous or configured) credentials.
    RegistryUnauthorized,
    /// The image exists, but has no manifest for the requested (or the host's) platform.
    PlatformNotFound,
    /// A pull ran past the configured pull timeout; nothing was committed for the unfinished part.
    PullTimeout,
    /// A layer holds an entry that would escape its root (or is otherwise unsafe); `details.entry` names it.
    HostileLayer,
    /// No file (or directory) at that path inside the sandbox.
    FileNotFound,
    /// The path is on a read-only mount inside the sandbox (a mounted file, a read-only path).
    FileReadOnly,
    /// The file operation failed inside the sandbox: a directory where a file was expected, a parent that
    /// is not a directory, a name too long... `details.errno` names the error.
    FileError,
    /// A host port asked for by a published port is taken (by another sandbox or another program).
    PortInUse,
    /// The daemon's networking could not set up the sandbox's network (netlink, nftables).
    NetworkError,
    /// A bug or an unexpected host failure.
    Internal,
    /// Unknown route.
    NotFound,
}

impl ErrorCode {
    /// The HTTP status this code is answered with.
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidRequest | Self::InvalidArgument | Self::InvalidImage => 400,
            Self::SandboxNotFound | Self::ImageNotFound | Self::NotFound | Self::FileNotFound => {
                404
            }
            Self::FileReadOnly => 409,
            Self::FileError => 400,
            Self::ExecTimeout | Self::WaitTimeout => 408,
            Self::SandboxNotRunning
            | Self::SandboxRunning
            | Self::NameConflict
            | Self::ImageInUse
            | Self::PortInUse => 409,
            Self::DigestMismatch | Self::HostileLayer => 422,
            Self::PlatformNotFound => 404,
            Self::RegistryUnauthorized => 403,
            Self::RegistryUnreachable | Self::RegistryError => 502,
            Self::PullTimeout => 504,
            Self::ResourceExhausted => 507,
            Self::StartFailed | Self::Internal | Self::NetworkError => 500,
        }
    }

    /// The wire string, e.g. `SANDBOX_NOT_FOUND`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "INVALID_REQUEST",
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::SandboxNotFound => "SANDBOX_NOT_FOUND",
            Self::SandboxNotRunning => "SANDBOX_NOT_RUNNING",
            Self::SandboxRunning => "SANDBOX_RUNNING",
            Self::NameConflict => "NAME_CONFLICT",
            Self::ImageNotFound => "IMAGE_NOT_FOUND",
            Self::InvalidImage => "INVALID_IMAGE",
            Self::DigestMismatch => "DIGEST_MISMATCH",
            Self::ImageInUse => "IMAGE_IN_USE",
            Self::StartFailed => "START_FAILED",
            Self::ExecTimeout => "EXEC_TIMEOUT",
            Self::WaitTimeout => "WAIT_TIMEOUT",
            Self::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Self::RegistryUnreachable => "REGISTRY_UNREACHABLE",
            Self::RegistryError => "REGISTRY_ERROR",
            Self::RegistryUnauthorized => "REGISTRY_UNAUTHORIZED",
            Self::PlatformNotFound => "PLATFORM_NOT_FOUND",
            Self::PullTimeout => "PULL_TIMEOUT",
            Self::HostileLayer => "HOSTILE_LAYER",
            Self::FileNotFound => "FILE_NOT_FOUND",
            Self::FileReadOnly => "FILE_READ_ONLY",
            Self::FileError => "FILE_ERROR",
            Self::PortInUse => "PORT_IN_USE",
            Self::NetworkError => "NETWORK_ERROR",
            Self::Internal => "INTERNAL",
            Self::NotFound => "NOT_FOUND",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JSON body of every error answer: `{"error": {"code": ..., "message": ..., "details": ...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ApiError,
}

/// One error: a stable code, a sentence for humans, optional structured details.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// Stable machine-readable code.
    pub code: ErrorCode,
    /// A human sentence naming what failed and why.
    pub message: String,
    /// Structured details (`field`, partial `stdout`/`stderr` of a timed-out exec, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

impl ApiError {
    /// An error with no details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: None,
        }
    }

    /// An `INVALID_ARGUMENT` naming the field.
    pub fn invalid_argument(field: impl AsRef<str>, message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::InvalidArgument,
            message: message.into(),
            details: Some(serde_json::json!({ "field": field.as_ref() })),
        }
    }

    /// Adds structured details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }
}
