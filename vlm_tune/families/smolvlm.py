"""SmolVLM / SmolVLM2 / Idefics3: everything vlm-tune knows about this family.

Module names (transformers 5.x): decoder `model.text_model.layers.N.{self_attn,mlp}.*_proj`; projector
`model.connector.modality_projection.proj`; vision tower `model.vision_model` (its own q/k/v projections, so
presets are anchored). An image becomes tiles of `image_seq_len` `<image>` tokens, framed by
`<fake_token_around_image>`, `<row_i_col_j>` and `<global-img>` markers; an answer ends with
`<end_of_utterance>`. Resolution knobs: `model.image.longest_edge` → image processor `size`, `tile_size` →
`max_image_size`, `do_image_splitting`. The offline stand-in `builtin:tiny` is built here (`build_tiny_model`).
SmolVLM2's processor also loads where torchvision is missing (`auto_processor`).

Published values (pinned in `published/smolvlm/` and `published/smolvlm2/`, read by every SmolVLM stand-in:
`builtin:tiny`, `builtin:smollm2-135m`, the rehearsal stand-ins and the benchmark shapes):
- SmolVLM-256M-Instruct: the chat template (it renders list content only: a message whose content is a plain
  string loses its text, so vlm-tune always builds content lists), bos `<|im_start|>` (written by the template
  itself; the GPT-2 tokenizer adds nothing), eos `<end_of_utterance>`, pad `<|im_end|>`, unk `<|endoftext|>`,
  generation ids (eos `<end_of_utterance>`, pad `<|im_end|>`, bos `<|endoftext|>`), the Idefics3 image
  processor settings and image_seq_len 64. Its special_tokens_map.json names `<|im_end|>` as eos where
  tokenizer_config.json says `<end_of_utterance>`; transformers 5 takes tokenizer_config.json's, as here.
- SmolVLM-Instruct (2.2B): the same chat template (a byte-identical copy keyed by its id); no tokenizer or
  processor file of it was found, so its tokens and processor settings are unverified.
- SmolVLM2-256M-Video-Instruct: the SmolVLM image processor settings and image_seq_len 64; its chat template
  and tokenizer files were not found (unverified): its stand-in uses transformers' SmolVLMProcessor template and
  SmolVLM-256M's tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vlm_tune.errors import UserError
from vlm_tune.families.base import Family
from vlm_tune.families.pinned import Pinned, Published

TARGET_PRESETS = {
    "decoder": r"model\.text_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
    "projector": r"model\.connector\.modality_projection\.proj",
    "vision": r"model\.vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))",
}
VISION_MODULE = "model.vision_model"
IMAGE_TOKENS = ("<image>", "<fake_token_around_image>", "<global-img>") + tuple(
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
)


# -- published values ---------------------------------------------------------------------------------------
_XI_IX = "GitHub xi-ix/smolvlm_256m_ft, SmolVLM-256M-Instruct/{} at 0c7b2de5852fbaee6bb376c3f350c0dc0e306b9b"
_HUB_SMOLVLM2 = "https://huggingface.co/HuggingFaceTB/SmolVLM2-256M-Video-Instruct/blob/"
SMOLVLM_256M = Published(
    checkpoint="HuggingFaceTB/SmolVLM-256M-Instruct",
    chat_template=Pinned(
        "smolvlm/chat_template.json",
        "a68ad1a42681ae44eacd109ff8dd56a840f761c03d72f4ff4c515d092f882168",
        _XI_IX.format("chat_template.json") + " (the same text: GitHub huggingface/huggingface.js, "
        "packages/jinja/test/e2e.test.js at fe42e68017ffc76d09922ea8f9b38a6964345710)",
        "verbatim",
    ),
    tokens=Pinned(
        "smolvlm/tokens.json",
        "a169a051eb3af6d66b5991a1f584530f109d713041f67659981f4b18ecdabe1e",
        "token strings and ids extracted from " + _XI_IX.format("tokenizer_config.json"),
        "extracted",
    ),
    tokenizer_config=Pinned(
        "smolvlm/tokenizer_config.json",
        "36c6fd44d07d10fd8180ee6b46dcccf69fb7c06753968ff0d7e17b8bfe17b777",
        _XI_IX.format("tokenizer_config.json"),
        "verbatim",
    ),
    image_processor=Pinned(
        "smolvlm/preprocessor_config.json",
        "6cb6e36d6fcb88ca1502c4a26750715dc3e7dedddc9a8f17b27d8d167d1457e7",
        _XI_IX.format("preprocessor_config.json"),
        "verbatim",
    ),
    processor=Pinned(
        "smolvlm/processor_config.json",
        "e7bff42da73ae9eec9042ef20e066e11f1ee20f025358ff79131e3c0fb549b46",
        _XI_IX.format("processor_config.json")
        + " (hub page at 5f4a49800eeb99d3178822d32573b9314822b9ab agrees)",
        "verbatim",
    ),
    generation=Pinned(
        "smolvlm/generation_config.json",
        "067a2a54e5f87162ecac6e0e911cc4665fc8f7f3324794ecbac0f76badb56636",
        _XI_IX.format("generation_config.json"),
        "verbatim",
    ),
)
SMOLVLM_INSTRUCT = Published(
    checkpoint="HuggingFaceTB/SmolVLM-Instruct",
    chat_template=Pinned(
        "smolvlm/chat_template.json",
        SMOLVLM_256M.chat_template.sha256,  # type: ignore[union-attr]
        "GitHub huggingface/huggingface.js, packages/jinja/test/e2e.test.js at "
        "fe42e68017ffc76d09922ea8f9b38a6964345710, key HuggingFaceTB/SmolVLM-Instruct (byte-identical to the "
        "256M's chat_template.json)",
        "verbatim",
    ),
    unverified={
        "special_tokens": "no tokenizer file of SmolVLM-Instruct was found; its stand-in uses SmolVLM-256M's",
        "processor_settings": "no processor file of SmolVLM-Instruct was found; 384-px tiles, longest edge 1536 "
        "and 81 tokens per tile are written from knowledge of the hub files (vlm_tune.standins.shapes)",
    },
)
SMOLVLM2 = Published(
    checkpoint="HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
    image_processor=Pinned(
        "smolvlm2/preprocessor_config.json",
        "149e315d9410368e5491455bb06e0f763426e9e56cca731c13b24404a29b6374",
        _HUB_SMOLVLM2 + "refs%2Fpr%2F6/preprocessor_config.json (hub commit 017ae74, 599 B)",
        "transcribed",
    ),
    processor=Pinned(
        "smolvlm2/processor_config.json",
        "f3ad45028447b3562b4752be0d5916d6806c1ef589091a469608dcf0faa1737c",
        _HUB_SMOLVLM2 + "refs%2Fpr%2F3/processor_config.json (hub commit e62441b, 67 B)",
        "transcribed",
    ),
    unverified={
        "chat_template": "not found (the hub lists chat_template.json, 430 B, unseen); the stand-in uses "
        "transformers' SmolVLMProcessor default template",
        "special_tokens": "no tokenizer file of SmolVLM2 was found; its stand-in uses SmolVLM-256M's tokens",
    },
)
# SmolVLM's special tokens, in the order the offline tokenizer gives them ids: the first three at their published
# ids (<|endoftext|> 0, <|im_start|> 1, <|im_end|> 2), then the image tokens and the end of an answer
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>", *IMAGE_TOKENS]


def build_tokenizer(vocab_size: int = 800) -> Any:
    """The offline tokenizer (a BPE trained on chart-QA text) with SmolVLM-256M's published special tokens:
    bos <|im_start|> (never added by the tokenizer: the template writes it), eos <end_of_utterance>, pad
    <|im_end|>, unk <|endoftext|>."""
    from vlm_tune.standins.scaffold import build_tokenizer as bpe

    t = SMOLVLM_256M.special_tokens()
    return bpe(
        vocab_size,
        SPECIAL_TOKENS,
        eos=t["eos_token"],
        pad=t["pad_token"],
        unk=t["unk_token"],
        bos_token=t["bos_token"],
        add_bos_token=t["adds_bos"],
    )


def generation_ids(tokenizer: Any, published: Published = SMOLVLM_256M) -> dict[str, Any]:
    """generation_config ids (bos_token_id, eos_token_id, pad_token_id) of the published checkpoint, in
    `tokenizer`'s vocabulary."""
    return {k: tokenizer.convert_tokens_to_ids(v) for k, v in published.generation_tokens().items()}


