"""Processes started by ``Sandbox.exec()`` and ``Sandbox.shell()``, with live output.

Each process has one exec stream (see :mod:`sandboxd._stream`). A background thread reads its frames and
appends stdout and stderr to per-stream buffers, from which both the line iterators
(``for line in process.stdout``) and :meth:`Process.result` read.

Memory: each stream keeps its first ``max_output_bytes`` (default 16 MiB) for ``result()``; beyond that
the result is marked truncated. Output past that cap is kept only while an iterator is reading the stream,
and then at most a window of :data:`ITER_WINDOW` bytes ahead of the reader: when the reader falls behind,
the process is slowed down (the daemon stops reading its pipes) rather than buffered without bound.
"""

from __future__ import annotations

import codecs
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

from ._stream import ExecConnection, Kind, parse_json, split_error
from ._transport import Transport
from .exceptions import (
    SandboxCommandTimeoutError,
    SandboxError,
    SandboxExecutionError,
    SandboxTimeoutError,
    error_from_api,
)
from .operation import OperationRef

__all__ = [
    "DEFAULT_MAX_OUTPUT_BYTES",
    "ITER_WINDOW",
    "Process",
    "ProcessResult",
    "StreamReader",
    "StreamWriter",
    "TerminalSession",
]

#: Bytes of each of stdout and stderr that ``result()`` keeps (the rest is counted, and flagged truncated).
DEFAULT_MAX_OUTPUT_BYTES = 16 << 20
#: Bytes an iterating reader may fall behind before the process's output is held back.
ITER_WINDOW = 8 << 20
#: A line longer than this is handed out in pieces of this size.
MAX_LINE = 1 << 20
_TAKE = 64 << 10


@dataclass(frozen=True)
class ProcessResult:
    """The outcome of a command.

    Attributes:
        stdout: standard output, decoded as UTF-8 (undecodable bytes replaced).
        stderr: standard error, likewise.
        returncode: the exit status: the exit code, or 128 + the signal that killed it (137 for SIGKILL:
            a timeout or ``cancel()``).
        stdout_bytes: standard output as bytes.
        stderr_bytes: standard error as bytes.
        command: the argv that ran.
        stdout_truncated: True when stdout was longer than ``max_output_bytes`` (only the start is kept).
        stderr_truncated: likewise for stderr.
        timed_out: killed at ``timeout_seconds``.
        cancelled: killed by ``cancel()``.
        signal: the signal that killed it, if any.
        duration_ms: wall time from start to exit, measured by the daemon.
    """

    stdout: str
    stderr: str
    returncode: int
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    command: List[str] = field(default_factory=list)
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    timed_out: bool = False
    cancelled: bool = False
    signal: Optional[int] = None
    duration_ms: Optional[float] = None

    def check_returncode(self) -> None:
        """Raises :class:`SandboxExecutionError` if ``returncode`` is not 0."""
        if self.returncode != 0:
            raise SandboxExecutionError(
                f"command {self.command!r} exited with status {self.returncode}", exec_result=self
            )


class _OutputBuffer:
    """One output stream of a process. Every method is called with ``cond`` held."""

    def __init__(self, cond: threading.Condition, cap: int, attached: bool = False) -> None:
        self.cond = cond
        self.cap = cap
        self.kept = bytearray()  # the first `cap` bytes, for result()
        self.truncated = False
        self.total = 0  # bytes received so far
        self.tail = bytearray()  # bytes past `cap`, kept for an attached reader
        self.tail_start = 0  # absolute offset of tail[0]
        self.eof = False
        self.attached = attached  # a reader iterates: keep what it has not read (up to the window)
        self.in_use = 0  # threads inside a read call
        self.pos = 0  # the reader's absolute offset

    def must_wait(self) -> bool:
        """True while the attached reader is too far behind (the writer then waits)."""
        return self.attached and not self.eof and len(self.tail) > ITER_WINDOW

    def append(self, data: bytes) -> None:
        n = len(data)
        room = self.cap - len(self.kept)
        rest = data
        if room > 0:
            self.kept += data[:room]
            rest = data[room:]
        if rest:
            self.truncated = True
            if self.attached:
                if not self.tail:
                    self.tail_start = self.total + (n - len(rest))
                self.tail += rest
        self.total += n
        self.cond.notify_all()

    def take(self, limit: int) -> bytes:
        """Up to ``limit`` bytes at the reader's position (skipping what was dropped); advances it."""
        if self.pos < len(self.kept):
            out = bytes(self.kept[self.pos : self.pos + limit])
        else:
            if self.tail and self.pos < self.tail_start:
                self.pos = self.tail_start
            if self.tail and self.pos >= self.tail_start:
                i = self.pos - self.tail_start
                out = bytes(self.tail[i : i + limit])
            else:
                self.pos = max(self.pos, self.total) if not self.tail else self.pos
                out = b""
        self.pos += len(out)
        if self.tail and self.pos > self.tail_start:
            drop = min(self.pos - self.tail_start, len(self.tail))
            del self.tail[:drop]
            self.tail_start += drop
            self.cond.notify_all()
        return out

    def detach(self) -> None:
        """No reader any more: stop keeping output past the cap for one."""
        if self.in_use == 0 and self.attached:
            self.attached = False
            self.tail = bytearray()
            self.cond.notify_all()

    def finish(self) -> None:
        self.eof = True
        self.cond.notify_all()


