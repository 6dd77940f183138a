"""The run's answer format (plain | tagged) in the prompt contract: evaluation, eval/predict/rescore of a saved
adapter and the model card's snippet take the answer exactly as the GRPO reward does (`protocols.answer_of`)."""

from __future__ import annotations

import ast
import json
import re
import shutil

import pytest

from vlm_tune.data.chat import load_prompt, save_prompt
from vlm_tune.errors import UserError
from vlm_tune.evaluate import score
from vlm_tune.protocols import answer_of, get_protocol, resolve
from vlm_tune.rewards import metric_reward

from .conftest import tiny_cfg

GOLD = ["7"]
# raw generation (special tokens kept) → the tagged answer
TAGGED_CASES = [
    ("<answer>7</answer>", "7"),
    ("7", None),  # no tags: no answer (an empty prediction, scored 0)
    ("<answer>3</answer> then <answer>7</answer>", "7"),  # two tag pairs: the last
    ("The bars read 3, 5, 7; the highest is 7.\n<answer> 7 </answer>", "7"),  # reasoning before the tags
    ("think <answer>7</answer><end_of_utterance>", "7"),  # end-of-turn token after
    ("<answer>7</answer><end_of_utterance><answer>3</answer>", "7"),  # nothing after the end of turn counts
    ("<answer>\nAssistant: 7\nmore</answer>", "7"),  # the vlm-tune post-processing of the tag content
    ("<answer>7", None),  # an unclosed tag is no answer
    ("<answer></answer>", ""),
    ("<answer>seven</answer>", "seven"),
]
RAWS = [raw for raw, _ in TAGGED_CASES] + [" 7.<end_of_utterance>", "Assistant: 7\nmore", "3"]


def rows_for(raws: list[str]) -> list[dict]:
    return [{"id": str(i), "question": "Which?", "answers": GOLD} for i in range(len(raws))]


def test_tagged_answers_of_the_cases():
    for raw, expected in TAGGED_CASES:
        assert answer_of(raw, "tagged") == expected, raw


@pytest.mark.parametrize("answer_format", ["plain", "tagged"])
def test_eval_score_and_reward_take_the_same_answer(answer_format):
    """For the same raw strings, `score()`'s prediction and scores are the reward's answer and rewards."""
    records = score(rows_for(RAWS), RAWS, None, raw=True, answer_format=answer_format)
    for raw, rec in zip(RAWS, records, strict=True):
        assert rec["raw"] == raw  # the whole generation is kept
        assert rec["prediction"] == (answer_of(raw, answer_format) or ""), raw
        assert rec["exact"] == metric_reward(raw, GOLD, "exact_match", answer_format), raw
        assert rec["relaxed"] == metric_reward(raw, GOLD, "relaxed_accuracy", answer_format), raw
    if answer_format == "plain":  # plain is the vlm-tune post-processing as before, unchanged
        assert [r["prediction"] for r in records] == [get_protocol("vlm-tune").postprocess(r) for r in RAWS]
    else:
        assert [r["prediction"] for r in records[: len(TAGGED_CASES)]] == [e or "" for _, e in TAGGED_CASES]
        untagged = records[RAWS.index("7")]
        assert (untagged["exact"], untagged["relaxed"], untagged["relaxed_strict"], untagged["score"]) == (
            0,
        ) * 4


@pytest.mark.parametrize("name", ["lmms-eval", "vlmevalkit"])
def test_the_harnesses_score_the_whole_generation_whatever_the_format(name):
    plain = score(rows_for(RAWS), RAWS, name, raw=True)
    assert score(rows_for(RAWS), RAWS, name, raw=True, answer_format="tagged") == plain
    record = resolve(name, None, None, "{question}", 16, "tagged").record()
    assert record["answer_format"] == "tagged" and "not applied" in record["postprocessing"]


def test_protocol_record_names_the_answer_format():
    plain = resolve(None, None, None, "{question}", 16).record()
    assert plain["answer_format"] == "plain"
    assert plain["postprocessing"] == get_protocol("vlm-tune").postprocessing  # plain: as before
    tagged = resolve(None, None, None, "{question}", 16, "tagged").record()
    assert tagged["postprocessing"].startswith("the text inside the last <answer>...</answer>")
    with pytest.raises(UserError, match="plain, tagged"):
        resolve(None, None, None, "{question}", 16, "xml")