def image_processor(published: Published = SMOLVLM_256M, **tiny: Any) -> Any:
    """The checkpoint's published image processor (its PIL class), with `tiny` overrides (size,
    max_image_size, do_image_splitting) for a stand-in's small dims."""
    import importlib

    import transformers

    name = published.settings()[0]["image_processor_type"]  # Idefics3ImageProcessor / SmolVLMImageProcessor
    module = "idefics3" if name.startswith("Idefics3") else "smolvlm"
    try:  # the PIL class by its own name (no torchvision warning)
        pil = importlib.import_module(f"transformers.models.{module}.image_processing_pil_{module}")
        cls = getattr(pil, f"{name}Pil")
    except (ImportError, AttributeError):  # older transformers
        cls = getattr(transformers, name)
    return cls(**(published.image_processor_kwargs() | tiny))


# model.image knob → what it sets on the image processor
IMAGE_KNOBS = {
    "longest_edge": "size: the longest edge an image is resized to, px",
    "tile_size": "max_image_size: the edge of each tile, px",
    "do_image_splitting": "do_image_splitting: tiles plus a global view, or one tile per image",
}


def apply_image_knobs(processor: Any, img: Any) -> None:
    """model.image → the image processor (longest edge, tile size, splitting)."""
    ip = processor.image_processor
    if img.longest_edge is not None:
        ip.size = {"longest_edge": img.longest_edge}
    if img.tile_size is not None:
        ip.max_image_size = {"longest_edge": img.tile_size}
    if img.do_image_splitting is not None:
        ip.do_image_splitting = img.do_image_splitting


