"""train.stage: grpo — reinforcement fine-tuning on TRL's GRPOTrainer, the chart metric as the reward.

The stage starts from model.adapter (an SFT run's RUN_DIR/final, its LoRA continued; built first when
rl.build_adapter is set and it is missing) or from the base with a new adapter. Its prompts are the ones training,
eval and predict use (`build_messages` → the processor's chat template, the image knobs set on the same processor
object TRL renders with); completions stop at the family's end-of-turn token; the rewards are `vlm_tune.rewards`.
The starting model is scored before the stage (eval/start) and the trained one after (eval/final), with the same
files and report an SFT run writes. trl is imported here only, so SFT runs never load it.
"""

from __future__ import annotations

import importlib.util
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from vlm_tune.config import Config
from vlm_tune.data.chat import build_messages
from vlm_tune.data.collate import make_collator
from vlm_tune.errors import UserError
from vlm_tune.families import family_of_processor
from vlm_tune.rl_filter import drop_solved, stop_at_end_of_turn

console = Console(stderr=True)


def prompt_dataset(rowset: Any, indices: list[int], system: str | None, user_template: str) -> Any:
    """Rows `indices` of rowset as GRPO rows (a `datasets.Dataset`, as TRL requires): `prompt` (the vlm-tune messages
    without the answer), `images`, and the columns the rewards read (`answers`) or the logs show (`id`, `type`).
    It holds only row indices: each row (and its images) is built when taken."""
    from datasets import Dataset

    def rows(batch: dict[str, list]) -> dict[str, list]:
        built = [prompt_row(rowset.row(indices[i]), system, user_template) for i in batch["index"]]
        return {k: [r[k] for r in built] for k in ("prompt", "images", "answers", "id", "type")}

    from datasets.utils import logging as ds_logging

    level = ds_logging.get_verbosity()
    ds_logging.set_verbosity_error()  # a closure has no stable hash ("couldn't be hashed"): nothing is cached
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Dataset.from_dict({"index": list(range(len(indices)))}).with_transform(rows)
    finally:
        ds_logging.set_verbosity(level)


def prompt_row(row: dict[str, Any], system: str | None, user_template: str) -> dict[str, Any]:
    """One row in GRPO's layout, prompt built by the prompt contract (`build_messages`)."""
    return {
        "prompt": build_messages(row, system, user_template, with_answer=False),
        "images": list(row["images"]),
        "answers": list(row["answers"]),
        "id": str(row.get("id")),
        "type": row.get("type", "all"),
    }


def token_budget(cfg: Config) -> int:
    """Tokens a GRPO row's prompt (+ gold answer) may take: train.max_length less rl.max_completion_length."""
    return cfg.train.max_length - cfg.rl.max_completion_length


def rl_problems_with(cfg: Config, processor: Any) -> list[str]:
    """What the stage cannot do with this config and model, each naming the key (`vlm-tune check` lists them)."""
    problems = []
    fam = family_of_processor(processor)
    if fam.prefix_lm:
        problems.append(
            f"train.stage: grpo is not supported for {fam.name} (a prefix-LM without a chat template: TRL's "
            "GRPOTrainer renders conversational prompts only); use train.stage: sft"
        )
    if cfg.rl.use_vllm and not vllm_installed():
        problems.append(
            "rl.use_vllm: true but vLLM is not installed; install the [vllm] extra on a GPU machine or set "
            "rl.use_vllm=false"
        )
    elif cfg.rl.use_vllm and not torch.cuda.is_available():
        problems.append(
            "rl.use_vllm: true needs a CUDA GPU; set rl.use_vllm=false to generate with transformers"
        )
    if token_budget(cfg) < 16:
        problems.append(
            f"rl.max_completion_length={cfg.rl.max_completion_length} leaves {token_budget(cfg)} of "
            f"train.max_length={cfg.train.max_length} for the prompt; raise train.max_length"
        )
    return problems


