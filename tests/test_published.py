"""Stand-ins match what the imitated checkpoints publish: chat template byte for byte, special tokens,
generation ids and processor settings, compared with vlm-tune's pinned copy of the published files
(vlm_tune/families/published/, declared by each family module's `Published` records).

Every stand-in is built and compared: each family's builtin stand-in (`builtin:tiny...`, `builtin:smollm2-135m`)
and each rehearsal stand-in of a shipped config's checkpoint. Where they differ is listed below with the
reason; any other difference (a drifted builder) fails. What no published file was found for is listed as
unverified (never compared) or derived (compared with values not published by the checkpoint itself).
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from vlm_tune.families import all_families
from vlm_tune.families.pinned import ASPECTS, DATA, Pinned
from vlm_tune.standins.published_check import differences
from vlm_tune.standins.rehearsal import STAND_INS, build_stand_in_model, published_record

TINY_SMOLVLM = (
    "tiny dims: 32-px tiles of 4 image tokens, longest edge 64 px (published: 512, 64 tokens, 2048)"
)
TINY_QWEN = "tiny dims: patch 8 and a 32x32..128x128-pixel budget, so a 64-px chart is 16 tokens"
TINY_SQUARE = "tiny dims: a 64-px square input (published 896 / 448 px) and its token count"
TINY_INTERNVL = "tiny dims: 32-px tiles of 4 tokens (published 448-px tiles of 256)"
TINY_LFM2 = "tiny dims: patch 8, 64-px tiles, 4..16 tokens per tile (published 16, 512, 64..256)"
# transformers 5 saves a named tokenizer token as a top-level key and reads back only names ending in
# "_token"; LFM2-VL's published name is "image_thumbnail", so it does not survive a save (Lfm2VlProcessor
# reads image_thumbnail_token, defaulting to the same <|img_thumbnail|>, either way)
THUMBNAIL_NAME = "the published token name lacks the _token suffix transformers 5 needs to read it back"

# stand-in → {compared key: why it differs from the published value}; every other key must be equal
EXCEPTED: dict[str, dict[str, str]] = {
    "builtin:tiny": {
        "image_processor.size.longest_edge": TINY_SMOLVLM,
        "image_processor.max_image_size.longest_edge": TINY_SMOLVLM,
        "processor.image_seq_len": TINY_SMOLVLM,
    },
    "builtin:smollm2-135m": {
        "image_processor.size.longest_edge": "small vision tower: 64-px tiles of 16 tokens, longest edge 128 px",
        "image_processor.max_image_size.longest_edge": "small vision tower: 64-px tiles",
        "processor.image_seq_len": "small vision tower: 16 tokens per tile",
    },
    "builtin:tiny-qwen2.5-vl": {
        "image_processor.patch_size": TINY_QWEN,
        "image_processor.size.shortest_edge": TINY_QWEN,
        "image_processor.size.longest_edge": TINY_QWEN,
    },
    "builtin:tiny-qwen3-vl": {
        "image_processor.patch_size": TINY_QWEN,
        "image_processor.size.shortest_edge": TINY_QWEN,
        "image_processor.size.longest_edge": TINY_QWEN,
    },
    "builtin:tiny-paligemma": {
        "image_processor.size.height": TINY_SQUARE,
        "image_processor.size.width": TINY_SQUARE,
        "image_processor.image_seq_length": TINY_SQUARE,
    },
    "builtin:tiny-internvl": {
        "image_processor.size.height": TINY_INTERNVL,
        "image_processor.size.width": TINY_INTERNVL,
        "processor.image_seq_length": TINY_INTERNVL,
    },
    "builtin:tiny-lfm2-vl": {
        "image_processor.encoder_patch_size": TINY_LFM2,
        "image_processor.tile_size": TINY_LFM2,
        "image_processor.min_image_tokens": TINY_LFM2,
        "image_processor.max_image_tokens": TINY_LFM2,
        "image_processor.max_num_patches": TINY_LFM2 + " (max_num_patches follows from them)",
        "tokens.named.image_thumbnail": THUMBNAIL_NAME,
    },
    "builtin:tiny-gemma3": {
        "image_processor.size.height": TINY_SQUARE,
        "image_processor.size.width": TINY_SQUARE,
        "image_processor.image_seq_length": TINY_SQUARE + " (16 soft tokens)",
        "processor.image_seq_length": TINY_SQUARE + " (16 soft tokens)",
    },
    "LiquidAI/LFM2-VL-450M": {"tokens.named.image_thumbnail": THUMBNAIL_NAME},
}
# (checkpoint, aspect) never compared: no published file was found
UNVERIFIED = {
    ("HuggingFaceTB/SmolVLM-Instruct", "special_tokens"),
    ("HuggingFaceTB/SmolVLM-Instruct", "processor_settings"),
    ("HuggingFaceTB/SmolVLM2-256M-Video-Instruct", "chat_template"),
    ("HuggingFaceTB/SmolVLM2-256M-Video-Instruct", "special_tokens"),
    ("Qwen/Qwen3-VL-2B-Instruct", "chat_template"),
    ("google/gemma-3-4b-it", "special_tokens.adds_bos"),
    ("google/paligemma2-3b-pt-448", "special_tokens.adds_bos"),
}
# (checkpoint, aspect) compared with derived values, not the checkpoint's own files
DERIVED = {("OpenGVLab/InternVL3-1B-hf", "processor_settings")}
REHEARSED = sorted(k for k, v in STAND_INS.items() if v.family != "builtin")
BUILTINS = [f.builtin for f in all_families()] + ["builtin:smollm2-135m"]


def records():
    return [record for fam in all_families() for record in fam.published]


@pytest.fixture(scope="module")
def builtin_dirs(family_stand_ins, real_decoder_dir):
    dirs = {f.builtin: family_stand_ins[f.name] for f in all_families()}
    return dirs | {"builtin:smollm2-135m": real_decoder_dir}


def builtin_record(name):
    if name == "builtin:smollm2-135m":
        return next(f for f in all_families() if f.name == "smolvlm").published[0]
    return next(f for f in all_families() if f.builtin == name).published[0]


# -- the pinned copy ----------------------------------------------------------------------------------------
def test_every_pinned_file_matches_its_sha256_and_names_its_source():
    pinned = {p.file: p for r in records() for p in r.files()}
    for r in records():
        assert r.verify() == [], r.checkpoint
    for p in pinned.values():
        assert hashlib.sha256((DATA / p.file).read_bytes()).hexdigest() == p.sha256
        assert p.how in ("verbatim", "transcribed", "extracted", "derived"), p.file
        assert len(p.source) > 30 and ("github" in p.source.lower() or "huggingface.co" in p.source), p.file
    on_disk = {str(f.relative_to(DATA)) for f in DATA.rglob("*") if f.is_file()}
    assert on_disk == set(pinned)  # no file pinned without a record, no record without its file


def test_a_changed_pinned_copy_is_refused():
    p = next(p for r in records() for p in r.files())
    assert Pinned(p.file, p.sha256, p.source, p.how).read() == (DATA / p.file).read_bytes()
    with pytest.raises(RuntimeError, match=p.file):
        Pinned(p.file, "0" * 64, p.source, p.how).read()


def test_every_stand_in_has_a_record_and_the_unverified_items_are_exactly_these():
    for model_id in REHEARSED:
        assert published_record(model_id).checkpoint == model_id
    unverified = {(r.checkpoint, a) for r in records() for a in r.unverified}
    derived = {(r.checkpoint, a) for r in records() for a in r.derived}
    assert unverified == UNVERIFIED
    assert derived == DERIVED
    for _, aspect in unverified | derived:
        assert aspect.split(".")[0] in ASPECTS


def test_unverified_items_are_not_compared():
    smolvlm2 = published_record("HuggingFaceTB/SmolVLM2-256M-Video-Instruct")
    assert "chat_template" not in smolvlm2.expected()
    assert not any(k.startswith("tokens.") for k in smolvlm2.expected())
    gemma3 = published_record("google/gemma-3-4b-it")
    assert "tokens.adds_bos" not in gemma3.expected() and "tokens.bos_token" in gemma3.expected()


def test_readme_family_table_lists_what_is_unverified():
    """The README's family table names, per family, what is unverified or derived (or "none")."""
    words = {
        "chat_template": "chat template",
        "special_tokens": "special tokens",
        "processor_settings": "processor settings",
        "special_tokens.adds_bos": "adds bos",
    }
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for fam in all_families():
        rows = [
            line
            for line in readme.splitlines()
            if line.startswith("| ") and f"(`{fam.model_types[0]}`" in line.split(" | ")[0]
        ]
        assert len(rows) == 1, fam.name
        cell = rows[0].rstrip(" |").split(" | ")[-1]
        items = [(r, a, "unverified") for r in fam.published for a in r.unverified]
        items += [(r, a, "derived") for r in fam.published for a in r.derived]
        if not items:
            assert cell == "none", fam.name
        for record, aspect, kind in items:
            assert record.checkpoint.split("/")[1] in cell and words[aspect] in cell and kind in cell, (
                fam.name,
                record.checkpoint,
                aspect,
            )


