"""PEP 517 build backend of the sandboxd client: setuptools' own, plus a standard-library wheel writer.

setuptools before 70.1 needs the separate ``wheel`` package for ``bdist_wheel``, and a fresh virtual
environment of Python 3.9-3.11 has setuptools but not ``wheel``. So that
``pip install --no-build-isolation ./proto/python`` works there, offline, this backend delegates to
``setuptools.build_meta`` whenever ``bdist_wheel`` is available and otherwise writes the (pure-Python)
wheel itself, with the metadata setuptools computes from ``pyproject.toml``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import zipfile
from typing import Any, Dict, List, Optional, Tuple

from setuptools import build_meta as _st
from setuptools.build_meta import (  # noqa: F401 - re-exported hooks
    build_sdist,
    get_requires_for_build_sdist,
    get_requires_for_build_wheel,
)

__all__ = [
    "build_sdist",
    "build_wheel",
    "get_requires_for_build_sdist",
    "get_requires_for_build_wheel",
    "prepare_metadata_for_build_wheel",
]

_TAG = "py3-none-any"


def _have_bdist_wheel() -> bool:
    try:
        import setuptools.command.bdist_wheel  # noqa: F401  (setuptools >= 70.1)

        return True
    except ImportError:
        pass
    try:
        import wheel.bdist_wheel  # noqa: F401

        return True
    except ImportError:
        return False


def _distribution() -> Any:
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    dist = Distribution()
    apply_configuration(dist, "pyproject.toml")
    return dist


def _dist_info(dist: Any) -> Tuple[str, Dict[str, bytes]]:
    name = dist.get_name().replace("-", "_")
    version = dist.get_version()
    meta = io.StringIO()
    dist.metadata.write_pkg_file(meta)
    top = sorted({p.split(".")[0] for p in dist.packages or []})
    files = {
        "METADATA": meta.getvalue().encode("utf-8"),
        "WHEEL": (
            "Wheel-Version: 1.0\nGenerator: sandboxd_build\nRoot-Is-Purelib: true\n" f"Tag: {_TAG}\n"
        ).encode("ascii"),
        "top_level.txt": ("".join(t + "\n" for t in top)).encode("ascii"),
    }
    return f"{name}-{version}.dist-info", files


def prepare_metadata_for_build_wheel(
    metadata_directory: str, config_settings: Optional[Dict[str, Any]] = None
) -> str:
    if _have_bdist_wheel():
        return _st.prepare_metadata_for_build_wheel(metadata_directory, config_settings)
    info_dir, files = _dist_info(_distribution())
    path = os.path.join(metadata_directory, info_dir)
    os.makedirs(path, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    return info_dir


def _package_files(dist: Any) -> List[str]:
    out: List[str] = []
    for pkg in dist.packages or []:
        d = pkg.replace(".", "/")
        for name in sorted(os.listdir(d)):
            p = os.path.join(d, name)
            if os.path.isfile(p) and (name.endswith(".py") or name == "py.typed"):
                out.append(p)
    return out


def _record_line(arcname: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")
    return f"{arcname},sha256={digest},{len(data)}\n"


def build_wheel(
    wheel_directory: str,
    config_settings: Optional[Dict[str, Any]] = None,
    metadata_directory: Optional[str] = None,
) -> str:
    if _have_bdist_wheel():
        return _st.build_wheel(wheel_directory, config_settings, metadata_directory)
    dist = _distribution()
    info_dir, files = _dist_info(dist)
    name = info_dir[: -len(".dist-info")]
    wheel_name = f"{name}-{_TAG}.whl"
    record = ""
    os.makedirs(wheel_directory, exist_ok=True)
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel_name), "w", zipfile.ZIP_DEFLATED) as z:
        for path in _package_files(dist):
            with open(path, "rb") as f:
                data = f.read()
            arc = path.replace(os.sep, "/")
            z.writestr(arc, data)
            record += _record_line(arc, data)
        for fname, data in files.items():
            arc = f"{info_dir}/{fname}"
            z.writestr(arc, data)
            record += _record_line(arc, data)
        record += f"{info_dir}/RECORD,,\n"
        z.writestr(f"{info_dir}/RECORD", record)
    return wheel_name
