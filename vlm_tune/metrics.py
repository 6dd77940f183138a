"""Answer-level metrics for chart question answering (ChartQA style).

Pure functions, no torch. Three scores are computed per question:

* ``exact_match`` -- 1.0 when :func:`normalize_answer` of prediction and gold are equal.
* ``relaxed_accuracy`` -- the ChartQA "relaxed accuracy" made robust: a numeric answer is
  correct when it is within 5% relative error *of the gold value*; anything else must match
  after normalisation. Percent signs, thousands separators, currency signs, list answers,
  negative and zero gold values are handled (see :func:`relaxed_accuracy`).
* ``relaxed_accuracy_strict`` -- the reference definition exactly as pix2struct's
  ``relaxed_correctness`` computes it, so numbers can be compared with published results.

Where strict and robust differ (score = strict / robust):

    prediction        gold      strict  robust  why
    ----------------  --------  ------  ------  ---------------------------------------------------
    "62"              "62%"     0       1       strict reads "62%" as 0.62; robust: % is a unit
    "62%"             "62"      0       1       same, the other way round
    "1,000"           "1000"    0       1       float("1,000") fails, strict compares strings
    "$5"              "5"       0       1       robust ignores currency signs ($ € £ ¥)
    "Yes."            "Yes"     0       1       robust drops one trailing period
    " Yes "           "yes"     0       1       strict compares strings without stripping
    '"yes"'           "yes"     0       1       robust strips surrounding quotes
    "[1, 2]"          "1, 2"    0       1       robust compares lists element-wise
    "0.0"             "0"       0       1       strict: gold 0 is falsy -> string compare
    "1.05"            "1"       0       1       5% off, but the float quotient is 0.050000000000000044;
    "0.57"            "0.6"     0       1       same; robust allows 1e-9 slack on the 5% bound
    "−3" (U+2212)     "-3"      0       1       robust reads the Unicode minus sign

Both agree on: "0.62" vs "62%" (1), "5.0" vs "5" (1), "Yes" vs "yes" (1), "-3" vs "3" (0),
"-3.1" vs "-3" (1), "-10" vs "-3" (0), "0.01" vs "0" (0), and the gold-relative error
(pred 95.2 / gold 100 is correct, pred 100 / gold 95.2 is not). Like the reference, robust
treats years as numbers, so "2013" vs "2014" counts as correct (0.05% off); "5." and "1e3"
parse as numbers in both.

Percent choice (robust): a trailing ``%`` is a unit, so "62%" may stand for 62 *or* for 0.62;
both readings are tried on each side that carries a percent sign and the answer is correct
when any pairing is within tolerance. So "62" == "62%" == "0.62" (and "2%" == "2", which
VLMEvalKit#1313 reports its harness scoring wrong). Units: only currency signs and ``%`` are
read; a unit word is never stripped ("5 million" vs "5" is wrong under every variant).

Harness variants (the ``score`` of an evaluation protocol, :mod:`vlm_tune.protocols`), both built on
:func:`pix2struct_correct` (the strict check): :func:`lmms_eval_relaxed` (lmms-eval: first gold only,
nothing stripped) and :func:`vlmevalkit_relaxed` (VLMEvalKit: prediction stripped, max over the gold
answers of its table's answer cell). ``tests/test_protocols.py`` pins every variant on the same cases.
"""

from __future__ import annotations

import math
import re
from ast import literal_eval
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "END_OF_TURN_MARKERS",
    "RELAXED_TOLERANCE",
    "aggregate",
    "clean_generation",
    "exact_match",
    "normalize_answer",
    "relaxed_accuracy",
    "relaxed_accuracy_strict",
    "lmms_eval_relaxed",
    "pix2struct_correct",
    "vlmevalkit_relaxed",
]

RELAXED_TOLERANCE = 0.05
"""Maximum relative error (relative to |gold|) for a numeric answer to count as correct."""

_FLOAT_SLACK = 1e-9  # robust only: absorbs float rounding on the 5% bound

END_OF_TURN_MARKERS = ("<end_of_utterance>", "<|im_end|>", "</s>", "<|endoftext|>", "<eos>", "<end_of_turn>")
"""Generation is cut at the first of these (SmolVLM/Idefics3, ChatML, Llama/Mistral, GPT-style, Gemma/PaliGemma,
Gemma 3's chat turn)."""

_QUOTES = "\"'`\u201c\u201d\u2018\u2019"
_CURRENCY = "$€£¥"
_UNICODE_MINUS = "\u2212"

# One whitespace-free token that is a plain number, optionally with thousands separators,
# a leading sign and a trailing percent sign.
_NUM_TOKEN_RE = re.compile(r"^(?P<sign>[+-]?)(?P<int>\d{1,3}(?:,\d{3})+|\d*)(?:\.(?P<frac>\d+))?(?P<pct>%?)$")

