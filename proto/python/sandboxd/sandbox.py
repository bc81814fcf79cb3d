"""The :class:`Sandbox`: create, run commands, move files, read logs, stop, delete."""

from __future__ import annotations

import re
import threading
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import (
    Any,
    Callable,
    Dict,
    Generic,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    TypeVar,
    Union,
)

from . import options as _options
from ._transport import CHUNK, StreamedResponse, Transport, quote_id, shared_transport
from .exceptions import (
    SandboxError,
    SandboxFailedError,
    SandboxNotFoundError,
    SandboxTerminatedError,
)
from .operation import OperationRef
from .options import (
    MountedFileArg,
    NetworkOptions,
    ResourcesArg,
    SandboxDefaults,
    ServiceArg,
    VolumeArg,
    mounted_file_to_wire,
    network_to_wire,
    resources_to_wire,
    services_to_wire,
    volume_to_wire,
)
from .process import DEFAULT_MAX_OUTPUT_BYTES, Process, TerminalSession

__all__ = ["Sandbox", "SandboxStatus", "FileInfo", "FileDownload", "LogStream"]

T = TypeVar("T")


class SandboxStatus(str, Enum):
    """Lifecycle state of a sandbox: ``PENDING -> CREATING -> RUNNING -> TERMINATING -> COMPLETED |
    FAILED``, and ``TERMINATED`` when stopped (by a user or its lifetime). Compares equal to its name."""

    PENDING = "PENDING"
    CREATING = "CREATING"
    RUNNING = "RUNNING"
    TERMINATING = "TERMINATING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    TERMINATED = "TERMINATED"

    def __str__(self) -> str:
        return self.value

    @property
    def is_terminal(self) -> bool:
        """True for COMPLETED, FAILED and TERMINATED."""
        return self in (SandboxStatus.COMPLETED, SandboxStatus.FAILED, SandboxStatus.TERMINATED)


_TIME = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|z|[+-]\d\d:?\d\d)?$"
)


def parse_time(s: Optional[str]) -> Optional[datetime]:
    """An RFC 3339 timestamp (nanoseconds allowed) as an aware :class:`datetime`; ``None`` for ``None``."""
    if not s:
        return None
    m = _TIME.match(s)
    if not m:
        return None
    y, mo, d, h, mi, sec, frac, tz = m.groups()
    micro = int((frac or "0")[:6].ljust(6, "0"))
    tzinfo = timezone.utc
    if tz and tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        digits = tz[1:].replace(":", "")
        tzinfo = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
    return datetime(int(y), int(mo), int(d), int(h), int(mi), int(sec), micro, tzinfo=tzinfo)


def _argv(command: Union[str, Sequence[str]]) -> List[str]:
    if isinstance(command, str):
        return ["/bin/sh", "-c", command]
    argv = [str(a) for a in command]
    if not argv:
        raise ValueError("the command is empty")
    return argv


class FileInfo(dict):  # type: ignore[type-arg]
    """What ``write_file`` answers: ``{"path", "size", "mode"}`` (also as attributes)."""

    @property
    def path(self) -> str:
        return str(self.get("path", ""))

    @property
    def size(self) -> int:
        return int(self.get("size", 0))

    @property
    def mode(self) -> int:
        return int(self.get("mode", 0))


