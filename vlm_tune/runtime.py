"""Where and in what precision a run computes: the one device and dtype decision every path asks.

Device: ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``. Train (baselines, evals, training), ``eval``,
``predict`` and ``merge`` all put the model there, and every batch follows the model.

Precision: ``model.dtype`` is the dtype of the frozen base weights (``auto``: bfloat16 on a GPU that supports
it, float16 on one that does not, float32 on CPU). Trainable parameters are always float32 (master weights);
autocast runs the matmuls in the base dtype. So float16 trains under the grad scaler (which refuses float16
gradients) and bfloat16 full fine-tuning keeps float32 weights.

Hardware facts are a small value (`Hardware`), detected once; tests pass their own to cover GPU cases on CPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BNB_CPU_MIN = (0, 45)  # bitsandbytes releases from 0.45 run 4-bit layers on CPU


@dataclass(frozen=True)
class Hardware:
    """What the machine offers. `detect()` reads it; tests construct it."""

    cuda: bool
    bf16: bool = False  # the CUDA device supports bfloat16 (Ampere or newer)
    four_bit: bool = False  # bitsandbytes is installed and has a backend for this device
    local_rank: int = 0
    name: str = "cpu"

    @classmethod
    def detect(cls) -> Hardware:
        cuda = torch.cuda.is_available()
        rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        if cuda:
            rank = min(rank, torch.cuda.device_count() - 1)
            return cls(
                cuda=True,
                bf16=bool(torch.cuda.is_bf16_supported(including_emulation=False)),
                four_bit=_bnb_version() is not None,
                local_rank=rank,
                name=torch.cuda.get_device_name(rank),
            )
        version = _bnb_version()
        return cls(cuda=False, four_bit=version is not None and version >= BNB_CPU_MIN, local_rank=rank)


def _bnb_version() -> tuple[int, int] | None:
    """Installed bitsandbytes (major, minor), read from package metadata without importing it."""
    try:
        parts = metadata.version("bitsandbytes").split(".")
        return int(parts[0]), int(parts[1])
    except (metadata.PackageNotFoundError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class Runtime:
    """The resolved decision: device, base dtype, and the mixed-precision flags that follow from it."""

    device: torch.device
    dtype: str  # float32 | bfloat16 | float16, never auto

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def bf16(self) -> bool:
        """Trainer autocast in bfloat16 (CUDA or CPU)."""
        return self.dtype == "bfloat16"

    @property
    def fp16(self) -> bool:
        """Trainer autocast in float16 with the grad scaler (CUDA only; rejected on CPU)."""
        return self.dtype == "float16"

    @property
    def use_cpu(self) -> bool:
        return self.device.type == "cpu"


def resolve_dtype(dtype: str, hw: Hardware) -> str:
    """model.dtype → a concrete dtype name; auto: bfloat16 / float16 on CUDA (by support), float32 on CPU."""
    if dtype != "auto":
        return dtype
    if not hw.cuda:
        return "float32"
    return "bfloat16" if hw.bf16 else "float16"


def precision_problems(dtype: str, method: str, hw: Hardware) -> list[str]:
    """Combinations that cannot train or run here, each naming the key and the fix (empty when fine)."""
    problems = []
    resolved = resolve_dtype(dtype, hw)
    if resolved == "bfloat16" and hw.cuda and not hw.bf16:
        problems.append(
            f"model.dtype: bfloat16 is not supported by this GPU ({hw.name}; bfloat16 needs Ampere or newer). "
            "Use model.dtype=auto (float16 here) or float16"
        )
    if resolved == "float16" and not hw.cuda:
        problems.append(
            "model.dtype: float16 needs a CUDA GPU (no float16 autocast and grad scaler on CPU). "
            "Use model.dtype=auto (float32 on CPU), float32 or bfloat16"
        )
    if method == "qlora" and not hw.four_bit:
        where = "CUDA" if hw.cuda else f"CPU (needs bitsandbytes >= {BNB_CPU_MIN[0]}.{BNB_CPU_MIN[1]})"
        problems.append(
            f"train.method: qlora needs a 4-bit backend for {where}, and none is installed. "
            "`pip install bitsandbytes`, or use train.method=lora"
        )
    return problems


def fsdp_launch() -> bool:
    """Launched by accelerate with FSDP (`accelerate launch --config_file configs/accelerate/fsdp.yaml`).

    Then accelerate places and shards the model: it must not be moved whole onto each GPU first (with
    `fsdp_cpu_ram_efficient_loading`, ranks other than 0 even load it on the meta device).
    """
    return os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true", "yes")


_DETECTED: Hardware | None = None


def hardware() -> Hardware:
    """The detected hardware of this process (cached)."""
    global _DETECTED
    if _DETECTED is None:
        _DETECTED = Hardware.detect()
    return _DETECTED


def resolve(dtype: str = "auto", method: str = "lora", hw: Hardware | None = None) -> Runtime:
    """The runtime for this process; raises ConfigError when the combination cannot run here."""
    from vlm_tune.config import ConfigError

    hw = hw or hardware()
    problems = precision_problems(dtype, method, hw)
    if problems:
        raise ConfigError(problems, "config (precision on this machine)")
    device = torch.device("cuda", hw.local_rank) if hw.cuda else torch.device("cpu")
    return Runtime(device=device, dtype=resolve_dtype(dtype, hw))


def for_config(cfg: Any, hw: Hardware | None = None) -> Runtime:
    """The runtime for a Config (model.dtype, train.method)."""
    return resolve(cfg.model.dtype, cfg.train.method, hw)


# ---------------------------------------------------------------------------------------------------------
# asking a loaded model


def model_device(model: Any) -> torch.device:
    """The device of a model's parameters (the first one)."""
    return next(model.parameters()).device


def tensor_devices(model: Any) -> list[str]:
    """Every device holding one of the model's parameters or buffers (sorted): one entry when it all sits
    where `model_device` says, more when part of it was left elsewhere (offloading, a missed buffer)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sorted({str(t.device) for t in tensors})


def compute_dtype(model: Any) -> torch.dtype:
    """The dtype its matmuls run in: the base weights' half dtype if any, else float32.

    A model trained by vlm-tune mixes float32 trainable parameters with a half-precision base, and a 4-bit
    base keeps its compute dtype in the quantization config.
    """
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    if quant is not None:
        qd = getattr(quant, "bnb_4bit_compute_dtype", None)
        if qd is None and isinstance(quant, dict):
            qd = quant.get("bnb_4bit_compute_dtype")
        if isinstance(qd, str):
            qd = DTYPES.get(qd.replace("torch.", ""))
        if isinstance(qd, torch.dtype):
            return qd
    for p in model.parameters():
        if p.dtype in (torch.bfloat16, torch.float16):
            return p.dtype
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> Any:
    """Autocast to `dtype` on `device` when it is a half dtype; a no-op context otherwise."""
    if dtype == torch.float32 or (device.type == "cpu" and dtype == torch.float16):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def cast_trainable_to_fp32(model: Any) -> int:
    """Trainable parameters become float32 master weights (the frozen base keeps its dtype). Returns the count."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


# ---------------------------------------------------------------------------------------------------------
# image processors


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
