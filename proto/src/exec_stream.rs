//! Client side of the streaming exec (`POST /v1/sandboxes/{id}/exec/stream`, see [`crate::stream`]):
//! [`ExecStream`] (async) and [`BlockingExecStream`] (synchronous, no runtime needed).

use std::io::{BufRead, Read, Write};
use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::client::{percent_encode, BlockingClient, Client, ClientError};
use crate::stream::{
    self, ExecExit, ExecReady, ExecStreamInit, Kind, Resize, SignalRequest, HEADER_LEN, MAX_FRAME,
};
use crate::{ErrorBody, API_PREFIX};

/// One thing the daemon sent on an exec stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// The command runs.
    Ready(ExecReady),
    /// Bytes from stdout (or the terminal).
    Stdout(Vec<u8>),
    /// Bytes from stderr.
    Stderr(Vec<u8>),
    /// The command ended; the stream is over.
    Exit(ExecExit),
}

fn request_head(id: &str) -> String {
    format!(
        "POST {API_PREFIX}/sandboxes/{}/exec/stream HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: {}\r\nContent-Length: 0\r\n\r\n",
        percent_encode(id),
        stream::UPGRADE_TOKEN
    )
}

fn protocol(msg: impl Into<String>) -> ClientError {
    ClientError::Protocol(msg.into())
}

/// Parses the answer's head: `Ok(None)` for 101, else the status and Content-Length of an error body.
fn parse_head(head: &str) -> Result<Option<(u16, usize)>, ClientError> {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| protocol(format!("bad status line {status_line:?}")))?;
    if status == 101 {
        return Ok(None);
    }
    let len = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    Ok(Some((status, len.min(1 << 20))))
}

fn error_from_body(status: u16, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => ClientError::Api {
            status,
            error: b.error,
        },
        Err(_) => protocol(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )),
    }
}

/// Turns a frame from the daemon into an event (or the error it carries).
fn event(kind: Kind, payload: Vec<u8>) -> Result<StreamEvent, ClientError> {
    let json_err = |e: serde_json::Error| protocol(format!("bad {kind:?} frame: {e}"));
    match kind {
        Kind::Ready => Ok(StreamEvent::Ready(
            serde_json::from_slice(&payload).map_err(json_err)?,
        )),
        Kind::Stdout => Ok(StreamEvent::Stdout(payload)),
        Kind::Stderr => Ok(StreamEvent::Stderr(payload)),
        Kind::Exit => Ok(StreamEvent::Exit(
            serde_json::from_slice(&payload).map_err(json_err)?,
        )),
        Kind::Error => {
            let error: crate::ApiError = serde_json::from_slice(&payload).map_err(json_err)?;
            Err(ClientError::Api {
                status: error.code.http_status(),
                error,
            })
        }
        other => Err(protocol(format!(
            "unexpected {other:?} frame from the daemon"
        ))),
    }
}

fn json_frame<T: serde::Serialize>(kind: Kind, v: &T) -> Vec<u8> {
    stream::encode_json(kind, v)
}

// ------------------------------------------------------------------------------------------- async

/// An exec stream (async). Read events with [`ExecStream::next`]; write with the other methods, or
/// [`ExecStream::into_split`] to do both from different tasks.
#[derive(Debug)]
pub struct ExecStream {
    reader: ExecStreamReader,
    writer: ExecStreamWriter,
}

/// The reading half of an [`ExecStream`].
#[derive(Debug)]
pub struct ExecStreamReader {
    rd: tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
    done: bool,
}

/// The writing half of an [`ExecStream`].
#[derive(Debug)]
pub struct ExecStreamWriter {
    wr: tokio::net::unix::OwnedWriteHalf,
}

impl Client {
    /// Starts a streaming exec. Answers once the command runs (its `Ready`), or with the error that
    /// kept it from starting (`SANDBOX_NOT_FOUND`, `SANDBOX_NOT_RUNNING`, `INVALID_ARGUMENT`...).
    pub async fn exec_stream(
        &self,
        id: &str,
        init: &ExecStreamInit,
    ) -> Result<(ExecStream, ExecReady), ClientError> {
        let s = tokio::net::UnixStream::connect(self.socket_path())
            .await
            .map_err(|source| ClientError::Connect {
                socket: self.socket_path().to_path_buf(),
                source,
            })?;
        let (rd, mut wr) = s.into_split();
        let mut rd = tokio::io::BufReader::with_capacity(64 * 1024, rd);
        let io = |e: std::io::Error| protocol(format!("exec stream: {e}"));
        wr.write_all(request_head(id).as_bytes())
            .await
            .map_err(io)?;
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if rd.read_line(&mut line).await.map_err(io)? == 0 {
                return Err(protocol(
                    "the daemon closed the connection during the upgrade",
                ));
            }
            head.push_str(&line);
            if line == "\r\n" || head.len() > 64 * 1024 {
                break;
            }
        }
        if let Some((status, len)) = parse_head(&head)? {
            let mut body = vec![0u8; len];
            rd.read_exact(&mut body).await.map_err(io)?;
            return Err(error_from_body(status, &body));
        }
        wr.write_all(&json_frame(Kind::Init, init))
            .await
            .map_err(io)?;
        let mut stream = ExecStream {
            reader: ExecStreamReader { rd, done: false },
            writer: ExecStreamWriter { wr },
        };
        match stream.next().await? {
            Some(StreamEvent::Ready(r)) => Ok((stream, r)),
            other => Err(protocol(format!("expected Ready, got {other:?}"))),
        }
    }
}

