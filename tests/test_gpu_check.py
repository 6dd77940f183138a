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
    assert [c["step"] for c in summary["commands"]] == [
        "train",
        "eval",
        "predict",
        "merge",
        "push",
        "snippet",
    ]
    assert summary["ran_on"] == {"predict": ["cpu"], "merge": ["cpu"]}
    evals = summary["evaluations"]
    assert set(evals) == {"untrained", "majority", "during", "final", "cli"}
    for name in ("untrained", "during", "final", "cli"):
        assert evals[name]["device"] == "cpu" and evals[name]["dtype"] == "float32"
        assert evals[name]["rows"] > 0 and evals[name]["answers_per_s"] > 0
    answer = json.loads((tmp_path / "out" / "predict.log").read_text().strip().splitlines()[-1])
    assert answer["question"] == "How many bars are there?" and "answer" in answer
    assert (tmp_path / "work" / "run" / "merged" / "config.json").is_file()
    assert (tmp_path / "work" / "pushed" / "merged" / "merge.json").is_file()  # push --merged ran
    assert (tmp_path / "out" / "snippet.log").read_text().strip()  # the card's snippet printed its answer


def _finished_run(root: Path, devices: dict) -> tuple[Path, Path]:
    """What gpu_check.sh leaves for its verdict: metrics.json per evaluation, steps.tsv, predict.log, merge.json."""
    run, out = root / "run", root / "out"
    for name in ("untrained", "majority", "during", "final", "cli"):
        (run / "eval" / name).mkdir(parents=True)
        where = {"device": None} if name == "majority" else {"device": "cuda:0", "devices": devices[name]}
        (run / "eval" / name / "metrics.json").write_text(json.dumps({"n": 4, "dtype": "bfloat16"} | where))
    (run / "merged").mkdir()
    (run / "merged" / "config.json").write_text("{}")
    (run / "merged" / "merge.json").write_text(json.dumps({"devices": devices["merge"]}))
    out.mkdir()
    (out / "steps.tsv").write_text("train\t0\t10\npredict\t0\t3\n")
    (out / "predict.log").write_text(
        "loading\n" + json.dumps({"answer": "3", "devices": devices["predict"]}) + "\n"
    )
    return run, out


@pytest.mark.parametrize(
    ("where", "off"),
    [
        ("final", "final: parameters on ['cuda:0', 'meta'], expected cuda only"),
        ("predict", "predict: ran on ['cpu'], expected cuda only"),
        ("merge", "merge: ran on ['cuda:0', 'cpu'], expected cuda only"),
    ],
)
def test_gpu_verdict_fails_on_any_tensor_off_the_device(tmp_path, where, off):
    """The verdict reads every parameter's device of every evaluation, predict and merge: the first
    parameter on the GPU is not enough (an offloaded model, a buffer left behind)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from gpu_verdict import verdict

    good = {name: ["cuda:0"] for name in ("untrained", "during", "final", "cli", "predict", "merge")}
    run, out = _finished_run(tmp_path / "good", good)
    assert verdict(run, "cuda", out / "steps.tsv", ok=True)["ok"]
    bad = dict(
        good, **{where: {"final": ["cuda:0", "meta"], "predict": ["cpu"], "merge": ["cuda:0", "cpu"]}[where]}
    )
    run, out = _finished_run(tmp_path / "bad", bad)
    summary = verdict(run, "cuda", out / "steps.tsv", ok=True)
    assert not summary["ok"] and summary["problems"] == [off]
    (out / "steps.tsv").write_text("train\t0\t10\ngpu_tests\t1\t60\n")  # a failing gpu test fails it too
    assert "gpu_tests exited 1" in verdict(run, "cuda", out / "steps.tsv", ok=True)["problems"]
