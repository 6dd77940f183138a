"""`vlm-tune check`: a pre-flight with no training. Rows, bad rows, token budget, supervision, one sample."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from vlm_tune.config import Config
from vlm_tune.data.collate import IGNORE_INDEX, make_collator
from vlm_tune.data.formats import answer_warnings
from vlm_tune.data.sources import BadRow, load_split, prepare_split
from vlm_tune.errors import UserError
from vlm_tune.model import load_processor, resolve_model_path


def _dist(values: list[int]) -> str:
    if not values:
        return "n/a"
    s = sorted(values)
    p95 = s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]
    return f"min {s[0]}, median {statistics.median(s):g}, p95 {p95}, max {s[-1]}"


def render_supervision(processor: Any, batch: dict[str, Any], b: int = 0) -> str:
    """The decoded sample with the supervised span in [[...]]; image token runs collapsed."""
    ids = batch["input_ids"][b].tolist()
    labels = batch["labels"][b].tolist()
    mask = batch["attention_mask"][b].tolist()
    tok = processor.tokenizer
    # the token repeated per image patch (family's; Gemma 3's processor.image_token is <start_of_image>, the
    # repeated soft token is its tokenizer's image_token)
    image = getattr(tok, "image_token", None) or getattr(processor, "image_token", "<image>")
    out, inside, run_token, run = [], False, None, 0
    for t, lab, m in zip(ids, labels, mask, strict=True):
        if not m:
            continue
        piece = tok.decode([t], skip_special_tokens=False)
        if piece == image:
            run += 1
            continue
        if run:
            out.append(f"{image}×{run}")
            run = 0
        sup = lab != IGNORE_INDEX
        if sup and not inside:
            out.append("[[")
        if not sup and inside:
            out.append("]]")
        inside = sup
        out.append(piece)
    if run:
        out.append(f"{image}×{run}")
    if inside:
        out.append("]]")
    del run_token
    return "".join(out)


def selection_warning(cfg: Config) -> str | None:
    """A warning when the best checkpoint is picked on the split that gives the final score."""
    select = cfg.eval.select_split or cfg.data.eval_split
    if not cfg.eval.every_steps or select != cfg.data.eval_split:
        return None
    return (
        f"eval.select_split: the best checkpoint is picked on {select!r}, the split the final evaluation "
        "(data.eval_split) reports, so that score is optimistic. Set eval.select_split to a validation "
        "split (ChartQA: val)."
    )


def run_check(cfg: Config, dump: str | None = None, rows: int = 5) -> int:
    """Print the pre-flight report; return 1 if training would fail on this data, else 0."""
    console = Console()
    model_path = resolve_model_path(cfg)
    processor = load_processor(model_path, cfg)
    collator = make_collator(processor, cfg.prompt.system, cfg.prompt.user_template, cfg.train.max_length)
    d = cfg.data
    ok = True
    console.print(f"[bold]vlm-tune check[/bold]  model {cfg.model.name_or_path}  data {d.source}")
    warning = selection_warning(cfg)
    if warning:
        console.print(f"[yellow]warning: {warning}[/yellow]")
    elif cfg.eval.every_steps and cfg.eval.select_split:
        n = len(load_split(d, cfg.eval.select_split, cfg.model.cache_dir))
        console.print(f"best checkpoint picked on {cfg.eval.select_split!r} ({n} rows in the source)")
    from vlm_tune.runtime import (
        config_family,
        data_workers,
        explain_dtype,
        hardware,
        precision_problems,
        several_gpus_note,
    )

    hw, family = hardware(), config_family(cfg)
    dtype, why = explain_dtype(cfg.model.dtype, hw, family)
    device = f"cuda:{hw.local_rank} ({hw.name})" if hw.cuda else "cpu"
    console.print(f"device {device}, model.dtype {cfg.model.dtype} → {dtype} ({why})", highlight=False)
    workers, why = data_workers(cfg.train.dataloader_num_workers, hw)
    console.print(f"data-loader workers per process: {workers} ({why})", highlight=False, soft_wrap=True)
    note = several_gpus_note(hw)
    if note:
        console.print(f"[yellow]note: {escape(note)}[/yellow]", highlight=False, soft_wrap=True)
    for problem in precision_problems(cfg.model.dtype, cfg.train.method, hw, family):
        ok = False
        console.print(f"  [red]{problem}[/red]", highlight=False)
    from vlm_tune.versions import core_drift_warnings

    for warning in core_drift_warnings():  # a warning, not a failure: the run may well work
        console.print(f"[yellow]warning: {escape(warning)}[/yellow]", highlight=False, soft_wrap=True)
    budget, budget_name = cfg.train.max_length, f"train.max_length={cfg.train.max_length}"
    if cfg.train.stage == "grpo":
        from vlm_tune.rl import rl_problems_with, token_budget

        budget = token_budget(cfg)
        budget_name = f"{budget} tokens (train.max_length less rl.max_completion_length)"
        r = cfg.rl
        console.print(
            f"GRPO stage: from {cfg.model.adapter or 'the base (a new adapter)'}, {r.steps} steps of "
            f"{r.prompts_per_step} rows x {r.num_generations} completions of <= {r.max_completion_length} tokens; "
            f"rewards {r.rewards}",
            highlight=False,
            soft_wrap=True,
        )
        if cfg.model.adapter and not (Path(cfg.model.adapter) / "adapter_config.json").is_file():
            line = (
                "built first by SFT (rl.build_adapter)"
                if r.build_adapter
                else "missing (set rl.build_adapter)"
            )
            ok = ok and r.build_adapter
            console.print(f"  model.adapter {cfg.model.adapter}: {line}", highlight=False, soft_wrap=True)
        for problem in rl_problems_with(cfg, processor):
            ok = False
            console.print(f"  [red]{escape(problem)}[/red]", highlight=False, soft_wrap=True)
    train_prepared = None
    for split, limit in (
        (d.train_split, d.max_train_samples),
        (d.eval_split, cfg.eval.limit or d.max_eval_samples),
    ):
        rowset = load_split(d, split, cfg.model.cache_dir)
        # count every problem, whatever the configured policy, then judge against the policy
        prepared = prepare_split(
            rowset,
            "skip",
            "skip",
            budget,
            processor,
            collator,
            limit=limit,
            progress=cfg.logging.progress,
        )
        console.print(f"\n[bold]{split}[/bold]: {len(rowset)} rows in the source; {prepared.summary()}")
        for reason, example in prepared.skipped_examples.items():
            console.print(f"  {reason}: e.g. {example}")
        for warning in answer_warnings(rowset, prepared.indices):
            console.print(f"  [yellow]warning: {warning}[/yellow]", highlight=False)
        bad = sum(n for r, n in prepared.skipped.items() if r != "overlong")
        if bad and d.on_bad_row == "error":
            ok = False
            console.print(
                f"  [red]{bad} bad row(s): training stops at the first (data.on_bad_row=error)[/red]"
            )
        if prepared.skipped.get("overlong") and d.on_overlong == "error":
            ok = False
            console.print(
                f"  [red]{prepared.skipped['overlong']} row(s) over {budget_name}"
                " (data.on_overlong=error)[/red]"
            )
        if prepared.tokens:
            console.print(f"  image tokens: {_dist([t['image'] for t in prepared.tokens])}")
            console.print(f"  total tokens: {_dist([t['total'] for t in prepared.tokens])}")
            sup = sum(t["supervised"] for t in prepared.tokens) / max(
                sum(t["total"] for t in prepared.tokens), 1
            )
            console.print(f"  supervised fraction: {sup:.4f} (answer tokens + end of turn)")
        if split == d.train_split:
            train_prepared = prepared

    if train_prepared is not None and train_prepared.indices:
        sample = [train_prepared.rowset.row(train_prepared.indices[0])]
        batch = collator(sample)
        console.print("\n[bold]one training sample[/bold] (supervised span in [[ ]]):")
        console.print(render_supervision(processor, batch), markup=False, highlight=False, soft_wrap=True)
        if dump:
            n = min(rows, len(train_prepared.indices))
            with Path(dump).open("w") as f:
                for i in train_prepared.indices[:n]:
                    row = train_prepared.rowset.row(i)
                    b = collator([row])
                    ids = b["input_ids"][0].tolist()
                    f.write(
                        json.dumps(
                            {
                                "id": row["id"],
                                "answer": row["answers"][0],
                                "input_ids": ids,
                                "labels": b["labels"][0].tolist(),
                                "text": processor.tokenizer.decode(ids, skip_special_tokens=False),
                                "supervised_text": processor.tokenizer.decode(
                                    [
                                        t
                                        for t, lab in zip(ids, b["labels"][0].tolist(), strict=True)
                                        if lab != IGNORE_INDEX
                                    ],
                                    skip_special_tokens=False,
                                ),
                            }
                        )
                        + "\n"
                    )
            console.print(f"\nwrote {n} rows to {dump}")
    console.print(
        "\n[green]OK: training can start[/green]"
        if ok
        else "\n[red]FAIL: training would stop; see above[/red]"
    )
    return 0 if ok else 1


__all__ = ["run_check", "render_supervision", "BadRow", "UserError"]
