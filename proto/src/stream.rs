//! The streaming exec protocol: `POST /v1/sandboxes/{id}/exec/stream` with `Connection: Upgrade` and
//! `Upgrade: sandboxd-exec.v1`, answered `101 Switching Protocols`; from then on the connection carries
//! frames in both directions.
//!
//! A frame is `[kind: u8][length: u32, big-endian][payload: length bytes]`, payloads at most
//! [`MAX_FRAME`] bytes. The client's first frame is [`Kind::Init`] (JSON [`ExecStreamInit`]); the daemon
//! answers [`Kind::Ready`] (JSON [`ExecReady`]) once the process runs, then `Stdout`/`Stderr` frames as the
//! process writes, and one final [`Kind::Exit`] (JSON [`ExecExit`]) or [`Kind::Error`] (JSON
//! [`crate::ApiError`]), after which it closes the connection.
//!
//! The client may send `Stdin` data, `StdinClose` (end of input), `Resize` (TTY only, JSON
//! [`Resize`]), `Signal` (JSON [`SignalRequest`], to the process) and `Cancel` (SIGKILL to the whole
//! process tree). A client that closes the connection before `Exit` cancels the process: its tree is
//! killed, nothing keeps running.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The `Upgrade` token of the exec stream.
pub const UPGRADE_TOKEN: &str = "sandboxd-exec.v1";

/// Largest payload of one frame (data frames are split to fit).
pub const MAX_FRAME: usize = 1 << 20;

/// Bytes of a frame header.
pub const HEADER_LEN: usize = 5;

/// Kinds of frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Client: the exec to run (JSON [`ExecStreamInit`]); first and once.
    Init = 1,
    /// Client: bytes for the process's stdin (or the TTY).
    Stdin = 2,
    /// Client: no more stdin (the process reads end-of-file; on a TTY, `^D` is sent).
    StdinClose = 3,
    /// Client: new TTY size (JSON [`Resize`]).
    Resize = 4,
    /// Client: kill the process tree now (SIGKILL); the stream ends with `Exit` (`cancelled: true`).
    Cancel = 5,
    /// Client: send a signal to the process (JSON [`SignalRequest`]).
    Signal = 6,
    /// Daemon: the process runs (JSON [`ExecReady`]).
    Ready = 16,
    /// Daemon: bytes the process wrote to stdout (or the TTY).
    Stdout = 17,
    /// Daemon: bytes the process wrote to stderr (never with a TTY).
    Stderr = 18,
    /// Daemon: the process ended (JSON [`ExecExit`]); last frame.
    Exit = 19,
    /// Daemon: the exec failed (JSON [`crate::ApiError`]); last frame.
    Error = 20,
}

impl Kind {
    /// The kind of a frame byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Init,
            2 => Self::Stdin,
            3 => Self::StdinClose,
            4 => Self::Resize,
            5 => Self::Cancel,
            6 => Self::Signal,
            16 => Self::Ready,
            17 => Self::Stdout,
            18 => Self::Stderr,
            19 => Self::Exit,
            20 => Self::Error,
            _ => return None,
        })
    }
}

/// A frame header: `[kind][len]`.
pub fn header(kind: Kind, len: usize) -> [u8; HEADER_LEN] {
    let l = (len as u32).to_be_bytes();
    [kind as u8, l[0], l[1], l[2], l[3]]
}

/// One whole frame as bytes.
pub fn encode(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(&header(kind, payload.len()));
    v.extend_from_slice(payload);
    v
}

/// A frame whose payload is `value` as JSON.
pub fn encode_json<T: Serialize>(kind: Kind, value: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail.
    let payload = serde_json::to_vec(value).unwrap_or_default();
    encode(kind, &payload)
}

/// Errors of frame decoding.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The kind byte is not one of [`Kind`].
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The length is above [`MAX_FRAME`].
    #[error("frame of {0} bytes is larger than the limit of {MAX_FRAME}")]
    TooLarge(usize),
}

/// Parses a header: the kind and the payload length.
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(Kind, usize), FrameError> {
    let kind = Kind::from_u8(h[0]).ok_or(FrameError::UnknownKind(h[0]))?;
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok((kind, len))
}

/// Payload of the `Init` frame.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecStreamInit {
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
    /// Kill the process tree after this many seconds; `Exit` then has `timed_out: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<f64>,
    /// The client sends stdin frames; without it the process's stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Run on a pseudo-terminal (stdin, stdout and stderr are the TTY; output comes as `Stdout`).
    #[serde(default)]
    pub tty: bool,
    /// TTY columns (default 80).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u16>,
    /// TTY rows (default 24).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u16>,
}

/// Payload of the `Ready` frame.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecReady {
    /// Host pid of the process.
    pub pid: i32,
}

/// Payload of the `Exit` frame.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecExit {
    /// Shell-style status: exit code, or 128 + signal.
    pub exit_code: i32,
    /// The signal that killed the process, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Killed at `timeout_seconds`.
    #[serde(default)]
    pub timed_out: bool,
    /// Killed by a `Cancel` frame.
    #[serde(default)]
    pub cancelled: bool,
    /// Wall time from start to exit.
    pub duration_ms: f64,
}

/// Payload of the `Resize` frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resize {
    /// Columns.
    pub width: u16,
    /// Rows.
    pub height: u16,
}

/// Payload of the `Signal` frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalRequest {
    /// Signal number (e.g. 2 for SIGINT, 15 for SIGTERM).
    pub signal: i32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let f = encode(Kind::Stdout, b"hello");
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&f[..HEADER_LEN]);
        assert_eq!(parse_header(&h).unwrap(), (Kind::Stdout, 5));
        assert_eq!(&f[HEADER_LEN..], b"hello");
        let big = header(Kind::Stdin, MAX_FRAME + 1);
        assert!(matches!(parse_header(&big), Err(FrameError::TooLarge(_))));
        let mut bad = header(Kind::Stdin, 0);
        bad[0] = 99;
        assert!(matches!(
            parse_header(&bad),
            Err(FrameError::UnknownKind(99))
        ));
    }
}
