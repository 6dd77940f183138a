"""Training end to end on the tiny model: run directory, LoRA effects, resume, overwrite, QLoRA, reload."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm_tune.config import build_config
from vlm_tune.errors import UserError

from .conftest import tiny_cfg


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_run_directory_exact_file_set(lora_run):
    files = files_under(lora_run)
    final = {f for f in files if f.startswith("final/")}
    assert final == {
        "final/adapter_config.json",
        "final/adapter_model.safetensors",
        "final/chat_template.jinja",
        "final/processor_config.json",
        "final/tokenizer.json",
        "final/tokenizer_config.json",
        "final/prompt.json",
        "final/config.yaml",
    } | {
        f for f in final if f.startswith("final/preprocessor_config") or f.startswith("final/special_tokens")
    }
    checkpoints = {f.split("/")[0] for f in files if f.startswith("checkpoint-")}
    assert checkpoints == {"checkpoint-2", "checkpoint-4"}
    assert {f for f in files if f.startswith("checkpoint-4/")} >= {
        "checkpoint-4/adapter_model.safetensors",
        "checkpoint-4/optimizer.pt",
        "checkpoint-4/scheduler.pt",
        "checkpoint-4/trainer_state.json",
        "checkpoint-4/checkpoint_complete.json",
        "checkpoint-4/rng_state.pth",
    }
    rest = {f for f in files if not f.startswith(("final/", "checkpoint-"))}
    assert rest == {
        "config.yaml",
        "train_log.json",
        "plots/loss.png",
        "report.html",
        "eval/untrained/metrics.json",
        "eval/untrained/predictions.jsonl",
        "eval/majority/metrics.json",
        "eval/majority/predictions.jsonl",
        "eval/final/metrics.json",
        "eval/final/predictions.jsonl",
    }


@pytest.mark.slow
def test_metrics_files_schema(lora_run):
    for name in ("untrained", "majority", "final"):
        m = json.loads((lora_run / "eval" / name / "metrics.json").read_text())
        assert 0.0 <= m["exact_match"] <= 1.0 and m["n"] == 8
        assert set(m["by_type"]) == {"count", "color_max"}
        preds = [
            json.loads(line)
            for line in (lora_run / "eval" / name / "predictions.jsonl").read_text().splitlines()
        ]
        assert len(preds) == 8
        assert set(preds[0]) >= {"id", "question", "gold", "prediction", "exact", "relaxed", "type", "split"}


@pytest.mark.slow
def test_lora_and_head_weights_changed_frozen_did_not(lora_run, tiny_dir):
    from transformers import AutoModelForImageTextToText

    adapter = load_file(str(lora_run / "final" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: any change is training
    assert any("connector" in k for k in adapter), "projector gets LoRA"
    assert not any("vision_model" in k for k in adapter), "vision tower frozen by default"
    base = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    base2 = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    for (n, a), (_, b) in zip(base.named_parameters(), base2.named_parameters(), strict=True):
        assert torch.equal(a, b), n  # training never wrote into the base model files


@pytest.mark.slow
def test_reload_with_plain_peft_gives_same_logits(lora_run, tiny_dir):
    """The adapter loads with transformers + peft alone (a subprocess with no vlm_tune import)."""
    code = f"""
import sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from peft import PeftModel
assert 'vlm_tune' not in sys.modules
p = AutoProcessor.from_pretrained({str(lora_run / "final")!r})
m = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained({str(tiny_dir)!r}), {str(lora_run / "final")!r}).eval()
msgs = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "How many bars are there?"}}]}}]
text = p.apply_chat_template(msgs, add_generation_prompt=True)
b = p(text=[text], images=[[Image.new("RGB", (64, 64), (200, 0, 0))]], return_tensors="pt")
with torch.no_grad():
    torch.save(m(**b).logits, sys.argv[1])
