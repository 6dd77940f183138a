"""rl.skip_solved: drop the rows whose group carries no signal before the GRPO stage.

A row that every completion of a group solves, or none does, has zero advantage for every completion: GRPO learns
nothing from it and spends its generation time. Before the stage, the starting model samples one group per row
(rl.num_generations completions at rl.temperature, the stage's own sampling) and the rows it always or never solves
are dropped. "Solves" = the first metric reward in rl.rewards pays 1 (relaxed_accuracy or exact_match).
`stop_at_end_of_turn` sets the stop tokens this sampling and the stage's own (`vlm_tune.rl`) share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from vlm_tune.config import Config
from vlm_tune.families import family_of_processor
from vlm_tune.rewards import METRICS, metric_reward

console = Console(stderr=True)


def stop_at_end_of_turn(model: Any, processor: Any) -> list[int]:
    """Completions end at the family's end-of-turn token: it (and the tokenizer's eos) become the model's
    generation_config.eos_token_id, which TRL reads as its stop tokens. Returns the ids set."""
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(family_of_processor(processor).end_of_turn)]
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    model.generation_config.eos_token_id = ids
    return ids


def informative(groups: Sequence[Sequence[float]]) -> list[int]:
    """Positions of the groups whose completions did not all score the same (a non-zero advantage)."""
    return [i for i, g in enumerate(groups) if len(set(g)) > 1]


def solving_metric(cfg: Config) -> str:
    """The metric that decides whether a completion solves its row: the first metric reward in rl.rewards."""
    return next(n for n, w in cfg.rl.rewards.items() if n in METRICS and w != 0)


@torch.no_grad()
def sample_groups(
    model: Any, processor: Any, collator: Any, rows: Sequence[dict[str, Any]], cfg: Config
) -> list[list[str]]:
    """rl.num_generations sampled completions per row (special tokens kept), through the prompt contract."""
    from vlm_tune.runtime import autocast, compute_dtype, model_device

    was_training = model.training
    model.eval()
    eos = stop_at_end_of_turn(model, processor)
    tok, g = processor.tokenizer, cfg.rl.num_generations
    device, dtype = model_device(model), compute_dtype(model)
    per_batch = max(1, cfg.eval.batch_size // g)
    out: list[list[str]] = []
    for start in range(0, len(rows), per_batch):
        batch = collator.generation_batch([rows[i] for i in range(start, min(start + per_batch, len(rows)))])
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with autocast(device, dtype):
            ids = model.generate(
                **batch,
                do_sample=True,
                temperature=cfg.rl.temperature,
                max_new_tokens=cfg.rl.max_completion_length,
                num_return_sequences=g,
                eos_token_id=eos,
                pad_token_id=tok.pad_token_id,
            )
        texts = tok.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=False)
        out += [texts[k : k + g] for k in range(0, len(texts), g)]
    if was_training:
        model.train()
    return out


def drop_solved(
    model: Any,
    processor: Any,
    collator: Any,
    cfg: Config,
    rowset: Any,
    indices: list[int],
    run_dir: Path,
    sample: Callable[..., list[list[str]]] = sample_groups,
) -> list[int]:
    """The indices of rowset worth a GRPO step (see module doc); the counts go to RUN_DIR/rl_filter.json."""
    import json

    from vlm_tune.data.sources import LazyRows

    rows = LazyRows(rowset, indices)
    groups = sample(model, processor, collator, rows, cfg)
    metric = solving_metric(cfg)
    golds = [r["answers"] for r in rows.texts()]
    scores = [
        [metric_reward(c, gold, metric, cfg.rl.answer_format) for c in group]
        for group, gold in zip(groups, golds, strict=True)
    ]
    keep = informative(scores)
    solved = sum(1 for s in scores if min(s) == 1.0)
    record = {
        "rows": len(indices),
        "kept": len(keep),
        "all_solved": solved,
        "none_solved": len(scores) - len(keep) - solved,
    }
    (run_dir / "rl_filter.json").write_text(json.dumps(record | {"metric": metric}, indent=1) + "\n")
    console.print(f"[vlm-tune] rl.skip_solved ({metric}): {record}")
    if not keep:
        from vlm_tune.errors import UserError

        raise UserError(
            "rl.skip_solved: every row is always or never solved by the starting model; nothing to learn from"
        )
    return [indices[i] for i in keep]