# A whole answer that is a number (robust parse).
_NUMBER_RE = re.compile(
    rf"""^
    (?P<sign1>[+-])?\s*
    (?P<cur1>[{_CURRENCY}])?\s*
    (?P<sign2>[+-])?
    (?P<num>(?:\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.\d*)?|\.\d+)
    (?P<exp>e[+-]?\d+)?
    \s*(?P<cur2>[{_CURRENCY}])?
    \s*(?P<pct>%)?
    $""",
    re.VERBOSE | re.IGNORECASE,
)

# Comma that separates list items: not a thousands separator (",ddd" followed by a non-digit or end).
_LIST_SPLIT_RE = re.compile(r";|,(?!\d{3}(?:\D|$))")


# --------------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------------


def _strip_outer(text: str) -> str:
    """Strip surrounding whitespace and quotes (repeatedly, e.g. ``' "yes" '``)."""
    prev = None
    text = text.strip()
    while prev != text:
        prev = text
        text = text.strip().strip(_QUOTES).strip()
    return text


def _canonical_number_token(token: str) -> str:
    m = _NUM_TOKEN_RE.match(token)
    if m is None or not (m.group("int") or m.group("frac")):
        return token
    int_part = m.group("int").replace(",", "").lstrip("0") or "0"
    frac = (m.group("frac") or "").rstrip("0")
    body = f"{int_part}.{frac}" if frac else int_part
    sign = "-" if m.group("sign") == "-" and body != "0" else ""
    return f"{sign}{body}{m.group('pct')}"


def normalize_answer(text: str) -> str:
    """Normalise an answer for exact match.

    Steps, in order: strip surrounding whitespace and quotes (``" ' ` “ ” ‘ ’``); lowercase;
    Unicode minus (U+2212) -> ``-``; drop one trailing period; collapse runs of whitespace to one
    space; canonicalise every whitespace-separated token that is a plain number: thousands
    separators removed (``1,000`` -> ``1000``), leading ``+`` and leading zeros removed,
    trailing fractional zeros removed (``5.0`` -> ``5``, ``0.50`` -> ``0.5``, ``.5`` -> ``0.5``),
    ``-0`` -> ``0``; a trailing ``%`` is kept (``62.0%`` -> ``62%``).
    """
    if text is None:
        return ""
    text = _strip_outer(str(text)).lower().replace(_UNICODE_MINUS, "-")
    if text.endswith("."):
        text = text[:-1]
    return " ".join(_canonical_number_token(tok) for tok in text.split())


def _as_gold_list(gold: str | Sequence[str]) -> list[str]:
    if isinstance(gold, str):
        return [gold]
    if gold is None:
        return []
    return ["" if g is None else str(g) for g in gold]


def exact_match(prediction: str, gold: str | Sequence[str]) -> float:
    """1.0 when ``normalize_answer(prediction)`` equals that of the gold answer (max over a list).

    An empty gold list scores 0.0.
    """
    pred = normalize_answer(prediction)
    return max((1.0 if pred == normalize_answer(g) else 0.0 for g in _as_gold_list(gold)), default=0.0)


# --------------------------------------------------------------------------------------------
# robust relaxed accuracy
# --------------------------------------------------------------------------------------------


def _parse_number(text: str) -> tuple[float, ...] | None:
    """Candidate values of a numeric answer, or None when it is not a number.

    ``"62%"`` -> ``(62.0, 0.62)`` (percent is a unit, value/100 also accepted);
    ``"-$1,000.5"`` -> ``(-1000.5,)``.
    """
    text = _strip_outer(text).replace(_UNICODE_MINUS, "-")
    if text.endswith("."):
        text = text[:-1].rstrip()
    m = _NUMBER_RE.match(text)
    if m is None:
        return None
    if m.group("sign1") and m.group("sign2"):
        return None
    if m.group("cur1") and m.group("cur2"):
        return None
    try:
        value = float(m.group("num").replace(",", "") + (m.group("exp") or ""))
    except ValueError:  # pragma: no cover - the regex only admits parseable numbers
        return None
    if not math.isfinite(value):
        return None
    if "-" in (m.group("sign1") or "", m.group("sign2") or ""):
        value = -value
    if m.group("pct"):
        return (value, value / 100.0)
    return (value,)


def _close(pred: float, gold: float) -> bool:
    """Relative error w.r.t. |gold| within tolerance; zero gold needs an exact zero."""
    if gold == 0:
        return pred == 0
    if pred * gold < 0:  # sign mismatch is wrong (the |gold|-relative bound implies it; explicit for clarity)
        return False
    return abs(pred - gold) / abs(gold) <= RELAXED_TOLERANCE + _FLOAT_SLACK


