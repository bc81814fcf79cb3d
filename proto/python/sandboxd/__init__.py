"""sandboxd: the Python client of the sandboxd daemon (standard library only).

::

    from sandboxd import Sandbox

    with Sandbox.run(container_image="python:3.11") as sandbox:
        print(sandbox.exec(["python", "--version"]).result().stdout)

The client talks HTTP/1.1 to the daemon's Unix socket: ``$SANDBOXD_SOCKET``, default
``/run/sandboxd/sandboxd.sock``. See ``proto/python/README.md`` and ``docs/API.md``.
"""

from ._transport import DEFAULT_SOCKET, SOCKET_ENV, socket_path
from .exceptions import (
    SandboxCommandTimeoutError,
    SandboxConnectionError,
    SandboxError,
    SandboxExecutionError,
    SandboxFailedError,
    SandboxFileError,
    SandboxImageNotFoundError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxPortInUseError,
    SandboxResourceExhaustedError,
    SandboxTerminatedError,
    SandboxTimeoutError,
    SandboxValidationError,
)
from .operation import OperationRef
from .options import (
    DEFAULT_CONTAINER_IMAGE,
    EgressRule,
    MountedFile,
    NetworkOptions,
    ResourceOptions,
    SandboxDefaults,
    Service,
    Volume,
)
from .process import Process, ProcessResult, StreamReader, StreamWriter, TerminalSession
from .sandbox import FileDownload, FileInfo, LogStream, Sandbox, SandboxStatus
from .session import Session

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CONTAINER_IMAGE",
    "DEFAULT_SOCKET",
    "SOCKET_ENV",
    "socket_path",
    "Sandbox",
    "SandboxStatus",
    "Session",
    "SandboxDefaults",
    "NetworkOptions",
    "EgressRule",
    "Service",
    "ResourceOptions",
    "MountedFile",
    "Volume",
    "Process",
    "ProcessResult",
    "StreamReader",
    "StreamWriter",
    "TerminalSession",
    "OperationRef",
    "FileInfo",
    "FileDownload",
    "LogStream",
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
]
