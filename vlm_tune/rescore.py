"""`vlm-tune rescore`: an evaluation's saved generations scored again under another protocol."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlm_tune.errors import UserError
from vlm_tune.evaluate import score, write_eval
from vlm_tune.export import write_exports
from vlm_tune.files import atomic_write
from vlm_tune.protocols import PROTOCOLS, check_answer_format
from vlm_tune.report import load_eval_dir


def rescore(
    eval_dir: str | Path, protocol: str, out_dir: str | Path | None = None, export: Sequence[str] = ()
) -> dict[str, Any]:
    """`vlm-tune rescore`: an evaluation's saved generations (`raw`) post-processed and scored under another
    protocol, written as a new eval directory (default EVAL_DIR-PROTOCOL). The prompt is not re-applied: the
    generations are those of the protocol recorded in metrics.json (`protocol.rescored_from` says which), their
    answers taken in the answer format recorded there (plain when absent: `vlm_tune.protocols.answer_of`)."""
    src = Path(eval_dir)
    metrics, rows = load_eval_dir(src)
    out = Path(out_dir) if out_dir else src.with_name(f"{src.name}-{protocol}")
    if out.resolve() == src.resolve():
        raise UserError(f"--out {out}: is the evaluation being rescored; pass another directory")
    special = metrics.get("special_tokens_in_raw") or []
    texts = [{"id": r["id"], "question": r["question"], "answers": r["gold"]} | _groups(r) for r in rows]
    outputs = [r.get("raw", r["prediction"]) for r in rows]
    doc_ids = [r.get("doc_id", k) for k, r in enumerate(rows)]
    generated = metrics.get("protocol") or {}
    answer_format = check_answer_format(generated.get("answer_format", "plain"), f"{src}: answer_format")
    records = score(
        texts, outputs, protocol, raw=True, special=special, doc_ids=doc_ids, answer_format=answer_format
    )
    scores = {
        "n",
        "exact_match",
        "relaxed_accuracy",
        "relaxed_accuracy_strict",
        "score",
        "by_split",
        "by_type",
    }
    keep = {k: v for k, v in metrics.items() if k not in scores | {"exports"}}
    p = PROTOCOLS[protocol]
    keep["protocol"] = dict(generated) | {
        "name": p.name,
        "source": p.source,
        "postprocessing": p.postprocessing_for(answer_format),
        "answer_format": answer_format,
        "metric": p.metric_name,
        "rescored_from": {"eval_dir": str(src), "protocol": generated.get("name", "vlm-tune")},
    }
    result = write_eval(out, records, extra=keep)
    if export:
        result["exports"] = write_exports(out, records, result, export)
        atomic_write(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    return result


def _groups(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("type", "split") if row.get(k) is not None}
