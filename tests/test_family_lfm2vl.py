"""LFM2-VL: the PIL port of Lfm2VlImageProcessor, its token counts, the resolution knobs and the template.

Expected layouts are worked out by hand from the published algorithm (transformers'
models/lfm2_vl/image_processing_lfm2_vl.py) with LFM2-VL-450M's settings (encoder patch 16, downsample 2 →
32-px steps, 64..256 image tokens, 512-px tiles, 2..10 tiles, tolerance 2.0) and with the stand-in's
(patch 8 → 16-px steps, 4..16 tokens, 64-px tiles, 2..4 tiles). Where torchvision imports (GPU machines) the
port is compared with the real class on the same images.
"""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_tune.config import build_config
from vlm_tune.data.collate import ChatCollator, count_tokens
from vlm_tune.errors import UserError
from vlm_tune.families import lfm2vl
from vlm_tune.families.lfm2vl_image import SETTINGS, Lfm2VlImageProcessorPil, layout

PUBLISHED = {  # LiquidAI/LFM2-VL-450M processor settings, with the thumbnail on (published: off)
    "downsample_factor": 2,
    "do_image_splitting": True,
    "min_tiles": 2,
    "max_tiles": 10,
    "use_thumbnail": True,
    "min_image_tokens": 64,
    "max_image_tokens": 256,
    "encoder_patch_size": 16,
    "tile_size": 512,
    "max_pixels_tolerance": 2.0,
}
TEMPLATE = "{question}\nAnswer with a single word or number."


# the stand-in's own settings in these tests: LFM2-VL-450M's (it has no thumbnail) at tiny sizes, with the
# thumbnail and at most 4 tiles, so the hand-worked layouts below exercise the thumbnail path
THUMBNAIL = {"use_thumbnail": True, "max_tiles": 4}


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    return lfm2vl.build_stand_in(tmp_path_factory.mktemp("lfm2vl") / "m", **THUMBNAIL)


@pytest.fixture(scope="module")
def processor(stand_in):
    return lfm2vl.load_processor(str(stand_in))


@pytest.fixture(scope="module")
def port(stand_in):
    """The PIL port with the stand-in's saved settings (what CPU installs load)."""
    return Lfm2VlImageProcessorPil.from_pretrained(str(stand_in))


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_loader_follows_the_image_backend_decision(stand_in, monkeypatch, backend):
    """The port where vlm-tune decides PIL (no torchvision, or VLM_TUNE_IMAGE_BACKEND=pil), transformers'
    torchvision class otherwise; the processor class is the real one either way."""
    from transformers import Lfm2VlProcessor
    from transformers.utils import is_torchvision_available

    if backend == "torchvision" and not is_torchvision_available():
        backend = "pil"  # without torchvision the decision can only be PIL: the forced value is refused
        monkeypatch.setenv("VLM_TUNE_IMAGE_BACKEND", "torchvision")
        with pytest.raises(UserError, match="torchvision"):
            lfm2vl.load_processor(str(stand_in))
        monkeypatch.delenv("VLM_TUNE_IMAGE_BACKEND")
    else:
        monkeypatch.setenv("VLM_TUNE_IMAGE_BACKEND", backend)
    loaded = lfm2vl.load_processor(str(stand_in))
    assert type(loaded) is Lfm2VlProcessor
    assert isinstance(loaded.image_processor, Lfm2VlImageProcessorPil) == (backend == "pil")
    assert type(loaded.image_processor).__name__.startswith("Lfm2VlImageProcessor")


def image(w, h, color=(200, 30, 30)):
    return Image.new("RGB", (w, h), color)


