"""Evaluation protocols (vlm_tune.protocols), harness exports and rescoring (vlm_tune.export)."""

from __future__ import annotations

import csv
import json
import typing

import pytest

from vlm_tune.metrics import (
    lmms_eval_relaxed,
    relaxed_accuracy,
    relaxed_accuracy_strict,
    vlmevalkit_relaxed,
)
from vlm_tune.protocols import PROTOCOL_NAMES, cut_at_end_of_turn, get_protocol, resolve

# (prediction, gold, vlm-tune robust, pix2struct strict, lmms-eval, VLMEvalKit). The lmms-eval column was
# computed with lmms-eval 0.7.3's own `relaxed_correctness` (lmms_eval/tasks/chartqa/utils.py, from the PyPI
# wheel) on the first gold answer, the way its `chartqa_process_results` calls it.
HARNESS_CASES = [
    ("2%", "2", 1, 0, 0, 0),  # VLMEvalKit#1313: robust reads % as a unit; the harnesses read 2% as 0.02
    ("2", "2%", 1, 0, 0, 0),
    ("0.02", "2%", 1, 1, 1, 1),
    ("1,000", "1000", 1, 0, 0, 0),  # thousands separator: float("1,000") fails in the harnesses
    ("1000", "1,000", 1, 0, 0, 0),
    ("Yes.", "Yes", 1, 0, 0, 0),  # trailing period: robust drops one
    ("42.", "42", 1, 1, 1, 1),  # ... which float() reads anyway
    ("5 million", "5", 0, 0, 0, 0),  # units: words are never stripped, by anyone
    ("5", "5 million", 0, 0, 0, 0),
    ("$5", "5", 1, 0, 0, 0),  # currency signs: robust only
    (" Yes", "Yes", 1, 0, 0, 1),  # surrounding space: lmms-eval does not strip, VLMEvalKit does
    (" 5", "5", 1, 1, 1, 1),  # float() itself ignores it
    ("5%%", "0.05", 0, 1, 1, 1),  # rstrip("%"): every trailing % is one /100
    ("1_000", "1000", 0, 1, 1, 1),  # float() reads Python's digit separator
    ("nan", "nan", 1, 0, 0, 0),  # nan parses and is never within 5% of itself
    ("0.0", "0", 1, 0, 0, 0),  # a gold 0 is falsy: string comparison
    ("0.57", "0.6", 1, 0, 0, 0),  # 5% in float is 0.050000000000000044
    ("95", "100", 1, 1, 1, 1),  # relative to the gold value ...
    ("100", "95", 0, 0, 0, 0),  # ... not the prediction
    ("yes", ["No", "yes"], 1, 1, 0, 1),  # lmms-eval: first gold only; the others: max over golds
    ("1", "[1, 2]", 0, 0, 0, 1),  # VLMEvalKit evaluates a list-looking answer cell into answers 1 and 2
]


@pytest.mark.parametrize(("pred", "gold", "robust", "strict", "lmms", "vlmevalkit"), HARNESS_CASES)
def test_metric_variants_pinned(pred, gold, robust, strict, lmms, vlmevalkit):
    golds = gold if isinstance(gold, list) else [gold]
    assert relaxed_accuracy(pred, golds) == robust
    assert relaxed_accuracy_strict(pred, golds) == strict
    assert lmms_eval_relaxed(pred, golds) == lmms
    assert vlmevalkit_relaxed(pred, golds) == vlmevalkit
    assert get_protocol("lmms-eval").metric(pred, golds) == lmms
    assert get_protocol("vlmevalkit").metric(pred, golds) == vlmevalkit
    assert get_protocol("vlm-tune").metric(pred, golds) == robust


def test_config_choices_are_the_protocols():
    from vlm_tune.config import EvalSection

    assert typing.get_args(EvalSection.model_fields["protocol"].annotation) == PROTOCOL_NAMES


