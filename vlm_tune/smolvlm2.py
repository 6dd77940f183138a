"""SmolVLM2 (`SmolVLMProcessor` / `SmolVLMForConditionalGeneration`) on installs without torchvision.

SmolVLMProcessor holds a video processor. transformers 5.24 checks each processor part against a base
class looked up by name on the top-level `transformers` module, and `VideoProcessorMixin` is exported
there only when torchvision imports. On CPU machines where torchvision cannot be used (see facts: the
index's torchvision does not load beside the CPU torch wheel) the check raises
"VIDEO_PROCESSOR_MAPPING has no attribute '_extra_content'" and no SmolVLM2 processor can be built or
loaded. vlm-tune feeds video as frames (images), so the video processor is never run; exporting the
mixin makes the check pass and changes nothing else.
"""

from __future__ import annotations

from typing import Any


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

    from vlm_tune.families import load_image_processor

    allow_video_processor_without_torchvision()
    image_processor = load_image_processor(path, revision)
    try:
        return AutoProcessor.from_pretrained(path, revision=revision, image_processor=image_processor)
    except ImportError as err:
        if "SmolVLMVideoProcessor" not in str(err):
            raise
        return load_smolvlm_processor(path, revision, image_processor)
