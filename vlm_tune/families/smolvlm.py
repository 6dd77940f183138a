"""SmolVLM / SmolVLM2 / Idefics3: everything vlm-tune knows about this family.

Module names (transformers 5.x): decoder `model.text_model.layers.N.{self_attn,mlp}.*_proj`; projector
`model.connector.modality_projection.proj`; vision tower `model.vision_model` (its own q/k/v projections, so
presets are anchored). An image becomes tiles of `image_seq_len` `<image>` tokens, framed by
`<fake_token_around_image>`, `<row_i_col_j>` and `<global-img>` markers; an answer ends with
`<end_of_utterance>`. Resolution knobs: `model.image.longest_edge` → image processor `size`, `tile_size` →
`max_image_size`, `do_image_splitting`. The offline stand-in is `vlm_tune.tiny` (`builtin:tiny`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm_tune.errors import UserError
from vlm_tune.families import Family

TARGET_PRESETS = {
    "decoder": r"model\.text_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
    "projector": r"model\.connector\.modality_projection\.proj",
    "vision": r"model\.vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))",
}
VISION_MODULE = "model.vision_model"
IMAGE_TOKENS = ("<image>", "<fake_token_around_image>", "<global-img>") + tuple(
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
)


def apply_image_settings(processor: Any, img: Any) -> None:
    """model.image → the image processor (longest edge, tile size, splitting)."""
    for key in ("min_pixels", "max_pixels"):
        if getattr(img, key, None) is not None:
            raise UserError(
                f"model.image.{key} is a Qwen knob; SmolVLM resizes by model.image.longest_edge (and tiles by "
                "tile_size / do_image_splitting): use those"
            )
    for key in ("max_patches", "min_patches"):
        if getattr(img, key, None) is not None:
            raise UserError(
                f"model.image.{key} is an InternVL knob; SmolVLM tiles by model.image.longest_edge / tile_size / "
                "do_image_splitting: use those"
            )
    for key in ("pan_and_scan", "max_crops"):
        if getattr(img, key, None) is not None:
            raise UserError(
                f"model.image.{key} is a Gemma 3 knob; SmolVLM tiles images itself: set model.image.tile_size / "
                "do_image_splitting (and longest_edge) instead"
            )
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


def _build_stand_in(out_dir: str | Path, seed: int = 0) -> Path:
    """builtin:tiny (real SmolVLM checkpoints are rehearsed by vlm_tune.rehearsal's own SmolVLM builder)."""
    from vlm_tune.tiny import ensure_tiny_model

    return ensure_tiny_model(out_dir, seed)


def _load_processor(path: str, revision: str | None = None) -> Any:
    """AutoProcessor; SmolVLM2's also where torchvision is missing (vlm_tune.smolvlm2)."""
    from vlm_tune.smolvlm2 import auto_processor

    return auto_processor(path, revision)


FAMILY = Family(
    name="smolvlm",
    model_types=("idefics3", "smolvlm"),
    processor_classes=("Idefics3Processor", "SmolVLMProcessor"),
    builtin="builtin:tiny",
    end_of_turn="<end_of_utterance>",
    image_tokens=IMAGE_TOKENS,
    target_presets=TARGET_PRESETS,
    vision_module=VISION_MODULE,
    projector_modules=("model.connector",),
    vision_save_modules=lambda model: ["vision_model"],
    apply_image_settings=apply_image_settings,
    build_stand_in=_build_stand_in,
    load_processor=_load_processor,
    card_image_lines=card_image_lines,
    image_token_counts=image_token_counts,
)
