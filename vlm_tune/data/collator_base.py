"""What every collator shares: the ignore index, the family's end-of-turn and image token ids, the base class
holding the prompt contract, and the image-token count of an image size. `collate.py` (chat templates) and
`prefix_lm.py` (PaliGemma) build on it; it imports neither."""

from __future__ import annotations

from typing import Any

from vlm_tune.families import family_of_processor

IGNORE_INDEX = -100


def end_of_turn_token(processor: Any) -> str:
    """The token that closes an assistant turn (the family's: SmolVLM <end_of_utterance>, Qwen <|im_end|>)."""
    return family_of_processor(processor).end_of_turn


def image_token_ids(processor: Any) -> set[int]:
    """Ids of every image-related special token of the processor's family: never supervised."""
    tok = processor.tokenizer
    ids = {tok.convert_tokens_to_ids(n) for n in family_of_processor(processor).image_tokens}
    return {i for i in ids if i is not None and i != tok.unk_token_id}


class PromptCollator:
    """What every collator holds: the processor, the prompt contract, the token budget, the family's end of
    answer and image token ids. `make_collator` picks the subclass for the processor's family."""

    def __init__(self, processor: Any, system: str | None, user_template: str, max_length: int | None = None):
        self.processor = processor
        self.system = system
        self.user_template = user_template
        self.max_length = max_length
        self.eot = end_of_turn_token(processor)
        self.image_ids = image_token_ids(processor)


def image_token_counts(processor: Any, sizes: list[tuple[int, int]]) -> list[int]:
    """Tokens each (height, width) image expands to, without running the image processor.

    A family whose expansion wraps the placeholder tokens in markers (SmolVLM's tiles, InternVL's `<img>`,
    LFM2-VL's) counts it itself (`Family.image_token_counts`). Otherwise the processor's
    `_get_num_multimodal_tokens`, which counts the placeholder tokens (transformers >= 5.25 for every
    processor): right where the expansion is placeholders only (Qwen's `<|image_pad|>` run).
    """
    counter = family_of_processor(processor).image_token_counts
    if counter is not None:
        return counter(processor, sizes)
    return [int(n) for n in processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]]
