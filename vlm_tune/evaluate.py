"""Answer-level evaluation: batched greedy generation through the training prompt, then scoring.

Writes `EVAL_DIR/predictions.jsonl` (id, question, gold, prediction, exact, relaxed, relaxed_strict, type,
split) and `EVAL_DIR/metrics.json` (exact_match, relaxed_accuracy, relaxed_accuracy_strict overall, per
split and per type, with counts; the library versions, torch's CUDA build and the image backend in use).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vlm_tune.data.collate import PromptCollator
from vlm_tune.metrics import (
    aggregate,
    clean_generation,
    exact_match,
    relaxed_accuracy,
    relaxed_accuracy_strict,
)


@torch.no_grad()
def generate_answers(
    model: Any,
    processor: Any,
    collator: PromptCollator,
    rows: Sequence[dict[str, Any]],
    batch_size: int = 16,
    max_new_tokens: int = 16,
    progress: str | None = None,
) -> list[str]:
    """Greedy answers for rows, batch_size at a time (left padding, KV cache).

    `rows` is any indexable sequence; only one batch of rows (and so of images) is taken at a time, so a lazy
    sequence (`LazyRows`) holds one batch of decoded images. Batches go to the model's device and run under
    autocast in its compute dtype (float32 trainable weights beside a half-precision base). `progress`: a
    label for a progress bar with answers/s (None: no bar).
    """
    from vlm_tune.progress import count_bar
    from vlm_tune.runtime import autocast, compute_dtype, model_device

    was_training = model.training
    model.eval()
    tok = processor.tokenizer
    eos = [tok.convert_tokens_to_ids(collator.eot)]
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    dtype = compute_dtype(model)
    device = model_device(model)
    answers: list[str] = []
    bar = count_bar(progress, len(rows), "answers")
    try:
        for start in range(0, len(rows), batch_size):
            chunk = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
            batch = collator.generation_batch(chunk)
            del chunk  # the decoded images live only as long as this batch
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            if "pixel_values" in batch and dtype in (torch.bfloat16, torch.float16):
                batch["pixel_values"] = batch["pixel_values"].to(dtype)
            with autocast(device, dtype):
                out = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    use_cache=True,
                    eos_token_id=eos,
                    pad_token_id=tok.pad_token_id,
                )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            for ids in new_tokens:
                answers.append(clean_generation(tok.decode(ids, skip_special_tokens=False)))
            if bar is not None:
                bar.advance(len(new_tokens))
    finally:
        if bar is not None:
            bar.stop()
    if was_training:
        model.train()
    return answers


def evaluate(
    model: Any,
    processor: Any,
    collator: PromptCollator,
    rows: Sequence[dict[str, Any]],
    out_dir: str | Path,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    extra: dict[str, Any] | None = None,
    progress: str | None = None,
    generate: Any = None,
    write: bool = True,
) -> dict[str, Any]:
    """Generate, score and write one evaluation; metrics.json records where and how fast it ran.

    Adds device, dtype (the compute dtype), rows, wall_s (generation) and answers_per_s. Rows without images
    are read for scoring when `rows` is lazy (`texts()`), so no image outlives its generation batch.
    `generate` replaces `generate_answers` (same signature: the sharded one under several processes);
    write=False returns the metrics without writing files (ranks other than 0).
    """
    from vlm_tune.runtime import compute_dtype, dtype_name, model_device, tensor_devices

    t0 = time.perf_counter()
    preds = (generate or generate_answers)(
        model, processor, collator, rows, batch_size, max_new_tokens, progress
    )
    wall = time.perf_counter() - t0
    texts = rows.texts() if hasattr(rows, "texts") else rows
    run = {
        "device": str(model_device(model)),
        "devices": tensor_devices(model),  # of every parameter and buffer, not only the first
        "dtype": dtype_name(compute_dtype(model)),
        "rows": len(preds),
        "wall_s": round(wall, 3),
        "answers_per_s": round(len(preds) / max(wall, 1e-9), 3),
    }
    records = score(texts, preds)
    if not write:
        return aggregate(records) | run | (extra or {})
    return write_eval(out_dir, records, extra=run | (extra or {}))


def score(rows: Sequence[dict[str, Any]], predictions: Sequence[str]) -> list[dict[str, Any]]:
    """One record per row: prediction against all gold answers."""
    records = []
    for row, pred in zip(rows, predictions, strict=True):
        gold = list(row["answers"])
        records.append(
            {
                "id": row["id"],
                "question": row["question"],
                "gold": gold,
                "prediction": pred,
                "exact": exact_match(pred, gold),
                "relaxed": relaxed_accuracy(pred, gold),
                "relaxed_strict": relaxed_accuracy_strict(pred, gold),
                "type": row.get("type", "all"),
                "split": row.get("split", "all"),
            }
        )
    return records


def atomic_write(path: Path, text: str) -> None:
    """Write text to path through a temp file in the same folder, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_eval(
    out_dir: str | Path, records: list[dict[str, Any]], extra: dict[str, Any] | None = None
) -> dict:
    """predictions.jsonl + metrics.json (each written atomically); returns the metrics.

    metrics.json also records the software in use (`versions.run_record`: library versions, torch_cuda,
    image_backend).
    """
    from vlm_tune.versions import run_record

    out_dir = Path(out_dir)
    metrics = aggregate(records)
    if extra:
        metrics.update(extra)
    metrics.update(run_record())
    atomic_write(out_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def majority_answers(train_rows: Sequence[dict[str, Any]], eval_rows: Sequence[dict[str, Any]]) -> list[str]:
    """The most frequent training answer of each question type (ties → alphabetical), per eval row."""
    by_type: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for r in train_rows:
        by_type[r.get("type", "all")][r["answers"][0]] += 1
        overall[r["answers"][0]] += 1

    def top(c: Counter) -> str:
        return sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]

    return [top(by_type[r.get("type", "all")] or overall) for r in eval_rows]


def comparison_table(results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of several evals side by side: overall and per type."""
    names = list(results)
    types = sorted({t for m in results.values() for t in m.get("by_type", {})})
    header = f"{'':<22}" + "".join(f"{n:>12}" for n in names)
    lines = [header, f"{'exact_match':<22}" + "".join(f"{results[n]['exact_match']:>12.3f}" for n in names)]
    lines.append(
        f"{'relaxed_accuracy':<22}" + "".join(f"{results[n]['relaxed_accuracy']:>12.3f}" for n in names)
    )
    for t in types:
        cells = "".join(
            f"{results[n].get('by_type', {}).get(t, {}).get('exact_match', float('nan')):>12.3f}"
            for n in names
        )
        lines.append(f"{'  ' + t:<22}" + cells)
    lines.append(f"{'n':<22}" + "".join(f"{results[n]['n']:>12d}" for n in names))
    return "\n".join(lines)
