"""Gemma 3 beyond the shared family tests: its template, one <bos>, trimmed answers refused, bidirectional
attention among an image's soft tokens in training, the in-context placeholder expansion, pan-and-scan."""

import pytest
import torch
from PIL import Image

from vlm_tune.config import build_config
from vlm_tune.data.chat import build_messages
from vlm_tune.data.collate import IGNORE_INDEX, ChatCollator, count_tokens
from vlm_tune.errors import UserError
from vlm_tune.families import load_processor as load_family_processor
from vlm_tune.families.gemma3 import FAMILY, num_crops

TEMPLATE = "{question}\nAnswer with a single word or number."


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    return FAMILY.build_stand_in(tmp_path_factory.mktemp("gemma3") / "tiny-gemma3")


@pytest.fixture(scope="module")
def processor(stand_in):
    return load_family_processor(str(stand_in))


def img(w=64, h=64, color=(200, 30, 30)):
    return Image.new("RGB", (w, h), color)


def row(answer, images, question="How many bars?", rid="r"):
    return {"id": rid, "images": images, "question": question, "answers": [answer]}


def test_template_renders_the_gemma_format(processor):
    """System folded into the first user turn, `model` role, one <start_of_image> per image, trimmed text."""
    collator = ChatCollator(processor, "You read charts.", TEMPLATE)
    text, spans = collator.answer_spans(
        [
            {"role": "system", "content": [{"type": "text", "text": "You read charts."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " How many? "}]},
            {"role": "assistant", "content": [{"type": "text", "text": "3"}]},
        ]
    )
    assert text == (
        "<bos><start_of_turn>user\nYou read charts.\n\n<start_of_image>How many?<end_of_turn>\n"
        "<start_of_turn>model\n3<end_of_turn>\n"
    )
    assert [text[a:b] for a, b in spans] == ["3<end_of_turn>"]


def test_one_bos_in_training_and_generation_batches(processor):
    """The template writes <bos> and Gemma's tokenizer adds one too: the collator must keep only one."""
    bos = processor.tokenizer.bos_token_id
    assert processor.tokenizer("x")["input_ids"][0] == bos  # the tokenizer does add one on its own
    collator = ChatCollator(processor, None, TEMPLATE)
    rows = [row("3", [img()]), row("7", [img(), img(40, 64)], question="long " * 10, rid="b")]
    train = collator(rows)
    assert ((train["input_ids"] == bos).sum(1) == 1).all() and (train["input_ids"][:, 0] == bos).all()
    gen = collator.generation_batch(rows)
    assert ((gen["input_ids"] == bos).sum(1) == 1).all()


@pytest.mark.parametrize("answer", [" 42", "42 ", "\n42", "42\n"])
def test_answer_the_template_would_trim_is_refused_naming_the_row(processor, answer):
    collator = ChatCollator(processor, None, TEMPLATE)
    r = row(answer, [img()], rid="row-17")
    for build in (lambda: count_tokens(processor, collator, r), lambda: collator([r])):
        with pytest.raises(UserError, match=r"row row-17: .*changes the answer.*whitespace"):
            build()
    count_tokens(processor, collator, row("4 2", [img()]))  # inner whitespace is kept: fine


def test_token_type_ids_mark_exactly_the_soft_tokens(processor):
    batch = ChatCollator(processor, "sys", TEMPLATE)([row("3", [img(), img(32, 20)])])
    soft = processor.tokenizer.image_token_id
    assert soft != processor.image_token_id  # transformers >= 5.15: image_token_id is <start_of_image>
    assert torch.equal(batch["token_type_ids"] == 1, batch["input_ids"] == soft)
    assert int((batch["input_ids"] == soft).sum()) == 2 * processor.image_seq_length


