"""The code snippets of the two seed pages (``create-sandboxes.md``, ``run-commands.md``), verbatim but
for the import line (``from wandb.sandbox import`` -> ``from sandboxd import``, done by
:func:`support.as_client_code`), each run with its stdout captured and checked.

The snippets create their sandboxes themselves, so the files they need (``train.py``,
``might_fail.py``; the working directory of ``python:3.11`` is ``/``) are given to every sandbox through
the client's process-wide defaults: ``sandboxd.options.DEFAULT_SANDBOX_DEFAULTS`` is patched, for the
length of a snippet, with a ``SandboxDefaults`` whose ``mounted_files`` hold the two scripts (and whose
tags let the test find and delete what a snippet leaves running). The ``pip install torch`` snippet also gets
pip's configuration there (``environment_variables``), pointing it at the package index named by
``SANDBOXD_TEST_PIP_INDEX``: the stand-in index of the test's outside world, with a tiny stand-in ``torch``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import textwrap
import unittest
import urllib.parse

from sandboxd import Sandbox, SandboxDefaults, SandboxImageNotFoundError, SandboxStatus

from .support import RUN_TAG, DaemonTestCase, delete_tagged, run_seed, unique_tag

TRAIN_PY = b'print("training done")\n'
MIGHT_FAIL_PY = b'import sys\nsys.stderr.write("might_fail: simulated failure\\n")\nsys.exit(3)\n'

#: The package index the pip seed installs from (set by tests/tests/python_client.rs to its stand-in index).
PIP_INDEX_ENV = "SANDBOXD_TEST_PIP_INDEX"

# ---- create-sandboxes.md ------------------------------------------------------------------------------

SEED_IMAGE_315 = r'''from wandb.sandbox import Sandbox

with Sandbox.run(container_image="python:3.15") as sandbox:
    sandbox.exec(["python", "--version"]).result()
'''

SEED_PRINT_SANDBOX = r'''from wandb.sandbox import Sandbox

with Sandbox.run() as sandbox:
    print(sandbox)
'''

SEED_MAIN_COMMAND = r'''from wandb.sandbox import Sandbox

sandbox = Sandbox.run("python", "train.py")
'''

SEED_MAIN_COMMAND_WAIT = r'''from wandb.sandbox import Sandbox

sandbox = Sandbox.run("python", "train.py")

# Optionally wait for the command to complete
sandbox.wait_until_complete().result()
'''

SEED_SESSION = r'''from wandb.sandbox import Session, SandboxDefaults

defaults = SandboxDefaults(
    container_image="python:3.11",
    max_lifetime_seconds=300,
    tags=("batch-job",),
)

with Session(defaults) as session:
    sandbox1 = session.sandbox()
    sandbox2 = session.sandbox()

    print(sandbox1)
    print(sandbox2)
'''

# ---- run-commands.md ----------------------------------------------------------------------------------

SEED_SINGLE_COMMAND = r'''from wandb.sandbox import Sandbox

sandbox = Sandbox.run("python", "train.py")
sandbox.wait_until_complete(timeout=3600.0).result()
print(f"Exit code: {sandbox.returncode}")
'''

SEED_PIP_TORCH = r'''from wandb.sandbox import Sandbox

with Sandbox.run() as sandbox:
    result = sandbox.exec(["pip", "install", "torch"]).result()
    print(result.stdout)

    result = sandbox.exec(["python", "train.py"]).result()
    print(result.stdout)
'''

SEED_SLEEP_INFINITY = r'''from wandb.sandbox import Sandbox

with Sandbox.run("sleep", "infinity") as sandbox:
    result = sandbox.exec(["python", "train.py"]).result()
    print(result.stdout)
'''

SEED_HELLO = r'''from wandb.sandbox import Sandbox

with Sandbox.run() as sandbox:
    result = sandbox.exec(["python", "-c", "print('hello')"]).result()
    print(result.stdout)      # "hello\\n"
    print(result.returncode)  # 0
'''

SEED_CHECK = r'''from wandb.sandbox import Sandbox, SandboxExecutionError

with Sandbox.run() as sandbox:
    try:
        sandbox.exec(["python", "might_fail.py"], check=True).result()
    except SandboxExecutionError as e:
        print(f"Command failed with exit code {e.exec_result.returncode}")
        print(e.exec_result.stderr)
'''

ALL_SEEDS = {
    "create-sandboxes.md": [SEED_IMAGE_315, SEED_PRINT_SANDBOX, SEED_MAIN_COMMAND, SEED_MAIN_COMMAND_WAIT, SEED_SESSION],
    "run-commands.md": [SEED_SINGLE_COMMAND, SEED_PIP_TORCH, SEED_SLEEP_INFINITY, SEED_HELLO, SEED_CHECK],
}

PRINTED_SANDBOX = re.compile(
    r"^Sandbox\(id=(None|'[0-9a-f]{16}'), (name='sb-[0-9a-f]{8}', )?status='(CREATING|RUNNING)', "
    r"image='(docker\.io/library/)?python:3\.11'\)\n$"
)


class SeedSnippets(DaemonTestCase):
    """Every snippet of the seed pages, run as written."""

    def setUp(self) -> None:
        self.seed_tag = unique_tag()
        self.addCleanup(delete_tagged, self.seed_tag)
        self.defaults = SandboxDefaults(
            mounted_files=(
                {"mount_path": "/train.py", "file_content": TRAIN_PY},
                {"mount_path": "/might_fail.py", "file_content": MIGHT_FAIL_PY},
            ),
            tags=(RUN_TAG, self.seed_tag),
        )

    def seed(self, source: str, name: str):
        return run_seed(source, self.defaults, name)

    def assert_none_left(self) -> None:
        """The snippet's ``with`` block stopped and deleted its sandbox."""
        self.assertEqual([s.sandbox_id for s in Sandbox.list(tags=[self.seed_tag])], [])

    # -- create-sandboxes.md --

    def test_image_python_315_is_a_clear_not_found_error(self) -> None:
        # The local registry has no python:3.15 (and the test does not tag another Python under that
        # name): the snippet raises the not-found error, naming the image, at its first operation.
        with self.assertRaises(SandboxImageNotFoundError) as cm:
            self.seed(SEED_IMAGE_315, "python-3.15")
        e = cm.exception
        self.assertEqual(e.code, "IMAGE_NOT_FOUND")
        self.assertIn("python:3.15", str(e))
        self.assertEqual(e.image, "docker.io/library/python:3.15")
        self.assertEqual(e.seed_stdout, "")  # type: ignore[attr-defined]
        self.assert_none_left()

    def test_print_sandbox(self) -> None:
        # The same snippet appears twice on the page ("Create a sandbox", "without a main command").
        for _ in range(2):
            out, ns = self.seed(SEED_PRINT_SANDBOX, "print-sandbox")
            self.assertRegex(out, PRINTED_SANDBOX)
            self.assertIsNotNone(ns["sandbox"].sandbox_id)
            self.assert_none_left()

    def test_main_command(self) -> None:
        out, ns = self.seed(SEED_MAIN_COMMAND, "main-command")
        self.assertEqual(out, "")
        sandbox = ns["sandbox"]
        self.addCleanup(sandbox.delete, missing_ok=True)
        sandbox.wait_until_complete(timeout=120).result()
        self.assertEqual(sandbox.status, SandboxStatus.COMPLETED)
        self.assertEqual(sandbox.returncode, 0)
        self.assertEqual(list(sandbox.stream_logs()), ["training done\n"])

    def test_main_command_wait(self) -> None:
        out, ns = self.seed(SEED_MAIN_COMMAND_WAIT, "main-command-wait")
        self.assertEqual(out, "")
        sandbox = ns["sandbox"]
        self.addCleanup(sandbox.delete, missing_ok=True)
        self.assertEqual(sandbox.status, "COMPLETED")
        self.assertEqual(sandbox.returncode, 0)

    def test_session_with_defaults(self) -> None:
        out, ns = self.seed(SEED_SESSION, "session")
        # session.sandbox() is unstarted: nothing was created, and printing says so.
        self.assertEqual(
            out,
            "Sandbox(id=None, status='NOT_STARTED', image='python:3.11')\n" * 2,
        )
        self.assertIsNone(ns["sandbox1"].sandbox_id)
        self.assertEqual(Sandbox.list(tags=["batch-job"]).result(), [])

    # -- run-commands.md --

    def test_single_command(self) -> None:
        out, ns = self.seed(SEED_SINGLE_COMMAND, "single-command")
        self.addCleanup(ns["sandbox"].delete, missing_ok=True)
        self.assertEqual(out, "Exit code: 0\n")

    def test_pip_install_torch(self) -> None:
        # Against the stand-in package index of the test's outside world (tests/src/outside_world.py): its
        # only project is a tiny pure-Python `torch` 2.99.0 (not PyTorch), reached through the daemon's NAT.
        # pip is configured the way a user would, through the environment (the process-wide defaults'
        # environment_variables reach every exec). python:3.11 here is Debian's python3 + python3-pip with
        # EXTERNALLY-MANAGED removed, as in the official image: no --break-system-packages needed.
        index = os.environ.get(PIP_INDEX_ENV)
        if not index:
            self.skipTest(
                f"{PIP_INDEX_ENV} (a package index with a `torch` the sandboxes can reach) is not set: "
                "`cargo test -p sandbox-tests --test python_client` sets it to its stand-in index"
            )
        host = urllib.parse.urlsplit(index).hostname
        self.defaults = dataclasses.replace(
            self.defaults,
            environment_variables={
                "PIP_INDEX_URL": index,
                "PIP_TRUSTED_HOST": host,
                "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                "PIP_NO_CACHE_DIR": "1",
                "PIP_ROOT_USER_ACTION": "ignore",
            },
        )
        out, _ = self.seed(SEED_PIP_TORCH, "pip-install-torch")
        # pip's stdout, then train.py's: each printed with print()'s newline after the output's own.
        pip_out, sep, rest = out.partition("\n\ntraining done\n")
        self.assertEqual((sep, rest), ("\n\ntraining done\n", "\n"), out)
        self.assertIn(f"Looking in indexes: {index}", pip_out)
        self.assertIn("torch-2.99.0-py3-none-any.whl", pip_out)
        self.assertRegex(pip_out, r"(?m)^Successfully installed torch-2\.99\.0$")
        self.assert_none_left()

    def test_keep_running_with_sleep_infinity(self) -> None:
        out, _ = self.seed(SEED_SLEEP_INFINITY, "sleep-infinity")
        self.assertEqual(out, "training done\n\n")
        self.assert_none_left()

    def test_read_output_and_exit_code(self) -> None:
        out, _ = self.seed(SEED_HELLO, "hello")
        self.assertEqual(out, "hello\n\n0\n")
        self.assert_none_left()

    def test_check_for_execution_errors(self) -> None:
        out, _ = self.seed(SEED_CHECK, "check")
        self.assertEqual(out, "Command failed with exit code 3\nmight_fail: simulated failure\n\n")
        self.assert_none_left()


class SeedTexts(unittest.TestCase):
    """The snippets above are those of the seed pages, character for character."""

    def test_snippets_are_verbatim(self) -> None:
        d = os.environ.get("SANDBOXD_SEEDS_DIR")
        if not d:
            self.skipTest("SANDBOXD_SEEDS_DIR (the directory of the seed pages) is not set")
        for page, snippets in ALL_SEEDS.items():
            with open(os.path.join(d, page), encoding="utf-8") as f:
                text = f.read()
            # The page's Python code blocks, de-indented (one sits inside an <Info> box).
            blocks = [
                textwrap.dedent(m.group(2))
                for m in re.finditer(r"(?m)^( *)```python theme=\{null\}\n(.*?)^\1```", text, re.S)
            ]
            self.assertEqual(len(blocks), len(snippets) + (1 if page == "create-sandboxes.md" else 0))
            for s in snippets:
                self.assertIn(s, blocks, f"not verbatim in {page}:\n{s}")
