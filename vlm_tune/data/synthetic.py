"""Deterministic synthetic chart-QA data, stored in the HuggingFaceM4/ChartQA column layout.

The generator draws small bar, line and pie charts with PIL and asks simple questions whose answers are
computed from the chart's data table by :func:`derive_answer` (the single source of truth). Rows have the
ChartQA columns ``image``, ``query``, ``label`` (a list with one string) plus ``id``, ``type``, ``split``
and ``table`` (JSON text of everything needed to redraw the chart and re-derive the answer), so the rest of
the tool can treat a saved synthetic dataset exactly like the real one.

Drawing details that matter to a model:

* White RGB background; shapes are drawn without anti-aliasing (printed text is anti-aliased). Elements
  are large and use distinct saturated colours from :data:`PALETTE`. Values are distinct integers 1..10, so the largest and the smallest element are unique.
* Element labels are capital letters ``A, B, C, ...`` in drawing order (bars and points left to right,
  pie slices clockwise from 12 o'clock). They are printed under bars / beside slices / under points only
  when ``image_size >= 128``; at smaller sizes they are implied by order alone.
* For question type ``value`` the asked element's value is printed on the chart with PIL's default font.
  At 64 px that text is only about 8-10 px tall and hard to read, for a person and for a model.

Answer balance (share of the most frequent answer, within one question type, for large ``n``):

* ``count``: uniform over ``min_elements..max_elements``; majority share ``1 / (max - min + 1)``
  (25 % with the defaults 2..5).
* ``color_max`` / ``color_min``: colours are a random ordered sample of the palette, so every palette colour
  is equally likely; majority share about ``1 / 8`` = 12.5 %.
* ``label_max`` / ``label_min``: the arg-max position is uniform within a chart, but the first
  ``min_elements`` letters exist in every chart and ``H`` only in 8-element charts, so those letters are the
  most common answers, each with share ``mean(1 / n)`` over the element counts (about 32 % for each of
  ``A`` and ``B`` with 2..5; 50 % if every chart has 2 elements).
* ``compare``: "Yes" and "No" each with probability 1/2 (majority share about 50 %).
* ``value``: uniform over 1..10; majority share about 10 %.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from vlm_tune.errors import UserError

QUESTION_TYPES: tuple[str, ...] = (
    "count",
    "color_max",
    "color_min",
    "label_max",
    "label_min",
    "compare",
    "value",
)
CHART_KINDS: tuple[str, ...] = ("bar", "line", "pie")

#: Fixed palette of distinct, saturated colours (name, RGB). Its length bounds ``max_elements``.
PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (230, 20, 20)),
    ("green", (0, 160, 40)),
    ("blue", (20, 60, 230)),
    ("orange", (255, 140, 0)),
    ("purple", (140, 30, 180)),
    ("yellow", (240, 210, 0)),
    ("cyan", (0, 200, 220)),
    ("brown", (120, 65, 15)),
)
MIN_VALUE = 1
MAX_VALUE = 10
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 1024
LABELS_MIN_SIZE = 128  # element letters are drawn from this image size up
PARAMS_FILE = "synth_params.json"
FORMAT_VERSION = 1

_NOUN = {"bar": "bars", "line": "points", "pie": "slices"}
_MAX_PHRASE = {"bar": "tallest bar", "line": "highest point", "pie": "largest slice"}
_MIN_PHRASE = {"bar": "shortest bar", "line": "lowest point", "pie": "smallest slice"}
_AXIS_RGB = (0, 0, 0)
_LINE_RGB = (90, 90, 90)
_TEXT_RGB = (0, 0, 0)


# --------------------------------------------------------------------------------------------- validation


def _check_int(name: str, value: Any, lo: int, hi: int | None, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name} must be an integer, got {value!r}. {hint}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise UserError(f"{name} must be {rng}, got {value}. {hint}")
    return value


def _check_choices(name: str, values: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(values, str):
        values = (values,)
    try:
        out = tuple(values)
    except TypeError:
        raise UserError(f"{name} must be a list of names from {list(allowed)}, got {values!r}.") from None
    if not out:
        raise UserError(f"{name} must name at least one of {list(allowed)}; it is empty.")
    for v in out:
        if v not in allowed:
            raise UserError(f"{name} contains unknown value {v!r}; allowed values are {list(allowed)}.")
    if len(set(out)) != len(out):
        raise UserError(
            f"{name} lists a value twice ({list(out)}); list each of {list(allowed)} at most once."
        )
    return out


def _normalize_params(
    n_train: int,
    n_test: int,
    seed: int,
    image_size: int,
    chart_kinds: Sequence[str],
    question_types: Sequence[str],
    min_elements: int,
    max_elements: int,
) -> dict[str, Any]:
    """Validate the generator arguments and return them in canonical (JSON-able) form."""
    _check_int("n_train", n_train, 1, None, "Ask for at least one training row.")
    _check_int("n_test", n_test, 1, None, "Ask for at least one test row.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be an integer, got {seed!r}.")
    _check_int(
        "image_size",
        image_size,
        MIN_IMAGE_SIZE,
        MAX_IMAGE_SIZE,
        f"Use a square size in pixels from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, e.g. 64.",
    )
    kinds = _check_choices("chart_kinds", chart_kinds, CHART_KINDS)
    qtypes = _check_choices("question_types", question_types, QUESTION_TYPES)
    hint = (
        f"Use 2 <= min_elements <= max_elements <= {len(PALETTE)} (the palette has {len(PALETTE)} colours)."
    )
    _check_int("min_elements", min_elements, 2, len(PALETTE), hint)
    _check_int("max_elements", max_elements, 2, len(PALETTE), hint)
    if min_elements > max_elements:
        raise UserError(f"min_elements ({min_elements}) is larger than max_elements ({max_elements}). {hint}")
    return {
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "image_size": image_size,
        "chart_kinds": list(kinds),
        "question_types": list(qtypes),
        "min_elements": min_elements,
        "max_elements": max_elements,
    }


# ------------------------------------------------------------------------------------------------ answers


def _value_of(table: dict, label: str) -> int:
    try:
        return table["values"][table["labels"].index(label)]
    except ValueError:
        raise UserError(
            f"table refers to element {label!r}, which is not in labels {table['labels']}."
        ) from None


def derive_answer(table: dict, qtype: str) -> str:
    """Return the answer to a question of type ``qtype`` about the chart described by ``table``.

    ``table`` is the decoded ``table`` column of a row (``json.loads(row["table"])``). This function is the
    single source of truth for labels: the generator calls it, and tests re-derive every label with it.
    """
    if qtype not in QUESTION_TYPES:
        raise UserError(f"Unknown question type {qtype!r}; allowed values are {list(QUESTION_TYPES)}.")
    for key in ("labels", "values", "colors"):
        if key not in table:
            raise UserError(f"table has no {key!r} entry; pass json.loads(row['table']) of a synthetic row.")
    values: list[int] = table["values"]
    if not values:
        raise UserError("table has no elements; pass json.loads(row['table']) of a synthetic row.")
    if qtype == "count":
        return str(len(values))
    if qtype in ("compare", "value"):
        ref = table.get("ref") or []
        need = 2 if qtype == "compare" else 1
        if len(ref) != need:
            raise UserError(f"a {qtype!r} table needs {need} referenced element(s) in 'ref', got {ref!r}.")
        if qtype == "value":
            return str(_value_of(table, ref[0]))
        return "Yes" if _value_of(table, ref[0]) > _value_of(table, ref[1]) else "No"
    pick = max if qtype.endswith("_max") else min
    idx = pick(range(len(values)), key=values.__getitem__)
    return table["colors"][idx] if qtype.startswith("color_") else table["labels"][idx]


def _make_query(kind: str, qtype: str, ref: list[str]) -> str:
    if qtype == "count":
        return f"How many {_NOUN[kind]} are there?"
    if qtype == "color_max":
        return f"What color is the {_MAX_PHRASE[kind]}?"
    if qtype == "color_min":
        return f"What color is the {_MIN_PHRASE[kind]}?"
    if qtype == "label_max":
        return "Which label has the largest value?"
    if qtype == "label_min":
        return "Which label has the smallest value?"
    if qtype == "compare":
        return f"Is {ref[0]} greater than {ref[1]}?"
    return f"What is the value of {ref[0]}?"


# ------------------------------------------------------------------------------------------------ drawing


@lru_cache(maxsize=16)
def _font(image_size: int):
    from PIL import ImageFont

    size = max(10, image_size // 16)
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # old Pillow or no FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _text_size(draw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _draw_text(draw, cx: float, cy: float, text: str, font, boxed: bool = False) -> None:
    """Draw ``text`` centred on (cx, cy); ``boxed`` puts a white box behind it."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = round(cx - (right - left) / 2) - left
    y = round(cy - (bottom - top) / 2) - top
    if boxed:
        draw.rectangle((x + left - 1, y + top - 1, x + right, y + bottom), fill=(255, 255, 255))
    draw.text((x, y), text, fill=_TEXT_RGB, font=font)


