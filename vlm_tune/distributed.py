"""Several processes (torchrun / accelerate launch): one pre-flight, sharded evaluation, full adapter saves.

With one process every function here does exactly what the plain single-process code does. With N
processes (DDP, or FSDP where every rank holds a shard of the weights):
- the pre-flight checks rows rank::N on each rank and the results are gathered, so every rank holds the
  same PreparedSplit (N times faster than each rank checking every row, and no rank idles in a collective);
- generation runs on rows rank::N on each rank and the answers are gathered in row order; every rank runs
  the same number of generate calls (FSDP forwards are collectives), and FSDP generation is synced
  token by token (transformers' `synced_gpus`), so a rank that finishes early keeps stepping;
- the final adapter of an FSDP run is gathered from all shards (a collective on every rank) before rank 0
  writes it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from vlm_tune.errors import UserError


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op with one process)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's obj, in rank order, on every rank ([obj] with one process)."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def interleave(parts: list[list[Any]], n: int) -> list[Any]:
    """Undo the rank::world split: parts[r][j] is item r + j * world of n."""
    world = len(parts)
    return [parts[i % world][i // world] for i in range(n)]


class Subset(Sequence):
    """A lazy view of rows[indices]: an item is fetched (its images decoded) only when asked for."""

    def __init__(self, rows: Sequence[Any], indices: Sequence[int]) -> None:
        self.rows, self.indices = rows, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self.rows[j] for j in self.indices[i]]
        return self.rows[self.indices[i]]


# ---------------------------------------------------------------------------------------------------------
# pre-flight


def prepare_split_shared(rowset: Any, *args: Any, limit: int | None = None, **kwargs: Any) -> Any:
    """`prepare_split` once for all ranks: each rank checks rows rank::N, the results are merged.

    Same arguments and result as `vlm_tune.data.sources.prepare_split`. A row error under
    on_bad_row/on_overlong=error is raised on every rank: the one of the first bad row, as one process
    would raise it. (The example shown per skip reason is the lowest rank's first.)
    """
    from vlm_tune.data.sources import PreparedSplit, prepare_split

    rank, world = rank_and_world()
    if world == 1:
        return prepare_split(rowset, *args, limit=limit, **kwargs)
    require_rows = kwargs.pop("require_rows", True)
    n = len(rowset) if limit is None else min(limit, len(rowset))
    try:
        part = prepare_split(rowset, *args, indices=range(rank, n, world), require_rows=False, **kwargs)
        mine: dict[str, Any] = {
            "indices": part.indices,
            "tokens": part.tokens,
            "skipped": dict(part.skipped),
            "examples": part.skipped_examples,
        }
    except UserError as err:  # raised on every rank below, so none waits in a collective
        mine = {"error": (getattr(err, "row_index", n), str(err))}
    parts = gather_objects(mine)
    errors = sorted(p["error"] for p in parts if "error" in p)
    if errors:
        raise UserError(errors[0][1])
    merged = PreparedSplit(rowset, [])
    order: list[tuple[int, dict[str, int] | None]] = []
    for p in parts:
        tokens = p["tokens"] or [None] * len(p["indices"])
        order += list(zip(p["indices"], tokens, strict=True))
        merged.skipped.update(Counter(p["skipped"]))
        for reason, example in p["examples"].items():
            merged.skipped_examples.setdefault(reason, example)
    order.sort(key=lambda x: x[0])
    merged.indices = [i for i, _ in order]
    merged.tokens = [t for _, t in order if t is not None]
    if require_rows and not merged.indices:
        raise UserError(f"{rowset.name}: no usable rows ({merged.summary()})")
    return merged


# ---------------------------------------------------------------------------------------------------------
# evaluation


def check_fsdp_version(trainer: Any, cfg: Any) -> None:
    """Before any step: evaluation of a sharded model needs FSDP2 (FSDP1 is refused here, not after training)."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if (
        plugin is not None
        and getattr(plugin, "fsdp_version", 1) == 1
        and (cfg.eval.every_steps or cfg.eval.at_end)
    ):
        raise UserError(
            "FSDP version 1 cannot generate for evaluation here: set fsdp_version: 2 in the accelerate config "
            "(configs/accelerate/fsdp.yaml does), or eval.every_steps=null eval.at_end=false and evaluate "
            "final/ with `vlm-tune eval`"
        )


