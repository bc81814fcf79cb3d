"""The exec stream: ``POST /v1/sandboxes/{id}/exec/stream`` upgraded to ``sandboxd-exec.v1``, then frames
``[kind u8][length u32 big-endian][payload]`` both ways (see ``proto/src/stream.rs``)."""

from __future__ import annotations

import json
import socket
import struct
import threading
from typing import Any, BinaryIO, Callable, Dict, Optional, Tuple, cast

from ._transport import Transport, error_from_response, quote_id
from .exceptions import SandboxConnectionError, SandboxError

__all__ = ["ExecConnection", "Kind", "MAX_FRAME", "UPGRADE_TOKEN"]

#: The ``Upgrade`` token of the exec stream.
UPGRADE_TOKEN = "sandboxd-exec.v1"
#: Largest payload of one frame.
MAX_FRAME = 1 << 20
_HEADER = struct.Struct(">BI")


class Kind:
    """Frame kinds."""

    INIT = 1
    STDIN = 2
    STDIN_CLOSE = 3
    RESIZE = 4
    CANCEL = 5
    SIGNAL = 6
    READY = 16
    STDOUT = 17
    STDERR = 18
    EXIT = 19
    ERROR = 20


def encode(kind: int, payload: bytes = b"") -> bytes:
    """One frame."""
    return _HEADER.pack(kind, len(payload)) + payload


class ExecConnection:
    """One exec stream: the upgrade handshake, frame writes (thread-safe) and a reader thread that hands
    every daemon frame to ``on_frame(kind, payload)`` and then ``on_end(error_or_None)`` once."""

    def __init__(
        self,
        transport: Transport,
        sandbox_id: str,
        init: Dict[str, Any],
        on_frame: Callable[[int, bytes], None],
        on_end: Callable[[Optional[SandboxError]], None],
    ) -> None:
        self._sock = transport.connect_socket()
        self._wlock = threading.Lock()
        self._closed = False
        try:
            self._rfile = cast(BinaryIO, self._sock.makefile("rb", buffering=MAX_FRAME + 8))
            req = (
                f"POST /v1/sandboxes/{quote_id(sandbox_id)}/exec/stream HTTP/1.1\r\n"
                "Host: localhost\r\n"
                "Connection: Upgrade\r\n"
                f"Upgrade: {UPGRADE_TOKEN}\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode("ascii")
            self._sock.sendall(req)
            self._handshake(sandbox_id)
            self._sock.sendall(encode(Kind.INIT, json.dumps(init).encode("utf-8")))
        except OSError as e:
            self.close()
            raise SandboxConnectionError(f"exec stream to sandboxd broke: {e}") from e
        except BaseException:
            self.close()
            raise
        self._on_frame = on_frame
        self._on_end = on_end
        self._thread = threading.Thread(target=self._read_loop, name="sandboxd-exec-reader", daemon=True)
        self._thread.start()

    def _handshake(self, sandbox_id: str) -> None:
        status_line = self._rfile.readline(65536)
        if not status_line:
            raise SandboxConnectionError("sandboxd closed the exec stream before answering")
        parts = status_line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise SandboxConnectionError(f"bad answer to the exec stream request: {status_line!r}")
        status = int(parts[1])
        headers: Dict[str, str] = {}
        while True:
            line = self._rfile.readline(65536)
            if not line or line in (b"\r\n", b"\n"):
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if status == 101:
            return
        n = headers.get("content-length")
        body = self._rfile.read(int(n)) if n is not None else self._rfile.read()
        raise error_from_response(status, body or b"", sandbox_id=sandbox_id)

    # -- writing -------------------------------------------------------------------------------------

    def send(self, kind: int, payload: bytes = b"") -> None:
        """Sends one frame (data larger than a frame is split). Raises ``OSError`` when the stream is gone."""
        with self._wlock:
            if self._closed:
                raise BrokenPipeError("the exec stream is closed")
            if len(payload) <= MAX_FRAME:
                self._sock.sendall(encode(kind, payload))
                return
            view = memoryview(payload)
            for i in range(0, len(view), MAX_FRAME):
                part = view[i : i + MAX_FRAME]
                self._sock.sendall(_HEADER.pack(kind, len(part)))
                self._sock.sendall(part)

    def send_json(self, kind: int, value: Any) -> None:
        """Sends one frame with a JSON payload."""
        self.send(kind, json.dumps(value).encode("utf-8"))

    # -- reading -------------------------------------------------------------------------------------

    def _read_exact(self, n: int) -> Optional[bytes]:
        data = self._rfile.read(n)
        if data is None or len(data) < n:
            return None
        return data

    def _read_loop(self) -> None:
        error: Optional[SandboxError] = None
        try:
            while True:
                h = self._read_exact(5)
                if h is None:
                    error = SandboxConnectionError("the exec stream ended before the process exited")
                    break
                kind, n = _HEADER.unpack(h)
                if n > MAX_FRAME:
                    error = SandboxConnectionError(f"exec stream frame of {n} bytes is over the limit")
                    break
                payload = self._read_exact(n) if n else b""
                if payload is None:
                    error = SandboxConnectionError("the exec stream ended inside a frame")
                    break
                self._on_frame(kind, payload)
                if kind in (Kind.EXIT, Kind.ERROR):
                    break
        except (OSError, ValueError) as e:
            if not self._closed:
                error = SandboxConnectionError(f"exec stream to sandboxd broke: {e}")
            else:
                error = SandboxConnectionError("the exec stream was closed")
        finally:
            self.close()
            try:
                self._rfile.close()
            except OSError:
                pass
            self._on_end(error)

    def close(self) -> None:
        """Closes the connection (a process still running is killed by the daemon)."""
        with self._wlock:
            if self._closed:
                return
            self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    @property
    def closed(self) -> bool:
        return self._closed


def parse_json(payload: bytes) -> Dict[str, Any]:
    """A frame's JSON payload (``{}`` if it is not JSON)."""
    try:
        v = json.loads(payload.decode("utf-8"))
    except ValueError:
        return {}
    return v if isinstance(v, dict) else {}


def split_error(payload: bytes) -> Tuple[Optional[str], str, Dict[str, Any]]:
    """``(code, message, details)`` of an Error frame (an ApiError, or an error body wrapping one)."""
    v = parse_json(payload)
    if "error" in v and isinstance(v["error"], dict):
        v = v["error"]
    return v.get("code"), str(v.get("message", "")), dict(v.get("details") or {})