class FileDownload:
    """A file being read from a sandbox: iterate for chunks of bytes (``read_file_stream``).

    Attributes:
        size: the file's size in bytes (from ``Content-Length``), if the daemon sent it.
        mode: the file's permission bits, if the daemon sent them.
    """

    def __init__(self, resp: StreamedResponse, path: str, chunk_size: int) -> None:
        self._resp = resp
        self.path = path
        self.chunk_size = chunk_size
        n = resp.headers.get("Content-Length")
        self.size: Optional[int] = int(n) if n and n.isdigit() else None
        m = resp.headers.get("X-Sandboxd-File-Mode")
        self.mode: Optional[int] = int(m, 8) if m else None

    def __iter__(self) -> Iterator[bytes]:
        return self._resp.iter_chunks(self.chunk_size)

    def read(self) -> bytes:
        """The rest of the file."""
        return b"".join(self)

    def close(self) -> None:
        """Stops reading (closes the connection)."""
        self._resp.close()

    def __enter__(self) -> "FileDownload":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LogStream:
    """The main process's output from ``stream_logs()``: iterate for text lines (each with its newline;
    a record the process wrote without one comes as it is). With ``timestamps=True`` each line is
    prefixed with the time the daemon read it and a space: ``"2026-11-22T02:28:05.371297112Z hello\\n"``.
    With ``follow=True`` iteration waits for new output and ends when the sandbox has ended.

    Attributes:
        entries: iterate over the raw records (dicts with ``stream``, ``data``, ``timestamp``) instead.
    """

    def __init__(self, resp: StreamedResponse, timestamps: bool) -> None:
        self._resp = resp
        self._timestamps = timestamps

    def entries(self) -> Iterator[Dict[str, Any]]:
        """The raw records: ``{"stream": "stdout"|"stderr", "data": str, "timestamp": str|None}``
        (``data`` decoded from base64 when the daemon had to encode it)."""
        import base64
        import json

        for raw in self._resp.iter_lines():
            raw = raw.strip()
            if not raw:
                continue
            try:
                e = json.loads(raw.decode("utf-8"))
            except ValueError:
                continue
            if "error" in e and isinstance(e["error"], dict):
                from .exceptions import error_from_api

                err = e["error"]
                raise error_from_api(err.get("code"), err.get("message", ""), err.get("details"))
            data = e.get("data", "")
            if e.get("encoding") == "base64":
                data = base64.b64decode(data).decode("utf-8", "replace")
                e["encoding"] = "utf8"
            e["data"] = data
            yield e

    def __iter__(self) -> Iterator[str]:
        for e in self.entries():
            if self._timestamps and e.get("timestamp"):
                yield f"{e['timestamp']} {e['data']}"
            else:
                yield e["data"]

    def close(self) -> None:
        """Stops reading."""
        self._resp.close()

    def __enter__(self) -> "LogStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _HybridMethod(Generic[T]):
    """A method that is a classmethod when called on the class and an instance method on an instance."""

    def __init__(self, cls_fn: Callable[..., T], inst_fn: Callable[..., T]) -> None:
        self.cls_fn, self.inst_fn = cls_fn, inst_fn
        self.__doc__ = cls_fn.__doc__

    def __get__(self, obj: Any, owner: type) -> Callable[..., T]:
        if obj is None:
            return self.cls_fn.__get__(owner, owner)  # type: ignore[attr-defined, no-any-return]
        return self.inst_fn.__get__(obj, owner)  # type: ignore[attr-defined, no-any-return]


