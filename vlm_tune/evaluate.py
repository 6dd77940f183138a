"""Answer-level evaluation: batched greedy generation through the training prompt or a protocol's, then scoring.

Writes `EVAL_DIR/predictions.jsonl` (id, doc_id, question, gold, raw, prediction, exact, relaxed, relaxed_strict,
score, type, split) and `EVAL_DIR/metrics.json` (exact_match, relaxed_accuracy, relaxed_accuracy_strict and the
protocol's `score` overall, per split and per type, with counts; the protocol, image settings, library versions,
torch's CUDA build and the image backend in use).
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vlm_tune.data.collate import PromptCollator
from vlm_tune.files import atomic_write
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
    postprocess: Callable[[str], str] = clean_generation,
    workers: int | str = "auto",
    sort: bool = True,
    stats: dict[str, Any] | None = None,
) -> list[str]:
    """Greedy answers for rows, in row order, batch_size at a time (left padding, KV cache).

    `rows` is any indexable sequence; a lazy one (`LazyRows`) is decoded batch by batch in the loader's
    workers (`vlm_tune.data.feeding`: at most workers × PREFETCH batches ahead), never all at once.
    `workers`: data-loader worker processes, a number or auto, resolved by `vlm_tune.runtime.data_workers`
    (train.dataloader_num_workers). `sort`: batch rows by prompt length (less padding; the answers are the
    same); sort=False, workers=0 is the plain in-process feeding in row order. Batches go to the model's device
    and run under autocast in its compute dtype (float32 trainable weights beside a half-precision base).
    `progress`: a label for a progress bar with answers/s (None: no bar). `postprocess` turns each decoded
    continuation (special tokens kept) into the answer returned (an evaluation protocol's: `vlm_tune.protocols`).
    `stats`, when given, receives workers, prompt_tokens and pad_tokens (of the left-padded batches).
    """
    from vlm_tune.data.feeding import plan_batches, prompt_lengths, prompt_loader
    from vlm_tune.progress import count_bar
    from vlm_tune.runtime import autocast, compute_dtype, data_workers, model_device

    was_training = model.training
    model.eval()
    tok = processor.tokenizer
    eos = [tok.convert_tokens_to_ids(collator.eot)]
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    dtype = compute_dtype(model)
    device = model_device(model)
    n_workers = data_workers(workers)[0]
    lengths = prompt_lengths(processor, collator, rows) if sort else None
    batches = plan_batches(len(rows), batch_size, lengths)
    loader = prompt_loader(collator, rows, batches, n_workers, pin=device.type == "cuda")
    answers: list[str] = [""] * len(rows)
    counts = {"workers": n_workers, "prompt_tokens": 0, "pad_tokens": 0}
    bar = count_bar(progress, len(rows), "answers")
    try:
        for positions, batch in zip(batches, loader, strict=True):
            mask = batch["attention_mask"]
            counts["prompt_tokens"] += mask.numel()
            counts["pad_tokens"] += int((mask == 0).sum())
            batch = {
                k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()
            }
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
            for k, ids in zip(positions, new_tokens, strict=True):
                answers[k] = postprocess(tok.decode(ids, skip_special_tokens=False))
            if bar is not None:
                bar.advance(len(new_tokens))
    finally:
        if bar is not None:
            bar.stop()
    if stats is not None:
        stats.update(counts)
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
    protocol: str | None = None,
    export: Sequence[str] = (),
    workers: int | str = "auto",
    answer_format: str = "plain",
) -> dict[str, Any]:
    """Generate, score and write one evaluation; metrics.json records where and how fast it ran.

    Adds device, dtype (the compute dtype), rows, wall_s (generation), answers_per_s, data_workers (`workers`
    resolved: `generate_answers`) and padding_fraction (pad tokens / prompt tokens of the generation batches;
    this process's share under several). Rows without images are read for scoring when `rows` is lazy
    (`texts()`), so no image outlives its generation batch.
    `generate` replaces `generate_answers` (same signature: the sharded one under several processes);
    write=False returns the metrics without writing files (ranks other than 0).
    `protocol` (`vlm_tune.protocols`; None: vlm-tune) sets the prompt (from the collator's prompt contract),
    the decoding, the post-processing and the `score` metric, recorded in metrics.json with the image settings;
    `export` also writes those harnesses' own files (`vlm_tune.export`). `answer_format`: the run's (prompt.json;
    `vlm_tune.protocols.ANSWER_FORMATS`), where the vlm-tune protocol finds the answer in a generation.
    """
    from vlm_tune.data.collate import make_collator
    from vlm_tune.protocols import (
        cut_at_end_of_turn,
        image_settings,
        model_type_of,
        resolve,
        special_tokens_in,
    )
    from vlm_tune.runtime import compute_dtype, dtype_name, model_device, tensor_devices

    setting = resolve(
        protocol, model_type_of(model), collator.system, collator.user_template, max_new_tokens, answer_format
    )
    if (setting.system, setting.user_template) != (collator.system, collator.user_template):
        collator = make_collator(processor, setting.system, setting.user_template)
    t0 = time.perf_counter()
    feeding: dict[str, Any] = {}
    raws = (generate or generate_answers)(
        model,
        processor,
        collator,
        rows,
        batch_size,
        setting.max_new_tokens,
        progress,
        postprocess=cut_at_end_of_turn,
        workers=workers,
        stats=feeding,
    )
    wall = time.perf_counter() - t0
    texts = rows.texts() if hasattr(rows, "texts") else rows
    special = special_tokens_in(processor.tokenizer, raws)
    run = {
        "device": str(model_device(model)),
        "devices": tensor_devices(model),  # of every parameter and buffer, not only the first
        "dtype": dtype_name(compute_dtype(model)),
        "rows": len(raws),
        "wall_s": round(wall, 3),
        "answers_per_s": round(len(raws) / max(wall, 1e-9), 3),
        "data_workers": feeding.get("workers"),
        "padding_fraction": padding_fraction(feeding),
        "protocol": setting.record(),
        "image_settings": image_settings(processor),
        "special_tokens_in_raw": special,
    }
    indices = getattr(rows, "indices", None)  # LazyRows: each row's index in the evaluated split
    doc_ids = list(indices) if isinstance(indices, list) else list(range(len(raws)))
    records = score(
        texts, raws, setting.protocol, raw=True, special=special, doc_ids=doc_ids, answer_format=answer_format
    )
    if not write:
        return aggregate(records) | run | (extra or {})
    metrics = write_eval(out_dir, records, extra=run | (extra or {}))
    if export:
        from vlm_tune.export import write_exports

        metrics["exports"] = write_exports(out_dir, records, metrics, export)
        atomic_write(Path(out_dir) / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def padding_fraction(stats: dict[str, Any]) -> float | None:
    """Pad tokens / all prompt tokens of the generation batches `generate_answers` counted (None: none)."""
    if not stats.get("prompt_tokens"):
        return None
    return round(stats["pad_tokens"] / stats["prompt_tokens"], 4)


def score(
    rows: Sequence[dict[str, Any]],
    outputs: Sequence[str],
    protocol: Any = None,
    raw: bool = False,
    special: Sequence[str] = (),
    doc_ids: Sequence[int] | None = None,
    answer_format: str = "plain",
) -> list[dict[str, Any]]:
    """One record per row: prediction against all gold answers.

    `outputs` are the predictions, or (raw=True) raw generations that the protocol post-processes (kept as
    `raw`) under the run's `answer_format` (`Protocol.answer`: tagged without tags is an empty prediction that
    scores 0, as the GRPO reward pays it). `score` is the protocol's own metric (`vlm_tune.protocols`; None:
    vlm-tune); `doc_id` the row's index in the evaluated split, when given.
    """
    from vlm_tune.protocols import get_protocol

    proto = get_protocol(protocol)
    records = []
    for k, (row, out) in enumerate(zip(rows, outputs, strict=True)):
        gold = list(row["answers"])
        pred = proto.answer(out, special, answer_format) if raw else out
        found = pred is not None  # tagged without tags: nothing to score
        pred = pred if found else ""
        record: dict[str, Any] = {"id": row["id"]}
        if doc_ids is not None:
            record["doc_id"] = doc_ids[k]
        record |= {"question": row["question"], "gold": gold}
        if raw:
            record["raw"] = out
        record |= {
            "prediction": pred,
            "exact": exact_match(pred, gold) if found else 0.0,
            "relaxed": relaxed_accuracy(pred, gold) if found else 0.0,
            "relaxed_strict": relaxed_accuracy_strict(pred, gold) if found else 0.0,
            "score": proto.metric(pred, gold) if found else 0.0,
            "type": row.get("type", "all"),
            "split": row.get("split", "all"),
        }
        records.append(record)
    return records


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
