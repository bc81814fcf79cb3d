//! `POST /v1/sandboxes/{id}/exec/stream`: an exec whose stdin, stdout, stderr, terminal size, signals
//! and exit travel as frames over an upgraded connection (see `sandbox_proto::stream`).
//!
//! Rules:
//! - output is forwarded as it is read, in chunks of at most 1 MiB; a slow client slows the command
//!   (the pipes fill up), nothing is buffered without bound;
//! - stdin frames are written to the command's stdin in order; a command that does not read stalls the
//!   client's writes (the connection's buffers fill up), again without unbounded buffering;
//! - a client that goes away before `Exit` cancels the exec: its process tree is SIGKILLed;
//! - after the command exits, output still in the pipes is forwarded until they close or stay quiet for
//!   a moment (background processes may hold them), then `Exit` is sent and the connection closed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use sandbox_proto::stream::{
    self, ExecExit, ExecReady, ExecStreamInit, Kind, Resize, SignalRequest, HEADER_LEN, MAX_FRAME,
};
use sandbox_proto::{ApiError, ErrorCode, ExecRequest};
use sandbox_runtime::spec::{ExecControl, ExecEvent, TtySize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::error::HttpError;
use crate::manager::Manager;

/// How long a client may take to send its `Init` frame.
const INIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Output chunk read per frame.
const CHUNK: usize = MAX_FRAME;
/// After the exit, how long the output pipes may stay quiet before the stream ends...
const DRAIN_QUIET: Duration = Duration::from_millis(100);
/// ...and at most how long in all.
const DRAIN_MAX: Duration = Duration::from_secs(2);

/// The route's handler: checks the upgrade and the sandbox, answers 101 and runs the stream.
pub async fn exec_stream(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let upgrade_ok = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(stream::UPGRADE_TOKEN));
    if !upgrade_ok {
        return HttpError(ApiError::new(
            ErrorCode::InvalidRequest,
            format!(
                "the exec stream needs `Connection: Upgrade` and `Upgrade: {}`",
                stream::UPGRADE_TOKEN
            ),
        ))
        .into_response();
    }
    if let Err(e) = m.get(&id).await {
        return HttpError(e).into_response();
    }
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(up) => run(m, id, TokioIo::new(up)).await,
            Err(e) => tracing::warn!(%id, "exec stream upgrade failed: {e}"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, stream::UPGRADE_TOKEN)
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Reads one frame; `None` at a clean end of the connection.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<(Kind, Vec<u8>)>> {
    let mut h = [0u8; HEADER_LEN];
    match r.read_exact(&mut h).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let (kind, len) = stream::parse_header(&h)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some((kind, payload)))
}

/// The client's side of a stream, as the pump sees it.
enum FromClient {
    /// Acknowledged once written to the helper: the reader waits, so stdin the client sent after a
    /// control frame reaches the helper after it (resize, then type).
    Control(ExecControl, tokio::sync::oneshot::Sender<()>),
    /// The client broke the protocol (a frame of an unknown kind, too large, or one only the daemon
    /// sends): the exec is cancelled and the client told why.
    Bad(ApiError),
    /// The client closed the connection or sent garbage.
    Gone,
}

async fn send_error<W: AsyncWrite + Unpin>(w: &mut W, e: &ApiError) {
    let _ = w.write_all(&stream::encode_json(Kind::Error, e)).await;
    let _ = w.shutdown().await;
}

