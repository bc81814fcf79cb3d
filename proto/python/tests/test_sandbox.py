"""Sandboxes: lifecycle, files, logs, options, listing, sessions, errors."""

from __future__ import annotations

import datetime
import hashlib
import io
import ipaddress
import os
import re
import socket
import urllib.request
from unittest import mock

import sandboxd
from sandboxd import (
    EgressRule,
    NetworkOptions,
    Sandbox,
    SandboxConnectionError,
    SandboxDefaults,
    SandboxError,
    SandboxFailedError,
    SandboxFileError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxPortInUseError,
    SandboxStatus,
    SandboxTerminatedError,
    SandboxTimeoutError,
    SandboxValidationError,
    Service,
    Session,
)

from .support import BOUND, RUN_TAG, DaemonTestCase, capture, delete_tagged, unique_tag


class Lifecycle(DaemonTestCase):
    def test_run_returns_at_once_and_wait_reaches_running(self) -> None:
        sb = self.run_sandbox()
        self.assertIn(sb.status, (SandboxStatus.CREATING, SandboxStatus.RUNNING))
        self.assertIs(sb.wait(timeout=BOUND), sb)
        self.assertEqual(sb.status, SandboxStatus.RUNNING)
        self.assertEqual(sb.status, "RUNNING")
        self.assertRegex(sb.sandbox_id, r"^[0-9a-f]{16}$")
        self.assertIsNone(sb.returncode)
        self.assertIsInstance(sb.started_at, datetime.datetime)
        self.assertIsNotNone(sb.started_at.tzinfo)
        self.assertGreaterEqual(sb.status_updated_at, sb.started_at)
        self.assertEqual(
            repr(sb),
            f"Sandbox(id='{sb.sandbox_id}', name='sb-{sb.sandbox_id[:8]}', status='RUNNING', "
            "image='docker.io/library/python:3.11')",
        )
        out, _ = capture(print, sb)
        self.assertEqual(out, repr(sb) + "\n")

    def test_completed_main_command(self) -> None:
        sb = self.run_sandbox("sh", "-c", "echo done")
        ref = sb.wait_until_complete(timeout=BOUND)
        self.assertIs(ref.result(), sb)
        self.assertEqual(sb.status, SandboxStatus.COMPLETED)
        self.assertTrue(sb.status.is_terminal)
        self.assertEqual(sb.returncode, 0)

    def test_failed_main_command(self) -> None:
        sb = self.run_sandbox("sh", "-c", "exit 3")
        with self.assertRaises(SandboxFailedError) as cm:
            sb.wait_until_complete(timeout=BOUND)
        self.assertIn("3", str(cm.exception))
        self.assertEqual(sb.status, SandboxStatus.FAILED)
        self.assertEqual(sb.returncode, 3)

    def test_stopped_is_terminated(self) -> None:
        sb = self.run_sandbox()
        sb.wait(timeout=BOUND)
        # Stopped through another handle: the waiter sees TERMINATED.
        Sandbox.from_id(sb.sandbox_id).stop(graceful_shutdown_seconds=5).result()
        with self.assertRaises(SandboxTerminatedError):
            sb.wait_until_complete(timeout=BOUND)
        self.assertIs(sb.wait_until_complete(raise_on_termination=False).result(), sb)
        self.assertEqual(sb.status, SandboxStatus.TERMINATED)
        # Stopping again is fine; exec is refused.
        sb.stop().result()
        with self.assertRaises(SandboxNotRunningError):
            sb.exec(["true"]).result()

    def test_stop_ends_a_main_command_that_ignores_nothing(self) -> None:
        sb = self.run_sandbox("sleep", "infinity")
        sb.wait(timeout=BOUND)
        sb.stop(graceful_shutdown_seconds=10.0).result()
        self.assertEqual(sb.status, SandboxStatus.TERMINATED)

    def test_max_lifetime_terminates(self) -> None:
        sb = self.run_sandbox(max_lifetime_seconds=1)
        with self.assertRaises(SandboxTerminatedError):
            sb.wait_until_complete(timeout=60)
        self.assertEqual(sb.status, SandboxStatus.TERMINATED)
        self.assertEqual(sb.info["max_lifetime_seconds"], 1)

    def test_wait_until_complete_times_out(self) -> None:
        sb = self.run_sandbox()
        with self.assertRaises(SandboxTimeoutError) as cm:
            sb.wait_until_complete(timeout=0.2)
        self.assertEqual(cm.exception.code, "WAIT_TIMEOUT")
        self.assertEqual(sb.status, SandboxStatus.RUNNING)

    def test_exec_in_a_completed_sandbox(self) -> None:
        sb = self.run_sandbox("true")
        sb.wait_until_complete(timeout=BOUND)
        with self.assertRaises(SandboxNotRunningError) as cm:
            sb.exec(["echo", "hi"]).result(timeout=BOUND)
        self.assertEqual(cm.exception.code, "SANDBOX_NOT_RUNNING")
        with self.assertRaises(SandboxNotRunningError):
            sb.read_file("/etc/hostname")

    def test_context_manager_stops_and_deletes_also_on_error(self) -> None:
        tag = self.tag()
        with self.assertRaises(ZeroDivisionError):
            with Sandbox.run(tags=[RUN_TAG, tag]) as sb:
                sb.wait(timeout=BOUND)
                sid = sb.sandbox_id
                1 / 0
        with self.assertRaises(SandboxNotFoundError):
            Sandbox.from_id(sid)
        self.assertEqual(Sandbox.list(tags=[tag]).result(), [])


