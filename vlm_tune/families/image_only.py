"""Processors whose video processor needs torchvision, built without it (CPU-only installs).

transformers cannot build Qwen's or InternVL's processor without torchvision: the video processor imports
it, and AutoProcessor fails or silently returns the bare tokenizer. Images need no video processor, so the
family loads an image-only subclass under the real class name. Saving must still write a
video_preprocessor_config.json: AutoProcessor needs it to load the folder where torchvision is installed.
It is the checkpoint's own file (kept from where the processor was loaded) or, for a processor built
here, one the family derives from its image processor.
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
        if source and Path(source).is_file():
            if Path(source).resolve() != target.resolve():
                target.write_bytes(Path(source).read_bytes())
        else:
            target.write_text(json.dumps(video_config(self), indent=2) + "\n")
        return out

    attrs = {"__init__": init, "save_pretrained": save_pretrained, "__module__": __name__}
    return type(base.__name__, (base,), attrs)


def load_image_only(cls: type, path: str, revision: str | None) -> Any:
    """cls.from_pretrained, remembering the checkpoint's own video config (if any) for later saves."""
    from transformers.utils import cached_file

    processor = cls.from_pretrained(path, revision=revision)
    processor._video_config_source = cached_file(
        path, VIDEO_CONFIG, revision=revision, _raise_exceptions_for_missing_entries=False
    )
    return processor
