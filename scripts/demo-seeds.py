#!/usr/bin/env python3
"""The seed walkthrough for scripts/demo: every code snippet of the two seed pages (the hosted product's
"Create sandboxes" and "Run commands"), run through the Python client with only the import line changed
(`from wandb.sandbox import` -> `from sandboxd import`). The snippets are the ones the test suite checks
(proto/python/tests/test_seeds.py). `train.py` and `might_fail.py` reach the sandboxes the snippets create
through the client's process-wide defaults (mounted files), as in the tests.
"""
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "proto", "python"))

from sandboxd import Sandbox, SandboxDefaults, SandboxError  # noqa: E402
from tests import test_seeds as seeds  # noqa: E402
from tests.support import as_client_code, run_seed  # noqa: E402

TAG = "sandboxd-demo-seeds"
DEFAULTS = SandboxDefaults(
    mounted_files=(
        {"mount_path": "/train.py", "file_content": seeds.TRAIN_PY},
        {"mount_path": "/might_fail.py", "file_content": seeds.MIGHT_FAIL_PY},
    ),
    tags=(TAG,),
)

WALK = [
    ("create-sandboxes: python:3.15 (no such tag here: a clear not-found error)", seeds.SEED_IMAGE_315),
    ("create-sandboxes: print a sandbox", seeds.SEED_PRINT_SANDBOX),
    ("create-sandboxes: a main command, waited for", seeds.SEED_MAIN_COMMAND_WAIT),
    ("create-sandboxes: a session with defaults", seeds.SEED_SESSION),
    ("run-commands: a single command", seeds.SEED_SINGLE_COMMAND),
    ("run-commands: keep running with sleep infinity", seeds.SEED_SLEEP_INFINITY),
    ("run-commands: output and exit codes", seeds.SEED_HELLO),
    ("run-commands: check for errors", seeds.SEED_CHECK),
]


def main() -> int:
    failed = 0
    for title, seed in WALK:
        print(f"\n\033[1m== {title}\033[0m")
        print(as_client_code(seed).rstrip())
        print("\033[2m-- output --\033[0m")
        try:
            out, _ = run_seed(seed, DEFAULTS, title)
            print(out, end="")
        except SandboxError as e:
            print(f"{type(e).__name__}: {e}")
            if seed is not seeds.SEED_IMAGE_315:
                failed += 1
    print("\n\033[1m== run-commands: pip install torch\033[0m")
    print(
        "skipped here: sandboxes have egress, but the real torch is a multi-hundred-MB download (with its\n"
        "dependencies, gigabytes). The test suite runs this snippet verbatim against a stand-in package index\n"
        "in its outside world (tests/src/outside_world.py: a tiny `torch` 2.99.0 wheel), through the daemon's NAT."
    )
    # What the snippets leave running on purpose (a sandbox without `with`) is removed here.
    for sb in Sandbox.list(tags=[TAG]).result():
        Sandbox.delete(sb.sandbox_id, missing_ok=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
