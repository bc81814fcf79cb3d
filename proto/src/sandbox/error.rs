//! [`SandboxError`]: the errors of the high-level client, one variant per exception class of the Python
//! client (`SandboxNotFoundError`, `SandboxNotRunningError`, ...).

use crate::client::ClientError;
use crate::error::{ApiError, ErrorCode};
use crate::types::SandboxInfo;

use super::process::ProcessResult;

/// Client-side code of a wait that ran past the caller's own timeout (the operation may go on).
pub const CLIENT_TIMEOUT: &str = "CLIENT_TIMEOUT";
/// Client-side code of [`SandboxError::Terminated`].
pub const SANDBOX_TERMINATED: &str = "SANDBOX_TERMINATED";
/// Client-side code of [`SandboxError::Failed`] when the sandbox ended FAILED.
pub const SANDBOX_FAILED: &str = "SANDBOX_FAILED";
/// Client-side code of [`SandboxError::Execution`] (`check` and a non-zero exit).
pub const EXECUTION_ERROR: &str = "EXECUTION_ERROR";
/// Client-side code of [`SandboxError::CommandTimeout`] raised from an exec stream's exit.
pub const EXEC_TIMEOUT: &str = "EXEC_TIMEOUT";
/// Client-side code of [`SandboxError::Validation`] for a sandbox asked of a closed session.
pub const SESSION_CLOSED: &str = "SESSION_CLOSED";

