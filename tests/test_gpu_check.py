"""scripts/gpu_check.sh end to end on CPU (builtin:tiny, tiny schedule): the same commands a GPU machine runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu(cache_dir, tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_CHECK_WORK=str(tmp_path / "work"))
    env |= {"PYTHON": sys.executable, "GPU_CHECK_CACHE": str(cache_dir)}
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--device", "cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["ok"] and summary["device"] == "cpu" and not summary["problems"]
    assert [c["step"] for c in summary["commands"]] == ["train", "eval", "predict", "merge"]
    evals = summary["evaluations"]
    assert set(evals) == {"untrained", "majority", "during", "final", "cli"}
    for name in ("untrained", "during", "final", "cli"):
        assert evals[name]["device"] == "cpu" and evals[name]["dtype"] == "float32"
        assert evals[name]["rows"] > 0 and evals[name]["answers_per_s"] > 0
    answer = json.loads((tmp_path / "out" / "predict.log").read_text().strip().splitlines()[-1])
    assert answer["question"] == "How many bars are there?" and "answer" in answer
    assert (tmp_path / "work" / "run" / "merged" / "config.json").is_file()
