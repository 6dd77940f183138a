"""Generation, eval, predict and merge on a trained tiny adapter."""

import json
import subprocess
import sys

import pytest
import torch

from vlm_tune.config import load_config


@pytest.fixture(scope="module")
def loaded(lora_run):
    from vlm_tune.inference import load_for_inference

    return load_for_inference(lora_run / "final")


@pytest.fixture(scope="module")
def eval_rows(lora_run):
    from vlm_tune.data.sources import load_split, prepare_split

    cfg = load_config(lora_run / "config.yaml")
    prepared = prepare_split(load_split(cfg.data, "test", cfg.model.cache_dir))
    return [prepared.rowset.row(i) for i in prepared.indices]


@pytest.mark.slow
def test_batched_equals_unbatched(loaded, eval_rows):
    from vlm_tune.data.collate import ChatCollator
    from vlm_tune.evaluate import generate_answers

    model, processor, prompt = loaded
    collator = ChatCollator(processor, prompt["system"], prompt["user_template"])
    # raw generations (not the cleaned answers) must match token for token
    one = generate_answers(model, processor, collator, eval_rows, batch_size=1, max_new_tokens=5)
    many = generate_answers(model, processor, collator, eval_rows, batch_size=8, max_new_tokens=5)
    assert one == many
    assert len(one) == len(eval_rows)


@pytest.mark.slow
def test_final_eval_predictions_reproduced_by_eval_and_predict(lora_run, eval_rows, tmp_path):
    """train's final eval, `vlm-tune eval` and `vlm-tune predict` give the same answers (one prompt contract)."""
    final = [
        json.loads(x) for x in (lora_run / "eval" / "final" / "predictions.jsonl").read_text().splitlines()
    ]
    from vlm_tune.inference import run_eval

    cfg = load_config(lora_run / "config.yaml")
    metrics = run_eval(cfg, name="again")
    again = [
        json.loads(x) for x in (lora_run / "eval" / "again" / "predictions.jsonl").read_text().splitlines()
    ]
    assert [r["prediction"] for r in again] == [r["prediction"] for r in final]
    assert metrics["n"] == len(final)

    img = tmp_path / "chart.png"
    eval_rows[0]["images"][0].save(img)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlm_tune.cli",
            "predict",
            "--adapter",
            str(lora_run / "final"),
            "--image",
            str(img),
            "--question",
            eval_rows[0]["question"],
            "--max-new-tokens",
            "3",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout.strip().splitlines()[-1])["answer"] == final[0]["prediction"]
    import shutil

    shutil.rmtree(lora_run / "eval" / "again")


@pytest.mark.slow
def test_merge_matches_adapter_logits(lora_run, loaded, tmp_path):
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from vlm_tune.inference import merge

    out = merge(lora_run / "final", tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    model, processor, _ = loaded
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many bars are there?"}]}
    ]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    batch = processor(text=[text], images=[[Image.new("RGB", (64, 64), (0, 90, 200))]], return_tensors="pt")
    with torch.no_grad():
        a, b = model(**batch).logits, merged(**batch).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert not (out / "adapter_config.json").exists()


def test_predict_user_errors(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vlm_tune.cli", "predict", "--adapter", str(tmp_path), "--question", "q"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "--image" in result.stderr and "Traceback" not in result.stderr


def test_uncached_model_id_offline_fails_at_once_naming_it(monkeypatch):
    import time

    from vlm_tune.config import build_config
    from vlm_tune.errors import UserError
    from vlm_tune.model import resolve_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = build_config({"model": {"name_or_path": "nobody-xyz/no-such-model"}})
    t0 = time.perf_counter()
    with pytest.raises(
        UserError, match=r"'nobody-xyz/no-such-model' is not in the local cache.*model.name_or_path"
    ):
        resolve_model_path(cfg)
    assert time.perf_counter() - t0 < 5


def test_train_eval_predict_share_one_prompt(processor):
    """The same row gives the same prompt in train (answer stripped), eval and predict."""
    from PIL import Image

    from vlm_tune.data.chat import build_messages
    from vlm_tune.data.collate import ChatCollator

    row = {"id": "x", "images": [Image.new("RGB", (64, 64))], "question": "How many bars?", "answers": ["3"]}
    system, template = "Sys.", "{question}\nAnswer briefly."
    train_msgs = build_messages(row, system, template, with_answer=True)
    eval_msgs = build_messages(row, system, template, with_answer=False)
    assert train_msgs[:-1] == eval_msgs and train_msgs[-1]["role"] == "assistant"
    collator = ChatCollator(processor, system, template)
    eval_ids = collator.generation_batch([row])["input_ids"]
    # predict builds its rows from (images, question) only, with no answer
    predict_row = {"id": "0", "images": row["images"], "question": row["question"], "answers": [""]}
    assert torch.equal(collator.generation_batch([predict_row])["input_ids"], eval_ids)
    text = processor.tokenizer.decode(eval_ids[0])
    assert text.startswith("<|im_start|>System: Sys.") and text.endswith(
        "Answer briefly.<end_of_utterance>\nAssistant:"
    )