def card_image_lines(image: dict[str, Any]) -> list[str]:
    """The model card snippet's lines that set model.image on a loaded SmolVLM processor."""
    lines = []
    if image.get("longest_edge"):
        lines.append(f'processor.image_processor.size = {{"longest_edge": {int(image["longest_edge"])}}}')
    if image.get("tile_size"):
        lines.append(
            f'processor.image_processor.max_image_size = {{"longest_edge": {int(image["tile_size"])}}}'
        )
    if image.get("do_image_splitting") is not None:
        lines.append(f"processor.image_processor.do_image_splitting = {bool(image['do_image_splitting'])}")
    return lines


def image_token_counts(processor: Any, sizes: list[tuple[int, int]]) -> list[int]:
    """Tokens each (height, width) image expands to: the processor's own expansion text, tokenized.

    The tile grid comes from the image processor (no pixels are processed) and the processor's
    `replace_image_token` writes the text (tiles of `<image>` framed by `<fake_token_around_image>`,
    `<row_i_col_j>`, the `<global-img>` view and newlines). Not `_get_num_multimodal_tokens`: since
    transformers 5.25 it counts the `<image>` tokens only, without the markers around them.
    """
    grids = [processor.image_processor.get_number_of_image_patches(h, w, {}) for h, w in sizes]
    layout = {"rows": [[r for _, r, _ in grids]], "cols": [[c for _, _, c in grids]]}
    texts = [processor.replace_image_token(layout, i) for i in range(len(sizes))]
    return [len(ids) for ids in processor.tokenizer(texts, add_special_tokens=False)["input_ids"]]


# -- loading: SmolVLM2 on installs without torchvision -------------------------------------------------------
# SmolVLMProcessor holds a video processor. transformers 5.24 checks each processor part against a base
# class looked up by name on the top-level `transformers` module, and `VideoProcessorMixin` is exported there
# only when torchvision imports. On CPU machines where torchvision cannot be used (see facts: the index's
# torchvision does not load beside the CPU torch wheel) the check raises "VIDEO_PROCESSOR_MAPPING has no
# attribute '_extra_content'" and no SmolVLM2 processor can be built or loaded. vlm-tune feeds video as frames
# (images), so the video processor is never run; exporting the mixin makes the check pass and changes nothing
# else.


def allow_video_processor_without_torchvision() -> None:
    """Export `transformers.VideoProcessorMixin` when torchvision is missing (idempotent)."""
    from transformers import processing_utils
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return
    from transformers.video_processing_utils import VideoProcessorMixin

    module = processing_utils.transformers_module  # the module object the class check looks names up on
    if module.__dict__.get("VideoProcessorMixin") is not VideoProcessorMixin:
        module.VideoProcessorMixin = VideoProcessorMixin