def rl_preflight(cfg: Config, processor: Any) -> None:
    """`rl_problems_with` as one UserError, before anything runs."""
    problems = rl_problems_with(cfg, processor)
    if problems:
        raise UserError("; ".join(problems))


def vllm_installed() -> bool:
    """Whether vLLM can be imported (TRL's colocate generation needs it)."""
    return importlib.util.find_spec("vllm") is not None


def grpo_arguments(cfg: Config, run_dir: Path) -> Any:
    """Config → trl.GRPOConfig: one generation per optimizer step of rl.prompts_per_step groups."""
    from trl import GRPOConfig

    from vlm_tune.trainer import common_arguments

    r = cfg.rl
    return GRPOConfig(
        **common_arguments(cfg, run_dir),
        per_device_train_batch_size=r.prompts_per_step * r.num_generations,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=r.num_generations,
        max_completion_length=r.max_completion_length,
        temperature=r.temperature,
        beta=r.beta,
        learning_rate=r.learning_rate,
        lr_scheduler_type="constant",
        max_steps=r.steps,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        use_vllm=r.use_vllm,
        vllm_mode="colocate",
    )


def make_grpo_trainer(
    model: Any, processor: Any, cfg: Config, dataset: Any, run_dir: Path, callbacks: list
) -> Any:
    """TRL's GRPOTrainer over `model` (a PeftModel: the policy; its "ref" adapter, if loaded, the reference)."""
    from trl import GRPOTrainer

    from vlm_tune.rewards import build_rewards

    stop_at_end_of_turn(model, processor)
    fam = family_of_processor(processor)
    funcs, weights = build_rewards(
        cfg.rl.rewards, processor.tokenizer, fam.end_of_turn, cfg.rl.answer_format, cfg.rl.format_max_tokens
    )
    args = grpo_arguments(cfg, run_dir)
    args.reward_weights = weights
    return GRPOTrainer(
        model=model,
        reward_funcs=funcs,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=callbacks,
    )


def load_policy(model: Any, cfg: Config) -> Any:
    """The policy: model.adapter continued, or a new adapter on the base. With rl.beta > 0 GRPOTrainer copies
    this adapter, as it is before the first step, into a frozen adapter "ref", its KL reference: the SFT
    model when continuing (not the bare base), the base for a new adapter (LoRA B starts at zero)."""
    from vlm_tune.model import continue_adapter, setup_training

    return continue_adapter(model, cfg) if cfg.model.adapter else setup_training(model, cfg)


def build_adapter_first(cfg: Config, sft: Callable[..., Path]) -> None:
    """rl.build_adapter: train the missing model.adapter by SFT (train.*, run by `sft`: `vlm_tune.train.train`)
    into its run directory."""
    adapter = Path(cfg.model.adapter or "")
    if not cfg.rl.build_adapter or (adapter / "adapter_config.json").is_file():
        return
    raw = cfg.to_dict()
    raw["train"]["stage"] = "sft"
    raw["model"]["adapter"] = None
    raw["run"] |= {"output_dir": str(adapter.parent), "name": f"{cfg.run.name}-sft"}
    raw["eval"] |= {"baselines": [], "at_end": False, "every_steps": None}
    raw["hub"]["push_on_end"] = False
    console.print(
        f"[vlm-tune] model.adapter {adapter} is missing: training it first (SFT, {cfg.train.max_steps} steps)"
    )
    sft_cfg = Config.model_validate(raw)
    sft(sft_cfg, overwrite=True)
    if adapter.name != "final" or not (adapter / "adapter_config.json").is_file():
        raise UserError(
            f"model.adapter: SFT wrote {adapter.parent / 'final'}, not {adapter}; point model.adapter there"
        )