def _render(table: dict) -> bytes:
    """Draw the chart described by ``table`` and return PNG bytes (deterministic)."""
    from PIL import Image, ImageDraw

    size: int = table["image_size"]
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = _font(size)
    _, text_h = _text_size(draw, "0123456789ABCDEFGH", font)
    labels: list[str] = table["labels"]
    values: list[int] = table["values"]
    rgbs = [tuple(c) for c in table["rgb"]]
    printed: dict[str, int] = table["printed"]
    show_labels: bool = table["show_labels"]
    n = len(values)
    pad = max(2, size // 32)

    if table["kind"] in ("bar", "line"):
        top = pad + text_h + 2 * max(1, size // 64)  # room for a printed value above the tallest element
        bottom = size - pad - (text_h + 3 if show_labels else 0)
        left, right = pad, size - pad
        plot_h = bottom - top
        slot = (right - left) / n
        gap = max(1, size // 64)  # between an element and the value printed above it
        draw.line((left, bottom, right - 1, bottom), fill=_AXIS_RGB, width=max(1, size // 128))
        if table["kind"] == "bar":
            bar_w = max(2, round(slot * 0.72))
            for i, (v, rgb) in enumerate(zip(values, rgbs, strict=True)):
                cx = left + slot * (i + 0.5)
                x0 = round(cx - bar_w / 2)
                y0 = bottom - round(plot_h * v / MAX_VALUE)
                draw.rectangle((x0, y0, x0 + bar_w - 1, bottom - 1), fill=rgb)
                if labels[i] in printed:
                    _draw_text(draw, cx, y0 - gap - text_h / 2, str(printed[labels[i]]), font)
                if show_labels:
                    _draw_text(draw, cx, bottom + 2 + text_h / 2, labels[i], font)
        else:
            r = max(3, round(min(slot * 0.3, size / 14)))
            y_lo, y_hi = bottom - r - 1, top + r  # value 0 -> y_lo, MAX_VALUE -> y_hi
            pts = [
                (round(left + slot * (i + 0.5)), round(y_lo - (y_lo - y_hi) * v / MAX_VALUE))
                for i, v in enumerate(values)
            ]
            draw.line(pts, fill=_LINE_RGB, width=max(1, size // 64))
            for i, ((x, y), rgb) in enumerate(zip(pts, rgbs, strict=True)):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=rgb)
                if labels[i] in printed:
                    _draw_text(draw, x, y - r - gap - text_h / 2, str(printed[labels[i]]), font)
                if show_labels:
                    _draw_text(draw, x, bottom + 2 + text_h / 2, labels[i], font)
    else:  # pie: slices clockwise from 12 o'clock, in label order
        import math

        margin = pad + (text_h + 4 if show_labels else 0)
        c = size / 2
        radius = c - margin
        box = (round(c - radius), round(c - radius), round(c + radius) - 1, round(c + radius) - 1)
        total = sum(values)
        start = -90.0
        mids = []
        for v, rgb in zip(values, rgbs, strict=True):
            end = start + 360.0 * v / total
            draw.pieslice(box, start, end, fill=rgb)
            mids.append(math.radians((start + end) / 2))
            start = end
        for i, a in enumerate(mids):
            if labels[i] in printed:
                rr = radius * 0.6
                _draw_text(
                    draw, c + rr * math.cos(a), c + rr * math.sin(a), str(printed[labels[i]]), font, True
                )
            if show_labels:
                rr = radius + 2 + text_h * 0.6
                _draw_text(draw, c + rr * math.cos(a), c + rr * math.sin(a), labels[i], font)

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- generation


def _sample_example(rng: random.Random, p: dict[str, Any]) -> tuple[dict, str, str]:
    """Draw one (table, query, qtype) from ``rng``."""
    kind = rng.choice(p["chart_kinds"])
    qtype = rng.choice(p["question_types"])
    n = rng.randint(p["min_elements"], p["max_elements"])
    values = rng.sample(range(MIN_VALUE, MAX_VALUE + 1), n)
    palette_idx = rng.sample(range(len(PALETTE)), n)
    labels = [chr(ord("A") + i) for i in range(n)]
    ref: list[str] = []
    if qtype == "compare":
        i, j = rng.sample(range(n), 2)
        want_yes = rng.random() < 0.5
        if (values[i] > values[j]) != want_yes:
            i, j = j, i
        ref = [labels[i], labels[j]]
    elif qtype == "value":
        ref = [labels[rng.randrange(n)]]
    table = {
        "kind": kind,
        "image_size": p["image_size"],
        "show_labels": p["image_size"] >= LABELS_MIN_SIZE,
        "labels": labels,
        "values": values,
        "colors": [PALETTE[k][0] for k in palette_idx],
        "rgb": [list(PALETTE[k][1]) for k in palette_idx],
        "ref": ref,
        "printed": {ref[0]: values[labels.index(ref[0])]} if qtype == "value" else {},
    }
    return table, _make_query(kind, qtype, ref), qtype


def _rows(split: str, examples: list[tuple[str, dict, str, str]]) -> dict[str, list]:
    width = max(6, len(str(len(examples) - 1)))
    cols: dict[str, list] = {k: [] for k in ("id", "image", "query", "label", "type", "split", "table")}
    for i, (table_json, table, query, qtype) in enumerate(examples):
        cols["id"].append(f"{split}-{i:0{width}d}")
        cols["image"].append({"bytes": _render(table), "path": None})
        cols["query"].append(query)
        cols["label"].append([derive_answer(table, qtype)])
        cols["type"].append(qtype)
        cols["split"].append(split)
        cols["table"].append(table_json)
    return cols


def _features():
    import datasets

    list_type = getattr(datasets, "List", None) or datasets.Sequence
    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "query": datasets.Value("string"),
            "label": list_type(datasets.Value("string")),
            "type": datasets.Value("string"),
            "split": datasets.Value("string"),
            "table": datasets.Value("string"),
        }
    )


def generate_synthetic(
    n_train: int = 2000,
    n_test: int = 200,
    seed: int = 0,
    image_size: int = 64,
    chart_kinds: Sequence[str] = ("bar",),
    question_types: Sequence[str] = ("count", "color_max"),
    min_elements: int = 2,
    max_elements: int = 5,
):
    """Generate a synthetic chart-QA ``datasets.DatasetDict`` with splits ``"train"`` and ``"test"``.

    Same arguments give identical rows and byte-identical PNGs (only ``random.Random`` streams seeded from
    ``seed`` are used). Train and test come from different streams, and test examples whose
    ``(table, query)`` pair also occurs in train are rejected, so the splits are disjoint. Duplicates
    within one split are allowed. Raises :class:`UserError` for invalid arguments, or when the
    configuration has too few distinct charts to fill a disjoint test split.
    """
    p = _normalize_params(
        n_train, n_test, seed, image_size, chart_kinds, question_types, min_elements, max_elements
    )
    return _generate(p)


def _generate(p: dict[str, Any]):
    import datasets

    def draw(rng: random.Random) -> tuple[str, dict, str, str]:
        table, query, qtype = _sample_example(rng, p)
        return json.dumps(table, sort_keys=True, separators=(",", ":")), table, query, qtype

    # String seeds are hashed with SHA-512 by random.Random: stable across runs and Python processes.
    train_rng = random.Random(f"vlm_tune.synthetic/{p['seed']}/train")
    test_rng = random.Random(f"vlm_tune.synthetic/{p['seed']}/test")
    train = [draw(train_rng) for _ in range(p["n_train"])]
    seen = {(t, q) for t, _, q, _ in train}
    test: list[tuple[str, dict, str, str]] = []
    budget = 50 * p["n_test"] + 1000
    while len(test) < p["n_test"]:
        if budget == 0:
            raise UserError(
                f"Could only find {len(test)} of {p['n_test']} test examples that do not occur in train: the "
                "configuration allows too few distinct charts. Lower n_train/n_test or add chart_kinds, "
                "question_types or a wider min_elements..max_elements range."
            )
        budget -= 1
        ex = draw(test_rng)
        if (ex[0], ex[2]) not in seen:
            test.append(ex)

    features = _features()
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(_rows("train", train), features=features),
            "test": datasets.Dataset.from_dict(_rows("test", test), features=features),
        }
    )


# ------------------------------------------------------------------------------------------- save / cache


def _params_record(p: dict[str, Any]) -> dict[str, Any]:
    return {"generator": "vlm_tune.data.synthetic", "format_version": FORMAT_VERSION, "params": p}


def _read_params(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / PARAMS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def save_synthetic(
    out_dir: str | os.PathLike,
    n_train: int = 2000,
    n_test: int = 200,
    seed: int = 0,
    image_size: int = 64,
    chart_kinds: Sequence[str] = ("bar",),
    question_types: Sequence[str] = ("count", "color_max"),
    min_elements: int = 2,
    max_elements: int = 5,
) -> Path:
    """Generate the dataset and write it to ``out_dir`` (``DatasetDict.save_to_disk`` + ``synth_params.json``).

    The data is written to a staging directory beside ``out_dir`` and published atomically
    (:func:`vlm_tune.cache.publish`), so readers never see a half-written dataset and a concurrent writer of the
    same dataset (another rank or machine) never deletes one in use. An existing ``out_dir`` is replaced only if
    it is empty or holds an earlier synthetic dataset (has ``synth_params.json``); anything else raises
    :class:`UserError`.
    Returns ``out_dir`` as a ``Path``.
    """
    p = _normalize_params(
        n_train, n_test, seed, image_size, chart_kinds, question_types, min_elements, max_elements
    )
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise UserError(
                f"{out} exists and is not a directory; choose another out_dir for the synthetic data."
            )
        if any(out.iterdir()) and not (out / PARAMS_FILE).is_file():
            raise UserError(
                f"{out} is not empty and does not hold a synthetic dataset ({PARAMS_FILE} is missing); "
                "choose an empty or new out_dir, or delete that directory yourself."
            )
    dsd = _generate(p)
    from vlm_tune.cache import publish, staging_dir

    staged = staging_dir(out)
    try:
        dsd.save_to_disk(str(staged / "data"))
        # Move the dataset files to the top of the staging directory so out_dir itself loads with load_from_disk.
        for child in (staged / "data").iterdir():
            child.rename(staged / child.name)
        (staged / "data").rmdir()
        (staged / PARAMS_FILE).write_text(
            json.dumps(_params_record(p), indent=2, sort_keys=True) + "\n", "utf-8"
        )
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return publish(staged, out, lambda path: _holds(path, p))


def _holds(path: Path, p: dict[str, Any]) -> bool:
    """path holds a complete synthetic dataset made with parameters p."""
    return _read_params(path) == _params_record(p) and (path / "dataset_dict.json").is_file()


def ensure_synthetic(
    out_dir: str | os.PathLike,
    n_train: int = 2000,
    n_test: int = 200,
    seed: int = 0,
    image_size: int = 64,
    chart_kinds: Sequence[str] = ("bar",),
    question_types: Sequence[str] = ("count", "color_max"),
    min_elements: int = 2,
    max_elements: int = 5,
) -> Path:
    """Return ``out_dir`` if it already holds a synthetic dataset made with these arguments, else (re)generate it.

    The cache check compares the arguments (after validation) and the format version with ``synth_params.json``.
    """
    p = _normalize_params(
        n_train, n_test, seed, image_size, chart_kinds, question_types, min_elements, max_elements
    )
    out = Path(out_dir)
    if _holds(out, p):
        return out
    return save_synthetic(out, **p)
