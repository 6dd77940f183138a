"""The device/precision decision (vlm_tune.runtime): auto dtype, impossible combinations, fp32 trainable weights."""

import json

import pytest
import torch

import vlm_tune.runtime
from vlm_tune.config import ConfigError, build_config
from vlm_tune.runtime import Hardware, precision_problems, resolve, resolve_dtype

from .conftest import tiny_cfg

T4 = Hardware(cuda=True, bf16=False, four_bit=True, name="Tesla T4")
A100 = Hardware(cuda=True, bf16=True, four_bit=True, local_rank=1, name="A100")
CPU = Hardware(cuda=False, four_bit=True)
CPU_NO_4BIT = Hardware(cuda=False, four_bit=False)


def test_auto_is_the_default_and_resolves_per_machine():
    assert build_config({}).model.dtype == "auto"
    assert resolve_dtype("auto", A100) == "bfloat16"
    assert resolve_dtype("auto", T4) == "float16"
    assert resolve_dtype("auto", CPU) == "float32"
    assert resolve_dtype("float32", A100) == "float32"


def test_device_is_cuda_local_rank_else_cpu():
    rt = resolve("auto", "lora", A100)
    assert rt.device == torch.device("cuda", 1) and rt.dtype == "bfloat16" and rt.bf16 and not rt.fp16
    rt = resolve("auto", "lora", T4)
    assert rt.fp16 and not rt.bf16 and not rt.use_cpu
    rt = resolve("auto", "lora", CPU)
    assert rt.device == torch.device("cpu") and rt.use_cpu and not rt.bf16 and not rt.fp16
    assert resolve("bfloat16", "lora", CPU).bf16  # bf16 autocast exists on CPU


@pytest.mark.parametrize(
    ("dtype", "method", "hw", "needle"),
    [
        ("bfloat16", "lora", T4, "bfloat16 is not supported by this GPU (Tesla T4"),
        ("float16", "lora", CPU, "float16 needs a CUDA GPU"),
        ("float16", "qlora", CPU, "float16 needs a CUDA GPU"),
        ("auto", "qlora", CPU_NO_4BIT, "qlora needs a 4-bit backend for CPU"),
        ("auto", "qlora", Hardware(cuda=True, bf16=True), "qlora needs a 4-bit backend for CUDA"),
    ],
)
def test_impossible_precision_is_a_config_error(dtype, method, hw, needle):
    assert any(needle in p for p in precision_problems(dtype, method, hw))
    with pytest.raises(ConfigError, match="model.dtype|train.method") as err:
        resolve(dtype, method, hw)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    ("dtype", "method", "hw"),
    [("auto", "lora", T4), ("float16", "full", T4), ("bfloat16", "qlora", A100), ("auto", "qlora", CPU)],
)
def test_possible_precision_has_no_problem(dtype, method, hw):
    assert precision_problems(dtype, method, hw) == []


def test_train_refuses_fp16_on_cpu_before_loading(cache_dir, tmp_path, monkeypatch):
    import vlm_tune.train
    from vlm_tune.train import train

    def no_load(*a, **k):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(vlm_tune.train, "resolve_model_path", no_load)
    with pytest.raises(ConfigError, match="float16 needs a CUDA GPU"):
        train(tiny_cfg(cache_dir, tmp_path / "r", "model.dtype=float16"))
    assert not (tmp_path / "r").exists()


