"""GPU checks (skipped without CUDA), through the product's own paths: no test moves a model itself.

bf16 LoRA and fp16 full fine-tuning (fp32 trainable weights under the grad scaler), 4-bit QLoRA trained and then
evaluated on its 4-bit base, baselines and generation on the GPU.
"""

import json

import pytest
import torch

from .conftest import tiny_cfg

pytestmark = pytest.mark.gpu


def _metrics(run, name):
    return json.loads((run / "eval" / name / "metrics.json").read_text())


def _finite_losses(run):
    log = json.loads((run / "train_log.json").read_text())
    losses = [h["loss"] for h in log if "loss" in h]
    return bool(losses) and all(torch.isfinite(torch.tensor(x)) for x in losses)


def test_auto_dtype_lora_trains_and_evaluates_on_cuda(cache_dir, tmp_path):
    """model.dtype auto (bf16 on Ampere+, fp16 before), baselines untrained + majority, eval during training."""
    from vlm_tune.runtime import hardware
    from vlm_tune.train import train

    run = train(tiny_cfg(cache_dir, tmp_path / "auto", "eval.every_steps=2", "eval.subset_size=4"))
    assert _finite_losses(run)
    expected = "bfloat16" if hardware().bf16 else "float16"
    for name in ("untrained", "during", "final"):
        m = _metrics(run, name)
        assert m["device"].startswith("cuda") and m["dtype"] == expected, (name, m["device"], m["dtype"])
    assert _metrics(run, "final")["n"] == 8


def test_fp16_full_finetune_trains_on_cuda(cache_dir, tmp_path):
    """float16 base + full fine-tuning: trainable weights are fp32, so the grad scaler can unscale them."""
    from vlm_tune.train import train

    run = train(tiny_cfg(cache_dir, tmp_path / "fp16", "model.dtype=float16", "train.method=full"))
    assert _finite_losses(run)
    assert _metrics(run, "final")["device"].startswith("cuda")


def test_qlora_trains_and_evaluates_on_its_4bit_base_on_cuda(cache_dir, tmp_path):
    """The shipped 2.2B recipe's combination: 4-bit base + checkpointing + length grouping; then `vlm-tune eval`."""
    from vlm_tune.inference import load_for_inference, run_eval
    from vlm_tune.train import train

    cfg = tiny_cfg(
        cache_dir,
        tmp_path / "q",
        "train.method=qlora",
        "train.gradient_checkpointing=true",
        "train.group_by_length=true",
    )
    run = train(cfg)
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert _metrics(run, "untrained")["device"].startswith("cuda")
    model, _, _ = load_for_inference(run / "final")
    assert any(p.__class__.__name__ == "Params4bit" for p in model.parameters())
    assert next(model.parameters()).device.type == "cuda"
    m = run_eval(cfg, name="cli")
    assert m["device"].startswith("cuda") and m["n"] == 8


def test_batched_generation_matches_on_cuda(lora_run):
    from vlm_tune.config import load_config
    from vlm_tune.data.collate import ChatCollator
    from vlm_tune.data.sources import LazyRows, load_split, prepare_split
    from vlm_tune.evaluate import generate_answers
    from vlm_tune.inference import load_for_inference

    # float32: batched and one-at-a-time greedy answers agree exactly (half precision may flip near-ties)
    model, processor, prompt = load_for_inference(lora_run / "final", "float32")
    assert next(model.parameters()).device.type == "cuda"
    cfg = load_config(lora_run / "config.yaml")
    rows = LazyRows.of(prepare_split(load_split(cfg.data, "test", cfg.model.cache_dir)))
    collator = ChatCollator(processor, prompt["system"], prompt["user_template"])
    assert generate_answers(model, processor, collator, rows, 1, 4) == generate_answers(
        model, processor, collator, rows, 8, 4
    )


def test_qwen_stand_in_trains_and_evaluates_on_cuda(cache_dir, tmp_path):
    """A family besides SmolVLM (Qwen2.5-VL: flattened patches, the projector inside the vision tower) through
    train + baselines + eval in the auto dtype; every parameter and buffer of every evaluation on the GPU."""
    from vlm_tune.families import all_families
    from vlm_tune.runtime import hardware
    from vlm_tune.train import train

    qwen = next(f for f in all_families() if f.name == "qwen2.5-vl")
    model_dir = qwen.build_stand_in(tmp_path / "qwen")
    run = train(tiny_cfg(cache_dir, tmp_path / "run", f"model.name_or_path={model_dir}", "train.max_steps=3"))
    assert _finite_losses(run)
    expected = "bfloat16" if hardware().bf16 else "float16"
    for name in ("untrained", "final"):
        m = _metrics(run, name)
        assert m["devices"] and all(d.startswith("cuda") for d in m["devices"]), (name, m["devices"])
        assert m["dtype"] == expected
