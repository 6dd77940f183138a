"""GPU training benchmark of the speed levers, on random-init models with the published SmolVLM shapes.

    python scripts/bench_gpu.py [--shape smolvlm-256m,smolvlm-2.2b] [--steps 10] [--warmup 3] [--batch-size 8]
                                [--time-budget 420] [--cache-dir .cache/vlm-tune] [--out bench_gpu.json]
    python scripts/bench_gpu.py --shape tiny --steps 2        # CPU smoke run (a minute)
    python scripts/bench_gpu.py --shape tiny --isolate        # CPU, one process per variant: peak RSS each

No network: the models are built locally by `vlm_tune.standins.shapes` (cached under --cache-dir/shapes/NAME), the
data is synthetic charts at the tile size (512 px for 256M, 384 px for 2.2B, 64 px for tiny).

Measured per shape (bf16 weights + autocast + sdpa on a GPU; float32 on CPU), each variant changing one
thing from `default` (LoRA r 8 on decoder + connector, vision tower frozen, processor's default resolution,
no gradient checkpointing):

  default       resolution as the model ships it (256M: 512-px chart → 2048 px → 4×4 tiles + global view)
  one_tile      longest_edge = tile, do_image_splitting False: 1 tile (64 / 81 image tokens per chart)
  gc_on         gradient checkpointing as vlm-tune enables it (`vlm_tune.model.enable_gradient_checkpointing`:
                non-reentrant, without input-grad hooks): the frozen vision tower stays out of the graph
  gc_hf_hooks   gradient checkpointing enabled the way transformers' Trainer does it: its
                `enable_input_require_grads` hooks every sub-model's input embeddings, the vision tower's patch
                embeddings included, so the frozen tower joins the autograd graph (what vlm-tune avoids)
  full_logits   train.supervised_logits_only false: vocabulary logits at every position (as the model's own
                loss does) instead of only where the next token is supervised
  vision_lora   LoRA also on the vision tower, so the tower is in the autograd graph (vs frozen: no graph)
  qlora         4-bit NF4 base (bitsandbytes; CUDA only)
  eager_attn    attn_implementation eager instead of sdpa
  mixed_random  charts of mixed aspect ratio (so rows differ in tiles and tokens), batched in random order
  mixed_grouped the same rows batched by length (`vlm_tune.trainer.LengthGroupedSampler`); compare the two
  e2e_wN        the real `VlmTrainer` path (collator in a DataLoader, N workers): includes image preprocessing;
                reports preprocessing charts/s of one process (= one worker) and the fraction of step time the
                loop waited for its next batch (data_wait_fraction: near 1 = data-bound)

Variants other than e2e_* time the model only: a few batches are collated once (the time that takes is
reported as "CPU collate samples/s", one process), moved to the device, and replayed for warmup + steps
optimizer steps (AdamW, grad clipping 1.0, like the Trainer). Peak memory is
torch.cuda.max_memory_allocated over the steps: weights, optimizer state, activations and the (few hundred
MB of) pre-collated batches. On CPU, --isolate runs each variant in its own process and reports that
process's peak RSS (model, optimizer, activations, libraries). A variant that fails (e.g. out of memory)
is recorded with its error and the run goes on. Variants that would not fit in --time-budget are skipped.

Model FLOPs per step (MFU = model FLOPs / s / measured bf16 matmul peak; GC recompute is not counted):
  vision tower   F_v = 2·N_v·patches + 4·L_v·d_v·P²·tiles (N_v: matmul params incl. patch embedding,
                 P: patches per tile). Out of the autograd graph: forward only. In the graph (vision_lora,
                 gc_hf_hooks; read from a hook on the tower's output): matmuls 2·F (forward + activation grads),
                 attention 3·F.
  connector      F_c = 2·N_c·image_tokens; 1·F frozen-vision (its input needs no grad), 2·F otherwise.
  decoder        F_d = 2·N_layers·T + 2·N_lm_head·T_head + 4·L·d_attn·Σ len_b²: matmuls 2·F_d (base weights
                 are frozen, so backward computes activation grads only = 4·N·T in all, not 6·N·T), attention
                 3·F. LoRA weight grads (<1 %) are ignored. T = non-pad tokens (image tokens included);
                 T_head = supervised tokens (logits only there, the default) or T (full_logits).
The matmul peak is measured here: bf16 8192³ matmuls (TFLOP/s), float32 2048³ on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

IGNORE = -100
DEFAULT_SHAPES = "smolvlm-256m,smolvlm-2.2b"
# in priority order: when the time budget runs short, the last ones are skipped
VARIANTS = (
    "default",
    "one_tile",
    "gc_on",
    "gc_hf_hooks",
    "full_logits",
    "qlora",
    "vision_lora",
    "mixed_random",
    "mixed_grouped",
    "e2e_wN",
    "e2e_w0",
    "eager_attn",
)
# rough wall time of one shape's first variant (build + data + load + steps), for the budget check
FIRST_VARIANT_S = {"tiny": 10, "smolvlm-256m": 60, "smolvlm-2.2b": 150}
FLOPS_FORMULA = (
    "vision 2*N_v*patches + 4*L_v*d_v*P^2*tiles (x1 frozen, matmul x2 / attention x3 in the graph); "
    "connector 2*N_c*image_tokens (x1 frozen vision, x2 otherwise); decoder matmul 2*(N_layers*T+N_head*T_head) x2 "
    "(forward + activation grads; frozen base weights) + attention 4*L*d*sum(len^2) x3"
)


def _quiet() -> None:
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore")
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class Clock:
    def __init__(self, budget: float) -> None:
        self.t0 = time.perf_counter()
        self.budget = budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------
# peak and FLOPs


def matmul_peak_tflops(device: str) -> dict[str, Any]:
    """Best-of-3 TFLOP/s of a square matmul loop: bf16 8192³ on a GPU, float32 2048³ on CPU."""
    import torch

    n, dtype, iters = (8192, torch.bfloat16, 40) if device == "cuda" else (2048, torch.float32, 4)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        _sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t) / 1e12)
    del a, b
    return {"tflops": best, "n": n, "dtype": str(dtype).replace("torch.", "")}


def flop_params(config: Any) -> dict[str, Any]:
    """Matmul parameter counts and dims of an Idefics3 config (analytic; same for 4-bit weights)."""
    v, t = config.vision_config, config.text_config
    dv, s = v.hidden_size, config.scale_factor
    patches = (v.image_size // v.patch_size) ** 2
    hd = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    dt = t.hidden_size
    layer = 2 * dt * t.num_attention_heads * hd + 2 * dt * t.num_key_value_heads * hd
    layer += 3 * dt * t.intermediate_size
    return {
        "N_v": v.num_hidden_layers * (4 * dv * dv + 2 * dv * v.intermediate_size) + 3 * v.patch_size**2 * dv,
        "L_v": v.num_hidden_layers,
        "d_v": dv,
        "P": patches,
        "N_c": dv * s * s * dt,
        "tokens_per_tile": patches // (s * s),
        "N_d": t.num_hidden_layers * layer,
        "N_head": t.vocab_size * dt,
        "L": t.num_hidden_layers,
        "d_attn": t.num_attention_heads * hd,
    }


def batch_stats(batch: dict[str, Any]) -> dict[str, Any]:
    """Tiles (real images after splitting), per-row lengths and supervised tokens of one collated batch."""
    pv = batch["pixel_values"]
    per_image = pv.shape[2:].numel()
    tiles = int(((pv == 0).flatten(2).sum(-1) != per_image).sum())
    lengths = batch["attention_mask"].sum(1).tolist()
    return {
        "rows": int(batch["input_ids"].shape[0]),
        "tiles": tiles,
        "lengths": [int(x) for x in lengths],
        "supervised": int((batch["labels"] != IGNORE).sum()),
    }


def step_flops(fp: dict[str, Any], st: dict[str, Any], vision_in_graph: bool, head_tokens: int) -> float:
    """Model FLOPs of one training step on this batch (formula in the module docstring)."""
    f_v = 2 * fp["N_v"] * fp["P"] * st["tiles"] + 4 * fp["L_v"] * fp["d_v"] * fp["P"] ** 2 * st["tiles"]
    f_v_matmul = 2 * fp["N_v"] * fp["P"] * st["tiles"]
    f_c = 2 * fp["N_c"] * fp["tokens_per_tile"] * st["tiles"]
    tokens = sum(st["lengths"])
    f_d_matmul = 2 * fp["N_d"] * tokens + 2 * fp["N_head"] * head_tokens
    f_d_attn = 4 * fp["L"] * fp["d_attn"] * sum(n * n for n in st["lengths"])
    if vision_in_graph:
        vision = 2 * f_v_matmul + 3 * (f_v - f_v_matmul) + 2 * f_c
    else:
        vision = f_v + f_c
    return vision + 2 * f_d_matmul + 3 * f_d_attn


# ---------------------------------------------------------------------------------------------------------
# variants


def variant_overrides(name: str, shape: Any) -> dict[str, Any]:
    """What a variant changes in the config (relative to default)."""
    one_tile = {"longest_edge": shape.tile_size, "tile_size": shape.tile_size, "do_image_splitting": False}
    return {
        "default": {},
        "one_tile": {"image": one_tile},
        "gc_on": {"gradient_checkpointing": True},
        "gc_hf_hooks": {"gradient_checkpointing": True, "hf_hooks": True},
        "full_logits": {"supervised_logits_only": False},
        "mixed_random": {"mixed": "random"},
        "mixed_grouped": {"mixed": "grouped"},
        "vision_lora": {"lora_targets": ["decoder", "projector", "vision"]},
        "qlora": {"method": "qlora"},
        "e2e_w0": {"workers": 0},
        "e2e_wN": {"workers": None},  # filled in from --workers
        "eager_attn": {"attn": "eager"},
    }[name]


def make_cfg(
    model_dir: str, cache_dir: str, args: argparse.Namespace, ov: dict[str, Any], n_rows: int, image_size: int
) -> Any:
    from vlm_tune.config import build_config

    return build_config(
        {
            "run": {"output_dir": str(Path(tempfile.gettempdir()) / "bench-gpu-run"), "seed": 0},
            "model": {
                "name_or_path": model_dir,
                "cache_dir": cache_dir,
                "dtype": args.dtype,
                "attn_implementation": ov.get("attn", "sdpa"),
                "image": ov.get("image", {"longest_edge": args.longest_edge} if args.longest_edge else {}),
            },
            "data": {
                "synthetic": {"n_train": n_rows, "n_test": 8, "image_size": image_size, "seed": 0},
            },
            "lora": {"targets": ov.get("lora_targets", ["decoder", "projector"])},
            "train": {
                "method": ov.get("method", "lora"),
                "batch_size": args.batch_size,
                "max_steps": args.warmup + args.steps,
                "logging_steps": 1,
                "save_steps": args.warmup + args.steps + 1,
                "max_length": 8192,
                "gradient_checkpointing": ov.get("gradient_checkpointing", False),
                "supervised_logits_only": ov.get("supervised_logits_only", True),
                "dataloader_num_workers": ov.get("workers") or 0,
            },
            "logging": {"progress": False},
        }
    )


def _vision_hook(model: Any) -> tuple[dict[str, Any], Any]:
    """Records whether the vision tower's output is part of the autograd graph."""
    seen: dict[str, Any] = {}
    vision = next(m for n, m in model.named_modules() if n.endswith("model.vision_model"))

    def hook(module: Any, inputs: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        seen["vision_output_requires_grad"] = bool(hidden.requires_grad)

    return seen, vision.register_forward_hook(hook)


def mixed_aspect(rows: list[dict]) -> list[dict]:
    """The same charts squeezed to widths 1, 3/4, 1/2, 1/4 of their height in turn (rows differ in tiles)."""
    out = []
    for i, row in enumerate(rows):
        img = row["images"][0]
        w = max(16, img.height * (4 - i % 4) // 4)
        out.append({**row, "images": [img.resize((w, img.height))]})
    return out


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
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    weights_mb = torch.cuda.memory_allocated() / 2**20 if device == "cuda" else None
    losses, t0, flops, tokens, sup = [], None, 0.0, 0, 0
    vision_in_graph = None  # read from the hook after the first forward
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            _sync(device)
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
    _sync(device)
    dt = time.perf_counter() - t0
    handle.remove()
    out = {
        "samples_per_s": args.steps * cfg.train.batch_size / dt,
        "tokens_per_s": tokens / dt,
        "supervised_tokens_per_s": sup / dt,
        "step_s": dt / args.steps,
        "model_tflops_per_s": flops / dt / 1e12,
        "model_tflop_per_sample": flops / (args.steps * cfg.train.batch_size) / 1e12,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
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
    import torch
    from transformers import TrainerCallback

    from vlm_tune.data.collate import ChatCollator
    from vlm_tune.data.sources import RowDataset, load_split, prepare_split
    from vlm_tune.model import load_model, load_processor, setup_training
    from vlm_tune.trainer import VlmTrainer, training_arguments

    class Timer(TrainerCallback):
        """Step ends, and step begins: the gap between a step's end and the next one's begin is the time the
        loop waited for its next batch (DataLoader: preprocessing in the workers, or in-process with 0)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.begins: list[float] = []

        def on_step_begin(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            self.begins.append(time.perf_counter())

        def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            _sync(device)
            self.times.append(time.perf_counter())

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
        targs = training_arguments(cfg, Path(tmp))
        targs.save_strategy = "no"
        timer = Timer()
        trainer = VlmTrainer(
            model=model,
            args=targs,
            train_dataset=RowDataset(split),
            data_collator=collator,
            processing_class=processor,
            callbacks=[timer],
            supervised_logits_only=cfg.train.supervised_logits_only,
        )
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    times = timer.times
    w = min(args.warmup, len(times) - 1)
    dt = times[-1] - times[w - 1] if w >= 1 else times[-1] - times[0]
    steps = len(times) - max(w, 1)
    tok = [split.tokens[i] for i in range(len(split.tokens))]
    per_sample = sum(t["total"] for t in tok) / max(len(tok), 1)
    sup = sum(t["supervised"] for t in tok) / max(len(tok), 1)
    n = steps * cfg.train.batch_size
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    first = max(w, 1)  # waits before timed steps: begin of step k minus end of step k-1
    waits = [timer.begins[k] - times[k - 1] for k in range(first, min(len(times), len(timer.begins)))]
    out = {
        "preprocess_charts_per_s_per_worker": preprocess_rate,
        "data_wait_fraction": sum(waits) / dt if waits else None,
        "samples_per_s": n / dt,
        "tokens_per_s": n * per_sample / dt,
        "supervised_tokens_per_s": n * sup / dt,
        "step_s": dt / steps,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "final_loss": losses[-1] if losses else None,
        "dataloader_num_workers": cfg.train.dataloader_num_workers,
    }
    del trainer, model
    return out


# ---------------------------------------------------------------------------------------------------------
# driver


def synthetic_rows(cfg: Any, n: int) -> list[dict[str, Any]]:
    from vlm_tune.data.sources import load_split

    rs = load_split(cfg.data, "train", cfg.model.cache_dir)
    return [rs.row(i) for i in range(n)]


def bench_shape(
    name: str, args: argparse.Namespace, device: str, clock: Clock, peak: float, sink: Any
) -> list[dict[str, Any]]:
    import torch

    from vlm_tune.standins.shapes import ensure_shape_model, get_shape

    shape = get_shape(name)
    results: list[dict[str, Any]] = []
    t_build = time.perf_counter()
    model_dir = str(
        ensure_shape_model(
            name,
            Path(args.cache_dir) / "shapes" / name,
            dtype="bfloat16",  # storage only: load_model casts to the compute dtype
            device=device if device == "cuda" else None,
        )
    )
    build_s = time.perf_counter() - t_build
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"[bench_gpu] {name}: model ready in {build_s:.0f} s ({model_dir})", flush=True)
    image_size = 64 if name == "tiny" else shape.tile_size
    n_batches = args.batches
    n_rows = args.batch_size * max(n_batches, args.warmup + args.steps)
    base_cfg = make_cfg(model_dir, args.cache_dir, args, {}, n_rows, image_size)
    rows = synthetic_rows(base_cfg, args.batch_size * n_batches)
    from transformers import AutoConfig

    fp = flop_params(AutoConfig.from_pretrained(model_dir))
    collated: dict[str, tuple[list, float]] = {}
    default_wall = default_rate = None
    from vlm_tune.runtime import usable_cpus  # the affinity set and cgroup quota, not the host's cores

    workers_n = args.workers if args.workers is not None else max(1, min(8, usable_cpus()[0] - 1))
    for vname in args.variants:
        ov = dict(variant_overrides(vname, shape))
        if vname == "e2e_wN":
            ov["workers"] = workers_n
        label = f"e2e_w{workers_n}" if vname == "e2e_wN" else vname
        record: dict[str, Any] = {"shape": name, "variant": label, "device": device}
        if vname == "qlora" and device != "cuda":
            record["skipped"] = "needs CUDA (bitsandbytes 4-bit)"
            results.append(record)
            sink(record)
            continue
        if vname == "e2e_wN" and device != "cuda":
            record["skipped"] = "workers comparison only on a GPU machine"
            results.append(record)
            sink(record)
            continue
        estimate = default_wall or FIRST_VARIANT_S.get(name, 60)
        if vname.startswith("e2e_") and default_rate:  # data-bound: preprocessing in ov["workers"] processes
            estimate += (args.warmup + args.steps) * args.batch_size / (default_rate * max(ov["workers"], 1))
        if clock.left() < estimate:
            record["skipped"] = f"time budget: {clock.left():.0f} s left, ~{estimate:.0f} s needed"
            results.append(record)
            sink(record)
            print(f"[bench_gpu] {name}/{label}: skipped ({record['skipped']})", flush=True)
            continue
        t_var = time.perf_counter()
        try:
            cfg = make_cfg(model_dir, args.cache_dir, args, ov, n_rows, image_size)
            if vname.startswith("e2e_"):
                record.update(run_e2e(cfg, model_dir, device, args))
            else:
                key = json.dumps([cfg.model.image.model_dump(), ov.get("mixed")], sort_keys=True)
                if key not in collated:
                    src = mixed_aspect(rows) if ov.get("mixed") else rows
                    batches, rate, _ = collate_batches(cfg, model_dir, src, n_batches, ov.get("mixed"))
                    collated[key] = (batches, rate)
                batches, rate = collated[key]
                record["collate_samples_per_s_1proc"] = rate
                st = [batch_stats(b) for b in batches]
                record["tiles_per_sample"] = sum(s["tiles"] for s in st) / sum(s["rows"] for s in st)
                record["tokens_per_sample"] = sum(sum(s["lengths"]) for s in st) / sum(s["rows"] for s in st)
                padded = sum(s["rows"] * max(s["lengths"]) for s in st)
                record["padding_fraction"] = 1 - sum(sum(s["lengths"]) for s in st) / padded
                record.update(
                    run_model_only(cfg, model_dir, batches, device, args, fp, bool(ov.get("hf_hooks")))
                )
                if peak:
                    record["mfu"] = record["model_tflops_per_s"] / peak
        except Exception as err:  # OOM, a missing package: record it and go on
            record["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            record["traceback_tail"] = traceback.format_exc()[-1500:]
            print(f"[bench_gpu] {name}/{label}: FAILED {record['error']}", flush=True)
        finally:
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        record["wall_s"] = time.perf_counter() - t_var
        if args.child:  # one variant per process: the process's peak RSS is this variant's
            import resource

            record["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if vname == "default" and "error" not in record:
            default_wall = record["wall_s"]
            default_rate = record.get("collate_samples_per_s_1proc")
        if "samples_per_s" in record:
            print(
                f"[bench_gpu] {name}/{label}: {record['samples_per_s']:.2f} samples/s, "
                f"{record['tokens_per_s']:.0f} tokens/s ({record['wall_s']:.0f} s)",
                flush=True,
            )
        results.append(record)
        sink(record)
    return results


def lever_ratio(record: dict[str, Any], results: list[dict[str, Any]]) -> float | None:
    """samples/s over the reference variant of the same shape: mixed_random for mixed_grouped, else default."""
    ref_name = "mixed_random" if record["variant"] == "mixed_grouped" else "default"
    ref = next(
        (
            r
            for r in results
            if r["shape"] == record["shape"] and r["variant"] == ref_name and "samples_per_s" in r
        ),
        None,
    )
    if ref is None or "samples_per_s" not in record:
        return None
    return record["samples_per_s"] / ref["samples_per_s"]


def markdown_table(results: list[dict[str, Any]]) -> str:
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = [
        "| shape | variant | samples/s | × ref | tokens/s | supervised tok/s | tokens/sample | padding | peak GB "
        "| TFLOP/s | MFU | CPU collate samples/s (1 proc) | waiting for data | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = lever_ratio(r, results)
        note = r.get("skipped") or r.get("error") or ""
        if "vision_output_requires_grad" in r:
            note = (note + " " if note else "") + f"vision in graph: {r['vision_output_requires_grad']}"
        lines.append(
            f"| {r['shape']} | {r['variant']} | {f(r.get('samples_per_s'), '.2f')} | {f(ratio, '.2f')} "
            f"| {f(r.get('tokens_per_s'), '.0f')} "
            f"| {f(r.get('supervised_tokens_per_s'), '.1f')} | {f(r.get('tokens_per_sample'), '.0f')} "
            f"| {f(r.get('padding_fraction'), '.1%')} "
            f"| {f(r.get('peak_mem_gb') or r.get('peak_rss_gb'), '.2f')} | {f(r.get('model_tflops_per_s'), '.3g')} "
            f"| {f(r['mfu'] * 100 if r.get('mfu') is not None else None, '.1f')}{'%' if r.get('mfu') else ''} "
            f"| {f(r.get('collate_samples_per_s_1proc') or r.get('preprocess_charts_per_s_per_worker'), '.1f')} "
            f"| {f(r.get('data_wait_fraction'), '.0%')} | {note} |"
        )
    return "\n".join(lines)


def isolated(shape: str, args: argparse.Namespace, clock: Clock, peak: float) -> list[dict[str, Any]]:
    """Run each variant of one shape in a child process of this script; returns their records."""
    import subprocess

    records = []
    for variant in args.variants:
        with tempfile.TemporaryDirectory(prefix="bench-gpu-child-") as tmp:
            out = Path(tmp) / "child.json"
            cmd = [sys.executable, __file__, "--child", "--shape", shape, "--variants", variant]
            cmd += [
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--batch-size",
                str(args.batch_size),
            ]
            cmd += ["--batches", str(args.batches), "--cache-dir", args.cache_dir, "--out", str(out)]
            cmd += [
                "--device",
                args.device,
                "--time-budget",
                str(max(clock.left(), 1)),
                "--peak-tflops",
                str(peak),
            ]
            if args.longest_edge:
                cmd += ["--longest-edge", str(args.longest_edge)]
            if args.workers is not None:
                cmd += ["--workers", str(args.workers)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            print(proc.stdout.strip().split("\n\n")[0], flush=True)  # the child's progress lines
            if out.is_file():
                records += json.loads(out.read_text())["results"]
            else:
                records.append({"shape": shape, "variant": variant, "error": proc.stderr[-300:]})
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default=None, help=f"comma list of shapes (default on GPU: {DEFAULT_SHAPES})")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--longest-edge", type=int, default=None, help="resolution of all but one_tile (default: model's)"
    )
    ap.add_argument("--batches", type=int, default=2, help="distinct pre-collated batches replayed")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    ap.add_argument("--workers", type=int, default=None, help="e2e_wN workers (default min(8, cores-1))")
    ap.add_argument("--time-budget", type=float, default=420.0, help="seconds; later variants/shapes skipped")
    ap.add_argument("--cache-dir", default=".cache/vlm-tune")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--out", default="bench_gpu.json")
    ap.add_argument(
        "--isolate",
        action="store_true",
        help="each variant in its own process: peak memory per variant (peak RSS on CPU)",
    )
    ap.add_argument("--peak-tflops", type=float, default=None, help=argparse.SUPPRESS)  # set by --isolate
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    clock = Clock(args.time_budget)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    _quiet()
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    if args.device == "cuda" and device != "cuda":
        ap.error("--device cuda: no CUDA device visible")
    args.dtype = "bfloat16" if device == "cuda" else "float32"
    shapes = (args.shape or (DEFAULT_SHAPES if device == "cuda" else "tiny")).split(",")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; choose from {VARIANTS}")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"{os.cpu_count()}-core CPU"
    peak = (
        {"tflops": args.peak_tflops, "dtype": "(parent)", "n": "-"}
        if args.peak_tflops
        else matmul_peak_tflops(device)
    )
    if not args.child:  # an --isolate child runs one variant: its parent printed these
        print(
            f"[bench_gpu] {name}, torch {torch.__version__}, transformers {transformers.__version__}",
            flush=True,
        )
        print(
            f"[bench_gpu] matmul peak: {peak['tflops']:.1f} TFLOP/s ({peak['dtype']} {peak['n']}³)",
            flush=True,
        )
    report: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": args.dtype,
        "attn_implementation": "sdpa (eager_attn: eager)",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "matmul_peak": peak,
        "flops_formula": FLOPS_FORMULA,
        "time_budget_s": args.time_budget,
        "results": [],
    }
    out = Path(args.out)

    def sink(record: dict[str, Any]) -> None:  # written after every variant: a timeout keeps the rest
        report["results"].append(record)
        report["elapsed_s"] = clock.elapsed()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")

    for shape in shapes:
        need = FIRST_VARIANT_S.get(shape, 60)
        if clock.left() < need:
            sink({"shape": shape, "variant": "*", "skipped": f"time budget: {clock.left():.0f} s left"})
            print(f"[bench_gpu] {shape}: skipped (time budget)", flush=True)
            continue
        try:
            if args.isolate:
                for record in isolated(shape, args, clock, peak["tflops"]):
                    sink(record)
            else:
                bench_shape(shape, args, device, clock, peak["tflops"], sink)
        except Exception as err:
            sink({"shape": shape, "variant": "*", "error": f"{type(err).__name__}: {str(err)[:300]}"})
            traceback.print_exc()
    report["elapsed_s"] = clock.elapsed()
    out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown_table(report["results"]))
    print(f"\n[bench_gpu] wrote {out} in {clock.elapsed():.0f} s")


if __name__ == "__main__":
    sys.exit(main())
