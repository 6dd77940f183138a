"""PaliGemma 2: everything vlm-tune knows about this family.

- A prefix-LM, not a chat model: no chat template, no turns. The processor lays a row out as
  `<image>`×(n·image_seq_length) `<bos>` PREFIX `\\n` SUFFIX `<eos>`: the images and the prompt (the prefix)
  attend to each other in full (`token_type_ids` 0), the answer (the suffix, `token_type_ids` 1) is causal.
  `processor(text=prefix, images=..., suffix=answer)` builds that layout and its own labels (suffix only);
  vlm-tune's `vlm_tune.data.prefix_lm.PrefixLMCollator` uses this convention, and `<eos>` closes an answer.
  How the prompt becomes the prefix is decided there (system + "\\n" + user template; one exchange per row).
- Image tokens: `<image>`, repeated `image_seq_length` = (image_size / patch_size)² times per image; nothing
  else is image-related (`<locNNNN>` / `<segNNN>` are detection/segmentation text tokens the processor adds).
- Module names (transformers 5.x): decoder (Gemma 2) `model.language_model.layers.N.{self_attn.(q|k|v|o)_proj,
  mlp.(gate|up|down)_proj}`; projector `model.multi_modal_projector.linear` (one linear layer, outside the
  tower); vision tower (SigLIP) `model.vision_tower.encoder.layers.N.{self_attn.(q|k|v|out)_proj,
  mlp.fc(1|2)}`.
- Resolution is fixed by the checkpoint: SigLIP's position embeddings are learned for one square size (224,
  448 or 896 px: 256, 1024 or 4096 image tokens), every image is resized to it, so changing the resolution
  means choosing another checkpoint. It has no `model.image.*` knobs: each is refused, except longest_edge
  equal to the fixed size (a no-op, so configs written for another family's same-size setting still load).
- Image processor: SigLIP's (`SiglipImageProcessor`; the PIL class where torchvision is missing), mean/std
  0.5, bicubic, square `size`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlm_tune.errors import UserError
from vlm_tune.families.base import Family
from vlm_tune.families.pinned import Pinned, Published

IMAGE_TOKEN = "<image>"
END_OF_TURN = "<eos>"
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # ids 0-4, as in Gemma's tokenizer
CHECKPOINT_SIZES = "224, 448 or 896 px (google/paligemma2-3b-pt-224 / -448 / -896, mix-224 / mix-448)"
PUBLISHED = Published(
    checkpoint="google/paligemma2-3b-pt-448",
    tokens=Pinned(
        "paligemma/tokens.json",
        "02d5a9ce6fa5bc08a49e870f57292f84550f4ef0700234a7101d6aeabb39ac9f",
        "GitHub huggingface/transformers, src/transformers/models/paligemma/convert_paligemma2_weights_to_hf.py "
        "at 15ea02a2add1672acbeee158a9448720d6093de1 (pad 0, eos 1, bos 2, image_token_index 257152)",
        "extracted",
    ),
    image_processor=Pinned(
        "paligemma/preprocessor_config.json",
        "6a95b351c016da050e0821591357e732cce182681a8c079ecf196c4943cabdfa",
        "https://huggingface.co/onnx-community/paligemma2-3b-pt-896/blob/main/preprocessor_config.json "
        "(8a33316, 425 B) with size 896 → 448 and image_seq_length 4096 → 1024, the 448 variant's values in the "
        "converter above (patch 14: (448/14)^2 = 1024)",
        "transcribed",
    ),
    has_chat_template=False,  # a prefix-LM: the pt checkpoints have none
    unverified={
        "special_tokens.adds_bos": "the pinned files do not say whether the tokenizer adds <bos> itself; the "
        "processor writes it after the image tokens"
    },
)
TARGET_PRESETS = {
    "decoder": r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
    "projector": r"model\.multi_modal_projector\.linear",
    "vision": r"model\.vision_tower\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))",
}


def fixed_size(processor: Any) -> int:
    """The square input size every image is resized to (the checkpoint's)."""
    size = processor.image_processor.size
    return int(size["height"])


def _sizing_note(processor: Any) -> str:
    """Why PaliGemma has no model.image knobs (for the refusal of one)."""
    return (
        f"it resizes every image to the fixed square size of its checkpoint ({fixed_size(processor)} px here, "
        f"{processor.image_seq_length} image tokens); it cannot be changed by a setting. Remove it and choose "
        f"the checkpoint for the resolution you want: {CHECKPOINT_SIZES}"
    )


def apply_image_knobs(processor: Any, img: Any) -> None:
    """model.image → PaliGemma: nothing to set (its input size is fixed by the checkpoint: every knob is
    refused, except longest_edge equal to that size, which changes nothing)."""


# Lines of the model card's `answer(images, question)` that build the model inputs (vlm_tune.card_snippet):
# the prefix-LM layout of vlm_tune.data.prefix_lm, not a chat template. The processor adds <bos> after the
# images and "\n" after the prompt, as in training.
CARD_INPUT_LINES = (
    '    text = prompt["user_template"].format(question=question)',
    '    if prompt["system"]:',
    '        text = prompt["system"] + "\\n" + text  # the prefix: system, then the user text',
    "    text = processor.image_token * len(images) + text  # images first; no chat template (prefix-LM)",
    '    inputs = processor(text=[text], images=[images], return_tensors="pt").to(model.device)',
)


def attn_implementation(name: str) -> Any:
    """model.attn_implementation → from_pretrained's: Gemma 2 has no sdpa kernel (its attention logits are
    soft-capped), so sdpa means sdpa for SigLIP and eager for the decoder; flash attention would drop the
    bidirectional prefix mask, so transformers refuses it for PaliGemma."""
    if name == "flash_attention_2":
        raise UserError(
            "model.attn_implementation=flash_attention_2: PaliGemma cannot use it (it would drop the full "
            "attention over the image and prompt prefix); use sdpa (SigLIP sdpa, Gemma 2 decoder eager) or eager"
        )
    if name == "sdpa":
        return {"": "sdpa", "vision_config": "sdpa", "text_config": "eager"}
    return name


def _vision_save_modules(model: Any) -> list[str]:
    """Under model.train_vision the whole SigLIP tower (the projector sits outside it) is trained fully."""
    return ["vision_tower"]


# -- processors -------------------------------------------------------------------------------------------
def _load_processor(path: str, revision: str | None = None) -> Any:
    """PaliGemmaProcessor with SigLIP's image processor in vlm-tune's backend (no fallback warning)."""
    from transformers import AutoTokenizer, PaliGemmaProcessor

    from vlm_tune.families.base import load_image_processor

    image_processor = load_image_processor(path, revision)
    if not hasattr(image_processor, "image_seq_length"):  # saved by every PaliGemma checkpoint
        raise UserError(
            f"{path}: preprocessor_config.json has no image_seq_length; not a PaliGemma processor"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


# -- offline stand-in -------------------------------------------------------------------------------------
STAND_IN = {  # small dims; published processor class and token layout; 64-px input, patch 8 → 64 tokens
    "image_size": 64,
    "patch_size": 8,
    "vision_hidden": 64,
    "vision_layers": 2,
    "vision_heads": 4,
    "text_hidden": 64,
    "text_layers": 2,
    "text_heads": 4,
    "text_kv_heads": 2,
    "text_intermediate": 128,
    "vocab_size": 600,  # BPE merges before the 256 byte-fallback tokens and the processor's 1,153 tokens
}
BUILD = 2  # bump when the builder's output changes, so stand-ins cached by an earlier build are rebuilt


def checkpoint_settings() -> dict[str, Any]:
    """paligemma2-3b-pt-448's input size under STAND_IN's names (for the rehearsal stand-in); SigLIP's patch 14
    is from the converter (not pinned)."""
    ip, _ = PUBLISHED.settings()
    return {"image_size": ip["size"]["height"], "patch_size": 14}


def build_tokenizer(vocab_size: int) -> Any:
    """A GemmaTokenizer (BPE with byte fallback, spaces as ▁, as Gemma's) trained on chart-QA text."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer

    from vlm_tune.standins.scaffold import _corpus

    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    bpe.train_from_iterator(sorted(_corpus()), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = {t: i for i, t in enumerate(SPECIALS + bytes_)}
    for token in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return GemmaTokenizer(vocab=vocab, merges=merges, padding_side="right")


def _build(out_dir: str | Path, seed: int = 0, **published: Any) -> Path:
    """Build (or reuse, if the same spec) the tiny PaliGemma 2 stand-in in out_dir.

    Special tokens and image processor settings are the published ones (pinned); `published` overrides
    image_size / patch_size (and image_mean / image_std) with a real checkpoint's (`checkpoint_settings`), for
    the rehearsal of a shipped config (448 / 14 → 1,024 image tokens); the dims stay tiny."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from vlm_tune.standins.scaffold import reuse_or_prepare, save_stand_in, stand_in_settings

    s = stand_in_settings("PaliGemma", STAND_IN, published, ("image_mean", "image_std"))
    out_dir = Path(out_dir)
    want = {"family": "paligemma", "build": BUILD, "seed": seed, **s}
    if reuse_or_prepare(out_dir, want):
        return out_dir
    image_seq_length = (s["image_size"] // s["patch_size"]) ** 2
    kwargs = PUBLISHED.image_processor_kwargs()  # SiglipImageProcessor: bicubic, mean/std 0.5, ...
    kwargs |= {k: s[k] for k in ("image_mean", "image_std") if k in s}
    kwargs |= {
        "size": {"height": s["image_size"], "width": s["image_size"]},
        "image_seq_length": image_seq_length,
    }
    ip = SiglipImageProcessorPil(**kwargs)
    tok = build_tokenizer(s["vocab_size"])
    processor = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)  # adds <image> and <loc/seg> tokens
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS + [IMAGE_TOKEN]}
    text = {
        "model_type": "gemma2",
        "vocab_size": len(tok),
        "hidden_size": s["text_hidden"],
        "intermediate_size": s["text_intermediate"],
        "num_hidden_layers": s["text_layers"],
        "num_attention_heads": s["text_heads"],
        "num_key_value_heads": s["text_kv_heads"],
        "head_dim": s["text_hidden"] // s["text_heads"],
        "query_pre_attn_scalar": s["text_hidden"] // s["text_heads"],
        "max_position_embeddings": 8192,
        "pad_token_id": ids["<pad>"],
        "eos_token_id": ids["<eos>"],
        "bos_token_id": ids["<bos>"],
        "tie_word_embeddings": False,
    }
    vision = {
        "hidden_size": s["vision_hidden"],
        "intermediate_size": s["vision_hidden"] * 2,
        "num_hidden_layers": s["vision_layers"],
        "num_attention_heads": s["vision_heads"],
        "image_size": s["image_size"],
        "patch_size": s["patch_size"],
        "vision_use_head": False,
    }
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids[IMAGE_TOKEN],
        vocab_size=len(tok),
        projection_dim=s["text_hidden"],
        hidden_size=s["text_hidden"],
        tie_word_embeddings=False,
    )
    return save_stand_in(
        PaliGemmaForConditionalGeneration,
        config,
        processor,
        out_dir,
        want,
        seed,
        eos=ids["<eos>"],
        pad=ids["<pad>"],
        bos=ids["<bos>"],
    )


