"""train(cfg): config → model and processor → data → LoRA → trainer → train → save → eval. One screen."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from rich.console import Console
from transformers import PrinterCallback, set_seed

from vlm_tune.artifacts import make_portable
from vlm_tune.config import Config
from vlm_tune.data.chat import save_prompt
from vlm_tune.data.collate import PromptCollator, make_collator
from vlm_tune.data.sources import LazyRows, RowDataset, load_split
from vlm_tune.distributed import check_fsdp_version, evaluate_rows, full_state_dict, prepare_split_shared
from vlm_tune.errors import UserError
from vlm_tune.evaluate import comparison_table, majority_answers, score, write_eval
from vlm_tune.model import (
    continue_adapter,
    load_model,
    load_processor,
    parameter_counts,
    resolve_model_path,
    setup_training,
)
from vlm_tune.runtime import for_config, hardware, launcher_problems, several_gpus_note
from vlm_tune.trainer import (
    CheckpointMarker,
    GenerationEval,
    RichProgress,
    VlmTrainer,
    find_checkpoint,
    plot_history,
    prepare_run_dir,
    training_arguments,
)

console = Console(stderr=True)


def train(cfg: Config, resume: str | None = None, overwrite: bool = False) -> Path:
    """Run one training job described by cfg; returns the run directory (train.stage grpo: `rl.train_grpo`)."""
    if cfg.train.stage == "grpo":
        from vlm_tune.rl import train_grpo

        return train_grpo(cfg, resume, overwrite)
    t_start = time.perf_counter()
    # device + dtype for everything below; an impossible precision fails here, before any loading
    rt = for_config(cfg)
    problems = launcher_problems(cfg, rt)  # an accelerate config that contradicts this run's config
    if problems:
        raise UserError("; ".join(problems))
    state = PartialState(cpu=not torch.cuda.is_available())  # one process, or one of torchrun/accelerate's
    with state.main_process_first():  # the main process creates RUN_DIR and writes config.yaml first
        if state.is_main_process:
            run_dir, checkpoint = prepare_run_dir(cfg, resume, overwrite)  # config.yaml written before step 0
        else:
            run_dir = Path(cfg.run.output_dir)
            checkpoint = str(find_checkpoint(run_dir, resume)) if resume else None
    is_main = state.is_main_process
    note = several_gpus_note(hardware())
    if note and is_main:
        console.print(f"[vlm-tune] {note}", highlight=False, soft_wrap=True)
    set_seed(cfg.run.seed)
    setup_trackers(cfg, run_dir)

    # builtin models and synthetic data are built once per machine: the local main process first (the cache
    # writers are also safe against other machines' writers), the other ranks then read what it published
    cache = cfg.model.cache_dir
    d = cfg.data
    with state.local_main_process_first():
        model_path = resolve_model_path(cfg)
        train_rows, eval_source = load_split(d, d.train_split, cache), load_split(d, d.eval_split, cache)

    # model and processor
    processor = load_processor(model_path, cfg)
    collator = make_collator(processor, cfg.prompt.system, cfg.prompt.user_template, cfg.train.max_length)

    # data: every row decoded and measured once, before any step (rows split over the ranks)
    bar = cfg.logging.progress and is_main
    train_split, eval_split = prepare_splits(
        cfg, train_rows, eval_source, processor, collator, cfg.train.max_length, bar
    )
    eval_rows = LazyRows.of(eval_split)  # images decoded per generation batch, never all at once

    # baselines, scored before any training (generation split over the ranks)
    model = load_model(model_path, cfg, rt)
    if cfg.model.adapter:  # continued: the "untrained" baseline is the starting adapter, not the bare base
        model = continue_adapter(model, cfg)
    console.print(f"[vlm-tune] device {rt.device}, dtype {rt.dtype} (trainable weights float32)")
    results: dict[str, dict[str, Any]] = {}
    if "untrained" in cfg.eval.baselines and checkpoint is None:
        results["untrained"] = evaluate_in_run(
            model, processor, collator, eval_rows, cfg, run_dir / "eval" / "untrained", protocol=True
        )
    if "majority" in cfg.eval.baselines and checkpoint is None and is_main:
        train_rows = [{"answers": [a], "type": t} for a, t in _answers_and_types(train_split)]
        t0 = time.perf_counter()
        preds = majority_answers(train_rows, eval_rows.texts())
        wall = time.perf_counter() - t0
        run = {"device": None, "dtype": None, "rows": len(preds), "wall_s": round(wall, 3)}
        run["answers_per_s"] = round(len(preds) / max(wall, 1e-9), 1)  # no model: device and dtype are null
        run["protocol"] = {"name": cfg.eval.protocol, "generation": None}  # its metric scores the answers
        records = score(eval_rows.texts(), preds, cfg.eval.protocol)
        results["majority"] = write_eval(run_dir / "eval" / "majority", records, run)

    # LoRA / QLoRA / full (+ gradient checkpointing that keeps a frozen vision tower out of autograd)
    if not cfg.model.adapter:
        model = setup_training(model, cfg)
    trainable, total = parameter_counts(model)
    console.print(
        f"[vlm-tune] method {cfg.train.method}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / max(total, 1):.2f}%)"
    )

    # trainer
    callbacks: list[Any] = [CheckpointMarker()]
    if cfg.logging.progress:
        callbacks.append(RichProgress(cfg.train.batch_size * cfg.train.gradient_accumulation_steps))
    gen_eval = during_eval(cfg, processor, collator, eval_rows, run_dir, bar)
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

    # train
    trainer.train(resume_from_checkpoint=checkpoint)

    # save
    final_dir = run_dir / "final"
    gathered = full_state_dict(trainer.model_wrapped)  # FSDP: the full adapter, from every rank's shard
    if trainer.is_world_process_zero():
        save_final(trainer.model, processor, cfg, final_dir, gathered)
        (run_dir / "train_log.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
        plot_history(trainer.state.log_history, run_dir / "plots")

    # eval (generation split over the ranks; rank 0 writes and reports)
    if cfg.eval.at_end:
        results["final"] = evaluate_in_run(
            trainer.model, processor, collator, eval_rows, cfg, run_dir / "eval" / "final", protocol=True
        )
    if cfg.eval.at_end and trainer.is_world_process_zero():
        for name in ("untrained", "majority"):
            if name not in results and (run_dir / "eval" / name / "metrics.json").is_file():
                results[name] = json.loads((run_dir / "eval" / name / "metrics.json").read_text())
        ordered = {k: results[k] for k in ("untrained", "majority", "final") if k in results}
        console.print(
            "[vlm-tune] held-out evaluation (" + cfg.data.eval_split + "):\n" + comparison_table(ordered)
        )
        base = "untrained" if "untrained" in results else ("majority" if "majority" in results else None)
        if base:
            from vlm_tune.report import write_report

            write_report(
                run_dir / "report.html",
                run_dir / "eval" / base,
                run_dir / "eval" / "final",
                images=eval_rows.image_of(),  # each chart decoded when its row is written
                title=f"{cfg.run.name}: {base} vs final",
            )

    if cfg.hub.push_on_end and trainer.is_world_process_zero():
        from vlm_tune.hub import push

        console.print(
            f"[vlm-tune] pushed to {push(run_dir, cfg.hub.repo_id, cfg.hub.private, cfg.hub.revision)}"
        )
    finish_trackers(cfg)
    console.print(f"[vlm-tune] done in {time.perf_counter() - t_start:.0f} s; run directory: {run_dir}")
    return run_dir


def prepare_splits(
    cfg: Config, train_rows: Any, eval_source: Any, processor: Any, collator: Any, budget: int, progress: bool
) -> tuple[Any, Any]:
    """Both splits checked and measured under data.on_bad_row/on_overlong (training rows against `budget`
    tokens, evaluation rows unbounded); the summary printed."""
    d = cfg.data
    train_split = prepare_split_shared(
        train_rows,
        d.on_bad_row,
        d.on_overlong,
        budget,
        processor,
        collator,
        limit=d.max_train_samples,
        progress=progress,
    )
    eval_split = prepare_split_shared(
        eval_source,
        d.on_bad_row,
        d.on_overlong,
        None,
        limit=cfg.eval.limit or d.max_eval_samples,
        progress=progress,
    )
    console.print(f"[vlm-tune] data: {train_split.summary()}; {eval_split.summary()}")
    return train_split, eval_split


def save_final(
    model: Any, processor: Any, cfg: Config, final_dir: Path, state_dict: dict | None = None
) -> None:
    """Adapter (or full weights) + processor + chat template + prompt contract + resolved config.

    state_dict: the gathered full weights when the model is sharded (FSDP); else the model's own are saved.
    """
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if state_dict is None:
        model.save_pretrained(tmp)
    else:
        model.save_pretrained(tmp, state_dict=state_dict)
    processor.save_pretrained(tmp)
    (tmp / "README.md").unlink(missing_ok=True)  # peft's stub card; `vlm-tune push` writes the real one
    save_prompt(tmp, cfg.prompt.system, cfg.prompt.user_template)
    (tmp / "config.yaml").write_text(cfg.to_yaml())
    make_portable(tmp)
    shutil.rmtree(final_dir, ignore_errors=True)
    os.replace(tmp, final_dir)


def evaluate_in_run(
    model: Any,
    processor: Any,
    collator: PromptCollator,
    rows: Any,
    cfg: Config,
    out: Path,
    label: str = "",
    extra: dict | None = None,
    protocol: bool = False,
) -> dict:
    """One evaluation during `train`; protocol=True: under eval.protocol with eval.export (the untrained
    baseline and the final evaluation), else the training prompt (the evaluation that picks the best checkpoint)."""
    label = label or f"eval {out.name}"
    return evaluate_rows(
        model,
        processor,
        collator,
        rows,
        cfg,
        out,
        extra,
        label if cfg.logging.progress else None,
        protocol=cfg.eval.protocol if protocol else None,
        export=cfg.eval.export if protocol else (),
    )


def during_eval(
    cfg: Config, processor: Any, collator: PromptCollator, eval_rows: LazyRows, run_dir: Path, progress: bool
) -> GenerationEval | None:
    """eval.every_steps: the callback that scores the selection rows while training (eval/during/, the best
    checkpoint); None when it is not set. Its `log` is set to the trainer's once the trainer exists."""
    if not cfg.eval.every_steps:
        return None
    subset = _selection_rows(cfg, eval_rows, progress)
    return GenerationEval(
        lambda m, step: evaluate_in_run(  # eval/during/ keeps the latest in-training evaluation
            m, processor, collator, subset, cfg, run_dir / "eval" / "during", "eval", {"step": step}
        ),
        cfg.eval.every_steps,
        cfg.eval.best_metric,
        run_dir,
    )


