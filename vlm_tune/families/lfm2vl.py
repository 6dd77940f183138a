"""LFM2-VL (LiquidAI/LFM2-VL-450M, LFM2-VL-1.6B): everything vlm-tune knows about this family.

- Model (transformers 5.x `Lfm2VlForConditionalGeneration`, model_type `lfm2_vl`): a SigLIP2 NaFlex vision tower
  `model.vision_tower` (variable resolution: each tile keeps its aspect ratio, patches padded to
  max_num_patches with `pixel_attention_mask`, `spatial_shapes` per tile), a projector
  `model.multi_modal_projector` (pixel unshuffle by downsample_factor 2, LayerNorm, `linear_1`, GELU,
  `linear_2`) and an LFM2 decoder `model.language_model`: a hybrid of short-convolution layers
  (`conv.in_proj`, `conv.out_proj` around a depthwise Conv1d) and grouped-query attention layers
  (`self_attn.{q,k,v,out}_proj`, note `out_proj`, not `o_proj`), every layer with a SwiGLU
  `feed_forward.{w1,w2,w3}`. Word embeddings are tied to the LM head.
- Chat: ChatML opened by `<|startoftext|>` (the template writes the bos token itself; the processor tokenizes
  with add_special_tokens=False). An answer is `<|im_start|>assistant\\n ANSWER <|im_end|>`; `<|im_end|>`
  closes it and is supervised with it.
- Images: `<image>` in the template; Lfm2VlProcessor replaces it with `<|image_start|>`, then for a tiled image
  `<|img_row_R_col_C|>` + tokens_per_tile `<image>` per tile and `<|img_thumbnail|>` + the thumbnail's
  `<image>` tokens, or the single tile's `<image>` tokens, then `<|image_end|>`. It reports where each
  expansion landed (`text_replacement_offsets`) through its own __call__. Image-related tokens (never
  supervised): those five kinds. The token count per image follows from the image size alone
  (`lfm2vl_image.layout`), so the pre-flight budget needs no pixels (`Family.image_token_counts`).
- Resolution: no fixed tile count or pixel edge; the knobs are image *tokens*: min_image_tokens /
  max_image_tokens bound the single-tile (and thumbnail) size, an image more than max_pixels_tolerance times
  over the max is split into tile_size tiles (min_tiles..max_tiles of them), do_image_splitting turns
  splitting off. model.image.* map 1:1 onto those (tile_size must stay a multiple of 2 * encoder patch);
  longest_edge L means max_image_tokens = the budget of an L x L image. Lowering max_image_tokens also
  lowers the split threshold (2x max): smaller single tiles, but more images tiled.
- Without torchvision transformers has no LFM2-VL image processor (only a torchvision class exists), so
  vlm-tune then loads its PIL port (`lfm2vl_image.Lfm2VlImageProcessorPil`, saved under the real name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm_tune.errors import UserError
from vlm_tune.families.base import Family
from vlm_tune.families.lfm2vl_image import image_token_counts
from vlm_tune.families.pinned import Pinned, Published

GRID = range(1, 11)  # the published tokenizer has <|img_row_R_col_C|> for R, C in 1..10 (max_tiles 10)
IMAGE_TOKENS = ("<image>", "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>") + tuple(
    f"<|img_row_{r}_col_{c}|>" for r in GRID for c in GRID
)
SPECIAL_TOKENS = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", *IMAGE_TOKENS]
END_OF_TURN = "<|im_end|>"

# -- published values -----------------------------------------------------------------------------------
_VARUN = (
    "GitHub varun00391/local-finetuned-model, LiquidAI:LFM2-VL-450M/lfm2-450m/{} at "
    "a913c33978b466ed686191eda666661a918ee9a3 (an Aug 2025 snapshot of the hub repo, remote-code era)"
)
# keys of the remote-code era files (Siglip2ImageProcessor + processing_lfm2_vl.py) that transformers' native
# Lfm2VlImageProcessor does not read: file bookkeeping, call defaults, patch_size (= encoder_patch_size), and
# `do_resize: false`, which told the remote Siglip2 class not to resize (the native class always resizes to its
# own smart size)
REMOTE_ONLY = ("auto_map", "input_data_format", "return_tensors", "patch_size", "do_resize")


def _layout(ip: dict[str, Any], proc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The remote-code layout → transformers 5's: the image settings move from processor_config.json into the
    image processor (the hub's current revision does the same); `use_image_special_tokens` (true) is a call
    default of the native Lfm2VlProcessor, not a saved setting."""
    moved = {
        k: v for k, v in proc.items() if k not in ("processor_class", "auto_map", "use_image_special_tokens")
    }
    ip = {k: v for k, v in ip.items() if k not in REMOTE_ONLY} | moved
    return ip, {"processor_class": proc.get("processor_class", "Lfm2VlProcessor")}


