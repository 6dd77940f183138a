"""Tests for the deterministic synthetic chart-QA generator (offline, small n)."""

from __future__ import annotations

import io
import json
import os
from collections import Counter

import datasets
import pytest
from PIL import Image

from vlm_tune.data import synthetic
from vlm_tune.data.synthetic import (
    CHART_KINDS,
    QUESTION_TYPES,
    derive_answer,
    ensure_synthetic,
    generate_synthetic,
    save_synthetic,
)
from vlm_tune.errors import UserError

SMALL = dict(n_train=24, n_test=8, image_size=48)
COLUMNS = ["id", "image", "query", "label", "type", "split", "table"]


def _raw(ds: datasets.Dataset) -> dict[str, list]:
    """All columns, with images as PNG bytes (not decoded)."""
    ds = ds.cast_column("image", datasets.Image(decode=False))
    out = ds.to_dict()
    out["image"] = [img["bytes"] for img in out["image"]]
    return out


def test_same_seed_gives_identical_bytes_and_rows():
    a = generate_synthetic(seed=5, **SMALL)
    b = generate_synthetic(seed=5, **SMALL)
    assert set(a) == {"train", "test"}
    for split in ("train", "test"):
        ra, rb = _raw(a[split]), _raw(b[split])
        assert list(ra) == COLUMNS
        assert ra == rb
        assert all(isinstance(x, bytes) and x.startswith(b"\x89PNG") for x in ra["image"])


def test_different_seed_gives_different_data():
    a = _raw(generate_synthetic(seed=0, **SMALL)["train"])
    b = _raw(generate_synthetic(seed=1, **SMALL)["train"])
    assert a["table"] != b["table"]
    assert a["image"] != b["image"]


def test_columns_ids_and_labels_follow_chartqa_layout():
    dsd = generate_synthetic(seed=2, **SMALL)
    assert len(dsd["train"]) == 24 and len(dsd["test"]) == 8
    assert dsd["train"].features["image"] == datasets.Image()
    for split in ("train", "test"):
        rows = _raw(dsd[split])
        assert rows["id"] == [f"{split}-{i:06d}" for i in range(len(rows["id"]))]
        assert set(rows["split"]) == {split}
        for label in rows["label"]:
            assert isinstance(label, list) and len(label) == 1 and isinstance(label[0], str)


def test_every_label_is_rederived_from_table():
    dsd = generate_synthetic(
        seed=3, n_train=120, n_test=30, image_size=32, chart_kinds=CHART_KINDS, question_types=QUESTION_TYPES
    )
    checked = 0
    for split in ("train", "test"):
        rows = _raw(dsd[split])
        for table_json, qtype, label in zip(rows["table"], rows["type"], rows["label"], strict=True):
            assert label == [derive_answer(json.loads(table_json), qtype)]
            checked += 1
    assert checked == 150


def test_derive_answer_on_hand_written_tables():
    table = {
        "kind": "bar",
        "labels": ["A", "B", "C"],
        "values": [3, 9, 1],
        "colors": ["red", "green", "blue"],
        "ref": ["A", "C"],
    }
    assert derive_answer(table, "count") == "3"
    assert derive_answer(table, "color_max") == "green"
    assert derive_answer(table, "color_min") == "blue"
    assert derive_answer(table, "label_max") == "B"
    assert derive_answer(table, "label_min") == "C"
    assert derive_answer(table, "compare") == "Yes"
    assert derive_answer({**table, "ref": ["C", "A"]}, "compare") == "No"
    assert derive_answer({**table, "ref": ["B"]}, "value") == "9"
    with pytest.raises(UserError, match="question type"):
        derive_answer(table, "colour_max")


def test_train_and_test_are_disjoint():
    # A tiny configuration space (2 bars, one question type) forces many test candidates to collide with train.
    dsd = generate_synthetic(
        n_train=300,
        n_test=40,
        seed=0,
        image_size=32,
        question_types=("compare",),
        min_elements=2,
        max_elements=2,
    )
    train, test = _raw(dsd["train"]), _raw(dsd["test"])
    train_pairs = set(zip(train["table"], train["query"], strict=True))
    test_pairs = set(zip(test["table"], test["query"], strict=True))
    assert len(test["table"]) == 40
    assert not train_pairs & test_pairs


def test_disjoint_test_split_impossible_raises_user_error(monkeypatch):
    # Shrink the space to 2 values x 2 colours: 4 distinct 2-bar charts, all of which 200 train rows cover.
    # The generator must then say so instead of looping forever or leaking train rows into test.
    monkeypatch.setattr(synthetic, "MAX_VALUE", 2)
    monkeypatch.setattr(synthetic, "PALETTE", synthetic.PALETTE[:2])
    kwargs = dict(n_test=5, seed=0, image_size=32, question_types=("count",), min_elements=2, max_elements=2)
    with pytest.raises(UserError, match="n_train"):
        generate_synthetic(n_train=200, **kwargs)
    # with a single train row some charts are left over, so the same space can fill a disjoint test split
    dsd = generate_synthetic(n_train=1, **kwargs)
    assert dsd["train"][0]["table"] not in set(dsd["test"]["table"])


