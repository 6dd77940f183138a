"""How one bench_gpu.py variant trains and is timed: the model-only step loop on pre-collated batches, and the
end-to-end path through `VlmTrainer` (image preprocessing in its DataLoader included). The variants, the
time budget and the report are in bench_gpu.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file, run from anywhere

import bench_harness as h  # noqa: E402
from bench_workload import batch_stats, mixed_aspect, step_flops, vlm_trainer  # noqa: E402


def _vision_hook(model: Any) -> tuple[dict[str, Any], Any]:
    """Records whether the vision tower's output is part of the autograd graph."""
    seen: dict[str, Any] = {}
    vision = next(m for n, m in model.named_modules() if n.endswith("model.vision_model"))

    def hook(module: Any, inputs: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        seen["vision_output_requires_grad"] = bool(hidden.requires_grad)

    return seen, vision.register_forward_hook(hook)


def collate_batches(
    cfg: Any, model_dir: str, rows: list[dict], n_batches: int, order: str | None = None
) -> tuple[list, float, Any]:
    """Collate n_batches on CPU (one process); returns batches, CPU samples/s, processor.

    order: None (rows as given), "random" (a seeded shuffle) or "grouped" (LengthGroupedSampler order).
    """
    from vlm_tune.data.collate import ChatCollator, count_tokens
    from vlm_tune.model import load_processor
    from vlm_tune.trainer import LengthGroupedSampler

    processor = load_processor(model_dir, cfg)
    collator = ChatCollator(processor, cfg.prompt.system, cfg.prompt.user_template)
    bs = cfg.train.batch_size
    rows = rows[: n_batches * bs]
    if order == "grouped":
        lengths = [count_tokens(processor, collator, r)["total"] for r in rows]
        rows = [rows[i] for i in LengthGroupedSampler(lengths, bs, seed=0)]
    elif order == "random":
        import random

        rows = random.Random(0).sample(rows, len(rows))
    t = time.perf_counter()
    batches = [collator(rows[i * bs : (i + 1) * bs]) for i in range(n_batches)]
    return batches, n_batches * bs / (time.perf_counter() - t), processor


def _gb(mb: float | None) -> float | None:
    return None if mb is None else mb / 1024


def run_model_only(
    cfg: Any,
    model_dir: str,
    batches: list,
    device: str,
    args: argparse.Namespace,
    fp: dict[str, Any],
    hf_hooks: bool = False,
) -> dict[str, Any]:
    """warmup + steps optimizer steps on pre-collated batches: the model's own throughput."""
    import torch

    from vlm_tune.model import load_model, parameter_counts, setup_training
    from vlm_tune.trainer import supervised_loss

    model = setup_training(load_model(model_dir, cfg), cfg)  # vlm-tune's checkpointing when the cfg asks
    quantized = cfg.train.method == "qlora"
    if not quantized:
        model.to(device)
    if hf_hooks:
        # as transformers' Trainer does it: enabling again adds input-grad hooks on every sub-model
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    supervised_only = cfg.train.supervised_logits_only
    model.train()
    trainable, total = parameter_counts(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.learning_rate, fused=device == "cuda")
    dtype = getattr(torch, cfg.model.dtype)
    on_device = [
        {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in b.items()}
        for b in batches
    ]
    stats = [batch_stats(b) for b in batches]
    seen, handle = _vision_hook(model)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device == "cuda" and cfg.model.dtype == "bfloat16"
        else contextlib.nullcontext()
    )
    h.reset_peak_gpu()
    weights_mb = torch.cuda.memory_allocated() / 2**20 if device == "cuda" else None
    losses, t0, flops, tokens, sup = [], None, 0.0, 0, 0
    vision_in_graph = None  # read from the hook after the first forward
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            h.sync(device)
            t0 = time.perf_counter()
        i = step % len(on_device)
        with autocast:
            loss = supervised_loss(model, on_device[i])[0] if supervised_only else model(**on_device[i]).loss
        loss.backward()
        if step == 0:
            vision_in_graph = seen.get("vision_output_requires_grad", False)
            if all(p.grad is None for p in params):
                raise RuntimeError("no trainable parameter received a gradient")
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup:
            head_tokens = stats[i]["supervised"] if supervised_only else sum(stats[i]["lengths"])
            flops += step_flops(fp, stats[i], vision_in_graph, head_tokens)
            tokens += sum(stats[i]["lengths"])
            sup += stats[i]["supervised"]
        losses.append(loss.detach())
    h.sync(device)
    dt = time.perf_counter() - t0
    handle.remove()
    out = {
        "samples_per_s": args.steps * cfg.train.batch_size / dt,
        "tokens_per_s": tokens / dt,
        "supervised_tokens_per_s": sup / dt,
        "step_s": dt / args.steps,
        "model_tflops_per_s": flops / dt / 1e12,
        "model_tflop_per_sample": flops / (args.steps * cfg.train.batch_size) / 1e12,
        "peak_mem_gb": _gb(h.peak_gpu_mb()),
        "weights_mem_gb": weights_mb / 1024 if weights_mb is not None else None,
        "trainable_params": trainable,
        "total_params": total,
        "final_loss": float(losses[-1]),
        **seen,
    }
    del model, opt, on_device, params, losses
    return out


