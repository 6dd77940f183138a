"""The run directory: create or reopen it, guard --overwrite, find complete checkpoints, check a resume."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from vlm_tune.config import Config
from vlm_tune.errors import UserError

COMPLETE_MARKER = "checkpoint_complete.json"
BEST_FILE = "best_checkpoint.json"
# keys that may change between a run and its resume; anything else makes the checkpoint incompatible
RESUMABLE_CHANGES = {
    ("train", "max_steps"),
    ("train", "epochs"),
    ("train", "save_steps"),
    ("train", "save_total_limit"),
    ("train", "logging_steps"),
    ("train", "dataloader_num_workers"),
    ("train", "gradient_checkpointing"),  # memory only: same math
    ("train", "supervised_logits_only"),  # same loss
    ("rl", "steps"),
    ("eval",),
    ("hub",),
    ("logging",),
}


# ---------------------------------------------------------------------------------------------------------
# run directory


def prepare_run_dir(cfg: Config, resume: str | None, overwrite: bool) -> tuple[Path, str | None]:
    """Create or reopen RUN_DIR. Returns (run_dir, checkpoint to resume from or None)."""
    run_dir = Path(cfg.run.output_dir)
    has_run = run_dir.is_dir() and any(run_dir.iterdir())
    if resume is not None:
        checkpoint = find_checkpoint(run_dir, resume)
        check_resume_compatible(run_dir, cfg)
        return run_dir, str(checkpoint)
    if has_run and not overwrite:
        raise UserError(
            f"run.output_dir {run_dir} already holds a run. Use --resume to continue it, --overwrite to replace it, "
            "or set run.output_dir=another/dir"
        )
    if has_run and overwrite:
        check_removable_run_dir(run_dir)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return run_dir, None


# what a run directory holds (training, eval, trackers, `vlm-tune push` and `merge`): --overwrite removes
# a directory only when everything in it is one of these
RUN_ENTRIES = {
    "config.yaml",
    "train_log.json",
    BEST_FILE,
    "report.html",
    "README.md",
    "final",
    "final.tmp",
    "merged",
    "eval",
    "plots",
    "tensorboard",
    "wandb",
}


def check_removable_run_dir(run_dir: Path) -> None:
    """Raise UserError unless run_dir is a vlm-tune run directory that --overwrite may delete.

    Refused: the current directory or one above it, the home folder or one above it, the filesystem root,
    and any folder without a vlm-tune config.yaml or holding entries a run does not write.
    """
    path = run_dir.resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if path in (cwd, home, Path(path.anchor)) or path in cwd.parents or path in home.parents:
        raise UserError(
            f"--overwrite refuses to delete {run_dir} ({path}): it is the current directory, the home folder, "
            "or a folder above them. Set run.output_dir to a run's own folder, e.g. runs/NAME"
        )
    cfg_path = path / "config.yaml"
    try:
        saved = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else None
    except (yaml.YAMLError, UnicodeDecodeError):
        saved = None
    sections = set(Config.model_fields)
    if not isinstance(saved, dict) or "run" not in saved or not set(saved) <= sections:
        raise UserError(
            f"--overwrite refuses to delete {run_dir}: it holds no vlm-tune run (no config.yaml written by "
            "vlm-tune). Delete it yourself, or set run.output_dir to another folder"
        )
    foreign = sorted(
        p.name
        for p in path.iterdir()
        if p.name not in RUN_ENTRIES
        and not (p.name.startswith(("checkpoint-", "tmp-checkpoint-")) and p.is_dir())
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(
            f"--overwrite refuses to delete {run_dir}: it holds files a vlm-tune run does not write ({shown}). "
            "Move them out, or set run.output_dir to another folder"
        )


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints whose writing finished (marker present), oldest first."""
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(
        (p for p in found if (p / COMPLETE_MARKER).is_file()), key=lambda p: int(p.name.split("-")[-1])
    )


def find_checkpoint(run_dir: Path, resume: str) -> Path:
    """`latest` → newest complete checkpoint in run_dir; else the given path (must be complete)."""
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"--resume {path}: no such checkpoint directory")
        if not (path / COMPLETE_MARKER).is_file():
            raise UserError(
                f"--resume {path}: checkpoint is incomplete (its writing was interrupted); pick another"
            )
        return path
    if not run_dir.is_dir():
        raise UserError(f"--resume: {run_dir} does not exist; start the run without --resume")
    good = complete_checkpoints(run_dir)
    incomplete = [p.name for p in run_dir.glob("checkpoint-*") if p.is_dir() and p not in good]
    if incomplete:
        print(f"[vlm-tune] skipping incomplete checkpoint(s) {sorted(incomplete)} (interrupted while saving)")
    if not good:
        raise UserError(f"--resume: no complete checkpoint in {run_dir}; start again with --overwrite")
    return good[-1]


def _diff(a: Any, b: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), (*path, k))
        return out
    return [] if a == b else [path]


def check_resume_compatible(run_dir: Path, cfg: Config) -> None:
    """A resume must use the same model, data, LoRA and optimizer settings as the run it continues."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise UserError(f"--resume: {saved_path} is missing, so this is not a vlm-tune run directory")
    saved = yaml.safe_load(saved_path.read_text())
    changed = [p for p in _diff(saved, cfg.to_dict()) if not any(p[: len(r)] == r for r in RESUMABLE_CHANGES)]
    if changed:
        keys = ", ".join(".".join(p) for p in changed)
        raise UserError(
            f"--resume: the checkpoint in {run_dir} is incompatible with this config; changed: {keys}. "
            "Resume with the original settings or start a new run."
        )
    saved_path.write_text(cfg.to_yaml())