def is_fsdp(model: Any) -> bool:
    """True when any part of model is sharded by FSDP (1 or 2)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def _mark_synced_generation(model: Any) -> None:
    """Make transformers' generate step every rank until all are done (its check for FSDP2 looks for an
    attribute its own FSDP set-up writes; accelerate's does not write it)."""
    for m in model.modules():
        if hasattr(m, "generate") and hasattr(m, "generation_config"):
            m._is_fsdp_managed_module = True


def sharded_map(
    fn: Callable[[Sequence[Any]], list[Any]], rows: Sequence[Any], pad: bool = False
) -> list[Any]:
    """fn over rows, split rank::N over the ranks, results gathered in row order on every rank.

    pad=True gives every rank the same number of rows (repeating one, its result dropped), for fn whose
    steps are collectives (an FSDP model's forward).
    """
    rank, world = rank_and_world()
    if world == 1:
        return fn(rows)
    n = len(rows)
    mine = list(range(rank, n, world))
    extra = (-(-n // world) - len(mine)) if pad and n else 0
    positions = mine + [mine[-1] if mine else 0] * extra
    take = getattr(rows, "take", None)  # LazyRows: its own subset (image sizes readable without decoding)
    out = fn(take(positions) if take else Subset(rows, positions))
    return interleave(gather_objects(list(out)[: len(mine)]), n)


def generate_answers_sharded(
    model: Any,
    processor: Any,
    collator: Any,
    rows: Sequence[dict[str, Any]],
    batch_size: int,
    max_new_tokens: int,
    progress: str | None = None,
    postprocess: Callable[[str], str] | None = None,
    workers: int | str = "auto",
    stats: dict[str, Any] | None = None,
) -> list[str]:
    """`evaluate.generate_answers` with the rows split over all ranks; same answers, in row order, on every rank.

    A progress bar (when asked) is shown by rank 0 only, over its share of the rows; `stats` counts this rank's
    share.
    """
    from vlm_tune.evaluate import generate_answers

    rank, world = rank_and_world()
    bar = progress if rank == 0 else None

    post = {} if postprocess is None else {"postprocess": postprocess}

    def run(part: Sequence[dict[str, Any]]) -> list[str]:
        return generate_answers(
            model,
            processor,
            collator,
            part,
            batch_size,
            max_new_tokens,
            bar,
            workers=workers,
            stats=stats,
            **post,
        )

    fsdp = world > 1 and is_fsdp(model)
    if not fsdp:
        return sharded_map(run, rows)
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        raise UserError(
            "evaluation of an FSDP model needs FSDP2 (fully_shard): set fsdp_version: 2 in the accelerate config"
        )
    _mark_synced_generation(model)
    # generate() calls the inner model, not the wrapped root, so the root's pre-forward hook that would
    # gather its parameters never runs: gather them all here (inner units still gather per forward)
    for m in units:
        m.unshard()
    try:
        return sharded_map(run, rows, pad=True)
    finally:
        for m in units:
            m.reshard()


def evaluate_rows(
    model: Any,
    processor: Any,
    collator: Any,
    rows: Sequence[dict[str, Any]],
    cfg: Any,
    out: Any,
    extra: dict[str, Any] | None = None,
    progress: str | None = None,
    protocol: str | None = None,
    export: Sequence[str] = (),
    answer_format: str = "plain",
) -> dict[str, Any]:
    """`evaluate.evaluate` with generation sharded over the ranks; rank 0 writes predictions.jsonl and
    metrics.json; every rank gets the metrics. `protocol`, `export`, `answer_format`: as in `evaluate.evaluate`."""
    from vlm_tune.evaluate import evaluate

    return evaluate(
        model,
        processor,
        collator,
        rows,
        out,
        cfg.eval.batch_size,
        cfg.eval.max_new_tokens,
        extra=extra,
        progress=progress,
        generate=generate_answers_sharded,
        write=rank_and_world()[0] == 0,
        protocol=protocol,
        export=export,
        workers=cfg.train.dataloader_num_workers,
        answer_format=answer_format,
    )


# ---------------------------------------------------------------------------------------------------------
# saving


def full_state_dict(model: Any) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict of an FSDP model, on the CPU; None when model is not sharded.

    A collective: every rank must call it.
    """
    if rank_and_world()[1] == 1 or not is_fsdp(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