# Gemma 2's activations exceed float16's range (65,504): NaN loss or garbage answers on a T4/V100, where `auto`
# would otherwise pick float16. Reported, not measured here: onnxruntime-genai warns on float16 for Gemma 2 and 3
# (microsoft/onnxruntime-genai#2444), Gemma 3 in huggingface/transformers#36822. So never float16.
FLOAT16_HAZARD = "its Gemma 2 decoder's activations overflow float16 (NaN loss or garbage answers)"


FAMILY = Family(
    name="paligemma",
    title="PaliGemma",
    model_types=("paligemma",),
    processor_classes=("PaliGemmaProcessor",),
    builtin="builtin:tiny-paligemma",
    end_of_turn=END_OF_TURN,
    image_tokens=(IMAGE_TOKEN,),
    target_presets=TARGET_PRESETS,
    vision_module="model.vision_tower",
    projector_modules=("model.multi_modal_projector",),
    vision_save_modules=_vision_save_modules,
    image_knobs={},
    apply_image_knobs=apply_image_knobs,
    sizing_note=_sizing_note,
    fixed_edge=fixed_size,
    build_stand_in=_build,
    load_processor=_load_processor,
    prefix_lm=True,
    card_input_lines=CARD_INPUT_LINES,
    attn_implementation=attn_implementation,
    published=(PUBLISHED,),
    float16_hazard=FLOAT16_HAZARD,
)
