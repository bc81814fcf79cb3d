"""Handles of operations: ``.result(timeout)`` gives the value (or raises the operation's error)."""

from __future__ import annotations

import threading
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

from .exceptions import SandboxTimeoutError

__all__ = ["OperationRef"]

T = TypeVar("T")

_UNSET: Any = object()


class OperationRef(Generic[T]):
    """The handle of an operation, as returned by ``stop()``, ``write_file()``, ``Sandbox.from_id()``...

    ``result(timeout=None)`` blocks until the operation is done and answers its value, or raises its
    error. Operations of this client run when they are called, in call order (a ``write_file`` is done
    before the next line of your program runs), so the handle is usually complete when you get it; it
    exists so that code written for the hosted API (``sandbox.stop().result()``) runs unchanged.

    A handle also stands for its value: attribute access, iteration, indexing, ``len()``, ``bytes()`` and
    ``==`` resolve it first, so ``Sandbox.from_id(i).exec([...])``, ``for sb in Sandbox.list(): ...`` and
    ``sandbox.read_file(p) == b"..."`` work as written.
    """

    __slots__ = ("_event", "_value", "_error", "_lock")

    def __init__(self) -> None:
        self._event = threading.Event()
        self._value: Any = _UNSET
        self._error: Optional[BaseException] = None
        self._lock = threading.Lock()

    # -- building ------------------------------------------------------------------------------------

    @classmethod
    def completed(cls, value: T) -> "OperationRef[T]":
        """A handle already done with ``value``."""
        ref: OperationRef[T] = cls()
        ref._set(value, None)
        return ref

    @classmethod
    def failed(cls, error: BaseException) -> "OperationRef[T]":
        """A handle already done with ``error``."""
        ref: OperationRef[T] = cls()
        ref._set(None, error)
        return ref

    @classmethod
    def run(cls, fn: Callable[[], T]) -> "OperationRef[T]":
        """Runs ``fn`` now, in the calling thread, and answers a completed handle with its value or error."""
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - handed back through result()
            return cls.failed(e)
        return cls.completed(value)

    @classmethod
    def in_thread(cls, fn: Callable[[], T], name: str = "sandboxd-op") -> "OperationRef[T]":
        """Runs ``fn`` in a background (daemon) thread; the handle completes when it returns."""
        ref: OperationRef[T] = cls()

        def target() -> None:
            try:
                v = fn()
            except BaseException as e:  # noqa: BLE001 - handed back through result()
                ref._set(None, e)
            else:
                ref._set(v, None)

        threading.Thread(target=target, name=name, daemon=True).start()
        return ref

    def _set(self, value: Any, error: Optional[BaseException]) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._value = value
            self._error = error
            self._event.set()

    # -- using ---------------------------------------------------------------------------------------

    def done(self) -> bool:
        """True once the operation has finished (successfully or not)."""
        return self._event.is_set()

    def result(self, timeout: Optional[float] = None) -> T:
        """The operation's value; raises its error. ``SandboxTimeoutError`` if not done within ``timeout``."""
        if not self._event.wait(timeout):
            raise SandboxTimeoutError(f"operation not done within {timeout} s", code="CLIENT_TIMEOUT")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[no-any-return]

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        """The operation's error, or ``None`` if it succeeded (waits like :meth:`result`)."""
        if not self._event.wait(timeout):
            raise SandboxTimeoutError(f"operation not done within {timeout} s", code="CLIENT_TIMEOUT")
        return self._error

    def __repr__(self) -> str:
        if not self._event.is_set():
            return "OperationRef(<pending>)"
        if self._error is not None:
            return f"OperationRef(error={self._error!r})"
        return f"OperationRef({self._value!r})"

    # -- standing for the value ----------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.result(), name)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.result())  # type: ignore[call-overload]

    def __len__(self) -> int:
        return len(self.result())  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        return self.result()[key]  # type: ignore[index]

    def __contains__(self, item: Any) -> bool:
        return item in self.result()  # type: ignore[operator]

    def __bytes__(self) -> bytes:
        return bytes(self.result())  # type: ignore[call-overload]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, OperationRef):
            return self is other
        return bool(self.result() == other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = object.__hash__
