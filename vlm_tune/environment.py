"""`vlm-tune env`: the software a run here would use, and how it differs from the lock of what was tested."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

from vlm_tune import __version__
from vlm_tune.errors import UserError
from vlm_tune.versions import CORE, RUNTIME, drift, fix_hint, library_versions, read_lock


def _torch() -> dict[str, Any]:
    """torch's version, the CUDA it was built for (None: CPU build) and what this machine offers."""
    import torch

    available = torch.cuda.is_available()
    return {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": available,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if available
        else [],
    }


def env_report() -> dict[str, Any]:
    """Everything `vlm-tune env` prints, as data."""
    from vlm_tune.backend import image_backend

    versions = library_versions()
    lock: dict[str, Any]
    try:
        parsed = read_lock()
    except UserError as err:
        lock = {"error": str(err)}
    else:
        differ = drift(parsed)
        lock = {
            "path": str(parsed.path),
            "header": parsed.header,
            "packages": len(parsed.pins),
            "differ": {d.name: {"installed": d.installed, "locked": d.locked} for d in differ if d.installed},
            "not_installed": sorted(d.name for d in differ if d.installed is None),
            "fix": fix_hint(parsed),
        }
    return {
        "vlm-tune": __version__,
        "python": f"{sys.version.split()[0]} ({platform.python_implementation()}, {sys.executable})",
        "platform": platform.platform(),
        "torch": _torch(),
        "image_backend": image_backend(),
        "image_backend_forced": os.environ.get("VLM_TUNE_IMAGE_BACKEND") or None,
        "versions": versions,
        "lock": lock,
    }


def _listing(versions: dict[str, str | None], names: tuple[str, ...]) -> str:
    return ", ".join(f"{n} {versions.get(n) or '(not installed)'}" for n in names)


def format_env(report: dict[str, Any]) -> str:
    """The report as the lines `vlm-tune env` prints."""
    t = report["torch"]
    build = f"CUDA {t['cuda_build']} build" if t["cuda_build"] else "CPU build"
    gpus = (
        f"CUDA available: {len(t['gpus'])} GPU(s), {', '.join(t['gpus'])}"
        if t["cuda_available"]
        else ("CUDA not available")
    )
    forced = report["image_backend_forced"]
    backend = report["image_backend"] + (
        f" (VLM_TUNE_IMAGE_BACKEND={forced})"
        if forced
        else " (torchvision where it imports, else pil; VLM_TUNE_IMAGE_BACKEND=pil forces pil)"
    )
    versions = report["versions"]
    lines = [
        f"vlm-tune {report['vlm-tune']}",
        f"python   {report['python']}",
        f"platform {report['platform']}",
        f"torch    {t['version']} ({build}; {gpus})",
        f"core     {_listing(versions, CORE[1:])}",
        f"runtime  {_listing(versions, RUNTIME)}",
        f"image processors: {backend}",
    ]
    lock = report["lock"]
    if "error" in lock:
        return "\n".join([*lines, f"lock: {lock['error']}"])
    header = lock["header"]
    made = ", ".join(f"{k} {header[k]}" for k in ("written", "python") if header.get(k))
    lines.append(f"lock     {lock['path']} ({lock['packages']} packages; {made})")
    if lock["differ"]:
        lines.append(f"  {len(lock['differ'])} installed version(s) differ from the lock:")
        lines += [f"    {n} {v['installed']} (locked {v['locked']})" for n, v in lock["differ"].items()]
    if lock["not_installed"]:
        lines.append(f"  locked but not installed: {', '.join(lock['not_installed'])}")
    if lock["differ"] or lock["not_installed"]:
        lines.append(f"  to install the lock: {lock['fix']}")
    else:
        lines.append("  every locked package is installed at its locked version")
    return "\n".join(lines)