def test_prompt_json_round_trip_and_an_old_one_reads_as_plain(tmp_path):
    save_prompt(tmp_path, "Be brief.", "{question}", "tagged")
    assert load_prompt(tmp_path) == {
        "system": "Be brief.",
        "user_template": "{question}",
        "answer_format": "tagged",
    }
    save_prompt(tmp_path, None, "{question}")  # an SFT run
    assert load_prompt(tmp_path)["answer_format"] == "plain"
    (tmp_path / "prompt.json").write_text(json.dumps({"system": None, "user_template": "{question}"}))
    assert load_prompt(tmp_path)["answer_format"] == "plain"


def test_the_run_answer_format_reaches_prompt_json_and_every_in_run_eval(cache_dir, tmp_path, monkeypatch):
    """rl.answer_format of a GRPO run is saved and used by eval/start, during and final; an SFT run is plain."""
    from vlm_tune import run_steps
    from vlm_tune.rl_config import run_answer_format

    sft = tiny_cfg(cache_dir, tmp_path / "a", "rl.answer_format=tagged")  # set, but an SFT run: plain
    grpo = tiny_cfg(
        cache_dir, tmp_path / "b", "train.stage=grpo", "rl.answer_format=tagged", "rl.max_completion_length=3"
    )
    assert run_answer_format(tiny_cfg(cache_dir, tmp_path / "c", "train.stage=grpo")) == "plain"
    assert (run_answer_format(sft), run_answer_format(grpo)) == ("plain", "tagged")
    seen = []
    monkeypatch.setattr(run_steps, "evaluate_rows", lambda *a, answer_format, **k: seen.append(answer_format))
    for cfg in (sft, grpo):
        run_steps.evaluate_in_run(None, None, None, [], cfg, tmp_path / "e", protocol=True)
        run_steps.evaluate_in_run(None, None, None, [], cfg, tmp_path / "e")
    assert seen == ["plain", "plain", "tagged", "tagged"]

    class Saved:
        def save_pretrained(self, path, **_):
            path.mkdir(parents=True, exist_ok=True)

    run_steps.save_final(Saved(), Saved(), grpo, tmp_path / "final")
    assert load_prompt(tmp_path / "final")["answer_format"] == "tagged"


def fake_generation(raws: list[str]):
    """A stand-in for `generate_answers`: the raws (cycled), through the caller's post-processing."""

    def generate(model, processor, collator, rows, batch_size=16, max_new_tokens=16, progress=None, **kw):
        post = kw.get("postprocess") or (lambda raw: raw)
        return [post(raws[i % len(raws)]) for i in range(len(rows))]

    return generate


