"""Options of a sandbox: :class:`SandboxDefaults`, resources, network, mounted files, volumes.

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
    "MountedFile",
    "Volume",
]

#: The image of a sandbox when none is given (``docker.io/library/python:3.11``).
DEFAULT_CONTAINER_IMAGE = "python:3.11"


@dataclass(frozen=True)
class EgressRule:
    """One allowed outbound destination: a CIDR or a DNS name, optionally limited to ports.

    (Network policy is enforced by the daemon from the networking release on; until then a daemon that
    does not know ``network`` refuses it with ``SandboxValidationError``.)
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
    """Network policy of a sandbox: deny all egress or allow some, deny ingress."""

    deny_egress: bool = False
    deny_ingress: bool = True
    egress: Tuple[EgressRule, ...] = ()

    def to_dict(self) -> Dict[str, Any]:
        """The wire form."""
        return {
            "deny_egress": self.deny_egress,
            "deny_ingress": self.deny_ingress,
            "egress": [r.to_dict() if isinstance(r, EgressRule) else dict(r) for r in self.egress],
        }


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
        network: :class:`NetworkOptions`.
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
