"""Batched generation vs one-sample-at-a-time, same model and rows, one run.

    python scripts/bench_eval.py [--rows 64] [--batch-size 32]

Prints samples/s of each and, last, `batched/sequential samples/s ratio: X.XX`. Also checks that both
produce the same answers (greedy decoding is deterministic; batching must not change it).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--cache-dir", default=".cache/vlm-tune")
    args = ap.parse_args()
    torch.manual_seed(0)

    from vlm_tune.config import build_config
    from vlm_tune.data.collate import ChatCollator
    from vlm_tune.data.sources import load_split, prepare_split
    from vlm_tune.evaluate import generate_answers
    from vlm_tune.model import load_model, load_processor, resolve_model_path

    cfg = build_config({"model": {"cache_dir": args.cache_dir, "image": {"longest_edge": 64}}})
    path = resolve_model_path(cfg)
    processor = load_processor(path, cfg)
    model = load_model(path, cfg).eval()
    collator = ChatCollator(processor, cfg.prompt.system, cfg.prompt.user_template)
    prepared = prepare_split(load_split(cfg.data, "test", cfg.model.cache_dir), limit=args.rows)
    rows = [prepared.rowset.row(i) for i in prepared.indices]

    generate_answers(model, processor, collator, rows[:2], 2, args.max_new_tokens)  # warm-up
    results = {}
    for name, bs in (("sequential", 1), ("batched", args.batch_size)):
        t0 = time.perf_counter()
        answers = generate_answers(model, processor, collator, rows, bs, args.max_new_tokens)
        dt = time.perf_counter() - t0
        results[name] = (len(rows) / dt, answers)
        print(
            f"{name:>10}: batch {bs:>3}  {len(rows)} rows in {dt:6.2f} s  = {len(rows) / dt:8.2f} samples/s"
        )
    same = results["batched"][1] == results["sequential"][1]
    print(f"identical answers: {same}")
    print(f"batched/sequential samples/s ratio: {results['batched'][0] / results['sequential'][0]:.2f}")


if __name__ == "__main__":
    main()
