"""GPU checks (skipped without CUDA): bf16 LoRA and 4-bit QLoRA training, batched generation on the GPU."""

import json

import pytest
import torch

from .conftest import tiny_cfg

pytestmark = pytest.mark.gpu


def test_bf16_lora_trains_on_cuda(cache_dir, tmp_path):
    from vlm_tune.train import train

    run = train(tiny_cfg(cache_dir, tmp_path / "bf16", "model.dtype=bfloat16", "eval.baselines=[]"))
    log = json.loads((run / "train_log.json").read_text())
    losses = [h["loss"] for h in log if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(x)) for x in losses)
    assert json.loads((run / "eval" / "final" / "metrics.json").read_text())["n"] == 8


def test_qlora_trains_on_cuda(cache_dir, tmp_path):
    """The shipped 2.2B recipe's combination: 4-bit base + checkpointing + length grouping."""
    from vlm_tune.train import train

    run = train(
        tiny_cfg(
            cache_dir,
            tmp_path / "q",
            "train.method=qlora",
            "train.gradient_checkpointing=true",
            "train.group_by_length=true",
            "model.dtype=bfloat16",
            "eval.baselines=[]",
            "eval.at_end=false",
        )
    )
    assert (run / "final" / "adapter_model.safetensors").is_file()


def test_batched_generation_matches_on_cuda(lora_run):
    from vlm_tune.config import load_config
    from vlm_tune.data.collate import ChatCollator
    from vlm_tune.data.sources import load_split, prepare_split
    from vlm_tune.evaluate import generate_answers
    from vlm_tune.inference import load_for_inference

    model, processor, prompt = load_for_inference(lora_run / "final")
    model = model.cuda()
    cfg = load_config(lora_run / "config.yaml")
    prepared = prepare_split(load_split(cfg.data, "test", cfg.model.cache_dir))
    rows = [prepared.rowset.row(i) for i in prepared.indices]
    collator = ChatCollator(processor, prompt["system"], prompt["user_template"])
    assert generate_answers(model, processor, collator, rows, 1, 4) == generate_answers(
        model, processor, collator, rows, 8, 4
    )
