"""HTTP/1.1 over the daemon's Unix socket: unary JSON calls and streamed bodies.

One :class:`Transport` per socket path. Unary calls reuse idle keep-alive connections from a small pool;
streamed answers (file downloads, log streams) and streamed uploads get a connection of their own.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import socket
import threading
import urllib.parse
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from .exceptions import SandboxConnectionError, SandboxError, error_from_api

__all__ = ["DEFAULT_SOCKET", "SOCKET_ENV", "socket_path", "shared_transport", "Transport", "UnixHTTPConnection"]

#: Where the daemon listens unless ``SANDBOXD_SOCKET`` says otherwise.
DEFAULT_SOCKET = "/run/sandboxd/sandboxd.sock"
#: The environment variable naming the daemon's socket.
SOCKET_ENV = "SANDBOXD_SOCKET"

#: Bytes per read/write on streamed bodies.
CHUNK = 1 << 20
_IDLE_MAX = 8

Query = Optional[Mapping[str, Union[str, int, float, bool, Sequence[str], None]]]


def socket_path() -> str:
    """The daemon's socket: ``$SANDBOXD_SOCKET``, else :data:`DEFAULT_SOCKET`."""
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


class UnixHTTPConnection(http.client.HTTPConnection):
    """An :class:`http.client.HTTPConnection` to a Unix socket (the ``Host`` header says ``localhost``)."""

    def __init__(self, path: str, timeout: Optional[float] = None) -> None:
        super().__init__("localhost", timeout=timeout, blocksize=CHUNK)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.connect(self.unix_path)
        except BaseException:
            s.close()
            raise
        self.sock = s


def _encode_query(query: Query) -> str:
    if not query:
        return ""
    pairs: List[Tuple[str, str]] = []
    for k, v in query.items():
        if v is None:
            continue
        if isinstance(v, bool):
            pairs.append((k, "true" if v else "false"))
        elif isinstance(v, (list, tuple)):
            pairs.extend((k, str(x)) for x in v)
        else:
            pairs.append((k, str(v)))
    return "?" + urllib.parse.urlencode(pairs) if pairs else ""


def quote_id(s: str) -> str:
    """A path segment (sandbox id or name) percent-encoded."""
    return urllib.parse.quote(s, safe="")


def error_from_response(status: int, body: bytes, **extra: Any) -> SandboxError:
    """The exception for a non-2xx answer (its JSON error body, or the raw text if it has none)."""
    try:
        err = json.loads(body.decode("utf-8"))["error"]
        return error_from_api(err.get("code"), err.get("message", ""), err.get("details"), **extra)
    except (ValueError, KeyError, TypeError, AttributeError):
        text = body.decode("utf-8", "replace").strip()
        return SandboxError(f"HTTP {status}: {text or 'no body'}", code=None)


