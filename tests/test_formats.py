"""Data layouts (ChartQA as released, LLaVA, ShareGPT) and byte-exact gold answers in every source format."""

import json

import pytest
from PIL import Image

from vlm_tune.cli import main
from vlm_tune.config import build_config
from vlm_tune.data.formats import answer_warnings
from vlm_tune.data.sources import BadRow, load_split, prepare_split
from vlm_tune.errors import UserError

# the written text of each label; JSON cannot write 007 or U.S. as numbers, so those stay strings there
LABELS = ["1.216666667", "2577420", "007", "0.50", "1e-3", "U.S."]
JSON_NUMBER = {"1.216666667", "2577420", "0.50", "1e-3"}
COLS = {"image": "image", "question": "question", "answer": "answer"}


def png(path, color=(200, 30, 30), size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def data_cfg(source, columns=COLS, **extra):
    return build_config({"data": {"source": str(source), "columns": columns, **extra}}).data


def answers(source, split="train", columns=COLS):
    rs = load_split(data_cfg(source, columns), split, source.parent)
    return [rs.row(i)["answers"] for i in range(len(rs))]


# ---------------------------------------------------------------------------------------------------------
# part 3: answers are strings, byte-exact


def test_jsonl_numbers_keep_their_written_text(tmp_path):
    png(tmp_path / "a.png")
    lines = [
        '{"image": "a.png", "question": "Q?", "answer": %s}' % (v if v in JSON_NUMBER else json.dumps(v))
        for v in LABELS
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    assert answers(tmp_path / "d.jsonl") == [[v] for v in LABELS]


def test_json_list_numbers_keep_their_written_text(tmp_path):
    png(tmp_path / "a.png")
    items = ", ".join(
        '{"image": "a.png", "question": "Q?", "answer": [%s]}' % (v if v in JSON_NUMBER else json.dumps(v))
        for v in LABELS
    )
    (tmp_path / "d.json").write_text(f"[{items}]")
    assert answers(tmp_path / "d.json") == [[v] for v in LABELS]


def test_csv_cells_are_text_as_written(tmp_path):
    png(tmp_path / "a.png")
    body = "".join(f"a.png,Q?,{v}\n" for v in LABELS)
    (tmp_path / "d.csv").write_text("image,question,answer\n" + body)
    assert answers(tmp_path / "d.csv") == [[v] for v in LABELS]


def test_csv_trailing_newline_in_a_cell_is_kept_and_check_counts_it(tmp_path):
    """The rule: an answer is kept exactly (surrounding whitespace included); whitespace-only is a bad row."""
    png(tmp_path / "a.png")
    (tmp_path / "d.csv").write_text('image,question,answer\na.png,Q?,"yes\n"\na.png,Q?," 4"\na.png,Q?,"  "\n')
    rs = load_split(data_cfg(tmp_path / "d.csv"), "train", tmp_path)
    assert rs.row(0)["answers"] == ["yes\n"] and rs.row(1)["answers"] == [" 4"]
    with pytest.raises(BadRow, match="answer is empty"):
        rs.row(2)
    warnings = answer_warnings(rs, [0, 1])
    assert len(warnings) == 1 and warnings[0].startswith("2 answer(s) in column 'answer' start or end")


def test_parquet_string_column_is_exact_and_float_column_is_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    png(tmp_path / "a.png")
    n = len(LABELS)
    pq.write_table(
        pa.table({"image": ["a.png"] * n, "question": ["Q?"] * n, "answer": LABELS}), tmp_path / "s.parquet"
    )
    assert answers(tmp_path / "s.parquet") == [[v] for v in LABELS]
    rs = load_split(data_cfg(tmp_path / "s.parquet"), "train", tmp_path)
    assert answer_warnings(rs) == []

    floats = [1.216666667, 2577420.0, 7.0, 0.5, 1e-3]
    pq.write_table(
        pa.table({"image": ["a.png"] * 5, "question": ["Q?"] * 5, "answer": floats}), tmp_path / "f.parquet"
    )
    rs = load_split(data_cfg(tmp_path / "f.parquet"), "train", tmp_path)
    # the written text is gone; what is left is the shortest round-trip text, never format(v, "g")
    assert [rs.row(i)["answers"] for i in range(5)] == [
        ["1.216666667"],
        ["2577420"],
        ["7"],
        ["0.5"],
        ["0.001"],
    ]
    (warning,) = answer_warnings(rs)
    assert warning.startswith("5 answer(s) in column 'answer' are stored as numbers (float)")


def test_save_to_disk_strings_and_hub_style_label_lists_are_exact(tmp_path):
    import datasets

    png(tmp_path / "a.png")
    ds = datasets.Dataset.from_dict(
        {"image": [str(tmp_path / "a.png")] * 6, "query": ["Q?"] * 6, "label": [[v] for v in LABELS]}
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "disk"))
    rs = load_split(build_config({"data": {"source": str(tmp_path / "disk")}}).data, "train", tmp_path)
    assert [rs.row(i)["answers"] for i in range(6)] == [[v] for v in LABELS]


def test_check_warns_about_a_float_answer_column_and_still_passes(tmp_path, cache_dir, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    png(tmp_path / "a.png", size=(64, 48))
    pq.write_table(
        pa.table(
            {
                "image": ["a.png"] * 4,
                "question": ["Q?"] * 4,
                "answer": [1.5, 2.0, 0.25, 3.0],
                "split": ["train", "train", "test", "test"],
            }
        ),
        tmp_path / "f.parquet",
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model:\n  cache_dir: {cache_dir}\n  image:\n    longest_edge: 64\ndata:\n  source: {tmp_path / 'f.parquet'}\n"
        "  columns: {image: image, question: question, answer: answer}\ntrain:\n  max_length: 256\n"
    )
    assert main(["check", str(cfg)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: 2 answer(s) in column 'answer' are stored as numbers (float)" in out


# ---------------------------------------------------------------------------------------------------------
# part 4: ChartQA as released


def chartqa_release(tmp_path):
    root = tmp_path / "release" / "ChartQA Dataset"
    for split in ("train", "val", "test"):
        png(root / split / "png" / "c1.png", (10, 10, 10))
        png(root / split / "png" / "c2.png", (20, 20, 20))
        human = [{"imgname": "c1.png", "query": f"{split} human?", "label": "0.50"}]
        if split == "val":  # a label written as a JSON number keeps its text
            human = [{"imgname": "c1.png", "query": "val human?", "label": "__NUMBER__"}]
        augmented = [
            {"imgname": "c2.png", "query": f"{split} aug 1?", "label": "007"},
            {"imgname": "c1.png", "query": f"{split} aug 2?", "label": "U.S."},
        ]
        (root / split / f"{split}_human.json").write_text(
            json.dumps(human).replace('"__NUMBER__"', "1.216666667")
        )
        (root / split / f"{split}_augmented.json").write_text(json.dumps(augmented))
    return root


@pytest.mark.parametrize("point_at", ["parent", "root"])
def test_chartqa_release_splits_and_subsets(tmp_path, point_at):
    root = chartqa_release(tmp_path)
    source = root.parent if point_at == "parent" else root
    cfg = build_config({"data": {"source": str(source)}}).data  # default columns: the layout brings its own
    rs = load_split(cfg, "test", tmp_path)
    rows = [rs.row(i) for i in range(len(rs))]
    assert [r["split"] for r in rows] == ["human", "augmented", "augmented"]
    assert [r["answers"] for r in rows] == [["0.50"], ["007"], ["U.S."]]
    assert [r["question"] for r in rows] == ["test human?", "test aug 1?", "test aug 2?"]
    assert rows[1]["images"][0].getpixel((0, 0)) == (20, 20, 20)
    assert len({r["id"] for r in rows}) == 3
    assert len(load_split(cfg, "train", tmp_path)) == 3
    only = load_split(cfg, "val_augmented", tmp_path)
    assert [only.row(i)["question"] for i in range(len(only))] == ["val aug 1?", "val aug 2?"]
    assert load_split(cfg, "val_human", tmp_path).row(0)["answers"] == ["1.216666667"]
    with pytest.raises(UserError, match=r"no split 'dev'; available: \['train', 'train_human'"):
        load_split(cfg, "dev", tmp_path)


def test_chartqa_release_metrics_report_human_and_augmented_separately(tmp_path):
    from vlm_tune.evaluate import score
    from vlm_tune.metrics import aggregate

    root = chartqa_release(tmp_path)
    rs = load_split(build_config({"data": {"source": str(root)}}).data, "test", tmp_path)
    rows = [rs.row(i) for i in range(len(rs))]
    metrics = aggregate(score(rows, ["0.50", "wrong", "U.S."]))
    assert metrics["by_split"]["human"]["n"] == 1 and metrics["by_split"]["augmented"]["n"] == 2
    assert metrics["by_split"]["human"]["exact_match"] == 1.0
    assert metrics["by_split"]["augmented"]["exact_match"] == 0.5


def test_chartqa_release_missing_png_is_a_bad_row_naming_the_file(tmp_path):
    root = chartqa_release(tmp_path)
    (root / "test" / "png" / "c2.png").unlink()
    rs = load_split(build_config({"data": {"source": str(root)}}).data, "test", tmp_path)
    with pytest.raises(BadRow, match=r"row test_augmented/0.*c2\.png") as info:
        prepare_split(rs)
    assert info.value.reason == "missing_image"


def test_unrecognised_directory_exits_2_naming_the_layouts(tmp_path, capsys):
    (tmp_path / "stuff").mkdir()
    png(tmp_path / "stuff" / "x.png")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  source: {tmp_path / 'stuff'}\n")
    assert main(["check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "directory layout not recognised" in err and "ChartQA as released" in err
    assert "Traceback" not in err


def test_check_reads_a_chartqa_release_and_a_llava_file(tmp_path, cache_dir, capsys):
    """Both layouts go through the real pre-flight: processor, chat template, token counts, supervision."""
    root = chartqa_release(tmp_path)
    png(tmp_path / "a.png", size=(64, 48))
    row = {
        "id": "l1",
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "007"}],
    }
    (tmp_path / "llava.jsonl").write_text(json.dumps(row) + "\n")
    for source, answer in ((root, "0.50"), (tmp_path / "llava.jsonl", "007")):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            f"model:\n  cache_dir: {cache_dir}\n  image:\n    longest_edge: 64\ndata:\n  source: '{source}'\n"
            "train:\n  max_length: 256\n"
        )
        dump = tmp_path / "dump.jsonl"
        assert main(["check", str(cfg), "--dump", str(dump), "--rows", "1"]) == 0
        assert "OK: training can start" in capsys.readouterr().out
        first = json.loads(dump.read_text().splitlines()[0])
        assert first["answer"] == answer and answer in first["supervised_text"]


# ---------------------------------------------------------------------------------------------------------
# part 4: LLaVA and ShareGPT conversational rows


def test_llava_rows_place_each_image_at_its_placeholder(tmp_path):
    png(tmp_path / "img" / "a.png", (1, 1, 1))
    png(tmp_path / "img" / "b.png", (2, 2, 2))
    rows = [
        {
            "id": 17,
            "image": "img/a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is the value?"},
                {"from": "gpt", "value": "0.50"},
            ],
        },
        {
            "id": "two",
            "images": ["img/a.png", "img/b.png"],
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Left <image> right <image> which is darker?"},
                {"from": "gpt", "value": "left"},
            ],
        },
    ]
    (tmp_path / "llava.json").write_text(json.dumps(rows))
    rs = load_split(build_config({"data": {"source": str(tmp_path / "llava.json")}}).data, "train", tmp_path)
    r0 = rs.row(0)
    assert r0["id"] == "17" and r0["answers"] == ["0.50"]
    assert r0["messages"][0] == {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is the value?"}],
    }
    assert r0["images"][0].getpixel((0, 0)) == (1, 1, 1)
    assert rs.columns["images"] == "images"  # `image` in one row, `images` in another: both read
    r1 = rs.row(1)
    assert [m["role"] for m in r1["messages"]] == ["system", "user", "assistant"]
    assert r1["messages"][1]["content"] == [
        {"type": "text", "text": "Left "},
        {"type": "image"},
        {"type": "text", "text": " right "},
        {"type": "image"},
        {"type": "text", "text": " which is darker?"},
    ]
    assert [im.getpixel((0, 0)) for im in r1["images"]] == [(1, 1, 1), (2, 2, 2)]


