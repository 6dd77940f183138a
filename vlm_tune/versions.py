"""The lock of what was tested (`vlm_tune/requirements.lock`, shipped inside the package) and what is installed.

The lock pins every package of the CPU install, transitive ones included, at the version the test suite
passed with; `scripts/test_latest.sh --write-lock` writes it (`format_lock`), `make install` installs exactly
it. Its header (`# key: value` lines) names the date, python, platform and command that wrote it, and the GPU
stack's extra pins (`# gpu: torchvision==X`), installed only beside torch's CUDA build.

Read from package metadata only (no library is imported), so `check` and `env` stay fast.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path

from vlm_tune.errors import UserError

LOCK_NAME = "requirements.lock"
CORE = ("torch", "transformers", "trl", "peft", "accelerate")
# recorded beside the core in every metrics.json and printed by `vlm-tune env`
RUNTIME = (
    "torchvision",
    "datasets",
    "tokenizers",
    "huggingface-hub",
    "safetensors",
    "bitsandbytes",
    "pillow",
    "numpy",
)
HEADER_KEYS = ("written", "python", "platform", "command", "gpu")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def canonical(name: str) -> str:
    """A distribution name as pip compares them: case and runs of `-_.` do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    """The version without its local label: `2.13.0+cpu` and `2.13.0+cu130` are both torch 2.13.0."""
    return version.split("+", 1)[0]


@dataclass(frozen=True)
class Lock:
    """A parsed lock: pins (canonical name → version), header fields, and the GPU-only pins."""

    path: Path
    pins: dict[str, str]
    header: dict[str, str] = field(default_factory=dict)
    gpu: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Drift:
    """A locked package whose installed version differs (installed None: not installed)."""

    name: str
    installed: str | None
    locked: str


def lock_path() -> Path:
    """Where the shipped lock lies (package data: there in an editable and a wheel install alike)."""
    return Path(str(resources.files("vlm_tune") / LOCK_NAME))


def parse_lock(text: str, path: Path | str = LOCK_NAME) -> Lock:
    """Parse lock text; UserError naming the line when a line is neither a comment nor `name==version`."""
    pins: dict[str, str] = {}
    header: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            key, sep, value = line.lstrip("#").strip().partition(":")
            if sep and key.strip() in HEADER_KEYS and key.strip() not in header:
                header[key.strip()] = value.strip()
            continue
        m = _PIN.match(line)
        if not m:
            raise UserError(
                f"{path}:{number}: {raw!r} is not `name==version`; rewrite the lock (`make lock`)"
            )
        pins[canonical(m.group(1))] = m.group(2)
    gpu = {}
    for token in header.get("gpu", "").split():
        m = _PIN.match(token)
        if m:
            gpu[canonical(m.group(1))] = m.group(2)
    return Lock(Path(path), pins, header, gpu)


def read_lock(path: Path | str | None = None) -> Lock:
    """The shipped lock (or the one at `path`); UserError when it is missing."""
    path = Path(path) if path else lock_path()
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(
            f"{path}: the version lock cannot be read ({err.strerror}); reinstall vlm-tune (`make install`)"
        ) from None
    return parse_lock(text, path)


def format_lock(pins: dict[str, str], header: dict[str, str]) -> str:
    """Lock text: the header fields in HEADER_KEYS order, then one `name==version` per line, by name.

    Local labels are dropped (`torch==2.13.0`, which its `+cpu` and CUDA builds both satisfy).
    """
    lines = [
        "# The versions vlm-tune's test suite passed with: every package of the CPU install (`make install`",
        "# installs exactly these). Refresh: `make lock` (newest releases, the suite, then this file).",
        "# `gpu:` pins go only beside torch's CUDA build (a GPU machine, or VLM_TUNE_TORCHVISION=1).",
    ]
    lines += [f"# {key}: {header[key]}" for key in HEADER_KEYS if header.get(key)]
    lines += [f"{name}=={public(v)}" for name, v in sorted(pins.items(), key=lambda kv: canonical(kv[0]))]
    return "\n".join(lines) + "\n"


def installed_versions() -> dict[str, str]:
    """canonical name → version of every distribution on sys.path (the first one, as imports see it)."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonical(name), dist.version)
    return found


def drift(lock: Lock, names: tuple[str, ...] | None = None) -> list[Drift]:
    """Locked packages (all, or only `names`) whose installed public version is not the locked one.

    The GPU-only pins (torchvision) count where they are installed.
    """
    installed = installed_versions()
    pins = lock.pins | {k: v for k, v in lock.gpu.items() if k in installed}
    out = []
    for name in names or tuple(pins):
        key = canonical(name)
        if key not in pins:
            continue
        have = installed.get(key)
        if have is None or public(have) != public(pins[key]):
            out.append(Drift(key, have, pins[key]))
    return out


def fix_hint(lock: Lock) -> str:
    """How to get back to the lock."""
    return f"`make install` in a vlm-tune checkout, or `pip install -r {lock.path}`"


def core_drift_warnings(lock: Lock | None = None) -> list[str]:
    """One line per core library (torch, transformers, trl, peft, accelerate) outside the lock."""
    try:
        lock = lock or read_lock()
    except UserError as err:
        return [str(err)]
    return [
        f"{d.name} {d.installed} is installed but vlm-tune was tested with {d.name}=={d.locked} "
        f"(the lock, {lock.path}); fix: {fix_hint(lock)}"
        for d in drift(lock, CORE)
        if d.installed is not None
    ]


def library_versions() -> dict[str, str | None]:
    """vlm-tune, python and the core and runtime libraries as installed (None: not installed)."""
    installed = installed_versions()
    out: dict[str, str | None] = {"vlm-tune": installed.get("vlm-tune"), "python": sys.version.split()[0]}
    for name in CORE + RUNTIME:
        out[name] = installed.get(canonical(name))
    return out


def run_record() -> dict[str, object]:
    """What an evaluation records about the software that produced it: versions, torch's CUDA, image backend."""
    import torch

    from vlm_tune.backend import image_backend

    return {
        "versions": library_versions(),
        "torch_cuda": torch.version.cuda,
        "image_backend": image_backend(),
    }