def test_soft_tokens_attend_bidirectionally_in_training_text_stays_causal(stand_in, processor):
    """Through the trainer's own loss on a collated batch: changing the image feature of an image's LAST soft
    token changes the hidden state at its FIRST soft token (bidirectional), not at any earlier text token
    (causal); without token_type_ids the first soft token would not see it (the trap of transformers >= 5.15)."""
    from transformers import AutoModelForImageTextToText

    from vlm_tune.trainer import supervised_loss

    model = AutoModelForImageTextToText.from_pretrained(stand_in).train()
    batch = ChatCollator(processor, "You read charts.", TEMPLATE)([row("3", [img()])])
    soft = (batch["input_ids"][0] == processor.tokenizer.image_token_id).nonzero().flatten()
    first, last = int(soft[0]), int(soft[-1])
    hidden = {}
    model.model.language_model.norm.register_forward_hook(lambda m, i, o: hidden.__setitem__("h", o.detach()))
    perturb = {"on": False}

    def bump_last_soft_token(module, inputs, output):
        if perturb["on"]:
            output = output.clone()
            output[:, -1, :] += 3.0  # the feature placed at the image's last soft token only
        return output

    model.model.multi_modal_projector.register_forward_hook(bump_last_soft_token)

    def states(b):
        out = {}
        for on in (False, True):
            perturb["on"] = on
            with torch.no_grad():
                supervised_loss(model, b)
            out[on] = hidden["h"][0]
        return out

    h = states(batch)
    changed = (h[True] - h[False]).abs().amax(-1)
    assert changed[first] > 1e-3  # an earlier soft token sees the later one: bidirectional
    assert torch.all(changed[:first] == 0)  # text before the image: causal, untouched
    assert changed[last + 2 :].min() > 0  # text after the image sees it
    causal = states({k: v for k, v in batch.items() if k != "token_type_ids"})
    assert (causal[True] - causal[False]).abs().amax(-1)[first] == 0  # the mask came from token_type_ids


def test_check_sample_collapses_the_soft_tokens(processor):
    from vlm_tune.check import render_supervision

    batch = ChatCollator(processor, None, TEMPLATE)([row("3", [img()])])
    shown = render_supervision(processor, batch)
    assert (
        "<start_of_image><image_soft_token>×16<end_of_image>" in shown
        and shown.count("<image_soft_token>") == 1
    )
    assert "[[3<end_of_turn>]]" in shown


def test_preflight_count_uses_the_expansion_in_context(processor):
    """The expansion's \\n\\n merge with the template's newlines; counting image tokens per image is off."""
    collator = ChatCollator(processor, "You read charts.", TEMPLATE)
    r = row("42", [img(), img(30, 90)])
    counts = count_tokens(processor, collator, r)
    assert counts["total"] == collator([r])["input_ids"].shape[1]
    text, _ = collator.answer_spans(build_messages(r, "You read charts.", TEMPLATE))
    tok = processor.tokenizer
    per_image = processor._get_num_multimodal_tokens(image_sizes=[(64, 64), (90, 30)])["num_image_tokens"]
    naive = len(tok(text, add_special_tokens=False)["input_ids"]) - 2 + sum(per_image)
    assert naive != counts["total"]


# -- resolution knobs ---------------------------------------------------------------------------------------
def test_crop_count_is_the_image_processors():
    """The pre-flight crop count equals the image processor's own pan-and-scan, over shapes and settings."""
    import numpy as np
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    ip = Gemma3ImageProcessorPil()
    for h, w in [
        (300, 1200),
        (1200, 300),
        (500, 600),
        (500, 550),
        (100, 400),
        (900, 400),
        (256, 700),
        (64, 64),
    ]:
        for max_crops in (1, 2, 4):
            for min_crop, ratio in ((256, 1.2), (32, 1.5)):
                crops = ip.pan_and_scan(np.zeros((1, h, w)), min_crop, max_crops, ratio)
                assert num_crops(h, w, min_crop, max_crops, ratio) == len(crops), (h, w, max_crops, min_crop)


def test_each_knob_changes_the_count_and_the_collated_length_agrees(stand_in):
    from vlm_tune.model import load_processor

    wide = row("3", [img(1200, 300), img(64, 64)])

    def tokens(*overrides):
        cfg = build_config({"model": {"name_or_path": str(stand_in)}}, list(overrides))
        p = load_processor(str(stand_in), cfg)
        collator = ChatCollator(p, None, TEMPLATE)
        n = count_tokens(p, collator, wide)
        batch = collator([wide])
        assert n["total"] == batch["input_ids"].shape[1]  # the knob reached the real processor too
        assert n["supervised"] == int((batch["labels"] != IGNORE_INDEX).sum())
        return n["total"], batch["pixel_values"].shape[0]

    default, crops_on, two = tokens(), tokens("model.image.pan_and_scan=true"), None
    two = tokens("model.image.pan_and_scan=true", "model.image.max_crops=2")
    assert default[1] == 2 and crops_on[1] == 2 + 4 and two[1] == 2 + 2  # pixel crops: originals + crops
    assert default[0] < two[0] < crops_on[0]
    assert tokens("model.image.pan_and_scan=false") == default