PUBLISHED = Published(
    checkpoint="LiquidAI/LFM2-VL-450M",
    chat_template=Pinned(
        "lfm2-vl/chat_template.jinja",
        "cf0af741b36248dfe460af825b0b3acb3c651cf7dd40a74c29447f60b75d2b9b",
        _VARUN.format("chat_template.jinja"),
        "verbatim",
    ),
    tokens=Pinned(
        "lfm2-vl/tokens.json",
        "041504b3e754c355f6e2d427c1c20ef8259ecffb73eb40c77921ede135c79d91",
        "token strings and ids extracted from " + _VARUN.format("tokenizer_config.json"),
        "extracted",
    ),
    tokenizer_config=Pinned(
        "lfm2-vl/tokenizer_config.json",
        "5d460b26aa4512b0c951d735360c6eb443812a3f7974f95abcef67638c0c0df4",
        _VARUN.format("tokenizer_config.json"),
        "verbatim",
    ),
    image_processor=Pinned(
        "lfm2-vl/preprocessor_config.json",
        "a70ef8973bfbb79a429a1e48f3a3674ec5e970d82e52e6c9091381a1a2e48966",
        _VARUN.format("preprocessor_config.json"),
        "verbatim",
    ),
    processor=Pinned(
        "lfm2-vl/processor_config.json",
        "dfb538d609add2675159696d441d920b55b9a8e994fa7e294bf8b038bfedb7de",
        _VARUN.format("processor_config.json")
        + " (the same values: https://huggingface.co/LiquidAI/LFM2-VL-450M/"
        "blob/refs%2Fpr%2F4/processor_config.json, 4ee6792)",
        "verbatim",
    ),
    generation=Pinned(
        "lfm2-vl/generation_config.json",
        "529184b675eb21c69367bb9b96b4b6fab90e02d94a384f5a94f1004903ac2430",
        _VARUN.format("generation_config.json"),
        "verbatim",
    ),
    layout=_layout,
)
# LFM2-VL-450M's chat template: ChatML opened by {{bos_token}}, `<image>` per image
CHAT_TEMPLATE = PUBLISHED.template()

# model.image knob → image processor attribute (same meaning, same name)
KNOBS = ("min_image_tokens", "max_image_tokens", "tile_size", "do_image_splitting")
# every model.image knob of LFM2-VL → what it sets on the image processor
IMAGE_KNOBS = {
    "longest_edge": "L sets max_image_tokens to the token budget of an L x L image",
    "min_image_tokens": "min_image_tokens: the fewest image tokens of a single image or thumbnail",
    "max_image_tokens": "max_image_tokens: the most image tokens of a single image; larger ones are tiled",
    "tile_size": "tile_size: the tile edge of a split image, px (a multiple of the encoder patch x 2)",
    "do_image_splitting": "do_image_splitting: false never splits images into tiles",
}


# -- processor ----------------------------------------------------------------------------------------------
def load_processor(path: str, revision: str | None = None) -> Any:
    """Lfm2VlProcessor with the image-processor backend `vlm_tune.backend.image_backend()` decides:
    transformers' torchvision class where torchvision is installed, else vlm-tune's PIL port (passed in as
    the `image_processor`, so the processor class and its saved files are the standard ones)."""
    from transformers import Lfm2VlProcessor

    from vlm_tune.backend import image_backend
    from vlm_tune.families.lfm2vl_image import Lfm2VlImageProcessorPil

    if image_backend() == "torchvision":
        return Lfm2VlProcessor.from_pretrained(path, revision=revision)
    image_processor = Lfm2VlImageProcessorPil.from_pretrained(path, revision=revision)
    return Lfm2VlProcessor.from_pretrained(path, revision=revision, image_processor=image_processor)


