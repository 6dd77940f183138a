"""Gemma 3 (google/gemma-3-4b-it, -12b-it, -27b-it): everything vlm-tune knows about this family.

transformers 5.x: `Gemma3ForConditionalGeneration`, `Gemma3Processor`, config model_type "gemma3".
- Chat: `<bos><start_of_turn>user\\n ... <end_of_turn>\\n<start_of_turn>model\\n ANSWER <end_of_turn>\\n`. There
  is no system turn: the template folds the system text (+ "\\n\\n") into the first user turn. It `trim`s every
  text part, answers included, so an answer with leading/trailing whitespace would be trained as a different
  text: the collator refuses such rows (`vlm_tune.data.collate`). `<end_of_turn>` closes an answer and is
  supervised with it. The template writes `<bos>` itself and the tokenizer adds another one unless asked not to
  (the collator tokenizes rendered chats with add_special_tokens=False).
- Images: the template writes `<start_of_image>` per image; the processor replaces it with
  `\\n\\n<start_of_image>` + mm_tokens_per_image x `<image_soft_token>` + `<end_of_image>\\n\\n` (256 soft tokens
  published), and with pan-and-scan the original plus each crop, each a full block, inside fixed English text.
  The newlines merge with their neighbours when tokenized, so the pre-flight count tokenizes the expanded text
  (`expand_image_placeholders`). In transformers >= 5.15 `Gemma3Processor.image_token_id` is the
  `<start_of_image>` id; the soft token is `processor.tokenizer.image_token_id` (= config.image_token_id).
  Never supervised: `<start_of_image>`, `<end_of_image>`, `<image_soft_token>`.
- Attention: an image's soft tokens attend to each other bidirectionally, text stays causal. The model builds
  that mask from `token_type_ids` (1 on soft tokens), which the processor returns and the collator passes on;
  without them the image becomes causal silently (tests/test_family_gemma3.py proves the mask in training).
- Module names: decoder `model.language_model.layers.N.{self_attn.(q|k|v|o)_proj, mlp.(gate|up|down)_proj}`;
  vision tower `model.vision_tower` (SigLIP, `encoder.layers.N.{self_attn.*_proj, mlp.fc1/2}`);
  projector `model.multi_modal_projector`: an RMSNorm and one weight matrix used by matmul (no nn.Linear), so
  LoRA cannot wrap it: lora.targets "projector" trains it fully (modules_to_save; 2.9M parameters for 4B).
- Resolution: every image (and crop) is resized to a fixed square, 896 px published (the vision tower's
  size; 256 tokens each), so no edge, tile or pixel budget can be set (model.image.longest_edge equal to the
  square is accepted: it changes nothing; `Family.fixed_edge`). The one knob is pan-and-scan
  (model.image.pan_and_scan, max_crops): an image whose aspect ratio is >= 1.2 is also cut into 2..max_crops
  crops of at least 256 px, each another 256 tokens. The processor's own `images_kwargs` decide (setting the image processor's attribute alone has no effect), so that is what vlm-tune sets.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from vlm_tune.errors import UserError
from vlm_tune.families.base import Family
from vlm_tune.families.pinned import Pinned, Published

# Gemma's ids where it has them (pad 0, eos 1, bos 2, unk 3); the image tokens after them
SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
IMAGE_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
END_OF_TURN = "<end_of_turn>"
# -- published values -----------------------------------------------------------------------------------
_VARUN = (
    "GitHub varun00391/local-finetuned-model, gemma-3-270m/gemma-3-270m-it/{} at "
    "a913c33978b466ed686191eda666661a918ee9a3"
)
PUBLISHED = Published(
    checkpoint="google/gemma-3-4b-it",
    chat_template=Pinned(
        "gemma3/chat_template.jinja",
        "7de1c58e208eda46e9c7f86397df37ec49883aeece39fb961e0a6b24088dd3c4",
        _VARUN.format("chat_template.jinja")
        + " (gemma-3-270m-it's; byte-identical to _CHAT_TEMPLATE of GitHub "
        "huggingface/transformers, src/transformers/models/gemma3/convert_gemma3_weights.py at "
        "0d7e95d96b4e187c651e2b2406ed98ed40d74963, the script that writes every Gemma 3 checkpoint)",
        "verbatim",
    ),
    tokens=Pinned(
        "gemma3/tokens.json",
        "55d62e7d7ae7aad98773f9e8d8c0d838858cbaeb5114b8bb0018088a1dbf8cf7",
        "extracted from "
        + _VARUN.format("tokenizer_config.json")
        + " (the tokenizer all Gemma 3 sizes share)",
        "extracted",
    ),
    image_processor=Pinned(
        "gemma3/preprocessor_config.json",
        "f688d6bb20c5017601c4011de7ca656da8485b540b05013efdaf986c0fcc918d",
        "https://huggingface.co/Synthetica-AI/gemma-3-4b-it/blob/main/preprocessor_config.json (09fcf0f, "
        '"Copy model google/gemma-3-4b-it", 570 B)',
        "transcribed",
    ),
    processor=Pinned(
        "gemma3/processor_config.json",
        "3ffd5f11778dc73e2b69b3c00535e4121e1badf7018136263cd17b5b34fbaa53",
        "https://huggingface.co/SatyaV/gemma-3-4b-SiglipEncoder/blob/main/processor_config.json (d8ec4cd, 70 B)",
        "transcribed",
    ),
    unverified={
        "special_tokens.adds_bos": "the pinned files do not say whether the tokenizer adds <bos> itself; the "
        "stand-in's does, as Gemma's tokenizer is known to, and the collator never lets it"
    },
)
# the Gemma 3 chat template (it writes <bos> itself, folds a system turn into the first user turn, trims text)
CHAT_TEMPLATE = PUBLISHED.template()

DECODER = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
VISION = r"model\.vision_tower\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))"
PROJECTOR = "model.multi_modal_projector"

# the Gemma 3 processor's pan-and-scan defaults (Gemma3Processor.images_kwargs, transformers 5.24)
PAN_AND_SCAN_DEFAULTS = {"min_crop_size": 256, "max_num_crops": 4, "min_ratio_to_activate": 1.2}


# -- resolution ---------------------------------------------------------------------------------------------
# model.image knob → what it sets on the processor (its images_kwargs, which override the image processor's)
IMAGE_KNOBS = {
    "pan_and_scan": "do_pan_and_scan: also cut wide or tall images into crops, each as many tokens again",
    "max_crops": "pan_and_scan_max_num_crops: the most crops per image (with pan_and_scan)",
}


def apply_image_knobs(processor: Any, img: Any) -> None:
    """model.image → the Gemma 3 processor's pan-and-scan kwargs (every other knob is refused before)."""
    if img.max_crops is not None and not img.pan_and_scan:
        raise UserError("model.image.max_crops only applies with model.image.pan_and_scan: true; set both")
    kwargs = dict(
        processor.images_kwargs
    )  # the processor's defaults override the image processor's attributes
    if img.pan_and_scan is not None:
        kwargs["do_pan_and_scan"] = img.pan_and_scan
    if img.max_crops is not None:
        kwargs["pan_and_scan_max_num_crops"] = img.max_crops
    processor.images_kwargs = kwargs