# -- the layout, by hand ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        # small: 64x64 = 4,096 px < 64 tokens * 32**2 → scaled by sqrt(65536/4096) = 4 → 256x256, one tile
        (64, 64, (1, 1, [256, 256], False)),
        # exactly the cap: 512x512 = 256 * 32**2, not over 2x the cap → one tile, unchanged
        (512, 512, (1, 1, [512, 512], False)),
        # 2000x100: 100/32 → 3 (96), 2000/32 = 62.5 → 62 (round half to even: 1,984); 190,464 px fits → as is
        (2000, 100, (1, 1, [96, 1984], False)),
        # 1000x800: 800x992 rounded > 2 * 262,144 → tiles. Aspect 1.25: 2x2 and 3x2 tie (|1.25-1| = |1.25-1.5|);
        # the later 3x2 wins as 800,000 px > half of 6 tiles (786,432); 3x3 ties too but 800,000 < 1,179,648.
        # Thumbnail: beta = sqrt(800000/262144) = 1.747 → floor(14.31)*32 = 448 by floor(17.89)*32 = 544
        (1000, 800, (2, 3, [448, 544], True)),
        # 3000x200 (aspect 15): 192x3008 > 524,288 → the widest grid, 10 columns x 1 row; thumbnail
        # beta = sqrt(600000/262144) = 1.513 → floor(4.13)*32 = 128 by floor(61.97)*32 = 1952
        (3000, 200, (1, 10, [128, 1952], True)),
        # tall 300x2000: rounded 1984x288 (62.5 → 62; 9.375 → 9) = 571,392 > 524,288 → tiles; aspect 0.15 is
        # closest to 1x7 (0.143; 1x6 0.167, 1x8 0.125); thumbnail floor(41.31)*32 = 1312 by floor(6.20)*32 = 192
        (300, 2000, (7, 1, [1312, 192], True)),
    ],
)
def test_layout_matches_the_published_algorithm_by_hand(width, height, expected):
    assert layout(height, width, PUBLISHED) == expected


def test_layout_without_splitting_or_with_other_tiles():
    no_split = {**PUBLISHED, "do_image_splitting": False}
    # a large image is then one tile at the smart-resize size (the thumbnail's)
    assert layout(800, 1000, no_split) == (1, 1, [448, 544], False)
    # at most 4 tiles: aspect 1.25 → 2x2 (ratio 1) ties with nothing closer; 3x2 is no longer allowed
    assert layout(800, 1000, {**PUBLISHED, "max_tiles": 4}) == (2, 2, [448, 544], True)


def test_token_counts_by_hand(processor):
    """The stand-in's settings: a 64-px tile is 8x8 patches → 4x4 = 16 tokens after the 2x downsample."""
    counts = lfm2vl.image_token_counts(processor, [(64, 64), (120, 200), (20, 32), (300, 20)])
    # 64x64: 16 tokens + <|image_start|> + <|image_end|>
    # 200x120 (w x h): 128x192 rounded > 2 * 16 * 16**2 → 2 tiles side by side (aspect 1.67 → 2x1) of 16
    #   + the thumbnail: beta = sqrt(24000/4096) = 2.42 → 48x80 px = 3x5 = 15 tokens;
    #   markers: start, <|img_row_1_col_1|>, <|img_row_1_col_2|>, <|img_thumbnail|>, end
    # 32x20: 32x16 rounded = 512 px < 4 tokens * 16**2 → beta = sqrt(1024/640) → 48x32 px → 3x2 = 6 tokens
    # 20x300: 304x16 rounded, over 16 tokens → beta = sqrt(6000/4096) → 240x16 px → 15x1 = 15 tokens
    assert counts == [16 + 2, 16 + 16 + 15 + 5, 6 + 2, 15 + 2]