class Sandbox:
    """A sandbox managed by sandboxd.

    Create one with :meth:`run` (which starts it at once) or through a :class:`~sandboxd.Session`
    (which starts it on first use). Creation proceeds in a background thread; every operation waits for
    it, and a creation error (an unknown image, a bad resource string) is raised by the next operation.

    As a context manager, leaving the ``with`` block **stops the sandbox (SIGTERM, SIGKILL after
    ``graceful_shutdown_seconds``, 10 s) and then deletes it** (its record, writable layer and logs),
    also when the block raises::

        with Sandbox.run() as sandbox:
            print(sandbox.exec(["python", "--version"]).result().stdout)

    Operations (``exec`` aside, which returns a running :class:`~sandboxd.Process`) run when called, in
    call order, and answer a completed :class:`~sandboxd.OperationRef`, whose ``result()`` gives the
    value; errors are raised by the call itself.

    The daemon's socket is ``$SANDBOXD_SOCKET`` (default ``/run/sandboxd/sandboxd.sock``), read when the
    sandbox object is made.
    """

    def __init__(
        self,
        *,
        command: Optional[str] = None,
        args: Optional[Sequence[str]] = None,
        defaults: Optional[SandboxDefaults] = None,
        container_image: Optional[str] = None,
        max_lifetime_seconds: Optional[float] = None,
        tags: Optional[Iterable[str]] = None,
        resources: ResourcesArg = None,
        network: Union[None, NetworkOptions, Mapping[str, Any]] = None,
        services: Optional[Iterable[ServiceArg]] = None,
        mounted_files: Optional[Iterable[MountedFileArg]] = None,
        volumes: Optional[Iterable[VolumeArg]] = None,
        environment_variables: Optional[Mapping[str, str]] = None,
        annotations: Optional[Mapping[str, str]] = None,
        _transport: Optional[Transport] = None,
    ) -> None:
        """An unstarted sandbox (see :meth:`run` for the arguments); :meth:`start` or the first operation
        starts it."""
        d = defaults if defaults is not None else _options.DEFAULT_SANDBOX_DEFAULTS
        self._transport = _transport or shared_transport()
        self._defaults = d
        if command is not None:
            argv: Optional[List[str]] = [command, *(args or ())]
        elif args:
            raise ValueError("args given without a command")
        elif d.command is not None:
            argv = [d.command, *d.args]
        else:
            argv = None
        req: Dict[str, Any] = {"image": container_image or d.container_image}
        if argv is not None:
            req["command"] = [str(a) for a in argv]
        lifetime = max_lifetime_seconds if max_lifetime_seconds is not None else d.max_lifetime_seconds
        if lifetime is not None:
            req["max_lifetime_seconds"] = float(lifetime)
        t = d.merge_tags(tags)
        if t:
            req["tags"] = list(t)
        res = resources_to_wire(resources if resources is not None else d.resources)
        if res:
            req["resources"] = res
        net = network_to_wire(network if network is not None else d.network)
        if net is not None:
            req["network"] = net
        svcs = services_to_wire(services, d.services)
        if svcs:
            req["services"] = svcs
        env = d.merge_environment_variables(environment_variables)
        if env:
            req["env"] = {str(k): str(v) for k, v in env.items()}
        files = [mounted_file_to_wire(f) for f in (*d.mounted_files, *(mounted_files or ()))]
        if files:
            req["mounted_files"] = files
        vols = [volume_to_wire(v) for v in (*d.volumes, *(volumes or ()))]
        if vols:
            req["volumes"] = vols
        ann = d.merge_annotations(annotations)
        if ann:
            req["annotations"] = {str(k): str(v) for k, v in ann.items()}
        self._request = req
        self._lock = threading.Lock()
        self._create_ref: Optional[OperationRef[None]] = None
        self._id: Optional[str] = None
        self._info: Optional[Dict[str, Any]] = None
        self._deleted = False

    # -- creation ------------------------------------------------------------------------------------

    @classmethod
    def run(
        cls,
        *argv: str,
        command: Optional[str] = None,
        args: Optional[Sequence[str]] = None,
        container_image: Optional[str] = None,
        max_lifetime_seconds: Optional[float] = None,
        tags: Optional[Iterable[str]] = None,
        resources: ResourcesArg = None,
        network: Union[None, NetworkOptions, Mapping[str, Any]] = None,
        services: Optional[Iterable[ServiceArg]] = None,
        mounted_files: Optional[Iterable[MountedFileArg]] = None,
        volumes: Optional[Iterable[VolumeArg]] = None,
        environment_variables: Optional[Mapping[str, str]] = None,
        annotations: Optional[Mapping[str, str]] = None,
        defaults: Optional[SandboxDefaults] = None,
    ) -> "Sandbox":
        """Creates and starts a sandbox; returns at once (creation continues in the background).

        Args:
            *argv: the main process and its arguments (``Sandbox.run("python", "train.py")``). Without
                them the sandbox idles until stopped (unless ``defaults.command`` is set).
            command, args: the same given apart (``Sandbox.run(command="echo", args=["hi"])``).
            container_image: image reference (default ``python:3.11``; no registry means Docker Hub).
            max_lifetime_seconds: the daemon stops the sandbox (TERMINATED) after this long.
            tags: tags, added to the defaults' tags.
            resources: ``{"cpu": "500m", "memory": "512Mi", "pids": 64}`` (requests == limits) or
                ``{"requests": {...}, "limits": {...}}``.
            network: :class:`~sandboxd.NetworkOptions`: egress allow-list or deny, ingress (a bad rule:
                :class:`~sandboxd.SandboxValidationError` naming ``network.egress[i]....``).
            services: ports to publish on the host: ``[Service(port=8000)]`` (or dicts, or bare ``int``
                ports), added to the defaults' services; see :attr:`exposed_ports` and :meth:`url_for`.
                A taken host port: :class:`~sandboxd.SandboxPortInUseError`.
            mounted_files: ``[{"mount_path": "/etc/app.conf", "file_content": b"..."}]``, read-only.
            volumes: scratch volumes, ``(name, mount_path, size)`` tuples or dicts.
            environment_variables: environment of the main process and of every exec.
            annotations: free-form key/value metadata.
            defaults: :class:`~sandboxd.SandboxDefaults` for everything not given (default:
                ``sandboxd.options.DEFAULT_SANDBOX_DEFAULTS``).
        """
        if argv:
            if command is not None or args:
                raise TypeError("give the command either positionally or as command=/args=, not both")
            command, args = argv[0], list(argv[1:])
        sb = cls(
            command=command,
            args=list(args or ()),
            defaults=defaults,
            container_image=container_image,
            max_lifetime_seconds=max_lifetime_seconds,
            tags=tags,
            resources=resources,
            network=network,
            services=services,
            mounted_files=mounted_files,
            volumes=volumes,
            environment_variables=environment_variables,
            annotations=annotations,
        )
        sb.start()
        return sb

    def start(self) -> OperationRef[None]:
        """Starts creating the sandbox in the background (once); the handle completes when the daemon
        has created it (RUNNING), or fails with the creation error."""
        with self._lock:
            if self._create_ref is None:
                self._create_ref = OperationRef.in_thread(self._create, name="sandboxd-create")
            return self._create_ref

    def _create(self) -> None:
        info = self._transport.call("POST", "/v1/sandboxes", json_body=self._request)
        with self._lock:
            self._info = info
            self._id = info["id"]

    @classmethod
    def _from_info(cls, info: Dict[str, Any], transport: Transport) -> "Sandbox":
        sb = cls.__new__(cls)
        sb._transport = transport
        sb._defaults = _options.DEFAULT_SANDBOX_DEFAULTS
        sb._request = {"image": info.get("image", "")}
        sb._lock = threading.Lock()
        sb._create_ref = OperationRef.completed(None)
        sb._id = info["id"]
        sb._info = info
        sb._deleted = False
        return sb

    def _started(self) -> bool:
        return self._create_ref is not None

    def _ensure_created(self, timeout: Optional[float] = None) -> str:
        """Starts the sandbox if needed, waits for its creation and answers its id (or raises the
        creation error)."""
        self.start().result(timeout)
        assert self._id is not None
        return self._id

    # -- state ---------------------------------------------------------------------------------------

    def __repr__(self) -> str:
        info = self._info
        image = (info or {}).get("image") or self._request.get("image")
        if info is not None:
            return (
                f"Sandbox(id={info.get('id')!r}, name={info.get('name')!r}, "
                f"status={str(info.get('status'))!r}, image={image!r})"
            )
        ref = self._create_ref
        if ref is None:
            state = "NOT_STARTED"
        elif not ref.done():
            state = "CREATING"
        else:
            err = ref.exception()
            code = getattr(err, "code", None)
            state = f"FAILED_TO_START: {code}" if code else "FAILED_TO_START"
        return f"Sandbox(id=None, status={state!r}, image={image!r})"

    def refresh(self) -> Dict[str, Any]:
        """Fetches the sandbox's state from the daemon; answers the raw ``SandboxInfo`` dict."""
        sid = self._ensure_created()
        info = self._transport.call("GET", f"/v1/sandboxes/{quote_id(sid)}", error_extra={"sandbox_id": sid})
        self._info = info
        return info  # type: ignore[no-any-return]

    def _current(self) -> Optional[Dict[str, Any]]:
        """Cached info when terminal (it no longer changes), else fresh; ``None`` if not created."""
        ref = self._create_ref
        if ref is None:
            return None
        if not ref.done() or ref.exception() is not None:
            return None
        info = self._info
        if info is not None and SandboxStatus(info["status"]).is_terminal:
            return info
        if self._deleted:
            return info
        try:
            return self.refresh()
        except SandboxNotFoundError:
            return info

    @property
    def sandbox_id(self) -> Optional[str]:
        """The daemon's id of the sandbox. While creation is under way this waits for the daemon's
        answer; ``None`` if the sandbox was never started or could not be created."""
        return self._id if self._created() else None

    def _created(self) -> bool:
        """Waits for a creation under way; whether the sandbox was started and created."""
        ref = self._create_ref
        if ref is None:
            return False
        try:
            ref.result()
        except Exception:  # noqa: BLE001 - creation failed
            return False
        return True

    @property
    def name(self) -> Optional[str]:
        """The sandbox's name (also its hostname), once created."""
        return (self._info or {}).get("name")

    @property
    def container_image(self) -> str:
        """The image (normalised by the daemon once created)."""
        return str((self._info or {}).get("image") or self._request.get("image"))

    @property
    def info(self) -> Optional[Dict[str, Any]]:
        """The daemon's ``SandboxInfo`` (a dict), fresh; ``None`` before creation."""
        return self._current()

    @property
    def status(self) -> Optional[SandboxStatus]:
        """Current state: ``None`` if never started, ``CREATING`` while the daemon creates it, ``FAILED``
        if creation failed, else the daemon's state (fetched fresh until it is terminal)."""
        ref = self._create_ref
        if ref is None:
            return None
        if not ref.done():
            return SandboxStatus.CREATING
        if ref.exception() is not None:
            return SandboxStatus.FAILED
        info = self._current()
        return SandboxStatus(info["status"]) if info else None

    @property
    def returncode(self) -> Optional[int]:
        """The main process's exit status once the sandbox has ended (the code, or 128 + signal);
        ``None`` while it runs."""
        info = self._current()
        if not info or not SandboxStatus(info["status"]).is_terminal:
            return None
        ex = info.get("exit")
        if not ex:
            return None
        if ex.get("code") is not None:
            return int(ex["code"])
        if ex.get("signal") is not None:
            return 128 + int(ex["signal"])
        return None

    @property
    def started_at(self) -> Optional[datetime]:
        """When the sandbox started running."""
        info = self._current()
        return parse_time((info or {}).get("started_at"))

    @property
    def status_updated_at(self) -> Optional[datetime]:
        """When the state last changed."""
        info = self._current()
        return parse_time((info or {}).get("status_updated_at"))

    @property
    def tags(self) -> List[str]:
        """Tags of the sandbox."""
        info = self._info
        return list((info or {}).get("tags") or self._request.get("tags") or [])

    # -- network -------------------------------------------------------------------------------------

    def _created_info(self) -> Optional[Dict[str, Any]]:
        """Fresh info once created (waiting for the creation under way); ``None`` if never started or
        its creation failed."""
        return self._current() if self._created() else None

    @property
    def exposed_ports(self) -> List[Dict[str, Any]]:
        """The published ports as the daemon set them up: ``[{"port": 8000, "protocol": "tcp",
        "host_ip": "127.0.0.1", "host_port": 18080}]`` (fetched fresh; waits for a creation under way);
        ``[]`` if none, if the sandbox was never started or could not be created."""
        info = self._created_info()
        return [dict(p) for p in (info or {}).get("exposed_ports") or []]

    @property
    def network(self) -> Optional[Dict[str, Any]]:
        """The sandbox's network as the daemon set it up: ``{"mode": "bridge"|"none", "address":
        "10.88.0.5", "gateway": "10.88.0.1", "interface": "eth0", "host_interface": ..., "dns": [...],
        "policy": {...}}``, plus ``"address6"`` and ``"gateway6"`` where the daemon has an IPv6 subnet
        (fetched fresh; waits for a creation under way); ``None`` if the daemon reports
        none, if the sandbox was never started or could not be created."""
        info = self._created_info()
        net = (info or {}).get("network")
        return dict(net) if isinstance(net, dict) else None

    def url_for(self, port: int, scheme: str = "http") -> str:
        """The URL of a published TCP port on the host: ``f"{scheme}://{host_ip}:{host_port}"``
        (``sandbox.url_for(8000)`` -> ``"http://127.0.0.1:18080"``; a port published on ``0.0.0.0`` is
        given as ``127.0.0.1``). Waits for the creation (raising
        its error); raises :class:`ValueError` if ``port`` is not published over TCP."""
        self._ensure_created()
        ports = self.exposed_ports
        for p in ports:
            if int(p.get("port", -1)) == int(port) and str(p.get("protocol", "tcp")).lower() == "tcp":
                host = str(p["host_ip"])
                if host == "0.0.0.0":  # published on every address of the host: reach it on loopback
                    host = "127.0.0.1"
                if ":" in host:  # an IPv6 address
                    host = f"[{host}]"
                return f"{scheme}://{host}:{int(p['host_port'])}"
        published = ", ".join(f"{p.get('port')}/{p.get('protocol')}" for p in ports) or "none"
        raise ValueError(f"port {port}/tcp of sandbox {self._id} is not published (published: {published})")

    # -- waiting -------------------------------------------------------------------------------------

    def wait(self, timeout: Optional[float] = None) -> "Sandbox":
        """Starts the sandbox if needed and blocks until it is RUNNING (or has already ended).

        Raises :class:`SandboxTimeoutError` after ``timeout`` seconds, :class:`SandboxFailedError` if it
        FAILED, or the creation error.
        """
        sid = self._ensure_created(timeout)
        info = self._info or {}
        status = SandboxStatus(info.get("status", "RUNNING"))
        if status != SandboxStatus.RUNNING and not status.is_terminal:
            body: Dict[str, Any] = {"condition": "running"}
            if timeout is not None:
                body["timeout_seconds"] = float(timeout)
            info = self._transport.call(
                "POST", f"/v1/sandboxes/{quote_id(sid)}/wait", json_body=body, error_extra={"sandbox_id": sid}
            )
            self._info = info
            status = SandboxStatus(info["status"])
        if status == SandboxStatus.FAILED:
            raise _failed(info)
        return self

    def wait_until_complete(
        self, timeout: Optional[float] = None, raise_on_termination: bool = True
    ) -> OperationRef["Sandbox"]:
        """Starts the sandbox if needed and blocks until it has ended (COMPLETED, FAILED or TERMINATED);
        then :attr:`returncode` is set.

        Raises :class:`SandboxTimeoutError` after ``timeout`` seconds, :class:`SandboxFailedError` if it
        FAILED and, with ``raise_on_termination``, :class:`SandboxTerminatedError` if it was stopped.
        Answers a completed handle whose ``result()`` is the sandbox.
        """
        sid = self._ensure_created(timeout)
        body: Dict[str, Any] = {"condition": "exited"}
        if timeout is not None:
            body["timeout_seconds"] = float(timeout)
        info = self._transport.call(
            "POST", f"/v1/sandboxes/{quote_id(sid)}/wait", json_body=body, error_extra={"sandbox_id": sid}
        )
        self._info = info
        status = SandboxStatus(info["status"])
        if status == SandboxStatus.FAILED:
            raise _failed(info)
        if status == SandboxStatus.TERMINATED and raise_on_termination:
            raise SandboxTerminatedError(
                f"sandbox {sid} was terminated: {info.get('status_reason') or 'stopped'}",
                details={"status": info.get("status"), "exit": info.get("exit")},
            )
        return OperationRef.completed(self)

    # -- exec ----------------------------------------------------------------------------------------

    def exec(
        self,
        command: Union[Sequence[str], str],
        *,
        cwd: Optional[str] = None,
        check: bool = False,
        timeout_seconds: Optional[float] = None,
        stdin: bool = False,
        env: Optional[Mapping[str, str]] = None,
        user: Optional[str] = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> Process:
        """Runs a command in the sandbox and returns its :class:`~sandboxd.Process` at once; output
        streams in as it is written (``for line in process.stdout``), ``.result()`` waits for the end.

        Args:
            command: argv (``["python", "-c", "print(1)"]``); a string is run with ``/bin/sh -c``.
            cwd: working directory (default: the main process's).
            check: make ``result()`` raise :class:`~sandboxd.SandboxExecutionError` on a non-zero exit.
            timeout_seconds: the daemon kills the command's process tree after this long;
                ``result()`` then raises :class:`~sandboxd.SandboxCommandTimeoutError`.
            stdin: give the process a stdin to write to (``process.stdin``); else it reads /dev/null.
            env: extra environment variables.
            user: ``user[:group]`` to run as (default: the main process's).
            max_output_bytes: bytes of each of stdout and stderr that ``result()`` keeps.
        """
        argv = _argv(command)
        sid = self._ensure_created()
        return Process(
            self._transport,
            sid,
            argv,
            cwd=cwd,
            env=dict(env) if env else None,
            user=user,
            timeout_seconds=timeout_seconds,
            stdin=stdin,
            check=check,
            max_output_bytes=max_output_bytes,
        )

    def shell(
        self,
        command: Union[None, str, Sequence[str]] = None,
        width: int = 80,
        height: int = 24,
        *,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        user: Optional[str] = None,
    ) -> TerminalSession:
        """An interactive command on a pseudo-terminal (default ``/bin/sh``): a
        :class:`~sandboxd.TerminalSession` with ``write``, ``read``, ``resize`` and ``close``."""
        argv = ["/bin/sh"] if command is None else _argv(command)
        sid = self._ensure_created()
        return TerminalSession(
            self._transport, sid, argv, width=width, height=height, cwd=cwd,
            env=dict(env) if env else None, user=user,
        )

    # -- files ---------------------------------------------------------------------------------------

    def _files_path(self) -> str:
        return f"/v1/sandboxes/{quote_id(self._ensure_created())}/files"

    def read_file(self, path: str) -> OperationRef[bytes]:
        """Reads a whole file; the handle's ``result()`` is its bytes (and the handle compares equal to
        them). Raises :class:`SandboxFileError` (``FILE_NOT_FOUND``...) if it cannot be read. Use
        :meth:`read_file_stream` for large files."""
        with self.read_file_stream(path) as f:
            return OperationRef.completed(f.read())

    def read_file_stream(self, path: str, chunk_size: int = CHUNK) -> FileDownload:
        """Reads a file as it is sent: iterate the answer for chunks of at most ``chunk_size`` bytes.
        Errors (no such file...) are raised by this call."""
        url = self._files_path()
        resp = self._transport.stream("GET", url, query={"path": path}, error_extra={"path": path})
        return FileDownload(resp, path, chunk_size)

    def write_file(
        self, path: str, contents: Union[bytes, bytearray, memoryview, str], *, mode: Optional[int] = None
    ) -> OperationRef[FileInfo]:
        """Writes a whole file (replacing it atomically; missing parent directories are created). ``str``
        is encoded as UTF-8. ``mode`` defaults to 0644 for a new file, else the file's mode. The
        handle's ``result()`` is a :class:`FileInfo`."""
        if isinstance(contents, str):
            contents = contents.encode("utf-8")
        url = self._files_path()
        q: Dict[str, Any] = {"path": path}
        if mode is not None:
            q["mode"] = format(int(mode), "04o")
        _, _, data = self._transport.request(
            "PUT", url, query=q, body=bytes(contents),
            headers={"Content-Type": "application/octet-stream"}, error_extra={"path": path},
        )
        return OperationRef.completed(_file_info(data, path))

    def write_file_stream(
        self,
        path: str,
        data: Union[Iterable[Union[bytes, str]], Any],
        *,
        mode: Optional[int] = None,
        chunk_size: int = CHUNK,
    ) -> OperationRef[FileInfo]:
        """Writes a file from an iterable of bytes chunks or a binary file object, sent as it is read
        (chunked upload; memory stays bounded). The file is replaced only once everything arrived."""
        url = self._files_path()
        q: Dict[str, Any] = {"path": path}
        if mode is not None:
            q["mode"] = format(int(mode), "04o")
        resp = self._transport.stream(
            "PUT", url, query=q, body=_chunks(data, chunk_size), chunked=True,
            headers={"Content-Type": "application/octet-stream"}, error_extra={"path": path},
        )
        try:
            body = resp.read(-1)
        finally:
            resp.close()
        return OperationRef.completed(_file_info(body, path))

    # -- logs ----------------------------------------------------------------------------------------

    def stream_logs(
        self, follow: bool = False, tail_lines: Optional[int] = None, timestamps: bool = False
    ) -> LogStream:
        """The main process's stdout and stderr as text lines (see :class:`LogStream`).

        Args:
            follow: keep waiting for new output until the sandbox has ended.
            tail_lines: only the last this many lines (of each stream) first.
            timestamps: prefix every line with the time the daemon read it.
        """
        sid = self._ensure_created()
        q: Dict[str, Any] = {"follow": follow, "timestamps": timestamps}
        if tail_lines is not None:
            q["tail_lines"] = int(tail_lines)
        resp = self._transport.stream(
            "GET", f"/v1/sandboxes/{quote_id(sid)}/logs/stream", query=q, error_extra={"sandbox_id": sid}
        )
        return LogStream(resp, timestamps)

    # -- stop / delete -------------------------------------------------------------------------------

    def stop(self, graceful_shutdown_seconds: float = 10.0, missing_ok: bool = False) -> OperationRef[None]:
        """Stops the sandbox: SIGTERM to its main process, SIGKILL after ``graceful_shutdown_seconds``;
        returns once it has ended (TERMINATED, or its own end state if it had already ended). A sandbox
        never started, or whose creation failed, has nothing to stop. ``missing_ok``: no error if the
        daemon no longer knows it."""
        ref = self._create_ref
        if ref is None:
            return OperationRef.completed(None)
        try:
            ref.result()
        except Exception:  # noqa: BLE001 - creation failed: nothing to stop
            return OperationRef.completed(None)
        sid = self._id
        assert sid is not None
        try:
            self._info = self._transport.call(
                "POST",
                f"/v1/sandboxes/{quote_id(sid)}/stop",
                json_body={"grace_seconds": float(graceful_shutdown_seconds)},
                error_extra={"sandbox_id": sid},
            )
        except SandboxNotFoundError:
            if not missing_ok:
                raise
        return OperationRef.completed(None)

    @classmethod
    def _delete_cls(cls, sandbox_id: str, missing_ok: bool = False) -> OperationRef[None]:
        """Deletes the sandbox with this id (or name), killing it first if it runs: its record, writable
        layer and logs are removed. ``missing_ok``: no error if there is no such sandbox."""
        t = shared_transport()
        try:
            t.request(
                "DELETE", f"/v1/sandboxes/{quote_id(sandbox_id)}", query={"force": True},
                error_extra={"sandbox_id": sandbox_id},
            )
        except SandboxNotFoundError:
            if not missing_ok:
                raise
        return OperationRef.completed(None)

    def _delete_inst(self, missing_ok: bool = False) -> OperationRef[None]:
        """Deletes this sandbox (killing it first if it runs). Nothing to do if it was never created."""
        ref = self._create_ref
        if ref is None:
            return OperationRef.completed(None)
        try:
            ref.result()
        except Exception:  # noqa: BLE001 - creation failed: nothing to delete
            return OperationRef.completed(None)
        sid = self._id
        assert sid is not None
        try:
            self._transport.request(
                "DELETE", f"/v1/sandboxes/{quote_id(sid)}", query={"force": True},
                error_extra={"sandbox_id": sid},
            )
        except SandboxNotFoundError:
            if not missing_ok:
                raise
        self._deleted = True
        return OperationRef.completed(None)

    #: ``Sandbox.delete(id, missing_ok=False)`` deletes by id; ``sandbox.delete(missing_ok=False)`` this one.
    delete = _HybridMethod(_delete_cls.__func__, _delete_inst)  # type: ignore[attr-defined]

    # -- lookup --------------------------------------------------------------------------------------

    @classmethod
    def from_id(cls, sandbox_id: str) -> OperationRef["Sandbox"]:
        """The existing sandbox with this id (or name); raises :class:`SandboxNotFoundError`. The
        handle stands for the sandbox: ``Sandbox.from_id(i).exec(...)`` and ``.result()`` both work."""
        t = shared_transport()
        info = t.call("GET", f"/v1/sandboxes/{quote_id(sandbox_id)}", error_extra={"sandbox_id": sandbox_id})
        return OperationRef.completed(cls._from_info(info, t))

    @classmethod
    def list(
        cls,
        tags: Optional[Iterable[str]] = None,
        status: Union[None, str, SandboxStatus, Iterable[Union[str, SandboxStatus]]] = None,
    ) -> OperationRef[List["Sandbox"]]:
        """Sandboxes known to the daemon, oldest first: those carrying every tag in ``tags``, in one of
        the ``status`` states (a state or a list of them). The handle stands for the list."""
        t = shared_transport()
        return OperationRef.completed(_list(t, tags, status))

    # -- context manager -----------------------------------------------------------------------------

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Stops the sandbox (graceful, 10 s), then deletes it; errors of either are raised only when the
        block itself did not raise."""
        try:
            self.stop(missing_ok=True)
            self.delete(missing_ok=True)
        except SandboxError:
            if exc_type is None:
                raise


# -- helpers -------------------------------------------------------------------------------------------


def _failed(info: Dict[str, Any]) -> SandboxFailedError:
    reason = info.get("status_reason") or (info.get("exit") or {}).get("reason") or "failed"
    return SandboxFailedError(
        f"sandbox {info.get('id')} failed: {reason}",
        details={"status": info.get("status"), "exit": info.get("exit")},
    )


def _file_info(data: bytes, path: str) -> FileInfo:
    import json

    try:
        v = json.loads(data.decode("utf-8")) if data else {}
    except ValueError:
        v = {}
    fi = FileInfo(v if isinstance(v, dict) else {})
    fi.setdefault("path", path)
    return fi


def _chunks(data: Any, chunk_size: int) -> Iterator[bytes]:
    read = getattr(data, "read", None)
    if read is not None:
        while True:
            b = read(chunk_size)
            if not b:
                return
            yield b.encode("utf-8") if isinstance(b, str) else bytes(b)
    elif isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        for i in range(0, len(view), chunk_size):
            yield bytes(view[i : i + chunk_size])
    else:
        for b in data:
            if b:
                yield b.encode("utf-8") if isinstance(b, str) else bytes(b)


def _status_query(status: Union[None, str, SandboxStatus, Iterable[Union[str, SandboxStatus]]]) -> Optional[str]:
    if status is None:
        return None
    if isinstance(status, (str, SandboxStatus)):
        return str(status).upper()
    return ",".join(str(s).upper() for s in status) or None


def _list(
    t: Transport,
    tags: Optional[Iterable[str]],
    status: Union[None, str, SandboxStatus, Iterable[Union[str, SandboxStatus]]],
    annotation: Optional[Mapping[str, str]] = None,
) -> List[Sandbox]:
    tag_list = [tags] if isinstance(tags, str) else list(tags or [])
    q: Dict[str, Any] = {"status": _status_query(status)}
    if tag_list:
        q["tag"] = tag_list[0]  # the daemon filters on one tag; the others are checked here
    body = t.call("GET", "/v1/sandboxes", query=q)
    out = []
    for info in body.get("sandboxes", []):
        have = set(info.get("tags") or [])
        if not all(tg in have for tg in tag_list):
            continue
        ann = info.get("annotations") or {}
        if annotation and any(ann.get(k) != v for k, v in annotation.items()):
            continue
        out.append(Sandbox._from_info(info, t))
    return out
