"""Shared helpers of the client tests: the daemon check, per-run tags, clean-up, running seed snippets."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import unittest
import uuid
from typing import Any, Dict, Iterable, Optional, Tuple
from unittest import mock

import sandboxd
from sandboxd import Sandbox, SandboxDefaults, SandboxNotFoundError

#: Tag carried by every sandbox these tests create (through the patched defaults or explicitly), so that
#: what a test leaves behind can be found and deleted.
RUN_TAG = "pyclient-" + uuid.uuid4().hex[:8]

#: Safety bound for reads that wait for output (never a synchronisation delay: the awaited output always
#: comes; the bound only turns a hang into a failure).
BOUND = 120.0


def require_daemon() -> None:
    """Fails (not skips) when no daemon answers on ``SANDBOXD_SOCKET``: the suite is meant to run against
    one (``cargo test -p sandbox-tests --test python_client`` starts it)."""
    path = os.environ.get(sandboxd.SOCKET_ENV)
    if not path:
        raise RuntimeError(f"{sandboxd.SOCKET_ENV} is not set: point it at a running sandboxd's socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError as e:
        raise RuntimeError(f"no sandboxd answers at {path}: {e}") from e
    finally:
        s.close()


def delete_tagged(*tags: str) -> None:
    """Deletes every sandbox carrying all ``tags`` (killing it if it runs)."""
    for sb in Sandbox.list(tags=list(tags)).result():
        Sandbox.delete(sb.sandbox_id, missing_ok=True)


def unique_tag() -> str:
    return "t-" + uuid.uuid4().hex[:10]


def capture(fn: Any, *args: Any, **kw: Any) -> Tuple[str, Any]:
    """Runs ``fn`` with stdout captured; answers ``(stdout, return value)``."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        value = fn(*args, **kw)
    return buf.getvalue(), value


SEED_IMPORT = "from wandb.sandbox import"
CLIENT_IMPORT = "from sandboxd import"


def as_client_code(seed: str) -> str:
    """The seed snippet with its import line changed to this client, and nothing else."""
    lines = seed.splitlines(keepends=True)
    changed = [i for i, line in enumerate(lines) if line.startswith(SEED_IMPORT)]
    assert len(changed) == 1, f"a seed snippet has exactly one `{SEED_IMPORT}` line:\n{seed}"
    i = changed[0]
    lines[i] = CLIENT_IMPORT + lines[i][len(SEED_IMPORT) :]
    return "".join(lines)


def run_seed(seed: str, defaults: SandboxDefaults, name: str) -> Tuple[str, Dict[str, Any]]:
    """Runs a seed snippet (import line changed) with stdout captured and ``defaults`` as the client's
    process-wide defaults (``sandboxd.options.DEFAULT_SANDBOX_DEFAULTS``); answers ``(stdout, globals)``.
    The globals are returned even when the snippet raises (as ``exc.seed_globals``)."""
    code = compile(as_client_code(seed), f"<seed {name}>", "exec")
    ns: Dict[str, Any] = {"__name__": "__seed__"}
    buf = io.StringIO()
    with mock.patch("sandboxd.options.DEFAULT_SANDBOX_DEFAULTS", defaults):
        try:
            with contextlib.redirect_stdout(buf):
                exec(code, ns)  # noqa: S102 - the seed snippet under test
        except BaseException as e:
            e.seed_globals = ns  # type: ignore[attr-defined]
            e.seed_stdout = buf.getvalue()  # type: ignore[attr-defined]
            raise
    return buf.getvalue(), ns


class DaemonTestCase(unittest.TestCase):
    """Base class: checks the daemon once, and deletes what a test left behind (by tag)."""

    @classmethod
    def setUpClass(cls) -> None:
        require_daemon()

    def tag(self) -> str:
        """A tag unique to this test, also deleted at its end."""
        t = unique_tag()
        self.addCleanup(delete_tagged, t)
        return t

    def run_sandbox(self, *args: str, **kw: Any) -> Sandbox:
        """``Sandbox.run`` with this run's tag plus a test tag; deleted at the end of the test."""
        tags = list(kw.pop("tags", ()) or ()) + [RUN_TAG, self.tag()]
        sb = Sandbox.run(*args, tags=tags, **kw)
        self.addCleanup(_delete_quietly, sb)
        return sb


def _delete_quietly(sb: Sandbox) -> None:
    try:
        sb.delete(missing_ok=True)
    except SandboxNotFoundError:
        pass
    except sandboxd.SandboxError:
        pass


def lines_of(it: Iterable[str]) -> list:
    return list(it)


def read_until(term: Any, needle: bytes, bound: Optional[float] = BOUND) -> bytes:
    """Reads a terminal session's output until ``needle`` appears (or the stream ends)."""
    out = b""
    while needle not in out:
        b = term.read(timeout=bound)
        if not b:
            break
        out += b
    return out