def _trainable_dtypes(model):
    return {p.dtype for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("lora", []),
        ("lora", ["lora.modules_to_save=[lm_head]"]),
        ("lora", ["model.train_vision=true"]),
        ("full", []),
        ("full", ["model.train_vision=true"]),
        ("qlora", []),
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_trainable_parameters_are_fp32_for_every_method_and_dtype(cache_dir, tmp_path, method, extra, dtype):
    """The base keeps model.dtype; every trainable parameter (LoRA, modules_to_save, full) is float32."""
    from vlm_tune.model import load_model, resolve_model_path, setup_training
    from vlm_tune.runtime import Runtime

    if method == "qlora" and dtype == "float16":
        pytest.skip("float16 4-bit compute is a CUDA-only combination")
    cfg = tiny_cfg(cache_dir, tmp_path / "r", f"train.method={method}", *extra)
    # a forced runtime: float16 weights can be built on CPU (training them there is refused by resolve)
    rt = Runtime(device=torch.device("cpu"), dtype=dtype)
    model = setup_training(load_model(resolve_model_path(cfg), cfg, rt), cfg)
    assert _trainable_dtypes(model) == {torch.float32}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
    if method == "full" and extra:  # full + train_vision: every parameter trains
        assert not frozen
    else:  # the frozen base (or vision tower) keeps model.dtype
        assert frozen == {getattr(torch, dtype)}


def test_bf16_lora_with_modules_to_save_trains_on_cpu(cache_dir, tmp_path):
    """bf16 base + fp32 trainable weights under CPU autocast: finite losses, then generation."""
    import json

    from vlm_tune.train import train

    run = train(
        tiny_cfg(
            cache_dir,
            tmp_path / "r",
            "model.dtype=bfloat16",
            "lora.modules_to_save=[lm_head]",
            "eval.baselines=[untrained]",
            "train.max_steps=2",
        )
    )
    losses = [h["loss"] for h in json.loads((run / "train_log.json").read_text()) if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(x)) for x in losses)
    for name in ("untrained", "final"):
        m = json.loads((run / "eval" / name / "metrics.json").read_text())
        assert m["device"] == "cpu" and m["dtype"] == "bfloat16" and m["rows"] == 8


def test_check_reports_precision_problems(cache_dir, tmp_path, monkeypatch, capsys):
    """`vlm-tune check` on a T4 with model.dtype=bfloat16: the problem is printed and the check fails."""
    import vlm_tune.runtime
    from vlm_tune.check import run_check

    monkeypatch.setattr(vlm_tune.runtime, "_DETECTED", T4)
    assert run_check(tiny_cfg(cache_dir, tmp_path / "r", "model.dtype=bfloat16")) == 1
    out = capsys.readouterr().out
    assert "bfloat16 is not supported by this GPU (Tesla T4" in out and "FAIL" in out
    monkeypatch.setattr(vlm_tune.runtime, "_DETECTED", CPU)
    assert run_check(tiny_cfg(cache_dir, tmp_path / "r", "model.dtype=auto")) == 0
    assert "model.dtype auto → float32" in capsys.readouterr().out


def test_every_path_asks_the_resolver(lora_run, tmp_path):
    """eval and predict refuse an explicit dtype this machine cannot run (float16 on CPU) before loading."""
    from vlm_tune.config import load_config
    from vlm_tune.inference import load_for_inference, run_eval

    with pytest.raises(ConfigError, match="float16 needs a CUDA GPU"):
        run_eval(load_config(lora_run / "config.yaml", ["model.dtype=float16"]), name="x")
    with pytest.raises(ConfigError, match="float16 needs a CUDA GPU"):
        load_for_inference(lora_run / "final", "float16")
    model, _, _ = load_for_inference(lora_run / "final")
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_a_t4_run_merges_on_cpu(lora_run, tmp_path):
    """An adapter saved with model.dtype float16 (a T4 run) loads here in this machine's auto dtype."""
    import shutil

    import yaml

    from vlm_tune.inference import merge

    adapter = tmp_path / "adapter"
    shutil.copytree(lora_run / "final", adapter)
    saved = yaml.safe_load((adapter / "config.yaml").read_text())
    saved["model"]["dtype"] = "float16"
    (adapter / "config.yaml").write_text(yaml.safe_dump(saved))
    merged = merge(adapter, tmp_path / "merged")
    assert (merged / "config.json").is_file()
    assert json.loads((merged / "config.json").read_text())["dtype"] == "float32"  # auto on CPU, not float16


