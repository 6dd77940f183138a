"""PaliGemma 2: a prefix-LM. Supervision follows the processor's `suffix=` convention (no chat template),
the prefix is attended to in full, the resolution is fixed by the checkpoint, and the card's snippet builds
the same prefix. The shared per-family tests (detection, LoRA presets, generation prefix, pre-flight count,
frozen tower) are in tests/test_families.py."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from vlm_tune.config import build_config
from vlm_tune.data.collate import IGNORE_INDEX, count_tokens, make_collator
from vlm_tune.data.prefix_lm import PrefixLMCollator
from vlm_tune.errors import UserError
from vlm_tune.families import load_processor as load_family_processor
from vlm_tune.families.paligemma import CARD_INPUT_LINES, FAMILY

TEMPLATE = "{question}\nAnswer with a single word or number."


@pytest.fixture(scope="module")
def pg_dir(tmp_path_factory):
    return FAMILY.build_stand_in(tmp_path_factory.mktemp("paligemma") / "tiny-paligemma")


@pytest.fixture(scope="module")
def processor(pg_dir):
    return load_family_processor(str(pg_dir))


def img(w=64, h=64, color=(200, 30, 30)):
    return Image.new("RGB", (w, h), color)


def row(answer, images, question="How many bars are there?", rid="r", messages=None):
    r = {"id": rid, "images": images, "question": question, "answers": [answer]}
    if messages:
        r["messages"] = messages
    return r


def decode(processor, ids):
    return processor.tokenizer.decode(ids.tolist(), skip_special_tokens=False)


ROWS = [
    row("3", [img()]),
    row("Democrat (scores 60 to 100)", [img(), img(32, 48)], question="Which party? " * 4, rid="b"),
    row(" 4.5% ü 東", [img(100, 37), img(), img(20, 20)], rid="c"),  # kept byte for byte (byte fallback)
]


# -- supervision --------------------------------------------------------------------------------------------
def test_collator_is_the_prefix_lm_one(processor):
    assert FAMILY.prefix_lm and FAMILY.end_of_turn == "<eos>"
    assert isinstance(make_collator(processor, None, TEMPLATE), PrefixLMCollator)


@pytest.mark.parametrize("system", [None, "You read charts."])
def test_supervised_tokens_are_exactly_answer_and_eos(processor, system):
    collator = make_collator(processor, system, TEMPLATE, max_length=4096)
    batch = collator(ROWS)  # one image, several images; right-padded
    lengths = batch["attention_mask"].sum(1)
    assert lengths.unique().numel() == 3 and batch["attention_mask"][lengths.argmin(), -1] == 0
    image_id = processor.image_token_id
    for b, r in enumerate(ROWS):
        ids, labels, types = batch["input_ids"][b], batch["labels"][b], batch["token_type_ids"][b]
        real = batch["attention_mask"][b].bool()
        assert decode(processor, ids[labels != IGNORE_INDEX]) == r["answers"][0] + "<eos>"
        # the prefix: every image's tokens, <bos>, [system "\n"] user text, "\n"; all of it -100
        n_prefix = int(((types == 0) & real).sum())
        user = TEMPLATE.format(question=r["question"])
        expected = "<bos>" + (f"{system}\n" if system else "") + user + "\n"
        prefix = ids[:n_prefix]
        assert (prefix[: 64 * len(r["images"])] == image_id).all()
        assert decode(processor, prefix[64 * len(r["images"]) :]) == expected
        assert (labels[:n_prefix] == IGNORE_INDEX).all()
        # token_type_ids: 0 on the prefix, 1 exactly on the supervised suffix, 0 on padding
        assert torch.equal(types == 1, labels != IGNORE_INDEX)
        assert (types[:n_prefix] == 0).all() and (types[~real] == 0).all()
        assert (labels[~real] == IGNORE_INDEX).all() and (labels[ids == image_id] == IGNORE_INDEX).all()
    # the same labels the processor builds itself for prefix + suffix
    own = processor(
        text=[collator.prefix_and_answer(r)[0] for r in ROWS],
        images=[r["images"] for r in ROWS],
        suffix=[r["answers"][0] for r in ROWS],
        padding=True,
        return_tensors="pt",
    )
    assert torch.equal(own["input_ids"], batch["input_ids"]) and torch.equal(own["labels"], batch["labels"])


def test_generation_batch_is_the_training_prefix(processor):
    collator = make_collator(processor, "sys", TEMPLATE, max_length=4096)
    gen = collator.generation_batch(ROWS)
    assert "labels" not in gen and (gen["token_type_ids"] == 0).all()
    assert gen["attention_mask"][0, 0] == 0 and gen["attention_mask"][:, -1].all()  # left-padded
    for b, r in enumerate(ROWS):
        prompt = gen["input_ids"][b][gen["attention_mask"][b].bool()]
        train = collator([r])
        n = int((train["token_type_ids"][0] == 0).sum())
        assert torch.equal(train["input_ids"][0, :n], prompt)


def test_preflight_count_equals_collated_length(processor):
    for system in (None, "sys"):
        collator = make_collator(processor, system, TEMPLATE, max_length=4096)
        for r in ROWS:
            counts = count_tokens(processor, collator, r)
            batch = collator([r])
            assert counts["total"] == batch["input_ids"].shape[1]
            assert counts["image"] == 64 * len(r["images"])
            assert counts["supervised"] == int((batch["labels"] != IGNORE_INDEX).sum())


def test_a_single_exchange_conversation_is_the_same_prefix_and_multi_turn_is_refused(processor):
    collator = make_collator(processor, None, TEMPLATE)
    plain = row("7", [img()], question="How many bars?")
    conv = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": TEMPLATE.format(question="How many bars?")},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "7"}]},
    ]
    assert torch.equal(
        collator([plain])["input_ids"], collator([row("7", [img()], messages=conv)])["input_ids"]
    )
    multi = conv + [
        {"role": "user", "content": [{"type": "text", "text": "Which is tallest?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "B"}]},
    ]
    with pytest.raises(UserError, match=r"row m7: PaliGemma is a prefix-LM without turns") as err:
        collator([row("B", [img()], rid="m7", messages=multi)])
    assert "one row per question" in str(err.value)
    with pytest.raises(UserError, match="row m7"):
        count_tokens(processor, collator, row("B", [img()], rid="m7", messages=multi))


# -- attention ----------------------------------------------------------------------------------------------
def test_training_forward_attends_to_the_prefix_in_full_and_causally_to_the_suffix(pg_dir, processor):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(pg_dir).eval()
    collator = make_collator(processor, None, "{question}")
    a = collator([row("12 red", [img()], question="bars red")])
    b = collator([row("12 red", [img()], question="bars blue")])  # a later prefix token differs
    c = collator([row("12 blue", [img()], question="bars red")])  # the last answer word differs
    assert a["input_ids"].shape == b["input_ids"].shape == c["input_ids"].shape
    types = a["token_type_ids"][0]
    n_prefix = int((types == 0).sum())
    changed = (a["input_ids"][0] != b["input_ids"][0]).nonzero().flatten().tolist()
    first_change = changed[0]
    assert first_change < n_prefix and first_change > 64  # inside the prompt text, after images and <bos>
    answer_change = (a["input_ids"][0] != c["input_ids"][0]).nonzero().flatten().tolist()[0]
    assert answer_change > n_prefix + 1

    def hidden(batch, **drop):
        batch = {k: v for k, v in batch.items() if k not in drop and k != "labels"}
        with torch.no_grad():
            return model(**batch, output_hidden_states=True).hidden_states[-1][0]

    ha, hb, hc = hidden(a), hidden(b), hidden(c)
    early = 64  # <bos>, before the changed prompt token
    assert not torch.allclose(ha[early], hb[early])  # bidirectional over the prefix
    assert not torch.allclose(ha[:64], hb[:64])  # the image tokens see the question too
    assert torch.allclose(ha[:answer_change], hc[:answer_change])  # causal over the suffix
    assert not torch.allclose(ha[answer_change], hc[answer_change])
    # without token_type_ids the model is causal everywhere: the difference above is the prefix-LM mask
    pa, pb = hidden(a, token_type_ids=1), hidden(b, token_type_ids=1)
    assert torch.allclose(pa[:first_change], pb[:first_change])


# -- resolution ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override",
    [
        "model.image.longest_edge=128",
        "model.image.tile_size=32",
        "model.image.do_image_splitting=false",
        "model.image.min_pixels=4096",
        "model.image.max_pixels=4096",
    ],
)
def test_every_resolution_knob_is_refused_naming_the_checkpoints(pg_dir, override):
    from vlm_tune.model import load_processor

    cfg = build_config({"model": {"name_or_path": str(pg_dir)}}, [override])
    with pytest.raises(UserError) as err:
        load_processor(str(pg_dir), cfg)
    msg = str(err.value)
    key = override.split("=")[0]
    assert msg.startswith(key) and "fixed" in msg and "checkpoint" in msg
    assert all(s in msg for s in ("224", "448", "896"))


def test_longest_edge_equal_to_the_fixed_size_changes_nothing(pg_dir, processor):
    from vlm_tune.model import load_processor

    cfg = build_config({"model": {"name_or_path": str(pg_dir)}}, ["model.image.longest_edge=64"])
    p = load_processor(str(pg_dir), cfg)
    assert p.image_processor.size == processor.image_processor.size == {"height": 64, "width": 64}
    assert FAMILY.card_image_lines({"longest_edge": 64}) == []


# -- model card ---------------------------------------------------------------------------------------------
def test_card_snippet_builds_the_generation_prefix(processor):
    """The card's input lines, run as written, give the exact ids and token types vlm-tune generates from."""
    from vlm_tune.card_snippet import model_card_snippet as _snippet

    code = _snippet("ORG/NAME", "google/paligemma2-3b-pt-448", {"model": {}}, True, FAMILY)
    assert "apply_chat_template" not in "\n".join(code)
    start = code.index("def answer(images, question):") + 1
    assert code[start : start + len(CARD_INPUT_LINES)] == list(CARD_INPUT_LINES)
    body = "\n".join(CARD_INPUT_LINES)
    for system in (None, "You read charts."):
        prompt = {"system": system, "user_template": TEMPLATE}
        scope = {"processor": processor, "prompt": prompt, "model": SimpleNamespace(device="cpu")}
        exec(f"def build(images, question):\n{body}\n    return inputs", scope)
        images = [img(), img(30, 50)]
        inputs = scope["build"](images, "How many bars?")
        gen = make_collator(processor, system, TEMPLATE).generation_batch([row("", images, "How many bars?")])
        assert torch.equal(inputs["input_ids"], gen["input_ids"])
        assert torch.equal(inputs["token_type_ids"], gen["token_type_ids"])


