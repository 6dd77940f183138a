"""Stand-ins built into a user's cache by the old layout still load, without a rebuild (issue 23).

Until issue 23 the stand-in builders were modules at the package root (`vlm_tune/tiny.py`, `real_decoder.py`,
`shapes.py`); they now live in `vlm_tune/standins/`. A cached build is found by its directory name under
`model.cache_dir` and reused while its JSON spec marker equals what the builder wants; nothing else in the
directory (config, processor files, weights) names a vlm-tune module. The markers in
`tests/data/standins_old_layout/` are the files the old layout wrote (commit aef0cd6, `resolve_model_path` on
each builtin and `save_built_model` with the 256M shape's marker), copied byte for byte. Each test puts one
into a cache beside a build's files, marks the directory with a sentinel and asks the new code for the
builtin: it must answer with that directory untouched (a rebuild publishes a fresh directory and moves the
old one aside) and the model must load and run. A cache key that named a module, or a changed marker, fails.
A builder's BUILD bumped on purpose rebuilds old caches by design: then refresh these files from the new build.
"""

import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import vlm_tune.cache
from vlm_tune.config import build_config

OLD = Path(__file__).parent / "data" / "standins_old_layout"
SENTINEL = "built-by-the-old-layout.txt"
# builtin → (family whose session stand-in supplies the model files, cache folder the old layout used)
BUILTINS = {
    "builtin:tiny": ("smolvlm", "tiny-model"),
    "builtin:tiny-qwen2.5-vl": ("qwen2.5-vl", "tiny-qwen2.5-vl"),
    "builtin:tiny-qwen3-vl": ("qwen3-vl", "tiny-qwen3-vl"),
    "builtin:tiny-paligemma": ("paligemma", "tiny-paligemma"),
    "builtin:tiny-internvl": ("internvl", "tiny-internvl"),
    "builtin:tiny-lfm2-vl": ("lfm2-vl", "tiny-lfm2-vl"),
    "builtin:tiny-gemma3": ("gemma3", "tiny-gemma3"),
}


@pytest.fixture
def no_rebuild(monkeypatch):
    """Any build that reaches the cache (every stand-in's save does) fails the test."""

    def rebuilt(*args, **kwargs):
        raise AssertionError(f"the old-layout build was rebuilt: {args[:2]}")

    monkeypatch.setattr(vlm_tune.cache, "staging_dir", rebuilt)
    monkeypatch.setattr(vlm_tune.cache, "publish", rebuilt)


def _old_build(cache: Path, folder: str, marker: str, files_from: Path | None) -> Path:
    """cache/folder as the old layout left it: the build's files (hard-linked from files_from, a build of the
    same spec), its old marker byte for byte, and a sentinel."""
    out = cache / folder
    out.mkdir(parents=True)
    if files_from is not None:
        for f in files_from.iterdir():
            if f.is_file() and f.name != marker:
                try:
                    os.link(f, out / f.name)
                except OSError:  # another filesystem
                    shutil.copy2(f, out / f.name)
    (out / marker).write_bytes((OLD / folder / marker).read_bytes())
    (out / SENTINEL).write_text("old layout\n")
    return out


def _untouched(cache: Path, folder: str, marker: str) -> None:
    out = cache / folder
    assert (out / SENTINEL).is_file(), "rebuilt: the directory was replaced"
    assert (out / marker).read_bytes() == (OLD / folder / marker).read_bytes()
    beside = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not [n for n in beside if ".old-" in n or ".tmp-" in n], beside


def _loads_and_runs(path: str, cfg) -> None:
    """The product load path (processor with model.image, model in the runtime's dtype), one training batch."""
    from vlm_tune.data.collate import make_collator
    from vlm_tune.model import load_model, load_processor

    processor = load_processor(path, cfg)
    model = load_model(path, cfg).eval()
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    row = {"id": "r", "images": [image], "question": "How many bars are there?", "answers": ["3"]}
    batch = make_collator(processor, None, "{question}\nAnswer briefly.")([row])
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss), loss


@pytest.mark.parametrize("builtin", list(BUILTINS))
def test_old_layout_builtin_stand_in_loads_from_the_cache(builtin, family_stand_ins, tmp_path, no_rebuild):
    from vlm_tune.model import resolve_model_path

    family, folder = BUILTINS[builtin]
    _old_build(tmp_path, folder, "tiny_spec.json", family_stand_ins[family])
    cfg = build_config({"model": {"name_or_path": builtin, "cache_dir": str(tmp_path)}}, [])
    path = resolve_model_path(cfg)
    assert path == str(tmp_path / folder)
    _untouched(tmp_path, folder, "tiny_spec.json")
    _loads_and_runs(path, cfg)
    _untouched(tmp_path, folder, "tiny_spec.json")


def test_old_layout_real_decoder_model_is_reused(tmp_path, no_rebuild, monkeypatch):
    """builtin:smollm2-135m's cache key: its marker alone (the slow test below also loads the weights)."""
    from vlm_tune.model import resolve_model_path
    from vlm_tune.standins import real_decoder

    monkeypatch.setattr(real_decoder, "build_real_decoder_model", lambda *a, **k: pytest.fail("rebuilt"))
    _old_build(tmp_path, "smollm2-135m", "real_decoder_spec.json", None)
    cfg = build_config({"model": {"name_or_path": "builtin:smollm2-135m", "cache_dir": str(tmp_path)}}, [])
    assert resolve_model_path(cfg) == str(tmp_path / "smollm2-135m")
    _untouched(tmp_path, "smollm2-135m", "real_decoder_spec.json")


@pytest.mark.slow
def test_old_layout_real_decoder_model_loads_from_the_cache(real_decoder_dir, tmp_path, no_rebuild):
    from vlm_tune.model import resolve_model_path

    _old_build(tmp_path, "smollm2-135m", "real_decoder_spec.json", real_decoder_dir)
    cfg = build_config({"model": {"name_or_path": "builtin:smollm2-135m", "cache_dir": str(tmp_path)}}, [])
    path = resolve_model_path(cfg)
    assert path == str(tmp_path / "smollm2-135m")
    _loads_and_runs(path, cfg)
    _untouched(tmp_path, "smollm2-135m", "real_decoder_spec.json")


def test_old_layout_benchmark_shape_is_reused(tmp_path, no_rebuild, monkeypatch):
    """A benchmark shape cached by the old layout (scripts/bench_gpu.py: --cache-dir/shapes/NAME): its marker
    alone (the 256M weights are 0.5 GB)."""
    from vlm_tune.standins import shapes

    monkeypatch.setattr(shapes, "build_shape_model", lambda *a, **k: pytest.fail("rebuilt"))
    _old_build(tmp_path, "shapes/smolvlm-256m", "shape_spec.json", None)
    out = tmp_path / "shapes" / "smolvlm-256m"
    assert shapes.ensure_shape_model("smolvlm-256m", out) == out
    _untouched(tmp_path, "shapes/smolvlm-256m", "shape_spec.json")