def train_grpo(
    cfg: Config, resume: str | None = None, overwrite: bool = False, *, sft: Callable[..., Path]
) -> Path:
    """Run the GRPO stage described by cfg; returns the run directory. `sft` (`vlm_tune.train.train`) trains a
    missing model.adapter first (rl.build_adapter)."""
    from vlm_tune.data.sources import LazyRows, load_split
    from vlm_tune.model import load_model, load_processor, resolve_model_path
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
    from vlm_tune.runtime import for_config
    from vlm_tune.trainer import CheckpointMarker, plot_history

    t_start = time.perf_counter()
    rt = for_config(cfg)
    model_path = resolve_model_path(cfg)
    processor = load_processor(model_path, cfg)
    rl_preflight(cfg, processor)  # before anything runs, the SFT stage that builds model.adapter included
    build_adapter_first(cfg, sft)
    _, run_dir, checkpoint = open_run(cfg, rt, resume, overwrite)
    d = cfg.data
    collator = make_collator(processor, cfg.prompt.system, cfg.prompt.user_template, cfg.train.max_length)
    train_split, eval_split = prepare_splits(
        cfg,
        load_split(d, d.train_split, cfg.model.cache_dir),
        load_split(d, d.eval_split, cfg.model.cache_dir),
        processor,
        collator,
        token_budget(cfg),  # prompt + answer, leaving room for the completion within train.max_length
        cfg.logging.progress,
    )
    eval_rows = LazyRows.of(eval_split)

    model = load_policy(load_model(model_path, cfg, rt), cfg)
    start = "start"
    results: dict[str, dict[str, Any]] = {}
    if checkpoint is None:  # the starting model (model.adapter, or the base) scored before any RL step
        results[start] = evaluate_in_run(
            model, processor, collator, eval_rows, cfg, run_dir / "eval" / start, protocol=True
        )
    indices = list(train_split.indices)
    if cfg.rl.skip_solved and checkpoint is None:
        indices = drop_solved(model, processor, collator, cfg, train_split.rowset, indices, run_dir)
        (run_dir / "rl_rows.json").write_text(json.dumps(indices) + "\n")
    elif cfg.rl.skip_solved:  # a resumed stage trains on the rows the first run kept
        indices = json.loads((run_dir / "rl_rows.json").read_text())
    dataset = prompt_dataset(train_split.rowset, indices, cfg.prompt.system, cfg.prompt.user_template)
    gen_eval = during_eval(cfg, processor, collator, eval_rows, run_dir, cfg.logging.progress)
    callbacks = [CheckpointMarker()] + ([gen_eval] if gen_eval else [])
    trainer = make_grpo_trainer(model, processor, cfg, dataset, run_dir, callbacks)
    if gen_eval is not None:
        gen_eval.log = trainer.log  # eval/<metric> in the trackers, beside the rewards
    trainer.train(resume_from_checkpoint=checkpoint)

    history = trainer.state.log_history
    if "ref" in getattr(trainer.model, "peft_config", {}):
        trainer.model.delete_adapter("ref")  # the frozen KL reference: final/ holds the trained adapter only
    save_final(trainer.model, processor, cfg, run_dir / "final")
    (run_dir / "train_log.json").write_text(json.dumps(history, indent=1) + "\n")
    plot_history(history, run_dir / "plots")
    zero = [h["frac_reward_zero_std"] for h in history if "frac_reward_zero_std" in h]
    if zero:
        console.print(
            f"[vlm-tune] zero-advantage groups (all completions same reward): {sum(zero) / len(zero):.0%}"
        )
    if cfg.eval.at_end:
        results["final"] = evaluate_in_run(
            trainer.model, processor, collator, eval_rows, cfg, run_dir / "eval" / "final", protocol=True
        )
        title = f"{cfg.run.name}: start ({_start_name(cfg)}) vs GRPO"
        compare_and_report(cfg, run_dir, results, eval_rows, (start,), lambda base: title)
    push_if_asked(cfg, run_dir)
    finish_run(cfg, run_dir, t_start)
    return run_dir


def _start_name(cfg: Config) -> str:
    return f"adapter {cfg.model.adapter}" if cfg.model.adapter else "base"