class Lookup(DaemonTestCase):
    def test_list_filters_and_from_id(self) -> None:
        tag, other = self.tag(), self.tag()
        a = self.run_sandbox(tags=[tag])
        a.wait(timeout=BOUND)  # created before b: lists are oldest first
        b = self.run_sandbox("true", tags=[tag, other])
        a.wait(timeout=BOUND)
        b.wait_until_complete(timeout=BOUND)
        ids = lambda sbs: [s.sandbox_id for s in sbs]  # noqa: E731
        self.assertEqual(ids(Sandbox.list(tags=[tag])), [a.sandbox_id, b.sandbox_id])
        self.assertEqual(ids(Sandbox.list(tags=[tag, other])), [b.sandbox_id])
        self.assertEqual(ids(Sandbox.list(tags=[tag], status="RUNNING")), [a.sandbox_id])
        self.assertEqual(ids(Sandbox.list(tags=[tag], status=[SandboxStatus.COMPLETED])), [b.sandbox_id])
        self.assertEqual(ids(Sandbox.list(tags=[tag], status=["FAILED", "TERMINATED"]).result()), [])
        with self.assertRaises(SandboxValidationError) as cm:
            Sandbox.list(status="SLEEPING")
        self.assertEqual(cm.exception.field, "status")
        # from_id: by id or by name; the handle stands for the sandbox.
        same = Sandbox.from_id(a.sandbox_id)
        self.assertEqual(same.result().sandbox_id, a.sandbox_id)
        self.assertEqual(same.exec(["echo", "via from_id"]).result().stdout, "via from_id\n")
        self.assertEqual(Sandbox.from_id(a.name).result().sandbox_id, a.sandbox_id)
        self.assertTrue({RUN_TAG, tag, other} <= set(Sandbox.from_id(b.sandbox_id).result().tags))

    def test_unknown_id(self) -> None:
        with self.assertRaises(SandboxNotFoundError) as cm:
            Sandbox.from_id("0123456789abcdef")
        self.assertEqual(cm.exception.code, "SANDBOX_NOT_FOUND")
        self.assertEqual(cm.exception.sandbox_id, "0123456789abcdef")
        with self.assertRaises(SandboxNotFoundError):
            Sandbox.delete("0123456789abcdef")
        Sandbox.delete("0123456789abcdef", missing_ok=True).result()

    def test_delete(self) -> None:
        sb = self.run_sandbox()
        sb.wait(timeout=BOUND)
        sid = sb.sandbox_id
        Sandbox.delete(sid).result()  # a running sandbox is killed and deleted
        with self.assertRaises(SandboxNotFoundError):
            Sandbox.from_id(sid)
        sb.delete(missing_ok=True)
        with self.assertRaises(SandboxNotFoundError):
            sb.delete()
        sb.stop(missing_ok=True)
        with self.assertRaises(SandboxNotFoundError):
            sb.stop()
        with self.assertRaises(SandboxNotFoundError):
            sb.exec(["true"])