def _split_list(text: str) -> list[str] | None:
    """Items of a list answer (``"[1, 2]"``, ``"1, 2"``, ``"a; b"``), None when not a list.

    A single value counts as a list only when written in square brackets (``"[5]"``).
    """
    s = _strip_outer(text)
    bracketed = len(s) >= 2 and s[0] + s[-1] in ("[]", "()")
    if bracketed:
        s = s[1:-1]
    items = [_strip_outer(x) for x in _LIST_SPLIT_RE.split(s)]
    if len(items) >= 2 or (bracketed and text.strip().startswith("[")):
        return items
    return None


def _relaxed_one(prediction: str, gold: str, allow_list: bool = True) -> float:
    if normalize_answer(prediction) == normalize_answer(gold):
        return 1.0
    pred_num, gold_num = _parse_number(prediction), _parse_number(gold)
    if pred_num is not None and gold_num is not None:
        return float(any(_close(p, g) for p in pred_num for g in gold_num))
    if allow_list:
        pred_items, gold_items = _split_list(prediction), _split_list(gold)
        if pred_items is not None or gold_items is not None:
            pred_items = pred_items if pred_items is not None else [_strip_outer(prediction)]
            gold_items = gold_items if gold_items is not None else [_strip_outer(gold)]
            if len(pred_items) == len(gold_items):
                return float(
                    all(
                        _relaxed_one(p, g, allow_list=False) == 1.0
                        for p, g in zip(pred_items, gold_items, strict=True)
                    )
                )
    return 0.0


def relaxed_accuracy(prediction: str, gold: str | Sequence[str]) -> float:
    """ChartQA relaxed accuracy, robust version; max over gold answers when a list is given.

    Per gold answer:

    1. normalised exact match (:func:`normalize_answer`) -> 1.0;
    2. if both parse as numbers -- currency signs ($ € £ ¥, before or after), thousands
       separators, a leading ``+``/``-``/U+2212, a trailing period and a trailing ``%`` are
       accepted -- correct iff ``|pred - gold| / |gold| <= 0.05`` (relative to *gold*, never to
       the prediction). A sign mismatch is wrong; gold 0 needs pred exactly 0. A percent
       value may be read as itself or as value/100 ("62" == "62%" == "0.62");
    3. if either side is a list (``"[1, 2]"``, ``"1, 2"``, ``"a; b"``), both must have the same
       number of items and every item must be relaxed-correct (items are not lists again);
    4. otherwise 0.0.
    """
    pred = "" if prediction is None else str(prediction)
    return max((_relaxed_one(pred, g) for g in _as_gold_list(gold)), default=0.0)


# --------------------------------------------------------------------------------------------
# strict (reference) relaxed accuracy
# --------------------------------------------------------------------------------------------


def _strict_to_float(text: str) -> float | None:
    """``float(text)``, a trailing run of ``%`` meaning value/100 (pix2struct's ``_to_float``: ``rstrip("%")``)."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def pix2struct_correct(prediction: str, target: str) -> float:
    """pix2struct's ``relaxed_correctness(target, prediction)`` for one gold answer, as 1.0/0.0.

    Both parse with :func:`float` (which itself ignores surrounding whitespace and reads ``1_000``, ``nan``,
    ``inf``); when both parse and the gold value is non-zero (a gold 0 is falsy): correct iff
    ``|pred - gold| / |gold| <= 0.05``; otherwise ``prediction.lower() == target.lower()``. The same function
    is lmms-eval's ``relaxed_correctness`` (``lmms_eval/tasks/chartqa/utils.py``, lmms-eval 0.7.3) and
    VLMEvalKit's (``vlmeval/dataset/utils/vqa_eval.py``), each called on its own inputs.
    """
    pred_float = _strict_to_float(prediction)
    target_float = _strict_to_float(target)
    if pred_float is not None and target_float:
        return float(abs(pred_float - target_float) / abs(target_float) <= RELAXED_TOLERANCE)
    return float(prediction.lower() == target.lower())


def relaxed_accuracy_strict(prediction: str, gold: str | Sequence[str]) -> float:
    """Relaxed accuracy exactly as pix2struct's ``relaxed_correctness`` computes it.

    Both strings are parsed with ``float`` (a trailing ``%`` means ``float(text.rstrip("%")) / 100``).
    When both parse and gold is non-zero: correct iff ``|pred - gold| / |gold| <= 0.05``.
    Otherwise: ``prediction.lower() == gold.lower()`` (no stripping). Max over gold answers.
    """
    pred = "" if prediction is None else str(prediction)
    return max((pix2struct_correct(pred, g) for g in _as_gold_list(gold)), default=0.0)


def lmms_eval_relaxed(prediction: str, gold: str | Sequence[str]) -> float:
    """lmms-eval's ChartQA score (``chartqa_process_results``, lmms-eval 0.7.3): one target, nothing stripped.

    lmms-eval's ChartQA docs carry one answer each; a row with several gold answers is scored against the
    first (the one the lmms-eval export writes as ``target``). No gold answer scores 0.0.
    """
    golds = _as_gold_list(gold)
    return pix2struct_correct("" if prediction is None else str(prediction), golds[0]) if golds else 0.0


def vlmevalkit_answer_cell(gold: str | Sequence[str]) -> str:
    """The ``answer`` cell of VLMEvalKit's prediction table: the gold text, or a Python list of several."""
    golds = _as_gold_list(gold)
    return golds[0] if len(golds) == 1 else repr(golds)