def run_e2e(cfg: Any, model_dir: str, device: str, args: argparse.Namespace) -> dict[str, Any]:
    """The shipped path: VlmTrainer + ChatCollator in a DataLoader (image preprocessing included)."""
    from transformers import PrinterCallback

    from vlm_tune.data.collate import ChatCollator
    from vlm_tune.data.sources import RowDataset, load_split, prepare_split
    from vlm_tune.model import load_model, load_processor, setup_training
    from vlm_tune.trainer import VlmTrainer

    processor = load_processor(model_dir, cfg)
    collator = ChatCollator(processor, cfg.prompt.system, cfg.prompt.user_template, cfg.train.max_length)
    split = prepare_split(
        load_split(cfg.data, "train", cfg.model.cache_dir), "error", "error", None, processor, collator
    )
    # preprocessing alone (decode + tile + tokenize + collate), one process: what one DataLoader worker gives
    probe = RowDataset(split)
    n_probe = min(len(probe), 2 * cfg.train.batch_size)
    t0 = time.perf_counter()
    for start in range(0, n_probe, cfg.train.batch_size):
        collator([probe[i] for i in range(start, min(start + cfg.train.batch_size, n_probe))])
    preprocess_rate = n_probe / max(time.perf_counter() - t0, 1e-9)
    model = setup_training(load_model(model_dir, cfg), cfg)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-e2e-") as tmp:
        # step ends, and step begins: the gap between a step's end and the next one's begin is the time the
        # loop waited for its next batch (DataLoader: preprocessing in the workers, or in-process with 0)
        timer = h.step_timer(device)
        trainer = vlm_trainer(
            VlmTrainer, cfg, model, Path(tmp), split, collator, processor, timer,
            supervised_logits_only=cfg.train.supervised_logits_only,
        )  # fmt: skip
        trainer.remove_callback(PrinterCallback)
        h.reset_peak_gpu()
        trainer.train()
    times = timer.times
    dt, steps, first = h.timed_window(times, args.warmup)
    tok = [split.tokens[i] for i in range(len(split.tokens))]
    per_sample = sum(t["total"] for t in tok) / max(len(tok), 1)
    sup = sum(t["supervised"] for t in tok) / max(len(tok), 1)
    n = steps * cfg.train.batch_size
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    # waits before timed steps: begin of step k minus end of step k-1
    waits = [timer.begins[k] - times[k - 1] for k in range(first, min(len(times), len(timer.begins)))]
    out = {
        "preprocess_charts_per_s_per_worker": preprocess_rate,
        "data_wait_fraction": sum(waits) / dt if waits else None,
        "samples_per_s": n / dt,
        "tokens_per_s": n * per_sample / dt,
        "supervised_tokens_per_s": n * sup / dt,
        "step_s": dt / steps,
        "peak_mem_gb": _gb(h.peak_gpu_mb()),
        "final_loss": losses[-1] if losses else None,
        "dataloader_num_workers": cfg.train.dataloader_num_workers,
    }
    del trainer, model
    return out


def model_only(
    cfg: Any, model_dir: str, rows: list, ov: dict[str, Any], device: str, args: argparse.Namespace, fp: dict,
    peak: float, collated: dict[str, tuple[list, float]],
) -> dict[str, Any]:  # fmt: skip
    """A model-only variant: its batches (collated once per resolution and row order), shapes and steps."""
    key = json.dumps([cfg.model.image.model_dump(), ov.get("mixed")], sort_keys=True)
    if key not in collated:
        src = mixed_aspect(rows) if ov.get("mixed") else rows
        batches, rate, _ = collate_batches(cfg, model_dir, src, args.batches, ov.get("mixed"))
        collated[key] = (batches, rate)
    batches, rate = collated[key]
    record: dict[str, Any] = {"collate_samples_per_s_1proc": rate}
    st = [batch_stats(b) for b in batches]
    record["tiles_per_sample"] = sum(s["tiles"] for s in st) / sum(s["rows"] for s in st)
    record["tokens_per_sample"] = sum(sum(s["lengths"]) for s in st) / sum(s["rows"] for s in st)
    padded = sum(s["rows"] * max(s["lengths"]) for s in st)
    record["padding_fraction"] = 1 - sum(sum(s["lengths"]) for s in st) / padded
    record.update(run_model_only(cfg, model_dir, batches, device, args, fp, bool(ov.get("hf_hooks"))))
    if peak:
        record["mfu"] = record["model_tflops_per_s"] / peak
    return record
