"""The `Family` record every family module fills in, and the image-processor loader they share.

Family modules import from here (never from the `vlm_tune.families` registry, which imports them); the
registry (`vlm_tune/families/__init__.py`) lists the families and answers "which family is this model".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Family:
    name: str
    title: str  # the family's name in messages, e.g. "Qwen2.5-VL"
    model_types: tuple[str, ...]  # config.json model_type values
    processor_classes: tuple[str, ...]  # processor class names (saved as processor_class)
    builtin: str  # model.name_or_path of the offline stand-in
    end_of_turn: str  # the token that closes an assistant answer (supervised with it)
    image_tokens: tuple[str, ...]  # every image-related special token: never supervised
    target_presets: dict[str, str]  # lora.targets preset → regex over module names (full match after `.*`)
    vision_module: str  # prefix of the vision tower's parameters (frozen unless model.train_vision)
    projector_modules: tuple[
        str, ...
    ]  # prefixes of the projector's parameters (may sit inside the vision tower)
    vision_save_modules: Callable[[Any], list[str]]  # model → modules trained fully under model.train_vision
    # the model.image knobs this family has: knob name → what it sets on the processor (one line); any other
    # knob set in a config is refused by `image_knob_problems`, naming the families that have it
    image_knobs: dict[str, str]
    # (processor, ImageSection) → sets the declared knobs' values on the processor (other knobs already refused)
    apply_image_knobs: Callable[[Any, Any], None]
    # (out_dir, seed=0, **published) → saved stand-in directory; `published` overrides the tiny processor
    # settings with a real checkpoint's (vlm_tune.standins.rehearsal.STAND_INS), dims stay tiny
    build_stand_in: Callable[..., Path]
    load_processor: Callable[[str, str | None], Any] | None = None  # when AutoProcessor is not enough
    # model.image (a dict, as saved in config.yaml) → lines of the model card's snippet that set the same
    # knobs on `processor` after AutoProcessor.from_pretrained (so the card answers like vlm-tune)
    card_image_lines: Callable[[dict[str, Any]], list[str]] = lambda image: []
    # a prefix-LM (PaliGemma): no chat template; prompt = prefix (full attention, token_type_ids 0), answer =
    # suffix, built with the processor's `suffix=` (vlm_tune.data.prefix_lm.PrefixLMCollator)
    prefix_lm: bool = False
    # lines of the card snippet's answer() that build `inputs` from images, question and prompt (None: the
    # chat-template lines of vlm_tune.card_snippet)
    card_input_lines: tuple[str, ...] | None = None
    # model.attn_implementation → what from_pretrained gets (a family whose decoder lacks a kernel maps it per
    # sub-model, e.g. PaliGemma 2: Gemma 2 has no sdpa)
    attn_implementation: Callable[[str], Any] = lambda name: name
    # (processor, [(height, width)]) → tokens each image expands to, where the generic count does not apply
    image_token_counts: Callable[[Any, list[tuple[int, int]]], list[int]] | None = None
    # (processor, rendered text, image (height, width)s) → the text the processor tokenizes once each image
    # placeholder is expanded, without the image processor; for count_tokens where the expansion tokenizes
    # differently in context (Gemma 3's newlines, pan-and-scan crops). None: the count adds tokens per image.
    expand_image_placeholders: Callable[[Any, str, list[tuple[int, int]]], str] | None = None
    # projector modules LoRA cannot wrap (no nn.Linear, e.g. Gemma 3's matmul weight): lora.targets
    # "projector" trains them fully instead (modules_to_save, saved with the adapter)
    full_projector: tuple[str, ...] = ()
    # the pinned published values (vlm_tune.families.pinned.Published) of the checkpoints this family's
    # stand-ins imitate; the first is the builtin stand-in's
    published: tuple[Any, ...] = ()
    # why this family must never run in float16 (its activations overflow it), or "": then model.dtype auto is
    # float32 on a GPU without bfloat16 and an explicit float16 is refused (vlm_tune.runtime decides)
    float16_hazard: str = ""
    # processor → how this family sizes images, for the refusal of a knob it lacks (e.g. "it resizes every image
    # to a fixed square (896 px, 256 image tokens)"); "" says nothing more
    sizing_note: Callable[[Any], str] = lambda processor: ""
    # processor → the square edge every image is resized to, for a family whose input size is fixed by the
    # checkpoint: model.image.longest_edge equal to it is accepted (it changes nothing); None: not fixed
    fixed_edge: Callable[[Any], int] | None = None


def load_image_processor(path: str, revision: str | None = None) -> Any:
    """The checkpoint's image processor, in the backend `vlm_tune.backend.image_backend()` decides."""
    from transformers import AutoImageProcessor

    from vlm_tune.backend import image_backend

    return AutoImageProcessor.from_pretrained(path, revision=revision, backend=image_backend())