async fn run<S: AsyncRead + AsyncWrite + Send + 'static>(m: Arc<Manager>, id: String, io: S) {
    let (mut rd, mut wr) = tokio::io::split(io);
    let init = match tokio::time::timeout(INIT_TIMEOUT, read_frame(&mut rd)).await {
        Ok(Ok(Some((Kind::Init, payload)))) => {
            match serde_json::from_slice::<ExecStreamInit>(&payload) {
                Ok(i) => i,
                Err(e) => {
                    let err = ApiError::new(
                        ErrorCode::InvalidRequest,
                        format!("invalid Init frame: {e}"),
                    );
                    return send_error(&mut wr, &err).await;
                }
            }
        }
        Ok(Ok(Some((k, _)))) => {
            let err = ApiError::new(
                ErrorCode::InvalidRequest,
                format!("the first frame must be Init, not {k:?}"),
            );
            return send_error(&mut wr, &err).await;
        }
        Ok(Ok(None)) | Ok(Err(_)) => return,
        Err(_) => {
            let err = ApiError::new(ErrorCode::InvalidRequest, "no Init frame within 30 s");
            return send_error(&mut wr, &err).await;
        }
    };
    let req = ExecRequest {
        command: init.command.clone(),
        cwd: init.cwd.clone(),
        env: init.env.clone(),
        user: init.user.clone(),
        timeout_seconds: init.timeout_seconds,
        max_output_bytes: None,
        stdin: None,
    };
    let tty = init.tty.then(|| TtySize {
        width: init.width.unwrap_or(80).max(1),
        height: init.height.unwrap_or(24).max(1),
    });
    let (entry, spec) = match m.exec_spec(&id, &req, tty).await {
        Ok(x) => x,
        Err(e) => return send_error(&mut wr, &e).await,
    };
    let started = Instant::now();
    let _in_flight = entry.exec_started();
    // With a TTY the helper relays its stdin to the terminal; it must stay open (and quiet) even when the
    // client sends none, or the terminal would read end-of-file at once.
    let mut helper = match m.exec_helper(&entry, &spec, init.stdin || init.tty).await {
        Ok(h) => h,
        Err(e) => return send_error(&mut wr, &e).await,
    };
    match helper.next_event().await {
        Some(ExecEvent::Started { pid }) => {
            if wr
                .write_all(&stream::encode_json(Kind::Ready, &ExecReady { pid }))
                .await
                .is_err()
            {
                helper.control(ExecControl::Cancel).await;
            }
        }
        Some(ExecEvent::Failed { message }) => {
            let _ = helper.child.wait().await;
            let e = Manager::exec_failure(&entry, &id, &message);
            return send_error(&mut wr, &e).await;
        }
        _ => {
            let _ = helper.child.wait().await;
            let e = ApiError::new(
                ErrorCode::Internal,
                "the exec helper ended without starting the command",
            );
            return send_error(&mut wr, &e).await;
        }
    }

    // The client's frames: stdin goes straight to the pipe (in order, with backpressure); the rest to
    // the pump.
    let (tx, mut rx) = mpsc::channel::<FromClient>(16);
    let stdin = helper.stdin.take();
    let keep_stdin_open = init.stdin;
    let reader = tokio::spawn(async move {
        let mut stdin = stdin;
        let mut rd = rd;
        loop {
            let frame = match read_frame(&mut rd).await {
                Ok(Some(f)) => f,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    let bad = ApiError::new(ErrorCode::InvalidRequest, format!("bad frame: {e}"));
                    let _ = tx.send(FromClient::Bad(bad)).await;
                    return;
                }
                Ok(None) | Err(_) => {
                    let _ = tx.send(FromClient::Gone).await;
                    return;
                }
            };
            let msg = match frame {
                (Kind::Stdin, data) => {
                    if let (Some(w), true) = (stdin.as_mut(), keep_stdin_open) {
                        if w.write_all(&data).await.is_err() {
                            // The command closed its stdin: later input has nowhere to go.
                            stdin = None;
                        }
                    }
                    continue;
                }
                (Kind::StdinClose, _) => {
                    stdin = None;
                    continue;
                }
                (Kind::Resize, p) => match serde_json::from_slice::<Resize>(&p) {
                    Ok(r) => ExecControl::Resize {
                        width: r.width.max(1),
                        height: r.height.max(1),
                    },
                    Err(_) => continue,
                },
                (Kind::Signal, p) => match serde_json::from_slice::<SignalRequest>(&p) {
                    Ok(s) if (1..=64).contains(&s.signal) => {
                        ExecControl::Signal { signal: s.signal }
                    }
                    _ => continue,
                },
                (Kind::Cancel, _) => ExecControl::Cancel,
                // Frames only the daemon sends, or a second Init: a confused client.
                (k, _) => {
                    let bad = ApiError::new(
                        ErrorCode::InvalidRequest,
                        format!("a client may not send a {k:?} frame here"),
                    );
                    let _ = tx.send(FromClient::Bad(bad)).await;
                    return;
                }
            };
            let (ack, written) = tokio::sync::oneshot::channel();
            if tx.send(FromClient::Control(msg, ack)).await.is_err() || written.await.is_err() {
                return;
            }
        }
    });

    let (Some(mut out), Some(mut err)) = (helper.stdout.take(), helper.stderr.take()) else {
        reader.abort();
        return;
    };
    let mut obuf = vec![0u8; CHUNK + HEADER_LEN];
    let mut ebuf = vec![0u8; CHUNK + HEADER_LEN];
    let (mut out_open, mut err_open) = (true, true);
    let mut client_open = true;
    let mut client_msgs = true;
    let mut hung_up = false;
    let exited = loop {
        tokio::select! {
            r = out.read(&mut obuf[HEADER_LEN..]), if out_open => {
                match r {
                    Ok(0) | Err(_) => out_open = false,
                    Ok(n) => client_open = forward(&mut wr, Kind::Stdout, &mut obuf, n, client_open).await,
                }
            }
            r = err.read(&mut ebuf[HEADER_LEN..]), if err_open => {
                match r {
                    Ok(0) | Err(_) => err_open = false,
                    Ok(n) => client_open = forward(&mut wr, Kind::Stderr, &mut ebuf, n, client_open).await,
                }
            }
            msg = rx.recv(), if client_msgs => {
                match msg {
                    Some(FromClient::Control(c, ack)) => {
                        helper.control(c).await;
                        let _ = ack.send(());
                    }
                    Some(FromClient::Bad(e)) => {
                        // Tell the client, then end as if it had gone.
                        if client_open {
                            let _ = wr.write_all(&stream::encode_json(Kind::Error, &e)).await;
                            let _ = wr.shutdown().await;
                        }
                        client_msgs = false;
                        client_open = false;
                    }
                    Some(FromClient::Gone) | None => {
                        client_msgs = false;
                        client_open = false;
                    }
                }
            }
            ev = helper.next_event() => {
                break ev;
            }
        }
        if !client_open && !hung_up {
            // The client is gone (it closed, or a write to it failed): nobody will read the output.
            // Kill the tree; the helper reports the exit next.
            helper.hang_up().await;
            hung_up = true;
        }
    };
    // The helper can take the next exec now (this one's pipes are ours).
    m.recycle_helper(helper, &entry, exited.as_ref());
    // Output still in the pipes (or from processes the command left behind) is passed on while it keeps
    // coming, within a bound.
    let hard = Instant::now() + DRAIN_MAX;
    while (out_open || err_open) && Instant::now() < hard {
        let quiet = tokio::time::sleep(DRAIN_QUIET);
        tokio::select! {
            r = out.read(&mut obuf[HEADER_LEN..]), if out_open => match r {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => client_open = forward(&mut wr, Kind::Stdout, &mut obuf, n, client_open).await,
            },
            r = err.read(&mut ebuf[HEADER_LEN..]), if err_open => match r {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => client_open = forward(&mut wr, Kind::Stderr, &mut ebuf, n, client_open).await,
            },
            _ = quiet => break,
        }
    }
    reader.abort();
    let last = match exited {
        Some(ExecEvent::Exited {
            code,
            signal,
            timed_out,
            cancelled,
            ..
        }) => stream::encode_json(
            Kind::Exit,
            &ExecExit {
                exit_code: code.unwrap_or_else(|| 128 + signal.unwrap_or(0)),
                signal,
                timed_out,
                cancelled,
                duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            },
        ),
        Some(ExecEvent::Failed { message }) => {
            stream::encode_json(Kind::Error, &Manager::exec_failure(&entry, &id, &message))
        }
        _ => stream::encode_json(
            Kind::Error,
            &ApiError::new(
                ErrorCode::Internal,
                "the exec helper ended without an exit status",
            ),
        ),
    };
    if client_open {
        let _ = wr.write_all(&last).await;
        let _ = wr.shutdown().await;
    }
}

/// Writes `n` bytes read into `buf[HEADER_LEN..]` as one frame. Returns whether the client is still
/// there.
async fn forward<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: Kind,
    buf: &mut [u8],
    n: usize,
    open: bool,
) -> bool {
    if !open {
        return false;
    }
    debug_assert!(n <= MAX_FRAME);
    buf[..HEADER_LEN].copy_from_slice(&stream::header(kind, n));
    w.write_all(&buf[..HEADER_LEN + n]).await.is_ok()
}
