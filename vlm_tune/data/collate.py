"""Rows → model batches. Labels cover only assistant answers and their end-of-turn token.

How supervision is computed (and why it is exact):
1. Render the conversation with the processor's chat template. For each assistant turn i, the answer's
   character span starts where `render(messages[:i], add_generation_prompt=True)` ends and stops after the
   first end-of-turn token (`<end_of_utterance>` for SmolVLM) that follows.
2. The processor expands every `<image>` placeholder into the image's token block (tiles, row/column
   markers, global image) and reports where each expansion landed (`text_replacement_offsets`). Spans are
   shifted by the characters each earlier expansion added.
3. A token is supervised only if its character offsets lie inside a shifted span. Everything else (system,
   user text, all image-related tokens, padding) is -100; image-related ids are masked again by id.
Nothing is truncated: a row longer than the budget is rejected up front (see `count_tokens`).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch

from vlm_tune.data.chat import build_messages
from vlm_tune.data.collator_base import (
    IGNORE_INDEX,
    PromptCollator,
    end_of_turn_token,
    image_token_counts,
    image_token_ids,
)
from vlm_tune.data.prefix_lm import PrefixLMCollator
from vlm_tune.errors import UserError
from vlm_tune.families import family_of_processor

__all__ = [  # the base names stay importable from here, where every caller has always found them
    "IGNORE_INDEX",
    "ChatCollator",
    "PromptCollator",
    "count_tokens",
    "end_of_turn_token",
    "image_token_counts",
    "image_token_ids",
    "make_collator",
    "prompt_length",
]


class ChatCollator(PromptCollator):
    """Builds training batches (right-padded, with labels) or generation batches (left-padded, no answer)."""

    # -- text ---------------------------------------------------------------------------------------------
    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def answer_spans(
        self, messages: list[dict[str, Any]], row_id: Any = None
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of every assistant answer + end-of-turn.

        An answer the template changes (Gemma 3's trims whitespace) is refused, naming the row."""
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(prefix) and full.startswith(upto)):
                raise UserError(
                    "the chat template does not render conversations prefix-stably, so answer tokens cannot "
                    "be located; use a SmolVLM-style template"
                )
            end = upto.find(self.eot, len(prefix))
            end = len(upto) if end < 0 else end + len(self.eot)
            answer = _text_of(message["content"])
            if answer not in upto[len(prefix) : end]:
                raise UserError(
                    f"row {row_id}: the chat template changes the answer {answer!r} (it renders "
                    f"{upto[len(prefix) : end]!r}), so training would teach a different text; write the answer "
                    "as the template keeps it (e.g. without leading/trailing whitespace, which Gemma 3 trims)"
                )
            spans.append((len(prefix), end))
        return full, spans

    # -- batches ------------------------------------------------------------------------------------------
    def _encode(self, texts: list[str], images: list[list[Any]], padding_side: str) -> Any:
        tok = self.processor.tokenizer
        old = tok.padding_side
        tok.padding_side = padding_side
        try:
            return self.processor(
                text=texts,
                images=images,
                padding=True,
                padding_side=padding_side,  # some processors (InternVL) default to their own side otherwise
                return_tensors="pt",
                return_offsets_mapping=True,
                return_text_replacement_offsets=True,
                add_special_tokens=False,  # the chat template wrote them (Gemma's <bos>: else twice)
            )
        finally:
            tok.padding_side = old

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Training batch: input_ids, attention_mask, pixel_values, pixel_attention_mask, labels."""
        texts, all_spans = [], []
        for row in rows:
            messages = build_messages(row, self.system, self.user_template, with_answer=True)
            text, spans = self.answer_spans(messages, row.get("id"))
            texts.append(text)
            all_spans.append(spans)
        enc = self._encode(texts, [list(r["images"]) for r in rows], padding_side="right")
        offsets = enc.pop("offset_mapping")
        replacements = enc.pop("text_replacement_offsets", None) or [[] for _ in rows]
        input_ids = enc["input_ids"]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for b, spans in enumerate(all_spans):
            ends = [r["span"][1] for r in replacements[b]]
            gained = [0] + [r["new_span"][1] - r["span"][1] for r in replacements[b]]
            shifted = [
                (s + gained[bisect.bisect_right(ends, s)], e + gained[bisect.bisect_right(ends, e)])
                for s, e in spans
            ]
            mask = enc["attention_mask"][b].bool()
            for start, end in shifted:
                ts, te = offsets[b, :, 0], offsets[b, :, 1]
                inside = (ts >= start) & (te <= end) & (te > ts) & mask
                labels[b][inside] = input_ids[b][inside]
        for token_id in self.image_ids:
            labels[input_ids == token_id] = IGNORE_INDEX
        if self.max_length is not None and input_ids.shape[1] > self.max_length:
            lengths = enc["attention_mask"].sum(1).tolist()
            ids = [r.get("id") for r in rows]
            raise UserError(
                f"batch rows {ids} have {lengths} tokens, over train.max_length={self.max_length}; "
                "run `vlm-tune check` to find over-long rows, lower model.image.longest_edge, or raise "
                "train.max_length"
            )
        enc["labels"] = labels
        return dict(enc)

    def generation_batch(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Prompt-only batch, left-padded for generation; the prompt is the same one training used."""
        texts = [
            self.render(
                build_messages(r, self.system, self.user_template, with_answer=False),
                add_generation_prompt=True,
            )
            for r in rows
        ]
        enc = self._encode(texts, [list(r["images"]) for r in rows], padding_side="left")
        enc.pop("offset_mapping", None)
        enc.pop("text_replacement_offsets", None)
        return dict(enc)