# -- training, eval, predict, card --------------------------------------------------------------------------
@pytest.mark.slow
def test_three_steps_train_decoder_and_projector_then_eval_predict_and_card(pg_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from vlm_tune.card import build_model_card
    from vlm_tune.inference import load_for_inference, predict
    from vlm_tune.metrics import clean_generation
    from vlm_tune.train import train

    before = {n: p.clone() for n, p in AutoModelForImageTextToText.from_pretrained(pg_dir).named_parameters()}
    raw = {
        "run": {"output_dir": str(tmp_path / "run"), "seed": 0},
        "model": {"name_or_path": str(pg_dir)},
        "data": {"synthetic": {"n_train": 12, "n_test": 4, "seed": 1}},
        "prompt": {"system": "You read charts.", "user_template": TEMPLATE},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["decoder", "projector"]},
        "train": {"batch_size": 4, "max_steps": 3, "save_steps": 3, "learning_rate": 1e-2, "max_length": 256},
        "eval": {"batch_size": 4, "max_new_tokens": 3, "baselines": []},
        "logging": {"progress": False},
    }
    run = train(build_config(raw, []))
    adapter = load_file(str(run / "final" / "adapter_model.safetensors"))
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert all(v.abs().sum() > 0 for v in lora_b.values())  # B starts at zero: any change is training
    assert any(".language_model.layers." in k for k in lora_b)
    assert any(".multi_modal_projector.linear." in k for k in lora_b)
    assert not any(".vision_tower." in k for k in adapter)
    after = dict(AutoModelForImageTextToText.from_pretrained(pg_dir).named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # frozen weights untouched on disk

    metrics = json.loads((run / "eval" / "final" / "metrics.json").read_text())
    assert metrics["n"] == 4
    preds = [
        json.loads(line) for line in (run / "eval" / "final" / "predictions.jsonl").read_text().splitlines()
    ]
    model, processor, prompt = load_for_inference(run / "final")
    assert type(processor).__name__ == "PaliGemmaProcessor"
    from vlm_tune.data.sources import load_split, prepare_split

    cfg = build_config(raw, [])
    rows = prepare_split(load_split(cfg.data, cfg.data.eval_split, cfg.model.cache_dir), "error", "skip")
    test_rows = [rows.rowset.row(i) for i in rows.indices]
    by_id = {p["id"]: p["prediction"] for p in preds}
    answers = predict(
        model,
        processor,
        prompt,
        [{"images": r["images"], "question": r["question"]} for r in test_rows],
        3,
        batch_size=1,
    )
    assert answers == [by_id[r["id"]] for r in test_rows]  # one at a time == the eval's left-padded batch

    # the model card's snippet (transformers + peft only), run as written on the local run, answers the same
    image = tmp_path / "chart.png"
    test_rows[0]["images"][0].save(image)
    card = build_model_card(run)
    snippet = card.split("```python\n", 1)[1].split("\n```", 1)[0]
    snippet = snippet.replace('repo = "ORG/NAME"', f"repo = {str(run / 'final')!r}").rsplit("\nprint(", 1)[0]
    snippet = snippet.replace("max_new_tokens=16", "max_new_tokens=3")
    snippet = snippet.replace("skip_special_tokens=True", "skip_special_tokens=False")
    question = test_rows[0]["question"]
    snippet += f"\nprint(repr(answer([Image.open({str(image)!r}).convert('RGB')], {question!r})))\n"
    (tmp_path / "snippet.py").write_text(snippet)
    r = subprocess.run(
        [sys.executable, str(tmp_path / "snippet.py")], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    import ast

    from_snippet = ast.literal_eval(r.stdout.strip().splitlines()[-1])
    assert clean_generation(from_snippet) == answers[0]


def test_sdpa_means_sdpa_for_siglip_and_eager_for_gemma2(pg_dir):
    """Gemma 2 has no sdpa kernel: the default model.attn_implementation=sdpa must still load PaliGemma 2."""
    from vlm_tune.model import load_model

    model = load_model(str(pg_dir), build_config({"model": {"name_or_path": str(pg_dir)}}, []))
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert model.config.text_config._attn_implementation == "eager"
    cfg = build_config(
        {"model": {"name_or_path": str(pg_dir)}}, ["model.attn_implementation=flash_attention_2"]
    )
    with pytest.raises(UserError, match="model.attn_implementation=flash_attention_2: PaliGemma"):
        load_model(str(pg_dir), cfg)


def test_a_generation_ends_at_eos():
    """A batched PaliGemma generation decodes as ANSWER<eos><pad>...: the answer is cut at <eos>."""
    from vlm_tune.metrics import clean_generation

    assert clean_generation("4.5%<eos><pad><pad>") == "4.5%"