def test_prompts_system_and_decoding_per_protocol():
    from vlm_tune.data.chat import template_problems

    train = ("Be brief.", "{question}\nAnswer with a single word or number.")
    own = resolve("vlm-tune", "idefics3", *train, 7)
    assert (own.system, own.user_template, own.max_new_tokens) == (*train, 7)
    assert not own.differs_from_training
    # lmms-eval's qwen_vl " Answer:" belongs to its `qwen_vl` backend (Qwen-VL 1): Qwen2.5-VL gets the default
    for model_type in ("qwen2_5_vl", "qwen3_vl", "idefics3", None):
        s = resolve("lmms-eval", model_type, *train, 7)
        assert s.user_template == "{question}\nAnswer the question with a single word."
        assert (s.system, s.max_new_tokens, s.model_specific) == (None, 16, None)
        assert s.differs_from_training and s.record()["training_prompt"]["system"] == "Be brief."
    assert resolve("lmms-eval", "qwen2_5_vl", *train, 7).record()["harness_model"] == "qwen2_5_vl"
    plain = resolve("vlmevalkit", "qwen2_5_vl", *train, 7)
    assert plain.user_template == "{question}\nAnswer the question using a single word or phrase."
    assert (plain.system, plain.max_new_tokens) == (None, 2048)
    smol, smol2 = resolve("vlmevalkit", "idefics3", *train, 7), resolve("vlmevalkit", "smolvlm", *train, 7)
    for s in (smol, smol2):
        assert s.user_template.startswith("For the question below, follow the following instructions:\n-The")
        assert s.user_template.endswith(
            "\nQuestion: {question}\nAnswer the question using a single word or phrase."
        )
        assert template_problems(s.user_template) == []
    assert "Don\u2019t include any units" in smol.user_template and "SmolVLM wrapper" in smol.model_specific
    assert "Don't include any units" in smol2.user_template and "SmolVLM2" in smol2.model_specific
    assert smol.user_template.count("\n-") == 10


def test_rendered_prompt_is_the_harness_text(processor):
    """Through SmolVLM's published chat template the user turn is exactly VLMEvalKit's hand-built string."""
    from vlm_tune.data.chat import build_messages

    s = resolve("vlmevalkit", "idefics3", None, "{question}", 16)
    row = {"images": [None], "question": "How many bars?", "answers": ["3"]}
    text = processor.apply_chat_template(
        build_messages(row, s.system, s.user_template, False), add_generation_prompt=True
    )
    assert "User:<image>For the question below, follow" in text
    assert text.endswith(
        "Question: How many bars?\nAnswer the question using a single word or phrase.<end_of_utterance>\nAssistant:"
    )


def test_postprocessing_per_protocol():
    raw = cut_at_end_of_turn("  42 <row_1_col_1>\nThe chart<end_of_utterance><pad><pad>")
    assert raw == "  42 <row_1_col_1>\nThe chart"
    special = ["<row_1_col_1>"]
    assert get_protocol("vlm-tune").postprocess(raw, special) == "42 <row_1_col_1>"  # as before: first line
    assert get_protocol("lmms-eval").postprocess(raw, special) == "  42 \nThe chart"  # raw, nothing stripped
    assert get_protocol("vlmevalkit").postprocess(raw, special) == "42 \nThe chart"