impl ExecStream {
    /// The next event; `None` after `Exit`.
    pub async fn next(&mut self) -> Result<Option<StreamEvent>, ClientError> {
        self.reader.next().await
    }

    /// Writes to the command's stdin (needs `stdin: true` or `tty: true` in the init).
    pub async fn write_stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.writer.write_stdin(data).await
    }

    /// Ends the command's stdin.
    pub async fn close_stdin(&mut self) -> Result<(), ClientError> {
        self.writer.close_stdin().await
    }

    /// Resizes the terminal.
    pub async fn resize(&mut self, width: u16, height: u16) -> Result<(), ClientError> {
        self.writer.resize(width, height).await
    }

    /// Sends a signal to the command.
    pub async fn signal(&mut self, signal: i32) -> Result<(), ClientError> {
        self.writer.signal(signal).await
    }

    /// Kills the command's process tree.
    pub async fn cancel(&mut self) -> Result<(), ClientError> {
        self.writer.cancel().await
    }

    /// The two halves, for reading and writing from different tasks.
    pub fn into_split(self) -> (ExecStreamReader, ExecStreamWriter) {
        (self.reader, self.writer)
    }
}

impl ExecStreamReader {
    /// The next event; `None` after `Exit`.
    pub async fn next(&mut self) -> Result<Option<StreamEvent>, ClientError> {
        if self.done {
            return Ok(None);
        }
        let io = |e: std::io::Error| protocol(format!("exec stream: {e}"));
        let mut h = [0u8; HEADER_LEN];
        if let Err(e) = self.rd.read_exact(&mut h).await {
            self.done = true;
            return Err(protocol(format!(
                "the daemon closed the exec stream without an exit status: {e}"
            )));
        }
        let (kind, len) =
            stream::parse_header(&h).map_err(|e| protocol(format!("exec stream: {e}")))?;
        let mut payload = vec![0u8; len];
        self.rd.read_exact(&mut payload).await.map_err(io)?;
        if matches!(kind, Kind::Exit | Kind::Error) {
            self.done = true;
        }
        event(kind, payload).map(Some)
    }
}

impl ExecStreamWriter {
    async fn send(&mut self, frame: &[u8]) -> Result<(), ClientError> {
        self.wr
            .write_all(frame)
            .await
            .map_err(|e| protocol(format!("exec stream: {e}")))
    }

    /// Writes to the command's stdin.
    pub async fn write_stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(MAX_FRAME) {
            self.send(&stream::header(Kind::Stdin, chunk.len())).await?;
            self.send(chunk).await?;
        }
        Ok(())
    }

    /// Ends the command's stdin.
    pub async fn close_stdin(&mut self) -> Result<(), ClientError> {
        self.send(&stream::encode(Kind::StdinClose, &[])).await
    }

    /// Resizes the terminal.
    pub async fn resize(&mut self, width: u16, height: u16) -> Result<(), ClientError> {
        self.send(&json_frame(Kind::Resize, &Resize { width, height }))
            .await
    }

    /// Sends a signal to the command.
    pub async fn signal(&mut self, signal: i32) -> Result<(), ClientError> {
        self.send(&json_frame(Kind::Signal, &SignalRequest { signal }))
            .await
    }

    /// Kills the command's process tree.
    pub async fn cancel(&mut self) -> Result<(), ClientError> {
        self.send(&stream::encode(Kind::Cancel, &[])).await
    }
}

// ---------------------------------------------------------------------------------------- blocking

/// An exec stream over a plain socket (no runtime). [`BlockingExecStream::writer`] gives a second
/// handle for writing from another thread.
#[derive(Debug)]
pub struct BlockingExecStream {
    rd: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: BlockingExecWriter,
    done: bool,
}

/// A writing handle of a [`BlockingExecStream`]. Handles of one stream share a lock, so frames sent
/// from different threads never interleave.
#[derive(Debug, Clone)]
pub struct BlockingExecWriter {
    wr: std::sync::Arc<std::sync::Mutex<std::os::unix::net::UnixStream>>,
}

