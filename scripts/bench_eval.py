"""Evaluation feeding, before and after, same model and rows, one run: answers/s, padding, same answers.

    python scripts/bench_eval.py [--rows 32] [--batch-size 8] [--max-new-tokens 8] [--workers auto,1]
                                 [--repeats 3] [--models smolvlm-256m,tiny] [--cache-dir .cache/vlm-tune]

* before: `generate_answers(..., workers=0, sort=False)`: every batch's images decoded, tiled and tokenized
  in this process between generations, rows batched in row order;
* after: `generate_answers(..., workers=W, sort=True)` for each W of --workers (auto: what
  `vlm_tune.runtime.data_workers` decides here, 0 on CPU): batches made by W loader workers while the model
  generates, rows batched by prompt length.

Models (random weights, offline): smolvlm-256m is the SmolVLM-256M-Instruct rehearsal stand-in
(`vlm_tune.standins.rehearsal`: tiny dims behind the published processor at its default resolution, 2048 px cut into
512-px tiles of 64 tokens, so preprocessing dominates); tiny is builtin:tiny (64 px). Rows are the synthetic
test charts (512 px for smolvlm-256m, 64 px for tiny) squeezed to widths 1, 3/4, 1/2, 1/4 of their height in
turn (as `bench_gpu.py`'s mixed_aspect), so rows differ in tiles and prompt length as real charts do.

The arms run --repeats times, alternating (a shared CPU is noisy). Prints per model and arm: the median
answers/s (and each repeat's), the padding fraction (pad tokens / all prompt tokens of the batches) and
the after/before ratio of the medians; asserts every arm's answers, in every repeat, equal before's. The
last line is `after/before answers/s ratio: X.XX` (the first model, the first --workers value).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file, run from anywhere

import bench_harness as h  # noqa: E402
from bench_workload import mixed_aspect  # noqa: E402

STAND_IN = "HuggingFaceTB/SmolVLM-256M-Instruct"
CHART_PX = {"smolvlm-256m": 512, "tiny": 64}


def model_dir(name: str, cache_dir: str) -> str:
    """builtin:tiny, or the SmolVLM-256M stand-in built once under cache_dir/rehearsal."""
    if name == "tiny":
        return "builtin:tiny"
    from vlm_tune.standins.rehearsal import build_stand_in_model

    out = Path(cache_dir) / "rehearsal" / STAND_IN.split("/")[-1]
    if not (out / "stand_in.json").is_file():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_stand_in_model(STAND_IN, tmp)
        tmp.replace(out)
    return str(out)


def load(name: str, args: argparse.Namespace) -> tuple[Any, Any, Any, list[dict[str, Any]]]:
    """(model, processor, collator, rows) of one model, as `vlm-tune eval` loads them."""
    from vlm_tune.config import build_config
    from vlm_tune.data.collate import make_collator
    from vlm_tune.data.sources import load_split, prepare_split
    from vlm_tune.model import load_model, load_processor, resolve_model_path

    image = {"longest_edge": 64} if name == "tiny" else {}
    synthetic = {"n_train": 8, "n_test": args.rows, "seed": 0, "image_size": CHART_PX[name]}
    cfg = build_config(
        {
            "model": {
                "name_or_path": model_dir(name, args.cache_dir),
                "cache_dir": args.cache_dir,
                "image": image,
            },
            "data": {"synthetic": synthetic},
        }
    )
    path = resolve_model_path(cfg)
    processor = load_processor(path, cfg)
    model = load_model(path, cfg).eval()
    collator = make_collator(processor, cfg.prompt.system, cfg.prompt.user_template)
    prepared = prepare_split(load_split(cfg.data, "test", cfg.model.cache_dir), limit=args.rows)
    rows = mixed_aspect([prepared.rowset.row(i) for i in prepared.indices])
    return model, processor, collator, rows


def bench(name: str, args: argparse.Namespace) -> list[float]:
    """Time before and each after arm on one model, --repeats times alternating; returns the after/before
    ratios of the median rates."""
    from vlm_tune.evaluate import generate_answers, padding_fraction

    model, processor, collator, rows = load(name, args)
    generate_answers(model, processor, collator, rows[:2], 2, args.max_new_tokens, workers=0)  # warm-up
    arms = [("before", 0, False)] + [(f"after w={w}", w, True) for w in args.workers]
    stats: dict[str, dict[str, Any]] = {}
    first: dict[str, list[str]] = {}  # the first run's answers (before's): every run must give them

    def feeding(label: str, workers: int | str, sort: bool) -> Any:
        def run() -> list[str]:
            stats[label] = {}
            return generate_answers(
                model, processor, collator, rows, args.batch_size, args.max_new_tokens, workers=workers,
                sort=sort, stats=stats[label],
            )  # fmt: skip

        return run

    def same_answers(label: str, rep: int, seconds: float, answers: list[str]) -> None:
        assert answers == first.setdefault("answers", answers), (
            f"{name}: {label} answers differ from before's"
        )

    runs = h.alternate(
        {label: feeding(label, w, s) for label, w, s in arms}, args.repeats, on_run=same_answers
    )
    rates = {label: [len(rows) / seconds for seconds, _ in rs] for label, rs in runs.items()}
    median = {label: h.median(r) for label, r in rates.items()}
    for label, _, sort in arms:
        ratio = "" if label == "before" else f"  after/before {median[label] / median['before']:.2f}"
        each = ", ".join(f"{r:.2f}" for r in rates[label])
        print(
            f"{name:>13} {label:<13} workers {stats[label]['workers']}  sorted {str(sort):<5}  {len(rows)} rows: "
            f"{median[label]:7.2f} answers/s (median of {each})  padding {padding_fraction(stats[label]):.3f}"
            f"{ratio}",
            flush=True,
        )
    print(f"{name:>13} identical answers in every arm and repeat: True", flush=True)
    return [median[label] / median["before"] for label, _, _ in arms[1:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    h.add_bench_options(ap, device=False, repeats=3)
    ap.add_argument("--workers", default="auto,1", help="comma list of worker settings for the after arms")
    ap.add_argument("--models", default="smolvlm-256m,tiny")
    args = ap.parse_args()
    args.workers = [w if w == "auto" else int(w) for w in args.workers.split(",")]
    h.quiet()
    import torch

    from vlm_tune.runtime import data_workers, hardware

    torch.manual_seed(0)
    hw = hardware()
    print(
        f"machine: {hw.name}, {hw.cpus} usable CPUs ({hw.cpus_why}), torch threads {torch.get_num_threads()}; "
        f"auto workers: {data_workers('auto')[0]} ({data_workers('auto')[1]})",
        flush=True,
    )
    ratios = {name: bench(name, args) for name in args.models.split(",")}
    print(h.ratio_line("after", "before", "answers/s", ratios[args.models.split(",")[0]][0]))


if __name__ == "__main__":
    main()
