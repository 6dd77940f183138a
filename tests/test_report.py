"""Tests for vlm_tune.report and scripts/screenshot_report.py."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from vlm_tune.errors import UserError
from vlm_tune.metrics import aggregate, exact_match, relaxed_accuracy, relaxed_accuracy_strict
from vlm_tune.report import THUMBNAIL_MAX_PX, write_report

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "screenshot_report.py"

# id, type, split, question, gold, prediction of A, prediction of B
QUESTIONS = [
    ("q1", "count", "human", "How many bars are there?", ["4"], "4", "4"),
    ("q2", "value", "human", "What is the value of 2019?", ["62%"], "70", "62"),  # improved
    ("q3", "yesno", "augmented", "Is the red bar the tallest?", ["Yes"], "Yes", "No"),  # regressed
    ("q4", "value", "augmented", "What is the sum of A and B?", ["1,000"], "1200", "1000"),  # improved
    ("q5", "yesno", "augmented", "Is <b>bold</b> & 'quoted' \"text\" escaped?", ["No"], "Yes", "Maybe"),
]
CHANGED_IDS = {"q2", "q3", "q4"}


def _score(qid, qtype, split, question, gold, pred):
    return {
        "id": qid,
        "question": question,
        "gold": gold,
        "prediction": pred,
        "exact": exact_match(pred, gold),
        "relaxed": relaxed_accuracy(pred, gold),
        "relaxed_strict": relaxed_accuracy_strict(pred, gold),
        "type": qtype,
        "split": split,
    }


def _write_eval_dir(path: Path, rows: list[dict], with_metrics: bool = True) -> dict:
    path.mkdir(parents=True)
    with (path / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    metrics = aggregate(rows)
    if with_metrics:
        (path / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return metrics


def _chart(seed: int, size=(320, 240)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    for i in range(4):
        h = 40 + ((seed * 37 + i * 53) % 160)
        x0 = 30 + i * 70
        draw.rectangle([x0, size[1] - 20 - h, x0 + 45, size[1] - 20], fill=colors[i])
    draw.line([20, size[1] - 20, size[0] - 10, size[1] - 20], fill="black", width=2)
    return img


@pytest.fixture
def eval_dirs(tmp_path):
    rows_a = [_score(q, t, s, qu, g, pa) for q, t, s, qu, g, pa, _ in QUESTIONS]
    rows_b = [_score(q, t, s, qu, g, pb) for q, t, s, qu, g, _, pb in QUESTIONS]
    ma = _write_eval_dir(tmp_path / "run_a" / "eval", rows_a)
    mb = _write_eval_dir(tmp_path / "run_b" / "eval", rows_b)
    return tmp_path / "run_a" / "eval", tmp_path / "run_b" / "eval", ma, mb


@pytest.fixture
def images():
    # q5 has no image -> placeholder
    return {q[0]: _chart(i) for i, q in enumerate(QUESTIONS) if q[0] != "q5"}


def _rows(page: str) -> list[str]:
    tbody = page.split('<table id="questions">', 1)[1]
    return re.findall(r"<tr[^>]*data-id=[^>]*>", tbody)


def test_fixture_has_the_intended_changes(eval_dirs):
    a_dir, b_dir, ma, mb = eval_dirs
    assert ma["relaxed_accuracy"] == pytest.approx(2 / 5)
    assert mb["relaxed_accuracy"] == pytest.approx(3 / 5)


def test_report_content(tmp_path, eval_dirs, images):
    a_dir, b_dir, ma, mb = eval_dirs
    out = write_report(tmp_path / "out" / "report.html", a_dir, b_dir, images=images)
    assert out == tmp_path / "out" / "report.html"
    page = out.read_text(encoding="utf-8")

    # one row per id, in A's order
    rows = _rows(page)
    assert [re.search(r'data-id="([^"]*)"', r).group(1) for r in rows] == [q[0] for q in QUESTIONS]

    # changed rows flagged: attribute count equals the true number, and they are the right ones
    assert page.count('data-changed="1"') == len(CHANGED_IDS) == 3
    assert page.count('data-changed="0"') == len(QUESTIONS) - len(CHANGED_IDS)
    flagged = {re.search(r'data-id="([^"]*)"', r).group(1) for r in rows if 'data-changed="1"' in r}
    assert flagged == CHANGED_IDS
    assert all("changed" in r.split("data-id")[0] for r in rows if 'data-changed="1"' in r)
    assert sum('class="changed improved"' in r for r in rows) == 2
    assert sum('class="changed regressed"' in r for r in rows) == 1

    # images embedded, one placeholder
    assert page.count("data:image/png;base64,") == 4
    assert page.count('class="noimg"') == 1

    # text escaped
    assert "<b>bold</b>" not in page
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &#x27;quoted&#x27; &quot;text&quot;" in page

    # self-contained
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", page)

    # summary: A 40.0 relaxed, B 60.0, delta +20.0; names default to parent/dir
    summary = page.split('<table class="summary">', 1)[1].split("</table>", 1)[0]
    assert "40.0" in summary and "60.0" in summary and "+20.0" in summary
    for m in (ma, mb):
        for key in ("exact_match", "relaxed_accuracy", "relaxed_accuracy_strict"):
            assert f"{100 * m[key]:.1f}" in summary
    for group in ("overall", "split: human", "split: augmented", "type: count", "type: value", "type: yesno"):
        assert f">{group}<" in summary
    assert "run_a/eval" in page and "run_b/eval" in page

    # filter controls
    assert '<select id="filter-type">' in page
    for t in ("count", "value", "yesno"):
        assert f'<option value="{t}">' in page
    assert 'type="checkbox" id="filter-changed"' in page
    assert "<script>" in page and "dataset.changed" in page


def test_thumbnails_are_small_pngs(tmp_path, eval_dirs):
    a_dir, b_dir, _, _ = eval_dirs
    big = {"q1": _chart(1, size=(1200, 800)), "q2": _chart(2, size=(100, 900)).convert("P")}
    page = write_report(tmp_path / "r.html", a_dir, b_dir, images=big).read_text(encoding="utf-8")
    blobs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(blobs) == 2
    for blob in blobs:
        raw = base64.b64decode(blob)
        assert raw.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(io.BytesIO(raw)) as im:
            assert max(im.size) <= THUMBNAIL_MAX_PX
            assert max(im.size) == THUMBNAIL_MAX_PX  # downscaled, not shrunk further


def test_callable_images_names_and_title(tmp_path, eval_dirs):
    a_dir, b_dir, _, _ = eval_dirs

    def load(qid):
        if qid == "q1":
            return _chart(1)
        if qid == "q2":
            raise OSError("broken file")
        return None

    page = write_report(
        tmp_path / "r.html", a_dir, b_dir, a_name="base <model>", b_name="lora", images=load, title="T & T"
    ).read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 1
    assert page.count('class="noimg"') == 4
    assert "image error: OSError: broken file" in page
    assert "<title>T &amp; T</title>" in page
    assert "base &lt;model&gt;" in page and "base <model>" not in page


def test_no_images_and_missing_metrics_json(tmp_path):
    rows_a = [_score(q, t, s, qu, g, pa) for q, t, s, qu, g, pa, _ in QUESTIONS]
    rows_b = [_score(q, t, s, qu, g, pb) for q, t, s, qu, g, _, pb in QUESTIONS[:3]]  # B lacks q4, q5
    rows_b.append(_score("q9", "count", "human", "Only in B?", ["3"], "3"))
    _write_eval_dir(tmp_path / "a", rows_a, with_metrics=False)
    _write_eval_dir(tmp_path / "b", rows_b, with_metrics=False)
    page = write_report(tmp_path / "r.html", tmp_path / "a", tmp_path / "b").read_text(encoding="utf-8")
    rows = _rows(page)
    assert [re.search(r'data-id="([^"]*)"', r).group(1) for r in rows] == ["q1", "q2", "q3", "q4", "q5", "q9"]
    assert page.count('data-changed="1"') == 2  # q2 improved, q3 regressed; one-sided rows never count
    assert page.count("not evaluated") == 3
    assert page.count('class="noimg"') == 6
    summary = page.split('<table class="summary">', 1)[1].split("</table>", 1)[0]
    assert "40.0" in summary  # A computed from predictions: 2/5
    assert "75.0" in summary  # B: q1, q2, q9 correct out of 4


def test_atomic_overwrite_leaves_no_temp_files(tmp_path, eval_dirs):
    a_dir, b_dir, _, _ = eval_dirs
    out = tmp_path / "reports" / "r.html"
    out.parent.mkdir()
    out.write_text("old", encoding="utf-8")
    write_report(out, a_dir, b_dir)
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in out.parent.iterdir()] == ["r.html"]


def test_bad_inputs_raise_user_error(tmp_path, eval_dirs):
    a_dir, _, _, _ = eval_dirs
    with pytest.raises(UserError, match="does not exist"):
        write_report(tmp_path / "r.html", a_dir, tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(UserError, match="predictions.jsonl"):
        write_report(tmp_path / "r.html", a_dir, bad)
    (bad / "predictions.jsonl").write_text('{"id": "x"}\nnot json\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"predictions.jsonl:2"):
        write_report(tmp_path / "r.html", a_dir, bad)
    (bad / "predictions.jsonl").write_text('{"id": "x"}\n{"id": "x"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="duplicate id"):
        write_report(tmp_path / "r.html", a_dir, bad)
    assert not (tmp_path / "r.html").exists()


def _find_browser():
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.slow
def test_screenshot_script(tmp_path, eval_dirs, images):
    if _find_browser() is None:
        if os.environ.get("VLM_TUNE_REQUIRE_BROWSER") == "1":  # set by .ci/run, which installs one
            pytest.fail(
                "VLM_TUNE_REQUIRE_BROWSER=1 but no chromium / chromium-browser / google-chrome on PATH"
            )
        pytest.skip("no chromium / chromium-browser / google-chrome on PATH")
    a_dir, b_dir, _, _ = eval_dirs
    report = write_report(tmp_path / "report.html", a_dir, b_dir, images=images)
    png = tmp_path / "shot" / "report.png"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(report), str(png)], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 5_000
    with Image.open(png) as im:
        assert im.size == (1200, 1600)


def test_screenshot_script_without_browser(tmp_path, eval_dirs):
    a_dir, b_dir, _, _ = eval_dirs
    report = write_report(tmp_path / "report.html", a_dir, b_dir)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(report), str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": str(tmp_path / "empty-bin")},
    )
    assert proc.returncode == 2
    assert "no Chromium found" in proc.stderr
    assert not (tmp_path / "x.png").exists()
