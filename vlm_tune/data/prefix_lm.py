"""Rows → batches for prefix-LM families (PaliGemma): the processor's `suffix=` convention, no chat template.

The prompt contract for a prefix-LM (one decision, here):
- The prefix is every image of the row, then the system prompt (if any) and a newline, then the user text
  (`prompt.user_template` with the question): `<image>`×n [SYSTEM "\\n"] USER. The processor expands each
  `<image>` to the checkpoint's image tokens and adds `<bos>` after the images and "\\n" after the prompt.
  The prefix attends to itself in full (`token_type_ids` 0).
- The suffix is the answer, byte for byte, then `<eos>` (the processor appends it): `token_type_ids` 1,
  causal. Labels are exactly the suffix: the processor's own `labels` (input ids where token_type_ids is 1),
  so images, `<bos>`, the prompt and padding are -100.
- A prefix-LM has no turns: a conversational row (`messages`) may hold only an optional system message, one
  user message and its answer. Anything else is a UserError naming the row. Images always come first (the
  only place the model has for them), whatever their position in the user message.
- Generation feeds the same prefix, left-padded, with its token_type_ids (the model then attends to it in
  full, as in training) and stops at `<eos>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vlm_tune.data.chat import build_messages
from vlm_tune.data.collator_base import IGNORE_INDEX, PromptCollator, image_token_counts
from vlm_tune.errors import UserError


def _texts(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text" or "text" in part)


class PrefixLMCollator(PromptCollator):
    """Same interface as `vlm_tune.data.collate.ChatCollator`: training batches (right-padded, with labels
    and token_type_ids), generation batches (left-padded prefix only) and the pre-flight `count_tokens`."""

    # -- text ---------------------------------------------------------------------------------------------
    def prefix_and_answer(self, row: dict[str, Any], with_answer: bool = True) -> tuple[str, str | None]:
        """(prefix text with one `<image>` per image, answer or None): the layout the processor completes."""
        messages = build_messages(row, self.system, self.user_template, with_answer=with_answer)
        roles = [m["role"] for m in messages]
        body = roles[1:] if roles[:1] == ["system"] else roles
        if body not in (["user", "assistant"], ["user"]) or (with_answer and body != ["user", "assistant"]):
            raise UserError(
                f"row {row.get('id')}: PaliGemma is a prefix-LM without turns; a row is one question and one "
                f"answer (optional system text, one user message, one assistant answer), but this row has the "
                f"turns {roles}. Split multi-turn conversations into one row per question."
            )
        if not row["images"]:
            raise UserError(f"row {row.get('id')}: no image; PaliGemma needs at least one image per row")
        system = _texts(messages[0]) if roles[0] == "system" else None
        user = _texts(messages[roles.index("user")])
        text = f"{system}\n{user}" if system else user
        answer = _texts(messages[-1]) if with_answer else None
        return self.processor.image_token * len(row["images"]) + text, answer

    # -- batches ------------------------------------------------------------------------------------------
    def _encode(self, rows: Sequence[dict[str, Any]], with_answer: bool) -> Any:
        pairs = [self.prefix_and_answer(r, with_answer) for r in rows]
        tok = self.processor.tokenizer
        old = tok.padding_side
        tok.padding_side = "right" if with_answer else "left"
        try:
            return self.processor(
                text=[p for p, _ in pairs],
                images=[list(r["images"]) for r in rows],
                suffix=[a for _, a in pairs] if with_answer else None,
                padding=True,
                return_tensors="pt",
            )
        finally:
            tok.padding_side = old

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Training batch: input_ids, attention_mask, token_type_ids, pixel_values, labels (answer + <eos>)."""
        enc = self._encode(rows, with_answer=True)
        input_ids, labels = enc["input_ids"], enc["labels"]
        labels[enc["attention_mask"] == 0] = IGNORE_INDEX
        for token_id in self.image_ids:
            labels[input_ids == token_id] = IGNORE_INDEX
        if self.max_length is not None and input_ids.shape[1] > self.max_length:
            lengths = enc["attention_mask"].sum(1).tolist()
            raise UserError(
                f"batch rows {[r.get('id') for r in rows]} have {lengths} tokens, over "
                f"train.max_length={self.max_length}; run `vlm-tune check` to find over-long rows or raise "
                "train.max_length (PaliGemma's image tokens are fixed by its checkpoint)"
            )
        return dict(enc)

    def generation_batch(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Prefix-only batch, left-padded, with token_type_ids 0 (full attention over the prefix)."""
        enc = self._encode(rows, with_answer=False)
        enc.pop("labels", None)
        return dict(enc)

    def count_tokens(self, row: dict[str, Any]) -> dict[str, int]:
        """Token budget of one row without the image processor: the processor's own text layout, tokenized
        with the answer as the suffix; each `<image>` counts as the checkpoint's image tokens."""
        prefix, answer = self.prefix_and_answer(row, with_answer=True)
        tok = self.processor.tokenizer
        enc = tok(self._layout(prefix, row), text_pair=answer + tok.eos_token, return_token_type_ids=True)
        image = self._image_tokens(row)
        return {
            "total": len(enc["input_ids"]) - len(row["images"]) + image,
            "image": image,
            "supervised": sum(enc["token_type_ids"]),
        }

    def prompt_length(self, row: dict[str, Any]) -> int:
        """Tokens of the generation prefix (`generation_batch` without padding), counted as `count_tokens`
        counts; only the images' sizes are read (`row["images"]` may hold `ImageSize`s)."""
        prefix, _ = self.prefix_and_answer(row, with_answer=False)
        ids = self.processor.tokenizer(self._layout(prefix, row))["input_ids"]
        return len(ids) - len(row["images"]) + self._image_tokens(row)

    def _layout(self, prefix: str, row: dict[str, Any]) -> str:
        """The processor's text layout of a prefix (it adds `<bos>` after the images and a newline); it
        depends only on the number of images, so 1-pixel stand-ins are passed for them."""
        from PIL import Image

        blanks = [Image.new("RGB", (1, 1)) for _ in row["images"]]
        _, texts, *_ = self.processor.prepare_inputs_layout(images=[blanks], text=[prefix])
        return texts[0]

    def _image_tokens(self, row: dict[str, Any]) -> int:
        return sum(image_token_counts(self.processor, [(im.height, im.width) for im in row["images"]]))
