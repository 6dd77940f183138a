"""The GRPO stage end to end on the tiny model: one command builds the SFT adapter, scores it, runs GRPO on
TRL's GRPOTrainer, scores the result and writes the report; resume from a checkpoint."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_cfg
from vlm_tune.train import train


def grpo_cfg(cache_dir, tmp_path, *overrides):
    return tiny_cfg(
        cache_dir,
        tmp_path / "rl",
        "train.stage=grpo",
        f"model.adapter={tmp_path / 'sft' / 'final'}",
        "rl.build_adapter=true",
        "rl.num_generations=2",
        "rl.prompts_per_step=4",
        "rl.max_completion_length=3",
        "rl.steps=2",
        "rl.learning_rate=1e-2",
        "rl.rewards={exact_match: 1.0, format: 1.0}",
        "rl.temperature=0.7",
        "lora.modules_to_save=[lm_head]",
        "train.max_steps=40",  # an SFT adapter that answers some rows: groups with mixed rewards
        "train.save_steps=1",
        "eval.baselines=[]",
        *overrides,
    )


def adapter_weights(path):
    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.slow
def test_one_command_builds_the_sft_adapter_then_grpo_reports_start_vs_final(cache_dir, tmp_path):
    run = train(grpo_cfg(cache_dir, tmp_path, "eval.every_steps=2", "eval.subset_size=4"))
    sft = tmp_path / "sft" / "final"
    assert (sft / "adapter_config.json").is_file()  # built by the SFT stage the command ran first
    start = json.loads((run / "eval" / "start" / "metrics.json").read_text())
    final = json.loads((run / "eval" / "final" / "metrics.json").read_text())
    assert start["n"] == final["n"] == 8 and "by_type" in final
    assert "start (adapter" in (run / "report.html").read_text()
    history = json.loads((run / "train_log.json").read_text())
    logged = {k for h in history for k in h}
    assert {
        "rewards/exact_match/mean",
        "rewards/format/mean",
        "frac_reward_zero_std",
        "eval_exact_match",
    } <= logged
    assert json.loads((run / "eval" / "during" / "metrics.json").read_text())["step"] == 2
    assert (run / "best_checkpoint.json").is_file()
    before, after = adapter_weights(sft), adapter_weights(run / "final")
    assert before.keys() == after.keys()  # the SFT adapter continued (same LoRA), not a new one
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert json.loads((run / "final" / "prompt.json").read_text())["user_template"].startswith("{question}")
    from vlm_tune.card import build_model_card

    card = build_model_card(run)
    assert "then reinforced by GRPO with the evaluation metric as the reward" in card
    assert f"2. GRPO (TRL GRPOTrainer) from SFT adapter `{sft}`" in card and "exact_match x 1.0" in card


@pytest.mark.slow
def test_resume_from_a_checkpoint_matches_the_straight_run(cache_dir, tmp_path):
    # with the KL term (against the "ref" adapter TRL copies from the SFT one); step 2 has the first signal
    straight = train(grpo_cfg(cache_dir, tmp_path, "rl.beta=0.1", "rl.steps=3"))
    step2, step3 = adapter_weights(straight / "checkpoint-2"), adapter_weights(straight / "final")
    assert any(not torch.equal(step2[k], step3[k]) for k in step3)  # step 3 learned something to reproduce
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(straight, resumed_dir)
    for p in ("checkpoint-3", "final", "eval"):
        shutil.rmtree(resumed_dir / p)
    cfg = grpo_cfg(cache_dir, tmp_path, f"run.output_dir={resumed_dir}", "rl.beta=0.1", "rl.steps=3")
    saved = resumed_dir / "config.yaml"  # the same run, killed after checkpoint-2 (copied to compare)
    saved.write_text(saved.read_text().replace(str(straight), str(resumed_dir)))
    train(cfg, resume=str(resumed_dir / "checkpoint-2"))
    a, b = adapter_weights(straight / "final"), adapter_weights(resumed_dir / "final")
    # same data order, optimizer and RNG state: on CPU the sampled completions and so the weights are the same
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not (resumed_dir / "eval" / "start").exists()  # the start was scored before the checkpoint
    history = json.loads((straight / "train_log.json").read_text())
    assert any(h.get("kl", 0) > 0 for h in history)  # the KL term ran (against the SFT adapter)
    assert not (straight / "final" / "ref").exists()  # the reference is not saved as a second adapter
