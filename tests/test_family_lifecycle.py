"""Every non-SmolVLM family through the product's own lifecycle, on its offline stand-in.

Resume (a run continued from checkpoint-2 ends with the same adapter as an uninterrupted one), merge (the
merged model gives the adapter's logits), QLoRA (trains on the 4-bit base and evaluates), and the model
card (its snippet sets the family's knobs and end-of-turn token, and, where AutoProcessor can build the
family's processor, answers like vlm-tune). SmolVLM's own versions of these live in test_train.py,
test_inference.py and test_hub.py.
"""

import ast
import json
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlm_tune.config import build_config
from vlm_tune.families import all_families
from vlm_tune.families.qwen import VIDEO_PROCESSOR

# processor class → the video processor class its saved folder must name (image-only builds write it too)
VIDEO_PROCESSOR = {**VIDEO_PROCESSOR, "InternVLProcessor": "InternVLVideoProcessor"}
# a resolution knob per family (override, model.image dict) that the card snippet must set
KNOBS = {
    "qwen2.5-vl": ("model.image.max_pixels=4096", {"max_pixels": 4096}),
    "qwen3-vl": ("model.image.max_pixels=4096", {"max_pixels": 4096}),
    "internvl": ("model.image.max_patches=2", {"max_patches": 2}),
    "lfm2-vl": ("model.image.max_image_tokens=9", {"max_image_tokens": 9}),
}
# families whose image processor itself exists only as a torchvision class (vlm-tune ports it for CPU)
TORCHVISION_IMAGE_PROCESSOR = {"Lfm2VlProcessor"}

FAMILIES = [f.name for f in all_families() if f.name != "smolvlm"]


def fam(name):
    return next(f for f in all_families() if f.name == name)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    return {name: fam(name).build_stand_in(root / name) for name in FAMILIES}


def cfg(model_dir, out, *overrides):
    raw = {
        "run": {"output_dir": str(out), "seed": 0},
        "model": {"name_or_path": str(model_dir)},
        "data": {"synthetic": {"n_train": 12, "n_test": 4, "seed": 1}},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["decoder", "projector"]},
        "train": {
            "batch_size": 4,
            "max_steps": 4,
            "save_steps": 2,
            "logging_steps": 1,
            "learning_rate": 1e-2,
            "max_length": 256,
        },
        "eval": {"batch_size": 4, "max_new_tokens": 2, "baselines": [], "at_end": False},
        "logging": {"progress": False},
    }
    return build_config(raw, list(overrides))


def chart():
    return Image.new("RGB", (64, 64), (0, 160, 40))


@pytest.fixture(scope="module")
def runs(stand_ins, tmp_path_factory):
    """name → (a 4-step run resumed from its checkpoint-2, the adapter it had before being cut back)."""
    from vlm_tune.train import train

    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name in FAMILIES:
        run = train(cfg(stand_ins[name], root / name))
        before = load_file(str(run / "final" / "adapter_model.safetensors"))
        for gone in ("checkpoint-4", "final"):
            shutil.rmtree(run / gone)
        assert train(cfg(stand_ins[name], root / name), resume="latest") == run
        out[name] = (run, before)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_resume_from_checkpoint_equals_uninterrupted(name, runs):
    resumed, a = runs[name]
    b = load_file(str(resumed / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [h["step"] for h in json.loads((resumed / "train_log.json").read_text()) if "loss" in h]
    assert steps == [1, 2, 3, 4]  # steps 1-2 from the checkpoint's log, 3-4 trained after resuming


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_merge_gives_the_adapter_logits(name, runs, tmp_path):
    from transformers import AutoModelForImageTextToText

    from vlm_tune.data.collate import make_collator
    from vlm_tune.inference import load_for_inference, merge

    final = runs[name][0] / "final"  # the resumed run's adapter
    out = merge(final, tmp_path / "merged")
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    model, processor, prompt = load_for_inference(final)
    collator = make_collator(processor, prompt["system"], prompt["user_template"])
    batch = collator.generation_batch(
        [{"id": "r", "images": [chart()], "question": "How many bars are there?", "answers": [""]}]
    )
    with torch.no_grad():
        a, b = model(**batch).logits, merged(**batch).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_qlora_trains_on_the_4bit_base_and_evaluates(name, stand_ins, tmp_path):
    from vlm_tune.train import train

    run = train(
        cfg(stand_ins[name], tmp_path / "q", "train.method=qlora", "train.max_steps=2", "eval.at_end=true")
    )
    adapter = load_file(str(run / "final" / "adapter_model.safetensors"))
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())
    projector = [
        k for k in adapter for p in fam(name).projector_modules if k.startswith("base_model.model." + p)
    ]
    if fam(name).full_projector:  # no nn.Linear in it (Gemma 3): trained fully, saved whole
        assert projector and not any("lora_" in k for k in projector)
    else:
        assert any(k in lora_b for k in projector)
    metrics = json.loads((run / "eval" / "final" / "metrics.json").read_text())
    assert metrics["n"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_pushed_card_snippet_sets_the_family_knobs_and_answers_like_vlm_tune(name, stand_ins, tmp_path):
    from transformers import AutoProcessor

    from tests.conftest import skip_without_torchvision
    from tests.test_hub import python_block
    from vlm_tune.hub import push
    from vlm_tune.inference import load_for_inference, predict
    from vlm_tune.metrics import clean_generation
    from vlm_tune.train import train

    override, image_knobs = KNOBS.get(name, (None, {}))
    knobs = fam(name).card_image_lines(image_knobs)
    run = train(
        cfg(stand_ins[name], tmp_path / "run", "train.max_steps=2", *([override] if override else []))
    )
    dest = tmp_path / "pushed"
    push(run, str(dest))
    card = (dest / "README.md").read_text()
    snippet = python_block(card)
    assert all(line in snippet for line in knobs)
    assert json.dumps(fam(name).end_of_turn) in snippet  # generation stops at the family's end of turn

    saved = json.loads((dest / "processor_config.json").read_text())["processor_class"]
    if saved in VIDEO_PROCESSOR:  # AutoProcessor loads the video processor too: its config must travel
        video = json.loads((dest / "video_preprocessor_config.json").read_text())
        image = json.loads((dest / "processor_config.json").read_text())["image_processor"]
        assert video["video_processor_type"] == VIDEO_PROCESSOR[saved]
        for key in ("patch_size", "merge_size"):  # Qwen's patching (InternVL's tiles: image processor only)
            assert video.get(key) == image.get(key), key
    if saved in VIDEO_PROCESSOR or saved in TORCHVISION_IMAGE_PROCESSOR:
        skip_without_torchvision(
            f"AutoProcessor cannot build {saved} without torchvision; the snippet runs where it is"
        )
    assert type(AutoProcessor.from_pretrained(dest)).__name__ == saved
    question = "How many bars are there?"
    chart().save(tmp_path / "chart.png")
    snippet = snippet.rsplit("\nprint(", 1)[0]  # the pushed folder is the repo: the snippet reads it
    snippet = snippet.replace("skip_special_tokens=True", "skip_special_tokens=False")
    snippet += (
        f"\nprint(repr(answer([Image.open({str(tmp_path / 'chart.png')!r}).convert('RGB')], {question!r})))\n"
    )
    (tmp_path / "snippet.py").write_text(snippet)
    r = subprocess.run(
        [sys.executable, str(tmp_path / "snippet.py")], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    model, processor, prompt = load_for_inference(run / "final")
    expected = predict(model, processor, prompt, [{"images": [chart()], "question": question}])
    assert clean_generation(ast.literal_eval(r.stdout.strip().splitlines()[-1])) == expected[0]