# -- the stand-ins ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_stand_in_matches_the_published_values(name, builtin_dirs):
    diff = differences(builtin_record(name), builtin_dirs[name])
    assert set(diff) == set(EXCEPTED.get(name, {})), diff


@pytest.mark.parametrize("model_id", REHEARSED)
def test_rehearsal_stand_in_matches_the_published_values(model_id, tmp_path):
    built = build_stand_in_model(model_id, tmp_path / "m")
    diff = differences(published_record(model_id), built)
    assert set(diff) == set(EXCEPTED.get(model_id, {})), diff


def test_the_builtin_tiny_template_is_byte_identical(tiny_dir):
    """SmolVLM-256M's chat_template.json holds the template JSON-encoded; the stand-in saves it decoded."""
    published = json.loads((DATA / "smolvlm" / "chat_template.json").read_bytes())["chat_template"]
    assert (tiny_dir / "chat_template.jinja").read_bytes() == published.encode()


def test_a_drifted_stand_in_is_caught(tiny_dir, tmp_path):
    """The comparison fails a stand-in whose template, special tokens, generation ids or processor settings
    drift from the published ones."""
    drifted = tmp_path / "tiny"
    shutil.copytree(tiny_dir, drifted)
    template = drifted / "chat_template.jinja"
    template.write_text(template.read_text().replace("{{ 'Assistant:' }}", "{{ 'Assistant: ' }}"))
    config = json.loads((drifted / "processor_config.json").read_text())
    config["image_processor"]["resample"] = 3
    (drifted / "processor_config.json").write_text(json.dumps(config))
    tok = json.loads((drifted / "tokenizer_config.json").read_text())
    tok["pad_token"] = "<|endoftext|>"
    (drifted / "tokenizer_config.json").write_text(json.dumps(tok))
    gen = json.loads((drifted / "generation_config.json").read_text())
    gen["eos_token_id"] = 0
    (drifted / "generation_config.json").write_text(json.dumps(gen))
    record = builtin_record("builtin:tiny")
    diff = differences(record, drifted)
    assert set(diff) - set(EXCEPTED["builtin:tiny"]) == {
        "chat_template",
        "image_processor.resample",
        "tokens.pad_token",
        "generation.eos_token_id",
    }
    assert diff["tokens.pad_token"] == ("<|im_end|>", "<|endoftext|>")
    assert diff["generation.eos_token_id"] == ("<end_of_utterance>", "<|endoftext|>")


