"""InternVL (InternVL2.5 / InternVL3 / InternVL3.5 `-hf` checkpoints): everything vlm-tune knows about it.

transformers 5.x: `InternVLForConditionalGeneration` (model_type "internvl"), `InternVLProcessor` with the
GOT-OCR2 image processor and an InternVL video processor.
- Chat: ChatML (`<|im_start|>assistant\\n ANSWER <|im_end|>`); `<|im_end|>` closes an answer and is supervised
  with it. No default system turn. An image is `<IMG_CONTEXT>\\n` in the template; the processor replaces
  that `<IMG_CONTEXT>` with `<img>` + image_seq_length * patches `<IMG_CONTEXT>` + `</img>` and reports where
  (`text_replacement_offsets`, the common ProcessorMixin path); the pre-flight count tokenizes that same
  expansion text (`image_token_counts`). Image-related tokens, never supervised: `<img>`, `</img>`,
  `<IMG_CONTEXT>`, `<video>`.
- Resolution: dynamic tiling. Every image is resized onto a grid of fixed tiles (448 px published) whose
  aspect ratio is closest to the image's, with min_patches <= tiles <= max_patches (1 and 12 published),
  plus a thumbnail tile when the grid has more than one. The image's size does not count, only its aspect
  ratio (a 64x48 chart becomes a 4x3 grid + thumbnail = 13 tiles, like an 800x600 one). Each tile costs
  image_seq_length tokens (published: (448/14)^2 * 0.5^2 = 256, pixel shuffle 0.5).
  model.image.max_patches / min_patches set the image processor's; do_image_splitting false = max_patches 1
  (one resized tile); longest_edge L = the tile budget of an L x L image (max_patches = L*L // tile**2, at
  least 1), explicit max_patches wins. Tiles are the vision encoder's fixed input, so no tile size or pixel
  budget can be set (such knobs are refused). The processor class forces `crop_to_patches=True` at call time
  whatever the image processor's saved value (published False), so tiling is turned off through max_patches,
  which both image processor backends honour and which is saved with the processor.
- Module names: decoder `model.language_model.layers.N.{self_attn.(q|k|v|o)_proj, mlp.(gate|up|down)_proj}`
  (Qwen2 for InternVL3, Qwen3 for InternVL3.5); projector `model.multi_modal_projector.{linear_1,linear_2}`
  (after a LayerNorm); vision tower `model.vision_tower` (InternViT: `encoder.layer.N.attention.{q,k,v}_proj`,
  `attention.projection_layer`, `mlp.fc1/fc2`; its q/k/v names equal the decoder's, so presets are anchored).
- Without torchvision (CPU machines here) the video processor cannot be built, so AutoProcessor fails:
  vlm-tune loads an image-only subclass with the same class name on every install (saved files stay
  standard, with a video_preprocessor_config.json so that AutoProcessor loads them where torchvision is
  installed); the image processor is torchvision's where it imports, else PIL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm_tune.errors import UserError
from vlm_tune.families.base import Family
from vlm_tune.families.image_only import image_only_class, load_image_only
from vlm_tune.families.pinned import Pinned, Published

# InternVL's own tokens on top of the Qwen2 ChatML ones (transformers' convert_internvl_weights_to_hf.py adds
# <img> </img> <IMG_CONTEXT> <quad> </quad> <ref> </ref> <box> </box> and names <video>)
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
]
IMAGE_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<video>")
END_OF_TURN = "<|im_end|>"


# -- published values -----------------------------------------------------------------------------------
def _layout(ip: dict[str, Any], proc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """derived_settings.json lists InternVLProcessor's image_seq_length beside the image processor's keys."""
    ip = dict(ip)
    return ip, {**proc, "image_seq_length": ip.pop("image_seq_length")}


PUBLISHED = Published(
    checkpoint="OpenGVLab/InternVL3-1B-hf",
    chat_template=Pinned(
        "internvl/chat_template.jinja",
        "b3e3fa7cdeceec1d3dfe0d17b77724baf3857714e688f3a700261567e96140eb",
        "the chat_template literal of GitHub huggingface/transformers, src/transformers/models/internvl/"
        "convert_internvl_weights_to_hf.py (the script that made the -hf checkpoints; its InternVL3.5 revision, "
        "commit not reported), 481 B = the chat_template.jinja listed for OpenGVLab/InternVL3-14B-hf",
        "verbatim",
    ),
    tokens=Pinned(
        "internvl/tokens.json",
        "5b8ae5d5745d0e4d56eb3ff6aa28500d30be626773bbe8800d93dfb7b33dc691",
        "GitHub huggingface/transformers, src/transformers/models/internvl/convert_internvl_weights_to_hf.py "
        "(<IMG_CONTEXT> 151667, eos 151645) and https://huggingface.co/hf-tiny-v2/"
        "tiny-random-InternVLModel/blame/main/tokenizer_config.json (b371a0f)",
        "extracted",
    ),
    image_processor=Pinned(
        "internvl/derived_settings.json",
        "e67e90c76e170bb3fe2e41dcaefc0f8b34af1442a731305b18cbe077c62d5e79",
        "the write_image_processor arguments of GitHub huggingface/transformers, src/transformers/models/internvl/"
        "convert_internvl_weights_to_hf.py (448 px, ImageNet mean/std) + GotOcr2 image processor defaults + "
        "InternVLProcessor's default image_seq_length 256",
        "derived",
    ),
    derived={
        "processor_settings": "no preprocessor_config.json / processor_config.json of InternVL3-1B-hf was "
        "found: compared with the values transformers' converter writes (derived_settings.json)"
    },
    layout=_layout,
)
# the tokenizer attributes InternVLProcessor reads (tokenizer_config.json "extra_special_tokens")
EXTRA_SPECIAL_TOKENS = {
    k.removeprefix("named."): v for k, v in PUBLISHED.special_tokens().items() if k.startswith("named.")
}
# InternVL3-1B-hf's chat template: ChatML, an image is "<IMG_CONTEXT>\n", no default system turn
CHAT_TEMPLATE = PUBLISHED.template()


# -- processor --------------------------------------------------------------------------------------------
def _video_config(processor: Any) -> dict[str, Any]:
    """A video_preprocessor_config.json for a processor built without its video processor: InternVL's class
    with the image processor's tile size and normalisation (frame sampling: class defaults). AutoProcessor
    needs this file to load the saved processor where torchvision is installed."""
    ip = processor.image_processor
    return {
        "video_processor_type": "InternVLVideoProcessor",
        "processor_class": "InternVLProcessor",
        "size": dict(ip.size),
        "resample": int(ip.resample),
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": ip.rescale_factor,
        "do_normalize": True,
        "image_mean": list(ip.image_mean),
        "image_std": list(ip.image_std),
        "do_convert_rgb": True,
        "initial_shift": True,
    }


def _image_only() -> type:
    """InternVLProcessor without its video processor, under the same class name (saved files name the real
    class). Saving writes the checkpoint's own video_preprocessor_config.json (kept from where it was loaded),
    or one derived from the image processor: the saved folder loads with plain AutoProcessor elsewhere."""
    from transformers import InternVLProcessor

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length=256, chat_template=None, **kw):  # noqa: N807
        InternVLProcessor.__init__(
            self,
            image_processor,
            tokenizer,
            None,
            image_seq_length=image_seq_length,
            chat_template=chat_template,
            **kw,
        )

    return image_only_class(InternVLProcessor, __init__, _video_config)


def load_processor(path: str, revision: str | None = None) -> Any:
    """The image-only InternVLProcessor on every install (its image processor in vlm-tune's backend)."""
    return load_image_only(_image_only(), path, revision)


# model.image knob → what it sets on the GOT-OCR2 image processor
IMAGE_KNOBS = {
    "longest_edge": "L sets max_patches to the tile budget of an L x L image (L*L // tile**2, at least 1)",
    "do_image_splitting": "false sets max_patches 1 (one resized tile per image)",
    "max_patches": "max_patches: the most tiles an image is cut into (+1 thumbnail when over 1)",
    "min_patches": "min_patches: the fewest tiles an image is cut into",
}


def _sizing_note(processor: Any) -> str:
    """How InternVL sizes images (for the refusal of a knob it lacks)."""
    return "InternVL tiles every image into fixed tiles (the vision encoder's input size)"


def apply_image_knobs(processor: Any, img: Any) -> None:
    """model.image → the GOT-OCR2 image processor's tiling (max_patches, min_patches; splitting off = 1 tile)."""
    ip = processor.image_processor
    lo = img.min_patches if img.min_patches is not None else int(ip.min_patches)
    hi = img.max_patches if img.max_patches is not None else int(ip.max_patches)
    if img.longest_edge is not None and img.max_patches is None:
        hi = max(1, img.longest_edge**2 // (int(ip.size["height"]) * int(ip.size["width"])))
    if img.do_image_splitting is False:
        if img.max_patches is not None and img.max_patches > 1:
            raise UserError(
                f"model.image.do_image_splitting=false means one tile per image, but model.image.max_patches is "
                f"{img.max_patches}; drop one of them"
            )
        hi = 1
    elif img.do_image_splitting and hi <= 1:
        raise UserError(
            "model.image.do_image_splitting=true needs model.image.max_patches above 1 "
            f"(the model's is {hi}); set max_patches, e.g. 6"
        )
    lo = min(lo, hi) if img.min_patches is None else lo
    if lo > hi:
        raise UserError(
            f"model.image.min_patches ({lo}) is above max_patches ({hi}); lower it or raise max_patches"
        )
    ip.min_patches, ip.max_patches = lo, hi


def card_image_lines(image: dict[str, Any]) -> list[str]:
    """The model card snippet's lines that give a loaded InternVL processor vlm-tune's tiling."""
    ip = "processor.image_processor"
    if image.get("do_image_splitting") is False:
        hi = "1"
    elif image.get("max_patches") is not None:
        hi = str(int(image["max_patches"]))
    elif image.get("longest_edge"):  # the tile budget of an L x L image
        edge = int(image["longest_edge"])
        hi = f'max(1, {edge * edge} // ({ip}.size["height"] * {ip}.size["width"]))'
    else:
        hi = None
    lines = []
    if hi is not None:
        lines.append(f"{ip}.max_patches = {hi}  # tiles per image (+1 thumbnail when over 1)")
    if image.get("min_patches") is not None:
        lines.append(f"{ip}.min_patches = {int(image['min_patches'])}")
    elif hi is not None:
        lines.append(f"{ip}.min_patches = min({ip}.min_patches, {ip}.max_patches)")
    return lines


# -- offline stand-in -------------------------------------------------------------------------------------
STAND_IN = {  # small dims; published processor class, tokens and template; 32-px tiles of 4 tokens each
    "tile_size": 32,  # published 448
    "patch_size": 8,  # published 14
    "downsample_ratio": 0.5,  # published (pixel shuffle): image_seq_length = (tile/patch)^2 * ratio^2
    "vision_layers": 2,
    "vision_hidden": 64,
    "vision_heads": 4,
    "text_hidden": 128,
    "text_layers": 2,
    "text_heads": 4,
    "text_kv_heads": 2,
    "text_intermediate": 256,
    "vocab_size": 800,
}


BUILD = 2  # bump when the builder's output changes, so stand-ins cached by an earlier build are rebuilt
# image processor settings a stand-in may override (the rest are always the published ones)
OPTIONAL = ("min_patches", "max_patches", "crop_to_patches", "image_mean", "image_std")


def checkpoint_settings() -> dict[str, Any]:
    """InternVL3-1B-hf's tile size under STAND_IN's names (for the rehearsal stand-in): the converter's 448-px
    tiles; InternViT's patch 14 is from the model's config (not pinned)."""
    ip, _ = PUBLISHED.settings()
    return {"tile_size": ip["size"]["height"], "patch_size": 14}


def build_stand_in(out_dir: str | Path, seed: int = 0, **published: Any) -> Path:
    """Build (or reuse, if the same spec) the tiny InternVL stand-in in out_dir.

    Chat template, special tokens and image processor settings are the published ones (pinned); `published`
    overrides the tiny dims (tile_size, patch_size, downsample_ratio; or OPTIONAL settings) with a real
    checkpoint's (`checkpoint_settings`), for the rehearsal of a shipped config."""
    import transformers
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from vlm_tune.standins.scaffold import build_tokenizer, reuse_or_prepare, save_stand_in, stand_in_settings

    s = stand_in_settings("InternVL", STAND_IN, published, OPTIONAL)
    out_dir = Path(out_dir)
    want = {"family": "internvl", "build": BUILD, "seed": seed, **s}
    if reuse_or_prepare(out_dir, want):
        return out_dir
    names = PUBLISHED.special_tokens()  # bos: none
    tok = build_tokenizer(
        s["vocab_size"],
        SPECIAL_TOKENS,
        eos=names["eos_token"],
        pad=names["pad_token"],
        extra_special_tokens=EXTRA_SPECIAL_TOKENS,
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    kwargs = PUBLISHED.image_processor_kwargs() | {k: s[k] for k in OPTIONAL if k in s}
    kwargs["size"] = {"height": s["tile_size"], "width": s["tile_size"]}
    ip = GotOcr2ImageProcessorPil(**kwargs)
    image_seq_length = round((s["tile_size"] // s["patch_size"]) ** 2 * s["downsample_ratio"] ** 2)
    processor = _image_only()(
        image_processor=ip, tokenizer=tok, image_seq_length=image_seq_length, chat_template=CHAT_TEMPLATE
    )
    vision = {
        "hidden_size": s["vision_hidden"],
        "num_hidden_layers": s["vision_layers"],
        "num_attention_heads": s["vision_heads"],
        "intermediate_size": s["vision_hidden"] * 4,
        "image_size": [s["tile_size"], s["tile_size"]],
        "patch_size": [s["patch_size"], s["patch_size"]],
    }
    text = {
        "model_type": "qwen2",  # InternVL3's decoder (InternVL3.5: qwen3)
        "vocab_size": len(tok),
        "hidden_size": s["text_hidden"],
        "intermediate_size": s["text_intermediate"],
        "num_hidden_layers": s["text_layers"],
        "num_attention_heads": s["text_heads"],
        "num_key_value_heads": s["text_kv_heads"],
        "max_position_embeddings": 8192,
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids[END_OF_TURN],
        "bos_token_id": None,
        "tie_word_embeddings": False,
    }
    config = transformers.InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=image_seq_length,
        downsample_ratio=s["downsample_ratio"],
        tie_word_embeddings=False,
    )
    return save_stand_in(
        transformers.InternVLForConditionalGeneration,
        config,
        processor,
        out_dir,
        want,
        seed,
        eos=ids[END_OF_TURN],
        pad=ids["<|endoftext|>"],
        bos=None,
    )


def image_token_counts(processor: Any, sizes: list[tuple[int, int]]) -> list[int]:
    """Tokens each (height, width) image expands to: the processor's own `<img>` + tiles + `</img>` text,
    tokenized (the tile count from the processor's layout, no pixels processed). Not the
    `num_image_tokens` of `_get_num_multimodal_tokens`: transformers 5.25 dropped `<img>`/`</img>` from it.
    """
    patches = [int(n) for n in processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_patches"]]
    texts = [processor.replace_image_token({"num_patches": patches}, i) for i in range(len(sizes))]
    return [len(ids) for ids in processor.tokenizer(texts, add_special_tokens=False)["input_ids"]]


FAMILY = Family(
    name="internvl",
    title="InternVL",
    model_types=("internvl",),
    processor_classes=("InternVLProcessor",),
    builtin="builtin:tiny-internvl",
    end_of_turn=END_OF_TURN,
    image_tokens=IMAGE_TOKENS,
    target_presets={
        "decoder": r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
        "projector": r"model\.multi_modal_projector\.linear_(1|2)",
        "vision": r"model\.vision_tower\.encoder\.layer\.\d+\.(attention\.((q|k|v)_proj|projection_layer)|mlp\.fc(1|2))",
    },
    vision_module="model.vision_tower",
    projector_modules=("model.multi_modal_projector",),
    vision_save_modules=lambda model: ["vision_tower"],
    image_knobs=IMAGE_KNOBS,
    apply_image_knobs=apply_image_knobs,
    sizing_note=_sizing_note,
    build_stand_in=build_stand_in,
    load_processor=load_processor,
    card_image_lines=card_image_lines,
    image_token_counts=image_token_counts,
    published=(PUBLISHED,),
)
