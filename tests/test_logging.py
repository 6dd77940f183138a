"""Trackers, evaluation during training with best-checkpoint keeping, and a 2-process run."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from .conftest import tiny_cfg


@pytest.mark.slow
def test_wandb_offline_and_tensorboard_write_files(cache_dir, tmp_path, monkeypatch):
    from vlm_tune.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    run = train(
        tiny_cfg(
            cache_dir,
            tmp_path / "run",
            "logging.report_to=[wandb, tensorboard]",
            "train.max_steps=2",
            "eval.baselines=[]",
            "eval.at_end=false",
        )
    )
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("run-*.wandb")), "the offline run file is written"
    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


@pytest.mark.slow
def test_eval_during_training_keeps_best_checkpoint(cache_dir, tmp_path):
    from vlm_tune.train import train

    run = train(
        tiny_cfg(
            cache_dir,
            tmp_path / "run",
            "train.max_steps=6",
            "train.save_steps=2",
            "train.save_total_limit=1",
            "eval.every_steps=2",
            "eval.subset_size=4",
            "eval.baselines=[]",
        )
    )
    best = json.loads((run / "best_checkpoint.json").read_text())
    assert [h["step"] for h in best["history"]] == [2, 4, 6]
    values = [h["exact_match"] for h in best["history"]]
    assert best["value"] == max(values)
    assert best["step"] == best["history"][values.index(max(values))]["step"]
    assert (run / best["checkpoint"]).is_dir(), "rotation never deletes the best checkpoint"
    assert (run / "plots" / "accuracy.png").is_file()
    log = json.loads((run / "train_log.json").read_text())
    assert sum("eval_exact_match" in h for h in log) == 3


@pytest.mark.slow
def test_two_process_data_parallel_run(cache_dir, tmp_path):
    cfg = tiny_cfg(
        cache_dir, tmp_path / "ddp", "train.max_steps=3", "eval.baselines=[]", "train.save_steps=3"
    )
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29531",
            "-m",
            "vlm_tune.cli",
            "train",
            str(path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((tmp_path / "ddp" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert (tmp_path / "ddp" / "final" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ddp" / "eval" / "final" / "metrics.json").is_file()
