"""Randomly initialised models with the published SmolVLM architectures, built offline, for benchmarks.

A benchmark of speed and memory needs the real layer sizes, not the real weights. `build_shape_model`
writes a model with the published dimensions plus a processor that tiles images like the real one; both
load with `AutoModelForImageTextToText` / `AutoProcessor` (and so with `model.name_or_path: <dir>`).
The weights are random: losses and answers mean nothing, FLOPs, memory and throughput do.

Architecture values are as published in the models' `config.json` and processor configs on the hub. They
were written down from knowledge of those files, not downloaded (no network here); the parameter counts
they give match the hub's 256M and 2.25B, which checks the layer sizes (see below). Values
that do not change speed or memory (rope_theta, max_position_embeddings) are the least certain.

* ``smolvlm-256m`` = HuggingFaceTB/SmolVLM-256M-Instruct. Vision: SigLIP base-patch16-512-like
  (hidden 768, 12 layers, 12 heads, MLP 3072, image 512, patch 16 → 32×32 = 1024 patches per tile).
  Text: SmolLM2-135M-like Llama (hidden 576, 30 layers, 9 heads, 3 KV heads, head_dim 64, MLP 1536,
  rope_theta 100000, 8192 positions, untied lm_head). Connector: pixel shuffle, scale_factor 4 →
  1024 / 4² = 64 image tokens per 512-px tile. Processor: longest_edge 2048, max_image_size 512
  (so a chart is resized to 2048 px and cut into 4×4 tiles + 1 global view = 17 × 64 = 1088 image tokens).
* ``smolvlm-2.2b`` = HuggingFaceTB/SmolVLM-Instruct. Vision: SigLIP so400m-patch14-384-like
  (hidden 1152, 27 layers, 16 heads, MLP 4304, image 384, patch 14 → 27×27 = 729 patches per tile).
  Text: SmolLM2-1.7B-like Llama (hidden 2048, 24 layers, 32 heads, 32 KV heads, MLP 8192,
  rope_theta 273768, 16384 positions, untied lm_head). scale_factor 3 → 729 / 3² = 81 image tokens
  per 384-px tile. Processor: longest_edge 1536, max_image_size 384 (4×4 tiles + global = 1377 tokens).

Approximations (everything else is as published):

* Tokenizer: our offline byte-level BPE (~760 tokens) with SmolVLM's published special tokens and chat
  template and the published image processor settings (`vlm_tune.families.smolvlm`), not the 49k SmolLM2
  tokenizer. Chart prompts are short and made of words the BPE was trained on, so text lengths are close to
  the real ones; image tokens, which dominate, are exact. The special-token ids differ (e.g. ``<image>`` is 4
  here, 49190 there; ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` are 0, 1, 2 in both).
* Vocabulary: the text model keeps the *published* vocab_size (49280 for 256M, 49155 for 2.2B) so the
  embedding, the lm_head, the logits memory and the parameter count match; the ids above the tokenizer's
  (~760 tokens; BPE target 800) are never fed in, but they get logits like in the real model. Sizing the
  embedding to our tokenizer instead would remove ``2 × (49280 − 800) × 576 ≈ 55.8 M`` parameters from 256M (−22 %) and
  ``2 × (49155 − 800) × 2048 ≈ 198 M`` from 2.2B (−9 %): see `vocab_difference`.
* Parameter counts (`parameter_count`, computed on the meta device): 256M → 256,484,928; 2.2B →
  2,246,272,880 (the hub lists the models as 256M and 2.25B parameters).

``tiny`` is the builtin test model (`vlm_tune.families.smolvlm.TinySpec`), listed so scripts can take any shape
name.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vlm_tune.errors import UserError


@dataclass(frozen=True)
class Shape:
    """One published architecture (see the module docstring for the sources)."""

    hub_id: str
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    vision_image_size: int
    patch_size: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vocab_size: int
    rope_theta: float
    max_position_embeddings: int
    scale_factor: int
    longest_edge: int
    tile_size: int
    nominal_params: float

    @property
    def image_seq_len(self) -> int:
        """Image tokens per tile: (image_size / patch)² patches, pixel-shuffled by scale_factor²."""
        return (self.vision_image_size // self.patch_size) ** 2 // self.scale_factor**2


SHAPES: dict[str, Shape] = {
    "smolvlm-256m": Shape(
        hub_id="HuggingFaceTB/SmolVLM-256M-Instruct",
        vision_hidden=768,
        vision_layers=12,
        vision_heads=12,
        vision_intermediate=3072,
        vision_image_size=512,
        patch_size=16,
        text_hidden=576,
        text_layers=30,
        text_heads=9,
        text_kv_heads=3,
        text_intermediate=1536,
        vocab_size=49280,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        scale_factor=4,
        longest_edge=2048,
        tile_size=512,
        nominal_params=256e6,
    ),
    "smolvlm-2.2b": Shape(
        hub_id="HuggingFaceTB/SmolVLM-Instruct",
        vision_hidden=1152,
        vision_layers=27,
        vision_heads=16,
        vision_intermediate=4304,
        vision_image_size=384,
        patch_size=14,
        text_hidden=2048,
        text_layers=24,
        text_heads=32,
        text_kv_heads=32,
        text_intermediate=8192,
        vocab_size=49155,
        rope_theta=273768.0,
        max_position_embeddings=16384,
        scale_factor=3,
        longest_edge=1536,
        tile_size=384,
        nominal_params=2.2e9,
    ),
    # the builtin tiny model (vlm_tune.families.smolvlm.TinySpec defaults); built by vlm_tune.families.smolvlm
    "tiny": Shape(
        hub_id="builtin:tiny",
        vision_hidden=64,
        vision_layers=3,
        vision_heads=4,
        vision_intermediate=128,
        vision_image_size=32,
        patch_size=8,
        text_hidden=128,
        text_layers=2,
        text_heads=4,
        text_kv_heads=2,
        text_intermediate=256,
        vocab_size=800,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        scale_factor=2,
        longest_edge=64,
        tile_size=32,
        nominal_params=0.0,
    ),
}
SPEC_FILE = "shape_spec.json"
TOKENIZER_VOCAB = 800  # the offline BPE's target size (vlm_tune.standins.scaffold.build_tokenizer)
BUILD = 2  # bump when the processor or tokenizer built here changes, so cached shape models are rebuilt


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise UserError(f"unknown shape {name!r}; choose one of {sorted(SHAPES)}")
    return SHAPES[name]


def _special_id(token: str) -> int:
    """Ids of our tokenizer's special tokens: the BPE trainer adds them first, in SPECIAL_TOKENS order."""
    from vlm_tune.families.smolvlm import SPECIAL_TOKENS

    return SPECIAL_TOKENS.index(token)