# -- the image-processor backend ----------------------------------------------------------------------------
def test_image_backend_is_torchvision_where_it_imports_else_pil(monkeypatch):
    from transformers.utils import is_torchvision_available

    from vlm_tune.backend import image_backend
    from vlm_tune.errors import UserError

    monkeypatch.delenv("VLM_TUNE_IMAGE_BACKEND", raising=False)
    assert image_backend() == ("torchvision" if is_torchvision_available() else "pil")
    monkeypatch.setenv("VLM_TUNE_IMAGE_BACKEND", "PIL")
    assert image_backend() == "pil"
    monkeypatch.setenv("VLM_TUNE_IMAGE_BACKEND", "fast")
    with pytest.raises(UserError, match="VLM_TUNE_IMAGE_BACKEND='fast'"):
        image_backend()
    monkeypatch.setenv("VLM_TUNE_IMAGE_BACKEND", "torchvision")
    if is_torchvision_available():
        assert image_backend() == "torchvision"
    else:
        with pytest.raises(UserError, match="does not import here"):
            image_backend()


def test_every_family_loads_its_image_processor_in_the_decided_backend(monkeypatch, tmp_path):
    """PIL decided → every family's loaded image processor is a PIL class (the LFM2-VL port included)."""
    from transformers.image_processing_backends import PilBackend

    from vlm_tune.families import all_families, load_processor
    from vlm_tune.families.smolvlm import ensure_tiny_model

    monkeypatch.setenv("VLM_TUNE_IMAGE_BACKEND", "pil")
    for fam in all_families():
        path = ensure_tiny_model(tmp_path / fam.name) if fam.name == "smolvlm" else None
        path = path or fam.build_stand_in(tmp_path / fam.name)
        ip = load_processor(str(path)).image_processor
        assert isinstance(ip, PilBackend), (fam.name, type(ip).__name__)


def test_fsdp_launch_leaves_placement_to_accelerate(cache_dir, monkeypatch):
    """Under `accelerate launch` with FSDP the base is not moved whole onto the device before sharding: a
    runtime whose device is `meta` (a stand-in for a GPU that cannot hold the model) is not applied."""
    from vlm_tune.families.smolvlm import ensure_tiny_model
    from vlm_tune.model import load_model
    from vlm_tune.runtime import Runtime

    path = str(ensure_tiny_model(cache_dir / "tiny-model"))
    cfg = tiny_cfg(cache_dir, cache_dir / "unused")
    meta = Runtime(device=torch.device("meta"), dtype="float32")
    moved = load_model(path, cfg, meta)
    assert {p.device.type for p in moved.parameters()} == {"meta"}  # without FSDP: moved as a whole
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    kept = load_model(path, cfg, meta)
    assert {p.device.type for p in kept.parameters()} == {"cpu"}  # accelerate shards it later
    assert {p.dtype for p in kept.parameters()} == {torch.float32}


# -- families that overflow float16 (their module's float16_hazard) -------------------------------------------
def _family(name):
    from vlm_tune.families import all_families

    return next(f for f in all_families() if f.name == name)


def test_families_that_overflow_float16_never_get_it():
    """PaliGemma 2 (Gemma 2 decoder) and Gemma 3: auto is float32 on a card without bfloat16, float16 refused."""
    from vlm_tune.families import all_families

    hazardous = {f.name for f in all_families() if f.float16_hazard}
    assert hazardous == {"paligemma", "gemma3"}
    for name in hazardous:
        fam = _family(name)
        assert resolve_dtype("auto", T4, fam) == "float32"
        assert resolve_dtype("auto", A100, fam) == "bfloat16" and resolve_dtype("auto", CPU, fam) == "float32"
        rt = resolve("auto", "qlora", T4, fam)
        assert rt.dtype == "float32" and not rt.fp16 and not rt.bf16
        (refused,) = precision_problems("float16", "lora", T4, fam)
        assert f"float16 is refused for {name}" in refused and "model.dtype=auto (float32 here)" in refused
        (no_bf16,) = precision_problems("bfloat16", "qlora", T4, fam)  # gemma3's config pinned bfloat16
        assert "Use model.dtype=auto (float32 here) or float32" in no_bf16
    smolvlm = _family("smolvlm")  # no hazard: float16 with the grad scaler, as before
    assert (
        resolve_dtype("auto", T4, smolvlm) == "float16"
        and precision_problems("float16", "lora", T4, smolvlm) == []
    )
    assert "or float16" in precision_problems("bfloat16", "lora", T4, smolvlm)[0]


