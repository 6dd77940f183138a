"""Self-contained HTML report comparing two evaluation runs (A and B) question by question.

An eval directory holds ``metrics.json`` (``n``, ``exact_match``, ``relaxed_accuracy``,
``relaxed_accuracy_strict``, ``by_split``, ``by_type``) and ``predictions.jsonl`` (one object per
line: ``id``, ``question``, ``gold`` (list of str), ``prediction``, ``exact``, ``relaxed``,
``relaxed_strict``, ``type``, ``split``). When ``metrics.json`` is absent the summary is computed
from the predictions with :func:`vlm_tune.metrics.aggregate`.

The page has a summary table (A, B and B - A, overall, per split and per type) and one row per
question id (rows of A first, in A's order, then ids only B has). A question's correctness is its
``relaxed`` score (>= 0.5 counts as correct); a row whose correctness differs between A and B is
flagged with ``data-changed="1"`` and the CSS class ``changed`` (plus ``improved``/``regressed``).
Filters (type, split, only changed) are a few lines of inline JS over data attributes. Everything
is inline: images become base64 PNG thumbnails (at most 160 px), no external resources.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlm_tune.errors import UserError
from vlm_tune.metrics import aggregate

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["THUMBNAIL_MAX_PX", "load_eval_dir", "write_report"]

THUMBNAIL_MAX_PX = 160

ImageSource = Mapping[str, "Image.Image"] | Callable[[str], "Image.Image | None"] | None

_METRICS = (
    ("exact_match", "Exact match"),
    ("relaxed_accuracy", "Relaxed acc."),
    ("relaxed_accuracy_strict", "Relaxed (strict)"),
    ("score", "Protocol score"),
)


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def load_eval_dir(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read ``metrics.json`` and ``predictions.jsonl`` from an eval directory.

    Returns ``(metrics, rows)``; ``metrics`` is computed from the rows when ``metrics.json`` is
    missing. Raises :class:`UserError` for a missing directory or predictions file, a line that
    is not a JSON object, a row without ``id`` or a duplicated ``id``.
    """
    d = Path(path)
    if not d.is_dir():
        raise UserError(
            f"eval directory {d} does not exist (expected metrics.json and predictions.jsonl in it)"
        )
    pred_path = d / "predictions.jsonl"
    if not pred_path.is_file():
        raise UserError(f"{pred_path} is missing; run the evaluation first")
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    with pred_path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{pred_path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or "id" not in row:
                raise UserError(f"{pred_path}:{lineno}: expected a JSON object with an 'id' field")
            rid = str(row["id"])
            if rid in seen:
                raise UserError(f"{pred_path}:{lineno}: duplicate id {rid!r}")
            seen.add(rid)
            rows.append(row)
    metrics_path = d / "metrics.json"
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{metrics_path}: not valid JSON ({e.msg})") from None
        if not isinstance(metrics, dict):
            raise UserError(f"{metrics_path}: expected a JSON object")
    else:
        try:
            metrics = aggregate(rows)
        except ValueError as e:
            raise UserError(f"{pred_path}: {e}") from None
    return metrics, rows


# --------------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------------


def _thumbnail_data_uri(img: Image.Image) -> tuple[str, int, int]:
    from PIL import Image as PILImage

    thumb = img.copy()
    if thumb.mode not in ("RGB", "RGBA", "L", "LA"):
        has_alpha = "A" in thumb.getbands() or "transparency" in thumb.info
        thumb = thumb.convert("RGBA" if has_alpha else "RGB")
    thumb.thumbnail((THUMBNAIL_MAX_PX, THUMBNAIL_MAX_PX), PILImage.Resampling.LANCZOS)
    buf = io.BytesIO()
    thumb.save(buf, format="PNG", optimize=True)
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return uri, thumb.width, thumb.height


def _image_cell(rid: str, images: ImageSource) -> str:
    img = None
    problem = "no image"
    try:
        if isinstance(images, Mapping):
            img = images.get(rid)
        elif callable(images):
            img = images(rid)
        if img is not None:
            uri, w, h = _thumbnail_data_uri(img)
            return (
                f'<td class="thumb"><img src="{uri}" width="{w}" height="{h}" alt="chart {_esc(rid)}"></td>'
            )
    except Exception as e:  # a broken image must not sink the whole report
        problem = f"image error: {type(e).__name__}: {e}"
    return f'<td class="thumb"><div class="noimg" title="{_esc(problem)}">no image</div></td>'


def _pct(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{100.0 * value:.1f}"
    return "—"


def _delta(a: Any, b: Any) -> str:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
        return '<td class="num delta">—</td>'
    d = 100.0 * (b - a)
    cls = "up" if d >= 0.05 else "down" if d <= -0.05 else "same"
    text = "0.0" if cls == "same" else f"{d:+.1f}"
    return f'<td class="num delta {cls}">{text}</td>'


def _summary_groups(ma: dict[str, Any], mb: dict[str, Any]) -> list[tuple[str, dict, dict]]:
    groups: list[tuple[str, dict, dict]] = [("overall", ma, mb)]
    for key, label in (("by_split", "split"), ("by_type", "type")):
        ga = ma.get(key) or {}
        gb = mb.get(key) or {}
        for name in sorted(set(ga) | set(gb)):
            groups.append((f"{label}: {name}", ga.get(name) or {}, gb.get(name) or {}))
    return groups


def _summary_table(ma: dict[str, Any], mb: dict[str, Any], a_name: str, b_name: str) -> str:
    head1 = '<tr><th rowspan="2">group</th><th colspan="2">n</th>'
    head1 += "".join(f'<th colspan="3">{_esc(label)} (%)</th>' for _, label in _METRICS) + "</tr>"
    sub = f'<th title="{_esc(a_name)}">A</th><th title="{_esc(b_name)}">B</th>'
    head2 = "<tr>" + sub + "".join(sub + "<th>Δ</th>" for _ in _METRICS) + "</tr>"
    body = []
    for label, ga, gb in _summary_groups(ma, mb):
        cells = [f'<th scope="row">{_esc(label)}</th>']
        cells += [f'<td class="num">{_esc(g.get("n", "—"))}</td>' for g in (ga, gb)]
        for key, _ in _METRICS:
            a, b = ga.get(key), gb.get(key)
            cells += [f'<td class="num">{_pct(a)}</td>', f'<td class="num">{_pct(b)}</td>', _delta(a, b)]
        body.append(f'<tr class="{"overall" if label == "overall" else "group"}">' + "".join(cells) + "</tr>")
    return f'<table class="summary"><thead>{head1}{head2}</thead><tbody>{"".join(body)}</tbody></table>'


def _is_correct(row: dict[str, Any] | None) -> bool | None:
    if row is None:
        return None
    try:
        return float(row.get("relaxed", 0.0)) >= 0.5
    except (TypeError, ValueError):
        return False


def _mark(value: Any) -> str:
    try:
        return "✓" if float(value) >= 0.5 else "✗"
    except (TypeError, ValueError):
        return "?"


def _answer_cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return '<td class="answer missing">not evaluated</td>'
    ok = _is_correct(row)
    cls = "ok" if ok else "bad"
    detail = f"EM {_mark(row.get('exact'))} · strict {_mark(row.get('relaxed_strict'))}"
    return (
        f'<td class="answer {cls}"><span class="verdict">{"✓" if ok else "✗"}</span> '
        f'<span class="pred">{_esc(row.get("prediction"))}</span>'
        f'<div class="detail">{detail}</div></td>'
    )


def _gold_html(gold: Any) -> str:
    items = [gold] if isinstance(gold, str) or not isinstance(gold, (list, tuple)) else list(gold)
    return " ".join(f'<span class="gold">{_esc(g)}</span>' for g in items)


def protocol_line(metrics: dict[str, Any]) -> str:
    """How an evaluation was run, in words: its protocol, and whether its prompt differs from training's."""
    p = metrics.get("protocol") or {}
    if not p:
        return "protocol vlm-tune (recorded before protocols existed)"
    text = f"protocol {p.get('name')}"
    if p.get("rescored_from"):
        text += f" (generations of protocol {p['rescored_from'].get('protocol')}, rescored)"
    if p.get("differs_from_training"):
        text += ": prompt differs from the training prompt"
    return text


def _default_names(a_dir: Path, b_dir: Path) -> tuple[str, str]:
    a, b = a_dir.resolve(), b_dir.resolve()
    if a.name != b.name:
        return a.name, b.name
    a2, b2 = f"{a.parent.name}/{a.name}", f"{b.parent.name}/{b.name}"
    return (a2, b2) if a2 != b2 else (f"{a.name} (A)", f"{b.name} (B)")


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:16px 20px;color:#1d2330;background:#fafbfc}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:22px 0 8px}
.runs{color:#555;font-size:13px;margin-bottom:10px}.runs b{color:#1d2330}
table{border-collapse:collapse;background:#fff}
th,td{border:1px solid #dde1e7;padding:4px 7px;font-size:13px;vertical-align:top}
thead th{background:#eef1f5;position:sticky;top:0;z-index:1}
.summary td.num,.summary th{text-align:right}.summary th[scope=row],.summary th:first-child{text-align:left}
.summary th[scope=row]{font-weight:500}
.summary tr.overall{font-weight:600;background:#f4f6f9}
.delta.up{color:#0a7a2f}.delta.down{color:#b3261e}.delta.same{color:#888}
.controls{margin:8px 0;display:flex;gap:18px;align-items:center;font-size:13px}
#questions{width:100%}#questions td.q{max-width:320px}
td.thumb{width:164px;text-align:center}td.thumb img{display:block;margin:auto}
.noimg{width:150px;height:90px;line-height:90px;background:repeating-linear-gradient(45deg,#eee,#eee 8px,#f7f7f7 8px,#f7f7f7 16px);color:#888;font-size:12px}
.gold{display:inline-block;background:#eef1f5;border-radius:3px;padding:0 4px;margin:1px}
td.answer.ok .verdict{color:#0a7a2f;font-weight:700}td.answer.bad .verdict{color:#b3261e;font-weight:700}
td.answer.missing{color:#999;font-style:italic}
.detail{color:#777;font-size:11px;margin-top:2px}
tr.changed.improved{background:#e9f7ee}tr.changed.regressed{background:#fdecea}
tr.changed td:first-child{box-shadow:inset 4px 0 0 #888}
tr.changed.improved td:first-child{box-shadow:inset 4px 0 0 #0a7a2f}
tr.changed.regressed td:first-child{box-shadow:inset 4px 0 0 #b3261e}
code{font-size:12px}
"""

_JS = """
(function () {
  var type = document.getElementById("filter-type");
  var split = document.getElementById("filter-split");
  var only = document.getElementById("filter-changed");
  var count = document.getElementById("shown-count");
  var rows = document.querySelectorAll("#questions tbody tr");
  function apply() {
    var shown = 0;
    for (var i = 0; i < rows.length; i++) {
      var r = rows[i];
      var ok = (type.value === "" || r.dataset.type === type.value) &&
               (split.value === "" || r.dataset.split === split.value) &&
               (!only.checked || r.dataset.changed === "1");
      r.style.display = ok ? "" : "none";
      if (ok) shown++;
    }
    count.textContent = shown + " of " + rows.length + " questions shown";
  }
  type.addEventListener("change", apply);
  split.addEventListener("change", apply);
  only.addEventListener("change", apply);
  apply();
})();
"""


def _options(values: list[str], label: str) -> str:
    opts = [f'<option value="">all {label}s</option>']
    opts += [f'<option value="{_esc(v)}">{_esc(v)}</option>' for v in values]
    return "".join(opts)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def write_report(
    out_path: str | Path,
    a_dir: str | Path,
    b_dir: str | Path,
    a_name: str | None = None,
    b_name: str | None = None,
    images: ImageSource = None,
    title: str = "vlm-tune eval comparison",
) -> Path:
    """Write the A-vs-B comparison of two eval directories as one self-contained HTML file.

    ``images`` maps a question id to a PIL image, or is a callable ``id -> image or None``;
    a missing image (or one that fails to load) gives a placeholder cell. ``a_name``/``b_name``
    default to the directory names. The file is written atomically (temp file + rename).
    Returns the output path.
    """
    a_dir, b_dir, out = Path(a_dir), Path(b_dir), Path(out_path)
    ma, rows_a = load_eval_dir(a_dir)
    mb, rows_b = load_eval_dir(b_dir)
    default_a, default_b = _default_names(a_dir, b_dir)
    a_name = a_name or default_a
    b_name = b_name or default_b

    by_a = {str(r["id"]): r for r in rows_a}
    by_b = {str(r["id"]): r for r in rows_b}
    ids = list(by_a) + [rid for rid in by_b if rid not in by_a]

    types: set[str] = set()
    splits: set[str] = set()
    body: list[str] = []
    n_improved = n_regressed = 0
    for rid in ids:
        ra, rb = by_a.get(rid), by_b.get(rid)
        base = ra if ra is not None else rb
        assert base is not None
        qtype = "" if base.get("type") is None else str(base.get("type"))
        qsplit = "" if base.get("split") is None else str(base.get("split"))
        if qtype:
            types.add(qtype)
        if qsplit:
            splits.add(qsplit)
        ca, cb = _is_correct(ra), _is_correct(rb)
        changed = ca is not None and cb is not None and ca != cb
        classes = []
        if changed:
            classes.append("changed")
            if cb:
                classes.append("improved")
                n_improved += 1
            else:
                classes.append("regressed")
                n_regressed += 1
        if ra is None or rb is None:
            classes.append("one-sided")
        cls_attr = f' class="{" ".join(classes)}"' if classes else ""
        body.append(
            f'<tr{cls_attr} data-id="{_esc(rid)}" data-type="{_esc(qtype)}" data-split="{_esc(qsplit)}"'
            f' data-changed="{1 if changed else 0}">'
            + _image_cell(rid, images)
            + f"<td><code>{_esc(rid)}</code></td>"
            + f"<td>{_esc(qtype)}</td>"
            + f'<td class="q">{_esc(base.get("question"))}</td>'
            + f"<td>{_gold_html(base.get('gold'))}</td>"
            + _answer_cell(ra)
            + _answer_cell(rb)
            + "</tr>"
        )

    n_changed = n_improved + n_regressed
    questions = (
        '<table id="questions"><thead><tr><th>chart</th><th>id</th><th>type</th><th>question</th>'
        f"<th>gold</th><th>A: {_esc(a_name)}</th><th>B: {_esc(b_name)}</th></tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
    )
    controls = (
        '<div class="controls">'
        f'<label>type <select id="filter-type">{_options(sorted(types), "type")}</select></label>'
        f'<label>split <select id="filter-split">{_options(sorted(splits), "split")}</select></label>'
        '<label><input type="checkbox" id="filter-changed"> only changed</label>'
        '<span id="shown-count"></span></div>'
    )
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_esc(title)}</h1>"
        f'<div class="runs"><b>A</b> = {_esc(a_name)} <code>{_esc(a_dir)}</code> &nbsp; '
        f"<b>B</b> = {_esc(b_name)} <code>{_esc(b_dir)}</code><br>"
        f'<span class="protocols">A: {_esc(protocol_line(ma))} · B: {_esc(protocol_line(mb))}</span><br>'
        f"{len(ids)} questions · correctness = relaxed accuracy · "
        f'<span id="changed-summary">{n_changed} changed ({n_improved} improved, {n_regressed} regressed)</span>'
        "</div>"
        "<h2>Summary</h2>"
        + _summary_table(ma, mb, a_name, b_name)
        + "<h2>Questions</h2>"
        + controls
        + questions
        + f"<script>{_JS}</script></body></html>\n"
    )
    _atomic_write_text(out, page)
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
