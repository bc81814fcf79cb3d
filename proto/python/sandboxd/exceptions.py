"""The exception hierarchy of the sandboxd client.

Every error the client raises is a :class:`SandboxError`. Each carries the daemon's stable error ``code``
(``"SANDBOX_NOT_FOUND"``, ...), a human ``message`` and the structured ``details`` the daemon sent (a dict,
empty when there were none). Errors the daemon reports are mapped to a subclass by their code
(:data:`CODE_TO_EXCEPTION`); an unknown code gives a plain :class:`SandboxError`.

::

    SandboxError
     +-- SandboxConnectionError          the daemon's socket cannot be reached / the connection broke
     +-- SandboxNotFoundError            SANDBOX_NOT_FOUND
     +-- SandboxNotRunningError          SANDBOX_NOT_RUNNING
     +-- SandboxTimeoutError             WAIT_TIMEOUT, client-side timeouts
     |    +-- SandboxCommandTimeoutError EXEC_TIMEOUT (an exec past its timeout_seconds)
     +-- SandboxTerminatedError          the sandbox was stopped (TERMINATED)
     +-- SandboxFailedError              the sandbox FAILED, or could not start (START_FAILED,
     |                                   NETWORK_ERROR: the host could not set up its network)
     +-- SandboxExecutionError           check=True and a non-zero exit; a broken exec stream
     +-- SandboxFileError                FILE_NOT_FOUND, FILE_READ_ONLY, FILE_ERROR
     +-- SandboxResourceExhaustedError   RESOURCE_EXHAUSTED
     +-- SandboxValidationError          INVALID_ARGUMENT, INVALID_REQUEST
     +-- SandboxImageNotFoundError       IMAGE_NOT_FOUND
     +-- SandboxPortInUseError           PORT_IN_USE (a published port's host port is taken)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Type

if TYPE_CHECKING:  # pragma: no cover
    from .process import ProcessResult

__all__ = [
    "SandboxError",
    "SandboxConnectionError",
    "SandboxNotFoundError",
    "SandboxNotRunningError",
    "SandboxTimeoutError",
    "SandboxCommandTimeoutError",
    "SandboxTerminatedError",
    "SandboxFailedError",
    "SandboxExecutionError",
    "SandboxFileError",
    "SandboxResourceExhaustedError",
    "SandboxValidationError",
    "SandboxImageNotFoundError",
    "SandboxPortInUseError",
    "CODE_TO_EXCEPTION",
    "error_from_api",
]


class SandboxError(Exception):
    """Base class of every error of the sandboxd client.

    Attributes:
        code: the daemon's stable error code (``"SANDBOX_NOT_FOUND"``), or a client-side code such as
            ``"CONNECTION_ERROR"``; ``None`` when there is none.
        message: a sentence for humans.
        details: structured details from the daemon (``{"field": "resources.memory"}``, ...); ``{}`` if none.
    """

    default_code: Optional[str] = None

    def __init__(
        self,
        message: str = "",
        *,
        code: Optional[str] = None,
        details: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__(message)
        self.message: str = message
        self.code: Optional[str] = code if code is not None else self.default_code
        self.details: Dict[str, Any] = dict(details or {})

    def __str__(self) -> str:
        if self.code:
            return f"{self.code}: {self.message}"
        return self.message


class SandboxConnectionError(SandboxError):
    """The daemon could not be reached on its socket, or the connection broke mid-call."""

    default_code = "CONNECTION_ERROR"


class SandboxNotFoundError(SandboxError):
    """No sandbox with that id or name (``SANDBOX_NOT_FOUND``).

    Attributes:
        sandbox_id: the id (or name) asked for, when known.
    """

    default_code = "SANDBOX_NOT_FOUND"

    def __init__(self, message: str = "", *, sandbox_id: Optional[str] = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.sandbox_id = sandbox_id


class SandboxNotRunningError(SandboxError):
    """The operation needs a RUNNING sandbox (``SANDBOX_NOT_RUNNING``)."""

    default_code = "SANDBOX_NOT_RUNNING"


class SandboxTimeoutError(SandboxError):
    """A wait ran past its timeout (``WAIT_TIMEOUT``, or a client-side timeout)."""

    default_code = "WAIT_TIMEOUT"


class SandboxCommandTimeoutError(SandboxTimeoutError):
    """An exec ran past its ``timeout_seconds``; its process tree was killed (``EXEC_TIMEOUT``).

    Attributes:
        exec_result: the :class:`~sandboxd.ProcessResult` with the output produced before the kill, when
            known.
    """

    default_code = "EXEC_TIMEOUT"

    def __init__(self, message: str = "", *, exec_result: Optional["ProcessResult"] = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.exec_result = exec_result


class SandboxTerminatedError(SandboxError):
    """The sandbox was stopped (by a user or its lifetime) before its main process ended: TERMINATED."""

    default_code = "SANDBOX_TERMINATED"


class SandboxFailedError(SandboxError):
    """The sandbox FAILED (its main process exited non-zero, was killed or OOM-killed) or could not
    start (``START_FAILED``; ``NETWORK_ERROR`` when the host failed to set up its network: netlink,
    nftables, binding a published port)."""

    default_code = "SANDBOX_FAILED"


class SandboxExecutionError(SandboxError):
    """A command failed: ``check=True`` and a non-zero exit status, or its exec stream broke.

    Attributes:
        exec_result: the :class:`~sandboxd.ProcessResult` of the failed command, or ``None``.
    """

    default_code = "EXECUTION_ERROR"

    def __init__(self, message: str = "", *, exec_result: Optional["ProcessResult"] = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.exec_result = exec_result


class SandboxFileError(SandboxError):
    """A file operation failed inside the sandbox: no such file (``FILE_NOT_FOUND``), a read-only path
    (``FILE_READ_ONLY``), a directory where a file was expected (``FILE_ERROR``, ``details["errno"]``).

    Attributes:
        path: the path inside the sandbox, when known.
    """

    default_code = "FILE_ERROR"

    def __init__(self, message: str = "", *, path: Optional[str] = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.path = path


class SandboxResourceExhaustedError(SandboxError):
    """Out of a resource on the host (``RESOURCE_EXHAUSTED``; ``details["resource"]`` says which, e.g.
    ``"disk"``)."""

    default_code = "RESOURCE_EXHAUSTED"


class SandboxValidationError(SandboxError, ValueError):
    """A bad argument (``INVALID_ARGUMENT``, ``INVALID_REQUEST``).

    Attributes:
        field: the offending field (``"resources.memory"``) when the daemon named it.
    """

    default_code = "INVALID_ARGUMENT"

    @property
    def field(self) -> Optional[str]:
        f = self.details.get("field")
        return f if isinstance(f, str) else None


class SandboxImageNotFoundError(SandboxError):
    """The image does not exist: not stored here and not at its registry (``IMAGE_NOT_FOUND``).

    Attributes:
        image: the normalised reference that was not found, when known.
    """

    default_code = "IMAGE_NOT_FOUND"

    @property
    def image(self) -> Optional[str]:
        r = self.details.get("reference")
        return r if isinstance(r, str) else None


class SandboxPortInUseError(SandboxError):
    """A published port's host port is already taken on the host, by another sandbox or another
    program (``PORT_IN_USE``); nothing of the sandbox is left behind.

    Attributes:
        field: the offending field (``"services[0].host_port"``).
        host_ip: the host address asked for, when known.
        host_port: the taken host port, when known.
    """

    default_code = "PORT_IN_USE"

    @property
    def field(self) -> Optional[str]:
        f = self.details.get("field")
        return f if isinstance(f, str) else None

    @property
    def host_ip(self) -> Optional[str]:
        h = self.details.get("host_ip")
        return h if isinstance(h, str) else None

    @property
    def host_port(self) -> Optional[int]:
        p = self.details.get("host_port")
        return p if isinstance(p, int) and not isinstance(p, bool) else None


#: Daemon error code -> exception class.
CODE_TO_EXCEPTION: Dict[str, Type[SandboxError]] = {
    "SANDBOX_NOT_FOUND": SandboxNotFoundError,
    "SANDBOX_NOT_RUNNING": SandboxNotRunningError,
    "WAIT_TIMEOUT": SandboxTimeoutError,
    "EXEC_TIMEOUT": SandboxCommandTimeoutError,
    "INVALID_ARGUMENT": SandboxValidationError,
    "INVALID_REQUEST": SandboxValidationError,
    "FILE_NOT_FOUND": SandboxFileError,
    "FILE_READ_ONLY": SandboxFileError,
    "FILE_ERROR": SandboxFileError,
    "RESOURCE_EXHAUSTED": SandboxResourceExhaustedError,
    "IMAGE_NOT_FOUND": SandboxImageNotFoundError,
    "START_FAILED": SandboxFailedError,
    "NETWORK_ERROR": SandboxFailedError,
    "PORT_IN_USE": SandboxPortInUseError,
}


def error_from_api(
    code: Optional[str],
    message: str,
    details: Optional[Mapping[str, Any]] = None,
    **extra: Any,
) -> SandboxError:
    """The exception for an error the daemon answered (``{"code", "message", "details"}``).

    ``extra`` keyword arguments (``sandbox_id``, ``path``) are passed to the classes that take them.
    """
    cls = CODE_TO_EXCEPTION.get(code or "", SandboxError)
    kw: Dict[str, Any] = {"code": code, "details": details}
    if cls is SandboxNotFoundError and "sandbox_id" in extra:
        kw["sandbox_id"] = extra["sandbox_id"]
    if cls is SandboxFileError and "path" in extra:
        kw["path"] = extra["path"]
    return cls(message, **kw)
