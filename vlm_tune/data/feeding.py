"""Feeding generation: prompt batches made in DataLoader workers, rows grouped by prompt length.

Images are decoded, tiled and tokenized by `collator.generation_batch` inside the loader's worker processes
(as many as `vlm_tune.runtime.data_workers` decides; 0: in this process, through the same loader), while the
model generates on the batch before. Each worker prepares at most `PREFETCH` batches ahead, so at most
workers × PREFETCH batches (and one batch of decoded images per worker) exist besides the one generating.

Rows are batched by prompt length (longest first: the largest batch runs first, so an out-of-memory shows at
once), so left padding spends little prefill on pad tokens. The length of a row is measured without the image
processor and without decoding images where the rows can give image sizes (`LazyRows.sized`: read from the
file headers): `vlm_tune.data.collate.prompt_length`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

PREFETCH = 2  # batches each loader worker prepares ahead (DataLoader prefetch_factor)


def prompt_lengths(processor: Any, collator: Any, rows: Sequence[dict[str, Any]]) -> list[int]:
    """Each row's generation-prompt tokens; image sizes read from headers where `rows` has `sized(k)`
    (`LazyRows`), else from the row's images (decoded one row at a time, none kept)."""
    from vlm_tune.data.collate import prompt_length

    sized = getattr(rows, "sized", None)
    return [prompt_length(processor, collator, sized(k) if sized else rows[k]) for k in range(len(rows))]


def plan_batches(n: int, batch_size: int, lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Row positions of each batch: in row order (lengths None), else longest first (ties in row order)."""
    order = list(range(n)) if lengths is None else sorted(range(n), key=lambda k: -lengths[k])
    return [order[s : s + batch_size] for s in range(0, n, batch_size)]


class PromptBatches(Dataset):
    """Item b: the generation batch of rows `batches[b]` (their images decoded where it is built)."""

    def __init__(self, collator: Any, rows: Sequence[dict[str, Any]], batches: list[list[int]]) -> None:
        self.collator, self.rows, self.batches = collator, rows, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> dict[str, torch.Tensor]:
        return self.collator.generation_batch([self.rows[k] for k in self.batches[b]])


def prompt_loader(
    collator: Any, rows: Sequence[dict[str, Any]], batches: list[list[int]], workers: int, pin: bool
) -> DataLoader:
    """Batches in `batches` order, made by `workers` processes (0: in this one), pinned when `pin`."""
    return DataLoader(
        PromptBatches(collator, rows, batches),
        batch_size=None,  # each item already is a batch
        shuffle=False,
        num_workers=workers,
        prefetch_factor=PREFETCH if workers else None,
        pin_memory=pin,
    )
