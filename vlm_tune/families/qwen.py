"""Qwen2.5-VL and Qwen3-VL: everything vlm-tune knows about these two families.

Shared by both (transformers 5.x):
- Chat: ChatML. An answer is `<|im_start|>assistant\\n ANSWER <|im_end|>`; `<|im_end|>` closes it and is
  supervised with it. Each image is `<|vision_start|><|image_pad|><|vision_end|>` in the template; the
  processor repeats `<|image_pad|>` once per merged patch (grid_t * grid_h * grid_w / merge_size**2) and
  reports where (`text_replacement_offsets`, the common ProcessorMixin path). Image-related tokens, never
  supervised: vision_start/end/pad, image_pad, video_pad.
- Module names: decoder `model.language_model.layers.N.{self_attn.(q|k|v|o)_proj, mlp.(gate|up|down)_proj}`;
  vision tower `model.visual` with the projector INSIDE it (`model.visual.merger`), so freezing the tower
  must spare the merger.
- Resolution: the image processor resizes by pixel count (`size = {shortest_edge: min_pixels,
  longest_edge: max_pixels}`, both in pixels, not edges), rounding each side to patch_size * merge_size.
  Setting `image_processor.max_pixels` as an attribute has no effect; only `size` counts.
  model.image.min_pixels / max_pixels set those; model.image.longest_edge L sets max_pixels = L*L (the
  budget of an L x L image); Qwen does not tile images.
- Without torchvision (CPU machines here) transformers cannot build a Qwen processor (its video processor
  needs torchvision, and AutoProcessor silently returns the bare tokenizer). Images need no video processor,
  so vlm-tune loads an image-only subclass with the same class name on every install (saved files stay
  standard, with a video_preprocessor_config.json; `vlm_tune.families.image_only`); the image processor is
  torchvision's where it imports, else PIL (`vlm_tune.backend.image_backend()`).

Differences: Qwen2.5-VL: patch 14, SwiGLU vision MLP (`mlp.(gate|up|down)_proj`), projector
`visual.merger.mlp.(0|2)`, window attention, template adds a default system turn ("You are a helpful
assistant.") when none is given. Qwen3-VL: patch 16, vision MLP `mlp.linear_fc(1|2)`, projector
`visual.merger.linear_fc(1|2)` plus DeepStack mergers `visual.deepstack_merger_list.N.linear_fc(1|2)`,
learned position embeddings (`visual.pos_embed`), interleaved M-RoPE, no default system turn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm_tune.errors import UserError
from vlm_tune.families.base import Family
from vlm_tune.families.image_only import image_only_class, load_image_only
from vlm_tune.families.pinned import Pinned, Published
from vlm_tune.families.qwen3_vl_template import QWEN3_VL_CHAT_TEMPLATE

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
IMAGE_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
END_OF_TURN = "<|im_end|>"
DECODER = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"

# -- published values -----------------------------------------------------------------------------------
QWEN2_5_VL_PUBLISHED = Published(
    checkpoint="Qwen/Qwen2.5-VL-3B-Instruct",
    chat_template=Pinned(
        "qwen2.5-vl/chat_template.jinja",
        "a0bc6f6fc7a29a80017a433e8f03a1cc1236e838a944a2d034295a60c4f2fddb",
        "GitHub huggingface/huggingface.js, packages/jinja/test/e2e.test.js at "
        "fe42e68017ffc76d09922ea8f9b38a6964345710, key Qwen/Qwen2.5-VL-7B-Instruct (the 7B's text; the 3B's "
        "chat_template.json is listed at 1.05 kB, this text JSON-encoded)",
        "verbatim",
    ),
    tokens=Pinned(
        "qwen2.5-vl/tokens.json",
        "ca24d99b2a57483d699091d7af40730b4e95a2d1cdac3e43a16e92087f5ea136",
        "the printed Qwen2.5-VL-7B-Instruct processor in GitHub Jeremy-lf/MLLM-Application, Qwen-02.md at "
        "8df46bd4486c3c86f764052b39e0d73721308002 (the same tokenizer files as the 3B)",
        "extracted",
    ),
    image_processor=Pinned(
        "qwen2.5-vl/preprocessor_config.json",
        "f2058c716eef96ccaed1cc1e2d0c08306b62586d535b28d9d08e691b2fab7ca0",
        "https://huggingface.co/mlx-community/Qwen2.5-VL-3B-Instruct-6bit/blob/refs%2Fpr%2F1/"
        "preprocessor_config.json (hub commit fdbabf2, 350 B, the size the 3B's duplicate lists)",
        "transcribed",
    ),
)
QWEN3_VL_PUBLISHED = Published(
    checkpoint="Qwen/Qwen3-VL-2B-Instruct",
    tokens=Pinned(
        "qwen3-vl/tokens.json",
        "ca34019221c24cc7daeb5f3c3c7f7dc1e1e6d3e054f8470976e2c5014afd42cc",
        "https://huggingface.co/Chesscorner/Qwen3-VL-4B-nf4.process-float16/blob/main/tokenizer_config.json "
        "(a Qwen3-VL re-save; strings only)",
        "extracted",
    ),
    image_processor=Pinned(
        "qwen3-vl/preprocessor_config.json",
        "27225450ac9c6529872ee1924fcb0962ff5634834f817040f444118116f4e516",
        "https://huggingface.co/coder3101/Qwen3-VL-2B-Instruct-heretic/blob/main/preprocessor_config.json "
        "(e4ddada) and https://huggingface.co/hfmaster/Qwen3-VL-2B/blob/main/preprocessor_config.json (eb87926); "
        "390 B, the size Qwen/Qwen3-VL-2B-Instruct lists",
        "transcribed",
    ),
    unverified={
        "chat_template": "not found (the hub lists chat_template.json, 5.5 kB, unseen); the stand-in uses "
        "QWEN3_VL_CHAT_TEMPLATE, written from the Qwen3-VL-8B-Instruct template"
    },
)
QWEN2_5_VL_CHAT_TEMPLATE = QWEN2_5_VL_PUBLISHED.template()


# -- processors -------------------------------------------------------------------------------------------
VIDEO_PROCESSOR = {
    "Qwen2_5_VLProcessor": "Qwen2VLVideoProcessor",
    "Qwen3VLProcessor": "Qwen3VLVideoProcessor",
}


def _video_config(processor: Any) -> dict[str, Any]:
    """A video_preprocessor_config.json for a processor built without its video processor: the class the
    checkpoint uses, with the image processor's patching and normalisation (frame sampling: class defaults).
    AutoProcessor needs this file to load the saved processor where torchvision is installed."""
    ip = processor.image_processor
    return {
        "video_processor_type": VIDEO_PROCESSOR[type(processor).__name__],
        "processor_class": type(processor).__name__,
        "size": dict(ip.size),
        "patch_size": ip.patch_size,
        "temporal_patch_size": ip.temporal_patch_size,
        "merge_size": ip.merge_size,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": ip.rescale_factor,
        "do_normalize": True,
        "image_mean": list(ip.image_mean),
        "image_std": list(ip.image_std),
        "do_convert_rgb": True,
    }


def _image_only(base: type) -> type:
    """`base` without its video processor, under the same class name (see vlm_tune.families.image_only)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):  # noqa: N807
        base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return image_only_class(base, __init__, _video_config)