impl BlockingClient {
    /// Starts a streaming exec; see [`Client::exec_stream`].
    pub fn exec_stream(
        &self,
        id: &str,
        init: &ExecStreamInit,
    ) -> Result<(BlockingExecStream, ExecReady), ClientError> {
        BlockingExecStream::start(self.socket_path(), id, init)
    }
}

impl BlockingExecStream {
    /// Connects to `socket` and starts a streaming exec.
    pub fn start(
        socket: &Path,
        id: &str,
        init: &ExecStreamInit,
    ) -> Result<(Self, ExecReady), ClientError> {
        let s = std::os::unix::net::UnixStream::connect(socket).map_err(|source| {
            ClientError::Connect {
                socket: socket.to_path_buf(),
                source,
            }
        })?;
        let io = |e: std::io::Error| protocol(format!("exec stream: {e}"));
        let mut wr = s.try_clone().map_err(io)?;
        let mut rd = std::io::BufReader::with_capacity(64 * 1024, s);
        wr.write_all(request_head(id).as_bytes()).map_err(io)?;
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if rd.read_line(&mut line).map_err(io)? == 0 {
                return Err(protocol(
                    "the daemon closed the connection during the upgrade",
                ));
            }
            head.push_str(&line);
            if line == "\r\n" || head.len() > 64 * 1024 {
                break;
            }
        }
        if let Some((status, len)) = parse_head(&head)? {
            let mut body = vec![0u8; len];
            rd.read_exact(&mut body).map_err(io)?;
            return Err(error_from_body(status, &body));
        }
        wr.write_all(&json_frame(Kind::Init, init)).map_err(io)?;
        let mut stream = Self {
            rd,
            writer: BlockingExecWriter {
                wr: std::sync::Arc::new(std::sync::Mutex::new(wr)),
            },
            done: false,
        };
        match stream.next()? {
            Some(StreamEvent::Ready(r)) => Ok((stream, r)),
            other => Err(protocol(format!("expected Ready, got {other:?}"))),
        }
    }

    /// The next event; `None` after `Exit`.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<StreamEvent>, ClientError> {
        if self.done {
            return Ok(None);
        }
        let io = |e: std::io::Error| protocol(format!("exec stream: {e}"));
        let mut h = [0u8; HEADER_LEN];
        if let Err(e) = self.rd.read_exact(&mut h) {
            self.done = true;
            return Err(protocol(format!(
                "the daemon closed the exec stream without an exit status: {e}"
            )));
        }
        let (kind, len) =
            stream::parse_header(&h).map_err(|e| protocol(format!("exec stream: {e}")))?;
        let mut payload = vec![0u8; len];
        self.rd.read_exact(&mut payload).map_err(io)?;
        if matches!(kind, Kind::Exit | Kind::Error) {
            self.done = true;
        }
        event(kind, payload).map(Some)
    }

    /// A second handle that writes to this stream (for a stdin thread).
    pub fn writer(&self) -> Result<BlockingExecWriter, ClientError> {
        Ok(self.writer.clone())
    }

    /// Writes to the command's stdin.
    pub fn write_stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.writer.write_stdin(data)
    }

    /// Ends the command's stdin.
    pub fn close_stdin(&mut self) -> Result<(), ClientError> {
        self.writer.close_stdin()
    }

    /// Kills the command's process tree.
    pub fn cancel(&mut self) -> Result<(), ClientError> {
        self.writer.cancel()
    }
}

impl BlockingExecWriter {
    /// Writes one frame (header and payload) while holding the stream's write lock.
    fn send_parts(&mut self, header: &[u8], payload: &[u8]) -> Result<(), ClientError> {
        let mut wr = self.wr.lock().unwrap_or_else(|p| p.into_inner());
        wr.write_all(header)
            .and_then(|()| wr.write_all(payload))
            .map_err(|e| protocol(format!("exec stream: {e}")))
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), ClientError> {
        self.send_parts(frame, &[])
    }

    /// Writes to the command's stdin.
    pub fn write_stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(MAX_FRAME) {
            self.send_parts(&stream::header(Kind::Stdin, chunk.len()), chunk)?;
        }
        Ok(())
    }

    /// Ends the command's stdin.
    pub fn close_stdin(&mut self) -> Result<(), ClientError> {
        self.send(&stream::encode(Kind::StdinClose, &[]))
    }

    /// Resizes the terminal.
    pub fn resize(&mut self, width: u16, height: u16) -> Result<(), ClientError> {
        self.send(&json_frame(Kind::Resize, &Resize { width, height }))
    }

    /// Sends a signal to the command.
    pub fn signal(&mut self, signal: i32) -> Result<(), ClientError> {
        self.send(&json_frame(Kind::Signal, &SignalRequest { signal }))
    }

    /// Kills the command's process tree.
    pub fn cancel(&mut self) -> Result<(), ClientError> {
        self.send(&stream::encode(Kind::Cancel, &[]))
    }
}