class StreamReader:
    """Output of a process, read as it arrives.

    Iterating yields text lines, each with its trailing newline (the last line maybe without), as soon
    as each line is complete::

        for line in process.stdout:
            print(line, end="")

    Iteration ends when the process has exited and everything it wrote was read. :meth:`read` answers the
    rest at once, :meth:`readline` one line (``""`` at the end). There is one position per stream: a
    second loop continues where the first stopped.
    """

    def __init__(self, buf: _OutputBuffer, name: str) -> None:
        self._buf = buf
        self._cond = buf.cond
        self.name = name
        self._pending = bytearray()
        self._pstart = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __repr__(self) -> str:
        return f"<StreamReader {self.name}>"

    def __iter__(self) -> "StreamReader":
        return self

    def __next__(self) -> str:
        line = self.readline()
        if line == "":
            raise StopIteration
        return line

    def _line_bytes(self, timeout: Optional[float]) -> Optional[bytes]:
        buf = self._buf
        with self._cond:
            buf.attached = True
            buf.in_use += 1
            try:
                while True:
                    i = self._pending.find(b"\n", self._pstart)
                    if i >= 0:
                        out = bytes(self._pending[self._pstart : i + 1])
                        self._pstart = i + 1
                        self._compact()
                        return out
                    if len(self._pending) - self._pstart >= MAX_LINE:
                        out = bytes(self._pending[self._pstart :])
                        self._pending = bytearray()
                        self._pstart = 0
                        return out
                    data = buf.take(_TAKE)
                    if data:
                        self._pending += data
                        continue
                    if buf.eof:
                        out = bytes(self._pending[self._pstart :])
                        self._pending = bytearray()
                        self._pstart = 0
                        return out
                    if not self._cond.wait(timeout):
                        raise SandboxTimeoutError(
                            f"no complete line on {self.name} within {timeout} s", code="CLIENT_TIMEOUT"
                        )
            finally:
                buf.in_use -= 1

    def _compact(self) -> None:
        if self._pstart > (1 << 16) and self._pstart * 2 > len(self._pending):
            del self._pending[: self._pstart]
            self._pstart = 0

    def readline(self, timeout: Optional[float] = None) -> str:
        """The next line (with its newline), ``""`` at the end of the stream."""
        b = self._line_bytes(timeout)
        if not b:
            return self._decoder.decode(b"", True)
        return self._decoder.decode(b, False)

    def read(self, timeout: Optional[float] = None) -> str:
        """Everything not read yet, until the end of the stream."""
        parts: List[str] = []
        while True:
            line = self.readline(timeout)
            if line == "":
                return "".join(parts)
            parts.append(line)


class _RawReader:
    """Raw byte chunks of a TTY's output (no decoding, no line splitting)."""

    def __init__(self, buf: _OutputBuffer) -> None:
        self._buf = buf
        self._cond = buf.cond

    def read(self, n: int = -1, timeout: Optional[float] = None) -> bytes:
        limit = n if n > 0 else (1 << 20)
        buf = self._buf
        with self._cond:
            buf.in_use += 1
            try:
                while True:
                    data = buf.take(limit)
                    if data or buf.eof:
                        return data
                    if not self._cond.wait(timeout):
                        raise SandboxTimeoutError(
                            f"no terminal output within {timeout} s", code="CLIENT_TIMEOUT"
                        )
            finally:
                buf.in_use -= 1

    def __iter__(self) -> Iterator[bytes]:
        while True:
            b = self.read()
            if not b:
                return
            yield b


