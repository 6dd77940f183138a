"""Evaluation runs where training runs, records where and how fast, and holds one batch of images at a time."""

import json
import weakref

import pytest
import torch

from .conftest import tiny_cfg


class DecodeCounter:
    """Wraps images.open_image: counts decodes and the most decoded images alive at once."""

    def __init__(self, monkeypatch):
        import vlm_tune.data.images as src

        self.orig = src.open_image
        self.decodes = 0
        self.alive: set[int] = set()
        self.peak = 0
        monkeypatch.setattr(src, "open_image", self)

    def __call__(self, *args, **kwargs):
        img = self.orig(*args, **kwargs)
        self.decodes += 1
        key = id(img)
        self.alive.add(key)
        weakref.finalize(img, self.alive.discard, key)
        self.peak = max(self.peak, len(self.alive))
        return img

    def reset(self):
        self.decodes, self.peak = 0, len(self.alive)


def test_vlm_tune_eval_decodes_images_per_batch(lora_run_copy, monkeypatch):
    """8 rows, batch 2: every image decoded once for generation, never more than a batch alive."""
    from vlm_tune.config import load_config
    from vlm_tune.inference import run_eval

    cfg = load_config(lora_run_copy / "config.yaml", ["eval.batch_size=2"])
    counter = DecodeCounter(monkeypatch)
    metrics = run_eval(cfg, name="lazy")
    # prepare_split checks each row once (decode, drop), generation decodes each row once more
    assert counter.decodes == 2 * 8
    assert counter.peak <= 2, counter.peak
    assert metrics["rows"] == 8 and metrics["n"] == 8
    saved = json.loads((lora_run_copy / "eval" / "lazy" / "metrics.json").read_text())
    assert saved["device"] == "cpu" and saved["dtype"] == "float32"
    assert saved["wall_s"] > 0 and saved["answers_per_s"] == pytest.approx(8 / saved["wall_s"], rel=0.01)
    assert saved["split"] == "test"
    # and the software that produced it (vlm-tune env's versions, the image backend every path loads)
    from vlm_tune.backend import image_backend
    from vlm_tune.versions import library_versions

    assert saved["versions"] == library_versions() and saved["image_backend"] == image_backend()


def test_train_evals_record_device_and_hold_one_batch(cache_dir, tmp_path, monkeypatch):
    """Baselines, eval during training, final eval and report: one batch of images at a time; metrics say where."""
    from vlm_tune.train import train

    counter = DecodeCounter(monkeypatch)
    run = train(
        tiny_cfg(
            cache_dir,
            tmp_path / "r",
            "eval.batch_size=2",
            "eval.every_steps=2",
            "eval.subset_size=4",
            "train.max_steps=2",
            "train.batch_size=2",
            "logging.progress=true",
        )
    )
    assert counter.peak <= 2, counter.peak  # eval (8 rows) and training (48 rows): a batch of 2 at a time
    for name in ("untrained", "final"):
        m = json.loads((run / "eval" / name / "metrics.json").read_text())
        assert (m["device"], m["dtype"], m["rows"]) == ("cpu", "float32", 8)
        assert m["devices"] == ["cpu"]  # every parameter and buffer, not only the first
        assert m["wall_s"] > 0 and m["answers_per_s"] > 0
    majority = json.loads((run / "eval" / "majority" / "metrics.json").read_text())
    assert majority["device"] is None and majority["rows"] == 8  # no model
    assert majority["versions"]["transformers"] and majority["image_backend"] in ("pil", "torchvision")
    assert (run / "report.html").read_text().count("data:image/png;base64") >= 8


def test_generate_answers_takes_any_indexable_rows(lora_run):
    """A lazy slice (as the eval-during-training subset) gives the same answers as a list of the same rows."""
    from vlm_tune.config import load_config
    from vlm_tune.data.collate import ChatCollator
    from vlm_tune.data.sources import LazyRows, load_split, prepare_split
    from vlm_tune.evaluate import generate_answers
    from vlm_tune.inference import load_for_inference

    model, processor, prompt = load_for_inference(lora_run / "final")
    cfg = load_config(lora_run / "config.yaml")
    lazy = LazyRows.of(prepare_split(load_split(cfg.data, "test", cfg.model.cache_dir)))[1:6]
    assert isinstance(lazy, LazyRows) and len(lazy) == 5 and "images" not in lazy.texts()[0]
    collator = ChatCollator(processor, prompt["system"], prompt["user_template"])
    eager = [lazy[i] for i in range(len(lazy))]
    assert generate_answers(model, processor, collator, lazy, 2, 3) == generate_answers(
        model, processor, collator, eager, 4, 3
    )


def test_qlora_adapter_is_evaluated_on_its_4bit_base(cache_dir, tmp_path):
    """`vlm-tune eval` of a QLoRA run loads the base in 4 bits, as in training (not an unquantised base)."""
    from vlm_tune.inference import load_for_inference, merge
    from vlm_tune.train import train

    run = train(
        tiny_cfg(
            cache_dir,
            tmp_path / "q",
            "train.method=qlora",
            "eval.baselines=[]",
            "eval.at_end=false",
            "train.max_steps=1",
        )
    )
    model, _, _ = load_for_inference(run / "final")
    assert any(p.__class__.__name__ == "Params4bit" for p in model.parameters())
    merged = merge(run / "final", tmp_path / "merged")  # merging loads the unquantised base
    assert not json.loads((merged / "config.json").read_text()).get("quantization_config")
    record = json.loads((merged / "merge.json").read_text())  # where the merge ran, for gpu_check.sh
    assert record["devices"] == ["cpu"] and record["dtype"] == "float32"


def test_tensor_devices_sees_every_parameter_and_buffer():
    """A model whose first parameter is on the device but a buffer is not: both devices are reported."""
    from vlm_tune.runtime import tensor_devices

    model = torch.nn.Linear(2, 2)
    assert tensor_devices(model) == ["cpu"]
    model.register_buffer("elsewhere", torch.zeros(1, device="meta"))
    assert tensor_devices(model) == ["cpu", "meta"]


def test_predict_json_lines_say_where_the_model_ran(lora_run, tmp_path, capsys):
    from PIL import Image

    from vlm_tune.cli import main

    Image.new("RGB", (64, 64), (0, 160, 40)).save(tmp_path / "c.png")
    argv = ["predict", "--adapter", str(lora_run / "final"), "--image", str(tmp_path / "c.png")]
    assert main([*argv, "--question", "How many bars?", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["devices"] == ["cpu"] and line["dtype"] == "float32" and "answer" in line
