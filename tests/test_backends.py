"""PIL and torchvision image processors give every family the same tokens, and pixels within a stated tolerance.

GPU users have torchvision (it comes with CUDA torch), so transformers and vlm-tune use its image processors
there; CPU installs use the PIL ones. Train on one, serve on the other: the token sequence (image token
counts included, so the pre-flight budget) must be identical, and pixel values may differ only by resize
rounding. These tests need torchvision: the torchvision CI lane runs them (and fails on a skip).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_tune.data.collate import IGNORE_INDEX, count_tokens, make_collator
from vlm_tune.families import all_families, load_processor

pytestmark = pytest.mark.torchvision

# max |PIL - torchvision| over all pixel values, after each family's normalisation: resize filters round
# differently at edges (InternVL's bicubic resize most: ~0.17, a few grey levels at std 0.23); the mean
# difference is what a model sees and stays tiny
MAX_ABS = 0.25
MEAN_ABS = 1e-3


def chart(w, h, seed):
    rng = np.random.default_rng(seed)
    a = np.full((h, w, 3), 255, np.uint8)
    for i in range(3):
        x0 = 2 + i * w // 4
        a[h // 3 + 3 * i :, x0 : x0 + max(1, w // 6)] = rng.integers(0, 256, 3)
    return Image.fromarray(a)


SIZES = [(64, 64), (200, 120), (37, 91), (320, 240), (90, 30)]
ROWS = [
    {"id": f"r{i}", "images": [chart(w, h, i)], "question": "How many bars?", "answers": [str(i)]}
    for i, (w, h) in enumerate(SIZES)
] + [{"id": "two", "images": [chart(64, 48, 7), chart(48, 64, 8)], "question": "Same?", "answers": ["yes"]}]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    from vlm_tune.families.smolvlm import ensure_tiny_model

    root = tmp_path_factory.mktemp("backends")
    return {
        f.name: ensure_tiny_model(root / f.name) if f.name == "smolvlm" else f.build_stand_in(root / f.name)
        for f in all_families()
    }


def load(path, backend, monkeypatch):
    monkeypatch.setenv("VLM_TUNE_IMAGE_BACKEND", backend)
    return load_processor(str(path))


@pytest.mark.parametrize("name", [f.name for f in all_families()])
def test_both_backends_give_the_same_tokens_and_close_pixels(name, stand_ins, monkeypatch):
    from transformers.image_processing_backends import PilBackend, TorchvisionBackend

    batches, counts = {}, {}
    for backend, kind in (("pil", PilBackend), ("torchvision", TorchvisionBackend)):
        processor = load(stand_ins[name], backend, monkeypatch)
        assert isinstance(processor.image_processor, kind), type(processor.image_processor).__name__
        collator = make_collator(processor, "sys", "{question}", max_length=4096)
        batches[backend] = collator(ROWS)
        counts[backend] = [count_tokens(processor, collator, r) for r in ROWS]
        # the pre-flight budget equals the collated length row by row, under each backend
        for r, c in zip(ROWS, counts[backend], strict=True):
            one = collator([r])
            assert c["total"] == one["input_ids"].shape[1], (backend, r["id"])
            assert c["supervised"] == int((one["labels"] != IGNORE_INDEX).sum()), (backend, r["id"])
    pil, tv = batches["pil"], batches["torchvision"]
    assert counts["pil"] == counts["torchvision"]
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(pil[key], tv[key]), key
    assert set(pil) == set(tv)
    pixels = [k for k in pil if k.startswith("pixel_values")]
    assert pixels
    for key in pil:
        assert pil[key].shape == tv[key].shape, key
        if key in pixels:
            diff = (pil[key].float() - tv[key].float()).abs()
            assert diff.max() <= MAX_ABS and diff.mean() <= MEAN_ABS, (key, diff.max(), diff.mean())
        elif not key.startswith(("input_ids", "attention_mask", "labels")):
            assert torch.equal(pil[key], tv[key]), key  # grids, masks, spatial shapes: exactly equal
