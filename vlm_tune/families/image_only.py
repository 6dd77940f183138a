"""Processors whose video processor needs torchvision, loaded image-only on every install.

transformers cannot build Qwen's or InternVL's processor without torchvision: the video processor imports
it, and AutoProcessor fails or silently returns the bare tokenizer. vlm-tune feeds images only (video as
frames), so these families load an image-only subclass under the real class name, with or without
torchvision: one code path, and the same saved files on the CPU and on the GPU user's stack. Only the image
processor's backend differs (`vlm_tune.backend.image_backend()`). Saving still writes a
video_preprocessor_config.json, so that plain AutoProcessor loads the folder where torchvision is installed
(the model card's snippet): the checkpoint's own file (kept from where the processor was loaded; a
checkpoint saved by transformers 5.x nests it in processor_config.json as `video_processor`) or, for a
processor built here, one the family derives from its image processor.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

VIDEO_CONFIG = "video_preprocessor_config.json"


def image_only_class(base: type, init: Callable[..., None], video_config: Callable[[Any], dict]) -> type:
    """`base` with `init` (which passes video_processor=None) and a save that writes the video config."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        out = base.save_pretrained(self, save_directory, *args, **kwargs)
        target = Path(save_directory) / VIDEO_CONFIG
        source = getattr(self, "_video_config_source", None)
        if isinstance(source, dict):  # nested in the checkpoint's processor_config.json
            target.write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
        elif source and Path(source).is_file():
            if Path(source).resolve() != target.resolve():
                target.write_bytes(Path(source).read_bytes())
        else:
            target.write_text(json.dumps(video_config(self), indent=2) + "\n")
        return out

    attrs = {"__init__": init, "save_pretrained": save_pretrained, "__module__": __name__}
    return type(base.__name__, (base,), attrs)


def load_image_only(cls: type, path: str, revision: str | None) -> Any:
    """cls.from_pretrained with the image processor in vlm-tune's backend, remembering the checkpoint's own
    video config (a file, or the `video_processor` entry of processor_config.json) for later saves."""
    from transformers.utils import cached_file

    from vlm_tune.families.base import load_image_processor

    image_processor = load_image_processor(path, revision)
    processor = cls.from_pretrained(path, revision=revision, image_processor=image_processor)
    source: Any = cached_file(
        path, VIDEO_CONFIG, revision=revision, _raise_exceptions_for_missing_entries=False
    )
    if not source:
        nested = cached_file(
            path, "processor_config.json", revision=revision, _raise_exceptions_for_missing_entries=False
        )
        if nested:
            source = json.loads(Path(nested).read_text()).get("video_processor")
    processor._video_config_source = source
    return processor
