"""The device/precision decision (vlm_tune.runtime): auto dtype, impossible combinations, fp32 trainable weights."""

import json

import pytest
import torch

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

    from vlm_tune.errors import UserError
    from vlm_tune.runtime import image_backend

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
    from vlm_tune.tiny import ensure_tiny_model

    monkeypatch.setenv("VLM_TUNE_IMAGE_BACKEND", "pil")
    for fam in all_families():
        path = ensure_tiny_model(tmp_path / fam.name) if fam.name == "smolvlm" else None
        path = path or fam.build_stand_in(tmp_path / fam.name)
        ip = load_processor(str(path)).image_processor
        assert isinstance(ip, PilBackend), (fam.name, type(ip).__name__)


def test_fsdp_launch_leaves_placement_to_accelerate(cache_dir, monkeypatch):
    """Under `accelerate launch` with FSDP the base is not moved whole onto the device before sharding: a
    runtime whose device is `meta` (a stand-in for a GPU that cannot hold the model) is not applied."""
    from vlm_tune.model import load_model
    from vlm_tune.runtime import Runtime
    from vlm_tune.tiny import ensure_tiny_model

    path = str(ensure_tiny_model(cache_dir / "tiny-model"))
    cfg = tiny_cfg(cache_dir, cache_dir / "unused")
    meta = Runtime(device=torch.device("meta"), dtype="float32")
    moved = load_model(path, cfg, meta)
    assert {p.device.type for p in moved.parameters()} == {"meta"}  # without FSDP: moved as a whole
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    kept = load_model(path, cfg, meta)
    assert {p.device.type for p in kept.parameters()} == {"cpu"}  # accelerate shards it later
    assert {p.dtype for p in kept.parameters()} == {torch.float32}