class StreamWriter:
    """The stdin of a process started with ``stdin=True`` (and of a shell).

    ``write``, ``writeline`` and ``close`` send at once (blocking only while the daemon holds back input
    the process does not read) and answer a completed :class:`OperationRef`, so ``.result()`` may be
    called as with the hosted API. Writing after the process has exited raises
    :class:`SandboxExecutionError`.
    """

    def __init__(self, process: "_StreamProcess") -> None:
        self._p = process
        self._closed = False
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def write(self, data: Union[bytes, bytearray, memoryview, str]) -> OperationRef[None]:
        """Sends ``data`` to the process's stdin (``str`` is encoded as UTF-8)."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        with self._lock:
            if self._closed:
                raise SandboxExecutionError("stdin is closed", code="STDIN_CLOSED")
            if data:
                self._p._send(Kind.STDIN, bytes(data), "write to stdin")
        return OperationRef.completed(None)

    def writeline(self, text: str, encoding: str = "utf-8") -> OperationRef[None]:
        """Sends ``text`` and a newline."""
        return self.write((text + "\n").encode(encoding))

    def close(self) -> OperationRef[None]:
        """End of input: the process reads end-of-file (on a TTY, ``^D``). Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                if not self._p.done():
                    try:
                        self._p._send(Kind.STDIN_CLOSE, b"", "close stdin")
                    except SandboxExecutionError:
                        if not self._p.done():
                            raise
        return OperationRef.completed(None)