@pytest.mark.parametrize("kind", CHART_KINDS)
@pytest.mark.parametrize("qtype", QUESTION_TYPES)
def test_all_kinds_and_question_types_generate_valid_rows(kind, qtype):
    dsd = generate_synthetic(
        n_train=3, n_test=2, seed=11, image_size=64, chart_kinds=(kind,), question_types=(qtype,)
    )
    for split in ("train", "test"):
        ds = dsd[split]
        for row in ds:
            table = json.loads(row["table"])
            assert row["type"] == qtype and table["kind"] == kind
            assert row["label"] == [derive_answer(table, qtype)]
            n = len(table["values"])
            assert 2 <= n <= 5
            assert len(set(table["values"])) == n and all(1 <= v <= 10 for v in table["values"])
            assert len(set(table["colors"])) == n
            assert row["query"].endswith("?")
            img = row["image"]
            assert img.size == (64, 64) and img.mode == "RGB"
            colours = {c for _, c in img.getcolors(64 * 64)}
            for rgb in table["rgb"]:
                assert tuple(rgb) in colours, f"element colour {rgb} not drawn"
            if qtype == "value":
                assert table["printed"] == {table["ref"][0]: int(row["label"][0])}
            else:
                assert table["printed"] == {}


def test_image_size_and_mode():
    for size in (32, 100):
        img = generate_synthetic(n_train=2, n_test=1, image_size=size)["train"][0]["image"]
        assert img.size == (size, size)
        assert img.mode == "RGB"
        assert img.getpixel((0, 0)) == (255, 255, 255)  # white background


def test_query_text_and_count_answer():
    dsd = generate_synthetic(
        n_train=6, n_test=1, seed=4, image_size=32, chart_kinds=("pie",), question_types=("count",)
    )
    for row in dsd["train"]:
        assert row["query"] == "How many slices are there?"
        assert row["label"] == [str(len(json.loads(row["table"])["values"]))]


def test_compare_answers_are_balanced():
    rows = _raw(
        generate_synthetic(n_train=200, n_test=5, seed=0, image_size=32, question_types=("compare",))["train"]
    )
    counts = Counter(label[0] for label in rows["label"])
    assert set(counts) == {"Yes", "No"}
    assert 0.35 < counts["Yes"] / 200 < 0.65


def test_save_and_ensure_roundtrip_and_cache(tmp_path, monkeypatch):
    out = tmp_path / "synth"
    kwargs = dict(n_train=6, n_test=3, seed=9, image_size=32)
    path = save_synthetic(out, **kwargs)
    assert path == out
    params = json.loads((out / "synth_params.json").read_text())
    assert params["params"]["seed"] == 9 and params["params"]["n_train"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == [".synth.lock", "synth"], "no staging left behind"

    loaded = datasets.load_from_disk(str(out))
    assert _raw(loaded["train"]) == _raw(generate_synthetic(**kwargs)["train"])
    assert len(loaded["test"]) == 3

    expected_seed10 = _raw(generate_synthetic(**{**kwargs, "seed": 10})["train"])
    calls = []
    real_generate = synthetic._generate

    def counting_generate(p):
        calls.append(p)
        return real_generate(p)

    monkeypatch.setattr(synthetic, "_generate", counting_generate)
    assert ensure_synthetic(out, **kwargs) == out
    assert calls == []  # cache hit: nothing regenerated
    stamp = (out / "synth_params.json").stat().st_mtime_ns

    ensure_synthetic(out, **{**kwargs, "seed": 10})
    assert len(calls) == 1  # changed kwargs: regenerated
    assert json.loads((out / "synth_params.json").read_text())["params"]["seed"] == 10
    assert _raw(datasets.load_from_disk(str(out))["train"]) == expected_seed10
    assert (out / "synth_params.json").stat().st_mtime_ns >= stamp
    # the replaced dataset is moved aside, not deleted (another process may be reading it); no staging left
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("synth", ".synth.lock"))
    assert len(left) == 1 and left[0].startswith(".synth.old-"), left

    ensure_synthetic(out, **{**kwargs, "seed": 10})
    assert len(calls) == 1  # cached again


def test_ensure_creates_missing_dir_and_refuses_foreign_dir(tmp_path):
    out = ensure_synthetic(tmp_path / "a" / "b", n_train=2, n_test=1, image_size=32)
    assert (out / "synth_params.json").is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(UserError, match="synth_params.json"):
        ensure_synthetic(foreign, n_train=2, n_test=1, image_size=32)
    assert (foreign / "keep.txt").read_text() == "user data"
    assert os.listdir(foreign) == ["keep.txt"]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_train": 0}, "n_train"),
        ({"n_test": -1}, "n_test"),
        ({"n_train": 2.5}, "n_train"),
        ({"image_size": 16}, "image_size"),
        ({"chart_kinds": ("bar", "scatter")}, "chart_kinds"),
        ({"chart_kinds": ()}, "chart_kinds"),
        ({"question_types": ("count", "colour")}, "question_types"),
        ({"min_elements": 1}, "min_elements"),
        ({"max_elements": 9}, "max_elements"),
        ({"min_elements": 5, "max_elements": 3}, "min_elements"),
        ({"seed": "0"}, "seed"),
    ],
)
def test_bad_arguments_raise_user_error_naming_the_argument(kwargs, name, tmp_path):
    with pytest.raises(UserError, match=name):
        generate_synthetic(**{"n_train": 2, "n_test": 1, **kwargs})
    with pytest.raises(UserError, match=name):
        ensure_synthetic(tmp_path / "x", **{"n_train": 2, "n_test": 1, **kwargs})
    assert not (tmp_path / "x").exists()


def test_unknown_value_message_lists_allowed_values():
    with pytest.raises(UserError) as err:
        generate_synthetic(n_train=2, n_test=1, chart_kinds=("scatter",))
    assert "'scatter'" in str(err.value)
    for kind in CHART_KINDS:
        assert kind in str(err.value)


def test_png_bytes_decode_to_declared_size():
    rows = _raw(generate_synthetic(n_train=2, n_test=1, image_size=40)["test"])
    img = Image.open(io.BytesIO(rows["image"][0]))
    assert img.format == "PNG" and img.size == (40, 40)
