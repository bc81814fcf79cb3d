"""Options of a sandbox: :class:`SandboxDefaults`, resources, network, services, mounted files, volumes.

The module attribute :data:`DEFAULT_SANDBOX_DEFAULTS` holds the defaults that ``Sandbox.run()`` and
``Session()`` use when they are given none. It is read at each call, so a program (or a test) may
replace it, e.g. with ``unittest.mock.patch("sandboxd.options.DEFAULT_SANDBOX_DEFAULTS", ...)``, to give
every sandbox it creates the same mounted files, tags or image.
"""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = [
    "DEFAULT_CONTAINER_IMAGE",
    "DEFAULT_SANDBOX_DEFAULTS",
    "SandboxDefaults",
    "ResourceOptions",
    "NetworkOptions",
    "EgressRule",
    "Service",
    "MountedFile",
    "Volume",
]

#: The image of a sandbox when none is given (``docker.io/library/python:3.11``).
DEFAULT_CONTAINER_IMAGE = "python:3.11"


@dataclass(frozen=True)
class EgressRule:
    """One allowed outbound destination of an egress allow-list (:attr:`NetworkOptions.egress`).

    Attributes:
        cidr: an IPv4 network (``"10.0.0.0/8"``) or address (``"192.0.2.7"``, a /32). Host bits must be
            clear (``"10.0.0.1/8"`` is refused); a bad one is refused with
            :class:`~sandboxd.SandboxValidationError`, ``field == "network.egress[i].cidr"``.
        dns_name: a DNS name (``"pypi.org"``) or ``"*.example.org"`` (any name below it). The sandbox then
            resolves through the daemon's forwarder, which answers only the listed names and opens the
            addresses it answers with (for their TTL, at least 30 s) on the rule's ports. A bad name is
            refused with ``field == "network.egress[i].dns_name"``. A rule has exactly one of ``cidr`` and
            ``dns_name``.
        ports: destination ports (1-65535, at most 64); empty means every port.
        protocol: ``"tcp"`` or ``"udp"``; ``None`` means both.
    """

    cidr: Optional[str] = None
    dns_name: Optional[str] = None
    ports: Tuple[int, ...] = ()
    protocol: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """The wire form."""
        d: Dict[str, Any] = {}
        if self.cidr is not None:
            d["cidr"] = self.cidr
        if self.dns_name is not None:
            d["dns_name"] = self.dns_name
        if self.ports:
            d["ports"] = [int(p) for p in self.ports]
        if self.protocol is not None:
            d["protocol"] = self.protocol
        return d


@dataclass(frozen=True)
class NetworkOptions:
    """Network policy of a sandbox, enforced by the daemon (sent as ``network``).

    Without it a sandbox may connect anywhere and nothing may connect to it except through its published
    ports (``services``).

    Attributes:
        deny_egress: nothing leaves the sandbox (loopback and answers to its published ports only).
        deny_ingress: new connections into the sandbox's address are refused, except through its
            published ports (default ``True``); ``False`` lets the host and other sandboxes connect.
        egress: when not empty, an **allow-list**: only these destinations
            (:class:`EgressRule`, by ``cidr``, optionally limited to ``ports`` and a ``protocol``,
            ``"tcp"`` or ``"udp"``) are reachable, everything else is dropped. Contradicts
            ``deny_egress=True``. Bad rules are refused with :class:`~sandboxd.SandboxValidationError`
            naming the field (``network.egress[0].cidr``, ``network.egress[1].protocol``,
            ``network.egress[2].dns_name``).
        session_peers: the opt-in to sandbox-to-sandbox traffic. Sandboxes of one :class:`~sandboxd.Session`
            that all set it may connect to each other's addresses (:attr:`Sandbox.network
            <sandboxd.Sandbox.network>` ``["address"]``), both ways, on every port, whatever their other
            settings; every other pair of sandboxes stays unable to reach each other. Outside a session it
            is refused (:class:`~sandboxd.SandboxValidationError`, ``field == "network.session_peers"``).

    ::

        NetworkOptions(egress=(EgressRule(cidr="198.18.1.0/24", ports=(80, 443), protocol="tcp"),))
    """

    deny_egress: bool = False
    deny_ingress: bool = True
    egress: Tuple[EgressRule, ...] = ()
    session_peers: bool = False

    def to_dict(self) -> Dict[str, Any]:
        """The wire form."""
        d: Dict[str, Any] = {
            "deny_egress": self.deny_egress,
            "deny_ingress": self.deny_ingress,
            "egress": [r.to_dict() if isinstance(r, EgressRule) else dict(r) for r in self.egress],
        }
        if self.session_peers:
            d["session_peers"] = True
        return d


