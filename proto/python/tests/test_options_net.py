"""Networking options without a daemon: Service and its wire form, defaults merging, the request a sandbox
sends, the info-derived properties (exposed_ports, network, url_for) and the error mapping.

These tests talk to a fake transport, never to a socket, so they also run with no daemon::

    PYTHONPATH=proto/python python3 -m unittest -v tests.test_options_net     # from proto/python: -t .
"""

from __future__ import annotations

import copy
import json
import unittest
from typing import Any, Dict, List, Optional, Tuple
from unittest import mock

import sandboxd
from sandboxd import (
    EgressRule,
    NetworkOptions,
    Sandbox,
    SandboxDefaults,
    SandboxError,
    SandboxFailedError,
    SandboxPortInUseError,
    SandboxValidationError,
    Service,
    Session,
)
from sandboxd._transport import error_from_response
from sandboxd.exceptions import CODE_TO_EXCEPTION, error_from_api
from sandboxd.options import service_to_wire, services_to_wire

INFO: Dict[str, Any] = {
    "id": "0123456789abcdef",
    "name": "sb-01234567",
    "image": "docker.io/library/python:3.11",
    "status": "RUNNING",
    "tags": [],
    "network": {
        "mode": "bridge",
        "address": "10.88.0.5",
        "gateway": "10.88.0.1",
        "interface": "eth0",
        "dns": ["198.18.0.2"],
        "policy": {"deny_egress": False, "deny_ingress": True},
    },
    "exposed_ports": [
        {"port": 8000, "protocol": "tcp", "host_ip": "127.0.0.1", "host_port": 18080},
        {"port": 53, "protocol": "udp", "host_ip": "127.0.0.1", "host_port": 18053},
    ],
}


class FakeTransport:
    """Answers the calls a sandbox makes with canned info (or an error) and records them."""

    def __init__(self, info: Optional[Dict[str, Any]] = None, error: Optional[SandboxError] = None) -> None:
        self.info = copy.deepcopy(INFO if info is None else info)
        self.error = error
        self.calls: List[Tuple[str, str, Any]] = []

    def call(self, method: str, path: str, **kw: Any) -> Any:
        self.calls.append((method, path, copy.deepcopy(kw.get("json_body"))))
        if self.error is not None:
            raise self.error
        return copy.deepcopy(self.info)

    def created_with(self) -> Dict[str, Any]:
        posts = [body for m, p, body in self.calls if (m, p) == ("POST", "/v1/sandboxes")]
        assert len(posts) == 1, self.calls
        return posts[0]


def started(t: FakeTransport, **kw: Any) -> Sandbox:
    sb = Sandbox(_transport=t, **kw)  # type: ignore[arg-type]
    sb.start()
    return sb