# -- the port's tensors -------------------------------------------------------------------------------------
def test_port_outputs_tiles_patches_masks_and_shapes(port):
    ip = port
    half = np.zeros((120, 200, 3), dtype=np.uint8)
    half[:, :100] = (255, 0, 0)  # left half red, right half blue: the two tiles must come left to right
    half[:, 100:] = (0, 0, 255)
    out = ip([Image.fromarray(half), image(64, 64)], return_row_col_info=True, return_tensors="pt")
    assert out["pixel_values"].shape == (4, 64, 8 * 8 * 3)  # 2 tiles + thumbnail + 1 single tile
    assert out["pixel_values"].dtype == torch.float32
    assert out["spatial_shapes"].tolist() == [[8, 8], [8, 8], [6, 10], [8, 8]]
    assert out["pixel_attention_mask"].sum(1).tolist() == [64, 64, 60, 64]
    assert out["image_rows"].tolist() == [1, 1] and out["image_cols"].tolist() == [2, 1]
    assert out["image_sizes"].tolist() == [[48, 80], [64, 64]]
    pv = out["pixel_values"]
    # patches hold (y, x, channel) of their pixels; mean = std = 0.5 → red is (1, -1, -1)
    left, right = pv[0].reshape(64, 8, 8, 3), pv[1].reshape(64, 8, 8, 3)
    red, blue = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])
    assert torch.allclose(left[0], red) and torch.allclose(right[-1], blue)  # away from the blended seam
    assert (pv[2, 60:] == 0).all()  # padding patches of the thumbnail are zeros
    solid = pv[3].reshape(64, 8, 8, 3)[0, 0, 0]
    assert torch.allclose(
        solid, torch.tensor([200 / 255 - 0.5, 30 / 255 - 0.5, 30 / 255 - 0.5]) / 0.5, atol=1e-6
    )


def test_port_patch_order_is_row_major():
    ip = Lfm2VlImageProcessorPil(
        encoder_patch_size=8,
        tile_size=64,
        min_image_tokens=4,
        max_image_tokens=16,
        do_normalize=False,
        do_rescale=False,
    )
    grid = np.zeros((32, 48, 3), dtype=np.uint8)  # 32x48 is already a 16-px multiple inside 4..16 tokens
    for py in range(4):
        for px in range(6):
            grid[py * 8 : (py + 1) * 8, px * 8 : (px + 1) * 8] = (py * 6 + px, 0, 0)
    out = ip(Image.fromarray(grid), return_tensors="pt")
    assert out["spatial_shapes"].tolist() == [[4, 6]]
    firsts = out["pixel_values"][0, :24, 0]  # channel 0 of each patch's first pixel
    assert firsts.tolist() == list(range(24))


def test_saved_files_are_the_standard_ones(stand_in, processor, tmp_path):
    import json

    saved = json.loads((stand_in / "processor_config.json").read_text())
    assert saved["processor_class"] == "Lfm2VlProcessor"
    assert saved["image_processor"]["image_processor_type"] == "Lfm2VlImageProcessor"
    want = PUBLISHED | {k: lfm2vl.STAND_IN[k] for k in lfm2vl.SIZES} | THUMBNAIL
    for key in SETTINGS:
        assert saved["image_processor"][key] == want[key], key
    processor.save_pretrained(tmp_path)
    again = json.loads((tmp_path / "processor_config.json").read_text())
    assert again["image_processor"]["image_processor_type"] == "Lfm2VlImageProcessor"


def test_replacement_offsets_locate_each_expansion(processor):
    from vlm_tune.families.lfm2vl_image import expansion

    text = "<|im_start|>user\n<image>a<image>b<|im_end|>\n"
    enc = processor(
        text=[text], images=[[image(200, 120), image(64, 64)]], return_text_replacement_offsets=True
    )
    reps = enc["text_replacement_offsets"][0]
    assert [r["replacement"] for r in reps] == [expansion(processor, 120, 200), expansion(processor, 64, 64)]
    assert reps[0]["new_span"][1] - reps[0]["new_span"][0] == len(reps[0]["replacement"])


def test_stand_in_is_a_hybrid_with_both_layer_kinds(stand_in):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(stand_in)
    kinds = model.config.text_config.layer_types
    assert "conv" in kinds and "full_attention" in kinds
    names = {n for n, _ in model.named_modules()}
    assert "model.language_model.layers.0.conv.in_proj" in names
    assert "model.language_model.layers.1.self_attn.out_proj" in names


