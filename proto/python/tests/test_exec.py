"""Commands: streaming output, stdin, check, timeouts, cancel, options, large output, TTY shells."""

from __future__ import annotations

import hashlib
import threading

from sandboxd import (
    Process,
    ProcessResult,
    Sandbox,
    SandboxCommandTimeoutError,
    SandboxExecutionError,
    SandboxTimeoutError,
)

from .support import BOUND, RUN_TAG, DaemonTestCase, delete_tagged, read_until, unique_tag


class Exec(DaemonTestCase):
    """One idle python:3.11 sandbox shared by the tests of this class."""

    sandbox: Sandbox

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.class_tag = unique_tag()
        cls.sandbox = Sandbox.run(tags=[RUN_TAG, cls.class_tag])
        cls.sandbox.wait(timeout=BOUND)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.sandbox.stop(graceful_shutdown_seconds=1)
        cls.sandbox.delete()
        delete_tagged(cls.class_tag)

    def test_result_fields(self) -> None:
        p = self.sandbox.exec(["sh", "-c", "echo out; echo err >&2; exit 2"])
        self.assertIsInstance(p, Process)
        r = p.result(timeout=BOUND)
        self.assertIsInstance(r, ProcessResult)
        self.assertEqual((r.stdout, r.stderr, r.returncode), ("out\n", "err\n", 2))
        self.assertEqual((r.stdout_bytes, r.stderr_bytes), (b"out\n", b"err\n"))
        self.assertEqual(r.command, ["sh", "-c", "echo out; echo err >&2; exit 2"])
        self.assertFalse(r.stdout_truncated or r.stderr_truncated or r.timed_out or r.cancelled)
        self.assertEqual(p.returncode, 2)
        self.assertEqual(p.poll(), 2)
        self.assertEqual(p.wait(), 2)

    def test_lines_stream_as_they_are_written(self) -> None:
        # The command prints a line, then blocks on stdin: the first line must arrive while it waits,
        # the next only after the test has written.
        p = self.sandbox.exec(
            ["sh", "-c", "echo first; read x; echo \"got $x\"; echo warn >&2; read y; echo \"and $y\""],
            stdin=True,
        )
        self.assertEqual(p.stdout.readline(timeout=BOUND), "first\n")
        self.assertIsNone(p.poll())  # still waiting for its input
        p.stdin.writeline("one").result()
        self.assertEqual(p.stdout.readline(timeout=BOUND), "got one\n")
        self.assertEqual(p.stderr.readline(timeout=BOUND), "warn\n")
        self.assertIsNone(p.returncode)
        p.stdin.write(b"two\n").result()
        self.assertEqual(list(p.stdout), ["and two\n"])
        r = p.result(timeout=BOUND)
        self.assertEqual(r.stdout, "first\ngot one\nand two\n")
        self.assertEqual(r.returncode, 0)

    def test_iterating_stdout_as_the_hosted_docs_do(self) -> None:
        p = self.sandbox.exec(["sh", "-c", "for i in 1 2 3; do echo $i; done; printf tail"])
        self.assertEqual([line for line in p.stdout], ["1\n", "2\n", "3\n", "tail"])
        self.assertEqual(p.result().stdout, "1\n2\n3\ntail")

    def test_stdin_close_is_end_of_file(self) -> None:
        p = self.sandbox.exec(["sort"], stdin=True)
        for word in ("pear", "apple", "fig"):
            p.stdin.writeline(word)
        p.stdin.close().result()
        self.assertTrue(p.stdin.closed)
        self.assertEqual(p.result(timeout=BOUND).stdout, "apple\nfig\npear\n")
        # Without stdin=True there is no stdin, and the process reads end-of-file.
        q = self.sandbox.exec(["cat"])
        self.assertIsNone(q.stdin)
        self.assertEqual(q.result(timeout=BOUND).stdout, "")

    def test_binary_stdin_round_trip(self) -> None:
        data = bytes(range(256)) * 4096  # 1 MiB, every byte value
        p = self.sandbox.exec(["sha256sum"], stdin=True)
        p.stdin.write(data)
        p.stdin.close()
        self.assertEqual(p.result(timeout=BOUND).stdout.split()[0], hashlib.sha256(data).hexdigest())

    def test_check_raises_with_the_result(self) -> None:
        with self.assertRaises(SandboxExecutionError) as cm:
            self.sandbox.exec(["sh", "-c", "echo bad >&2; exit 7"], check=True).result()
        self.assertEqual(cm.exception.exec_result.returncode, 7)
        self.assertEqual(cm.exception.exec_result.stderr, "bad\n")
        # check=True and success: no error.
        self.assertEqual(self.sandbox.exec(["true"], check=True).result().returncode, 0)

    def test_timeout_kills_the_command(self) -> None:
        p = self.sandbox.exec(["sh", "-c", "echo partial; exec sleep 600"], timeout_seconds=0.5)
        with self.assertRaises(SandboxCommandTimeoutError) as cm:
            p.result(timeout=BOUND)
        e = cm.exception
        self.assertIsInstance(e, SandboxTimeoutError)
        self.assertEqual(e.code, "EXEC_TIMEOUT")
        self.assertTrue(e.exec_result.timed_out)
        self.assertEqual(e.exec_result.returncode, 137)
        self.assertEqual(e.exec_result.stdout, "partial\n")

    def test_client_side_wait_timeout_leaves_it_running(self) -> None:
        p = self.sandbox.exec(["sh", "-c", "read x; echo $x"], stdin=True)
        with self.assertRaises(SandboxTimeoutError):
            p.wait(timeout=0.05)
        self.assertIsNone(p.poll())
        p.stdin.writeline("still here")
        self.assertEqual(p.result(timeout=BOUND).stdout, "still here\n")

    def test_cancel_kills_the_process_tree(self) -> None:
        p = self.sandbox.exec(["sh", "-c", "sleep 600 & echo started; wait"])
        self.assertEqual(p.stdout.readline(timeout=BOUND), "started\n")
        p.cancel()
        r = p.result(timeout=BOUND)
        self.assertTrue(r.cancelled)
        self.assertEqual(r.returncode, 137)
        # Nothing of the tree is left: no sleep 600 in the sandbox.
        ps = self.sandbox.exec(
            ["sh", "-c", "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' <$f; echo; done 2>/dev/null"]
        ).result()
        self.assertNotIn("sleep 600 \n", ps.stdout.splitlines(keepends=True))

    def test_cwd_env_user(self) -> None:
        r = self.sandbox.exec(
            ["sh", "-c", "pwd; echo \"$GREETING\"; id -u"], cwd="/tmp", env={"GREETING": "hi there"}, user="nobody"
        ).result()
        self.assertEqual(r.stdout, "/tmp\nhi there\n65534\n")
        self.assertEqual(self.sandbox.exec(["pwd"]).result().stdout, "/\n")

    def test_string_command_runs_with_sh(self) -> None:
        self.assertEqual(self.sandbox.exec("echo $((6*7))").result().stdout, "42\n")

    def test_missing_executable(self) -> None:
        r = self.sandbox.exec(["no-such-program"]).result()
        self.assertEqual(r.returncode, 127)
        self.assertIn("no-such-program", r.stderr)

    def test_large_output_lines_and_result(self) -> None:
        n = 1_000_000
        p = self.sandbox.exec(["seq", "1", str(n)])
        count, last = 0, ""
        for line in p.stdout:
            count += 1
            last = line
        self.assertEqual((count, last), (n, f"{n}\n"))
        r = p.result()
        self.assertEqual(len(r.stdout_bytes), sum(len(str(i)) + 1 for i in range(1, n + 1)))
        self.assertFalse(r.stdout_truncated)

    def test_output_past_the_cap_is_truncated_in_the_result_but_streamed_whole(self) -> None:
        size = 48 << 20
        cmd = ["sh", "-c", f"head -c {size} /dev/zero | tr '\\0' x"]
        # Read through an iterator: every byte arrives, the result keeps the first 4 MiB.
        p = self.sandbox.exec(cmd, max_output_bytes=4 << 20)
        total = sum(len(chunk) for chunk in p.stdout)
        self.assertEqual(total, size)
        r = p.result()
        self.assertTrue(r.stdout_truncated)
        self.assertEqual(len(r.stdout_bytes), 4 << 20)
        # Not read: the output is drained, the result still keeps its start.
        r = self.sandbox.exec(cmd).result(timeout=BOUND)
        self.assertTrue(r.stdout_truncated)
        self.assertEqual(len(r.stdout_bytes), 16 << 20)
        self.assertEqual(r.returncode, 0)

    def test_binary_output(self) -> None:
        r = self.sandbox.exec(["sh", "-c", "printf '\\377\\376abc'"]).result()
        self.assertEqual(r.stdout_bytes, b"\xff\xfeabc")
        self.assertEqual(r.stdout, "\ufffd\ufffdabc")

    def test_concurrent_execs(self) -> None:
        procs = [self.sandbox.exec(["sh", "-c", f"read x; echo {i}-$x"], stdin=True) for i in range(8)]
        for i, p in enumerate(reversed(procs)):
            p.stdin.writeline(str(i))
            p.stdin.close()
        outs = sorted(p.result(timeout=BOUND).stdout for p in procs)
        self.assertEqual(outs, sorted(f"{7 - i}-{i}\n" for i in range(8)))

    def test_threads_share_a_sandbox(self) -> None:
        results = {}

        def work(i: int) -> None:
            results[i] = self.sandbox.exec(["echo", str(i)]).result().stdout

        ts = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        self.assertEqual(results, {i: f"{i}\n" for i in range(6)})


class Shell(DaemonTestCase):
    def test_tty_and_resize(self) -> None:
        sb = self.run_sandbox()
        with sb.shell(width=80, height=24) as term:
            term.write("tty\n")
            out = read_until(term, b"/dev/pts/")
            self.assertIn(b"/dev/pts/", out)
            term.write("stty size\n")
            self.assertIn(b"24 80", read_until(term, b"24 80"))
            term.resize(120, 40)
            term.write("stty size\n")
            self.assertIn(b"40 120", read_until(term, b"40 120"))
            term.stdin.writeline("exit 5")
            rest = b"".join(term.output)  # everything up to the shell's exit
            self.assertIsInstance(rest, bytes)
            self.assertEqual(term.wait(timeout=BOUND), 5)

    def test_a_command_on_a_tty(self) -> None:
        sb = self.run_sandbox()
        term = sb.shell(["python", "-c", "import sys; print(sys.stdin.isatty(), sys.stdout.isatty())"])
        self.assertEqual(b"".join(term.output).strip(), b"True True")
        self.assertEqual(term.wait(timeout=BOUND), 0)
        term.close()
