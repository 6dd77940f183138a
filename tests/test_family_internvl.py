"""InternVL-only checks: published template and token layout, dynamic-tiling knobs, padding side, card lines.

The shared per-family tests (supervision, pre-flight count, presets, training) are in test_families.py.
"""

import hashlib
import json
import shutil

import pytest
from PIL import Image

from vlm_tune.config import build_config
from vlm_tune.data.collate import ChatCollator, count_tokens
from vlm_tune.errors import UserError
from vlm_tune.families import internvl
from vlm_tune.families import load_processor as load_family_processor

TEMPLATE = "{question}\nAnswer with a single word or number."


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    return internvl.build_stand_in(tmp_path_factory.mktemp("internvl") / "tiny-internvl")


def img(w=64, h=64):
    return Image.new("RGB", (w, h), (200, 30, 30))


def row(images, answer="3"):
    return {"id": "r", "images": images, "question": "How many bars are there?", "answers": [answer]}


def test_template_is_the_published_one_and_renders_chatml(stand_in):
    # sha256 of the template joined from transformers' convert_internvl_weights_to_hf.py (see internvl.py);
    # 481 bytes, the size of the published chat_template.jinja of the -hf checkpoints
    assert len(internvl.CHAT_TEMPLATE.encode()) == 481
    digest = hashlib.sha256(internvl.CHAT_TEMPLATE.encode()).hexdigest()
    assert digest == "b3e3fa7cdeceec1d3dfe0d17b77724baf3857714e688f3a700261567e96140eb"
    p = load_family_processor(str(stand_in))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "3"}]},
    ]
    assert p.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\n<IMG_CONTEXT>\nHow many?<|im_end|>\n<|im_start|>assistant\n3<|im_end|>\n"
    )


def test_image_expands_to_img_context_block_per_tile(stand_in):
    p = load_family_processor(str(stand_in))
    assert p.image_seq_length == (32 // 8) ** 2 // 4  # (tile / patch)^2 * 0.5^2, as the published 256
    batch = ChatCollator(p, None, TEMPLATE)([row([img()])])
    text = p.tokenizer.decode(batch["input_ids"][0].tolist(), skip_special_tokens=False)
    # a square 64-px image on 32-px tiles: a 2x2 grid + thumbnail = 5 tiles of image_seq_length tokens
    assert "<img>" + "<IMG_CONTEXT>" * 5 * p.image_seq_length + "</img>" in text
    assert batch["pixel_values"].shape == (5, 3, 32, 32)


def test_each_tiling_knob_changes_the_token_count_and_the_processor_agrees(stand_in):
    from vlm_tune.model import load_processor

    def tokens(*overrides, image=None):
        cfg = build_config({"model": {"name_or_path": str(stand_in)}}, list(overrides))
        p = load_processor(str(stand_in), cfg)
        collator = ChatCollator(p, None, TEMPLATE)
        r = row([image or img(200, 120)])
        n = count_tokens(p, collator, r)
        batch = collator([r])
        assert n["total"] == batch["input_ids"].shape[1]  # the knob reached the real processor too
        assert batch["pixel_values"].shape[0] * p.image_seq_length + 2 == n["image"]
        return n["image"]

    seq = 4
    default = tokens()
    assert default == 7 * seq + 2  # 200x120 ~ 5:3 → 3x2 grid + thumbnail
    assert tokens("model.image.max_patches=2") == 3 * seq + 2  # 2x1 + thumbnail
    assert tokens("model.image.max_patches=1") == 1 * seq + 2  # one resized tile, no thumbnail
    assert tokens("model.image.do_image_splitting=false") == 1 * seq + 2
    assert tokens("model.image.do_image_splitting=true") == default
    # longest_edge L: the tile budget of an L x L image (64*64 / 32*32 = 4 tiles), as Qwen's L means L*L pixels
    assert (
        tokens("model.image.longest_edge=64") == tokens("model.image.max_patches=4") == 3 * seq + 2
    )  # 2x1+1
    assert tokens("model.image.longest_edge=40") == 1 * seq + 2  # 1600 // 1024 = 1 tile
    assert tokens("model.image.longest_edge=64", "model.image.max_patches=1") == 1 * seq + 2  # explicit wins
    assert tokens("model.image.min_patches=10") == 13 * seq + 2  # 4x3 + thumbnail (10-12 tiles allowed)
    # a square image with min_patches=1 and max 3: 1x1 (no thumbnail) beats 2x1/1x2 on aspect ratio
    assert tokens("model.image.max_patches=3", image=img(64, 64)) == 1 * seq + 2


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.image.tile_size=448"], "model.image.tile_size.*max_patches"),
        (["model.image.max_pixels=4096"], "model.image.max_pixels.*Qwen"),
        (["model.image.min_pixels=4096"], "model.image.min_pixels.*Qwen"),
        (["model.image.do_image_splitting=false", "model.image.max_patches=4"], "do_image_splitting"),
        (
            ["model.image.min_patches=6", "model.image.max_patches=4"],
            "min_patches \\(6\\).*max_patches \\(4\\)",
        ),
    ],
)
def test_knobs_without_meaning_for_internvl_are_rejected(stand_in, overrides, match):
    from vlm_tune.model import load_processor

    cfg = build_config({"model": {"name_or_path": str(stand_in)}}, overrides)
    with pytest.raises(UserError, match=match):
        load_processor(str(stand_in), cfg)