@dataclass(frozen=True)
class Service:
    """A port of the sandbox published on the host (``Sandbox.run(..., services=[Service(port=8000)])``).

    Where services are taken, a dict with these keys or a bare ``int`` port (``services=[8000]``) does as
    well. Once the sandbox runs, :attr:`Sandbox.exposed_ports <sandboxd.Sandbox.exposed_ports>` lists where
    each is published and :meth:`Sandbox.url_for <sandboxd.Sandbox.url_for>` answers its URL.

    Attributes:
        port: the port inside the sandbox (1-65535) that a process listens on.
        protocol: ``"tcp"`` (default) or ``"udp"``; anything else is refused
            (:class:`~sandboxd.SandboxValidationError`, ``field == "services[i].protocol"``).
        host_port: the host port; ``None`` (or 0): one the kernel picks. A taken one is refused with
            :class:`~sandboxd.SandboxPortInUseError`.
        host_ip: the host address to publish on; ``None``: the daemon's ``publish_host_ip``
            (``127.0.0.1`` unless configured otherwise); ``"0.0.0.0"``: every address of the host, so
            that other machines can connect.
    """

    port: int
    protocol: str = "tcp"
    host_port: Optional[int] = None
    host_ip: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """The wire form (``None`` fields omitted)."""
        d: Dict[str, Any] = {"port": _port(self.port, "port")}
        if self.protocol is not None:
            d["protocol"] = str(self.protocol)
        if self.host_port is not None:
            d["host_port"] = _port(self.host_port, "host_port")
        if self.host_ip is not None:
            d["host_ip"] = str(self.host_ip)
        return d


def _port(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"a service's {name} is an int, not {type(v).__name__}")
    return int(v)


@dataclass(frozen=True)
class ResourceOptions:
    """Resources with requests and limits apart: ``ResourceOptions(requests={"cpu": "500m"},
    limits={"cpu": "2", "memory": "2Gi"})``. A flat dict ``{"cpu": "500m", "memory": "512Mi"}`` means
    requests == limits."""

    requests: Optional[Mapping[str, Any]] = None
    limits: Optional[Mapping[str, Any]] = None

    def to_dict(self) -> Dict[str, Any]:
        """The wire form."""
        d: Dict[str, Any] = {}
        if self.requests is not None:
            d["requests"] = _quantities(self.requests)
        if self.limits is not None:
            d["limits"] = _quantities(self.limits)
        return d


@dataclass(frozen=True)
class MountedFile:
    """A file placed read-only in the sandbox at creation."""

    mount_path: str
    file_content: bytes
    mode: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        """The wire form (content base64-encoded)."""
        content = self.file_content
        if isinstance(content, str):
            content = content.encode("utf-8")
        d: Dict[str, Any] = {
            "mount_path": self.mount_path,
            "file_content": base64.b64encode(bytes(content)).decode("ascii"),
        }
        if self.mode is not None:
            d["mode"] = int(self.mode)
        return d


@dataclass(frozen=True)
class Volume:
    """A size-limited scratch volume (tmpfs), writable, gone with the sandbox."""

    name: str
    mount_path: str
    size: str

    def to_dict(self) -> Dict[str, Any]:
        """The wire form."""
        return {"name": self.name, "mount_path": self.mount_path, "size": str(self.size)}


ResourcesArg = Union[None, Mapping[str, Any], ResourceOptions]
MountedFileArg = Union[Mapping[str, Any], MountedFile]
VolumeArg = Union[Mapping[str, Any], Sequence[Any], Volume]
ServiceArg = Union[Service, Mapping[str, Any], int]