def vlmevalkit_answers(cell: str) -> list[str]:
    """The gold answers VLMEvalKit reads from an ``answer`` cell (``process_line``): a cell that evaluates to a
    Python list is that list (so a gold *text* ``[1, 2]`` becomes the two answers ``1`` and ``2``: its quirk,
    reproduced), any other cell is one answer. ``ast.literal_eval`` stands in for its ``eval``."""
    try:
        value = literal_eval(cell)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return [cell]
    return [str(v) for v in value] if isinstance(value, list) else [cell]


def vlmevalkit_relaxed(prediction: str, gold: str | Sequence[str]) -> float:
    """VLMEvalKit's ChartQA_TEST score (``process_line(method='relaxed_accuracy')`` then ``hit_calculate``):
    the prediction ``.strip()``ed, pix2struct's check against each gold answer of the table's answer cell,
    the max over them. No gold answer scores 0.0 (VLMEvalKit would fail on ``np.max([])``)."""
    pred = ("" if prediction is None else str(prediction)).strip()
    answers = vlmevalkit_answers(vlmevalkit_answer_cell(gold)) if _as_gold_list(gold) else []
    return max((pix2struct_correct(pred, a) for a in answers), default=0.0)


# --------------------------------------------------------------------------------------------
# aggregation and generation clean-up
# --------------------------------------------------------------------------------------------

_SCORE_FIELDS = (
    ("exact", "exact_match"),
    ("relaxed", "relaxed_accuracy"),
    ("relaxed_strict", "relaxed_accuracy_strict"),
)


def _means(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    out: dict[str, Any] = {"n": n}
    for field, name in _SCORE_FIELDS:
        out[name] = (sum(float(r[field]) for r in rows) / n) if n else 0.0
    if rows and all("score" in r for r in rows):  # the evaluation protocol's own metric (vlm_tune.protocols)
        out["score"] = sum(float(r["score"]) for r in rows) / n
    return out


def aggregate(records: Iterable[dict[str, Any]], keys: Sequence[str] = ("split", "type")) -> dict[str, Any]:
    """Mean scores overall and per group.

    Each record needs ``exact``, ``relaxed`` and ``relaxed_strict`` (floats in [0, 1]); the
    grouping fields named in ``keys`` are optional. Returns::

        {"n": N, "exact_match": m, "relaxed_accuracy": m, "relaxed_accuracy_strict": m,
         "by_split": {name: {"n", "exact_match", "relaxed_accuracy", "relaxed_accuracy_strict"}},
         "by_type": {...}}

    There is one ``by_<key>`` entry per key (groups sorted by name, names as str). A record
    without a key (or with ``None``) is left out of that grouping only; a key no record has
    gives an empty dict. Empty input gives ``n`` 0 and all means 0.0 (no error). When every record has a
    ``score`` (the protocol's own metric, :mod:`vlm_tune.protocols`), each group also gets its mean ``score``.
    Raises ValueError when a record lacks a score field.
    """
    rows = list(records)
    for i, r in enumerate(rows):
        missing = [f for f, _ in _SCORE_FIELDS if f not in r]
        if missing:
            raise ValueError(f"record {i} lacks score field(s) {missing}: {r!r}")
    result = _means(rows)
    for key in keys:
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if r.get(key) is not None:
                groups.setdefault(str(r[key]), []).append(r)
        result[f"by_{key}"] = {name: _means(groups[name]) for name in sorted(groups)}
    return result


_ASSISTANT_PREFIX_RE = re.compile(r"^\s*assistant\s*:", re.IGNORECASE)


def clean_generation(text: str) -> str:
    """Turn generated text into an answer string.

    Cut at the first end-of-turn marker (:data:`END_OF_TURN_MARKERS`), drop a leading
    ``Assistant:`` (case-insensitive), keep the first non-empty line, strip whitespace.
    """
    if text is None:
        return ""
    cut = len(text)
    for marker in END_OF_TURN_MARKERS:
        pos = text.find(marker)
        if pos != -1:
            cut = min(cut, pos)
    text = text[:cut]
    text = _ASSISTANT_PREFIX_RE.sub("", text, count=1)
    for line in text.splitlines():
        line = _ASSISTANT_PREFIX_RE.sub("", line, count=1).strip()
        if line:
            return line
    return ""