class ServiceWireForm(unittest.TestCase):
    def test_service_to_dict_omits_nones(self) -> None:
        self.assertEqual(Service(port=8000).to_dict(), {"port": 8000, "protocol": "tcp"})
        self.assertEqual(
            Service(port=53, protocol="udp", host_port=18053, host_ip="127.0.0.2").to_dict(),
            {"port": 53, "protocol": "udp", "host_port": 18053, "host_ip": "127.0.0.2"},
        )
        self.assertEqual(Service(8000, host_port=0).to_dict(), {"port": 8000, "protocol": "tcp", "host_port": 0})

    def test_service_is_frozen_and_hashable(self) -> None:
        s = Service(port=8000)
        with self.assertRaises(Exception):
            s.port = 1  # type: ignore[misc]
        self.assertEqual(len({s, Service(port=8000)}), 1)

    def test_ports_are_ints(self) -> None:
        for bad in ("8000", 8000.0, True, None):
            with self.assertRaises(TypeError):
                Service(port=bad).to_dict()  # type: ignore[arg-type]
        with self.assertRaises(TypeError):
            Service(port=8000, host_port="80").to_dict()  # type: ignore[arg-type]

    def test_services_to_wire_takes_services_dicts_and_ints(self) -> None:
        self.assertEqual(services_to_wire(None), [])
        self.assertEqual(services_to_wire([]), [])
        self.assertEqual(
            services_to_wire([Service(port=8000), {"port": 53, "protocol": "udp"}, 9000]),
            [
                {"port": 8000, "protocol": "tcp"},
                {"port": 53, "protocol": "udp"},
                {"port": 9000, "protocol": "tcp"},
            ],
        )
        self.assertEqual(
            services_to_wire(({"port": 80, "host_port": 18080, "host_ip": "127.0.0.1", "protocol": None},)),
            [{"port": 80, "protocol": "tcp", "host_port": 18080, "host_ip": "127.0.0.1"}],
        )
        # One service alone is taken as a list of one.
        self.assertEqual(services_to_wire(8000), [{"port": 8000, "protocol": "tcp"}])
        self.assertEqual(services_to_wire(Service(port=1)), [{"port": 1, "protocol": "tcp"}])
        self.assertEqual(services_to_wire({"port": 2}), [{"port": 2, "protocol": "tcp"}])
        # Defaults come first.
        self.assertEqual(
            services_to_wire([2], defaults=(1,)),
            [{"port": 1, "protocol": "tcp"}, {"port": 2, "protocol": "tcp"}],
        )

    def test_bad_services_are_type_errors(self) -> None:
        with self.assertRaises(TypeError) as cm:
            service_to_wire({"port": 80, "hostport": 1})
        self.assertIn("hostport", str(cm.exception))
        with self.assertRaises(TypeError):
            service_to_wire({"protocol": "tcp"})
        with self.assertRaises(TypeError):
            service_to_wire("8000")  # type: ignore[arg-type]
        with self.assertRaises(TypeError):
            services_to_wire("8000")  # type: ignore[arg-type]
        with self.assertRaises(TypeError):
            service_to_wire(True)  # type: ignore[arg-type]

    def test_the_daemon_judges_values(self) -> None:
        # Protocols and port ranges are the daemon's to refuse (by field name), not the client's.
        self.assertEqual(
            Service(port=70000, protocol="sctp").to_dict(), {"port": 70000, "protocol": "sctp"}
        )

    def test_network_options_wire_form(self) -> None:
        n = NetworkOptions(
            egress=(
                EgressRule(cidr="198.18.1.0/24", ports=(80, 443), protocol="tcp"),
                EgressRule(cidr="192.0.2.7"),
            )
        )
        self.assertEqual(
            n.to_dict(),
            {
                "deny_egress": False,
                "deny_ingress": True,
                "egress": [
                    {"cidr": "198.18.1.0/24", "ports": [80, 443], "protocol": "tcp"},
                    {"cidr": "192.0.2.7"},
                ],
            },
        )
        self.assertEqual(
            NetworkOptions(deny_egress=True).to_dict(), {"deny_egress": True, "deny_ingress": True, "egress": []}
        )
        self.assertEqual(
            NetworkOptions(session_peers=True).to_dict(),
            {"deny_egress": False, "deny_ingress": True, "egress": [], "session_peers": True},
        )

    def test_exported(self) -> None:
        for name in ("Service", "SandboxPortInUseError", "NetworkOptions", "EgressRule"):
            self.assertIn(name, sandboxd.__all__)
            getattr(sandboxd, name)


class DefaultsMerge(unittest.TestCase):
    def test_defaults_keep_services_as_a_tuple(self) -> None:
        d = SandboxDefaults(services=[8000, {"port": 53, "protocol": "udp"}])  # type: ignore[arg-type]
        self.assertEqual(d.services, (8000, {"port": 53, "protocol": "udp"}))
        self.assertEqual(SandboxDefaults().services, ())
        one = SandboxDefaults(services=Service(port=1))  # type: ignore[arg-type]
        self.assertEqual(one.services, (Service(port=1),))
        self.assertEqual(d.with_overrides(services=(Service(port=9),)).services, (Service(port=9),))

    def test_run_services_are_added_to_the_defaults(self) -> None:
        t = FakeTransport()
        d = SandboxDefaults(services=(Service(port=8000),), network=NetworkOptions(deny_egress=True))
        started(t, defaults=d, services=[{"port": 9000, "host_port": 19000}])
        req = t.created_with()
        self.assertEqual(
            req["services"],
            [{"port": 8000, "protocol": "tcp"}, {"port": 9000, "protocol": "tcp", "host_port": 19000}],
        )
        self.assertEqual(req["network"], {"deny_egress": True, "deny_ingress": True, "egress": []})

    def test_no_services_sends_none(self) -> None:
        t = FakeTransport()
        started(t, defaults=SandboxDefaults())
        self.assertNotIn("services", t.created_with())
        self.assertNotIn("network", t.created_with())

    def test_process_wide_defaults_services(self) -> None:
        t = FakeTransport()
        with mock.patch("sandboxd.options.DEFAULT_SANDBOX_DEFAULTS", SandboxDefaults(services=(8080,))):
            started(t, services=[8000])
        self.assertEqual([s["port"] for s in t.created_with()["services"]], [8080, 8000])

    def test_session_sandbox_takes_services(self) -> None:
        t = FakeTransport()
        session = Session(SandboxDefaults(services=(Service(port=1),)))
        session._transport = t  # type: ignore[assignment]
        sb = session.sandbox(services=[Service(port=2, protocol="udp")])
        self.assertEqual(t.calls, [])  # unstarted until first use
        sb.start().result()
        self.assertEqual(
            t.created_with()["services"], [{"port": 1, "protocol": "tcp"}, {"port": 2, "protocol": "udp"}]
        )

    def test_run_passes_services(self) -> None:
        t = FakeTransport()
        with mock.patch("sandboxd.sandbox.shared_transport", return_value=t):
            Sandbox.run("sh", "-c", "true", services=[Service(port=8000)], defaults=SandboxDefaults()).wait()
        self.assertEqual(t.created_with()["services"], [{"port": 8000, "protocol": "tcp"}])
        self.assertEqual(t.created_with()["command"], ["sh", "-c", "true"])


