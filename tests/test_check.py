"""`vlm-tune check`: passes on good data, fails (non-zero) on broken data, dumps exactly what is trained."""

import json

from PIL import Image

from vlm_tune.cli import main
from vlm_tune.data.collate import IGNORE_INDEX


def write_cfg(tmp_path, cache_dir, source, extra=""):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"run:\n  output_dir: {tmp_path / 'run'}\nmodel:\n  cache_dir: {cache_dir}\n  image:\n    longest_edge: 64\n"
        f"data:\n  source: {source}\n  columns: {{image: image, question: question, answer: answer, id: id}}\n"
        f"train:\n  max_length: 256\n{extra}"
    )
    return cfg


def dataset(tmp_path, broken=False):
    Image.new("RGB", (64, 48), (200, 0, 0)).save(tmp_path / "a.png")
    rows = [
        {"id": f"r{i}", "image": "a.png", "question": "How many bars?", "answer": str(i), "split": s}
        for i in range(4)
        for s in ("train", "test")
    ]
    if broken:
        rows.append({"id": "broken1", "image": "gone.png", "question": "Q?", "answer": "1", "split": "train"})
        rows.append({"id": "broken2", "image": "a.png", "question": "Q?", "answer": "", "split": "train"})
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_check_good_data_and_dump(tmp_path, cache_dir, capsys):
    cfg = write_cfg(tmp_path, cache_dir, dataset(tmp_path))
    dump = tmp_path / "dump.jsonl"
    assert main(["check", str(cfg), "--dump", str(dump), "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert "OK: training can start" in out
    assert "image tokens: min 34, median 34" in out and "supervised fraction" in out
    assert "[[ 0<end_of_utterance>]]" in out  # the rendered sample marks the supervised span
    lines = [json.loads(x) for x in dump.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["r0", "r1", "r2"]
    for x in lines:
        assert x["supervised_text"] == f" {x['answer']}<end_of_utterance>"
        assert len(x["input_ids"]) == len(x["labels"])
        assert sum(lab != IGNORE_INDEX for lab in x["labels"]) == 2
    assert not (tmp_path / "run").exists(), "check trains nothing and writes no run"


def test_check_broken_data_fails_and_counts(tmp_path, cache_dir, capsys):
    cfg = write_cfg(tmp_path, cache_dir, dataset(tmp_path, broken=True))
    assert main(["check", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "missing_image: 1" in out and "bad_answer: 1" in out and "row broken1" in out
    assert "FAIL" in out


def test_check_overlong_rows(tmp_path, cache_dir, capsys):
    path = dataset(tmp_path)
    Image.new("RGB", (64, 16), (0, 0, 200)).save(tmp_path / "small.png")  # 2 tiles + global, not 4 + global
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for r in rows:
        r["image"] = "small.png" if r["id"] == "r0" else r["image"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = write_cfg(tmp_path, cache_dir, path)
    assert main(["check", str(cfg), "train.max_length=50"]) == 1
    out = capsys.readouterr().out
    assert "3 row(s) over train.max_length=50" in out and "overlong: 3" in out
    assert main(["check", str(cfg), "train.max_length=50", "data.on_overlong=skip"]) == 0
