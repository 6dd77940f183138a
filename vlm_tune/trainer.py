"""The pieces train.py uses: the Trainer subclass, its callbacks (checkpoint markers, progress, evaluation
during training), training arguments, plots. The run directory lives in `vlm_tune.run_dir`."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from vlm_tune.config import Config
from vlm_tune.data.collate import IGNORE_INDEX
from vlm_tune.errors import UserError
from vlm_tune.run_dir import (  # noqa: F401  (re-exported for train.py, tests and scripts)
    BEST_FILE,
    COMPLETE_MARKER,
    RESUMABLE_CHANGES,
    check_resume_compatible,
    complete_checkpoints,
    find_checkpoint,
    prepare_run_dir,
)

# ---------------------------------------------------------------------------------------------------------
# trainer


def supervised_loss(model: Any, batch: dict[str, Any], num_items_in_batch: Any = None) -> tuple[Any, Any]:
    """Causal-LM loss with vocabulary logits computed only where the next token is supervised.

    The same value as the model's own loss (mean over supervised tokens, or their sum / num_items_in_batch
    under gradient accumulation), but the lm_head never sees prompt, image or padding positions: in chart
    QA that is over 95% of a row, and their logits are the largest tensor of the step (1,150 tokens x 49k
    vocabulary x 4 bytes = 227 MB per SmolVLM row at the default resolution). Returns (loss, model outputs);
    outputs.logits holds one row per supervised token.
    """
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t+1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = labels[:, 1:][keep[:, :-1]]
    try:
        outputs = model(**inputs, logits_to_keep=keep)
    except TypeError as err:
        if "logits_to_keep" in str(err):
            raise _no_logits_mask(model) from None
        raise
    if outputs.logits.dim() != 2 or outputs.logits.shape[0] != targets.numel():
        raise _no_logits_mask(model)
    loss = F.cross_entropy(outputs.logits.float(), targets, reduction="sum")
    if num_items_in_batch is None:
        num_items_in_batch = targets.numel()
    elif torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch, outputs


def _no_logits_mask(model: Any) -> UserError:
    return UserError(
        f"{type(model).__name__} does not take a boolean logits_to_keep mask (transformers 5 models do); "
        "set train.supervised_logits_only=false"
    )


class LengthGroupedSampler(torch.utils.data.Sampler):
    """A shuffled order in which each run of `group` rows has similar token counts (less padding).

    Rows are shuffled, cut into chunks of 32 groups, sorted by length inside a chunk, split into groups, and
    the groups shuffled again so long and short batches alternate. Seeded by (seed, epoch): a resumed run
    sees the same order.
    """

    def __init__(self, lengths: list[int], group: int, seed: int) -> None:
        self.lengths, self.group, self.seed, self.epoch = list(lengths), group, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Any:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        chunk = self.group * 32
        groups = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=lambda i: self.lengths[i], reverse=True)
            groups += [part[j : j + self.group] for j in range(0, len(part), self.group)]
        return iter(i for k in torch.randperm(len(groups), generator=g).tolist() for i in groups[k])


class VlmTrainer(Trainer):
    """Trainer with the supervised-logits loss, optional length grouping, and supervised-token logging."""

    def __init__(
        self,
        *args: Any,
        supervised_logits_only: bool = True,
        group_lengths: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.supervised_logits_only = supervised_logits_only
        self.group_lengths = group_lengths
        # (supervised, total) tokens since the last log, on the device (read once per logging step)
        self._tokens: torch.Tensor | None = None
        self._t0 = time.perf_counter()

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self.group_lengths is None:
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return LengthGroupedSampler(
            self.group_lengths, self.args.train_batch_size * self.args.world_size, seed
        )

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        labels = inputs.get("labels")
        if labels is not None:  # counted on the device: no host sync in the step (read at logging)
            counts = torch.stack([(labels != IGNORE_INDEX).sum(), inputs["attention_mask"].sum()])
            self._tokens = counts if self._tokens is None else self._tokens + counts
        if labels is None or not self.supervised_logits_only:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = supervised_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does for the model's loss
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training log: every rank logs it at the same step
            counts = self._tokens
            if counts is None:
                counts = torch.zeros(2, dtype=torch.long, device=self.args.device)
            if self.accelerator.num_processes > 1:
                counts = self.accelerator.reduce(counts, reduction="sum")  # every rank's tokens
            sup, tok = counts.tolist()  # the one host sync, once per logging step
            if tok:
                logs["supervised_fraction"] = round(sup / tok, 4)
                logs["supervised_tokens_per_s"] = round(sup / max(time.perf_counter() - self._t0, 1e-9), 2)
            self._tokens = None
            self._t0 = time.perf_counter()
        super().log(logs, *args, **kwargs)


class CheckpointMarker(TrainerCallback):
    """Writes a marker into a checkpoint after everything in it is saved; resume only trusts marked ones."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if path.is_dir():
            (path / COMPLETE_MARKER).write_text(json.dumps({"step": state.global_step}) + "\n")


