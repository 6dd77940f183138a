"""The steps both training stages share (SFT: `vlm_tune.train`, GRPO: `vlm_tune.rl`): trackers, the two splits
checked and measured, the in-run evaluations, the final save, and the close of a run (comparison table,
report, hub push, done line)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from rich.console import Console
from transformers import set_seed

from vlm_tune.artifacts import make_portable
from vlm_tune.config import Config
from vlm_tune.data.chat import save_prompt
from vlm_tune.data.collate import PromptCollator
from vlm_tune.data.sources import LazyRows, load_split
from vlm_tune.distributed import evaluate_rows, prepare_split_shared
from vlm_tune.errors import UserError
from vlm_tune.evaluate import comparison_table
from vlm_tune.rl_config import run_answer_format
from vlm_tune.runtime import Runtime, hardware, launcher_problems, several_gpus_note
from vlm_tune.trainer import GenerationEval, find_checkpoint, prepare_run_dir

console = Console(stderr=True)


def open_run(
    cfg: Config, rt: Runtime, resume: str | None, overwrite: bool
) -> tuple[PartialState, Path, str | None]:
    """(process state, RUN_DIR, checkpoint to resume or None), for both stages: the accelerate launch checked against cfg, RUN_DIR
    created or reopened by the main process first (config.yaml written before step 0), seed set, trackers set up."""
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
    note = several_gpus_note(hardware())
    if note and state.is_main_process:
        console.print(f"[vlm-tune] {note}", highlight=False, soft_wrap=True)
    set_seed(cfg.run.seed)
    setup_trackers(cfg, run_dir)
    return state, run_dir, checkpoint


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
    """Adapter (or full weights) + processor + chat template + prompt contract (with the run's answer format) +
    resolved config.

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
    save_prompt(tmp, cfg.prompt.system, cfg.prompt.user_template, run_answer_format(cfg))
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
    baseline and the final evaluation), else the training prompt (the evaluation that picks the best checkpoint).
    Answers are taken in the run's answer format (`run_answer_format`), as the saved prompt.json says."""
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
        answer_format=run_answer_format(cfg),
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


def compare_and_report(
    cfg: Config,
    run_dir: Path,
    results: dict[str, dict],
    eval_rows: LazyRows,
    baselines: Sequence[str],
    title: Callable[[str], str],
) -> None:
    """The held-out comparison table (baselines scored by an earlier, resumed run read from eval/NAME), and
    report.html of the first baseline against the final model, titled `title(baseline)`."""
    for name in baselines:
        if name not in results and (run_dir / "eval" / name / "metrics.json").is_file():
            results[name] = json.loads((run_dir / "eval" / name / "metrics.json").read_text())
    ordered = {k: results[k] for k in (*baselines, "final") if k in results}
    console.print(
        "[vlm-tune] held-out evaluation (" + cfg.data.eval_split + "):\n" + comparison_table(ordered)
    )
    base = next((name for name in baselines if name in results), None)
    if base:
        from vlm_tune.report import write_report

        write_report(
            run_dir / "report.html",
            run_dir / "eval" / base,
            run_dir / "eval" / "final",
            images=eval_rows.image_of(),  # each chart decoded when its row is written
            title=title(base),
        )


def push_if_asked(cfg: Config, run_dir: Path) -> None:
    """hub.push_on_end: the run pushed to hub.repo_id (a hub repo or a local directory)."""
    if cfg.hub.push_on_end:
        from vlm_tune.hub import push

        console.print(
            f"[vlm-tune] pushed to {push(run_dir, cfg.hub.repo_id, cfg.hub.private, cfg.hub.revision)}"
        )


def finish_run(cfg: Config, run_dir: Path, t_start: float) -> None:
    """Trackers closed and the done line (wall time and the run directory)."""
    finish_trackers(cfg)
    console.print(f"[vlm-tune] done in {time.perf_counter() - t_start:.0f} s; run directory: {run_dir}")