def test_eval_predict_and_rescore_of_a_tagged_saved_model_extract(cache_dir, tiny_dir, tmp_path, monkeypatch):
    """A tagged prompt.json read by `load_for_inference`: `vlm-tune eval`, `predict` and `rescore` take the answer
    as the reward does; the same model with an old prompt.json (no answer_format) scores the whole text."""
    from PIL import Image

    from vlm_tune import evaluate as evaluate_module
    from vlm_tune.inference import load_for_inference, predict, run_eval
    from vlm_tune.rescore import rescore

    raws = [raw.split("<end_of_utterance>")[0] for raw, _ in TAGGED_CASES]  # as generation cuts them
    monkeypatch.setattr(evaluate_module, "generate_answers", fake_generation(raws))
    model_dir = tmp_path / "final"
    shutil.copytree(tiny_dir, model_dir)
    save_prompt(model_dir, None, "{question}", "tagged")
    cfg = tiny_cfg(cache_dir, tmp_path / "run")
    metrics = run_eval(cfg, adapter=str(model_dir), limit=8, name="tagged")
    assert metrics["protocol"]["answer_format"] == "tagged"
    recs = [json.loads(x) for x in (tmp_path / "run/eval/tagged/predictions.jsonl").read_text().splitlines()]
    assert [r["raw"] for r in recs] == raws[:8]
    assert [r["prediction"] for r in recs] == [answer_of(raw, "tagged") or "" for raw in raws[:8]]
    for r in recs:
        assert r["relaxed"] == metric_reward(r["raw"], r["gold"], "relaxed_accuracy", "tagged")
    again = rescore(tmp_path / "run/eval/tagged", "vlm-tune")
    assert again["protocol"]["answer_format"] == "tagged" and again["exact_match"] == metrics["exact_match"]
    lmms = tmp_path / "run/eval/tagged-lmms-eval"
    rescore(tmp_path / "run/eval/tagged", "lmms-eval")
    assert [
        json.loads(x)["prediction"] for x in (lmms / "predictions.jsonl").read_text().splitlines()
    ] == raws[:8]

    model, processor, prompt = load_for_inference(model_dir)
    items = [{"images": [Image.new("RGB", (8, 8))], "question": "Which?"}] * 3
    assert predict(model, processor, prompt, items) == ["7", "", "7"]

    (model_dir / "prompt.json").write_text(json.dumps({"system": None, "user_template": "{question}"}))
    metrics = run_eval(cfg, adapter=str(model_dir), limit=8, name="old")
    assert metrics["protocol"]["answer_format"] == "plain"
    recs = [json.loads(x) for x in (tmp_path / "run/eval/old/predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in recs] == [get_protocol("vlm-tune").postprocess(raw) for raw in raws[:8]]
    (model_dir / "prompt.json").write_text(
        json.dumps({"system": None, "user_template": "{q}", "answer_format": 1})
    )
    with pytest.raises(UserError, match="answer_format"):
        load_for_inference(model_dir)


def test_card_snippet_of_a_tagged_run_extracts_the_answer_as_evaluation_does(tmp_path):
    from vlm_tune.card import build_model_card

    from .test_hub import REPO, make_run, python_block

    run = make_run(tmp_path / "plain")
    plain = build_model_card(run, REPO)
    assert "answer_in" not in plain and "Answer format" not in plain
    save_prompt(run / "final", None, "{question}", "tagged")
    card = build_model_card(run, REPO)
    assert "Answer format: tagged" in card
    code = python_block(card)
    assert "import re" in code and "return answer_in(processor.decode(new, skip_special_tokens=True))" in code
    assert "max_new_tokens=16," in code  # the run's eval.max_new_tokens (16 in this config)
    tree = ast.parse(code)  # the snippet parses; run its answer_in on strings
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "answer_in")
    namespace: dict = {"re": re}
    exec(ast.get_source_segment(code, fn), namespace)
    for raw in RAWS:
        if "<end_of_utterance>" in raw:  # the snippet's decode skips special tokens; generation stops there
            raw = raw.split("<end_of_utterance>")[0]
        assert namespace["answer_in"](raw) == (answer_of(raw, "tagged") or ""), raw


@pytest.mark.slow
def test_a_tagged_grpo_run_scores_every_eval_as_its_reward(cache_dir, tmp_path):
    """A tagged GRPO run (from the base, one step): prompt.json, eval/start, eval/during, eval/final and
    `vlm-tune eval` of its adapter take the tagged answer (the tiny model writes no tags: empty, scored 0)."""
    from vlm_tune.inference import run_eval
    from vlm_tune.train import train

    cfg = tiny_cfg(
        cache_dir,
        tmp_path / "rl",
        "train.stage=grpo",
        "rl.answer_format=tagged",
        "rl.num_generations=2",
        "rl.prompts_per_step=2",
        "rl.max_completion_length=3",
        "rl.steps=1",
        "rl.rewards={exact_match: 1.0}",
        "eval.baselines=[]",
        "eval.every_steps=1",
        "eval.subset_size=4",
        "train.save_steps=1",
    )
    run = train(cfg)
    assert load_prompt(run / "final")["answer_format"] == "tagged"
    for name in ("start", "during", "final"):
        metrics = json.loads((run / "eval" / name / "metrics.json").read_text())
        assert metrics["protocol"]["answer_format"] == "tagged", name
        recs = [json.loads(x) for x in (run / "eval" / name / "predictions.jsonl").read_text().splitlines()]
        for r in recs:
            assert r["prediction"] == (answer_of(r["raw"], "tagged") or ""), name
            assert r["exact"] == metric_reward(r["raw"], r["gold"], "exact_match", "tagged"), name
    again = run_eval(cfg, name="again")
    final = [json.loads(x) for x in (run / "eval" / "final" / "predictions.jsonl").read_text().splitlines()]
    assert again["protocol"]["answer_format"] == "tagged"
    recs = [json.loads(x) for x in (run / "eval" / "again" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["raw"], r["prediction"]) for r in recs] == [(r["raw"], r["prediction"]) for r in final]
    plain = get_protocol("vlm-tune").postprocess
    assert any(r["prediction"] != plain(r["raw"]) for r in final)  # not what a plain run would have scored
