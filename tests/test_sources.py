"""Data sources and bad rows: every kind of bad row names row and column; skip mode counts it."""

import json

import numpy as np
import pytest
from PIL import Image

from vlm_tune.config import build_config
from vlm_tune.data.sources import BadRow, load_split, prepare_split, to_rgb
from vlm_tune.errors import UserError


def write_rows(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def good_image(tmp_path, name="ok.png", mode="RGB"):
    Image.new(mode, (40, 30), 128 if mode in ("L", "P") else (10, 200, 30)).save(tmp_path / name)
    return name


def data_cfg(path, **extra):
    cols = {"image": "image", "question": "question", "answer": "answer", "id": "id"}
    return build_config({"data": {"source": str(path), "columns": cols, **extra}}).data


def test_jsonl_relative_paths_and_canonical_rows(tmp_path):
    good_image(tmp_path)
    path = write_rows(
        tmp_path, [{"id": "a", "image": "ok.png", "question": "Q?", "answer": "4", "split": "train"}]
    )
    rs = load_split(data_cfg(path), "train", tmp_path)
    r = rs.row(0)
    assert r["id"] == "a" and r["answers"] == ["4"] and r["question"] == "Q?"
    assert r["images"][0].mode == "RGB" and r["images"][0].size == (40, 30)


@pytest.mark.parametrize(
    "cell, reason",
    [
        ({"image": "missing.png", "answer": "1"}, "missing_image"),
        ({"image": "corrupt.png", "answer": "1"}, "corrupt_image"),
        ({"image": "truncated.png", "answer": "1"}, "corrupt_image"),
        ({"image": "ok.png", "answer": ""}, "bad_answer"),
        ({"image": "ok.png", "answer": None}, "bad_answer"),
        ({"image": "ok.png", "answer": {"x": 1}}, "bad_answer"),
        ({"image": None, "answer": "1"}, "missing_image"),
    ],
)
def test_bad_rows_named_and_skippable(tmp_path, cell, reason):
    good_image(tmp_path)
    (tmp_path / "corrupt.png").write_bytes(b"not a png at all")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    rows = [
        {"id": "good", "image": "ok.png", "question": "Q?", "answer": "2"},
        {"id": "bad7", "question": "Q?", **cell},
    ]
    path = write_rows(tmp_path, rows)
    rs = load_split(data_cfg(path), "train", tmp_path)
    with pytest.raises(BadRow) as info:
        prepare_split(rs, on_bad_row="error")
    msg = str(info.value)
    assert "row bad7" in msg and info.value.reason == reason
    assert "'image'" in msg or "'answer'" in msg
    prepared = prepare_split(rs, on_bad_row="skip")
    assert prepared.indices == [0]
    assert prepared.skipped == {reason: 1}
    assert reason in prepared.summary()


def test_missing_column_names_it_and_lists_available(tmp_path):
    good_image(tmp_path)
    path = write_rows(tmp_path, [{"id": "a", "image": "ok.png", "q": "Q?", "answer": "4"}])
    with pytest.raises(UserError, match=r"missing column\(s\): question → 'question'.*Available columns"):
        load_split(data_cfg(path), "train", tmp_path)


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "L", "I;16", "CMYK"])
def test_odd_modes_become_rgb(mode):
    if mode == "I;16":
        im = Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)
    else:
        im = Image.new(mode, (30, 20))
    out = to_rgb(im)
    assert out.mode == "RGB" and out.size == (30, 20)
    if mode == "I;16":
        arr = np.asarray(out)
        assert arr.min() == 0 and arr.max() == 255  # rescaled, not clipped to white


def test_rgba_transparent_becomes_white():
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(im).getpixel((0, 0)) == (255, 255, 255)


def test_zero_size_image_is_a_bad_row(tmp_path):
    from vlm_tune.data.sources import open_image

    with pytest.raises(BadRow, match="zero size"):
        open_image(Image.new("RGB", (0, 5)), None, "r1", "image")


def test_frame_folder_is_ordered_and_capped(tmp_path):
    frames = tmp_path / "clip"
    frames.mkdir()
    for i in range(10):
        Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(frames / f"f{i:02d}.png")
    path = write_rows(tmp_path, [{"id": "v", "frames": "clip", "question": "Q?", "answer": "a"}])
    cfg = build_config(
        {
            "data": {
                "source": str(path),
                "max_frames": 4,
                "columns": {"images": "frames", "question": "question", "answer": "answer"},
            }
        }
    ).data
    r = load_split(cfg, "train", tmp_path).row(0)
    reds = [im.getpixel((0, 0))[0] for im in r["images"]]
    assert len(reds) == 4 and reds == sorted(reds) and reds[0] == 0


def test_conversational_rows(tmp_path):
    good_image(tmp_path)
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "3"}]},
    ]
    path = write_rows(tmp_path, [{"messages": msgs, "images": ["ok.png"]}])
    cfg = build_config(
        {"data": {"source": str(path), "columns": {"messages": "messages", "images": "images"}}}
    ).data
    r = load_split(cfg, "train", tmp_path).row(0)
    assert r["answers"] == ["3"] and r["question"] == "How many?" and len(r["images"]) == 1
    assert r["messages"][0]["content"][0] == {"type": "image"}


def test_chartqa_schema_stand_in_flows_through_real_config(tmp_path):
    """A local dataset with HuggingFaceM4/ChartQA's schema goes through the 256M config's data section."""
    import datasets

    from vlm_tune.config import load_config

    ims = [Image.new("RGB", (80, 60), (i * 40, 0, 0)) for i in range(4)]
    feats = datasets.Features(
        {
            "image": datasets.Image(),
            "query": datasets.Value("string"),
            "label": datasets.Sequence(datasets.Value("string")),
            "human_or_machine": datasets.ClassLabel(names=["human", "augmented"]),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "image": ims,
            "query": ["q0", "q1", "q2", "q3"],
            "label": [["1"], ["Yes"], ["0.57"], ["2014"]],
            "human_or_machine": [0, 1, 0, 1],
        },
        features=feats,
    )
    datasets.DatasetDict({"train": ds, "val": ds, "test": ds}).save_to_disk(str(tmp_path / "chartqa"))
    cfg = load_config("configs/smolvlm-256m-chartqa.yaml", [f"data.source={tmp_path / 'chartqa'}"])
    rs = load_split(cfg.data, cfg.data.eval_split, tmp_path)
    rows = [rs.row(i) for i in range(4)]
    assert [r["split"] for r in rows] == ["human", "augmented", "human", "augmented"]
    assert [r["answers"] for r in rows] == [["1"], ["Yes"], ["0.57"], ["2014"]]
    assert rows[0]["question"] == "q0" and rows[0]["images"][0].size == (80, 60)


def test_unknown_hub_dataset_offline_names_it_and_the_fix(tmp_path):
    cfg = build_config({"data": {"source": "nobody-xyz/no-such-dataset"}}).data
    with pytest.raises(UserError, match="nobody-xyz/no-such-dataset.*save_to_disk"):
        load_split(cfg, "train", tmp_path)


def test_video_file_without_decoder_names_the_fix(tmp_path, monkeypatch):
    import builtins

    from vlm_tune.data.sources import expand_images

    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("no av")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(BadRow, match="install PyAV") as info:
        expand_images("clip.mp4", tmp_path, 8, "v1", "frames")
    assert info.value.reason == "video_decoder_missing" and "row v1" in str(info.value)
