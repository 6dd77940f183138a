"""Several processes: shared pre-flight, sharded evaluation, FSDP/DDP adapter saves; trackers; best
checkpoint across --resume; the --overwrite guard."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from vlm_tune.errors import UserError

from .conftest import tiny_cfg

ROOT = Path(__file__).resolve().parent.parent


def _torchrun(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """2 processes; --standalone picks a free port (a fixed one collides with other runs on a shared machine)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def _bad_rows(folder: Path) -> Path:
    """7 rows; row 2 has no image file, row 3 a corrupt image, row 5 an empty answer."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(7):
        name = f"c{i}.png"
        if i == 3:
            (folder / name).write_bytes(b"not a png")
        elif i != 2:
            Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(folder / name)
        rows.append({"image": name, "q": f"How many bars are there in {i}?", "a": "" if i == 5 else str(i)})
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_two_processes_match_one(cache_dir, tmp_path):
    """Pre-flight, sharded generation and the FSDP2 adapter gather, 2 gloo processes vs 1 (CPU)."""
    from vlm_tune.data.sources import load_split

    cfg = tiny_cfg(cache_dir, tmp_path / "unused")
    load_split(cfg.data, "train", cache_dir)  # build the synthetic data once, before two processes read it
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "out"
    out.mkdir()
    result = _torchrun(["tests/dist_worker.py", str(cfg_path), str(_bad_rows(tmp_path / "bad")), str(out)])
    assert result.returncode == 0, result.stderr[-4000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r["preflight_equal"] and r["preflight_n"] == 11
        assert r["bad_skip_equal"]
        assert r["bad_skip"] == [[0, 1, 4, 6], {"missing_image": 1, "corrupt_image": 1, "bad_answer": 1}]
        shared_err, single_err = r["bad_error"]
        assert shared_err == single_err and "row train[2]" in shared_err
        assert r["order"]
        assert r["plain_equal"]
        assert r["fsdp_generate_equal"] and r["fsdp_synced"] and r["plain_not_synced"]
    assert r0["answers"] == r1["answers"] and len(set(r0["answers"])) > 1, "row-dependent answers"
    assert r0["fsdp_changed"] and r0["fsdp_full_equal"]
    assert r0["fsdp_saved_keys_equal"] and r0["fsdp_saved_equal"]
    assert r1["fsdp_full_empty"]


@pytest.mark.slow
def test_ddp_run_saves_trained_adapter_and_evaluates_sharded(tmp_path):
    """torchrun, 2 processes, from an empty cache (no model, no data built yet): the local main process builds
    the stand-in and the synthetic data once, the other rank reads them; baseline, evals during training and
    final eval split over the ranks."""
    from vlm_tune.data.sources import load_split
    from vlm_tune.evaluate import generate_answers
    from vlm_tune.inference import load_for_inference

    out, cache_dir = tmp_path / "ddp", tmp_path / "empty-cache"
    cfg = tiny_cfg(
        cache_dir,
        out,
        "train.max_steps=2",
        "train.save_steps=2",
        "eval.every_steps=2",
        "eval.subset_size=4",
        "eval.batch_size=1",
        "eval.baselines=[untrained]",
        "logging.progress=true",
    )
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    result = _torchrun(["-m", "vlm_tune.cli", "train", str(cfg_path)])
    assert result.returncode == 0, result.stderr[-4000:]
    built = sorted(p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock"))
    assert built[1:] == ["tiny-model"] and built[0].startswith("synthetic-"), f"no staging left: {built}"
    shown = result.stdout + result.stderr
    assert "train: 48 rows, none skipped; test: 8 rows, none skipped" in shown, "pre-flight results gathered"
    assert shown.count("pre-flight train") == 1, "one progress bar (rank 0's share of the rows)"

    final = load_file(str(out / "final" / "adapter_model.safetensors"))
    trained = load_file(str(out / "checkpoint-2" / "adapter_model.safetensors"))
    assert final.keys() == trained.keys()
    assert all(torch.equal(final[k], trained[k]) for k in final), (
        "final adapter = weights after the last step"
    )
    assert any(v.abs().sum() > 0 for k, v in final.items() if "lora_B" in k)

    preds = [
        json.loads(line) for line in (out / "eval" / "final" / "predictions.jsonl").read_text().splitlines()
    ]
    rowset = load_split(cfg.data, "test", cache_dir)
    rows = [rowset.row(i) for i in range(len(rowset))]
    assert [p["id"] for p in preds] == [r["id"] for r in rows]
    model, processor, _ = load_for_inference(out / "final")
    from vlm_tune.data.collate import ChatCollator

    collator = ChatCollator(processor, cfg.prompt.system, cfg.prompt.user_template, cfg.train.max_length)
    one = generate_answers(model, processor, collator, rows, 1, cfg.eval.max_new_tokens)
    assert [p["prediction"] for p in preds] == one, "2 ranks gather the answers one process gives"
    assert json.loads((out / "eval" / "untrained" / "metrics.json").read_text())["n"] == 8
    best = json.loads((out / "best_checkpoint.json").read_text())
    assert [h["step"] for h in best["history"]] == [2]


def test_overwrite_removes_only_run_directories(cache_dir, tmp_path, monkeypatch):
    from vlm_tune.trainer import prepare_run_dir

    def names(folder):
        return sorted(p.name for p in folder.iterdir())

    run = tmp_path / "run"  # a vlm-tune run directory is replaced
    prepare_run_dir(tiny_cfg(cache_dir, run), None, False)
    (run / "checkpoint-2").mkdir()
    (run / "checkpoint-2" / "checkpoint_complete.json").write_text("{}")
    (run / "final").mkdir()
    (run / "train_log.json").write_text("[]")
    prepare_run_dir(tiny_cfg(cache_dir, run), None, True)
    assert names(run) == ["config.yaml"]

    def refused(output_dir, folder, match):
        before = names(folder)
        with pytest.raises(UserError, match=match):
            prepare_run_dir(tiny_cfg(cache_dir, output_dir), None, True)
        assert names(folder) == before, "nothing deleted"

    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "config.yaml").write_text(tiny_cfg(cache_dir, ".").to_yaml())  # even with a run's config in it
    monkeypatch.chdir(work)
    refused(".", work, r"refuses to delete \. .*current directory")
    monkeypatch.chdir(work / "sub")
    refused(str(work), work, f"refuses to delete {work} .*a folder above them")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("x")
    monkeypatch.setenv("HOME", str(home))
    refused(str(home), home, f"refuses to delete {home} .*home folder")
    plain = tmp_path / "photos"
    plain.mkdir()
    (plain / "a.jpg").write_bytes(b"x")
    refused(str(plain), plain, f"refuses to delete {plain}: it holds no vlm-tune run")
    (plain / "config.yaml").write_text("name: my photos\n")
    refused(str(plain), plain, f"refuses to delete {plain}: it holds no vlm-tune run")
    mixed = tmp_path / "mixed"
    prepare_run_dir(tiny_cfg(cache_dir, mixed), None, False)
    (mixed / "notes.txt").write_text("mine")
    (mixed / ".git").mkdir()
    refused(
        str(mixed),
        mixed,
        f"refuses to delete {mixed}: it holds files a vlm-tune run does not write \\(.git, notes.txt\\)",
    )


def test_best_checkpoint_kept_across_resume(tmp_path):
    """A resumed run keeps the best it had chosen, so rotation keeps protecting that checkpoint."""
    from transformers import TrainerState

    from vlm_tune.trainer import COMPLETE_MARKER, GenerationEval

    scores = {2: 0.5, 4: 0.25, 6: 0.25, 8: 0.75}
    args = SimpleNamespace(output_dir=str(tmp_path))
    logged = []

    def callback():
        cb = GenerationEval(
            lambda model, step: {"exact_match": scores[step], "relaxed_accuracy": scores[step] / 2},
            2,
            "exact_match",
            tmp_path,
        )
        cb.log = logged.append
        return cb

    def step(cb, state, n, save=True):
        state.global_step = n
        cb.on_step_end(args, state, None)
        if save:
            (tmp_path / f"checkpoint-{n}").mkdir()
            (tmp_path / f"checkpoint-{n}" / COMPLETE_MARKER).write_text("{}")

    first, state = callback(), TrainerState()
    first.on_train_begin(args, state, None)
    step(first, state, 2)
    step(first, state, 4)
    step(first, state, 6, save=False)  # killed after evaluating step 6, before its checkpoint was written
    assert json.loads((tmp_path / "best_checkpoint.json").read_text())["step"] == 2, "written at each eval"

    resumed, state = callback(), TrainerState(global_step=4)  # --resume from checkpoint-4
    resumed.on_train_begin(args, state, None)
    assert (state.best_metric, state.best_model_checkpoint) == (0.5, str(tmp_path / "checkpoint-2"))
    step(resumed, state, 6)
    assert state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    best = json.loads((tmp_path / "best_checkpoint.json").read_text())
    assert (best["step"], [h["step"] for h in best["history"]]) == (2, [2, 4, 6])
    step(resumed, state, 8)
    assert state.best_model_checkpoint == str(tmp_path / "checkpoint-8")
    assert json.loads((tmp_path / "best_checkpoint.json").read_text())["step"] == 8
    assert logged[0] == {"eval_exact_match": 0.5, "eval_relaxed_accuracy": 0.25}
    assert len(logged) == 5  # every eval reaches Trainer.log (and so the trackers)


@pytest.fixture(scope="module")
def resumed_run(cache_dir, tmp_path_factory):
    """4 steps with evals every 2, W&B (offline) and TensorBoard; then --resume to 6 steps."""
    from vlm_tune.train import train

    out = tmp_path_factory.mktemp("resumed") / "run"
    common = (
        "train.save_steps=2",
        "train.save_total_limit=1",
        "eval.every_steps=2",
        "eval.subset_size=4",
        "eval.baselines=[]",
        "eval.at_end=false",
        "logging.report_to=[wandb, tensorboard]",
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.delenv("WANDB_DIR", raising=False)
        mp.delenv("WANDB_PROJECT", raising=False)
        mp.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
        train(tiny_cfg(cache_dir, out, "train.max_steps=4", *common))
        train(tiny_cfg(cache_dir, out, "train.max_steps=6", *common), resume="latest")
    return out


def _history(run):
    return json.loads((run / "best_checkpoint.json").read_text())["history"]


@pytest.mark.slow
def test_best_checkpoint_survives_resume_end_to_end(resumed_run):
    history = _history(resumed_run)
    assert [h["step"] for h in history] == [2, 4, 6], "evals before and after the resume"
    values = [h["exact_match"] for h in history]
    best = json.loads((resumed_run / "best_checkpoint.json").read_text())
    assert best["step"] == history[values.index(max(values))]["step"]
    assert (resumed_run / best["checkpoint"] / "adapter_model.safetensors").is_file()
    # (the evals of this tiny run tie, so the pre-resume step 2 stays best, and save_total_limit=1 keeps it)


@pytest.mark.slow
def test_eval_metrics_reach_tensorboard(resumed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seen = {}
    for events in (resumed_run / "tensorboard").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in ("eval/exact_match", "eval/relaxed_accuracy"):
            if tag in acc.Tags()["scalars"]:
                seen.update({(tag, e.step): e.value for e in acc.Scalars(tag)})
    expected = {
        (f"eval/{k}", h["step"]): h[k]
        for h in _history(resumed_run)
        for k in ("exact_match", "relaxed_accuracy")
    }
    assert seen.keys() == expected.keys()
    assert all(seen[k] == pytest.approx(v) for k, v in expected.items())


def _wandb_records(path: Path):
    """Records of an offline W&B run file: a 7-byte header, then LevelDB-log records in 32 KiB blocks."""
    import struct

    data, pos, block, parts = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk  # full, first | middle, last
        if kind in (1, 4):
            yield parts


@pytest.mark.slow
def test_eval_metrics_reach_wandb_offline(resumed_run):
    from wandb.proto import wandb_internal_pb2

    seen = {}
    for path in (resumed_run / "wandb").glob("offline-run-*/run-*.wandb"):
        for data in _wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") != "history":
                continue
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "eval/exact_match" in items:
                seen[items["train/global_step"]] = (items["eval/exact_match"], items["eval/relaxed_accuracy"])
    expected = {h["step"]: (h["exact_match"], h["relaxed_accuracy"]) for h in _history(resumed_run)}
    assert seen == expected  # JSON numbers both ways: exact


def test_check_warns_when_best_checkpoint_is_picked_on_test_split(cache_dir, tmp_path, capsys):
    from vlm_tune.check import run_check, selection_warning
    from vlm_tune.config import load_config

    cfg = tiny_cfg(cache_dir, tmp_path / "run", "eval.every_steps=2", "train.save_steps=2")
    assert "picked on 'test'" in selection_warning(cfg)
    assert selection_warning(tiny_cfg(cache_dir, tmp_path / "run")) is None, "no evals during training"
    for path in ("configs/smolvlm-256m-chartqa.yaml", "configs/smolvlm-2.2b-chartqa-qlora.yaml"):
        chartqa = load_config(ROOT / path)
        assert chartqa.eval.select_split == "val" and selection_warning(chartqa) is None
    assert run_check(cfg) == 0
    assert "warning: eval.select_split: the best checkpoint is picked on 'test'" in " ".join(
        capsys.readouterr().out.split()
    )


def test_selection_rows_come_from_select_split(cache_dir, tmp_path):
    from vlm_tune.run_steps import _selection_rows

    rows = []
    for i in range(9):
        Image.new("RGB", (32, 32), (20 * i, 0, 0)).save(tmp_path / f"{i}.png")
        split = ("train", "val", "test")[i % 3]
        rows.append({"image": f"{i}.png", "q": f"q{i}", "a": str(i), "split": split, "id": f"r{i}"})
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_cfg(
        cache_dir,
        tmp_path / "run",
        f"data.source={source}",
        "data.columns={image: image, question: q, answer: a, id: id}",
        "eval.every_steps=2",
        "eval.subset_size=2",
        "train.save_steps=2",
    )
    eval_rows = [{"id": "from-test"}]
    assert _selection_rows(cfg, eval_rows, False) == eval_rows[:2], "default: data.eval_split"
    cfg.eval.select_split = "val"
    picked = _selection_rows(cfg, eval_rows, False)
    assert [r["id"] for r in picked] == ["r1", "r4"] and [r["answers"] for r in picked] == [["1"], ["4"]]


def test_preflight_progress_bar(cache_dir, tmp_path, capsys):
    from vlm_tune.data.sources import load_split, prepare_split

    rowset = load_split(tiny_cfg(cache_dir, tmp_path).data, "test", cache_dir)
    prepare_split(rowset, limit=5, progress=True)
    shown = capsys.readouterr().err  # progress on stderr: stdout carries only results
    assert "pre-flight test" in shown and "5/5" in shown and "rows/s" in shown
    prepare_split(rowset, limit=5)
    captured = capsys.readouterr()
    assert captured.out == captured.err == "", "quiet unless asked"


def test_fsdp1_refused_before_training_when_evaluating(cache_dir, tmp_path):
    from vlm_tune.distributed import check_fsdp_version

    def trainer(plugin):
        return SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))

    cfg = tiny_cfg(cache_dir, tmp_path)
    with pytest.raises(UserError, match="fsdp_version: 2"):
        check_fsdp_version(trainer(SimpleNamespace(fsdp_version=1)), cfg)
    check_fsdp_version(trainer(SimpleNamespace(fsdp_version=2)), cfg)
    check_fsdp_version(trainer(None), cfg)  # DDP or one process
    check_fsdp_version(
        trainer(SimpleNamespace(fsdp_version=1)), tiny_cfg(cache_dir, tmp_path, "eval.at_end=false")
    )
