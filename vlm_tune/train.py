"""train(cfg): config → model and processor → data → baselines → LoRA → trainer → train → save → eval → report.

`train` reads on one screen; each block is a named helper below (the steps the GRPO stage shares with it are in
`vlm_tune.run_steps`). train.stage: grpo runs `vlm_tune.rl.train_grpo` instead.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from accelerate import PartialState
from rich.console import Console
from transformers import PrinterCallback

from vlm_tune.config import Config
from vlm_tune.data.collate import PromptCollator, make_collator
from vlm_tune.data.sources import LazyRows, RowDataset, load_split
from vlm_tune.distributed import check_fsdp_version, full_state_dict
from vlm_tune.evaluate import majority_answers, score, write_eval
from vlm_tune.model import (
    continue_adapter,
    load_model,
    load_processor,
    parameter_counts,
    resolve_model_path,
    setup_training,
)
from vlm_tune.run_steps import (
    compare_and_report,
    during_eval,
    evaluate_in_run,
    finish_run,
    open_run,
    prepare_splits,
    push_if_asked,
    save_final,
)
from vlm_tune.runtime import Runtime, for_config
from vlm_tune.trainer import (
    CheckpointMarker,
    RichProgress,
    VlmTrainer,
    plot_history,
    training_arguments,
)

console = Console(stderr=True)


def train(cfg: Config, resume: str | None = None, overwrite: bool = False) -> Path:
    """Run one training job described by cfg; returns the run directory (train.stage grpo: `rl.train_grpo`)."""
    if cfg.train.stage == "grpo":  # it trains a missing model.adapter first, by this function (SFT)
        from vlm_tune.rl import train_grpo

        return train_grpo(cfg, resume, overwrite, sft=train)
    t_start = time.perf_counter()
    # config: device + dtype (an impossible precision fails here, before any loading), RUN_DIR, seed, trackers
    rt = for_config(cfg)
    state, run_dir, checkpoint = open_run(cfg, rt, resume, overwrite)

    # builtin models and synthetic data are built once per machine: the local main process first (the cache
    # writers are also safe against other machines' writers), the other ranks then read what it published
    d, cache = cfg.data, cfg.model.cache_dir
    with state.local_main_process_first():
        model_path = resolve_model_path(cfg)
        train_rows, eval_source = load_split(d, d.train_split, cache), load_split(d, d.eval_split, cache)

    # model and processor
    processor = load_processor(model_path, cfg)
    collator = make_collator(processor, cfg.prompt.system, cfg.prompt.user_template, cfg.train.max_length)

    # data: every row decoded and measured once, before any step (rows split over the ranks)
    bar = cfg.logging.progress and state.is_main_process
    train_split, eval_split = prepare_splits(
        cfg, train_rows, eval_source, processor, collator, cfg.train.max_length, bar
    )
    eval_rows = LazyRows.of(eval_split)  # images decoded per generation batch, never all at once

    # baselines, scored before any training (generation split over the ranks)
    model = load_starting_model(model_path, cfg, rt)
    results = score_baselines(model, processor, collator, train_split, eval_rows, cfg, run_dir, checkpoint)

    # LoRA / QLoRA / full (+ gradient checkpointing that keeps a frozen vision tower out of autograd)
    model = make_trainable(model, cfg)

    # trainer → train → save
    trainer = build_trainer(model, processor, collator, train_split, eval_rows, cfg, run_dir, bar)
    trainer.train(resume_from_checkpoint=checkpoint)
    save_run(trainer, processor, cfg, run_dir)

    # eval (generation split over the ranks; rank 0 writes and reports)
    if cfg.eval.at_end:
        results["final"] = evaluate_in_run(
            trainer.model, processor, collator, eval_rows, cfg, run_dir / "eval" / "final", protocol=True
        )

    # report (rank 0): the comparison table, report.html, the hub push
    if trainer.is_world_process_zero():
        report_run(cfg, run_dir, results, eval_rows)
    finish_run(cfg, run_dir, t_start)
    return run_dir


def load_starting_model(model_path: str, cfg: Config, rt: Runtime) -> Any:
    """The model training starts from: the base, or with model.adapter continued (then the "untrained" baseline
    is the starting adapter, not the bare base)."""
    model = load_model(model_path, cfg, rt)
    if cfg.model.adapter:
        model = continue_adapter(model, cfg)
    console.print(f"[vlm-tune] device {rt.device}, dtype {rt.dtype} (trainable weights float32)")
    return model


def score_baselines(
    model: Any,
    processor: Any,
    collator: PromptCollator,
    train_split: Any,
    eval_rows: LazyRows,
    cfg: Config,
    run_dir: Path,
    checkpoint: str | None,
) -> dict[str, dict[str, Any]]:
    """eval.baselines scored into eval/NAME before any step (none when resuming: the first run scored them):
    `untrained` (the starting model, under eval.protocol) and `majority` (no model: the most frequent training
    answer per question type, on the main process)."""
    results: dict[str, dict[str, Any]] = {}
    if "untrained" in cfg.eval.baselines and checkpoint is None:
        results["untrained"] = evaluate_in_run(
            model, processor, collator, eval_rows, cfg, run_dir / "eval" / "untrained", protocol=True
        )
    if "majority" in cfg.eval.baselines and checkpoint is None and PartialState().is_main_process:
        train_rows = [{"answers": [a], "type": t} for a, t in _answers_and_types(train_split)]
        t0 = time.perf_counter()
        preds = majority_answers(train_rows, eval_rows.texts())
        wall = time.perf_counter() - t0
        run = {"device": None, "dtype": None, "rows": len(preds), "wall_s": round(wall, 3)}
        run["answers_per_s"] = round(len(preds) / max(wall, 1e-9), 1)  # no model: device and dtype are null
        run["protocol"] = {"name": cfg.eval.protocol, "generation": None}  # its metric scores the answers
        records = score(eval_rows.texts(), preds, cfg.eval.protocol)
        results["majority"] = write_eval(run_dir / "eval" / "majority", records, run)
    return results


def make_trainable(model: Any, cfg: Config) -> Any:
    """train.method applied (a continued model.adapter is trainable already); the trainable share printed."""
    if not cfg.model.adapter:
        model = setup_training(model, cfg)
    trainable, total = parameter_counts(model)
    console.print(
        f"[vlm-tune] method {cfg.train.method}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / max(total, 1):.2f}%)"
    )
    return model


def build_trainer(
    model: Any,
    processor: Any,
    collator: PromptCollator,
    train_split: Any,
    eval_rows: LazyRows,
    cfg: Config,
    run_dir: Path,
    progress: bool,
) -> VlmTrainer:
    """The SFT trainer with its callbacks: checkpoint markers, the progress bar (in place of the printed logs)
    and, with eval.every_steps, the in-training evaluation that logs eval/<metric> to the trackers."""
    callbacks: list[Any] = [CheckpointMarker()]
    if cfg.logging.progress:
        callbacks.append(RichProgress(cfg.train.batch_size * cfg.train.gradient_accumulation_steps))
    gen_eval = during_eval(cfg, processor, collator, eval_rows, run_dir, progress)
    if gen_eval is not None:
        callbacks.append(gen_eval)
    trainer = VlmTrainer(
        model=model,
        args=training_arguments(cfg, run_dir),
        train_dataset=RowDataset(train_split),
        data_collator=collator,
        processing_class=processor,
        callbacks=callbacks,
        supervised_logits_only=cfg.train.supervised_logits_only,
        group_lengths=[c["total"] for c in train_split.tokens] if cfg.train.group_by_length else None,
    )
    if cfg.logging.progress:
        trainer.remove_callback(PrinterCallback)  # the progress bar shows the same numbers
    if gen_eval is not None:
        gen_eval.log = trainer.log  # eval/<metric> in the trackers
    check_fsdp_version(trainer, cfg)
    return trainer


def save_run(trainer: VlmTrainer, processor: Any, cfg: Config, run_dir: Path) -> None:
    """RUN_DIR/final (`save_final`), train_log.json and the loss plots; under FSDP the full adapter is gathered
    from every rank's shard first, and rank 0 writes."""
    gathered = full_state_dict(trainer.model_wrapped)
    if trainer.is_world_process_zero():
        save_final(trainer.model, processor, cfg, run_dir / "final", gathered)
        (run_dir / "train_log.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
        plot_history(trainer.state.log_history, run_dir / "plots")


def report_run(cfg: Config, run_dir: Path, results: dict[str, dict], eval_rows: LazyRows) -> None:
    """eval.at_end: the held-out table of the baselines and the final model, report.html (the first baseline
    against the final model); then hub.push_on_end."""
    if cfg.eval.at_end:
        title = cfg.run.name
        compare_and_report(
            cfg, run_dir, results, eval_rows, ("untrained", "majority"), lambda b: f"{title}: {b} vs final"
        )
    push_if_asked(cfg, run_dir)


def _answers_and_types(prepared: Any) -> list[tuple[str, str]]:
    """Training answers and types without decoding images (for the majority baseline)."""
    rs = prepared.rowset
    cols = rs.columns
    if "messages" in cols:
        return [(r["answers"][0], r["type"]) for r in (rs.row(i) for i in prepared.indices)]
    from vlm_tune.data.sources import normalize_answers

    table = rs.dataset.select_columns([c for c in (cols["answer"], cols.get("type")) if c])
    out = []
    for i in prepared.indices:
        raw = table[i]
        out.append(
            (
                normalize_answers(raw[cols["answer"]], str(i), cols["answer"])[0],
                str(raw[cols["type"]]) if cols.get("type") else "all",
            )
        )
    return out