/// Everything the high-level client ([`crate::sandbox`], [`crate::blocking`]) can fail with.
///
/// Errors the daemon answers are mapped by their code, as the Python client's exception classes are:
///
/// | variant | daemon codes |
/// |---|---|
/// | [`NotFound`](Self::NotFound) | `SANDBOX_NOT_FOUND` |
/// | [`NotRunning`](Self::NotRunning) | `SANDBOX_NOT_RUNNING` |
/// | [`Timeout`](Self::Timeout) | `WAIT_TIMEOUT`, and [`CLIENT_TIMEOUT`] |
/// | [`CommandTimeout`](Self::CommandTimeout) | `EXEC_TIMEOUT`, an exec stream that exited `timed_out` |
/// | [`Terminated`](Self::Terminated) | the sandbox ended TERMINATED |
/// | [`Failed`](Self::Failed) | `START_FAILED`, the sandbox ended FAILED |
/// | [`Execution`](Self::Execution) | `check` and a non-zero exit |
/// | [`File`](Self::File) | `FILE_NOT_FOUND`, `FILE_READ_ONLY`, `FILE_ERROR` |
/// | [`ResourceExhausted`](Self::ResourceExhausted) | `RESOURCE_EXHAUSTED` |
/// | [`Validation`](Self::Validation) | `INVALID_ARGUMENT`, `INVALID_REQUEST` |
/// | [`ImageNotFound`](Self::ImageNotFound) | `IMAGE_NOT_FOUND` |
/// | [`Api`](Self::Api) | any other daemon code |
/// | [`Client`](Self::Client) | no daemon answer: connect, protocol, I/O errors |
///
/// Every variant keeps a code ([`SandboxError::code`]) and a message ([`SandboxError::message`]); it
/// displays as `CODE: message`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// No sandbox with that id or name (`SANDBOX_NOT_FOUND`).
    #[error("{code}: {message}")]
    NotFound {
        /// The code.
        code: String,
        /// The daemon's message.
        message: String,
        /// The id or name asked for, when known.
        sandbox_id: Option<String>,
    },
    /// The operation needs a RUNNING sandbox (`SANDBOX_NOT_RUNNING`).
    #[error("{code}: {message}")]
    NotRunning {
        /// The code.
        code: String,
        /// The daemon's message.
        message: String,
    },
    /// A wait ran past its timeout (`WAIT_TIMEOUT`, or [`CLIENT_TIMEOUT`] for the client's own timer).
    #[error("{code}: {message}")]
    Timeout {
        /// The code.
        code: String,
        /// The message.
        message: String,
    },
    /// A command ran past its `timeout_seconds`; its process tree was killed (`EXEC_TIMEOUT`).
    #[error("{code}: {message}")]
    CommandTimeout {
        /// The code.
        code: String,
        /// The message.
        message: String,
        /// The output produced before the kill, when known.
        result: Option<Box<ProcessResult>>,
    },
    /// The sandbox was stopped (by a user or its lifetime) before its main process ended: TERMINATED.
    #[error("{code}: {message}")]
    Terminated {
        /// The code.
        code: String,
        /// The message.
        message: String,
        /// The sandbox's final state.
        info: Option<Box<SandboxInfo>>,
    },
    /// The sandbox FAILED (its main process exited non-zero, was killed or OOM-killed), or could not
    /// start (`START_FAILED`).
    #[error("{code}: {message}")]
    Failed {
        /// The code.
        code: String,
        /// The message.
        message: String,
        /// The sandbox's final state (absent for `START_FAILED`: there is no sandbox).
        info: Option<Box<SandboxInfo>>,
    },
    /// A command run with `check` exited non-zero.
    #[error("{code}: {message}")]
    Execution {
        /// The code.
        code: String,
        /// The message.
        message: String,
        /// The failed command's result.
        result: Box<ProcessResult>,
    },
    /// A file operation failed inside the sandbox (`FILE_NOT_FOUND`, `FILE_READ_ONLY`, `FILE_ERROR`).
    #[error("{code}: {message}")]
    File {
        /// The code.
        code: String,
        /// The daemon's message.
        message: String,
        /// The path inside the sandbox, when known.
        path: Option<String>,
    },
    /// Out of a resource on the host (`RESOURCE_EXHAUSTED`).
    #[error("{code}: {message}")]
    ResourceExhausted {
        /// The code.
        code: String,
        /// The daemon's message.
        message: String,
        /// Which resource (`disk`, `pids`...), when the daemon named it.
        resource: Option<String>,
    },
    /// A bad argument (`INVALID_ARGUMENT`, `INVALID_REQUEST`).
    #[error("{code}: {message}")]
    Validation {
        /// The code.
        code: String,
        /// The message.
        message: String,
        /// The offending field (`resources.memory`), when the daemon named it.
        field: Option<String>,
    },
    /// The image is neither stored nor at its registry (`IMAGE_NOT_FOUND`).
    #[error("{code}: {message}")]
    ImageNotFound {
        /// The code.
        code: String,
        /// The daemon's message.
        message: String,
        /// The reference that was not found, when the daemon named it.
        image: Option<String>,
    },
    /// Any other error the daemon answered.
    #[error(transparent)]
    Api(ApiError),
    /// No answer from the daemon: it could not be reached, the exchange broke, a local I/O error.
    #[error(transparent)]
    Client(ClientError),
}

impl SandboxError {
    /// The error's code: the daemon's (`SANDBOX_NOT_FOUND`), a client-side one ([`CLIENT_TIMEOUT`],
    /// [`EXECUTION_ERROR`]...), or `CONNECTION_ERROR`/`PROTOCOL_ERROR`/`IO_ERROR` for [`Self::Client`].
    pub fn code(&self) -> &str {
        match self {
            Self::NotFound { code, .. }
            | Self::NotRunning { code, .. }
            | Self::Timeout { code, .. }
            | Self::CommandTimeout { code, .. }
            | Self::Terminated { code, .. }
            | Self::Failed { code, .. }
            | Self::Execution { code, .. }
            | Self::File { code, .. }
            | Self::ResourceExhausted { code, .. }
            | Self::Validation { code, .. }
            | Self::ImageNotFound { code, .. } => code,
            Self::Api(e) => e.code.as_str(),
            Self::Client(ClientError::Api { error, .. }) => error.code.as_str(),
            Self::Client(ClientError::Connect { .. }) => "CONNECTION_ERROR",
            Self::Client(ClientError::Protocol(_)) => "PROTOCOL_ERROR",
            Self::Client(ClientError::Io(_)) => "IO_ERROR",
        }
    }

