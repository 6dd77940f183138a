"""Shared fixtures: the tiny model and a small synthetic dataset, each built once per session, offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from vlm_tune.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


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
