"""scripts/setup.sh installs the lock (torch first, then exactly the lock, then vlm-tune); scripts/test_latest.sh
writes a lock only after the suite passed. Run against a stand-in venv whose python logs pip instead of
installing and reports the installed torch it is told (everything else goes to this interpreter), so nothing
is downloaded or changed."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_tune.versions import read_lock

ROOT = Path(__file__).resolve().parents[1]
STUB = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  shift 2
  echo "pip $* | config=${{PIP_CONFIG_FILE-}} find_links=${{PIP_FIND_LINKS-}}" >> "{log}"
  exit 0
fi
if [ "$1" = "-m" ] && [ "$2" = "pytest" ]; then echo "stub suite: $*"; exit "${{STUB_SUITE_RC:-0}}"; fi
case "$2" in
  *"import torchvision"*) echo "[setup] torchvision (stub)"; exit 0 ;;
  *"import torch, transformers"*) echo "[setup] torch (stub)"; exit 0 ;;
  *"m.version(sys.argv[1])"*) [ "$3" = torch ] && echo "${{STUB_TORCH-}}"; [ "$3" = torchvision ] && echo "${{STUB_TORCHVISION-}}"; exit 0 ;;
esac
exec "{python}" "$@"
"""


@pytest.fixture
def venv(tmp_path):
    """A venv folder whose bin/python logs `-m pip` calls to pip.log, says torch and torchvision are installed
    at STUB_TORCH / STUB_TORCHVISION, and passes the rest to this python."""
    log = tmp_path / "pip.log"
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(STUB.format(log=log, python=sys.executable))
    (bin_dir / "python").chmod(0o755)
    return tmp_path / "venv", log


def run(script, *args, env=None, path_prepend=None):
    full = {k: v for k, v in os.environ.items() if k not in ("VLM_TUNE_TORCHVISION", "TORCH_VERSION")}
    full["PIP_FIND_LINKS"] = "/wheels/here"
    full.update(env or {})
    if path_prepend:
        full["PATH"] = f"{path_prepend}:{full['PATH']}"
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / script), *args], cwd=ROOT, env=full, capture_output=True, text=True
    )


def pip_calls(log):
    return [line for line in log.read_text().splitlines() if not line.startswith("pip uninstall")]


def torch_installed():
    from importlib import metadata

    return metadata.version("torch")


def test_setup_installs_exactly_the_lock_after_torch(venv):
    path, log = venv
    lock = read_lock()
    result = run("setup.sh", str(path), env={"STUB_TORCH": lock.pins["torch"] + "+cpu"})
    assert result.returncode == 0, result.stderr
    calls = pip_calls(log)
    # torch is there at the locked version: kept; then the lock with --no-deps, then vlm-tune with --no-deps
    assert [c.split(" | ")[0] for c in calls] == [
        "pip install --no-deps -r vlm_tune/requirements.lock",
        "pip install --no-deps -e .",
    ]


def test_setup_gpu_and_opt_in_install_cuda_torch_with_the_locked_torchvision(venv, tmp_path):
    path, log = venv
    lock = read_lock()
    cpu_torch = {"STUB_TORCH": lock.pins["torch"] + "+cpu"}
    stack = f"torch=={lock.pins['torch']} torchvision=={lock.gpu['torchvision']}"

    # opt-in on a machine without a GPU: from the package index, pip's wheel folders and config left out
    result = run("setup.sh", str(path), env=cpu_torch | {"VLM_TUNE_TORCHVISION": "1"})
    assert result.returncode == 0, result.stderr
    assert "pip uninstall -y torch torchvision" in log.read_text(), "the CPU build makes way"
    first, *rest = pip_calls(log)
    assert first == f"pip install {stack} | config=/dev/null find_links="
    assert [c.split(" | ")[0] for c in rest] == [
        "pip install --no-deps -r vlm_tune/requirements.lock",
        "pip install --no-deps -e .",
    ]
    assert "[setup] torchvision (stub)" in result.stdout

    # a machine where nvidia-smi sees a GPU: the same stack from pip as configured
    log.unlink()
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Stub'\n")
    (fake / "nvidia-smi").chmod(0o755)
    result = run("setup.sh", str(path), env=cpu_torch, path_prepend=fake)
    assert result.returncode == 0, result.stderr
    assert pip_calls(log)[0] == f"pip install {stack} | config= find_links=/wheels/here"
    assert "GPU found" in result.stdout

    # the CUDA build and torchvision already there at the locked versions: kept
    log.unlink()
    cuda = {"STUB_TORCH": lock.pins["torch"], "STUB_TORCHVISION": lock.gpu["torchvision"] + "+cu130"}
    result = run("setup.sh", str(path), env=cuda, path_prepend=fake)
    assert result.returncode == 0, result.stderr
    assert pip_calls(log)[0].startswith("pip install --no-deps -r vlm_tune/requirements.lock")


def test_setup_replaces_a_torch_of_another_version(venv):
    path, log = venv
    lock = read_lock()
    result = run("setup.sh", str(path), env={"STUB_TORCH": "2.0.0+cpu"})
    assert result.returncode == 0, result.stderr
    assert pip_calls(log)[0].startswith(f"pip install --retries 0 --timeout 15 torch=={lock.pins['torch']} ")


def test_setup_refuses_a_torch_other_than_the_locked_one(venv):
    path, log = venv
    result = run("setup.sh", str(path), env={"TORCH_VERSION": "2.0.0"})
    assert result.returncode == 2
    assert "pins torch" in result.stderr and "--latest" in result.stderr
    assert not log.exists(), "nothing installed"


def test_test_latest_writes_the_lock_only_with_the_whole_suite():
    result = run("test_latest.sh", "--fast", "--write-lock")
    assert result.returncode == 2 and "whole suite" in result.stderr


@pytest.mark.slow
def test_test_latest_refuses_to_write_the_lock_when_the_suite_fails(venv, tmp_path):
    path, _ = venv
    lock = tmp_path / "requirements.lock"
    shutil.copy(ROOT / "vlm_tune" / "requirements.lock", lock)
    before = lock.read_text()
    env = {"LATEST_VENV": str(path), "VLM_TUNE_LOCK": str(lock), "TORCHVISION_VERSION": "0.28.0"}

    failed = run("test_latest.sh", "--no-install", "--write-lock", env=env | {"STUB_SUITE_RC": "1"})
    assert failed.returncode == 1
    assert "the lock is NOT written" in failed.stderr
    assert "stub suite: -m pytest -m not gpu -q" in failed.stdout, "the whole suite, not the fast one"
    assert "vlm-tune " in failed.stdout and "lock " in failed.stdout, "the versions it got are printed"
    assert lock.read_text() == before

    passed = run("test_latest.sh", "--no-install", "--write-lock", env=env)
    assert passed.returncode == 0, passed.stderr
    written = read_lock(lock)
    assert written.header["command"] == "bash scripts/test_latest.sh --write-lock"
    assert written.gpu == {"torchvision": "0.28.0"}
    assert written.pins["torch"] == torch_installed().split("+")[0]
    assert "vlm-tune" not in written.pins and "pip" not in written.pins