def apply_image_knobs(processor: Any, img: Any) -> None:
    """model.image → the LFM2-VL image processor (image-token bounds, tile size, splitting).

    longest_edge L means the token budget of an L x L image: max_image_tokens = (L // 32)**2 with the
    published patch 16 and downsample 2 (an explicit max_image_tokens wins)."""
    ip = processor.image_processor
    step = ip.encoder_patch_size * ip.downsample_factor
    values = {k: getattr(img, k, None) for k in KNOBS}
    if img.longest_edge is not None and values["max_image_tokens"] is None:
        values["max_image_tokens"] = max(1, img.longest_edge // step) ** 2
    lo = values["min_image_tokens"] if values["min_image_tokens"] is not None else ip.min_image_tokens
    hi = values["max_image_tokens"] if values["max_image_tokens"] is not None else ip.max_image_tokens
    if lo > hi and values["min_image_tokens"] is None:  # a cap below the model's floor: the cap wins
        values["min_image_tokens"] = lo = hi
    if lo > hi:
        raise UserError(
            f"model.image.min_image_tokens ({lo}) is above max_image_tokens ({hi}); lower it or raise the max"
        )
    if values["tile_size"] is not None and values["tile_size"] % step:
        raise UserError(
            f"model.image.tile_size={values['tile_size']} must be a multiple of {step} (the encoder patch "
            f"{ip.encoder_patch_size} x downsample factor {ip.downsample_factor})"
        )
    for key, value in values.items():
        if value is not None:
            setattr(ip, key, value)
    tile_patches = (ip.tile_size // ip.encoder_patch_size) ** 2 if ip.do_image_splitting else 0
    ip.max_num_patches = max(ip.max_image_tokens * ip.downsample_factor**2, tile_patches)


def card_image_lines(image: dict[str, Any]) -> list[str]:
    """The model card snippet's lines that set model.image on a loaded LFM2-VL processor."""
    lines = [f"processor.image_processor.{k} = {image[k]!r}" for k in KNOBS if image.get(k) is not None]
    if image.get("longest_edge") and image.get("max_image_tokens") is None:
        lines += [
            "ip = processor.image_processor  # longest_edge L → the token budget of an L x L image",
            f"ip.max_image_tokens = max(1, {int(image['longest_edge'])} // (ip.encoder_patch_size * "
            "ip.downsample_factor)) ** 2",
        ]
        if image.get("min_image_tokens") is None:
            lines.append("ip.min_image_tokens = min(ip.min_image_tokens, ip.max_image_tokens)")
    return lines


def _vision_save_modules(model: Any) -> list[str]:
    """The vision tower, trained fully under model.train_vision (the projector sits outside it)."""
    return ["vision_tower"]


# -- offline stand-in ---------------------------------------------------------------------------------------
STAND_IN = {  # tiny dims; the processor's sizes scaled down: patch 8, 64-px tiles, 4..16 image tokens per tile
    "vision_hidden": 64,
    "vision_layers": 2,
    "vision_heads": 4,
    "text_hidden": 128,
    "text_heads": 4,
    "text_kv_heads": 2,
    "text_intermediate": 256,
    # LFM2 is a hybrid (the 350M decoder: conv, conv, attention, ...): two of each kind. With only one
    # attention layer (conv, attention) the quickstart learned slowly: loss 0.58 → 0.47 over steps 200-400
    "layer_types": ["conv", "full_attention", "conv", "full_attention"],
    "projector_hidden": 128,
    "vocab_size": 900,
    "encoder_patch_size": 8,  # published 16
    "tile_size": 64,  # published 512
    "min_image_tokens": 4,  # published 64
    "max_image_tokens": 16,  # published 256
}
SIZES = ("encoder_patch_size", "tile_size", "min_image_tokens", "max_image_tokens")
# the other image processor settings are the published ones; a stand-in may override them (a test turns the
# thumbnail on, which the 450M does not use)
OPTIONAL = (
    "downsample_factor",
    "min_tiles",
    "max_tiles",
    "max_pixels_tolerance",
    "use_thumbnail",
    "do_image_splitting",
    "image_mean",
    "image_std",
)
BUILD = 4  # bump when the builder's output changes, so stand-ins cached by an earlier build are rebuilt


def checkpoint_settings() -> dict[str, Any]:
    """LFM2-VL-450M's published sizes under STAND_IN's names (for the rehearsal stand-in)."""
    ip, _ = PUBLISHED.settings()
    return {k: ip[k] for k in SIZES}


def build_stand_in(out_dir: str | Path, seed: int = 0, **published: Any) -> Path:
    """Build (or reuse, if the same spec) the tiny LFM2-VL stand-in in out_dir.

    Chat template, special tokens and image processor settings are the published ones (pinned); `published`
    overrides the tiny sizes (encoder_patch_size, tile_size, min/max_image_tokens; or OPTIONAL settings) with a
    real checkpoint's (`checkpoint_settings`), for the rehearsal of a shipped config."""
    import transformers

    from vlm_tune.families.lfm2vl_image import Lfm2VlImageProcessorPil
    from vlm_tune.standins.scaffold import build_tokenizer, reuse_or_prepare, save_stand_in, stand_in_settings

    s = stand_in_settings("LFM2-VL", STAND_IN, published, OPTIONAL)
    out_dir = Path(out_dir)
    want = {"family": "lfm2_vl", "build": BUILD, "seed": seed, **s}
    if reuse_or_prepare(out_dir, want):
        return out_dir
    names = PUBLISHED.special_tokens()
    tok = build_tokenizer(  # like the published tokenizer: adds <|startoftext|> unless told not to
        s["vocab_size"],
        SPECIAL_TOKENS,
        eos=names["eos_token"],
        pad=names["pad_token"],
        bos_token=names["bos_token"],
        add_bos_token=names["adds_bos"],
        extra_special_tokens={
            k.removeprefix("named."): v for k, v in names.items() if k.startswith("named.")
        },
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    kwargs = PUBLISHED.image_processor_kwargs()  # max_num_patches follows from the sizes
    kwargs |= {k: s[k] for k in (*SIZES, *OPTIONAL) if k in s}
    ip = Lfm2VlImageProcessorPil(**kwargs)
    processor = transformers.Lfm2VlProcessor(image_processor=ip, tokenizer=tok, chat_template=CHAT_TEMPLATE)
    vision = {
        "hidden_size": s["vision_hidden"],
        "intermediate_size": s["vision_hidden"] * 2,
        "num_hidden_layers": s["vision_layers"],
        "num_attention_heads": s["vision_heads"],
        "patch_size": s["encoder_patch_size"],
        "num_patches": ip.max_num_patches,  # position grid, resized per tile to its spatial shape
        "vision_use_head": False,
    }
    text = {
        "vocab_size": len(tok),
        "hidden_size": s["text_hidden"],
        "intermediate_size": s["text_intermediate"],
        "block_auto_adjust_ff_dim": False,  # else the FFN is resized to a multiple of 256
        "num_hidden_layers": len(s["layer_types"]),
        "layer_types": s["layer_types"],
        "num_attention_heads": s["text_heads"],
        "num_key_value_heads": s["text_kv_heads"],
        "max_position_embeddings": 4096,
        "pad_token_id": ids["<|pad|>"],
        "bos_token_id": ids["<|startoftext|>"],
        "eos_token_id": ids[END_OF_TURN],
    }
    config = transformers.Lfm2VlConfig(
        vision_config={"model_type": "siglip2_vision_model", **vision},
        text_config={"model_type": "lfm2", **text},
        image_token_id=ids["<image>"],
        projector_hidden_size=s["projector_hidden"],
        downsample_factor=ip.downsample_factor,
        tie_word_embeddings=True,
    )
    return save_stand_in(
        transformers.Lfm2VlForConditionalGeneration,
        config,
        processor,
        out_dir,
        want,
        seed,
        eos=ids[END_OF_TURN],
        pad=ids["<|pad|>"],
        bos=ids["<|startoftext|>"],
    )


FAMILY = Family(
    name="lfm2-vl",
    title="LFM2-VL",
    model_types=("lfm2_vl",),
    processor_classes=("Lfm2VlProcessor",),
    builtin="builtin:tiny-lfm2-vl",
    end_of_turn=END_OF_TURN,
    image_tokens=IMAGE_TOKENS,
    target_presets={
        "decoder": r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|conv\.(in|out)_proj"
        r"|feed_forward\.w(1|2|3))",
        "projector": r"model\.multi_modal_projector\.linear_(1|2)",
        "vision": r"model\.vision_tower\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj"
        r"|mlp\.fc(1|2))",
    },
    vision_module="model.vision_tower",
    projector_modules=("model.multi_modal_projector",),
    vision_save_modules=_vision_save_modules,
    image_knobs=IMAGE_KNOBS,
    apply_image_knobs=apply_image_knobs,
    sizing_note=lambda processor: "LFM2-VL sizes images by image tokens",
    build_stand_in=build_stand_in,
    load_processor=load_processor,
    card_image_lines=card_image_lines,
    image_token_counts=image_token_counts,
    published=(PUBLISHED,),
)