class _StreamProcess:
    """What :class:`Process` and :class:`TerminalSession` share: the stream, its reader, the exit."""

    def __init__(
        self,
        transport: Transport,
        sandbox_id: str,
        command: Sequence[str],
        *,
        init: Dict[str, Any],
        max_output_bytes: int,
        attach_stdout: bool = False,
    ) -> None:
        self.command: List[str] = list(command)
        self.sandbox_id = sandbox_id
        self._cond = threading.Condition()
        self._out = _OutputBuffer(self._cond, max_output_bytes, attached=attach_stdout)
        self._err = _OutputBuffer(self._cond, max_output_bytes)
        self._ready = False
        self._pid: Optional[int] = None
        self._exit: Optional[Dict[str, Any]] = None
        self._error: Optional[SandboxError] = None
        self._done = threading.Event()
        self._closing = False
        self._conn = ExecConnection(transport, sandbox_id, init, self._on_frame, self._on_end)

    # -- reader thread -------------------------------------------------------------------------------

    def _on_frame(self, kind: int, payload: bytes) -> None:
        with self._cond:
            if kind in (Kind.STDOUT, Kind.STDERR):
                buf = self._out if kind == Kind.STDOUT else self._err
                while buf.must_wait() and not self._closing:
                    # The reader is far behind: hold the stream (the daemon then stops reading the
                    # process's pipes). Re-checked periodically in case the reader went away.
                    self._cond.wait(0.5)
                buf.append(payload)
            elif kind == Kind.READY:
                self._ready = True
                self._pid = parse_json(payload).get("pid")
                self._cond.notify_all()
            elif kind == Kind.EXIT:
                self._exit = parse_json(payload)
            elif kind == Kind.ERROR:
                code, message, details = split_error(payload)
                self._error = error_from_api(code, message, details, sandbox_id=self.sandbox_id)

    def _on_end(self, error: Optional[SandboxError]) -> None:
        with self._cond:
            if self._exit is None and self._error is None:
                self._error = error or SandboxError("the exec stream ended without an exit status")
            self._out.finish()
            self._err.finish()
        self._done.set()

    # -- control -------------------------------------------------------------------------------------

    def _send(self, kind: int, payload: bytes, what: str) -> None:
        try:
            self._conn.send(kind, payload)
        except OSError as e:
            raise SandboxExecutionError(
                f"cannot {what}: the process has exited or its stream is closed ({e})", code="STREAM_CLOSED"
            ) from e

    def done(self) -> bool:
        """True once the process has exited (or its stream failed)."""
        return self._done.is_set()

    @property
    def pid(self) -> Optional[int]:
        """Host pid of the process, once the daemon said it runs."""
        return self._pid

    @property
    def returncode(self) -> Optional[int]:
        """The exit status once the process has exited, else ``None``."""
        if not self._done.is_set() or self._exit is None:
            return None
        return int(self._exit.get("exit_code", -1))

    def poll(self) -> Optional[int]:
        """:attr:`returncode` without waiting; raises the stream's error if it failed."""
        if self._done.is_set() and self._exit is None and self._error is not None:
            raise self._error
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        """Waits for the exit and answers the exit status (137 after a timeout or ``cancel()``).

        Raises :class:`SandboxTimeoutError` if it has not exited within ``timeout`` seconds (the process
        keeps running), or the daemon's error (e.g. :class:`SandboxNotRunningError`).
        """
        self._detach_readers()
        if not self._done.wait(timeout):
            raise SandboxTimeoutError(
                f"command {self.command!r} still running after {timeout} s", code="CLIENT_TIMEOUT"
            )
        if self._exit is None:
            assert self._error is not None
            raise self._error
        return int(self._exit.get("exit_code", -1))

    def _detach_readers(self) -> None:
        with self._cond:
            self._out.detach()
            self._err.detach()

    def cancel(self) -> None:
        """Kills the process and every process it started (SIGKILL). Its exit status is then 137."""
        if self._done.is_set():
            return
        try:
            self._conn.send(Kind.CANCEL)
        except OSError:
            pass

    def send_signal(self, signal: int) -> None:
        """Sends ``signal`` (a number, e.g. 15) to the process."""
        self._send(Kind.SIGNAL, (b'{"signal": %d}' % int(signal)), "send a signal")

    def close(self) -> None:
        """Closes the stream; a process still running is killed by the daemon."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._conn.close()


class Process(_StreamProcess):
    """A command running in a sandbox, as returned by ``Sandbox.exec()``.

    Attributes:
        stdout: :class:`StreamReader` of its standard output (iterate for lines as they arrive).
        stderr: :class:`StreamReader` of its standard error.
        stdin: :class:`StreamWriter` when started with ``stdin=True``, else ``None``.
        command: the argv.

    ``result()`` waits for the exit and answers a :class:`ProcessResult`. With ``check=True`` a non-zero
    exit raises :class:`SandboxExecutionError`; past ``timeout_seconds`` it raises
    :class:`SandboxCommandTimeoutError`. Dropping the last reference to a running ``Process`` does not
    stop it; ``cancel()`` does.
    """

    def __init__(
        self,
        transport: Transport,
        sandbox_id: str,
        command: Sequence[str],
        *,
        cwd: Optional[str] = None,
        env: Optional[Dict[str, str]] = None,
        user: Optional[str] = None,
        timeout_seconds: Optional[float] = None,
        stdin: bool = False,
        check: bool = False,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> None:
        init: Dict[str, Any] = {"command": list(command), "stdin": bool(stdin), "tty": False}
        if cwd is not None:
            init["cwd"] = cwd
        if env:
            init["env"] = {str(k): str(v) for k, v in env.items()}
        if user is not None:
            init["user"] = user
        if timeout_seconds is not None:
            init["timeout_seconds"] = float(timeout_seconds)
        super().__init__(transport, sandbox_id, command, init=init, max_output_bytes=max_output_bytes)
        self.check = check
        self.stdout = StreamReader(self._out, "stdout")
        self.stderr = StreamReader(self._err, "stderr")
        self.stdin: Optional[StreamWriter] = StreamWriter(self) if stdin else None
        self._result: Optional[ProcessResult] = None

    def __repr__(self) -> str:
        state = "running" if not self.done() else f"returncode={self.returncode}"
        return f"<Process {self.command!r} {state}>"

    def _build_result(self) -> ProcessResult:
        e = self._exit or {}
        with self._cond:
            out, err = bytes(self._out.kept), bytes(self._err.kept)
            out_trunc, err_trunc = self._out.truncated, self._err.truncated
        return ProcessResult(
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            returncode=int(e.get("exit_code", -1)),
            stdout_bytes=out,
            stderr_bytes=err,
            command=list(self.command),
            stdout_truncated=out_trunc,
            stderr_truncated=err_trunc,
            timed_out=bool(e.get("timed_out", False)),
            cancelled=bool(e.get("cancelled", False)),
            signal=e.get("signal"),
            duration_ms=e.get("duration_ms"),
        )

    def result(self, timeout: Optional[float] = None) -> ProcessResult:
        """Waits for the exit and answers the :class:`ProcessResult`.

        Raises :class:`SandboxCommandTimeoutError` when the command ran past its ``timeout_seconds``
        (``exec_result`` has the output so far), :class:`SandboxExecutionError` for a non-zero exit with
        ``check=True``, :class:`SandboxTimeoutError` if it has not exited within ``timeout`` seconds, and
        the daemon's error if the exec failed (e.g. :class:`SandboxNotRunningError`).
        """
        self.wait(timeout)
        if self._result is None:
            self._result = self._build_result()
        r = self._result
        if r.timed_out:
            raise SandboxCommandTimeoutError(
                f"command {self.command!r} timed out and was killed", exec_result=r
            )
        if self.check and r.returncode != 0:
            raise SandboxExecutionError(
                f"command {self.command!r} exited with status {r.returncode}", exec_result=r
            )
        return r

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        """The error :meth:`result` would raise, or ``None``."""
        try:
            self.result(timeout)
        except SandboxTimeoutError as e:
            if e.code == "CLIENT_TIMEOUT":
                raise
            return e
        except SandboxError as e:
            return e
        return None


class TerminalSession(_StreamProcess):
    """An interactive command on a pseudo-terminal, as returned by ``Sandbox.shell()``.

    Output (stdout and stderr merged by the terminal) is raw bytes: :meth:`read` answers what has
    arrived, iterating :attr:`output` yields chunks. Output not read yet is held (up to a window, then the
    shell is slowed down), so read it continuously. :meth:`write` / :attr:`stdin` send keystrokes,
    :meth:`resize` changes the window size, :meth:`close` ends the session (killing the shell if it still
    runs), :meth:`wait` answers the exit status. Usable as a context manager.
    """

    def __init__(
        self,
        transport: Transport,
        sandbox_id: str,
        command: Sequence[str],
        *,
        width: int = 80,
        height: int = 24,
        cwd: Optional[str] = None,
        env: Optional[Dict[str, str]] = None,
        user: Optional[str] = None,
    ) -> None:
        init: Dict[str, Any] = {
            "command": list(command),
            "stdin": True,
            "tty": True,
            "width": int(width),
            "height": int(height),
        }
        if cwd is not None:
            init["cwd"] = cwd
        if env:
            init["env"] = {str(k): str(v) for k, v in env.items()}
        if user is not None:
            init["user"] = user
        super().__init__(transport, sandbox_id, command, init=init, max_output_bytes=0, attach_stdout=True)
        self.stdin = StreamWriter(self)
        self._raw = _RawReader(self._out)
        self.width, self.height = int(width), int(height)

    def __repr__(self) -> str:
        state = "running" if not self.done() else f"returncode={self.returncode}"
        return f"<TerminalSession {self.command!r} {self.width}x{self.height} {state}>"

    @property
    def output(self) -> Iterator[bytes]:
        """Raw output chunks as they arrive, until the shell exits."""
        return iter(self._raw)

    def read(self, n: int = -1, timeout: Optional[float] = None) -> bytes:
        """Output that has arrived (at most ``n`` bytes), waiting for some; ``b""`` once the shell has
        exited and everything was read. Raises :class:`SandboxTimeoutError` after ``timeout`` seconds."""
        return self._raw.read(n, timeout)

    def write(self, data: Union[bytes, str]) -> None:
        """Sends keystrokes (``str`` is encoded as UTF-8)."""
        self.stdin.write(data)

    def resize(self, width: int, height: int) -> None:
        """Sets the terminal's size (columns, rows); the shell gets SIGWINCH."""
        self.width, self.height = int(width), int(height)
        self._send(Kind.RESIZE, b'{"width": %d, "height": %d}' % (self.width, self.height), "resize")

    def wait(self, timeout: Optional[float] = None) -> int:
        """Waits for the shell to exit and answers its exit status."""
        if not self._done.wait(timeout):
            raise SandboxTimeoutError(f"shell still running after {timeout} s", code="CLIENT_TIMEOUT")
        if self._exit is None:
            assert self._error is not None
            raise self._error
        return int(self._exit.get("exit_code", -1))

    def result(self, timeout: Optional[float] = None) -> int:
        """Same as :meth:`wait`."""
        return self.wait(timeout)

    def close(self) -> None:
        """Ends the session: a shell still running is killed."""
        if not self.done():
            self.cancel()
        super().close()

    def __enter__(self) -> "TerminalSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
