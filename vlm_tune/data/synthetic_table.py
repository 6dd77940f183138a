"""The synthetic chart's data table: its vocabulary, the questions asked about it, the answers derived from it.

A table (the ``table`` column of a synthetic row, JSON) lists the chart ``kind``, element ``labels`` (``A, B,
...``), their ``values`` (distinct integers :data:`MIN_VALUE`..:data:`MAX_VALUE`), ``colors`` (names from
:data:`PALETTE`) and the ``ref`` elements a question names. :func:`derive_answer` is the single source of truth
for labels; :func:`make_query` words the question.

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
_NOUN = {"bar": "bars", "line": "points", "pie": "slices"}
_MAX_PHRASE = {"bar": "tallest bar", "line": "highest point", "pie": "largest slice"}
_MIN_PHRASE = {"bar": "shortest bar", "line": "lowest point", "pie": "smallest slice"}


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


def make_query(kind: str, qtype: str, ref: list[str]) -> str:
    """The question of type ``qtype`` about a chart of ``kind`` naming the elements ``ref``."""
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
