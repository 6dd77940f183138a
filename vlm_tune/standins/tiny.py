"""Offline tiny SmolVLM (Idefics3) model, tokenizer and processor, deterministic per seed.

Its chat template, special tokens and processor settings are SmolVLM-256M-Instruct's published ones
(`vlm_tune.families.smolvlm.SMOLVLM_256M`); only the dims (tile 32 px, longest edge 64 px, 4 tokens per tile)
and the vocabulary (an 800-token BPE trained offline) are its own. Built with the shared scaffold
(`vlm_tune.standins.scaffold`), cached by its spec marker `tiny_spec.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vlm_tune.errors import UserError
from vlm_tune.standins.scaffold import replaceable, save_built_model

# bump when build_tiny_model's output changes (template, tokens, processor settings), so that tiny models already
# built in a cache (their tiny_spec.json) are rebuilt instead of reused. 2: SmolVLM-256M's published template,
# special tokens (bos <|im_start|>, pad <|im_end|>, unk <|endoftext|>) and generation ids
BUILD = 2


@dataclass
class TinySpec:
    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    vision_image_size: int = 32
    patch_size: int = 8
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256
    scale_factor: int = 2
    image_longest_edge: int = 64
    tile_size: int = 32
    do_image_splitting: bool = True
    vocab_size: int = 800


def _image_processor(spec: TinySpec) -> Any:
    """SmolVLM-256M's published image processor at the spec's longest edge, tile size and splitting."""
    from vlm_tune.families.smolvlm import image_processor

    return image_processor(
        size={"longest_edge": spec.image_longest_edge},
        max_image_size={"longest_edge": spec.tile_size},
        do_image_splitting=spec.do_image_splitting,
    )


def build_tiny_model(out_dir: str | Path, seed: int = 0, spec: TinySpec | None = None) -> Path:
    """Build and save the tiny model + processor in out_dir (atomically); returns out_dir."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    from vlm_tune.families.smolvlm import SMOLVLM_256M, build_tokenizer, generation_ids

    spec = spec or TinySpec()
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and replaceable(out_dir)):
        raise UserError(
            f"{out_dir} exists and is not an empty directory or an earlier tiny-model build "
            "(no tiny_spec.json); refusing to overwrite it. Choose a new or empty directory."
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size)  # SmolVLM's published special tokens
    image_seq_len = (spec.vision_image_size // spec.patch_size) ** 2 // spec.scale_factor**2
    processor = Idefics3Processor(
        image_processor=_image_processor(spec),
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=SMOLVLM_256M.template(),
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<|im_start|>", "<end_of_utterance>")}
    gen = generation_ids(tokenizer)
    config = Idefics3Config(
        vision_config={
            "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_hidden * 2,
            "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": spec.vision_heads,
            "image_size": spec.vision_image_size,
            "patch_size": spec.patch_size,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": spec.text_hidden,
            "intermediate_size": spec.text_intermediate,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads,
            "num_key_value_heads": spec.text_kv_heads,
            "max_position_embeddings": 2048,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": ids["<end_of_utterance>"],
            "bos_token_id": ids["<|im_start|>"],
            "tie_word_embeddings": False,
        },
        scale_factor=spec.scale_factor,
        image_token_id=ids["<image>"],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # Seed a forked RNG so the caller's global torch RNG (e.g. a run seed set before the model is
    # resolved, later used for LoRA init) is the same whether or not the tiny model was cached.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config)
    for key, value in gen.items():  # as published: eos <end_of_utterance>, pad <|im_end|>, bos <|endoftext|>
        setattr(model.generation_config, key, value)
    return save_built_model(model, processor, out_dir, "tiny_spec.json", _marker(seed, spec))


def ensure_tiny_model(out_dir: str | Path, seed: int = 0, spec: TinySpec | None = None) -> Path:
    """out_dir if it holds a complete build for this seed and spec, else build it there."""
    out_dir = Path(out_dir)
    marker = out_dir / "tiny_spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == _marker(seed, spec or TinySpec()):
        return out_dir
    return build_tiny_model(out_dir, seed, spec)


def _marker(seed: int, spec: TinySpec) -> dict[str, Any]:
    return {"build": BUILD, "seed": seed, **asdict(spec)}
