//! File transfer calls: `GET`/`PUT /v1/sandboxes/{id}/files?path=`, streamed both ways.
//!
//! Neither direction holds a whole file in memory: a download is written out frame by frame, an upload
//! is read in chunks of [`CHUNK`] bytes as the connection takes them.

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body_util::BodyExt as _;
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};

use super::{
    decode_error, http_error, percent_encode, snippet, BlockingClient, Client, ClientError,
};
use crate::types::FileInfo;
use crate::API_PREFIX;

/// Size of the chunks an upload is read in.
pub const CHUNK: usize = 256 * 1024;

/// Response header of a download with the file's permission bits (octal).
pub const FILE_MODE_HEADER: &str = "x-sandboxd-file-mode";

/// The body of an upload.
enum Upload {
    /// Bytes in memory (sent with a Content-Length).
    Full(Option<Bytes>),
    /// An async reader, read as the connection takes the data (chunked).
    Reader(Pin<Box<dyn AsyncRead + Send>>),
    /// Chunks from a thread reading a blocking reader (chunked).
    Channel(tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>),
}

impl hyper::body::Body for Upload {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            Self::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Self::Reader(r) => {
                let mut buf = vec![0u8; CHUNK];
                let mut rb = ReadBuf::new(&mut buf);
                match r.as_mut().poll_read(cx, &mut rb) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
                    Poll::Ready(Ok(())) if rb.filled().is_empty() => Poll::Ready(None),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        buf.truncate(n);
                        Poll::Ready(Some(Ok(Frame::data(Bytes::from(buf)))))
                    }
                }
            }
            Self::Channel(rx) => rx.poll_recv(cx).map(|c| c.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Self::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Self::Full(None) => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

fn files_uri(id: &str, path: &str, mode: Option<u32>) -> String {
    let mut uri = format!(
        "{API_PREFIX}/sandboxes/{}/files?path={}",
        percent_encode(id),
        percent_encode(path)
    );
    if let Some(m) = mode {
        uri.push_str(&format!("&mode={m:04o}"));
    }
    uri
}

/// A download whose body is still to be read.
struct Download {
    info: FileInfo,
    body: Incoming,
}

impl Client {
    /// Sends one request with a streamed body.
    async fn send_upload(
        &self,
        method: Method,
        uri: &str,
        body: Upload,
    ) -> Result<(u16, Incoming), ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: self.socket.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http_error("handshake", e))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
            .body(body)
            .map_err(|e| ClientError::Protocol(format!("invalid request {uri:?}: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| http_error("request", e))?;
        Ok((resp.status().as_u16(), resp.into_body()))
    }

    async fn open_download(&self, id: &str, path: &str) -> Result<Download, ClientError> {
        let uri = files_uri(id, path, None);
        let (mut sender, conn) = {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
            hyper::client::conn::http1::handshake::<_, Upload>(TokioIo::new(stream))
                .await
                .map_err(|e| http_error("handshake", e))?
        };
        tokio::spawn(conn);
        let req = Request::builder()
            .method(Method::GET)
            .uri(&uri)
            .header(hyper::header::HOST, "localhost")
            .body(Upload::Full(None))
            .map_err(|e| ClientError::Protocol(format!("invalid request {uri:?}: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| http_error("request", e))?;
        let status = resp.status().as_u16();
        let mode = resp
            .headers()
            .get(FILE_MODE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| u32::from_str_radix(v, 8).ok());
        let size = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body = resp.into_body();
        if !(200..300).contains(&status) {
            let bytes = body
                .collect()
                .await
                .map_err(|e| http_error("reading the answer", e))?
                .to_bytes();
            return Err(decode_error(status, &bytes));
        }
        Ok(Download {
            info: FileInfo {
                path: path.to_owned(),
                size: size.unwrap_or(0),
                mode: mode.unwrap_or(0),
            },
            body,
        })
    }

    /// Reads the body of a download, handing each chunk to the blocking `sink`; answers the bytes seen.
    async fn drain_download(
        body: &mut Incoming,
        mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<u64, ClientError> {
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| http_error("reading the file", e))?;
            if let Ok(data) = frame.into_data() {
                n += data.len() as u64;
                sink(&data)?;
            }
        }
        Ok(n)
    }

    /// `GET /v1/sandboxes/{id}/files?path=`: the whole file in memory. For large files see
    /// [`Client::read_file_to`]. A missing file is `ClientError::Api` with code `FILE_NOT_FOUND`.
    pub async fn read_file(&self, id: &str, path: &str) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        self.read_file_to(id, path, &mut out).await?;
        Ok(out)
    }

    /// `GET /v1/sandboxes/{id}/files?path=`, streamed into `out` (flushed at the end). Answers the
    /// file's path, size and mode.
    pub async fn read_file_to<W: AsyncWrite + Unpin>(
        &self,
        id: &str,
        path: &str,
        mut out: W,
    ) -> Result<FileInfo, ClientError> {
        let Download { mut info, mut body } = self.open_download(id, path).await?;
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| http_error("reading the file", e))?;
            if let Ok(data) = frame.into_data() {
                n += data.len() as u64;
                out.write_all(&data).await?;
            }
        }
        out.flush().await?;
        info.size = n;
        Ok(info)
    }

    /// `PUT /v1/sandboxes/{id}/files?path=[&mode=]`: writes `data` to `path` (missing parent directories
    /// are created). `mode` defaults to the replaced file's, else `0644`.
    pub async fn write_file(
        &self,
        id: &str,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<FileInfo, ClientError> {
        let body = Upload::Full(Some(Bytes::copy_from_slice(data)));
        self.upload(id, path, body, mode).await
    }

    /// Like [`Client::write_file`], streaming the content from `reader` until its end.
    pub async fn write_file_from<R: AsyncRead + Send + 'static>(
        &self,
        id: &str,
        path: &str,
        reader: R,
        mode: Option<u32>,
    ) -> Result<FileInfo, ClientError> {
        self.upload(id, path, Upload::Reader(Box::pin(reader)), mode)
            .await
    }

    async fn upload(
        &self,
        id: &str,
        path: &str,
        body: Upload,
        mode: Option<u32>,
    ) -> Result<FileInfo, ClientError> {
        let uri = files_uri(id, path, mode);
        let (status, body) = self.send_upload(Method::PUT, &uri, body).await?;
        let bytes = body
            .collect()
            .await
            .map_err(|e| http_error("reading the answer", e))?
            .to_bytes();
        if !(200..300).contains(&status) {
            return Err(decode_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            ClientError::Protocol(format!(
                "invalid answer to PUT {uri} (HTTP {status}): {e}: {}",
                snippet(&bytes)
            ))
        })
    }
}

impl BlockingClient {
    /// See [`Client::read_file`].
    pub fn read_file(&self, id: &str, path: &str) -> Result<Vec<u8>, ClientError> {
        self.block_on(self.inner.read_file(id, path))
    }

    /// See [`Client::read_file_to`]; `out` is a blocking writer (a file, stdout).
    pub fn read_file_to<W: std::io::Write>(
        &self,
        id: &str,
        path: &str,
        mut out: W,
    ) -> Result<FileInfo, ClientError> {
        self.block_on(async {
            let Download { mut info, mut body } = self.inner.open_download(id, path).await?;
            let n = Client::drain_download(&mut body, |b| out.write_all(b)).await?;
            out.flush()?;
            info.size = n;
            Ok(info)
        })
    }

    /// See [`Client::write_file`].
    pub fn write_file(
        &self,
        id: &str,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<FileInfo, ClientError> {
        self.block_on(self.inner.write_file(id, path, data, mode))
    }

    /// See [`Client::write_file_from`]; `reader` is a blocking reader (a file, stdin), read on a
    /// thread of its own. A read error aborts the upload: the file in the sandbox stays as it was.
    pub fn write_file_from<R: std::io::Read + Send + 'static>(
        &self,
        id: &str,
        path: &str,
        mut reader: R,
        mode: Option<u32>,
    ) -> Result<FileInfo, ClientError> {
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
        // Not joined: a reader blocked on input (a terminal) must not hold up an answer.
        std::thread::spawn(move || loop {
            let mut buf = vec![0u8; CHUNK];
            match reader.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        });
        self.block_on(self.inner.upload(id, path, Upload::Channel(rx), mode))
    }
}
