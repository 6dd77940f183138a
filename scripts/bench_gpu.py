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

Model FLOPs per step (and MFU = model FLOPs / s / the bf16 matmul peak measured in the same run): the
formula is in bench_workload.py. How a variant's steps run and are timed: bench_gpu_steps.py; timing, peak
memory, JSON and --isolate: bench_harness.py.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file, run from anywhere

import bench_harness as h  # noqa: E402
from bench_gpu_steps import model_only, run_e2e  # noqa: E402
from bench_workload import FLOPS_FORMULA, flop_params, matmul_peak_tflops  # noqa: E402

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


# ---------------------------------------------------------------------------------------------------------
# driver


def synthetic_rows(cfg: Any, n: int) -> list[dict[str, Any]]:
    from vlm_tune.data.sources import load_split

    rs = load_split(cfg.data, "train", cfg.model.cache_dir)
    return [rs.row(i) for i in range(n)]


def bench_shape(
    name: str, args: argparse.Namespace, device: str, clock: h.Budget, peak: float, report: h.JsonReport
) -> None:
    """Every variant of one shape in this process, each record added to the report as it is measured."""
    import torch

    from vlm_tune.standins.shapes import ensure_shape_model, get_shape

    shape = get_shape(name)
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
    n_rows = args.batch_size * max(args.batches, args.warmup + args.steps)
    base_cfg = make_cfg(model_dir, args.cache_dir, args, {}, n_rows, image_size)
    rows = synthetic_rows(base_cfg, args.batch_size * args.batches)
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
        estimate = default_wall or FIRST_VARIANT_S.get(name, 60)
        if vname.startswith("e2e_") and default_rate:  # data-bound: preprocessing in ov["workers"] processes
            estimate += (args.warmup + args.steps) * args.batch_size / (default_rate * max(ov["workers"], 1))
        if vname == "qlora" and device != "cuda":
            record["skipped"] = "needs CUDA (bitsandbytes 4-bit)"
        elif vname == "e2e_wN" and device != "cuda":
            record["skipped"] = "workers comparison only on a GPU machine"
        elif clock.left() < estimate:
            record["skipped"] = f"time budget: {clock.left():.0f} s left, ~{estimate:.0f} s needed"
            print(f"[bench_gpu] {name}/{label}: skipped ({record['skipped']})", flush=True)
        if "skipped" in record:
            report.add(record)
            continue

        def measure(vname: str = vname, ov: dict[str, Any] = ov) -> dict[str, Any]:
            cfg = make_cfg(model_dir, args.cache_dir, args, ov, n_rows, image_size)
            if vname.startswith("e2e_"):
                return run_e2e(cfg, model_dir, device, args)
            return model_only(cfg, model_dir, rows, ov, device, args, fp, peak, collated)

        tag = f"[bench_gpu] {name}/{label}"
        h.run_variant(record, measure, tag=tag, device=device, child=args.result is not None)
        if vname == "default" and "error" not in record:
            default_wall = record["wall_s"]
            default_rate = record.get("collate_samples_per_s_1proc")
        if "samples_per_s" in record:
            print(
                f"{tag}: {record['samples_per_s']:.2f} samples/s, "
                f"{record['tokens_per_s']:.0f} tokens/s ({record['wall_s']:.0f} s)",
                flush=True,
            )
        report.add(record)