    /// The human message (without the code).
    pub fn message(&self) -> String {
        match self {
            Self::NotFound { message, .. }
            | Self::NotRunning { message, .. }
            | Self::Timeout { message, .. }
            | Self::CommandTimeout { message, .. }
            | Self::Terminated { message, .. }
            | Self::Failed { message, .. }
            | Self::Execution { message, .. }
            | Self::File { message, .. }
            | Self::ResourceExhausted { message, .. }
            | Self::Validation { message, .. }
            | Self::ImageNotFound { message, .. } => message.clone(),
            Self::Api(e) => e.message.clone(),
            Self::Client(e) => e.to_string(),
        }
    }

    /// The daemon's error code, when the code is one.
    pub fn api_code(&self) -> Option<ErrorCode> {
        serde_json::from_value(serde_json::Value::String(self.code().to_owned())).ok()
    }

    /// The command's result, for [`Self::Execution`] and (when known) [`Self::CommandTimeout`].
    pub fn result(&self) -> Option<&ProcessResult> {
        match self {
            Self::Execution { result, .. } => Some(result),
            Self::CommandTimeout { result, .. } => result.as_deref(),
            _ => None,
        }
    }

    /// The sandbox's final state, for [`Self::Failed`] and [`Self::Terminated`].
    pub fn info(&self) -> Option<&SandboxInfo> {
        match self {
            Self::Failed { info, .. } | Self::Terminated { info, .. } => info.as_deref(),
            _ => None,
        }
    }

    /// True for [`Self::Timeout`] and [`Self::CommandTimeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. } | Self::CommandTimeout { .. })
    }

    /// The error for an answer of the daemon.
    pub fn from_api(error: ApiError) -> Self {
        let detail = |key: &str| {
            error
                .details
                .as_ref()
                .and_then(|d| d.get(key))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        let code = error.code.as_str().to_owned();
        match error.code {
            ErrorCode::SandboxNotFound => Self::NotFound {
                code,
                sandbox_id: detail("id"),
                message: error.message,
            },
            ErrorCode::SandboxNotRunning => Self::NotRunning {
                code,
                message: error.message,
            },
            ErrorCode::WaitTimeout => Self::Timeout {
                code,
                message: error.message,
            },
            ErrorCode::ExecTimeout => Self::CommandTimeout {
                code,
                message: error.message,
                result: None,
            },
            ErrorCode::InvalidArgument | ErrorCode::InvalidRequest => Self::Validation {
                code,
                field: detail("field"),
                message: error.message,
            },
            ErrorCode::FileNotFound | ErrorCode::FileReadOnly | ErrorCode::FileError => {
                Self::File {
                    code,
                    path: detail("path"),
                    message: error.message,
                }
            }
            ErrorCode::ResourceExhausted => Self::ResourceExhausted {
                code,
                resource: detail("resource"),
                message: error.message,
            },
            ErrorCode::ImageNotFound => Self::ImageNotFound {
                code,
                image: detail("reference"),
                message: error.message,
            },
            ErrorCode::StartFailed => Self::Failed {
                code,
                message: error.message,
                info: None,
            },
            _ => Self::Api(error),
        }
    }

    /// A client-side timeout ([`CLIENT_TIMEOUT`]).
    pub(crate) fn client_timeout(message: impl Into<String>) -> Self {
        Self::Timeout {
            code: CLIENT_TIMEOUT.to_owned(),
            message: message.into(),
        }
    }

    /// Fills in the sandbox id of a [`Self::NotFound`] that has none.
    pub(crate) fn with_sandbox_id(mut self, id: &str) -> Self {
        if let Self::NotFound { sandbox_id, .. } = &mut self {
            sandbox_id.get_or_insert_with(|| id.to_owned());
        }
        self
    }

    /// Fills in the path of a [`Self::File`] that has none.
    pub(crate) fn with_path(mut self, p: &str) -> Self {
        if let Self::File { path, .. } = &mut self {
            path.get_or_insert_with(|| p.to_owned());
        }
        self
    }
}