class StreamedResponse:
    """A 2xx answer whose body is read as it arrives; closes its own connection."""

    def __init__(self, conn: UnixHTTPConnection, resp: http.client.HTTPResponse) -> None:
        self._conn = conn
        self.response = resp
        self.status = resp.status
        self.headers = resp.headers

    def read(self, n: int = CHUNK) -> bytes:
        """Up to ``n`` bytes of the body; ``b""`` at its end."""
        try:
            return self.response.read1(n) if n > 0 else self.response.read()
        except (OSError, http.client.HTTPException) as e:
            self.close()
            raise SandboxConnectionError(f"connection to sandboxd broke while reading: {e}") from e

    def iter_chunks(self, n: int = CHUNK) -> Iterator[bytes]:
        """The body in chunks of at most ``n`` bytes."""
        try:
            while True:
                b = self.read(n)
                if not b:
                    return
                yield b
        finally:
            self.close()

    def iter_lines(self) -> Iterator[bytes]:
        """The body line by line (each with its ``\\n``, the last maybe without)."""
        try:
            while True:
                try:
                    line = self.response.readline()
                except (OSError, http.client.HTTPException) as e:
                    raise SandboxConnectionError(f"connection to sandboxd broke while reading: {e}") from e
                if not line:
                    return
                yield line
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.response.close()
        finally:
            self._conn.close()

    def __enter__(self) -> "StreamedResponse":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Transport:
    """Calls to one daemon socket. Thread-safe."""

    def __init__(self, path: Optional[str] = None) -> None:
        self.path = path or socket_path()
        self._idle: List[UnixHTTPConnection] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Transport({self.path!r})"

    # -- connections ---------------------------------------------------------------------------------

    def new_connection(self, timeout: Optional[float] = None) -> UnixHTTPConnection:
        """A fresh, not yet connected connection."""
        return UnixHTTPConnection(self.path, timeout=timeout)

    def connect_socket(self) -> socket.socket:
        """A connected raw socket (for the exec stream)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise self._connect_error(e) from e
        return s

    def _connect_error(self, e: OSError) -> SandboxConnectionError:
        return SandboxConnectionError(
            f"cannot reach sandboxd at {self.path} ({e.strerror or e}); is the daemon running? "
            f"(set {SOCKET_ENV} to its socket)"
        )

    def _take(self) -> Tuple[UnixHTTPConnection, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self.new_connection(), False

    def _give_back(self, conn: UnixHTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < _IDLE_MAX:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Closes the idle connections."""
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()

    # -- unary calls ---------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Query = None,
        json_body: Any = None,
        body: Optional[bytes] = None,
        headers: Optional[Mapping[str, str]] = None,
        error_extra: Optional[Mapping[str, Any]] = None,
    ) -> Tuple[int, http.client.HTTPMessage, bytes]:
        """One call; answers ``(status, headers, body)`` for 2xx, raises the mapped error otherwise."""
        url = path + _encode_query(query)
        hdrs: Dict[str, str] = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode("utf-8")
            hdrs.setdefault("Content-Type", "application/json")
        if body is None and method in ("POST", "PUT"):
            body = b""
        for attempt in range(2):
            conn, reused = self._take()
            try:
                conn.request(method, url, body=body, headers=hdrs)
                resp = conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                conn.close()
                if reused and attempt == 0:
                    # An idle keep-alive connection the daemon had closed: the request never reached it.
                    continue
                raise SandboxConnectionError(f"connection to sandboxd at {self.path} broke: {e}") from e
            except OSError as e:
                conn.close()
                raise self._connect_error(e) from e
            except http.client.HTTPException as e:
                conn.close()
                raise SandboxConnectionError(f"bad answer from sandboxd at {self.path}: {e}") from e
            if resp.will_close:
                conn.close()
            else:
                self._give_back(conn)
            if 200 <= resp.status < 300:
                return resp.status, resp.headers, data
            raise error_from_response(resp.status, data, **dict(error_extra or {}))
        raise SandboxConnectionError("unreachable")  # pragma: no cover

    def call(self, method: str, path: str, **kw: Any) -> Any:
        """A unary call answering JSON (``None`` for an empty body)."""
        _, _, data = self.request(method, path, **kw)
        if not data:
            return None
        return json.loads(data.decode("utf-8"))

    # -- streamed calls ------------------------------------------------------------------------------

    def stream(
        self,
        method: str,
        path: str,
        *,
        query: Query = None,
        body: Union[None, bytes, Iterable[bytes], Any] = None,
        headers: Optional[Mapping[str, str]] = None,
        chunked: bool = False,
        error_extra: Optional[Mapping[str, Any]] = None,
    ) -> StreamedResponse:
        """A call on a connection of its own whose answer body is read as it arrives.

        ``body`` may be bytes, a file object or an iterable of bytes; with ``chunked`` it is sent with
        ``Transfer-Encoding: chunked``. A non-2xx answer raises the mapped error.
        """
        url = path + _encode_query(query)
        conn = self.new_connection()
        hdrs = dict(headers or {})
        try:
            try:
                conn.request(method, url, body=body, headers=hdrs, encode_chunked=chunked)
            except (BrokenPipeError, ConnectionResetError):
                # The daemon answered (an error) before taking the whole body: read that answer.
                pass
            resp = conn.getresponse()
        except SandboxError:
            conn.close()
            raise
        except (http.client.HTTPException, ConnectionError) as e:
            conn.close()
            raise SandboxConnectionError(f"connection to sandboxd at {self.path} broke: {e}") from e
        except OSError as e:
            conn.close()
            raise self._connect_error(e) from e
        if not 200 <= resp.status < 300:
            try:
                data = resp.read()
            except (OSError, http.client.HTTPException):
                data = b""
            conn.close()
            raise error_from_response(resp.status, data, **dict(error_extra or {}))
        return StreamedResponse(conn, resp)


_SHARED: Dict[str, Transport] = {}
_SHARED_LOCK = threading.Lock()


def shared_transport(path: Optional[str] = None) -> Transport:
    """The process-wide :class:`Transport` of a socket (default: :func:`socket_path`, read now), so that
    every sandbox object of a daemon shares one pool of idle connections."""
    p = path or socket_path()
    with _SHARED_LOCK:
        t = _SHARED.get(p)
        if t is None:
            t = _SHARED[p] = Transport(p)
        return t


@atexit.register
def _close_shared() -> None:
    with _SHARED_LOCK:
        for t in _SHARED.values():
            t.close()