def lever_ratio(record: dict[str, Any], results: list[dict[str, Any]]) -> float | None:
    """samples/s over the reference variant of the same shape: mixed_random for mixed_grouped, else default."""
    ref_name = "mixed_random" if record["variant"] == "mixed_grouped" else "default"
    refs = [r for r in results if r["shape"] == record["shape"] and r["variant"] == ref_name]
    return next((h.ratios(record, r, ["samples_per_s"]) for r in refs if "samples_per_s" in r), {}).get(
        "samples_per_s"
    )


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The results as a markdown table, one row per shape and variant (× ref: `lever_ratio`)."""
    f = h.fmt
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


def isolated(shape: str, args: argparse.Namespace, clock: h.Budget, peak: float) -> list[dict[str, Any]]:
    """Run each variant of one shape in a child process of this script; returns their records."""
    records = []
    for variant in args.variants:
        argv = [
            "--shape",
            shape,
            "--variants",
            variant,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ]
        argv += [
            "--batch-size",
            str(args.batch_size),
            "--batches",
            str(args.batches),
            "--cache-dir",
            args.cache_dir,
        ]
        argv += [
            "--device",
            args.device,
            "--time-budget",
            str(max(clock.left(), 1)),
            "--peak-tflops",
            str(peak),
        ]
        if args.longest_edge:
            argv += ["--longest-edge", str(args.longest_edge)]
        if args.workers is not None:
            argv += ["--workers", str(args.workers)]
        child = h.run_isolated(__file__, argv)
        print(child.stdout.strip().split("\n\n")[0], flush=True)  # the child's progress lines
        if child.result is not None:
            records += child.result["results"]
        else:
            records.append({"shape": shape, "variant": variant, "error": child.stderr[-300:]})
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default=None, help=f"comma list of shapes (default on GPU: {DEFAULT_SHAPES})")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per variant")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--longest-edge", type=int, default=None, help="resolution of all but one_tile (default: model's)"
    )
    ap.add_argument("--batches", type=int, default=2, help="distinct pre-collated batches replayed")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    ap.add_argument("--workers", type=int, default=None, help="e2e_wN workers (default min(8, cores-1))")
    ap.add_argument("--time-budget", type=float, default=420.0, help="seconds; later variants/shapes skipped")
    h.add_bench_options(ap, warmup=3, json_flag="--out", json_default="bench_gpu.json", isolate=True)
    ap.add_argument("--peak-tflops", type=float, default=None, help=argparse.SUPPRESS)  # set by --isolate
    args = ap.parse_args()
    clock = h.Budget(args.time_budget)
    device = h.resolve_device(ap, args.device)
    h.quiet()
    import torch
    import transformers

    args.dtype = "bfloat16" if device == "cuda" else "float32"
    shapes = (args.shape or (DEFAULT_SHAPES if device == "cuda" else "tiny")).split(",")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; choose from {VARIANTS}")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    name = h.device_name(device)
    peak = (
        {"tflops": args.peak_tflops, "dtype": "(parent)", "n": "-"}
        if args.peak_tflops
        else matmul_peak_tflops(device)
    )
    if args.result is None:  # an --isolate child runs one variant: its parent printed these
        print(
            f"[bench_gpu] {name}, torch {torch.__version__}, transformers {transformers.__version__}",
            flush=True,
        )
        print(
            f"[bench_gpu] matmul peak: {peak['tflops']:.1f} TFLOP/s ({peak['dtype']} {peak['n']}³)",
            flush=True,
        )
    header: dict[str, Any] = {
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
    }
    # written after every variant (a timeout keeps the rest); an --isolate child writes its parent's file
    report = h.JsonReport(args.result or args.out, header, clock)
    for shape in shapes:
        need = FIRST_VARIANT_S.get(shape, 60)
        if clock.left() < need:
            report.add({"shape": shape, "variant": "*", "skipped": f"time budget: {clock.left():.0f} s left"})
            print(f"[bench_gpu] {shape}: skipped (time budget)", flush=True)
            continue
        try:
            if args.isolate:
                for record in isolated(shape, args, clock, peak["tflops"]):
                    report.add(record)
            else:
                bench_shape(shape, args, device, clock, peak["tflops"], report)
        except Exception as err:
            report.add({"shape": shape, "variant": "*", "error": f"{type(err).__name__}: {str(err)[:300]}"})
            traceback.print_exc()
    report.write()
    print()
    print(markdown_table(report.results))
    print(f"\n[bench_gpu] wrote {report.path} in {clock.elapsed():.0f} s")


if __name__ == "__main__":
    sys.exit(main())
