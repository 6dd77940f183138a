"""Where and in what precision a run computes: the one device and dtype decision every path asks.

Device: ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``. Train (baselines, evals, training), ``eval``,
``predict`` and ``merge`` all put the model there, and every batch follows the model.

Precision: ``model.dtype`` is the dtype of the frozen base weights (``auto``: bfloat16 on a GPU that supports
it, float16 on one that does not, float32 on CPU). Trainable parameters are always float32 (master weights);
autocast runs the matmuls in the base dtype. So float16 trains under the grad scaler (which refuses float16
gradients) and bfloat16 full fine-tuning keeps float32 weights.

A family may never run in float16 (its ``float16_hazard``, declared in its module: Gemma 2/3 activations
overflow): there ``auto`` is float32 on a GPU without bfloat16, and an explicit float16 is refused.

One GPU per process: several GPUs are used only through a launcher (``torchrun``/``accelerate launch``, one
process each); a plain ``vlm-tune train`` on a machine with several trains on one and says how to use all
(never ``nn.DataParallel``, which splits the flattened image patches of most families along the wrong axis).

Data-loader workers: from the CPUs this process may use (affinity set and cgroup CPU quota), shared among the
processes of the run on this machine.

Hardware facts are a small value (`Hardware`), detected once; tests pass their own to cover GPU cases on CPU.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BNB_CPU_MIN = (0, 45)  # bitsandbytes releases from 0.45 run 4-bit layers on CPU
GPUS_PER_PROCESS = 1  # several GPUs only as several processes (a launcher), never nn.DataParallel
MAX_AUTO_WORKERS = 4  # data-loader workers per process under `auto`


@dataclass(frozen=True)
class Hardware:
    """What the machine offers. `detect()` reads it; tests construct it."""

    cuda: bool
    bf16: bool = False  # the CUDA device supports bfloat16 (Ampere or newer)
    four_bit: bool = False  # bitsandbytes is installed and has a backend for this device
    local_rank: int = 0
    name: str = "cpu"
    gpus: int = 0  # CUDA devices visible to this process
    cpus: int = 1  # CPUs this process may use (`usable_cpus`)
    cpus_why: str = ""  # where that number comes from
    processes: int = 1  # WORLD_SIZE: processes of this run (torchrun / accelerate launch)
    local_processes: int = 1  # LOCAL_WORLD_SIZE: of them on this machine

    @classmethod
    def detect(cls) -> Hardware:
        cuda = torch.cuda.is_available()
        rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        cpus, why = usable_cpus()
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        common = {
            "cpus": cpus,
            "cpus_why": why,
            "processes": world,
            "local_processes": int(os.environ.get("LOCAL_WORLD_SIZE", "") or (1 if world == 1 else world)),
        }
        if cuda:
            gpus = torch.cuda.device_count()
            rank = min(rank, gpus - 1)
            return cls(
                cuda=True,
                bf16=bool(torch.cuda.is_bf16_supported(including_emulation=False)),
                four_bit=_bnb_version() is not None,
                local_rank=rank,
                name=torch.cuda.get_device_name(rank),
                gpus=gpus,
                **common,
            )
        version = _bnb_version()
        return cls(
            cuda=False, four_bit=version is not None and version >= BNB_CPU_MIN, local_rank=rank, **common
        )


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


def _hazard(family: Any) -> str:
    """Why `family` must never run in float16 (its module's `float16_hazard`), or ""."""
    return getattr(family, "float16_hazard", "") or ""


def resolve_dtype(dtype: str, hw: Hardware, family: Any = None) -> str:
    """model.dtype → a concrete dtype name. auto: bfloat16 on a GPU with it; on one without, float16, or float32
    for a family that overflows float16 (`Family.float16_hazard`); float32 on CPU."""
    return explain_dtype(dtype, hw, family)[0]


def explain_dtype(dtype: str, hw: Hardware, family: Any = None) -> tuple[str, str]:
    """(the dtype `resolve_dtype` gives, why), for `vlm-tune check` and the train log."""
    if dtype != "auto":
        return dtype, "set in the config"
    if not hw.cuda:
        return "float32", "auto on CPU"
    if hw.bf16:
        return "bfloat16", "auto: this GPU supports bfloat16"
    hazard = _hazard(family)
    if hazard:
        return (
            "float32",
            f"auto: this GPU has no bfloat16, and {family.name} never runs in float16 ({hazard})",
        )
    return "float16", "auto: this GPU has no bfloat16; float16 with the grad scaler"


def precision_problems(dtype: str, method: str, hw: Hardware, family: Any = None) -> list[str]:
    """Combinations that cannot train or run here, each naming the key and the fix (empty when fine)."""
    problems = []
    resolved = resolve_dtype(dtype, hw, family)
    hazard = _hazard(family)
    here = f"auto ({resolve_dtype('auto', hw, family)} here)"
    if resolved == "bfloat16" and hw.cuda and not hw.bf16:
        problems.append(
            f"model.dtype: bfloat16 is not supported by this GPU ({hw.name}; bfloat16 needs Ampere or newer). "
            f"Use model.dtype={here} or {'float32' if hazard else 'float16'}"
        )
    if resolved == "float16" and hazard:
        problems.append(
            f"model.dtype: float16 is refused for {family.name}: {hazard}. Use model.dtype={here}, float32, "
            "or bfloat16 on a GPU that has it (Ampere or newer)"
        )
    elif resolved == "float16" and not hw.cuda:
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


def resolve(
    dtype: str = "auto", method: str = "lora", hw: Hardware | None = None, family: Any = None
) -> Runtime:
    """The runtime for this process; raises ConfigError when the combination cannot run here."""
    from vlm_tune.config import ConfigError

    hw = hw or hardware()
    problems = precision_problems(dtype, method, hw, family)
    if problems:
        raise ConfigError(problems, "config (precision on this machine)")
    device = torch.device("cuda", hw.local_rank) if hw.cuda else torch.device("cpu")
    return Runtime(device=device, dtype=resolve_dtype(dtype, hw, family))


def config_family(cfg: Any) -> Any:
    """The family of cfg's model (its precision rule), read without loading weights; None when unknown."""
    from vlm_tune.families import family_of_name

    return family_of_name(cfg.model.name_or_path, cfg.model.revision)


def for_config(cfg: Any, hw: Hardware | None = None) -> Runtime:
    """The runtime for a Config (model.dtype, train.method, the model family's precision rule)."""
    return resolve(cfg.model.dtype, cfg.train.method, hw, config_family(cfg))


# ---------------------------------------------------------------------------------------------------------
# several GPUs, launchers


def several_gpus_note(hw: Hardware, argv: list[str] | None = None) -> str | None:
    """What a process that sees several GPUs but was not launched for several says (None otherwise).

    Such a process trains on one GPU (`GPUS_PER_PROCESS`); the note names the commands that use them all,
    with this command line's config (`vlm-tune train|check CONFIG ...`).
    """
    if not hw.cuda or hw.gpus <= 1 or hw.processes > 1:
        return None
    import shlex
    import sys

    argv = sys.argv if argv is None else argv
    command = "train CONFIG.yaml"
    if argv[1:2] == ["train"]:
        command = shlex.join(argv[1:])
    elif argv[1:2] == ["check"] and len(argv) > 2:
        command = shlex.join(["train", argv[2]])
    n = hw.gpus
    return (
        f"{n} GPUs visible but one process: this run uses cuda:{hw.local_rank} only (vlm-tune never wraps the "
        f"model in DataParallel). To train on all {n}: `torchrun --nproc_per_node {n} -m vlm_tune.cli {command}` "
        f"or `accelerate launch --multi_gpu --num_processes {n} -m vlm_tune.cli {command}`"
    )


MIXED_PRECISION = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}