def load_smolvlm_processor(path: str, revision: str | None, image_processor: Any) -> Any:
    """SmolVLMProcessor with its parts passed in, for when `AutoProcessor` refuses it without torchvision.

    AutoVideoProcessor returns a torchvision-only placeholder class there; the real SmolVLMVideoProcessor
    class loads its config fine (and is never run: frames go through the image processor).
    """
    from transformers import AutoTokenizer, SmolVLMProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    allow_video_processor_without_torchvision()
    parts = {
        "image_processor": image_processor,
        "tokenizer": AutoTokenizer.from_pretrained(path, revision=revision),
        "video_processor": SmolVLMVideoProcessor.from_pretrained(path, revision=revision),
    }
    # not from_pretrained(..., video_processor=...): transformers 5.25 hands the keyword on to the tokenizer
    # it loads first, which then cannot save its config
    processor_dict, _ = SmolVLMProcessor.get_processor_dict(path, revision=revision)
    return SmolVLMProcessor.from_dict(processor_dict, **parts)


def auto_processor(path: str, revision: str | None = None) -> Any:
    """`AutoProcessor.from_pretrained` with the image processor in vlm-tune's backend, and SmolVLM2
    loadable on installs without torchvision."""
    from transformers import AutoProcessor

    from vlm_tune.families.base import load_image_processor

    allow_video_processor_without_torchvision()
    image_processor = load_image_processor(path, revision)
    try:
        return AutoProcessor.from_pretrained(path, revision=revision, image_processor=image_processor)
    except ImportError as err:
        if "SmolVLMVideoProcessor" not in str(err):
            raise
        return load_smolvlm_processor(path, revision, image_processor)


# ---------------------------------------------------------------------------------------------------------
# the offline stand-in, builtin:tiny: a tiny Idefics3 model with SmolVLM-256M's published chat template,
# special tokens and processor settings; only the dims (tile 32 px, longest edge 64 px, 4 tokens per tile) and
# the vocabulary (an 800-token BPE trained offline) are its own. Built with the shared scaffold
# (`vlm_tune.standins.scaffold`), cached by its spec marker `tiny_spec.json`.

# bump when build_tiny_model's output changes (template, tokens, processor settings), so that tiny models already
# built in a cache (their tiny_spec.json) are rebuilt instead of reused. 2: SmolVLM-256M's published template,
# special tokens (bos <|im_start|>, pad <|im_end|>, unk <|endoftext|>) and generation ids
BUILD = 2


@dataclass
class TinySpec:
    """The tiny SmolVLM's dims (builtin:tiny); everything else is SmolVLM-256M's published values."""

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


def tiny_image_processor(spec: TinySpec) -> Any:
    """SmolVLM-256M's published image processor at the spec's longest edge, tile size and splitting."""
    return image_processor(
        size={"longest_edge": spec.image_longest_edge},
        max_image_size={"longest_edge": spec.tile_size},
        do_image_splitting=spec.do_image_splitting,
    )


def build_tiny_model(out_dir: str | Path, seed: int = 0, spec: TinySpec | None = None) -> Path:
    """Build and save the tiny model + processor in out_dir (atomically); returns out_dir."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    from vlm_tune.standins.scaffold import replaceable, save_built_model

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
        image_processor=tiny_image_processor(spec),
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


def _build_stand_in(out_dir: str | Path, seed: int = 0) -> Path:
    """builtin:tiny (real SmolVLM checkpoints are rehearsed by vlm_tune.standins.rehearsal's own builder)."""
    return ensure_tiny_model(out_dir, seed)


FAMILY = Family(
    name="smolvlm",
    title="SmolVLM",
    model_types=("idefics3", "smolvlm"),
    processor_classes=("Idefics3Processor", "SmolVLMProcessor"),
    builtin="builtin:tiny",
    end_of_turn="<end_of_utterance>",
    image_tokens=IMAGE_TOKENS,
    target_presets=TARGET_PRESETS,
    vision_module=VISION_MODULE,
    projector_modules=("model.connector",),
    vision_save_modules=lambda model: ["vision_model"],
    image_knobs=IMAGE_KNOBS,
    apply_image_knobs=apply_image_knobs,
    build_stand_in=_build_stand_in,
    load_processor=auto_processor,
    card_image_lines=card_image_lines,
    image_token_counts=image_token_counts,
    published=(SMOLVLM_256M, SMOLVLM_INSTRUCT, SMOLVLM2),
)
