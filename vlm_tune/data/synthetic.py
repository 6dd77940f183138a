"""Deterministic synthetic chart-QA data, stored in the HuggingFaceM4/ChartQA column layout.

The generator draws small bar, line and pie charts with PIL and asks simple questions whose answers are
computed from the chart's data table by :func:`derive_answer` (the single source of truth). Rows have the
ChartQA columns ``image``, ``query``, ``label`` (a list with one string) plus ``id``, ``type``, ``split``
and ``table`` (JSON text of everything needed to redraw the chart and re-derive the answer), so the rest of
the tool can treat a saved synthetic dataset exactly like the real one.

The chart's vocabulary, questions and answers are in :mod:`vlm_tune.data.synthetic_table` (with the answer
balance of each question type), the drawing in :mod:`vlm_tune.data.synthetic_render` (with the drawing details
that matter to a model); this module samples tables, builds the rows and writes / caches the splits.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlm_tune.data.synthetic_render import render_chart
from vlm_tune.data.synthetic_table import (
    CHART_KINDS,
    MAX_VALUE,
    MIN_VALUE,
    PALETTE,
    QUESTION_TYPES,
    derive_answer,
    make_query,
)
from vlm_tune.errors import UserError

__all__ = [
    "CHART_KINDS",
    "MAX_VALUE",
    "MIN_VALUE",
    "PALETTE",
    "QUESTION_TYPES",
    "derive_answer",
    "ensure_synthetic",
    "generate_synthetic",
    "save_synthetic",
]

MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 1024
LABELS_MIN_SIZE = 128  # element letters are drawn from this image size up
PARAMS_FILE = "synth_params.json"
FORMAT_VERSION = 1


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
    return table, make_query(kind, qtype, ref), qtype


def _rows(split: str, examples: list[tuple[str, dict, str, str]]) -> dict[str, list]:
    width = max(6, len(str(len(examples) - 1)))
    cols: dict[str, list] = {k: [] for k in ("id", "image", "query", "label", "type", "split", "table")}
    for i, (table_json, table, query, qtype) in enumerate(examples):
        cols["id"].append(f"{split}-{i:0{width}d}")
        cols["image"].append({"bytes": render_chart(table), "path": None})
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
