"""Benchmark support: the published SmolVLM shapes (config and meta device only) and the two bench scripts."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHAPES_EXPECTED = [
    # name, image tokens per tile, nominal size, exact count with the published vocab
    ("smolvlm-256m", 64, 256e6, 256_484_928),
    ("smolvlm-2.2b", 81, 2.2e9, 2_246_272_880),
]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("name", "seq_len", "nominal", "exact"), SHAPES_EXPECTED)
def test_shape_config_gives_published_image_seq_len(name, seq_len, nominal, exact):
    from vlm_tune.standins.shapes import SHAPES, config_image_seq_len, shape_config

    config = shape_config(name)
    assert config_image_seq_len(config) == seq_len == SHAPES[name].image_seq_len
    assert config.text_config.vocab_size == SHAPES[name].vocab_size  # published vocab, not the tokenizer's


@pytest.mark.parametrize(("name", "seq_len", "nominal", "exact"), SHAPES_EXPECTED)
def test_parameter_count_on_meta_matches_published_size(name, seq_len, nominal, exact):
    from vlm_tune.standins.shapes import TOKENIZER_VOCAB, parameter_count, vocab_difference

    counts = parameter_count(name)
    assert counts["total"] == exact
    assert abs(counts["total"] - nominal) / nominal < 0.10
    # the embedding + untied lm_head sized to our tokenizer instead would lose exactly vocab_difference
    small = parameter_count(name, vocab_size=TOKENIZER_VOCAB)
    assert counts["total"] - small["total"] == vocab_difference(name)
    assert counts["embeddings"] == counts["lm_head"]  # untied, as published


@pytest.mark.parametrize(
    ("name", "image_px", "tokens"), [("smolvlm-256m", 512, 17 * 64), ("smolvlm-2.2b", 384, 17 * 81)]
)
def test_shape_processor_tiles_like_the_real_one(name, image_px, tokens):
    from PIL import Image

    from vlm_tune.standins.shapes import shape_processor

    processor = shape_processor(name)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many bars?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    enc = processor(
        text=[text], images=[[Image.new("RGB", (image_px, image_px), "white")]], return_tensors="pt"
    )
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    # default resolution: the chart is upscaled to longest_edge, cut into 4x4 tiles, plus one global view
    assert int((enc["input_ids"] == image_id).sum()) == tokens
    assert enc["pixel_values"].shape[1] == 17


def _run_script(tmp_path, name, *args):
    """scripts/NAME.py on CPU with a private cache; fails the test with its stderr on a non-zero exit."""
    proc = subprocess.run(
        [
            sys.executable,
            f"scripts/{name}.py",
            "--device",
            "cpu",
            "--cache-dir",
            str(tmp_path / "cache"),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_flop_model_matches_parameter_counts():
    from vlm_tune.standins.shapes import parameter_count, shape_config

    bench = _script("bench_workload")
    fp = bench.flop_params(shape_config("smolvlm-256m"))
    counts = parameter_count("smolvlm-256m")
    assert fp["N_c"] == counts["connector"]
    assert abs(fp["N_v"] - counts["vision"]) / counts["vision"] < 0.02  # minus position embeddings, norms
    assert fp["N_head"] == counts["lm_head"]
    assert abs(fp["N_d"] - counts["text"]) / fp["N_d"] < 0.01  # minus norms
    stats = {"rows": 1, "tiles": 17, "lengths": [1150], "supervised": 2}
    frozen, in_graph = bench.step_flops(fp, stats, False, 2), bench.step_flops(fp, stats, True, 2)
    assert 1.5 < in_graph / frozen < 2.5  # the vision tower dominates at the default resolution
    full_logits = bench.step_flops(fp, stats, False, 1150)
    assert full_logits - frozen == 4 * fp["N_head"] * 1148  # forward + activation grads of the head


@pytest.mark.slow
def test_bench_gpu_runs_on_cpu_with_the_tiny_shape(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run_script(tmp_path, "bench_gpu", "--shape", "tiny", "--steps", "2", "--out", str(out))
    report = json.loads(out.read_text())
    by_variant = {r["variant"]: r for r in report["results"]}
    assert by_variant["default"]["samples_per_s"] > 0
    assert by_variant["default"]["vision_output_requires_grad"] is False  # frozen tower: no autograd graph
    assert by_variant["vision_lora"]["vision_output_requires_grad"] is True
    assert by_variant["gc_on"]["vision_output_requires_grad"] is False  # vlm-tune's checkpointing
    assert by_variant["gc_hf_hooks"]["vision_output_requires_grad"] is True  # transformers' hooks
    assert (
        by_variant["mixed_grouped"]["padding_fraction"] < by_variant["mixed_random"]["padding_fraction"] / 2
    )
    assert (
        by_variant["full_logits"]["model_tflop_per_sample"] > by_variant["default"]["model_tflop_per_sample"]
    )
    assert by_variant["one_tile"]["tokens_per_sample"] < by_variant["default"]["tokens_per_sample"]
    assert "needs CUDA" in by_variant["qlora"]["skipped"]
    e2e = by_variant["e2e_w0"]
    assert e2e["samples_per_s"] > 0
    assert e2e["preprocess_charts_per_s_per_worker"] > 0
    # with 0 workers every batch is made in the loop, between steps: a measurable share of the step time
    assert 0 < e2e["data_wait_fraction"] < 1
    assert not [r for r in report["results"] if "error" in r]
    assert "| tiny | default |" in proc.stdout


@pytest.mark.slow
def test_bench_gpu_isolate_reports_peak_memory_per_variant(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run_script(
        tmp_path, "bench_gpu", "--shape", "tiny", "--steps", "2", "--isolate", "--variants", "default,gc_on",
        "--out", str(out),
    )  # fmt: skip
    results = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in results] == ["default", "gc_on"]
    assert all(0.1 < r["peak_rss_gb"] < 8 and r["samples_per_s"] > 0 for r in results)
    assert results[1]["vision_output_requires_grad"] is False
    assert "| tiny | gc_on |" in proc.stdout


@pytest.mark.slow
def test_bench_train_compares_both_arms(tmp_path):
    proc = _run_script(
        tmp_path, "bench_train", "--steps", "3", "--warmup", "1", "--repeats", "1", "--batch-size", "4"
    )
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"vlm-tune/baseline samples/s ratio: \d+\.\d\d", lines[-1])
    blob = json.loads(next(x for x in lines if x.startswith("JSON: "))[len("JSON: ") :])
    ours, base = blob["results"]["vlm-tune"], blob["results"]["baseline"]
    assert ours["trainable_params"] == base["trainable_params"]  # same LoRA config
    assert blob["ratios"]["samples_per_s"] == pytest.approx(ours["samples_per_s"] / base["samples_per_s"])
    assert blob["ratios"]["peak_mem_mb"] == pytest.approx(ours["peak_mem_mb"] / base["peak_mem_mb"])
    assert lines[-1].endswith(f"{blob['ratios']['samples_per_s']:.2f}")
    masking = base["masking"]
    assert masking["same_input_ids_as_vlm_tune"]
    assert masking["answer_tokens_also_supervised_by_baseline"]
    assert masking["answer_share_of_baseline_supervision"] < 0.5  # the baseline mostly trains on the prompt
    assert 1 <= ours["supervised_tokens_per_sample"] <= 4  # answer + <end_of_utterance> only
    assert base["supervised_tokens_per_sample"] > 5 * ours["supervised_tokens_per_sample"]


@pytest.mark.slow
def test_bench_eval_compares_feedings_with_identical_answers(tmp_path):
    """bench_eval.py asserts that every arm answers as the old in-process, row-order feeding did."""
    proc = subprocess.run(
        [sys.executable, "scripts/bench_eval.py", "--models", "tiny", "--rows", "8", "--batch-size", "4",
         "--repeats", "1", "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"after/before answers/s ratio: \d+\.\d\d", lines[-1])
    assert "tiny identical answers in every arm and repeat: True" in proc.stdout
    padding = [float(x) for x in re.findall(r"padding (\d\.\d+)", proc.stdout)]
    assert len(padding) == 3 and padding[1] == padding[2] < padding[0]  # sorted arms pad less than before
