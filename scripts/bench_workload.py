"""What a bench step costs and is fed: model FLOPs of a training step, the matmul peak, batch shapes, mixed-aspect
rows, and vlm-tune's trainer wired as `vlm_tune.train` wires it.

Used by bench_gpu.py (MFU, tokens, padding per variant, the e2e variants), bench_train.py (the vlm-tune arm)
and bench_eval.py (mixed-aspect rows).

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
The matmul peak is measured in the same run: bf16 8192³ matmuls (TFLOP/s), float32 2048³ on CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file, run from anywhere

from bench_harness import time_repeats  # noqa: E402

IGNORE = -100
FLOPS_FORMULA = (
    "vision 2*N_v*patches + 4*L_v*d_v*P^2*tiles (x1 frozen, matmul x2 / attention x3 in the graph); "
    "connector 2*N_c*image_tokens (x1 frozen vision, x2 otherwise); decoder matmul 2*(N_layers*T+N_head*T_head) x2 "
    "(forward + activation grads; frozen base weights) + attention 4*L*d*sum(len^2) x3"
)


def matmul_peak_tflops(device: str) -> dict[str, Any]:
    """Best-of-3 TFLOP/s of a square matmul loop (after one untimed): bf16 8192³ on a GPU, float32 2048³ on CPU."""
    import torch

    n, dtype, iters = (8192, torch.bfloat16, 40) if device == "cuda" else (2048, torch.float32, 4)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def loop() -> None:
        for _ in range(iters):
            a @ b

    seconds = time_repeats(loop, warmup=1, repeats=3, device=device)
    best = 2 * n**3 * iters / min(seconds) / 1e12
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


def mixed_aspect(rows: list[dict]) -> list[dict]:
    """The same charts squeezed to widths 1, 3/4, 1/2, 1/4 of their height in turn (rows differ in tiles)."""
    out = []
    for i, row in enumerate(rows):
        img = row["images"][0]
        w = max(16, img.height * (4 - i % 4) // 4)
        out.append({**row, "images": [img.resize((w, img.height))]})
    return out


def vlm_trainer(
    cls: type, cfg: Any, model: Any, out_dir: Path, split: Any, collator: Any, processor: Any, timer: Any,
    **kwargs: Any,
) -> Any:  # fmt: skip
    """A `VlmTrainer` (or subclass) on a prepared split, as `vlm_tune.train` wires it, saving nothing."""
    from vlm_tune.data.sources import RowDataset
    from vlm_tune.trainer import training_arguments

    targs = training_arguments(cfg, out_dir)
    targs.save_strategy = "no"
    return cls(
        model=model,
        args=targs,
        train_dataset=RowDataset(split),
        data_collator=collator,
        processing_class=processor,
        callbacks=[timer],
        **kwargs,
    )