def make_collator(
    processor: Any, system: str | None, user_template: str, max_length: int | None = None
) -> PromptCollator:
    """The collator for the processor's family: `ChatCollator`, or `PrefixLMCollator` for a prefix-LM
    (PaliGemma: no chat template; prompt = prefix, answer = suffix). Every train/eval/predict/check path
    builds its collator here."""
    if family_of_processor(processor).prefix_lm:
        return PrefixLMCollator(processor, system, user_template, max_length)
    return ChatCollator(processor, system, user_template, max_length)


def count_tokens(processor: Any, collator: PromptCollator, row: dict[str, Any]) -> dict[str, int]:
    """Token budget of one row without running the image processor: total, image and supervised tokens."""
    if not isinstance(collator, ChatCollator):  # a prefix-LM collator counts its own layout
        return collator.count_tokens(row)
    messages = build_messages(row, collator.system, collator.user_template, with_answer=True)
    text, spans = collator.answer_spans(messages, row.get("id"))
    total, image_tokens, enc = _expanded(processor, text, row["images"])
    supervised = sum(1 for (s, e) in enc["offset_mapping"] for (a, b) in spans if e > s and s >= a and e <= b)
    return {"total": total, "image": image_tokens, "supervised": supervised}


def prompt_length(processor: Any, collator: PromptCollator, row: dict[str, Any]) -> int:
    """Tokens of the row's generation prompt (`generation_batch` without padding), without the image processor.

    Only the images' sizes are read, so `row["images"]` may hold `ImageSize`s (`RowSet.row(i, "sizes")`).
    """
    if not isinstance(collator, ChatCollator):
        return collator.prompt_length(row)
    messages = build_messages(row, collator.system, collator.user_template, with_answer=False)
    return _expanded(processor, collator.render(messages, add_generation_prompt=True), row["images"])[0]


def _expanded(processor: Any, text: str, images: Sequence[Any]) -> tuple[int, int, Any]:
    """(tokens of a rendered text once its image placeholders are expanded, image tokens, the text's own
    encoding with offsets), as the processor tokenizes in the collator: no special tokens added (the template
    wrote them: Gemma 3's and LFM2-VL's <bos>)."""
    tok = processor.tokenizer
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    sizes = [(im.height, im.width) for im in images]
    placeholder = getattr(processor, "image_token", "<image>")
    n_placeholders = text.count(placeholder)
    expand = family_of_processor(processor).expand_image_placeholders
    if expand is not None and sizes:
        total = len(tok(expand(processor, text, sizes), add_special_tokens=False)["input_ids"])
        return total, total - (len(enc["input_ids"]) - n_placeholders), enc
    image_tokens = sum(image_token_counts(processor, sizes)) if sizes else 0
    return len(enc["input_ids"]) - n_placeholders + image_tokens, image_tokens, enc


def _text_of(content: Any) -> str:
    """The text of a message's content (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")
