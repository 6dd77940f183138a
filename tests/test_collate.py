"""Supervision is exact: only answer tokens + end-of-turn are labelled; never image tokens or prompt."""

import pytest
import torch
from PIL import Image

from vlm_tune.data.collate import IGNORE_INDEX, ChatCollator, count_tokens, image_token_ids

TEMPLATE = "{question}\nAnswer with a single word or number."


def img(w=64, h=64, color=(200, 30, 30)):
    return Image.new("RGB", (w, h), color)


def supervised_text(processor, batch, b):
    ids = batch["input_ids"][b]
    labels = batch["labels"][b]
    return processor.tokenizer.decode(ids[labels != IGNORE_INDEX].tolist(), skip_special_tokens=False)


@pytest.fixture(scope="module", params=["tiny", "smollm2-135m"])
def processor(request, tiny_dir):
    """The tiny model's processor, and the real SmolLM2 tokenizer + SmolVLM tokens (builtin:smollm2-135m)."""
    from transformers import AutoProcessor

    if request.param == "tiny":
        return AutoProcessor.from_pretrained(tiny_dir)
    return AutoProcessor.from_pretrained(request.getfixturevalue("real_decoder_dir"))


@pytest.fixture
def collator(processor):
    return ChatCollator(processor, "You read charts.", TEMPLATE, max_length=4096)


def row(answer, images, question="How many bars are there?", rid="r"):
    return {"id": rid, "images": images, "question": question, "answers": [answer]}


def test_one_image_only_answer_supervised(processor, collator):
    batch = collator([row("3", [img()])])
    assert supervised_text(processor, batch, 0) == " 3<end_of_utterance>"
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    # a 64-px chart = 2x2 tiles + the global view, image_seq_len tokens each (tiny: 4, smollm2-135m: 16)
    assert (ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum() == 5 * processor.image_seq_len
    for t in image_token_ids(processor):
        assert not ((ids == t) & (labels != IGNORE_INDEX)).any()


def test_input_ids_equal_processor_on_chat_template(processor, collator):
    """Our batch is exactly what the processor makes of the rendered conversation."""
    r = row("red", [img(), img(40, 64)])
    text = processor.apply_chat_template(
        [
            {"role": "system", "content": [{"type": "text", "text": "You read charts."}]},
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "image"},
                    {"type": "text", "text": TEMPLATE.format(question=r["question"])},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        ],
        tokenize=False,
    )
    ref = processor(text=[text], images=[r["images"]], return_tensors="pt")
    batch = collator([r])
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["pixel_values"], ref["pixel_values"])


def test_several_images_and_padded_batch(processor, collator):
    rows = [
        row("2", [img()]),
        row("blue", [img(), img(32, 32), img(64, 40)], rid="b"),
        row("Democrat (scores 60 to 100)", [img(48, 64)], question="Which party? " * 5, rid="c"),
    ]
    batch = collator(rows)
    assert batch["input_ids"].shape[0] == 3
    assert batch["attention_mask"].sum(1).unique().numel() == 3  # really padded
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == IGNORE_INDEX).all()
    assert [supervised_text(processor, batch, b) for b in range(3)] == [
        " 2<end_of_utterance>",
        " blue<end_of_utterance>",
        " Democrat (scores 60 to 100)<end_of_utterance>",
    ]
    frac = (batch["labels"] != IGNORE_INDEX).sum() / batch["attention_mask"].sum()
    assert 0 < frac < 0.2


def test_multi_turn_supervises_every_answer(processor, collator):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many bars?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "4"}]},
        {"role": "user", "content": [{"type": "text", "text": "Which is tallest?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "B"}]},
    ]
    r = {
        "id": "m",
        "images": [img()],
        "question": "Which is tallest?",
        "answers": ["B"],
        "messages": messages,
    }
    batch = collator([r])
    assert supervised_text(processor, batch, 0) == " 4<end_of_utterance> B<end_of_utterance>"


def test_generation_batch_is_training_prompt_prefix(processor, collator):
    r = row("3", [img()])
    gen = collator.generation_batch([r])
    train = collator([r])
    n = gen["input_ids"].shape[1]
    assert torch.equal(gen["input_ids"][0], train["input_ids"][0, :n])
    assert (train["labels"][0, :n] == IGNORE_INDEX).all()
    assert (train["labels"][0, n:] != IGNORE_INDEX).any()


def test_generation_batch_left_padded(processor, collator):
    gen = collator.generation_batch([row("3", [img()]), row("3", [img(), img()], question="long " * 10)])
    assert gen["attention_mask"][0, 0] == 0 and gen["attention_mask"][0, -1] == 1


def test_count_tokens_matches_collator(processor, collator):
    for images in ([img()], [img(), img(32, 20)], [img(100, 37)]):
        r = row("42", images)
        counts = count_tokens(processor, collator, r)
        batch = collator([r])
        assert counts["total"] == batch["input_ids"].shape[1]
        assert counts["supervised"] == int((batch["labels"] != IGNORE_INDEX).sum())
        image_ids = torch.tensor(sorted(image_token_ids(processor)))
        assert counts["image"] <= int(torch.isin(batch["input_ids"], image_ids).sum()) + 2 * len(images) + 2


def test_overlong_batch_is_an_error_not_truncation(processor):
    from vlm_tune.errors import UserError

    collator = ChatCollator(processor, None, TEMPLATE, max_length=20)
    with pytest.raises(UserError, match="over train.max_length=20"):
        collator([row("3", [img()])])
