"""A :class:`Session`: sandboxes created with shared defaults, stopped and deleted together."""

from __future__ import annotations

import threading
import uuid
from typing import Any, Iterable, List, Optional, Union

from . import options as _options
from ._transport import shared_transport
from .exceptions import SandboxError
from .operation import OperationRef
from .options import SandboxDefaults
from .sandbox import Sandbox, SandboxStatus, _list

__all__ = ["Session", "SESSION_ANNOTATION"]

#: The annotation that marks the sandboxes a session created (its value is the session's id).
SESSION_ANNOTATION = "sandboxd.session"


class Session:
    """Creates sandboxes from shared :class:`~sandboxd.SandboxDefaults` and cleans them up together.

    ``session.sandbox()`` returns an unstarted sandbox that starts on its first ``exec``, ``read_file``,
    ``write_file``, ``wait``, ``wait_until_complete``, ``stream_logs`` or ``shell``. Closing the session
    (leaving its ``with`` block, or :meth:`close`) stops every sandbox it created or adopted (with
    :meth:`from_id`) and deletes it. Each sandbox carries the annotation ``sandboxd.session=<id>``, by
    which :meth:`list` finds them::

        with Session(SandboxDefaults(container_image="python:3.11", tags=("batch-job",))) as session:
            a, b = session.sandbox(), session.sandbox()
            print(a.exec(["echo", "hi"]).result().stdout)
    """

    def __init__(self, defaults: Optional[SandboxDefaults] = None) -> None:
        self.defaults = defaults if defaults is not None else _options.DEFAULT_SANDBOX_DEFAULTS
        self.session_id = uuid.uuid4().hex[:16]
        self._transport = shared_transport()
        self._sandboxes: List[Sandbox] = []
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"Session(id={self.session_id!r}, sandboxes={len(self._sandboxes)}, closed={self._closed})"

    @property
    def sandboxes(self) -> List[Sandbox]:
        """The sandboxes this session created or adopted (started or not)."""
        with self._lock:
            return list(self._sandboxes)

    def sandbox(self, *args: str, **overrides: Any) -> Sandbox:
        """An unstarted sandbox with the session's defaults; ``args`` is the main command, ``overrides``
        any argument of :meth:`Sandbox.run` (``container_image=...``, ``tags=...``, ...)."""
        if self._closed:
            raise SandboxError("the session is closed", code="SESSION_CLOSED")
        overrides.pop("defaults", None)
        if "command" in overrides:
            cmd = overrides.pop("command")
            args = ((cmd, *overrides.pop("args", ())) if cmd is not None else ()) or args
        annotations = dict(overrides.pop("annotations", None) or {})
        annotations[SESSION_ANNOTATION] = self.session_id
        sb = Sandbox(
            command=args[0] if args else None,
            args=list(args[1:]),
            defaults=self.defaults,
            annotations=annotations,
            _transport=self._transport,
            **overrides,
        )
        with self._lock:
            self._sandboxes.append(sb)
        return sb

    def list(
        self,
        tags: Optional[Iterable[str]] = None,
        status: Union[None, str, SandboxStatus, Iterable[Union[str, SandboxStatus]]] = None,
    ) -> OperationRef[List[Sandbox]]:
        """The started sandboxes of this session that still exist, oldest first (optionally filtered)."""
        return OperationRef.completed(
            _list(self._transport, tags, status, annotation={SESSION_ANNOTATION: self.session_id})
        )

    def from_id(self, sandbox_id: str) -> OperationRef[Sandbox]:
        """An existing sandbox, adopted by the session: it is stopped and deleted when the session closes."""
        sb = Sandbox.from_id(sandbox_id).result()
        with self._lock:
            self._sandboxes.append(sb)
        return OperationRef.completed(sb)

    def close(self, graceful_shutdown_seconds: float = 10.0) -> OperationRef[None]:
        """Stops and deletes every sandbox the session started (in parallel); raises the first error
        after trying them all."""
        with self._lock:
            self._closed = True
            todo, self._sandboxes = self._sandboxes, []
        errors: List[BaseException] = []

        def finish(sb: Sandbox) -> None:
            try:
                sb.stop(graceful_shutdown_seconds, missing_ok=True)
                sb.delete(missing_ok=True)
            except BaseException as e:  # noqa: BLE001 - collected, raised below
                errors.append(e)

        threads = [threading.Thread(target=finish, args=(sb,), daemon=True) for sb in todo if sb._started()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return OperationRef.completed(None)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.close()
        except SandboxError:
            if exc_type is None:
                raise
