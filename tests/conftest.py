"""Shared fixtures: the tiny model and a small synthetic dataset, each built once per session, offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from vlm_tune.config import build_config


def torchvision_imports() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


def skip_without_torchvision(reason: str) -> None:
    """Skip here for want of torchvision, or fail where it is required (the torchvision CI lane)."""
    if torchvision_imports():
        return
    if os.environ.get("VLM_TUNE_REQUIRE_TORCHVISION") == "1":
        pytest.fail(f"VLM_TUNE_REQUIRE_TORCHVISION=1 but torchvision does not import ({reason})")
    pytest.skip(reason)


def pytest_collection_modifyitems(config, items):
    if not torchvision_imports() and os.environ.get("VLM_TUNE_REQUIRE_TORCHVISION") != "1":
        skip_tv = pytest.mark.skip(reason="needs torchvision (the GPU user's stack: the torchvision CI lane)")
        for item in items:
            if item.get_closest_marker("torchvision"):  # the marker, not a parameter id "torchvision"
                item.add_marker(skip_tv)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _torchvision_required(request):
    """A `torchvision` test in a lane that requires torchvision fails when it does not import."""
    if request.node.get_closest_marker("torchvision"):
        skip_without_torchvision("needs torchvision")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from vlm_tune.families.smolvlm import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def family_stand_ins(tmp_path_factory, tiny_dir):
    """family name → directory of its builtin stand-in (SmolVLM's is the shared tiny model), built once."""
    from vlm_tune.families import all_families

    root = tmp_path_factory.mktemp("families")
    dirs = {"smolvlm": tiny_dir}
    for fam in all_families():
        if fam.name != "smolvlm":
            dirs[fam.name] = fam.build_stand_in(root / fam.name)
    return dirs


@pytest.fixture(scope="session")
def processor(tiny_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory, tiny_dir):
    """A model.cache_dir that already holds the tiny model (so configs with builtin:tiny reuse it)."""
    import shutil

    cache = tmp_path_factory.mktemp("cache")
    shutil.copytree(tiny_dir, cache / "tiny-model")
    return cache


def tiny_cfg(cache_dir, out, *overrides):
    raw = {
        "run": {"output_dir": str(out), "seed": 0},
        "model": {"cache_dir": str(cache_dir), "image": {"longest_edge": 64}},
        "data": {"synthetic": {"n_train": 48, "n_test": 8, "seed": 1}},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {
            "batch_size": 4,
            "max_steps": 4,
            "save_steps": 2,
            "save_total_limit": 5,
            "logging_steps": 1,
            "learning_rate": 1e-2,
            "max_length": 256,
        },
        "eval": {"batch_size": 8, "max_new_tokens": 3, "baselines": ["untrained", "majority"]},
        "logging": {"progress": False},
    }
    return build_config(raw, list(overrides))


@pytest.fixture(scope="session")
def lora_run(cache_dir, tmp_path_factory):
    """One short LoRA run shared by the tests that inspect a finished run."""
    from vlm_tune.train import train

    out = tmp_path_factory.mktemp("lora") / "run"
    return train(tiny_cfg(cache_dir, out))


@pytest.fixture(scope="session")
def real_decoder_dir(tmp_path_factory):
    """builtin:smollm2-135m (the real SmolLM2-135M decoder, from the [real-decoder] extra), built once."""
    from vlm_tune.standins.real_decoder import ensure_real_decoder_model

    return ensure_real_decoder_model(tmp_path_factory.mktemp("smollm2") / "smollm2-135m")


@pytest.fixture(scope="session")
def real_decoder_cache(cache_dir, real_decoder_dir):
    """A model.cache_dir holding both builtin models (the real-decoder one linked, not copied)."""
    link = cache_dir / "smollm2-135m"
    if not link.exists():
        link.symlink_to(real_decoder_dir, target_is_directory=True)
    return cache_dir


@pytest.fixture
def lora_run_copy(lora_run, tmp_path):
    """A private copy of the shared run, for tests that write into a run directory (evals, pushes), so the
    shared run keeps exactly the files training wrote (tests/test_train.py asserts that file set)."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(lora_run, copy)
    config = copy / "config.yaml"
    config.write_text(config.read_text().replace(str(lora_run), str(copy)))
    return copy