def test_sharegpt_rows_llama_factory_layout(tmp_path):
    png(tmp_path / "a.png", (5, 5, 5))
    row = {
        "messages": [
            {"role": "user", "content": "<image>Which year is highest?"},
            {"role": "assistant", "content": "2014"},
            {"role": "user", "content": "And lowest?"},
            {"role": "assistant", "content": "2577420"},
        ],
        "images": ["a.png"],
    }
    (tmp_path / "sg.jsonl").write_text(json.dumps(row) + "\n")
    r = load_split(
        build_config({"data": {"source": str(tmp_path / "sg.jsonl")}}).data, "train", tmp_path
    ).row(0)
    assert r["messages"][0]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "Which year is highest?"},
    ]
    assert r["answers"] == ["2577420"] and r["question"] == "And lowest?" and len(r["images"]) == 1


@pytest.mark.parametrize(
    "placeholders, images",
    [("<image><image>Q?", ["a.png"]), ("Q?", ["a.png"]), ("<image>Q?", []), ("<image>Q?", None)],
)
def test_placeholder_and_image_counts_must_match(tmp_path, placeholders, images):
    png(tmp_path / "a.png")
    good = {"messages": [{"role": "user", "content": "<image>Q?"}, {"role": "assistant", "content": "1"}]}
    bad = {"messages": [{"role": "user", "content": placeholders}, {"role": "assistant", "content": "2"}]}
    rows = [{**good, "images": ["a.png"]}, {**bad, "images": images} if images is not None else bad]
    (tmp_path / "sg.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rs = load_split(build_config({"data": {"source": str(tmp_path / "sg.jsonl")}}).data, "train", tmp_path)
    with pytest.raises(BadRow, match=r"row train\[1\].*image slot") as info:
        prepare_split(rs)
    assert info.value.reason == "image_count_mismatch"
    skipped = prepare_split(rs, on_bad_row="skip")
    assert skipped.indices == [0] and skipped.skipped == {"image_count_mismatch": 1}


def test_llava_unknown_role_is_a_bad_row(tmp_path):
    png(tmp_path / "a.png")
    row = {
        "image": "a.png",
        "conversations": [{"from": "bot", "value": "<image>Q"}, {"from": "gpt", "value": "1"}],
    }
    (tmp_path / "l.jsonl").write_text(json.dumps(row) + "\n")
    rs = load_split(build_config({"data": {"source": str(tmp_path / "l.jsonl")}}).data, "train", tmp_path)
    with pytest.raises(BadRow, match="from human/gpt/system") as info:
        rs.row(0)
    assert info.value.reason == "bad_messages"


def test_json_that_is_not_a_list_of_rows_is_not_recognised(tmp_path):
    (tmp_path / "d.json").write_text('{"a": 1, "b": 2}')
    with pytest.raises(UserError, match="layout not recognised.*LLaVA"):
        load_split(data_cfg(tmp_path / "d.json"), "train", tmp_path)
    (tmp_path / "d.json").write_text('[{"a": 1}, ')
    with pytest.raises(UserError, match=r"d\.json: not valid JSON"):
        load_split(data_cfg(tmp_path / "d.json"), "train", tmp_path)


def test_a_json_file_with_one_object_a_line_is_read_as_lines(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "d.json").write_text(
        '{"image": "a.png", "question": "Q?", "answer": 0.50}\n{"image": "a.png", "question": "Q?", "answer": "x"}\n'
    )
    assert answers(tmp_path / "d.json") == [["0.50"], ["x"]]
