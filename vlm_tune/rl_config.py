"""The `rl:` section of the config (the GRPO stage, `train.stage: grpo`) and its cross-field rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


REWARD_NAMES = ("relaxed_accuracy", "exact_match", "format")


class RlSection(_Section):
    num_generations: int = Field(4, ge=2, description="Completions sampled per row (the GRPO group size).")
    prompts_per_step: int = Field(
        4,
        ge=1,
        description="Rows per optimizer step; completions per step = prompts_per_step x num_generations.",
    )
    max_completion_length: int = Field(16, ge=1, description="Most tokens generated per completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the completions.")
    beta: float = Field(
        0.0,
        ge=0,
        description="KL coefficient against the reference (the starting model: model.adapter when set, else the "
        "base). 0 = no KL term, no reference forward.",
    )
    learning_rate: float = Field(1e-5, gt=0, description="Learning rate (constant) of the RL stage.")
    steps: int = Field(100, ge=1, description="Optimizer steps of the RL stage.")
    rewards: dict[str, float] = Field(
        default_factory=lambda: {"relaxed_accuracy": 1.0},
        description="Reward name -> weight: relaxed_accuracy, exact_match (the evaluation metrics, max over all "
        "gold answers), format (a short answer closed by the family's end-of-turn token; tags when tagged).",
    )
    answer_format: Literal["plain", "tagged"] = Field(
        "plain",
        description="plain: the completion is the answer; tagged: the answer is the text in <answer>...</answer> "
        "(reasoning before it is not scored). Saved in prompt.json: evaluation, predict and the card take it so.",
    )
    format_max_tokens: int = Field(
        8, ge=1, description="Format reward: most completion tokens an answer may take (plain format)."
    )
    skip_solved: bool = Field(
        False,
        description="Before the stage, sample a group per row with the starting model and drop rows that every "
        "or no completion solves (their advantage is zero: no signal).",
    )
    use_vllm: bool = Field(
        False, description="Generate completions with vLLM (TRL colocate mode; GPU, extra [vllm])."
    )
    build_adapter: bool = Field(
        False,
        description="When model.adapter does not exist yet, first train it by SFT (the train.* keys) into its run "
        "directory (model.adapter's parent), then run this stage.",
    )


def run_answer_format(cfg: Any) -> str:
    """The run's answer format (saved in prompt.json, used by every evaluation of the run): rl.answer_format for a
    GRPO run, plain for every SFT run."""
    return str(cfg.rl.answer_format) if cfg.train.stage == "grpo" else "plain"


def rl_problems(cfg: Any) -> list[str]:
    """The rl section's cross-field rules (train.stage grpo)."""
    problems = []
    unknown = sorted(set(cfg.rl.rewards) - set(REWARD_NAMES))
    if unknown:
        problems.append(f"rl.rewards: unknown reward(s) {unknown}; use {', '.join(REWARD_NAMES)}")
    if not cfg.rl.rewards or not any(w != 0 for w in cfg.rl.rewards.values()):
        problems.append("rl.rewards: give at least one reward a non-zero weight")
    if cfg.rl.skip_solved and not any(cfg.rl.rewards.get(m) for m in ("relaxed_accuracy", "exact_match")):
        problems.append(
            "rl.skip_solved: needs a metric reward (relaxed_accuracy or exact_match) in rl.rewards"
        )
    if cfg.train.stage == "grpo" and cfg.train.method == "full" and cfg.rl.beta > 0:
        problems.append(
            "rl.beta > 0 with train.method full: the reference would be a second full model; use lora"
        )
    if cfg.rl.build_adapter and not cfg.model.adapter:
        problems.append(
            "rl.build_adapter: true needs model.adapter (the adapter directory to build, RUN_DIR/final)"
        )
    if (
        cfg.rl.build_adapter
        and cfg.model.adapter
        and Path(cfg.model.adapter).parent == Path(cfg.run.output_dir)
    ):
        problems.append("model.adapter: must lie outside run.output_dir when rl.build_adapter builds it")
    if (
        cfg.train.stage == "grpo"
        and cfg.rl.answer_format == "tagged"
        and cfg.eval.max_new_tokens < cfg.rl.max_completion_length
    ):
        problems.append(
            f"eval.max_new_tokens ({cfg.eval.max_new_tokens}) < rl.max_completion_length "
            f"({cfg.rl.max_completion_length}) with rl.answer_format tagged: evaluation would cut the reasoning "
            "before the <answer> tags the reward reads; set eval.max_new_tokens to at least "
            f"{cfg.rl.max_completion_length}"
        )
    return problems