# -- caches of an earlier build -----------------------------------------------------------------------------
def test_a_tiny_model_cached_by_an_earlier_build_is_rebuilt(tmp_path):
    """A tiny model built before the published template and tokens (its tiny_spec.json has no build number or
    an older one) is rebuilt, not reused."""
    from vlm_tune.families.smolvlm import BUILD, TinySpec, ensure_tiny_model

    spec = TinySpec(vision_hidden=16, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=1)
    path = ensure_tiny_model(tmp_path / "m", spec=spec)
    marker = json.loads((path / "tiny_spec.json").read_text())
    assert marker["build"] == BUILD >= 2
    old = {k: v for k, v in marker.items() if k != "build"}  # the marker builds before this one wrote
    (path / "tiny_spec.json").write_text(json.dumps(old))
    (path / "chat_template.jinja").write_text("stale")
    ensure_tiny_model(tmp_path / "m", spec=spec)
    assert json.loads((path / "tiny_spec.json").read_text())["build"] == BUILD
    assert (path / "chat_template.jinja").read_text() == builtin_record("builtin:tiny").template()


@pytest.mark.parametrize("module", ["qwen", "paligemma", "internvl", "lfm2vl", "gemma3"])
def test_each_family_marks_its_stand_in_with_its_build_number(module, family_stand_ins):
    import importlib

    mod = importlib.import_module(f"vlm_tune.families.{module}")
    fams = [f for f in all_families() if f.build_stand_in.__module__ == mod.__name__]
    assert fams
    for fam in fams:
        marker = json.loads((family_stand_ins[fam.name] / "tiny_spec.json").read_text())
        assert marker["build"] == mod.BUILD >= 2, fam.name
