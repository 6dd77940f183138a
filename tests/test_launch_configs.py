"""configs/accelerate/*.yaml launch the run configs they name: precision, gradient accumulation and clipping
come from the run config, and the environment accelerate's launcher builds from each file (its own code, not a
copy) contradicts nothing in it on the hardware the file is for. deepspeed is not installed here, so its own
consistency check cannot run: `runtime.launcher_problems` is that check, and train refuses what it finds."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from vlm_tune.config import load_config
from vlm_tune.runtime import Hardware, for_config, launcher_problems

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
A100 = Hardware(cuda=True, bf16=True, four_bit=True, name="A100", gpus=4)
T4 = Hardware(cuda=True, bf16=False, four_bit=True, name="Tesla T4", gpus=4)
CPU = Hardware(cuda=False, four_bit=True)
OWNED = ("mixed_precision", "gradient_accumulation_steps", "gradient_clipping")  # the run config's


def named_run(path: Path) -> list[str]:
    """The `vlm-tune train` arguments (config and overrides) the file's header launches."""
    found = re.search(r"-m vlm_tune\.cli train (.+)$", path.read_text(), re.M)
    assert found, f"{path.name} names no `-m vlm_tune.cli train CONFIG` command"
    return shlex.split(found.group(1))


def launcher_env(path: Path, train_args: list[str]) -> dict[str, str]:
    """The ACCELERATE_* variables `accelerate launch --config_file path` sets, from accelerate's own launch code."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    argv = ["--config_file", str(path), "-m", "vlm_tune.cli", "train", *train_args]
    args, defaults, mp_from_config = _validate_launch_command(launch_command_parser().parse_args(argv))
    if args.use_deepspeed and not args.cpu:  # as accelerate's launch_command does
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        env = prepare_deepspeed_cmd_env(args)[1]
    elif (args.use_fsdp or args.multi_gpu) and not args.cpu:
        env = prepare_multi_gpu_env(args)
    else:
        env = prepare_simple_launcher_cmd_env(args)[1]
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


def test_every_launch_config_is_checked():
    assert {p.name for p in FILES} >= {
        "cpu-2proc.yaml",
        "deepspeed-zero2.yaml",
        "fsdp.yaml",
        "multi-gpu.yaml",
    }


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_launch_config_agrees_with_the_run_config_it_names(path, monkeypatch):
    for var in [v for v in __import__("os").environ if v.startswith("ACCELERATE_")]:
        monkeypatch.delenv(var)  # only what the file sets
    train_args = named_run(path)
    cfg = load_config(ROOT / train_args[0], train_args[1:])
    accel = yaml.safe_load(path.read_text())
    env = launcher_env(path, train_args)
    for hw in [CPU] if accel.get("use_cpu") else [A100, T4]:
        assert launcher_problems(cfg, for_config(cfg, hw), env) == [], (path.name, hw.name)
    owned = {**accel, **(accel.get("deepspeed_config") or {})}
    defer = (
        "auto",
        "no",
    )  # mixed_precision "no": the run's model.dtype decides (TrainingArguments bf16/fp16)
    duplicated = {k: owned[k] for k in OWNED if k in owned and str(owned[k]).lower() not in defer}
    assert not duplicated, f"{path.name} duplicates run-config values by hand: {duplicated} (leave them out)"


def test_launcher_problems_name_the_contradiction():
    """What the old deepspeed-zero2.yaml and a bf16 launch of a float32 run passed: refused, naming both keys."""
    cfg = load_config(ROOT / "configs/smolvlm-2.2b-chartqa-qlora.yaml", ["train.method=lora"])
    rt = for_config(cfg, A100)
    ds = {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_MIXED_PRECISION": "bf16",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2",
        "ACCELERATE_GRADIENT_CLIPPING": "1.0",
    }
    (problem,) = launcher_problems(cfg, rt, ds)
    assert "gradient_accumulation_steps: 2, but train.gradient_accumulation_steps is 4" in problem
    fp32 = load_config(ROOT / "configs/quickstart.yaml", ["model.dtype=float32"])
    (problem,) = launcher_problems(fp32, for_config(fp32, A100), {"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert "mixed_precision: bf16, but model.dtype float32 is float32 here" in problem
    assert launcher_problems(fp32, for_config(fp32, A100), {"ACCELERATE_MIXED_PRECISION": "no"}) == []


def test_train_refuses_a_contradicting_launcher_before_loading(cache_dir, tmp_path, monkeypatch):
    import vlm_tune.train
    from vlm_tune.errors import UserError

    from .conftest import tiny_cfg

    def no_load(*a, **k):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(vlm_tune.train, "resolve_model_path", no_load)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # a float32 run (CPU) launched with bf16
    with pytest.raises(UserError, match="mixed_precision: bf16, but model.dtype auto is float32 here"):
        vlm_tune.train.train(tiny_cfg(cache_dir, tmp_path / "r"))
    assert not (tmp_path / "r").exists()
