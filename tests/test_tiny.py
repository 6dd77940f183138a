"""The offline tiny SmolVLM: builds, reloads through the Auto classes, trains, and is deterministic."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm_tune.errors import UserError
from vlm_tune.families.smolvlm import TinySpec, build_tiny_model, ensure_tiny_model

MESSAGES = [
    {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many bars?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "3"}]},
]


def small_spec() -> TinySpec:
    """A smaller model than the default, so building several stays fast."""
    return TinySpec(
        vision_hidden=16,
        vision_layers=1,
        vision_heads=2,
        text_hidden=32,
        text_layers=1,
        text_heads=2,
        text_kv_heads=1,
        text_intermediate=64,
    )


def test_reload_through_auto_classes_forward_backward(tiny_dir):
    processor = AutoProcessor.from_pretrained(tiny_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert type(processor).__name__ == "Idefics3Processor"
    text = processor.apply_chat_template(MESSAGES, tokenize=False)
    batch = processor(text=[text], images=[[Image.new("RGB", (64, 64), (255, 0, 0))]], return_tensors="pt")
    assert (
        int((batch["input_ids"] == processor.image_token_id).sum()) == 20
    )  # 4 tiles + global, 4 tokens each
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["model.connector.modality_projection.proj.weight"].abs().sum() > 0
    assert grads["model.text_model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0
    assert grads["model.vision_model.embeddings.patch_embedding.weight"].abs().sum() > 0


def test_chat_template_renders_smolvlm_format(processor):
    assert processor.apply_chat_template(MESSAGES, tokenize=False) == (
        "<|im_start|>System: Be brief.<end_of_utterance>\nUser:<image>How many bars?<end_of_utterance>\n"
        "Assistant: 3<end_of_utterance>\n"
    )
    assert processor.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<end_of_utterance>\nAssistant:"
    )
    # SmolVLM's published template renders content lists only: a plain string's text is dropped, which is why
    # build_messages turns every content into a list (tests/test_collate.py)
    plain = [{"role": "user", "content": "hi"}]
    assert processor.apply_chat_template(plain, tokenize=False) == "<|im_start|>User: <end_of_utterance>\n"


def test_answer_tokenization_is_prefix_stable(processor):
    tok = processor.tokenizer
    for answer in ("42", "red", "-3", "Yes", "1,000"):
        prefix = tok("Assistant:")["input_ids"]
        full = tok(f"Assistant: {answer}<end_of_utterance>")["input_ids"]
        assert full[: len(prefix)] == prefix
        assert full[-1] == tok.convert_tokens_to_ids("<end_of_utterance>")


def test_generate_runs_and_stops_on_end_token(tiny_dir, processor):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    assert model.generation_config.eos_token_id == processor.tokenizer.convert_tokens_to_ids(
        "<end_of_utterance>"
    )
    text = processor.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    batch = processor(text=[text], images=[[Image.new("RGB", (64, 64))]], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] <= batch["input_ids"].shape[1] + 3


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    spec = small_spec()
    a = build_tiny_model(tmp_path / "a", seed=1, spec=spec)
    b = build_tiny_model(tmp_path / "b", seed=1, spec=spec)
    c = build_tiny_model(tmp_path / "c", seed=2, spec=spec)
    sa = AutoModelForImageTextToText.from_pretrained(a).state_dict()
    sb = AutoModelForImageTextToText.from_pretrained(b).state_dict()
    sc = AutoModelForImageTextToText.from_pretrained(c).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_ensure_is_cached_and_rebuilds_on_spec_change(tmp_path):
    spec = small_spec()
    path = ensure_tiny_model(tmp_path / "m", spec=spec)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path / "m", spec=spec) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    spec.text_hidden = 48
    ensure_tiny_model(tmp_path / "m", spec=spec)
    assert json.loads((path / "tiny_spec.json").read_text())["text_hidden"] == 48
    # the earlier build is moved aside, not deleted (another process may be reading it); no staging left
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("m", ".m.lock"))
    assert len(left) == 1 and left[0].startswith(".m.old-"), left


def test_build_refuses_to_replace_a_foreign_directory_or_file(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="refusing to overwrite"):
        ensure_tiny_model(foreign, spec=small_spec())
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError):
        build_tiny_model(a_file, spec=small_spec())
    assert a_file.read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (build_tiny_model(empty, spec=small_spec()) / "tiny_spec.json").is_file()


def test_build_leaves_the_global_torch_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", seed=0, spec=small_spec())
    assert torch.equal(torch.rand(4), expected)