class InfoProperties(unittest.TestCase):
    def test_exposed_ports_network_and_url_for(self) -> None:
        t = FakeTransport()
        sb = started(t, services=[8000])
        self.assertEqual(sb.exposed_ports, INFO["exposed_ports"])
        self.assertEqual(sb.network["mode"], "bridge")
        self.assertEqual(sb.network["address"], "10.88.0.5")
        self.assertEqual(sb.url_for(8000), "http://127.0.0.1:18080")
        self.assertEqual(sb.url_for(8000, scheme="ws"), "ws://127.0.0.1:18080")
        # Fetched fresh: the daemon's answer is read again.
        gets = sum(1 for m, _, _ in t.calls if m == "GET")
        sb.exposed_ports
        self.assertGreater(sum(1 for m, _, _ in t.calls if m == "GET"), gets)

    def test_url_for_a_port_published_on_every_address(self) -> None:
        info = copy.deepcopy(INFO)
        info["exposed_ports"][0]["host_ip"] = "0.0.0.0"
        sb = started(FakeTransport(info), services=[Service(port=8000, host_ip="0.0.0.0")])
        self.assertEqual(sb.url_for(8000), "http://127.0.0.1:18080")

    def test_url_for_an_unpublished_port(self) -> None:
        sb = started(FakeTransport(), services=[8000])
        with self.assertRaises(ValueError) as cm:
            sb.url_for(9999)
        self.assertIn("9999", str(cm.exception))
        with self.assertRaises(ValueError) as cm:
            sb.url_for(53)  # published, but over UDP
        self.assertIn("53", str(cm.exception))

    def test_without_network_info(self) -> None:
        info = {k: v for k, v in INFO.items() if k not in ("network", "exposed_ports")}
        sb = started(FakeTransport(info))
        self.assertEqual(sb.exposed_ports, [])
        self.assertIsNone(sb.network)
        with self.assertRaises(ValueError):
            sb.url_for(8000)

    def test_unstarted_and_failed_sandboxes(self) -> None:
        t = FakeTransport()
        sb = Sandbox(_transport=t)  # type: ignore[arg-type]
        self.assertEqual(sb.exposed_ports, [])
        self.assertIsNone(sb.network)
        self.assertEqual(t.calls, [])  # a property does not start the sandbox
        err = error_from_api("PORT_IN_USE", "taken", {"field": "services[0].host_port"})
        failed = started(FakeTransport(error=err), services=[Service(port=8000, host_port=1)])
        self.assertEqual(failed.exposed_ports, [])
        self.assertIsNone(failed.network)
        with self.assertRaises(SandboxPortInUseError):
            failed.url_for(8000)  # the creation error, as every operation raises it


class ErrorMapping(unittest.TestCase):
    def test_port_in_use(self) -> None:
        body = json.dumps(
            {
                "error": {
                    "code": "PORT_IN_USE",
                    "message": "127.0.0.1:18080/tcp is already in use on this host",
                    "details": {"field": "services[0].host_port", "host_ip": "127.0.0.1", "host_port": 18080},
                }
            }
        ).encode()
        e = error_from_response(409, body)
        self.assertIsInstance(e, SandboxPortInUseError)
        self.assertIsInstance(e, SandboxError)
        self.assertNotIsInstance(e, SandboxValidationError)
        self.assertEqual(
            (e.code, e.field, e.host_ip, e.host_port),
            ("PORT_IN_USE", "services[0].host_port", "127.0.0.1", 18080),
        )
        self.assertTrue(str(e).startswith("PORT_IN_USE: "))
        self.assertIsNone(SandboxPortInUseError("x").host_port)
        self.assertEqual(SandboxPortInUseError("x").code, "PORT_IN_USE")

    def test_network_error_is_a_failure_to_start(self) -> None:
        e = error_from_response(500, b'{"error": {"code": "NETWORK_ERROR", "message": "nft: boom"}}')
        self.assertIsInstance(e, SandboxFailedError)
        self.assertEqual(e.code, "NETWORK_ERROR")
        self.assertIs(CODE_TO_EXCEPTION["NETWORK_ERROR"], SandboxFailedError)

    def test_validation_field(self) -> None:
        e = error_from_api("INVALID_ARGUMENT", "bad", {"field": "network.egress[0].cidr"})
        self.assertIsInstance(e, SandboxValidationError)
        self.assertEqual(e.field, "network.egress[0].cidr")


if __name__ == "__main__":
    unittest.main()