def _service_list(services: Union[None, ServiceArg, Iterable[ServiceArg]]) -> List[ServiceArg]:
    """``services`` as a list: one service (a :class:`Service`, a dict, an ``int``) or an iterable."""
    if services is None:
        return []
    if isinstance(services, (Service, Mapping, int)) and not isinstance(services, bool):
        return [services]
    if isinstance(services, (str, bytes)):
        raise TypeError("services is a list of Service, dicts or int ports, not a string")
    return list(services)


@dataclass(frozen=True)
class SandboxDefaults:
    """Immutable defaults for creating sandboxes (used by ``Session`` and ``Sandbox.run(defaults=...)``).

    Attributes:
        container_image: image reference; a name without a registry means Docker Hub.
        command: the main process (``None``: the sandbox idles until stopped).
        args: its arguments.
        max_lifetime_seconds: the daemon stops the sandbox (TERMINATED) this long after creation.
        tags: tags for ``Sandbox.list(tags=...)``; merged with the tags given to ``run``.
        resources: ``{"cpu": "500m", "memory": "512Mi", "pids": 64}`` (requests == limits), or
            ``{"requests": {...}, "limits": {...}}`` / :class:`ResourceOptions`.
        network: :class:`NetworkOptions` (egress policy, ingress).
        services: ports to publish on the host: :class:`Service`, dicts with its fields, or bare ``int``
            ports; the services given to ``run`` are added.
        environment_variables: environment of the main process and of every exec; merged with the
            variables given to ``run`` (those win).
        mounted_files: ``[{"mount_path": "/etc/app.conf", "file_content": b"..."}]``, read-only; the
            files given to ``run`` are added.
        volumes: ``[("scratch", "/scratch", "64Mi")]`` or dicts with ``name``, ``mount_path``, ``size``.
        annotations: free-form metadata; merged with the annotations given to ``run`` (those win).
    """

    container_image: str = DEFAULT_CONTAINER_IMAGE
    command: Optional[str] = None
    args: Tuple[str, ...] = ()
    max_lifetime_seconds: Optional[float] = None
    tags: Tuple[str, ...] = ()
    resources: ResourcesArg = None
    network: Optional[NetworkOptions] = None
    services: Tuple[ServiceArg, ...] = ()
    environment_variables: Mapping[str, str] = field(default_factory=dict)
    mounted_files: Tuple[MountedFileArg, ...] = ()
    volumes: Tuple[VolumeArg, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Keep the dataclass immutable in practice: sequences become tuples, mappings are copied.
        object.__setattr__(self, "args", tuple(self.args))
        object.__setattr__(self, "tags", tuple(self.tags))
        object.__setattr__(self, "mounted_files", tuple(self.mounted_files))
        object.__setattr__(self, "volumes", tuple(self.volumes))
        object.__setattr__(self, "services", tuple(_service_list(self.services)))
        object.__setattr__(self, "environment_variables", dict(self.environment_variables))
        object.__setattr__(self, "annotations", dict(self.annotations))

    def with_overrides(self, **overrides: Any) -> "SandboxDefaults":
        """A copy with the given fields replaced."""
        kw = dict(overrides)
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"SandboxDefaults has no field(s) {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **kw)

    def merge_tags(self, tags: Optional[Iterable[str]]) -> Tuple[str, ...]:
        """These tags followed by ``tags`` (duplicates dropped, order kept)."""
        out: List[str] = []
        for t in list(self.tags) + list(tags or ()):
            if t not in out:
                out.append(t)
        return tuple(out)

    def merge_environment_variables(self, env: Optional[Mapping[str, str]]) -> Dict[str, str]:
        """These variables updated with ``env``."""
        d = dict(self.environment_variables)
        d.update(env or {})
        return d

    def merge_annotations(self, annotations: Optional[Mapping[str, str]]) -> Dict[str, str]:
        """These annotations updated with ``annotations``."""
        d = dict(self.annotations)
        d.update(annotations or {})
        return d


#: Defaults used when ``Sandbox.run()`` or ``Session()`` gets none (read at each call; replaceable).
DEFAULT_SANDBOX_DEFAULTS = SandboxDefaults()


# -- wire forms ----------------------------------------------------------------------------------------


def _quantity(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    if isinstance(v, float):
        return repr(v) if v != int(v) else str(int(v))
    return v


def _quantities(m: Mapping[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in m.items():
        if k == "pids":
            out[k] = v
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = str(_quantity(v))
        else:
            out[k] = v
    return out


def resources_to_wire(resources: ResourcesArg) -> Dict[str, Any]:
    """``resources`` as the daemon takes it: ``{"cpu", "memory", "pids", "requests", "limits"}``.

    A flat ``{"cpu": ..., "memory": ...}`` is passed as the top-level values (request == limit);
    ``{"requests": ..., "limits": ...}`` and :class:`ResourceOptions` as requests and limits apart.
    Numbers are turned into strings (``0.5`` -> ``"0.5"``); ``pids`` stays a number. Unknown keys are
    passed on, for the daemon to refuse by name.
    """
    if resources is None:
        return {}
    if isinstance(resources, ResourceOptions):
        return resources.to_dict()
    if not isinstance(resources, Mapping):
        raise TypeError(f"resources must be a dict or ResourceOptions, not {type(resources).__name__}")
    out: Dict[str, Any] = {}
    for k, v in resources.items():
        if k in ("requests", "limits"):
            if v is not None:
                out[k] = _quantities(v)
        else:
            out.update(_quantities({k: v}))
    return out


def mounted_file_to_wire(f: MountedFileArg) -> Dict[str, Any]:
    """One mounted file as the daemon takes it."""
    if isinstance(f, MountedFile):
        return f.to_dict()
    if not isinstance(f, Mapping):
        raise TypeError("a mounted file is a dict {'mount_path': ..., 'file_content': bytes}")
    content = f.get("file_content", f.get("content", b""))
    return MountedFile(str(f["mount_path"]), content, f.get("mode")).to_dict()


def volume_to_wire(v: VolumeArg) -> Dict[str, Any]:
    """One volume as the daemon takes it: from a ``(name, mount_path, size)`` tuple or a dict."""
    if isinstance(v, Volume):
        return v.to_dict()
    if isinstance(v, Mapping):
        return Volume(str(v["name"]), str(v["mount_path"]), str(v["size"])).to_dict()
    parts = list(v)
    if len(parts) != 3:
        raise TypeError("a volume is (name, mount_path, size) or a dict with those keys")
    return Volume(str(parts[0]), str(parts[1]), str(parts[2])).to_dict()


def network_to_wire(network: Union[None, NetworkOptions, Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    """``network`` as the daemon takes it, or ``None``."""
    if network is None:
        return None
    if isinstance(network, NetworkOptions):
        return network.to_dict()
    return dict(network)


def service_to_wire(s: ServiceArg) -> Dict[str, Any]:
    """One service as the daemon takes it: from a :class:`Service`, a dict with its fields or an ``int``
    port."""
    if isinstance(s, Service):
        return s.to_dict()
    if isinstance(s, Mapping):
        names = {f.name for f in dataclasses.fields(Service)}
        unknown = set(s) - names
        if unknown:
            raise TypeError(
                f"a service has no field(s) {', '.join(sorted(map(str, unknown)))} "
                f"(it has {', '.join(sorted(names))})"
            )
        if "port" not in s:
            raise TypeError("a service dict needs a 'port'")
        kw = dict(s)
        if kw.get("protocol") is None:
            kw.pop("protocol", None)
        return Service(**kw).to_dict()
    if isinstance(s, int) and not isinstance(s, bool):
        return Service(port=s).to_dict()
    raise TypeError(f"a service is a Service, a dict or an int port, not {type(s).__name__}")


def services_to_wire(
    services: Union[None, ServiceArg, Iterable[ServiceArg]], defaults: Iterable[ServiceArg] = ()
) -> List[Dict[str, Any]]:
    """``services`` as the daemon takes them (a list of ``{"port", "protocol", "host_port", "host_ip"}``
    without the ``None`` fields), after the ``defaults``' services: ``services_to_wire([8000, {"port":
    53, "protocol": "udp"}])``."""
    return [service_to_wire(s) for s in (*_service_list(defaults), *_service_list(services))]