def _selection_rows(cfg: Config, eval_rows: LazyRows, progress: bool) -> LazyRows:
    """The fixed subset scored during training: eval.subset_size rows of eval.select_split."""
    select = cfg.eval.select_split or cfg.data.eval_split
    if select == cfg.data.eval_split:
        return eval_rows[: cfg.eval.subset_size]
    d = cfg.data
    with PartialState().local_main_process_first():  # a hub split may be downloaded: once per machine
        rowset = load_split(d, select, cfg.model.cache_dir)
    prepared = prepare_split_shared(
        rowset,
        d.on_bad_row,
        d.on_overlong,
        None,
        limit=cfg.eval.subset_size,
        progress=progress,
    )
    return LazyRows.of(prepared)


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


def setup_trackers(cfg: Config, run_dir: Path) -> None:
    if "wandb" in cfg.logging.report_to:
        os.environ.setdefault("WANDB_PROJECT", cfg.logging.wandb_project)
        os.environ.setdefault("WANDB_DIR", str(run_dir))
    if "tensorboard" in cfg.logging.report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")


def finish_trackers(cfg: Config) -> None:
    """Close this run's W&B run (its offline file complete), so a second train() in the process is its own run."""
    if "wandb" in cfg.logging.report_to:
        import wandb

        if wandb.run is not None:
            wandb.finish()
        wandb.teardown()  # W&B reads WANDB_DIR once per process setup: the next run gets its own directory