def shape_config(name: str, vocab_size: int | None = None) -> Any:
    """The Idefics3Config of a shape (no weights, no tokenizer). vocab_size=None → the published vocab."""
    from transformers import Idefics3Config

    s = get_shape(name)
    pad, eos, image = (_special_id(t) for t in ("<|im_end|>", "<end_of_utterance>", "<image>"))
    return Idefics3Config(
        vision_config={
            "hidden_size": s.vision_hidden,
            "intermediate_size": s.vision_intermediate,
            "num_hidden_layers": s.vision_layers,
            "num_attention_heads": s.vision_heads,
            "image_size": s.vision_image_size,
            "patch_size": s.patch_size,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": vocab_size or s.vocab_size,
            "hidden_size": s.text_hidden,
            "intermediate_size": s.text_intermediate,
            "num_hidden_layers": s.text_layers,
            "num_attention_heads": s.text_heads,
            "num_key_value_heads": s.text_kv_heads,
            "head_dim": s.text_hidden // s.text_heads,
            "max_position_embeddings": s.max_position_embeddings,
            "rope_theta": s.rope_theta,
            "rms_norm_eps": 1e-5,
            "pad_token_id": pad,
            "eos_token_id": eos,
            "bos_token_id": _special_id("<|im_start|>"),
            "tie_word_embeddings": False,
        },
        scale_factor=s.scale_factor,
        image_token_id=image,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )


def config_image_seq_len(config: Any) -> int:
    """Image tokens per tile implied by an Idefics3Config (what the processor's image_seq_len must be)."""
    v = config.vision_config
    return (v.image_size // v.patch_size) ** 2 // config.scale_factor**2


def parameter_count(name: str, vocab_size: int | None = None) -> dict[str, int]:
    """Parameters of a shape, counted on the meta device (nothing allocated): total and per part."""
    import torch
    from transformers import Idefics3ForConditionalGeneration

    with torch.device("meta"):
        model = Idefics3ForConditionalGeneration(shape_config(name, vocab_size))
    parts = {"vision": 0, "connector": 0, "text": 0, "embeddings": 0, "lm_head": 0}
    for pname, p in model.named_parameters():
        if pname.startswith("lm_head"):
            parts["lm_head"] += p.numel()
        elif "embed_tokens" in pname:
            parts["embeddings"] += p.numel()
        elif ".vision_model." in f".{pname}":
            parts["vision"] += p.numel()
        elif ".connector." in f".{pname}":
            parts["connector"] += p.numel()
        else:
            parts["text"] += p.numel()
    parts["total"] = sum(parts.values())
    return parts


def vocab_difference(name: str, tokenizer_vocab: int = TOKENIZER_VOCAB) -> int:
    """Parameters the embedding + untied lm_head would lose if sized to our tokenizer instead."""
    s = get_shape(name)
    return 2 * (s.vocab_size - tokenizer_vocab) * s.text_hidden


def shape_processor(name: str) -> Any:
    """The Idefics3Processor of a shape: our offline tokenizer with SmolVLM's special tokens, the published
    chat template and image processor settings, the shape's tiling and image_seq_len."""
    from transformers import Idefics3Processor

    from vlm_tune.families.smolvlm import SMOLVLM_256M, TinySpec, build_tokenizer, tiny_image_processor

    tokenizer = build_tokenizer(TOKENIZER_VOCAB)
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<image>"):
        if tokenizer.convert_tokens_to_ids(token) != _special_id(token):  # guards shape_config's ids
            raise RuntimeError(f"tokenizer id of {token} is not {_special_id(token)}")
    s = get_shape(name)
    spec = TinySpec(image_longest_edge=s.longest_edge, tile_size=s.tile_size, do_image_splitting=True)
    return Idefics3Processor(
        image_processor=tiny_image_processor(spec),
        tokenizer=tokenizer,
        image_seq_len=s.image_seq_len,
        chat_template=SMOLVLM_256M.template(),
    )


def build_shape_model(
    name: str, out_dir: str | Path, seed: int = 0, dtype: str = "bfloat16", device: str | None = None
) -> Path:
    """Write a random-init model with a published architecture + processor to out_dir; returns out_dir.

    dtype: weights as saved ("bfloat16" halves the files: 0.5 GB for 256M, 4.5 GB for 2.2B).
    device: where to initialise ("cuda" is much faster for 2.2B); None = CPU. Written atomically.
    """
    import torch

    from vlm_tune.families.smolvlm import SMOLVLM_256M

    if name == "tiny":
        from vlm_tune.families.smolvlm import ensure_tiny_model

        return ensure_tiny_model(out_dir, seed)
    get_shape(name)
    out_dir = Path(out_dir)
    if out_dir.exists() and not (
        out_dir.is_dir() and ((out_dir / SPEC_FILE).is_file() or not any(out_dir.iterdir()))
    ):
        raise UserError(f"{out_dir} exists and is not an empty directory or an earlier shape build")
    from transformers import Idefics3ForConditionalGeneration

    processor = shape_processor(name)
    config = shape_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if device and device.startswith("cuda"):
            torch.cuda.manual_seed_all(seed)
        with torch.device(device or "cpu"):
            model = Idefics3ForConditionalGeneration(config)
    model = model.to(getattr(torch, dtype))
    # as published: eos <end_of_utterance>, pad <|im_end|>, bos <|endoftext|>
    for key, token in SMOLVLM_256M.generation_tokens().items():
        setattr(model.generation_config, key, _special_id(token))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    from vlm_tune.standins.scaffold import save_built_model

    save_built_model(model, processor, out_dir, SPEC_FILE, _marker(name, seed, dtype))
    del model
    return out_dir


def _marker(name: str, seed: int, dtype: str) -> dict[str, Any]:
    return {"shape": name, "build": BUILD, "seed": seed, "dtype": dtype, **asdict(get_shape(name))}


def ensure_shape_model(
    name: str, out_dir: str | Path, seed: int = 0, dtype: str = "bfloat16", device: str | None = None
) -> Path:
    """out_dir if it already holds this build (same shape, seed, dtype), else build it there."""
    out_dir = Path(out_dir)
    if name == "tiny":
        from vlm_tune.families.smolvlm import ensure_tiny_model

        return ensure_tiny_model(out_dir, seed)
    marker = out_dir / SPEC_FILE
    if marker.is_file() and json.loads(marker.read_text()) == _marker(name, seed, dtype):
        return out_dir
    return build_shape_model(name, out_dir, seed, dtype, device)
