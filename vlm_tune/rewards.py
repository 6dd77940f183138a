"""GRPO rewards built on the evaluation metrics: the reward of a completion is the score `vlm-tune eval` gives it.

A completion's answer is taken by the function evaluation takes it with (`protocols.answer_of`): the completion
decoded with its special tokens kept, cut at the first end-of-turn marker, then the vlm-tune protocol's
post-processing (`metrics.clean_generation`). With `rl.answer_format: tagged` the text inside the last
`<answer>...</answer>` is that answer (reasoning before it is not scored; no tags = reward 0, as evaluation scores
it). relaxed_accuracy and exact_match are `vlm_tune.metrics`' own functions, max over
all gold answers of the row. `format` pays 1 for a short answer closed by the family's end-of-turn token (plain)
or for a completion that ends with `<answer>...</answer>` and the end-of-turn token (tagged).

No trl import here: the functions follow TRL's reward signature `(prompts, completions, **columns)` and read
`completion_ids` (the generated ids) and `answers` (the row's gold answers).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from vlm_tune.metrics import exact_match, relaxed_accuracy
from vlm_tune.protocols import answer_of, cut_at_end_of_turn

METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "relaxed_accuracy": relaxed_accuracy,
    "exact_match": exact_match,
}
_TAGGED_END = re.compile(r"<answer>.+?</answer>\s*$", re.DOTALL)

RewardFn = Callable[..., list[float]]


def metric_reward(raw: str, gold: Sequence[str], metric: str, answer_format: str = "plain") -> float:
    """The reward `metric` pays one completion: the metric of its answer against all gold answers."""
    answer = answer_of(raw, answer_format)
    return 0.0 if answer is None else float(METRICS[metric](answer, list(gold)))


def format_reward(raw: str, n_tokens: int, ended: bool, answer_format: str, max_tokens: int) -> float:
    """1.0 for a completion in the expected form, closed by the end-of-turn token (`ended`), else 0.0."""
    if not ended:
        return 0.0
    text = cut_at_end_of_turn(raw)
    if answer_format == "tagged":
        return 1.0 if _TAGGED_END.search(text) else 0.0
    return 1.0 if n_tokens <= max_tokens and answer_of(raw) else 0.0


def build_rewards(
    names_weights: dict[str, float], tokenizer: Any, eot: str, answer_format: str, format_max_tokens: int
) -> tuple[list[RewardFn], list[float]]:
    """TRL reward functions and their weights for `rl.rewards` (zero weights left out), in config order."""
    eot_id = tokenizer.convert_tokens_to_ids(eot)

    def decode(completion_ids: Sequence[Sequence[int]]) -> list[str]:
        return [tokenizer.decode(list(ids), skip_special_tokens=False) for ids in completion_ids]

    def make(name: str) -> RewardFn:
        if name == "format":

            def reward(prompts: Any, completions: Any, completion_ids: Any, **_: Any) -> list[float]:
                return [
                    format_reward(
                        raw, len(ids), bool(ids) and ids[-1] == eot_id, answer_format, format_max_tokens
                    )
                    for raw, ids in zip(decode(completion_ids), completion_ids, strict=True)
                ]

        else:

            def reward(
                prompts: Any, completions: Any, completion_ids: Any, answers: Any, **_: Any
            ) -> list[float]:
                return [
                    metric_reward(raw, gold, name, answer_format)
                    for raw, gold in zip(decode(completion_ids), answers, strict=True)
                ]

        reward.__name__ = name  # TRL logs rewards/<name>/mean
        return reward

    pairs = [(n, w) for n, w in names_weights.items() if w != 0]
    return [make(n) for n, _ in pairs], [float(w) for _, w in pairs]
