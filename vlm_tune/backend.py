"""The image-processor backend, decided once: every path (train, baselines, eval, predict, merge, RL, the
stand-in builders and the card) loads image processors in the backend `image_backend()` names."""

from __future__ import annotations

import os


def image_backend() -> str:
    """The image-processor backend every path loads: ``torchvision`` where it imports, else ``pil``.

    This is transformers' own default (what a hub user, the model card snippet and serving stacks get), so
    vlm-tune trains and evaluates with the pixels its users serve with. GPU users have torchvision (it comes
    with CUDA torch); CPU installs beside the CPU torch wheel do not. Token counts are the same under both
    (tested per family); pixel values differ by resize rounding. ``VLM_TUNE_IMAGE_BACKEND=pil`` forces the
    PIL processors where torchvision is installed (to compare the two, or reproduce a CPU run's pixels).
    """
    from transformers.utils import is_torchvision_available

    from vlm_tune.errors import UserError

    forced = os.environ.get("VLM_TUNE_IMAGE_BACKEND", "").strip().lower()
    if forced not in ("", "pil", "torchvision"):
        raise UserError(f"VLM_TUNE_IMAGE_BACKEND={forced!r}: use pil or torchvision (or unset it: automatic)")
    if forced == "torchvision" and not is_torchvision_available():
        raise UserError(
            "VLM_TUNE_IMAGE_BACKEND=torchvision, but torchvision does not import here. Install the torchvision "
            "that matches your torch (`pip install torchvision`), or unset VLM_TUNE_IMAGE_BACKEND"
        )
    if forced:
        return forced
    return "torchvision" if is_torchvision_available() else "pil"