impl From<ClientError> for SandboxError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Api { error, .. } => Self::from_api(error),
            other => Self::Client(other),
        }
    }
}

impl From<ApiError> for SandboxError {
    fn from(e: ApiError) -> Self {
        Self::from_api(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: ErrorCode, details: Option<serde_json::Value>) -> SandboxError {
        let mut e = ApiError::new(code, "boom");
        e.details = details;
        ClientError::Api {
            status: code.http_status(),
            error: e,
        }
        .into()
    }

    #[test]
    fn daemon_codes_map_to_variants() {
        let e = api(ErrorCode::SandboxNotFound, None).with_sandbox_id("x");
        assert!(matches!(&e, SandboxError::NotFound { sandbox_id: Some(i), .. } if i == "x"));
        assert_eq!(e.code(), "SANDBOX_NOT_FOUND");
        assert_eq!(e.message(), "boom");
        assert_eq!(e.to_string(), "SANDBOX_NOT_FOUND: boom");
        assert_eq!(e.api_code(), Some(ErrorCode::SandboxNotFound));

        let e = api(
            ErrorCode::InvalidArgument,
            Some(serde_json::json!({"field": "resources.memory"})),
        );
        assert!(
            matches!(&e, SandboxError::Validation { field: Some(f), .. } if f == "resources.memory")
        );
        assert!(matches!(
            api(ErrorCode::InvalidRequest, None),
            SandboxError::Validation { field: None, .. }
        ));
        assert!(matches!(
            api(ErrorCode::SandboxNotRunning, None),
            SandboxError::NotRunning { .. }
        ));
        assert!(matches!(
            api(ErrorCode::WaitTimeout, None),
            SandboxError::Timeout { .. }
        ));
        let e = api(ErrorCode::ExecTimeout, None);
        assert!(matches!(
            e,
            SandboxError::CommandTimeout { result: None, .. }
        ));
        assert!(e.is_timeout());
        for c in [
            ErrorCode::FileNotFound,
            ErrorCode::FileReadOnly,
            ErrorCode::FileError,
        ] {
            let e = api(c, None).with_path("/a");
            assert!(matches!(&e, SandboxError::File { path: Some(p), .. } if p == "/a"));
            assert_eq!(e.code(), c.as_str());
        }
        let e = api(
            ErrorCode::ResourceExhausted,
            Some(serde_json::json!({"resource": "disk"})),
        );
        assert!(
            matches!(&e, SandboxError::ResourceExhausted { resource: Some(r), .. } if r == "disk")
        );
        let e = api(
            ErrorCode::ImageNotFound,
            Some(serde_json::json!({"reference": "docker.io/library/python:3.15"})),
        );
        assert!(matches!(
            &e,
            SandboxError::ImageNotFound { image: Some(_), .. }
        ));
        assert!(matches!(
            api(ErrorCode::StartFailed, None),
            SandboxError::Failed { info: None, .. }
        ));
        let e = api(ErrorCode::NameConflict, None);
        assert!(matches!(e, SandboxError::Api(_)));
        assert_eq!(e.code(), "NAME_CONFLICT");
    }

    #[test]
    fn client_errors_stay_client_errors() {
        let e: SandboxError = ClientError::Protocol("bad".into()).into();
        assert!(matches!(e, SandboxError::Client(_)));
        assert_eq!(e.code(), "PROTOCOL_ERROR");
        assert_eq!(e.api_code(), None);
        let e = SandboxError::client_timeout("slow");
        assert_eq!(e.code(), CLIENT_TIMEOUT);
        assert!(e.is_timeout());
    }
}