class RichProgress(TrainerCallback):
    """A progress bar with loss, learning rate, samples/s (all ranks) and ETA; batch_size is one rank's
    samples per optimizer step."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.progress = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=state.max_steps, completed=state.global_step, info=""
        )
        self.t0, self.step0 = time.perf_counter(), state.global_step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.progress is None or not logs or "loss" not in logs:
            return
        samples = (state.global_step - self.step0) * self.batch_size * args.world_size  # every rank's
        rate = samples / max(time.perf_counter() - self.t0, 1e-9)
        self.progress.update(
            self.task,
            info=f"loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.2e}  {rate:.1f} samples/s",
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class GenerationEval(TrainerCallback):
    """Every eval.every_steps: generate on a fixed subset, score, log, and keep the best checkpoint.

    Scores reach the trackers (W&B, TensorBoard) as eval/<metric> at their step once `log` is set (to
    Trainer.log). The best checkpoint and the history are written to RUN_DIR/best_checkpoint.json at each
    eval; a resumed run starts from them (entries up to the resumed step whose checkpoint still exists),
    so checkpoint rotation keeps protecting the earlier best.
    """

    def __init__(self, run_eval: Any, every: int, metric: str, run_dir: Path) -> None:
        self.run_eval, self.every, self.metric, self.run_dir = run_eval, every, metric, run_dir
        self.history: list[dict[str, Any]] = []
        self.best: tuple[float, int] | None = None
        self.log: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        path = self.run_dir / BEST_FILE
        if not state.global_step or not path.is_file():
            return
        saved = json.loads(path.read_text())
        self.history = [h for h in saved.get("history", []) if h["step"] <= state.global_step]
        for entry in self.history:
            if (Path(args.output_dir) / f"checkpoint-{entry['step']}" / COMPLETE_MARKER).is_file():
                self._consider(entry, args, state)

    def _consider(self, entry: dict[str, Any], args: Any, state: Any) -> None:
        if self.best is None or entry[self.metric] > self.best[0]:
            self.best = (entry[self.metric], entry["step"])
            state.best_metric = entry[self.metric]
            # Trainer's checkpoint rotation never deletes the best checkpoint
            state.best_model_checkpoint = str(Path(args.output_dir) / f"checkpoint-{entry['step']}")

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step % self.every:
            return
        metrics = self.run_eval(model, state.global_step)
        entry = {
            "step": state.global_step,
            "exact_match": metrics["exact_match"],
            "relaxed_accuracy": metrics["relaxed_accuracy"],
        }
        self.history.append(entry)
        scores = {f"eval_{k}": v for k, v in entry.items() if k != "step"}
        if self.log is not None:
            self.log(scores)  # log_history, trackers (eval/<metric>), progress bar
        else:
            state.log_history.append(scores | {"step": state.global_step})
        self._consider(entry, args, state)
        if state.is_world_process_zero:
            self._write()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.best is not None and state.is_world_process_zero:
            self._write()  # after a resume with no new eval: the history as resumed

    def _write(self) -> None:
        if self.best is None:
            return
        text = json.dumps(
            {
                "metric": self.metric,
                "value": self.best[0],
                "step": self.best[1],
                "checkpoint": f"checkpoint-{self.best[1]}",
                "history": self.history,
            },
            indent=2,
        )
        from vlm_tune.files import atomic_write

        atomic_write(self.run_dir / BEST_FILE, text + "\n")


def common_arguments(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """The Trainer arguments the SFT and GRPO stages share: output, checkpoints, logging, seeds, precision."""
    from vlm_tune.runtime import for_config

    t = cfg.train
    rt = for_config(cfg)  # device and autocast flags: the same decision the model was loaded with
    return {
        "output_dir": str(run_dir),
        "max_grad_norm": t.max_grad_norm,
        "logging_steps": t.logging_steps,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "save_total_limit": t.save_total_limit,
        "seed": cfg.run.seed,
        "data_seed": cfg.run.seed,
        "bf16": rt.bf16,
        "fp16": rt.fp16,
        "use_cpu": rt.use_cpu,
        "remove_unused_columns": False,
        "report_to": [] if cfg.logging.report_to == ["none"] else list(cfg.logging.report_to),
        "run_name": cfg.run.name,
        "disable_tqdm": True,
    }


def training_arguments(cfg: Config, run_dir: Path) -> Any:
    """Config → TrainingArguments (one GPU per process: `OneGpuPerProcess`)."""
    from vlm_tune.runtime import data_workers

    t = cfg.train
    return OneGpuPerProcess(
        **common_arguments(cfg, run_dir),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        num_train_epochs=t.epochs,
        dataloader_num_workers=data_workers(t.dataloader_num_workers)[0],
        ddp_find_unused_parameters=False,
    )


class OneGpuPerProcess(TrainingArguments):
    """TrainingArguments whose process uses at most `runtime.GPUS_PER_PROCESS` GPUs.

    transformers counts the visible GPUs of an unlaunched process (`n_gpu`), then wraps the model in
    nn.DataParallel and multiplies the batch: DataParallel splits pixel_values along dim 0, which Qwen2.5-VL,
    Qwen3-VL, InternVL and LFM2-VL flatten across images (a crash at step 0), and the others silently train a
    batch n_gpu times larger. Several GPUs are used through a launcher, one process each.
    """

    @property
    def n_gpu(self) -> int:
        from vlm_tune.runtime import GPUS_PER_PROCESS

        return min(super().n_gpu, GPUS_PER_PROCESS)


# ---------------------------------------------------------------------------------------------------------
# plots


def plot_history(log_history: list[dict[str, Any]], plots_dir: Path) -> list[Path]:
    """loss.png from the training log; accuracy.png when evals ran during training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    losses = [(h["step"], h["loss"]) for h in log_history if "loss" in h and math.isfinite(h["loss"])]
    if losses:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*losses, strict=True), marker=".")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title("training loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(plots_dir / "loss.png", dpi=100)
        plt.close(fig)
        written.append(plots_dir / "loss.png")
    evals = [
        (h["step"], h["eval_exact_match"], h["eval_relaxed_accuracy"])
        for h in log_history
        if "eval_exact_match" in h
    ]
    if evals:
        steps, em, ra = zip(*evals, strict=True)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, em, marker="o", label="exact match")
        ax.plot(steps, ra, marker="s", label="relaxed accuracy")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.grid(alpha=0.3)
        ax.set_title("held-out accuracy during training")
        fig.tight_layout()
        fig.savefig(plots_dir / "accuracy.png", dpi=100)
        plt.close(fig)
        written.append(plots_dir / "accuracy.png")
    return written