def _square(processor: Any) -> int:
    """The square edge every image (and crop) is resized to."""
    size = processor.image_processor.size
    return int(size["height"] if isinstance(size, dict) else size.height)


def _sizing_note(processor: Any) -> str:
    """How Gemma 3 sizes images (for the refusal of a knob it lacks)."""
    square = _square(processor)
    return (
        f"it resizes every image to a fixed square ({square} px, {processor.image_seq_length} image tokens)"
    )


def card_image_lines(image: dict[str, Any]) -> list[str]:
    """The model card snippet's lines that give a loaded Gemma 3 processor vlm-tune's pan-and-scan setting."""
    kwargs = {}
    if image.get("pan_and_scan") is not None:
        kwargs["do_pan_and_scan"] = bool(image["pan_and_scan"])
    if image.get("max_crops") is not None:
        kwargs["pan_and_scan_max_num_crops"] = int(image["max_crops"])
    if not kwargs:
        return []
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return [f"processor.images_kwargs = dict(processor.images_kwargs, {args})  # pan-and-scan, as trained"]


def num_crops(height: int, width: int, min_crop_size: int, max_num_crops: int, min_ratio: float) -> int:
    """Pan-and-scan crops of a height x width image (0: none), by the published rule: only an image whose long
    side is >= min_ratio times its short side; about one crop per short side's length (at least 2, at most
    max_num_crops, none below min_crop_size px)."""
    long, short = max(height, width), min(height, width)
    if long / short < min_ratio:
        return 0
    n = min(int(math.floor(long / short + 0.5)), long // min_crop_size)
    n = min(max_num_crops, max(2, n))
    if min(math.ceil(long / n), short) < min_crop_size:
        return 0
    return n


def expand_image_placeholders(processor: Any, text: str, sizes: list[tuple[int, int]]) -> str:
    """The text Gemma3Processor tokenizes for `text` with images of these (height, width) sizes, without
    running the image processor (each `<start_of_image>` → its block, with pan-and-scan crops if enabled)."""
    kw = processor.images_kwargs
    parts = text.split(processor.image_token)
    if len(parts) - 1 != len(sizes):
        raise ValueError(f"{len(parts) - 1} image placeholders for {len(sizes)} images")
    out = [parts[0]]
    for (h, w), rest in zip(sizes, parts[1:], strict=True):
        crops = 0
        if kw.get("do_pan_and_scan"):
            crops = num_crops(
                h,
                w,
                kw.get("pan_and_scan_min_crop_size") or PAN_AND_SCAN_DEFAULTS["min_crop_size"],
                kw.get("pan_and_scan_max_num_crops") or PAN_AND_SCAN_DEFAULTS["max_num_crops"],
                kw.get("pan_and_scan_min_ratio_to_activate")
                or PAN_AND_SCAN_DEFAULTS["min_ratio_to_activate"],
            )
        out += [processor.replace_image_token({"num_crops": [crops]}, 0), rest]
    return "".join(out)


# -- offline stand-in ---------------------------------------------------------------------------------------
STAND_IN = {  # small dims; published processor class, tokens and template; 64-px square → 16 soft tokens
    "vision_layers": 2,
    "vision_hidden": 64,
    "vision_heads": 4,
    "image_size": 64,
    "patch_size": 8,
    "mm_tokens_per_image": 16,
    "text_hidden": 128,
    "text_layers": 2,  # one sliding-window layer, one global (published: 5 sliding : 1 global)
    "text_heads": 4,
    "text_kv_heads": 2,
    "head_dim": 32,
    "text_intermediate": 256,
    "sliding_window": 32,
    "vocab_size": 800,
}
BUILD = 2  # bump when the builder's output changes, so stand-ins cached by an earlier build are rebuilt
# newline runs as the real Gemma vocabulary has them ("\n\n" is one token), so the placeholder expansion's
# newlines merge with the template's as they do with the real tokenizer
_NEWLINE_CORPUS = ("\n\n", "\n\n\n", "\n\n\n\n", "Chart\n\nHow many bars?\n\n\nWhich\n")


def checkpoint_settings() -> dict[str, Any]:
    """gemma-3-4b-it's settings under STAND_IN's names (for the rehearsal stand-in): the published square and
    image tokens; SigLIP's patch 14 is from the model's config.json (not pinned)."""
    ip, proc = PUBLISHED.settings()
    return {
        "image_size": ip["size"]["height"],
        "patch_size": 14,
        "mm_tokens_per_image": proc["image_seq_length"],
    }


def _build(out_dir: str | Path, seed: int = 0, **published: Any) -> Path:
    """Build (or reuse, if the same spec) the tiny Gemma 3 stand-in in out_dir.

    Chat template, special tokens and image processor settings are the published ones (pinned); `published`
    overrides the tiny dims (image_size, patch_size, mm_tokens_per_image; image_mean, image_std) with a real
    checkpoint's (`checkpoint_settings`), for the rehearsal of a shipped config; other dims stay tiny."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from vlm_tune.standins.scaffold import build_tokenizer, reuse_or_prepare, save_stand_in, stand_in_settings

    s = stand_in_settings("Gemma 3", STAND_IN, published, ("image_mean", "image_std"))
    out_dir = Path(out_dir)
    want = {"family": "gemma3", "build": BUILD, "seed": seed, **s}
    if reuse_or_prepare(out_dir, want):
        return out_dir
    names = PUBLISHED.special_tokens()
    tok = build_tokenizer(
        s["vocab_size"],
        SPECIAL_TOKENS,
        eos=names["eos_token"],
        pad=names["pad_token"],
        unk=names["unk_token"],
        extra_corpus=_NEWLINE_CORPUS,
        bos_token=names["bos_token"],
        add_bos_token=True,  # as Gemma's tokenizer: the collator must not let it add a second <bos>
        extra_special_tokens={
            k.removeprefix("named."): v for k, v in names.items() if k.startswith("named.")
        },
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    side = s["image_size"] // s["patch_size"]
    if int(s["mm_tokens_per_image"] ** 0.5) ** 2 != s["mm_tokens_per_image"] or side % int(
        s["mm_tokens_per_image"] ** 0.5
    ):
        raise ValueError("mm_tokens_per_image must be a square whose side divides image_size / patch_size")
    kwargs = PUBLISHED.image_processor_kwargs()  # bilinear, mean/std 0.5, do_convert_rgb null, ...
    kwargs |= {k: s[k] for k in ("image_mean", "image_std") if k in s}
    kwargs |= {"size": {"height": s["image_size"], "width": s["image_size"]}}
    kwargs["image_seq_length"] = s["mm_tokens_per_image"]  # the published file repeats it here
    # saved as Gemma3ImageProcessor (the class users load with torchvision)
    ip = Gemma3ImageProcessorPil(**kwargs)
    processor = Gemma3Processor(
        image_processor=ip,
        tokenizer=tok,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=s["mm_tokens_per_image"],
    )
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": s["vision_hidden"],
        "intermediate_size": s["vision_hidden"] * 2,
        "num_hidden_layers": s["vision_layers"],
        "num_attention_heads": s["vision_heads"],
        "image_size": s["image_size"],
        "patch_size": s["patch_size"],
        "vision_use_head": False,
        "layer_norm_eps": 1e-6,
    }
    text = {
        "vocab_size": len(tok),
        "hidden_size": s["text_hidden"],
        "intermediate_size": s["text_intermediate"],
        "num_hidden_layers": s["text_layers"],
        "num_attention_heads": s["text_heads"],
        "num_key_value_heads": s["text_kv_heads"],
        "head_dim": s["head_dim"],
        "query_pre_attn_scalar": s["head_dim"],
        "sliding_window": s["sliding_window"],
        "layer_types": ["sliding_attention", "full_attention"] * (s["text_layers"] // 2)
        + ["sliding_attention"] * (s["text_layers"] % 2),
        "max_position_embeddings": 8192,
        "rope_parameters": {  # published: linear scaling x8 on the global layers (4B and up)
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        },
        "pad_token_id": ids["<pad>"],
        "eos_token_id": [ids["<eos>"], ids[END_OF_TURN]],
        "bos_token_id": ids["<bos>"],
    }
    config = Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=s["mm_tokens_per_image"],
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        tie_word_embeddings=True,  # as published
    )
    return save_stand_in(
        Gemma3ForConditionalGeneration,
        config,
        processor,
        out_dir,
        want,
        seed,
        eos=[ids["<eos>"], ids[END_OF_TURN]],  # published generation_config: [1, 106]
        pad=ids["<pad>"],
        bos=ids["<bos>"],
    )


# Gemma 3's activations exceed float16's range (huggingface/transformers#36822: NaN in inference; NaN losses in
# float16 training reported on V100): never float16; `auto` is float32 on a GPU without bfloat16. Not measured here.
FLOAT16_HAZARD = "Gemma 3's activations overflow float16 (NaN loss or empty answers)"


FAMILY = Family(
    name="gemma3",
    title="Gemma 3",
    model_types=("gemma3",),
    processor_classes=("Gemma3Processor",),
    builtin="builtin:tiny-gemma3",
    end_of_turn=END_OF_TURN,
    image_tokens=IMAGE_TOKENS,
    target_presets={"decoder": DECODER, "vision": VISION},
    vision_module="model.vision_tower",
    projector_modules=(PROJECTOR,),
    vision_save_modules=lambda model: ["vision_tower"],
    image_knobs=IMAGE_KNOBS,
    apply_image_knobs=apply_image_knobs,
    sizing_note=_sizing_note,
    fixed_edge=_square,
    build_stand_in=_build,
    card_image_lines=card_image_lines,
    expand_image_placeholders=expand_image_placeholders,
    full_projector=("multi_modal_projector",),
    published=(PUBLISHED,),
    float16_hazard=FLOAT16_HAZARD,
)