def launcher_problems(cfg: Any, rt: Runtime, env: Mapping[str, str] | None = None) -> list[str]:
    """Settings an accelerate launcher passed (its config file, as ACCELERATE_* variables) that contradict the
    run config. Precision, gradient accumulation and clipping come from the run config; a launcher config
    leaves them out (or `auto`)."""
    env = os.environ if env is None else env
    problems = []
    launched = (env.get("ACCELERATE_MIXED_PRECISION") or "no").lower()
    if launched not in ("no", MIXED_PRECISION[rt.dtype]):
        problems.append(
            f"the accelerate config sets mixed_precision: {launched}, but model.dtype {cfg.model.dtype} is "
            f"{rt.dtype} here. Remove mixed_precision from the accelerate config (vlm-tune takes it from "
            "model.dtype), or set model.dtype"
        )
    if (env.get("ACCELERATE_USE_DEEPSPEED") or "false").lower() != "true":
        return problems
    deepspeed = (
        (
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
            "gradient_accumulation_steps",
            "gradient_accumulation_steps",
        ),
        ("ACCELERATE_GRADIENT_CLIPPING", "gradient_clipping", "max_grad_norm"),
    )
    for var, ds_key, key in deepspeed:
        got, value = (env.get(var) or "auto").lower(), getattr(cfg.train, key)
        if got != "auto" and float(got) != float(value):
            problems.append(
                f"the accelerate config's deepspeed_config sets {ds_key}: {got}, but train.{key} is {value}. "
                f"Remove {ds_key} from the accelerate config (or set it to auto): vlm-tune passes train.{key}"
            )
    return problems