def test_bos_comes_from_the_template_once(processor):
    """The published tokenizer adds <|startoftext|> by itself; the processor must not add a second one, and the
    pre-flight count must not count one either (it tokenizes as the processor does)."""
    tok = processor.tokenizer
    bos = tok.convert_tokens_to_ids("<|startoftext|>")
    assert tok("hi")["input_ids"][0] == bos  # as published: add_bos_token
    collator = ChatCollator(processor, None, TEMPLATE)
    r = {"id": "r", "images": [image(64, 64)], "question": "How many?", "answers": ["3"]}
    ids = collator([r])["input_ids"][0]
    assert ids[0] == bos and int((ids == bos).sum()) == 1
    assert count_tokens(processor, collator, r)["total"] == len(ids)


def test_template_is_the_published_one():
    assert len(lfm2vl.CHAT_TEMPLATE.encode()) == 434
    digest = hashlib.sha256(lfm2vl.CHAT_TEMPLATE.encode()).hexdigest()
    assert digest == "cf0af741b36248dfe460af825b0b3acb3c651cf7dd40a74c29447f60b75d2b9b"


# -- resolution knobs ---------------------------------------------------------------------------------------
def knob_tokens(stand_in, *overrides, size=(200, 120)):
    from vlm_tune.model import load_processor

    cfg = build_config({"model": {"name_or_path": str(stand_in)}}, list(overrides))
    p = load_processor(str(stand_in), cfg)
    collator = ChatCollator(p, None, TEMPLATE)
    r = {"id": "r", "images": [image(*size)], "question": "How many?", "answers": ["3"]}
    n = count_tokens(p, collator, r)
    assert n["total"] == collator([r])["input_ids"].shape[1]  # the knob reached the real processor too
    return n["image"]


def test_each_resolution_knob_changes_the_token_count(stand_in):
    default = knob_tokens(stand_in)  # 2 tiles + a 15-token thumbnail + 5 markers = 52
    assert default == 52
    assert (
        knob_tokens(stand_in, "model.image.do_image_splitting=false") == 15 + 2
    )  # thumbnail-size single tile
    assert knob_tokens(stand_in, "model.image.tile_size=32") < default  # 4 tokens per tile
    assert (
        knob_tokens(stand_in, "model.image.max_image_tokens=64") > default
    )  # over the cap no more → one tile
    # longest_edge L = the budget of an L x L image: 48 px → 3x3 = 9 tokens (16-px steps)
    assert knob_tokens(stand_in, "model.image.longest_edge=48") == knob_tokens(
        stand_in, "model.image.max_image_tokens=9"
    )
    assert knob_tokens(stand_in, "model.image.longest_edge=48", size=(48, 48)) == 9 + 2
    small = (32, 32)
    assert knob_tokens(stand_in, "model.image.min_image_tokens=16", size=small) > knob_tokens(
        stand_in, size=small
    )


def test_knobs_of_other_families_are_rejected_naming_the_replacement(stand_in):
    for knob in ("model.image.min_pixels=1024", "model.image.max_pixels=4096"):
        with pytest.raises(UserError, match="max_image_tokens"):
            knob_tokens(stand_in, knob)
    with pytest.raises(UserError, match="min_image_tokens"):
        knob_tokens(stand_in, "model.image.min_image_tokens=20")  # above the max (16)
    with pytest.raises(UserError, match="model.image.tile_size=40"):
        knob_tokens(stand_in, "model.image.tile_size=40")


@pytest.mark.parametrize(
    "overrides",
    [["model.image.max_image_tokens=8", "model.image.tile_size=32"], ["model.image.longest_edge=24"]],
)
def test_card_lines_give_a_loaded_processor_the_same_counts(stand_in, overrides):
    from vlm_tune.model import load_processor

    cfg = build_config({"model": {"name_or_path": str(stand_in)}}, overrides)
    tuned = load_processor(str(stand_in), cfg)
    processor = lfm2vl.load_processor(str(stand_in))
    lines = lfm2vl.card_image_lines(cfg.model.image.model_dump())
    assert lines
    exec("\n".join(lines), {"processor": processor})
    for key in ("max_image_tokens", "min_image_tokens", "tile_size", "do_image_splitting"):
        assert getattr(processor.image_processor, key) == getattr(tuned.image_processor, key), key
    sizes = [(120, 200), (300, 40), (64, 64)]
    assert lfm2vl.image_token_counts(processor, sizes) == lfm2vl.image_token_counts(tuned, sizes)
    a = processor(text=["<image>"], images=[[image(200, 120)]])["input_ids"]
    assert a == tuned(text=["<image>"], images=[[image(200, 120)]])["input_ids"]