def test_unknown_protocol_is_a_user_error(tmp_path):
    from vlm_tune.cli import main
    from vlm_tune.errors import UserError

    with pytest.raises(UserError, match="lmms-eval"):
        get_protocol("lmms")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("eval: {protocol: lmms}\n")
    assert main(["eval", str(cfg)]) == 2
    assert main(["config", str(cfg), "eval.protocol=vlmevalkit", "eval.export=[lmms-eval]"]) == 0
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(cfg), "--protocol", "lmms"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_eval_under_a_harness_protocol_with_exports(lora_run_copy, capsys):
    """`vlm-tune eval --protocol lmms-eval --export ...` on the tuned tiny model: metrics, records and the
    harnesses' own files agree row for row."""
    from vlm_tune.cli import main

    cfg = str(lora_run_copy / "config.yaml")
    argv = ["eval", cfg, "--protocol", "lmms-eval", "--export", "lmms-eval", "--export", "vlmevalkit"]
    assert main([*argv, "--limit", "4", "--name", "lmms"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = lora_run_copy / "eval" / "lmms"
    m = json.loads((out / "metrics.json").read_text())
    assert printed["protocol"] == m["protocol"]["name"] == "lmms-eval" and printed["score"] == m["score"]
    p = m["protocol"]
    assert (
        p["user_template"].endswith("\nAnswer the question with a single word.")
        and p["system_prompt"] is None
    )
    assert p["decoding"] == {"greedy": True, "max_new_tokens": 16} and p["differs_from_training"] is True
    assert m["image_settings"]["class"].startswith("Idefics3ImageProcessor") and m["image_settings"]["size"]
    assert set(m["by_split"]) == {"test"} and "score" in m["by_split"]["test"]
    recs = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in recs] == [0, 1, 2, 3]
    for r in recs:
        # lmms-eval post-processes nothing but the special tokens its decode skips
        assert r["prediction"] == get_protocol("lmms-eval").postprocess(r["raw"], m["special_tokens_in_raw"])
        assert r["score"] == lmms_eval_relaxed(r["prediction"], r["gold"])
    samples_path = next((out / "lmms-eval").glob("*_samples_chartqa.jsonl"))
    samples = [json.loads(x) for x in samples_path.read_text().splitlines()]
    assert [s["doc_id"] for s in samples] == [r["doc_id"] for r in recs]
    for s, r in zip(samples, recs, strict=True):
        assert s["target"] == r["gold"][0] and s["filtered_resps"] == [r["prediction"]]
        assert s["relaxed_overall"] == r["score"] and s["input"] == p["user_template"].format(
            question=r["question"]
        )
        assert s["relaxed_augmented_split"] == r["score"]  # lmms-eval: any type but human_test
    results = json.loads(next((out / "lmms-eval").glob("*_results.json")).read_text())
    assert results["results"]["chartqa"]["relaxed_overall,none"] == pytest.approx(m["score"])
    with (out / "vlmevalkit" / "vlm-tune_ChartQA_TEST.tsv").open(newline="") as f:
        table = list(csv.DictReader(f, delimiter="\t"))
    assert [t["index"] for t in table] == ["0", "1", "2", "3"]
    assert [t["answer"] for t in table] == [r["gold"][0] for r in recs]  # byte for byte
    assert [t["prediction"] for t in table] == [r["prediction"].strip() for r in recs]
    from vlm_tune.card import build_model_card

    card = build_model_card(lora_run_copy)
    assert "| lmms | lmms-eval | test | 4 |" in card
    assert "Prompt differs from the training prompt in: `lmms` (lmms-eval)." in card
    assert m["exports"] == [
        f"lmms-eval/{samples_path.name}",
        f"lmms-eval/{samples_path.name.replace('samples_chartqa.jsonl', 'results.json')}",
        "vlmevalkit/vlm-tune_ChartQA_TEST.tsv",
        "vlmevalkit/vlm-tune_ChartQA_TEST_acc.csv",
    ]


@pytest.mark.slow
def test_rescore_same_generations_under_each_protocol(lora_run_copy):
    from vlm_tune.report import write_report
    from vlm_tune.rescore import rescore

    final = lora_run_copy / "eval" / "final"
    recs = [json.loads(x) for x in (final / "predictions.jsonl").read_text().splitlines()]
    assert json.loads((final / "metrics.json").read_text())["protocol"]["name"] == "vlm-tune"
    for name in PROTOCOL_NAMES:
        m = rescore(final, name, export=["vlmevalkit"])
        out = lora_run_copy / "eval" / f"final-{name}"
        again = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        assert [a["raw"] for a in again] == [r["raw"] for r in recs]
        proto = get_protocol(name)
        assert [a["prediction"] for a in again] == [proto.postprocess(r["raw"]) for r in recs]
        assert m["score"] == pytest.approx(
            sum(proto.metric(a["prediction"], a["gold"]) for a in again) / len(again)
        )
        assert m["protocol"]["rescored_from"]["protocol"] == "vlm-tune"
        assert (out / "vlmevalkit" / "vlm-tune_ChartQA_TEST_acc.csv").is_file()
    assert [
        json.loads(x)["prediction"]
        for x in (lora_run_copy / "eval" / "final-vlm-tune" / "predictions.jsonl").read_text().splitlines()
    ] == [r["prediction"] for r in recs]
    html = write_report(
        lora_run_copy / "r.html", final, lora_run_copy / "eval" / "final-lmms-eval"
    ).read_text()
    assert "A: protocol vlm-tune · B: protocol lmms-eval (generations of protocol vlm-tune, rescored)" in html
    assert "Protocol score" in html


def test_per_split_scores_for_every_protocol(tmp_path):
    """ChartQA's human / augmented splits are scored apart under each protocol, in metrics and exports."""
    from vlm_tune.evaluate import score
    from vlm_tune.export import write_exports
    from vlm_tune.metrics import aggregate

    rows = [
        {"id": "h0", "question": "q?", "answers": ["2"], "split": "human"},
        {"id": "h1", "question": "q?", "answers": ["Yes"], "split": "human"},
        {"id": "a0", "question": "q?", "answers": ["1,000"], "split": "augmented"},
    ]
    raws = [" 2", "Yes.", "1000"]
    expected = {  # (human, augmented) under each protocol's post-processing and metric
        "vlm-tune": (1.0, 1.0),
        "lmms-eval": (0.5, 0.0),  # " 2" parses (float ignores the space); "Yes." and "1000" do not match
        "vlmevalkit": (0.5, 0.0),
    }
    for name, (human, augmented) in expected.items():
        records = score(rows, raws, name, raw=True, doc_ids=[5, 6, 7])
        by_split = aggregate(records)["by_split"]
        assert (by_split["human"]["score"], by_split["augmented"]["score"]) == (human, augmented), name
    records = score(rows, raws, "lmms-eval", raw=True, doc_ids=[5, 6, 7])
    metrics = {"protocol": resolve("lmms-eval", None, None, "{question}", 16).record()}
    files = write_exports(tmp_path, records, metrics, ["lmms-eval", "vlmevalkit"])
    results = json.loads((tmp_path / files[1]).read_text())["results"]["chartqa"]
    assert (results["relaxed_human_split,none"], results["relaxed_augmented_split,none"]) == (0.5, 0.0)
    samples = [json.loads(x) for x in (tmp_path / files[0]).read_text().splitlines()]
    assert [s["doc"]["type"] for s in samples] == ["human_test", "human_test", "augmented_test"]
    assert [s["doc_id"] for s in samples] == [5, 6, 7] and samples[0][
        "input"
    ] == "q?\nAnswer the question with a single word."
    acc = (tmp_path / files[3]).read_text().splitlines()
    assert acc == ["test_augmented,test_human,Overall", "0.0000,50.0000,33.3333"]


def test_protocol_prompt_and_decoding_reach_generation(tiny_dir, processor, tmp_path):
    """evaluate() hands generation the protocol's prompt and token budget and scores its post-processing."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from vlm_tune.data.collate import make_collator
    from vlm_tune.evaluate import evaluate

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    collator = make_collator(processor, "Be brief.", "{question}\nAnswer with a single word or number.")
    rows = [{"id": "r", "question": "How many bars?", "answers": ["3"], "images": [Image.new("RGB", (8, 8))]}]
    seen = {}

    def fake_generate(
        model, processor, collator, rows, batch_size, max_new_tokens, progress, postprocess, **feeding
    ):
        seen.update(collator=collator, max_new_tokens=max_new_tokens)
        return [postprocess(" 3.<end_of_utterance><end_of_utterance>") for _ in rows]

    m = evaluate(
        model, processor, collator, rows, tmp_path / "v", 4, 5, generate=fake_generate, protocol="vlmevalkit"
    )
    assert seen["max_new_tokens"] == 2048 and seen["collator"].system is None
    assert seen["collator"].user_template == resolve("vlmevalkit", "idefics3", None, "", 1).user_template
    assert m["protocol"]["model_specific_prompt"].startswith("VLMEvalKit SmolVLM wrapper")
    rec = json.loads((tmp_path / "v" / "predictions.jsonl").read_text())
    assert (rec["raw"], rec["prediction"], rec["score"], rec["doc_id"]) == (" 3.", "3.", 1.0, 0)
    m = evaluate(model, processor, collator, rows, tmp_path / "t", 4, 5, generate=fake_generate)
    assert seen["collator"] is collator and seen["max_new_tokens"] == 5  # vlm-tune: the run's own, unchanged
    assert m["protocol"]["differs_from_training"] is False and m["score"] == 1.0


@pytest.mark.slow
def test_base_model_zero_shot_under_a_protocol(cache_dir, tmp_path):
    """`vlm-tune eval --base --protocol lmms-eval`: a plain model, no adapter (the published-number path)."""
    from vlm_tune.inference import run_eval

    from .conftest import tiny_cfg

    m = run_eval(tiny_cfg(cache_dir, tmp_path / "run"), base=True, limit=2, protocol="lmms-eval")
    assert m["n"] == 2 and m["protocol"]["name"] == "lmms-eval" and m["protocol"]["harness_model"] is None
    assert (tmp_path / "run" / "eval" / "base" / "predictions.jsonl").is_file()