# ---------------------------------------------------------------------------------------------------------
# CPUs and data-loader workers


def usable_cpus(
    cgroup_root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")
) -> tuple[int, str]:
    """(CPUs this process may use, how that was found): the smaller of its affinity set and its cgroup's CPU
    quota (cgroup v2 cpu.max or v1 cpu.cfs_quota_us, the tightest level along its cgroup path)."""
    try:
        n = len(os.sched_getaffinity(0))
        parts = [f"affinity {n}"]
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
        parts = [f"os.cpu_count {n}"]
    quota = cgroup_cpu_quota(cgroup_root, self_cgroup)
    if quota is None:
        parts.append("no cgroup CPU quota")
    else:
        parts.append(f"cgroup quota {quota:g}")
        n = min(n, max(1, math.floor(quota)))
    return max(n, 1), ", ".join(parts)


def cgroup_cpu_quota(cgroup_root: Path, self_cgroup: Path) -> float | None:
    """This process's cgroup CPU quota in CPUs (quota / period), the smallest along its cgroup path; None when
    unlimited or unreadable."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    found: list[float] = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # cgroup v2
            mounts = [cgroup_root]
        elif "cpu" in controllers.split(","):  # cgroup v1
            mounts = [cgroup_root / m for m in ("cpu", "cpu,cpuacct", "cpuacct,cpu")]
        else:
            continue
        for mount in mounts:
            for folder in _up_to(mount, path):
                quota = _read_quota(folder)
                if quota is not None:
                    found.append(quota)
    return min(found) if found else None


def _up_to(mount: Path, path: str) -> list[Path]:
    """mount/path and each folder above it up to mount (mount itself also when the path is not visible, as in
    a container that mounts its own cgroup at the root)."""
    folder = mount / path.strip("/")
    folders = []
    while folder != mount and mount in folder.parents:
        folders.append(folder)
        folder = folder.parent
    return folders + [mount]


def _read_quota(folder: Path) -> float | None:
    try:
        if (folder / "cpu.max").is_file():  # v2: "max 100000" or "200000 100000"
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if (folder / "cpu.cfs_quota_us").is_file():  # v1: -1 = unlimited
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None
    return None


def data_workers(setting: int | str, hw: Hardware | None = None) -> tuple[int, str]:
    """(data-loader worker processes per training or evaluation process, why).

    A number is used as given. auto: 0 on CPU (the cores train); with CUDA, the usable CPUs shared among the
    run's processes on this machine, one left for each process itself, at most `MAX_AUTO_WORKERS`: at SmolVLM's
    default resolution one process tiles about 1.5 charts/s (docs/performance.md), so a GPU waits without them.
    """
    if setting != "auto":
        return int(setting), "set in the config"
    hw = hw or hardware()
    if not hw.cuda:
        return 0, "auto on CPU: the cores train"
    share = hw.cpus // max(hw.local_processes, 1)
    n = max(0, min(MAX_AUTO_WORKERS, share - 1))
    return n, (
        f"auto: {hw.cpus} usable CPUs ({hw.cpus_why}) / {hw.local_processes} process(es) on this machine = "
        f"{share} each, one kept for the process itself, at most {MAX_AUTO_WORKERS}"
    )


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