@pytest.mark.parametrize(
    "knob",
    ["longest_edge=448", "tile_size=448", "do_image_splitting=false", "max_pixels=4096", "min_pixels=64"],
)
def test_other_resolution_knobs_are_refused_naming_the_gemma_knobs(stand_in, knob):
    from vlm_tune.model import load_processor

    cfg = build_config({"model": {"name_or_path": str(stand_in)}}, [f"model.image.{knob}"])
    with pytest.raises(
        UserError, match=rf"model.image.{knob.split('=')[0]} does not apply to Gemma 3.*pan_and_scan"
    ):
        load_processor(str(stand_in), cfg)


def test_longest_edge_equal_to_the_fixed_square_changes_nothing(stand_in):
    from vlm_tune.model import load_processor

    cfg = build_config({"model": {"name_or_path": str(stand_in)}}, ["model.image.longest_edge=64"])
    p = load_processor(str(stand_in), cfg)  # the stand-in's square is 64 px (the quickstart's longest_edge)
    assert p.image_processor.size["height"] == 64 and not p.images_kwargs["do_pan_and_scan"]


def test_max_crops_without_pan_and_scan_is_refused(stand_in):
    from vlm_tune.model import load_processor

    cfg = build_config({"model": {"name_or_path": str(stand_in)}}, ["model.image.max_crops=2"])
    with pytest.raises(UserError, match="model.image.max_crops only applies with model.image.pan_and_scan"):
        load_processor(str(stand_in), cfg)


def test_card_lines_give_a_plain_processor_the_trained_resolution(stand_in):
    """The model card's lines, run on a processor loaded with AutoProcessor, give the token count vlm-tune used."""
    from transformers import AutoProcessor

    from vlm_tune.model import load_processor

    image = {"pan_and_scan": True, "max_crops": 3}
    cfg = build_config({"model": {"name_or_path": str(stand_in), "image": image}}, [])
    ours = load_processor(str(stand_in), cfg)
    processor = AutoProcessor.from_pretrained(stand_in)
    lines = FAMILY.card_image_lines(image)
    assert lines
    exec("\n".join(lines), {"processor": processor})
    text = "<start_of_turn>user\n<start_of_image>Q<end_of_turn>\n"
    wide = [[img(1200, 300)]]
    n = [p(text=[text], images=wide, return_tensors="pt")["input_ids"].shape[1] for p in (ours, processor)]
    plain = AutoProcessor.from_pretrained(stand_in)(text=[text], images=wide, return_tensors="pt")
    assert n[0] == n[1] > plain["input_ids"].shape[1]
    assert FAMILY.card_image_lines({}) == []


@pytest.mark.parametrize("family", ["smolvlm", "qwen2.5-vl", "paligemma", "internvl", "lfm2-vl"])
def test_other_families_refuse_the_pan_and_scan_knobs(family, tiny_dir, tmp_path):
    from vlm_tune.families import all_families
    from vlm_tune.model import load_processor

    path = (
        tiny_dir
        if family == "smolvlm"
        else next(f for f in all_families() if f.name == family).build_stand_in(tmp_path / family)
    )
    for knob in ("pan_and_scan=true", "max_crops=2"):
        cfg = build_config({"model": {"name_or_path": str(path)}}, [f"model.image.{knob}"])
        with pytest.raises(UserError, match=f"model.image.{knob.split('=')[0]}"):
            load_processor(str(path), cfg)


def test_generated_answer_is_cut_at_end_of_turn():
    """Evaluation decodes with special tokens and cuts at the end-of-turn marker: Gemma's too."""
    from vlm_tune.metrics import clean_generation

    assert clean_generation("3<end_of_turn><pad><pad>") == "3"
    assert clean_generation(f"blue{FAMILY.end_of_turn}") == "blue"
