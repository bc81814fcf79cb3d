"""PEP 517 build backend of the sandboxd client: setuptools' own, plus a standard-library wheel writer.

``pip install --no-build-isolation`` builds with what the target environment has, and a fresh virtual
environment may lack what setuptools needs: Python 3.9-3.11 venvs have setuptools without the ``wheel``
package (which setuptools before 70.1 needs for ``bdist_wheel``), Python 3.9's bundled setuptools predates
``[project]`` support (61), and 3.12+ venvs have no setuptools at all. So that the client installs offline
everywhere, this backend hands the build to ``setuptools.build_meta`` when setuptools can do it, and
otherwise writes the (pure-Python, dependency-free) wheel itself from ``pyproject.toml``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import zipfile
from typing import Any, Dict, List, Optional, Tuple

__all__ = [
    "build_sdist",
    "build_wheel",
    "get_requires_for_build_sdist",
    "get_requires_for_build_wheel",
    "prepare_metadata_for_build_wheel",
]

_TAG = "py3-none-any"


def _setuptools_can_build() -> bool:
    """setuptools >= 61 (``[project]`` tables) with a ``bdist_wheel`` command."""
    try:
        import setuptools
    except ImportError:
        return False
    m = re.match(r"(\d+)", getattr(setuptools, "__version__", "0"))
    if not m or int(m.group(1)) < 61:
        return False
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


# -- hooks ---------------------------------------------------------------------------------------------


def get_requires_for_build_wheel(config_settings: Optional[Dict[str, Any]] = None) -> List[str]:
    if _setuptools_can_build():
        from setuptools import build_meta

        return build_meta.get_requires_for_build_wheel(config_settings)
    return []


def get_requires_for_build_sdist(config_settings: Optional[Dict[str, Any]] = None) -> List[str]:
    from setuptools import build_meta

    return build_meta.get_requires_for_build_sdist(config_settings)


def build_sdist(sdist_directory: str, config_settings: Optional[Dict[str, Any]] = None) -> str:
    from setuptools import build_meta

    return build_meta.build_sdist(sdist_directory, config_settings)


def prepare_metadata_for_build_wheel(
    metadata_directory: str, config_settings: Optional[Dict[str, Any]] = None
) -> str:
    if _setuptools_can_build():
        from setuptools import build_meta

        return build_meta.prepare_metadata_for_build_wheel(metadata_directory, config_settings)
    info_dir, files = _dist_info(_project())
    path = os.path.join(metadata_directory, info_dir)
    os.makedirs(path, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    return info_dir


def build_wheel(
    wheel_directory: str,
    config_settings: Optional[Dict[str, Any]] = None,
    metadata_directory: Optional[str] = None,
) -> str:
    if _setuptools_can_build():
        from setuptools import build_meta

        return build_meta.build_wheel(wheel_directory, config_settings, metadata_directory)
    project = _project()
    info_dir, files = _dist_info(project)
    wheel_name = f"{info_dir[: -len('.dist-info')]}-{_TAG}.whl"
    record = ""
    os.makedirs(wheel_directory, exist_ok=True)
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel_name), "w", zipfile.ZIP_DEFLATED) as z:
        for path in _package_files(project["packages"]):
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


# -- the stand-alone wheel -----------------------------------------------------------------------------


def _load_toml(text: str) -> Dict[str, Any]:
    try:
        import tomllib  # Python >= 3.11

        return tomllib.loads(text)
    except ImportError:
        pass
    try:
        from pip._vendor import tomli  # the installing pip's own parser (Python 3.9, 3.10)

        return tomli.loads(text)  # type: ignore[no-any-return]
    except ImportError as e:
        raise RuntimeError("no TOML parser: install setuptools>=61 and wheel, or use Python >= 3.11") from e


def _project() -> Dict[str, Any]:
    with open("pyproject.toml", encoding="utf-8") as f:
        doc = _load_toml(f.read())
    project = dict(doc["project"])
    project["packages"] = list(doc.get("tool", {}).get("setuptools", {}).get("packages", []))
    return project


def _dist_info(project: Dict[str, Any]) -> Tuple[str, Dict[str, bytes]]:
    name = str(project["name"])
    version = str(project["version"])
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {name}",
        f"Version: {version}",
    ]
    if project.get("description"):
        lines.append(f"Summary: {project['description']}")
    lic = project.get("license")
    if isinstance(lic, dict) and lic.get("text"):
        lines.append(f"License: {lic['text']}")
    if project.get("requires-python"):
        lines.append(f"Requires-Python: {project['requires-python']}")
    for c in project.get("classifiers", []):
        lines.append(f"Classifier: {c}")
    for dep in project.get("dependencies", []):
        lines.append(f"Requires-Dist: {dep}")
    body = ""
    readme = project.get("readme")
    if isinstance(readme, str) and os.path.isfile(readme):
        lines.append("Description-Content-Type: text/markdown")
        with open(readme, encoding="utf-8") as f:
            body = f.read()
    meta = "\n".join(lines) + "\n\n" + body
    top = sorted({p.split(".")[0] for p in project["packages"]})
    files = {
        "METADATA": meta.encode("utf-8"),
        "WHEEL": f"Wheel-Version: 1.0\nGenerator: sandboxd_build\nRoot-Is-Purelib: true\nTag: {_TAG}\n".encode(),
        "top_level.txt": "".join(t + "\n" for t in top).encode(),
    }
    normalized = re.sub(r"[-_.]+", "_", name).lower()
    return f"{normalized}-{version}.dist-info", files


def _package_files(packages: List[str]) -> List[str]:
    out: List[str] = []
    for pkg in packages:
        d = pkg.replace(".", "/")
        for name in sorted(os.listdir(d)):
            p = os.path.join(d, name)
            if os.path.isfile(p) and (name.endswith(".py") or name == "py.typed"):
                out.append(p)
    return out


def _record_line(arcname: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")
    return f"{arcname},sha256={digest},{len(data)}\n"