@pytest.mark.parametrize("name", ["smolvlm", "qwen2.5-vl"])
def test_other_families_reject_the_patch_knobs(name, tiny_dir, tmp_path):
    from vlm_tune.families import all_families
    from vlm_tune.model import load_processor

    fam = next(f for f in all_families() if f.name == name)
    path = tiny_dir if name == "smolvlm" else fam.build_stand_in(tmp_path / name)
    for knob in ("max_patches", "min_patches"):
        cfg = build_config({"model": {"name_or_path": str(path)}}, [f"model.image.{knob}=4"])
        with pytest.raises(UserError, match=f"model.image.{knob}"):
            load_processor(str(path), cfg)


def test_training_batches_right_padded_even_without_a_saved_padding_side(stand_in, tmp_path):
    """InternVLProcessor defaults to left padding; a tokenizer_config.json without padding_side (as a hub
    checkpoint may have) must not turn training batches left-padded."""
    copy = tmp_path / "no-padding-side"
    shutil.copytree(stand_in, copy)
    tc = copy / "tokenizer_config.json"
    config = json.loads(tc.read_text())
    config.pop("padding_side", None)
    tc.write_text(json.dumps(config))
    p = load_family_processor(str(copy))
    collator = ChatCollator(p, None, TEMPLATE)
    rows = [row([img()]), {**row([img()]), "question": "How many bars are there in this chart today?"}]
    train = collator(rows)
    assert train["attention_mask"][0, 0] == 1 and train["attention_mask"][0, -1] == 0
    gen = collator.generation_batch(rows)
    assert gen["attention_mask"][0, 0] == 0 and gen["attention_mask"][0, -1] == 1


@pytest.mark.parametrize(
    "image",
    [
        {"max_patches": 2},
        {"max_patches": 6, "min_patches": 3},
        {"do_image_splitting": False},
        {"longest_edge": 40},
        {"longest_edge": 96, "min_patches": 2},
        {},
    ],
)
def test_card_lines_give_a_loaded_processor_vlm_tunes_tiling(stand_in, image):
    from vlm_tune.model import load_processor

    cfg = build_config({"model": {"name_or_path": str(stand_in), "image": image}}, [])
    ours = load_processor(str(stand_in), cfg).image_processor
    processor = load_family_processor(str(stand_in))
    lines = internvl.card_image_lines(cfg.model.image.model_dump())
    assert bool(lines) == bool(image)
    exec("\n".join(lines), {"processor": processor})
    assert (processor.image_processor.min_patches, processor.image_processor.max_patches) == (
        ours.min_patches,
        ours.max_patches,
    )