def _loader(class_name: str):
    def load(path: str, revision: str | None) -> Any:
        import transformers

        return load_image_only(_image_only(getattr(transformers, class_name)), path, revision)

    return load


# model.image knob → what it sets on the image processor (size, in pixels, not edges)
IMAGE_KNOBS = {
    "longest_edge": "L sets the pixel cap size.longest_edge to L*L, the budget of an L x L image",
    "min_pixels": "size.shortest_edge: the fewest pixels an image is resized to",
    "max_pixels": "size.longest_edge: the most pixels an image is resized to (wins over longest_edge)",
}


def apply_image_knobs(processor: Any, img: Any) -> None:
    """model.image → the Qwen image processor's pixel budget (`size` shortest_edge/longest_edge, in pixels)."""
    ip = processor.image_processor
    lo, hi = int(ip.size["shortest_edge"]), int(ip.size["longest_edge"])
    if img.longest_edge is not None:
        hi = img.longest_edge**2
    if getattr(img, "max_pixels", None) is not None:
        hi = img.max_pixels
    if getattr(img, "min_pixels", None) is not None:
        lo = img.min_pixels
    elif lo > hi:  # a cap below the model's floor: the cap wins (else max_pixels would silently do nothing)
        lo = hi
    if lo > hi:
        raise UserError(
            f"model.image.min_pixels ({lo}) is above the pixel cap ({hi}); lower it or raise the cap"
        )
    ip.size = {"shortest_edge": lo, "longest_edge": hi}