assert 'vlm_tune' not in sys.modules
"""
    out = lora_run.parent / "logits.pt"
    subprocess.run([sys.executable, "-c", code, str(out)], check=True)
    from PIL import Image

    from vlm_tune.inference import load_for_inference

    model, processor, _ = load_for_inference(lora_run / "final")
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many bars are there?"}]}
    ]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    b = processor(text=[text], images=[[Image.new("RGB", (64, 64), (200, 0, 0))]], return_tensors="pt")
    with torch.no_grad():
        logits = model(**b).logits
    assert torch.allclose(torch.load(out), logits, atol=1e-5)


@pytest.mark.slow
def test_existing_run_is_not_overwritten(lora_run, cache_dir):
    from vlm_tune.train import train

    before = (lora_run / "final" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds a run.*--resume.*--overwrite"):
        train(tiny_cfg(cache_dir, lora_run))
    assert (lora_run / "final" / "adapter_model.safetensors").read_bytes() == before


@pytest.mark.slow
def test_resume_refuses_incompatible_config(lora_run, cache_dir):
    from vlm_tune.train import train

    with pytest.raises(UserError, match="incompatible.*lora.r"):
        train(tiny_cfg(cache_dir, lora_run, "lora.r=8"), resume="latest")


def _train_cmd(cfg_path, *extra):
    return [sys.executable, "-m", "vlm_tune.cli", "train", str(cfg_path), *extra]


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(cache_dir, tmp_path):
    """N steps straight vs k steps, SIGKILL, --resume to N: identical adapters and losses (CPU, exact)."""
    import signal
    import time

    import yaml

    n = 6
    cfgs = {}
    for name in ("straight", "killed"):
        cfg = tiny_cfg(
            cache_dir,
            tmp_path / name,
            f"train.max_steps={n}",
            "train.save_steps=2",
            "lora.dropout=0.1",
            "eval.at_end=false",
            "eval.baselines=[]",
        )
        cfgs[name] = tmp_path / f"{name}.yaml"
        cfgs[name].write_text(yaml.safe_dump(cfg.to_dict()))
    subprocess.run(_train_cmd(cfgs["straight"]), check=True, capture_output=True)

    proc = subprocess.Popen(_train_cmd(cfgs["killed"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "killed" / "checkpoint-4" / "checkpoint_complete.json"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the run reached step 4 before the kill"
    assert not (tmp_path / "killed" / "final").exists(), "killed before the end"
    # a checkpoint being written when the kill came is never picked up: fake one
    partial = tmp_path / "killed" / "checkpoint-5"
    partial.mkdir(exist_ok=True)
    (partial / "adapter_model.safetensors").write_bytes(b"half")
    result = subprocess.run(
        _train_cmd(cfgs["killed"], "--resume"), check=True, capture_output=True, text=True
    )
    assert "skipping incomplete checkpoint" in result.stdout + result.stderr

    a = load_file(str(tmp_path / "straight" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def loss(run):
        return {
            h["step"]: h["loss"]
            for h in json.loads((tmp_path / run / "train_log.json").read_text())
            if "loss" in h
        }

    la, lb = loss("straight"), loss("killed")
    assert sorted(lb) == list(range(1, n + 1))
    assert all(la[s] == lb[s] for s in range(5, n + 1))


@pytest.mark.slow
def test_qlora_trains_and_saves(cache_dir, tmp_path):
    from vlm_tune.train import train

    run = train(
        tiny_cfg(
            cache_dir,
            tmp_path / "q",
            "train.method=qlora",
            "train.max_steps=2",
            "eval.baselines=[]",
            "eval.at_end=false",
        )
    )
    adapter = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    cfg = json.loads((run / "final" / "adapter_config.json").read_text())
    assert cfg["r"] == 4


def test_parameter_counts_per_method(tiny_dir):
    from transformers import AutoModelForImageTextToText

    from vlm_tune.model import lora_module_names, parameter_counts, setup_training

    def counts(*ov):
        cfg = build_config({}, list(ov))
        model = setup_training(AutoModelForImageTextToText.from_pretrained(tiny_dir), cfg)
        return model, parameter_counts(model)

    m, (trainable, total) = counts("train.method=full")
    vision = sum(p.numel() for n, p in m.named_parameters() if n.startswith("model.vision_model"))
    assert trainable == total - vision
    m, (trainable, total) = counts("lora.r=2")
    names = lora_module_names(m)
    assert any("connector.modality_projection.proj" in n for n in names)
    assert any("text_model.layers.0.mlp.gate_proj" in n for n in names)
    assert not any("vision_model" in n for n in names)
    assert trainable == sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)
    m, _ = counts("lora.targets=[vision]")
    assert all("vision_model" in n for n in lora_module_names(m))


@pytest.mark.slow
def test_supervised_fraction_logged(lora_run):
    log = json.loads((lora_run / "train_log.json").read_text())
    fractions = [h["supervised_fraction"] for h in log if "supervised_fraction" in h]
    assert len(fractions) == 4  # every logged step
    assert all(0 < f < 0.1 for f in fractions)  # answers are a few tokens of ~60


@pytest.mark.slow
def test_quickstart_config_smoke(cache_dir, tmp_path):
    """configs/quickstart.yaml itself, shrunk: the exact run-directory file set and all three evals."""
    from vlm_tune.config import load_config
    from vlm_tune.train import train

    cfg = load_config(
        "configs/quickstart.yaml",
        [
            f"run.output_dir={tmp_path / 'qs'}",
            f"model.cache_dir={cache_dir}",
            "data.synthetic.n_train=32",
            "data.synthetic.n_test=8",
            "train.max_steps=3",
            "train.save_steps=3",
            "train.logging_steps=1",
            "logging.progress=false",
        ],
    )
    run = train(cfg)
    files = files_under(run)
    assert {f for f in files if not f.startswith(("final/", "checkpoint-3/"))} == {
        "config.yaml",
        "train_log.json",
        "plots/loss.png",
        "report.html",
        *(
            f"eval/{n}/{f}"
            for n in ("untrained", "majority", "final")
            for f in ("metrics.json", "predictions.jsonl")
        ),
    }
    adapter = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert any("vision_model" in k for k in adapter), "the random tiny vision tower is trained and saved"
    assert any("lm_head" in k for k in adapter)
    for name in ("untrained", "majority", "final"):
        m = json.loads((run / "eval" / name / "metrics.json").read_text())
        assert set(m["by_type"]) == {"count", "color_max"} and 0 <= m["exact_match"] <= 1
