"""The harnesses' own result files, written from an evaluation's records (rescoring: `vlm_tune.rescore`).

`--export lmms-eval` writes `EVAL_DIR/lmms-eval/`:
- `{date}_samples_chartqa.jsonl`: one line per row as lmms-eval's `--log_samples` does (its
  `loggers/evaluation_tracker.py`, lmms-eval 0.7.3): `doc_id` (the row's index in the evaluated split),
  `doc` ({question, answer, type}), `target` (the first gold answer: lmms-eval's ChartQA docs have one),
  `input` (the user text), `resps` ([[response]]), `filtered_resps` ([response]), and the per-sample metrics
  `relaxed_overall` plus `relaxed_human_split` or `relaxed_augmented_split` (its `chartqa_process_results`:
  type `human_test` is the human split, any other type the augmented one).
- `{date}_results.json`: `results.chartqa` with `relaxed_overall,none`, `relaxed_human_split,none`,
  `relaxed_augmented_split,none` (means in [0, 1], a split only when it has rows), `n-samples`, the task's
  generation settings, and `vlm_tune` (the protocol that generated the responses).
The response is lmms-eval's view of the generation: the raw text, special tokens removed, not stripped.

`--export vlmevalkit` writes `EVAL_DIR/vlmevalkit/`:
- `vlm-tune_ChartQA_TEST.tsv`: VLMEvalKit's prediction table (`{model}_{dataset}` naming), every cell quoted:
  `index` (= doc_id), `question`, `answer` (the gold text; several as a Python list, which VLMEvalKit
  evaluates), `split` (`test_human` / `test_augmented` as in its ChartQA_TEST; other splits by name),
  `prediction` (the raw text, special tokens removed, stripped). Its evaluator reads the table with pandas, which
  turns number-like cells into numbers ("0.50" is scored as "0.5"); vlm-tune writes the text unchanged.
- `vlm-tune_ChartQA_TEST_acc.csv`: its result table: one column per split and `Overall` (percent).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vlm_tune.errors import UserError
from vlm_tune.files import atomic_write
from vlm_tune.metrics import lmms_eval_relaxed, vlmevalkit_answer_cell, vlmevalkit_relaxed
from vlm_tune.protocols import PROTOCOLS

LMMS_TYPES = {"human": "human_test", "augmented": "augmented_test"}  # lmms-lab/ChartQA's `type` values
VLMEVALKIT_SPLITS = {"human": "test_human", "augmented": "test_augmented"}  # ChartQA_TEST's `split` values


def _raw(record: dict[str, Any], special: Sequence[str]) -> str:
    """The generation as a harness decodes it (special tokens skipped); the prediction where none was kept."""
    raw = record.get("raw", record["prediction"])
    for token in special:
        raw = raw.replace(token, "")
    return raw


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _write(path: Path, text: str) -> None:
    atomic_write(path, text)


def export_lmms_eval(out_dir: Path, records: list[dict[str, Any]], metrics: dict[str, Any]) -> list[Path]:
    """lmms-eval's samples JSONL and results JSON for these records (see the module docstring)."""
    protocol = metrics.get("protocol") or {}
    template = protocol.get("user_template") or "{question}"
    special = metrics.get("special_tokens_in_raw") or []
    new_tokens = (protocol.get("decoding") or {}).get("max_new_tokens")
    date_id = datetime.now(UTC).strftime("%Y%m%d_%H%M%S")
    lines, buckets = [], {"relaxed_overall": [], "relaxed_human_split": [], "relaxed_augmented_split": []}
    for k, r in enumerate(records):
        target = r["gold"][0] if r["gold"] else ""
        doc_type = LMMS_TYPES.get(r.get("split"), r.get("split"))
        response = PROTOCOLS["lmms-eval"].post(_raw(r, special))
        s = lmms_eval_relaxed(response, r["gold"])
        split_key = "relaxed_human_split" if doc_type == "human_test" else "relaxed_augmented_split"
        buckets["relaxed_overall"].append(s)
        buckets[split_key].append(s)
        sample = {
            "doc_id": r.get("doc_id", k),
            "doc": {"question": r["question"], "answer": target, "type": doc_type},
            "target": target,
            "input": template.format(question=r["question"]),
            "resps": [[response]],
            "filtered_resps": [response],
            "relaxed_overall": s,
            split_key: s,
        }
        lines.append(json.dumps(sample, ensure_ascii=False) + "\n")
    folder = Path(out_dir) / "lmms-eval"
    for stale in [*folder.glob("*_samples_chartqa.jsonl"), *folder.glob("*_results.json")]:
        stale.unlink()  # an earlier export of this evaluation directory: its files would no longer match
    samples = folder / f"{date_id}_samples_chartqa.jsonl"
    _write(samples, "".join(lines))
    task = {"alias": "chartqa"} | {f"{k},none": _mean(v) for k, v in buckets.items() if v}
    results = {
        "results": {"chartqa": task},
        "n-samples": {"chartqa": {"original": len(records), "effective": len(records)}},
        "configs": {"chartqa": {"generation_kwargs": {"max_new_tokens": new_tokens, "do_sample": False}}},
        "vlm_tune": {"protocol": protocol, "note": "responses generated by vlm-tune under this protocol"},
        "date": date_id,
    }
    path = folder / f"{date_id}_results.json"
    _write(path, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return [samples, path]


def export_vlmevalkit(
    out_dir: Path, records: list[dict[str, Any]], metrics: dict[str, Any], model: str = "vlm-tune"
) -> list[Path]:
    """VLMEvalKit's ChartQA_TEST prediction table and result table for these records."""
    special = metrics.get("special_tokens_in_raw") or []
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n")
    writer.writerow(["index", "question", "answer", "split", "prediction"])
    by_split: dict[str, list[float]] = {}
    for k, r in enumerate(records):
        split = VLMEVALKIT_SPLITS.get(r.get("split"), str(r.get("split")))
        prediction = PROTOCOLS["vlmevalkit"].post(_raw(r, special))
        writer.writerow(
            [r.get("doc_id", k), r["question"], vlmevalkit_answer_cell(r["gold"]), split, prediction]
        )
        by_split.setdefault(split, []).append(vlmevalkit_relaxed(prediction, r["gold"]))
    folder = Path(out_dir) / "vlmevalkit"
    table = folder / f"{model}_ChartQA_TEST.tsv"
    _write(table, buf.getvalue())
    scores = {s: 100 * _mean(v) for s, v in sorted(by_split.items())}
    scores["Overall"] = 100 * _mean([x for v in by_split.values() for x in v]) if records else 0.0
    acc = io.StringIO()
    acc_writer = csv.writer(acc, lineterminator="\n")
    acc_writer.writerow(list(scores))
    acc_writer.writerow([f"{v:.4f}" for v in scores.values()])
    acc_path = folder / f"{model}_ChartQA_TEST_acc.csv"
    _write(acc_path, acc.getvalue())
    return [table, acc_path]


def write_exports(
    out_dir: str | Path, records: list[dict[str, Any]], metrics: dict[str, Any], harnesses: Sequence[str]
) -> list[str]:
    """Each harness's files (paths relative to out_dir, for metrics.json `exports`)."""
    writers = {"lmms-eval": export_lmms_eval, "vlmevalkit": export_vlmevalkit}
    written: list[Path] = []
    for name in dict.fromkeys(harnesses):
        if name not in writers:
            raise UserError(f"eval.export: unknown harness {name!r}; use {' or '.join(writers)}")
        written += writers[name](Path(out_dir), records, metrics)
    return [str(p.relative_to(out_dir)) for p in written]