def card_image_lines(image: dict[str, Any]) -> list[str]:
    """The model card snippet's lines that give a loaded Qwen processor vlm-tune's pixel budget."""
    hi = image.get("max_pixels") or (image["longest_edge"] ** 2 if image.get("longest_edge") else None)
    lo = image.get("min_pixels")
    if hi is None and lo is None:
        return []
    lines = [
        "size = dict(processor.image_processor.size)  # pixel budget: shortest_edge = min, longest = max"
    ]
    if hi is not None:
        lines.append(f'size["longest_edge"] = {int(hi)}')
    if lo is not None:
        lines.append(f'size["shortest_edge"] = {int(lo)}')
    else:
        lines.append('size["shortest_edge"] = min(size["shortest_edge"], size["longest_edge"])')
    lines.append("processor.image_processor.size = size")
    return lines


def _vision_save_modules(model: Any) -> list[str]:
    """Modules of the vision tower (not the merger) to train fully under model.train_vision."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    visual = base.model.visual
    names = ["visual.patch_embed"] + [f"visual.blocks.{i}" for i in range(len(visual.blocks))]
    if hasattr(visual, "pos_embed"):
        names.append("visual.pos_embed")
    return names


def _sizing_note(processor: Any) -> str:
    """How Qwen sizes images (for the refusal of a knob it lacks)."""
    return "Qwen resizes by pixel count and does not tile images"


# -- offline stand-ins ------------------------------------------------------------------------------------
STAND_IN = {  # small dims; published processor classes and token layout; patch 8 so 64-px charts = 16 tokens
    "vision_depth": 2,
    "vision_hidden": 64,
    "vision_heads": 4,
    "patch_size": 8,  # published 14 (Qwen2.5-VL), 16 (Qwen3-VL)
    "merge_size": 2,
    "temporal_patch_size": 2,
    "text_hidden": 128,
    "text_layers": 2,
    "text_heads": 4,
    "text_kv_heads": 2,
    "text_intermediate": 256,
    "min_pixels": 32 * 32,  # published 3,136 / 65,536
    "max_pixels": 128 * 128,  # published 12,845,056 / 16,777,216
    "vocab_size": 800,
}
BUILD = 2  # bump when the builder's output changes, so stand-ins cached by an earlier build are rebuilt


def checkpoint_settings(published: Published) -> dict[str, Any]:
    """A checkpoint's published processor settings under STAND_IN's names (for the rehearsal stand-in)."""
    ip = published.image_processor_kwargs()
    size = ip.get("size") or {"shortest_edge": ip["min_pixels"], "longest_edge": ip["max_pixels"]}
    return {
        "patch_size": ip["patch_size"],
        "merge_size": ip["merge_size"],
        "temporal_patch_size": ip["temporal_patch_size"],
        "min_pixels": size["shortest_edge"],
        "max_pixels": size["longest_edge"],
    }


def _build(kind: str, out_dir: str | Path, seed: int = 0, **published: Any) -> Path:
    """Build (or reuse, if the same spec) the tiny stand-in of `kind` ('qwen2_5_vl' or 'qwen3_vl') in out_dir.

    Chat template, special tokens and image processor settings are the checkpoint's published ones (pinned);
    `published` overrides the tiny dims (patch_size, merge_size, min_pixels, max_pixels; image_mean, image_std)
    with a real checkpoint's (`checkpoint_settings`), for the rehearsal of a shipped config."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vlm_tune.standins.scaffold import build_tokenizer, reuse_or_prepare, save_stand_in, stand_in_settings

    s = stand_in_settings("Qwen", STAND_IN, published, ("image_mean", "image_std"))
    out_dir = Path(out_dir)
    want = {"family": kind, "build": BUILD, "seed": seed, **s}
    if reuse_or_prepare(out_dir, want):
        return out_dir
    qwen3 = kind == "qwen3_vl"
    record = QWEN3_VL_PUBLISHED if qwen3 else QWEN2_5_VL_PUBLISHED
    names = record.special_tokens()  # bos: none
    tok = build_tokenizer(s["vocab_size"], SPECIAL_TOKENS, eos=names["eos_token"], pad=names["pad_token"])
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    kwargs = {
        k: v for k, v in record.image_processor_kwargs().items() if k not in ("min_pixels", "max_pixels")
    }
    kwargs |= {
        k: s[k]
        for k in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")
        if k in s
    }
    kwargs["size"] = {"shortest_edge": s["min_pixels"], "longest_edge": s["max_pixels"]}
    ip = Qwen2VLImageProcessorPil(**kwargs)
    proc_name = "Qwen3VLProcessor" if qwen3 else "Qwen2_5_VLProcessor"
    template = QWEN3_VL_CHAT_TEMPLATE if qwen3 else record.template()
    processor = _image_only(getattr(transformers, proc_name))(
        image_processor=ip, tokenizer=tok, chat_template=template
    )
    head_dim = s["text_hidden"] // s["text_heads"]
    vision = {
        "depth": s["vision_depth"],
        "hidden_size": s["vision_hidden"],
        "intermediate_size": s["vision_hidden"] * 2,
        "num_heads": s["vision_heads"],
        "patch_size": s["patch_size"],
        "spatial_merge_size": s["merge_size"],
        "temporal_patch_size": s["temporal_patch_size"],
        "out_hidden_size": s["text_hidden"],
    }
    text = {
        "vocab_size": len(tok),
        "hidden_size": s["text_hidden"],
        "intermediate_size": s["text_intermediate"],
        "num_hidden_layers": s["text_layers"],
        "num_attention_heads": s["text_heads"],
        "num_key_value_heads": s["text_kv_heads"],
        "max_position_embeddings": 2048,
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "bos_token_id": None,
        "tie_word_embeddings": False,
    }
    if qwen3:  # published: mrope_section [24, 20, 20] of head_dim 128, interleaved; DeepStack at 3 depths
        vision |= {"num_position_embeddings": 64, "deepstack_visual_indexes": [0]}
        text |= {
            "head_dim": head_dim,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [6, 5, 5],
                "mrope_interleaved": True,
            },
        }
        config_cls, model_cls = transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration
    else:  # published: mrope_section [16, 24, 24] of head_dim 128; window attention, full attention at the end
        vision |= {"window_size": s["patch_size"] * s["merge_size"] * 4, "fullatt_block_indexes": [1]}
        text |= {
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]}
        }
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
    config = config_cls(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    return save_stand_in(
        model_cls,
        config,
        processor,
        out_dir,
        want,
        seed,
        eos=ids["<|im_end|>"],
        pad=ids["<|endoftext|>"],
        bos=None,
    )


QWEN2_5_VL = Family(
    name="qwen2.5-vl",
    title="Qwen2.5-VL",
    model_types=("qwen2_5_vl",),
    processor_classes=("Qwen2_5_VLProcessor",),
    builtin="builtin:tiny-qwen2.5-vl",
    end_of_turn=END_OF_TURN,
    image_tokens=IMAGE_TOKENS,
    target_presets={
        "decoder": DECODER,
        "projector": r"model\.visual\.merger\.mlp\.(0|2)",
        "vision": r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate|up|down)_proj)",
    },
    vision_module="model.visual",
    projector_modules=("model.visual.merger",),
    vision_save_modules=_vision_save_modules,
    image_knobs=IMAGE_KNOBS,
    apply_image_knobs=apply_image_knobs,
    sizing_note=_sizing_note,
    build_stand_in=lambda out_dir, seed=0, **published: _build("qwen2_5_vl", out_dir, seed, **published),
    load_processor=_loader("Qwen2_5_VLProcessor"),
    card_image_lines=card_image_lines,
    published=(QWEN2_5_VL_PUBLISHED,),
)

QWEN3_VL = Family(
    name="qwen3-vl",
    title="Qwen3-VL",
    model_types=("qwen3_vl",),
    processor_classes=("Qwen3VLProcessor",),
    builtin="builtin:tiny-qwen3-vl",
    end_of_turn=END_OF_TURN,
    image_tokens=IMAGE_TOKENS,
    target_presets={
        "decoder": DECODER,
        "projector": r"model\.visual\.(merger|deepstack_merger_list\.\d+)\.linear_fc(1|2)",
        "vision": r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.linear_fc(1|2))",
    },
    vision_module="model.visual",
    projector_modules=("model.visual.merger", "model.visual.deepstack_merger_list"),
    vision_save_modules=_vision_save_modules,
    image_knobs=IMAGE_KNOBS,
    apply_image_knobs=apply_image_knobs,
    sizing_note=_sizing_note,
    build_stand_in=lambda out_dir, seed=0, **published: _build("qwen3_vl", out_dir, seed, **published),
    load_processor=_loader("Qwen3VLProcessor"),
    card_image_lines=card_image_lines,
    published=(QWEN3_VL_PUBLISHED,),
)