def test_the_rule_is_found_from_the_config_without_loading(family_stand_ins, tmp_path):
    from vlm_tune.runtime import config_family, for_config

    builtin = build_config({"model": {"name_or_path": "builtin:tiny-paligemma"}})
    local = build_config({"model": {"name_or_path": str(family_stand_ins["gemma3"])}})  # its config.json
    assert config_family(builtin).name == "paligemma" and config_family(local).name == "gemma3"
    assert for_config(builtin, T4).dtype == for_config(local, T4).dtype == "float32"
    assert not (tmp_path / "tiny-paligemma").exists()
    assert for_config(build_config({}), T4).dtype == "float16"  # builtin:tiny is SmolVLM


def test_check_prints_the_dtype_and_why(family_stand_ins, tmp_path, monkeypatch, capsys):
    from vlm_tune.check import run_check

    monkeypatch.setattr(vlm_tune.runtime, "_DETECTED", T4)
    raw = {
        "model": {"name_or_path": str(family_stand_ins["paligemma"]), "cache_dir": str(tmp_path)},
        "data": {"synthetic": {"n_train": 4, "n_test": 2}},
        "logging": {"progress": False},
    }
    assert run_check(build_config(raw)) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "model.dtype auto → float32 (auto: this GPU has no bfloat16, and paligemma never runs in float16"
        in out
    )
    assert run_check(build_config(raw, ["model.dtype=float16"])) == 1
    assert "float16 is refused for paligemma" in " ".join(capsys.readouterr().out.split())


# -- CPUs and data-loader workers -------------------------------------------------------------------------------
def _cgroup(tmp_path, files: dict[str, str], self_cgroup: str):
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (tmp_path / "self").write_text(self_cgroup)
    return root, tmp_path / "self"


def test_usable_cpus_is_the_smaller_of_affinity_and_cgroup_quota(tmp_path, monkeypatch):
    from vlm_tune.runtime import usable_cpus

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    v2 = _cgroup(tmp_path / "v2", {"cpu.max": "max 100000\n", "job/cpu.max": "450000 100000\n"}, "0::/job\n")
    assert usable_cpus(*v2) == (4, "affinity 16, cgroup quota 4.5")  # 4.5 CPUs of time: 4 whole ones
    v1 = {"cpu,cpuacct/cpu.cfs_quota_us": "200000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
    container = _cgroup(tmp_path / "v1", v1, "4:cpu,cpuacct:/docker/abc\n1:memory:/docker/abc\n")
    assert usable_cpus(*container)[0] == 2  # the host path is not visible: the mount root is the container's
    free = _cgroup(
        tmp_path / "free", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "3:cpu:/\n"
    )
    assert usable_cpus(*free) == (16, "affinity 16, no cgroup CPU quota")
    assert usable_cpus(tmp_path / "none", tmp_path / "missing")[0] == 16
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})
    assert usable_cpus(*v2)[0] == 3  # taskset / a scheduler's allocation below the quota


def test_workers_share_the_usable_cpus_among_local_ranks(monkeypatch):
    from vlm_tune.runtime import data_workers

    assert data_workers("auto", Hardware(cuda=True, cpus=16))[0] == 4
    assert data_workers("auto", Hardware(cuda=True, cpus=16, local_processes=8))[0] == 1  # 2 each: 1 + itself
    assert data_workers("auto", Hardware(cuda=True, cpus=4, local_processes=4))[0] == 0
    assert data_workers("auto", Hardware(cuda=True, cpus=64, local_processes=2))[0] == 4
    assert data_workers(6, Hardware(cuda=True, cpus=2)) == (6, "set in the config")
    n, why = data_workers("auto", Hardware(cuda=True, cpus=16, cpus_why="affinity 16", local_processes=8))
    assert "16 usable CPUs (affinity 16) / 8 process(es) on this machine = 2 each" in why
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    detected = Hardware.detect()
    assert (detected.processes, detected.local_processes) == (16, 8) and detected.cpus >= 1