class Files(DaemonTestCase):
    sandbox: Sandbox

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.class_tag = unique_tag()
        cls.sandbox = Sandbox.run(
            tags=[RUN_TAG, cls.class_tag],
            mounted_files=[{"mount_path": "/etc/app.conf", "file_content": b"answer=42\n"}],
        )

    @classmethod
    def tearDownClass(cls) -> None:
        cls.sandbox.delete(missing_ok=True)
        delete_tagged(cls.class_tag)

    def test_write_then_read(self) -> None:
        # As in the issue: no .result() needed; operations run in call order.
        self.sandbox.write_file("/data/hello.txt", b"hello")
        self.assertEqual(self.sandbox.read_file("/data/hello.txt"), b"hello")
        self.assertEqual(self.sandbox.read_file("/data/hello.txt").result(), b"hello")
        info = self.sandbox.write_file("/data/deep/er/x.bin", bytes(range(256)), mode=0o600).result()
        self.assertEqual((info.path, info.size, info.mode), ("/data/deep/er/x.bin", 256, 0o600))
        r = self.sandbox.exec(["stat", "-c", "%a %s", "/data/deep/er/x.bin"]).result()
        self.assertEqual(r.stdout, "600 256\n")
        self.assertEqual(self.sandbox.read_file("/data/deep/er/x.bin").result(), bytes(range(256)))
        # Replace, and text.
        self.sandbox.write_file("/data/hello.txt", "héllo")
        self.assertEqual(self.sandbox.exec(["cat", "/data/hello.txt"]).result().stdout, "héllo")

    def test_file_written_by_a_command(self) -> None:
        self.sandbox.exec(["sh", "-c", "printf 'from exec' > /tmp/e.txt"]).result()
        self.assertEqual(self.sandbox.read_file("/tmp/e.txt").result(), b"from exec")

    def test_streamed_multi_mib_round_trip(self) -> None:
        size = 24 << 20
        block = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB
        digest = hashlib.sha256()

        def chunks():
            for _ in range(size // len(block)):
                digest.update(block)
                yield block

        info = self.sandbox.write_file_stream("/big/file.bin", chunks()).result()
        self.assertEqual(info.size, size)
        self.assertEqual(
            self.sandbox.exec(["sha256sum", "/big/file.bin"]).result().stdout.split()[0], digest.hexdigest()
        )
        back = hashlib.sha256()
        n = 0
        with self.sandbox.read_file_stream("/big/file.bin", chunk_size=256 << 10) as f:
            self.assertEqual(f.size, size)
            for chunk in f:
                self.assertLessEqual(len(chunk), 256 << 10)
                back.update(chunk)
                n += len(chunk)
        self.assertEqual((n, back.hexdigest()), (size, digest.hexdigest()))
        # From a file object.
        data = os.urandom(3 << 20)
        self.sandbox.write_file_stream("/big/from-fileobj", io.BytesIO(data)).result()
        self.assertEqual(self.sandbox.read_file("/big/from-fileobj").result(), data)

    def test_missing_file(self) -> None:
        with self.assertRaises(SandboxFileError) as cm:
            self.sandbox.read_file("/no/such/file").result()
        self.assertEqual(cm.exception.code, "FILE_NOT_FOUND")
        self.assertEqual(cm.exception.path, "/no/such/file")
        with self.assertRaises(SandboxFileError):
            self.sandbox.read_file_stream("/no/such/file")

    def test_directory_is_a_file_error(self) -> None:
        with self.assertRaises(SandboxFileError) as cm:
            self.sandbox.read_file("/etc")
        self.assertEqual(cm.exception.code, "FILE_ERROR")

    def test_path_escaping_the_root_is_refused(self) -> None:
        with self.assertRaises(SandboxValidationError) as cm:
            self.sandbox.read_file("/../../etc/passwd")
        self.assertEqual(cm.exception.field, "path")

    def test_mounted_file_is_read_only(self) -> None:
        self.assertEqual(self.sandbox.read_file("/etc/app.conf"), b"answer=42\n")
        with self.assertRaises(SandboxFileError) as cm:
            self.sandbox.write_file("/etc/app.conf", b"answer=0\n")
        self.assertEqual(cm.exception.code, "FILE_READ_ONLY")
        r = self.sandbox.exec(["sh", "-c", "echo x > /etc/app.conf"]).result()
        self.assertNotEqual(r.returncode, 0)
        self.assertEqual(self.sandbox.read_file("/etc/app.conf"), b"answer=42\n")


class Logs(DaemonTestCase):
    def test_logs_of_an_ended_sandbox(self) -> None:
        sb = self.run_sandbox("sh", "-c", "echo one; echo two >&2; echo three; printf partial")
        sb.wait_until_complete(timeout=BOUND)
        lines = list(sb.stream_logs())
        self.assertEqual(sorted(lines), sorted(["one\n", "two\n", "three\n", "partial"]))
        self.assertEqual([ln for ln in lines if ln != "two\n"], ["one\n", "three\n", "partial"])
        self.assertEqual(list(sb.stream_logs(tail_lines=1)), ["partial"])
        stamped = list(sb.stream_logs(timestamps=True))
        self.assertEqual(len(stamped), 4)
        for line in stamped:
            self.assertRegex(line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z (one|two|three|partial)")
        entries = list(sb.stream_logs().entries())
        self.assertEqual({e["stream"] for e in entries}, {"stdout", "stderr"})

    def test_follow(self) -> None:
        # The main process prints, then waits for a file the test writes (through the files API: an exec
        # that ends its sandbox races the sandbox's end).
        sb = self.run_sandbox(
            "sh", "-c", "echo start; while [ ! -e /tmp/go ]; do sleep 0.01; done; echo \"got $(cat /tmp/go)\""
        )
        logs = iter(sb.stream_logs(follow=True))
        self.assertEqual(next(logs), "start\n")
        sb.write_file("/tmp/go", b"hi")
        self.assertEqual(next(logs), "got hi\n")
        self.assertEqual(list(logs), [])  # the stream ends with the sandbox
        self.assertEqual(sb.status, SandboxStatus.COMPLETED)

    def test_no_logs_when_idle(self) -> None:
        sb = self.run_sandbox()
        self.assertEqual(list(sb.stream_logs()), [])


class Options(DaemonTestCase):
    def test_env_volumes_annotations_resources(self) -> None:
        sb = self.run_sandbox(
            environment_variables={"APP_MODE": "test"},
            volumes=[("scratch", "/scratch", "16Mi"), {"name": "more", "mount_path": "/more", "size": "8Mi"}],
            annotations={"owner": "tests"},
            resources={"cpu": "500m", "memory": "512Mi"},
        )
        r = sb.exec(["sh", "-c", "echo $APP_MODE; df -k /scratch /more | tail -n 2 | awk '{print $2}'"]).result()
        self.assertEqual(r.stdout, "test\n16384\n8192\n")
        info = sb.info
        self.assertEqual(info["annotations"], {"owner": "tests"})
        self.assertEqual(info["limits"]["memory_bytes"], 512 << 20)
        self.assertEqual(info["limits"]["cpu_millis"], 500)
        self.assertEqual([v["name"] for v in info["volumes"]], ["scratch", "more"])

    def test_requests_and_limits(self) -> None:
        sb = self.run_sandbox(
            resources={"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"cpu": 1, "memory": "1Gi"}}
        )
        info = sb.wait(timeout=BOUND).info
        self.assertEqual(info["limits"]["cpu_millis"], 1000)
        self.assertEqual(info["limits"]["memory_bytes"], 1 << 30)
        self.assertEqual(info["requests"]["cpu_millis"], 250)
        self.assertEqual(info["requests"]["memory_bytes"], 128 << 20)

    def test_bad_resources_name_the_field(self) -> None:
        for resources, field in [
            ({"memory": "12Qi"}, "resources.memory"),
            ({"cpu": "lots"}, "resources.cpu"),
            ({"limits": {"memory": "-1"}}, "resources.limits.memory"),
        ]:
            sb = Sandbox.run(resources=resources, tags=[RUN_TAG])
            with self.assertRaises(SandboxValidationError) as cm:
                sb.wait(timeout=BOUND)
            self.assertEqual(cm.exception.field, field, str(cm.exception))
            self.assertEqual(sb.status, SandboxStatus.FAILED)
            self.assertIsNone(sb.sandbox_id)
            self.assertRegex(repr(sb), r"status='FAILED_TO_START: INVALID_ARGUMENT'")
            # Every later operation raises the same error; leaving `with` does not.
            with self.assertRaises(SandboxValidationError):
                sb.exec(["true"])
            sb.__exit__(None, None, None)

    def test_defaults_and_overrides(self) -> None:
        tag = self.tag()
        d = SandboxDefaults(
            tags=(RUN_TAG, tag),
            environment_variables={"A": "1", "B": "2"},
            annotations={"x": "1"},
            mounted_files=({"mount_path": "/opt/one.txt", "file_content": b"1"},),
        )
        d2 = d.with_overrides(max_lifetime_seconds=600)
        self.assertEqual((d.max_lifetime_seconds, d2.max_lifetime_seconds), (None, 600))
        sb = self.run_sandbox(
            defaults=d2,
            environment_variables={"B": "two"},
            annotations={"y": "2"},
            mounted_files=[{"mount_path": "/opt/two.txt", "file_content": b"2"}],
        )
        r = sb.exec(["sh", "-c", "echo $A$B; cat /opt/one.txt /opt/two.txt"]).result()
        self.assertEqual(r.stdout, "1two\n12")
        self.assertEqual(sb.info["annotations"], {"x": "1", "y": "2"})
        self.assertEqual(sb.info["max_lifetime_seconds"], 600)
        # The process-wide defaults apply when none are given.
        with mock.patch("sandboxd.options.DEFAULT_SANDBOX_DEFAULTS", d):
            sb2 = Sandbox.run("sh", "-c", "echo $A")
            self.addCleanup(sb2.delete, missing_ok=True)
        sb2.wait_until_complete(timeout=BOUND)
        self.assertEqual(list(sb2.stream_logs()), ["1\n"])
        self.assertIn(tag, sb2.tags)

    def test_network_is_sent_to_the_daemon(self) -> None:
        sb = Sandbox.run(network=NetworkOptions(deny_egress=True), tags=[RUN_TAG, self.tag()])
        self.addCleanup(sb.delete, missing_ok=True)
        sb.wait(timeout=BOUND)
        self.assertEqual(sb.status, SandboxStatus.RUNNING)
        self.assertEqual(sb.network["policy"]["deny_egress"], True)

    def test_unknown_image(self) -> None:
        sb = Sandbox.run(container_image="no-such-image-anywhere:1", tags=[RUN_TAG])
        with self.assertRaises(sandboxd.SandboxImageNotFoundError):
            sb.wait(timeout=BOUND)


class Network(DaemonTestCase):
    """Published ports, network info and the daemon's refusals of bad network options."""

    def test_published_port_is_reachable_from_the_host(self) -> None:
        # The suite's image is python:3.11 (Debian, no nc): its own HTTP server serves a mounted file.
        # `-u`: the "Serving HTTP" line, printed once the server listens, reaches the logs at once.
        sb = self.run_sandbox(
            "python3", "-u", "-m", "http.server", "8000", "--bind", "0.0.0.0", "--directory", "/srv",
            mounted_files=[{"mount_path": "/srv/hello.txt", "file_content": b"hi\n"}],
            services=[Service(port=8000)],
        )
        sb.wait(timeout=BOUND)
        ports = sb.exposed_ports
        self.assertEqual(len(ports), 1, ports)
        p = ports[0]
        self.assertEqual((p["port"], p["protocol"], p["host_ip"]), (8000, "tcp", "127.0.0.1"))
        self.assertIsInstance(p["host_port"], int)
        self.assertGreater(p["host_port"], 0)  # none asked for: one the kernel picked
        url = sb.url_for(8000)
        self.assertEqual(url, f"http://127.0.0.1:{p['host_port']}")
        self.assertEqual(sb.url_for(8000, scheme="ws"), f"ws://127.0.0.1:{p['host_port']}")
        with self.assertRaises(ValueError) as cm:
            sb.url_for(9000)
        self.assertIn("9000", str(cm.exception))
        # Wait for the server to listen (its own announcement), then read through the published port.
        with sb.stream_logs(follow=True) as logs:
            seen = []
            for line in logs:
                seen.append(line)
                if "Serving HTTP" in line:
                    break
            else:
                self.fail(f"the server ended without listening: {seen}")
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with no_proxy.open(url + "/hello.txt", timeout=BOUND) as resp:
            self.assertEqual(resp.status, 200)
            self.assertEqual(resp.read(), b"hi\n")
        # A plain socket as well: the port is the host's, on 127.0.0.1.
        with socket.create_connection(("127.0.0.1", p["host_port"]), timeout=BOUND) as c:
            c.sendall(b"GET /hello.txt HTTP/1.0\r\n\r\n")
            answer = b""
            while True:
                b = c.recv(4096)
                if not b:
                    break
                answer += b
        self.assertTrue(answer.startswith(b"HTTP/1.0 200"), answer[:100])
        self.assertTrue(answer.endswith(b"\r\n\r\nhi\n"), answer[-100:])

    def test_session_peers_reach_each_other(self) -> None:
        # Both opted in, in one session: b reaches a's server on a's address. A sandbox outside the
        # session (opted in to its own) does not.
        tag = self.tag()
        server = (
            "import http.server, socketserver, sys\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_GET(self):\n"
            "        self.send_response(200); self.end_headers(); self.wfile.write(b'peer')\n"
            "s = socketserver.TCPServer(('0.0.0.0', 8000), H)\n"
            "print('listening', flush=True)\n"
            "s.serve_forever()\n"
        )
        fetch = (
            "import sys, urllib.request\n"
            "try:\n"
            "    print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())\n"
            "except OSError as e:\n"
            "    print('blocked', e); sys.exit(7)\n"
        )
        peers = SandboxDefaults(tags=(RUN_TAG, tag), network=NetworkOptions(session_peers=True))
        with Session(peers) as session, Session(peers) as other:
            a = session.sandbox()
            a.write_file("/srv/server.py", server.encode())
            p = a.exec(["python3", "/srv/server.py"])
            self.assertEqual(p.stdout.readline(timeout=BOUND), "listening\n")
            url = f"http://{a.network['address']}:8000/"
            r = session.sandbox().exec(["python3", "-c", fetch, url]).result()
            self.assertEqual((r.returncode, r.stdout), (0, "peer\n"), r.stderr)
            r = other.sandbox().exec(["python3", "-c", fetch, url]).result()
            self.assertEqual(r.returncode, 7, r.stdout)

    def test_session_peers_outside_a_session_is_refused(self) -> None:
        sb = self.run_sandbox(network=NetworkOptions(session_peers=True))
        with self.assertRaises(sandboxd.SandboxValidationError) as cm:
            sb.wait(timeout=BOUND)
        self.assertEqual(cm.exception.field, "network.session_peers")

    def test_network_info(self) -> None:
        sb = self.run_sandbox(
            network=NetworkOptions(egress=[EgressRule(cidr="198.18.1.0/24", ports=(443,), protocol="tcp")]),
            services=[{"port": 9000, "protocol": "udp"}],
        )
        sb.wait(timeout=BOUND)
        net = sb.network
        self.assertIsNotNone(net)
        self.assertEqual(net["mode"], "bridge")
        address = ipaddress.IPv4Address(net["address"])
        gateway = ipaddress.IPv4Address(net["gateway"])
        self.assertNotEqual(address, gateway)
        self.assertEqual(net["interface"], "eth0")
        self.assertEqual(
            net["policy"]["egress"], [{"cidr": "198.18.1.0/24", "ports": [443], "protocol": "tcp"}]
        )
        self.assertEqual(sb.info["network"], net)
        # The sandbox has that address: it is the source of its route to the gateway (a UDP "connect"
        # sends nothing).
        r = sb.exec(
            [
                "python3", "-c",
                "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                "s.connect((sys.argv[1], 9)); print(s.getsockname()[0])",
                str(gateway),
            ]
        ).result()
        self.assertEqual((r.returncode, r.stdout), (0, f"{address}\n"), r.stderr)
        # A UDP service is published, but has no http URL.
        self.assertEqual([(p["port"], p["protocol"]) for p in sb.exposed_ports], [(9000, "udp")])
        with self.assertRaises(ValueError) as cm:
            sb.url_for(9000)
        self.assertIn("9000", str(cm.exception))

    def test_invalid_options_name_the_field(self) -> None:
        for kw, field in [
            ({"network": NetworkOptions(egress=[EgressRule(cidr="10.0.0.0/33")])}, "network.egress[0].cidr"),
            (
                {
                    "network": NetworkOptions(
                        egress=[EgressRule(cidr="10.0.0.0/8"), EgressRule(cidr="192.0.2.1", protocol="icmp")]
                    )
                },
                "network.egress[1].protocol",
            ),
            (
                {"network": NetworkOptions(egress=[EgressRule(dns_name="not a host name")])},
                "network.egress[0].dns_name",
            ),
            ({"services": [Service(port=8000, protocol="sctp")]}, "services[0].protocol"),
            ({"services": [8000, Service(port=70000)]}, "services[1].port"),
        ]:
            with self.subTest(field=field):
                sb = Sandbox.run(tags=[RUN_TAG], **kw)
                with self.assertRaises(SandboxValidationError) as cm:
                    sb.wait(timeout=BOUND)
                self.assertEqual(cm.exception.code, "INVALID_ARGUMENT", str(cm.exception))
                self.assertEqual(cm.exception.field, field, str(cm.exception))
                self.assertIsNone(sb.sandbox_id)
                self.assertEqual(sb.exposed_ports, [])
                self.assertIsNone(sb.network)

    def test_taken_host_port(self) -> None:
        taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        host_port = taken.getsockname()[1]
        tag = self.tag()
        sb = Sandbox.run(tags=[RUN_TAG, tag], services=[Service(port=8000, host_port=host_port)])
        self.addCleanup(sb.delete, missing_ok=True)
        with self.assertRaises(SandboxPortInUseError) as cm:
            sb.wait(timeout=BOUND)
        e = cm.exception
        self.assertEqual(e.code, "PORT_IN_USE")
        self.assertEqual(e.field, "services[0].host_port")
        self.assertEqual((e.host_ip, e.host_port), ("127.0.0.1", host_port))
        self.assertIn(str(host_port), str(e))
        with self.assertRaises(SandboxPortInUseError):
            sb.url_for(8000)  # the creation error, as every operation raises it
        self.assertIsNone(sb.sandbox_id)
        self.assertEqual(Sandbox.list(tags=[tag]).result(), [])  # nothing of it is left behind


class Sessions(DaemonTestCase):
    def test_start_on_first_use_and_close_stops_all(self) -> None:
        tag = self.tag()
        with Session(SandboxDefaults(tags=(RUN_TAG, tag))) as session:
            a, b, c = session.sandbox(), session.sandbox(), session.sandbox()
            for sb in (a, b, c):
                self.assertIsNone(sb.status)
                self.assertIsNone(sb.sandbox_id)
            self.assertEqual(Sandbox.list(tags=[tag]).result(), [])
            self.assertEqual(a.exec(["echo", "a"]).result().stdout, "a\n")  # starts a
            b.write_file("/x", b"b")  # starts b
            self.assertEqual(b.read_file("/x"), b"b")
            self.assertIsNone(c.sandbox_id)  # c never used
            listed = [s.sandbox_id for s in session.list()]
            self.assertEqual(sorted(listed), sorted([a.sandbox_id, b.sandbox_id]))
            self.assertEqual(sorted(s.sandbox_id for s in Sandbox.list(tags=[tag])), sorted(listed))
            adopted = Sandbox.run(tags=[RUN_TAG, tag])
            adopted.wait(timeout=BOUND)
            session.from_id(adopted.sandbox_id).result()
        # Closing stopped and deleted every sandbox the session started or adopted.
        self.assertEqual(Sandbox.list(tags=[tag]).result(), [])
        for sid in (a.sandbox_id, b.sandbox_id, adopted.sandbox_id):
            with self.assertRaises(SandboxNotFoundError):
                Sandbox.from_id(sid)
        with self.assertRaises(SandboxError):
            session.sandbox()

    def test_session_sandbox_overrides_and_wait(self) -> None:
        tag = self.tag()
        session = Session(SandboxDefaults(tags=(RUN_TAG, tag)))
        try:
            sb = session.sandbox("sh", "-c", "echo from-main", container_image="python:3.11")
            sb.wait_until_complete(timeout=BOUND)
            self.assertEqual(sb.returncode, 0)
            self.assertEqual(list(sb.stream_logs()), ["from-main\n"])
        finally:
            session.close()
        self.assertEqual(Sandbox.list(tags=[tag]).result(), [])


class Errors(DaemonTestCase):
    def test_no_daemon(self) -> None:
        with mock.patch.dict(os.environ, {sandboxd.SOCKET_ENV: "/nonexistent/sandboxd.sock"}):
            with self.assertRaises(SandboxConnectionError) as cm:
                Sandbox.from_id("x")
        self.assertIn("/nonexistent/sandboxd.sock", str(cm.exception))
        self.assertEqual(cm.exception.code, "CONNECTION_ERROR")

    def test_error_attributes(self) -> None:
        try:
            Sandbox.from_id("nope-nope")
        except SandboxError as e:
            self.assertEqual(e.code, "SANDBOX_NOT_FOUND")
            self.assertTrue(e.message)
            self.assertIsInstance(e.details, dict)
            self.assertTrue(re.match(r"^SANDBOX_NOT_FOUND: ", str(e)))
        else:
            self.fail("no error")