# -- against the real class (where torchvision imports: the GPU user's stack, a CI lane) ---------------------
@pytest.mark.torchvision
@pytest.mark.parametrize("settings", ["published", "stand-in"])
def test_port_equals_the_torchvision_class(settings):
    from transformers.models.lfm2_vl.image_processing_lfm2_vl import Lfm2VlImageProcessor

    s = (
        PUBLISHED
        if settings == "published"
        else PUBLISHED | {k: lfm2vl.STAND_IN[k] for k in lfm2vl.SIZES} | THUMBNAIL
    )
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (512, 512), (1000, 800), (3000, 200), (300, 2000), (37, 91), (200, 120), (1600, 100)]
    if settings == "published":  # 20:1 is too elongated for the stand-in's 16 tokens (see the test below)
        sizes.append((2000, 100))
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    kwargs = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, **s}
    real = Lfm2VlImageProcessor(**kwargs)(images, return_row_col_info=True, return_tensors="pt")
    port = Lfm2VlImageProcessorPil(**kwargs)(images, return_row_col_info=True, return_tensors="pt")
    for key in ("image_rows", "image_cols", "image_sizes"):
        assert torch.as_tensor(port[key]).tolist() == torch.as_tensor(real[key]).tolist(), key
    assert torch.equal(port["spatial_shapes"], real["spatial_shapes"].to(port["spatial_shapes"].dtype))
    assert torch.equal(port["pixel_attention_mask"], real["pixel_attention_mask"].to(torch.int32))
    assert port["pixel_values"].shape == real["pixel_values"].shape
    # resize rounding may differ by a grey level (2/255 after normalising with std 0.5)
    diff = (port["pixel_values"] - real["pixel_values"].float()).abs()
    assert diff.max() <= 2 * 2 / 255 + 1e-5 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_too_elongated_image_is_refused_before_step_0_naming_the_row(stand_in, port, tmp_path, capsys):
    """smart_resize keeps each side >= 16 px, so a 2000x100 chart under the stand-in's 16-token cap becomes
    272x16 px = 68 patches > the 64 every tile is padded to: the real class fails inside torch.stack (below,
    where torchvision imports); vlm-tune refuses it in the pre-flight count, naming the row and the fix."""
    import json

    from vlm_tune.cli import main

    with pytest.raises(UserError, match="2000x100 px is too elongated.*max_image_tokens"):
        port([image(2000, 100)], return_tensors="pt")
    image(64, 64).save(tmp_path / "ok.png")
    image(2000, 100).save(tmp_path / "wide.png")
    rows = [{"id": "ok", "image": "ok.png", "question": "Q?", "answer": "1", "split": "train"}]
    rows += [{"id": "wide-7", "image": "wide.png", "question": "Q?", "answer": "1", "split": "train"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.yaml").write_text(
        f"run:\n  output_dir: {tmp_path / 'run'}\nmodel:\n  name_or_path: {stand_in}\n"
        f"data:\n  source: {tmp_path / 'd.jsonl'}\n"
        "  columns: {image: image, question: question, answer: answer, id: id}\n"
    )
    assert main(["check", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "row wide-7: an image of 2000x100 px is too elongated" in err and "Traceback" not in err


@pytest.mark.torchvision
def test_the_real_class_fails_on_the_image_the_preflight_refuses(port):
    from transformers.models.lfm2_vl.image_processing_lfm2_vl import Lfm2VlImageProcessor

    s = {k: getattr(port, k) for k in SETTINGS}  # the stand-in's settings, as the test above refuses under
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        Lfm2VlImageProcessor(**s)([image(2000, 100), image(64, 64)], return_tensors="pt")
