"""Model families: everything vlm-tune knows about one architecture, one module each.

A family is a plain record (`base.Family`) filled in by its own module (`smolvlm.py`, `qwen.py`): how to recognise
it (config `model_type`, processor class), which tokens are image-related (never supervised), which token
closes an answer, the LoRA presets as module-name regexes, the `model.image.*` knobs it has (declared once,
in its record: `Family.image_knobs`; one check here refuses any other knob, naming the families that have it)
and how their values reach its processor, the builder of its offline stand-in (`builtin:tiny...`), and the pinned published values (chat template, special
tokens, processor settings) of the checkpoints its stand-ins imitate (`pinned.Published`, files in
`published/<folder>/`). `FAMILIES` lists them; nothing registers itself.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from vlm_tune.errors import UserError
from vlm_tune.families.base import Family, load_image_processor


def _families() -> tuple[Family, ...]:
    from vlm_tune.families import gemma3, internvl, lfm2vl, paligemma, qwen, smolvlm

    return (
        smolvlm.FAMILY,
        qwen.QWEN2_5_VL,
        qwen.QWEN3_VL,
        paligemma.FAMILY,
        internvl.FAMILY,
        lfm2vl.FAMILY,
        gemma3.FAMILY,
    )


def image_knob_problems(family: Family, processor: Any, image: Any) -> list[str]:
    """One message per model.image knob set in `image` (an ImageSection) that `family` does not declare: it
    names the knob, the families that have it, how this family sizes images and the knobs it has."""
    problems = []
    for knob, field in type(image).model_fields.items():
        value = getattr(image, knob)
        if knob in family.image_knobs or value is None or value == field.default:
            continue
        if knob == "longest_edge" and family.fixed_edge is not None and value == family.fixed_edge(processor):
            continue  # the size the checkpoint resizes to anyway: nothing to change
        owners = " / ".join(f.title for f in _families() if knob in f.image_knobs)
        own = ", ".join(f"model.image.{k}" for k in family.image_knobs)
        parts = [
            f"model.image.{knob} does not apply to {family.title}"
            + (f" (a knob of {owners})" if owners else ""),
            family.sizing_note(processor),
            f"{family.title}'s knobs: {own}" if own else f"{family.title} has no model.image knobs",
        ]
        problems.append("; ".join(p for p in parts if p))
    return problems


def apply_image_settings(family: Family, processor: Any, image: Any) -> None:
    """model.image (an ImageSection) → `processor`: a knob `family` lacks is a UserError (every such knob, one
    per line), then the family sets its own knobs."""
    problems = image_knob_problems(family, processor, image)
    if problems:
        raise UserError("\n".join(problems))
    family.apply_image_knobs(processor, image)


def all_families() -> tuple[Family, ...]:
    """Every supported family, SmolVLM first."""
    return _families()


def supported() -> str:
    return ", ".join(f"{f.name} (model_type {'/'.join(f.model_types)})" for f in _families())


def family_by_builtin(name: str) -> Family | None:
    """The family whose stand-in is `name` (e.g. builtin:tiny-qwen2.5-vl), or None."""
    return next((f for f in _families() if f.builtin == name), None)


@functools.lru_cache(maxsize=32)
def family_of_name(name_or_path: str, revision: str | None = None) -> Family | None:
    """The family of model.name_or_path without loading weights: a builtin's, a local directory's config.json,
    or a hub model's config.json (the local cache first); None when it cannot be read or is not supported.
    Cached, so every decision in a process sees the same answer."""
    from vlm_tune.standins.real_decoder import BUILTIN_SMOLLM2

    if name_or_path.startswith("builtin:"):
        smolvlm = name_or_path == BUILTIN_SMOLLM2  # the real SmolLM2 decoder in a SmolVLM
        return _families()[0] if smolvlm else family_by_builtin(name_or_path)
    local = Path(name_or_path) / "config.json"
    found: str | None = str(local) if local.is_file() else None
    if found is None and not Path(name_or_path).exists() and name_or_path.count("/") == 1:
        from huggingface_hub import hf_hub_download

        try:
            found = hf_hub_download(name_or_path, "config.json", revision=revision)
        except Exception:  # offline and not cached, gated, no network: no family rule can be read
            found = None
    if found is None:
        return None
    try:
        return family_of_config(json.loads(Path(found).read_text()))
    except (OSError, ValueError, UserError):
        return None


def family_of_config(config: Any) -> Family:
    """Family from a model config (object or dict): by model_type; unsupported → UserError listing the supported."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    for f in _families():
        if model_type in f.model_types:
            return f
    archs = (
        config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None)
    )
    raise UserError(
        f"model architecture {model_type!r} ({', '.join(archs or []) or 'no architectures listed'}) is not "
        f"supported; supported families: {supported()}"
    )


def family_of_model(model: Any) -> Family:
    """Family of a loaded model (a PEFT wrapper is looked through)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return family_of_config(base.config)


def family_of_processor(processor: Any) -> Family:
    """Family of a loaded processor, by its class name."""
    return family_of_processor_class(type(processor).__name__)


def family_of_processor_class(name: str) -> Family:
    """Family of a processor class name (as saved in processor_config.json)."""
    for f in _families():
        if name in f.processor_classes:
            return f
    raise UserError(f"processor {name} is not one vlm-tune supports; supported families: {supported()}")


def saved_processor_class(path: str, revision: str | None = None) -> str | None:
    """processor_class written next to a saved processor (local dir or hub cache), if any."""
    from transformers.utils import cached_file

    for fname in ("processor_config.json", "preprocessor_config.json"):
        try:
            found = cached_file(path, fname, revision=revision, _raise_exceptions_for_missing_entries=False)
        except OSError:
            found = None
        if found and Path(found).is_file():
            cls = json.loads(Path(found).read_text()).get("processor_class")
            if cls:
                return cls
    return None


def load_processor(path: str, revision: str | None = None) -> Any:
    """The model's processor: the family's own loader where AutoProcessor is not enough, else AutoProcessor
    with the image processor in the backend vlm-tune decided (`load_image_processor`)."""
    from transformers import AutoProcessor

    cls = saved_processor_class(path, revision)
    fam = next((f for f in _families() if cls in f.processor_classes), None)
    if fam is not None and fam.load_processor is not None:
        return fam.load_processor(path, revision)
    try:
        image_processor = load_image_processor(path, revision)
    except (OSError, ValueError) as err:
        raise UserError(
            f"{path}: no image processor found ({str(err).splitlines()[0]}); supported families: {supported()}"
        ) from None
    processor = AutoProcessor.from_pretrained(path, revision=revision, image_processor=image_processor)
    if not hasattr(processor, "image_processor"):
        raise UserError(
            f"{path}: no image processor found (AutoProcessor gave {type(processor).__name__}); "
            f"supported families: {supported()}"
        )
    return processor
