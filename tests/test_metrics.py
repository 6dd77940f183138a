"""Tests for vlm_tune.metrics: every case asserts a concrete score."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from vlm_tune.metrics import (
    aggregate,
    clean_generation,
    exact_match,
    normalize_answer,
    relaxed_accuracy,
    relaxed_accuracy_strict,
)

# (prediction, gold, exact, robust relaxed, strict relaxed)
SCORE_CASES = [
    # real ChartQA label styles
    ("0.57", "0.57", 1, 1, 1),
    ("0.58", "0.6", 0, 1, 1),  # 3.3% off
    ("0.57", "0.6", 0, 1, 0),  # 5% off, but the float quotient is 0.050000000000000044 (strict: wrong)
    ("0.57", "0.61", 0, 0, 0),  # 6.6% off
    ("Yes", "Yes", 1, 1, 1),
    ("yes", "Yes", 1, 1, 1),
    ("No", "Yes", 0, 0, 0),
    ("2014", "2014", 1, 1, 1),
    ("2013", "2014", 0, 1, 1),  # years are numbers in ChartQA's definition (documented quirk)
    ("1.22", "1.216666667", 0, 1, 1),
    ("1.216666667", "1.22", 0, 1, 1),
    ("1.3", "1.216666667", 0, 0, 0),
    ("Democrat (scores 60 to 100)", "Democrat (scores 60 to 100)", 1, 1, 1),
    ("democrat (scores 60 to 100)", "Democrat (scores 60 to 100)", 1, 1, 1),
    ("Democrat", "Democrat (scores 60 to 100)", 0, 0, 0),
    # percent: unit (62 == 62%) and value/100 (0.62 == 62%)
    ("62", "62%", 0, 1, 0),
    ("62%", "62", 0, 1, 0),
    ("0.62", "62%", 0, 1, 1),
    ("62%", "62%", 1, 1, 1),
    ("70", "62%", 0, 0, 0),
    # thousands separators
    ("1,000", "1000", 1, 1, 0),
    ("1000", "1,000", 1, 1, 0),
    ("1,020", "1000", 0, 1, 0),  # 2% off
    ("1,100", "1000", 0, 0, 0),  # 10% off
    # negative gold: sign mismatch wrong; relative error uses |gold|
    ("-3", "3", 0, 0, 0),
    ("3", "-3", 0, 0, 0),
    ("-3.1", "-3", 0, 1, 1),
    ("-3", "-3.1", 0, 1, 1),
    ("-3", "-10", 0, 0, 0),  # the abs(pred-gold)/gold bug would score these 1
    ("-10", "-3", 0, 0, 0),
    ("-1000", "-3", 0, 0, 0),
    ("\u22123", "-3", 1, 1, 0),  # Unicode minus sign
    # zero gold: exact numeric equality
    ("0", "0.0", 1, 1, 0),  # strict: gold 0.0 is falsy -> string compare "0" == "0.0" fails
    ("0.0", "0", 1, 1, 0),
    ("0.01", "0", 0, 0, 0),
    ("0", "0.01", 0, 0, 0),
    # list answers
    ("[1, 2]", "1, 2", 0, 1, 0),
    ("1, 2", "[1, 2]", 0, 1, 0),
    ("[1,2]", "[1, 2.04]", 0, 1, 0),
    ("[1, 2]", "[1, 3]", 0, 0, 0),
    ("[1, 2]", "[1, 2, 3]", 0, 0, 0),
    ("[2, 1]", "[1, 2]", 0, 0, 0),  # order matters
    ("Asia, Europe", "asia, europe", 1, 1, 1),
    # trailing period, whitespace, quotes
    ("Yes.", "Yes", 1, 1, 0),
    (" Yes ", "yes", 1, 1, 0),
    ('"Yes"', "yes", 1, 1, 0),
    ("42.", "42", 1, 1, 1),  # float("42.") parses, so strict agrees
    # currency signs
    ("$5", "5", 0, 1, 0),
    ("5", "$5", 0, 1, 0),
    ("€1,000.50", "1000.5", 0, 1, 0),
    ("£5", "£5", 1, 1, 1),
    ("-$5", "-5", 0, 1, 0),
    ("$5", "-5", 0, 0, 0),
    # number formatting
    ("5.0", "5", 1, 1, 1),
    ("0.50", "0.5", 1, 1, 1),
    ("+3", "3", 1, 1, 1),
    ("1.05", "1", 0, 1, 0),  # float rounding on the 5% bound: robust allows 1e-9 slack
    ("1.06", "1", 0, 0, 0),
    # prediction/gold swap asymmetry: error is relative to gold
    ("95.2", "100", 0, 1, 1),  # 4.8 / 100 = 4.8%
    ("100", "95.2", 0, 0, 0),  # 4.8 / 95.2 = 5.04%
    ("95.5", "100", 0, 1, 1),  # 4.5 / 100 = 4.5%
    ("100", "95.5", 0, 1, 1),  # 4.5 / 95.5 = 4.7%: this pair does not cross the boundary
    # non-numeric text never partially matches
    ("", "5", 0, 0, 0),
    ("five", "5", 0, 0, 0),
]


@pytest.mark.parametrize(("pred", "gold", "exact", "robust", "strict"), SCORE_CASES)
def test_scores(pred, gold, exact, robust, strict):
    assert exact_match(pred, gold) == float(exact)
    assert relaxed_accuracy(pred, gold) == float(robust)
    assert relaxed_accuracy_strict(pred, gold) == float(strict)


@pytest.mark.parametrize(
    ("pred", "gold", "exact", "robust", "strict"),
    [
        ("Yes", ["No", "yes"], 1, 1, 1),
        (" Yes", ["No", "yes"], 1, 1, 0),  # strict does not strip
        ("62", ["60%", "62%"], 0, 1, 0),
        ("1000", ["900", "1,000"], 1, 1, 0),
        ("7", ["1", "2", "3"], 0, 0, 0),
        ("7", [], 0, 0, 0),
        ("7.2", ("7", "100"), 0, 1, 1),
    ],
)
def test_gold_lists(pred, gold, exact, robust, strict):
    assert exact_match(pred, gold) == float(exact)
    assert relaxed_accuracy(pred, gold) == float(robust)
    assert relaxed_accuracy_strict(pred, gold) == float(strict)


def test_strict_is_case_insensitive_string_compare():
    # pix2struct compares prediction.lower() == target.lower() on non-numbers
    assert relaxed_accuracy_strict("YES", "yes") == 1.0
    assert relaxed_accuracy_strict("yes ", "yes") == 0.0


def test_negative_gold_never_always_correct():
    """The `abs(pred - gold) / gold <= 0.05` bug accepts every prediction when gold < 0."""
    for pred in ["-100", "0", "5", "1e6", "-3.5"]:
        assert relaxed_accuracy(pred, "-3") == 0.0, pred
        assert relaxed_accuracy_strict(pred, "-3") == 0.0, pred


def test_relative_error_is_relative_to_gold():
    # gold 100: 95.0 is exactly 5% off -> correct; gold 95: 100 is 5.26% off -> wrong
    assert relaxed_accuracy("95", "100") == 1.0
    assert relaxed_accuracy("100", "95") == 0.0
    assert relaxed_accuracy_strict("95", "100") == 1.0
    assert relaxed_accuracy_strict("100", "95") == 0.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  Yes ", "yes"),
        ("'Yes.'", "yes"),
        ('"42"', "42"),
        ("1,000", "1000"),
        ("1,234,567.80", "1234567.8"),
        ("5.0", "5"),
        ("0.50", "0.5"),
        ("+3", "3"),
        ("-0.0", "0"),
        (".5", "0.5"),
        ("62.0%", "62%"),
        ("A   big\n\tchart", "a big chart"),
        ("The end..", "the end."),  # only one trailing period is dropped
        ("2014", "2014"),
        ("Democrat (scores 60 to 100)", "democrat (scores 60 to 100)"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42<end_of_utterance>", "42"),
        ("Yes<|im_end|>\nUser: more", "Yes"),
        ("0.57</s>", "0.57"),
        ("2014<|endoftext|>garbage", "2014"),
        ("Assistant: 62%", "62%"),
        (" Assistant:\n  Democrat \nsecond line", "Democrat"),
        ("\n\n  1,000  \nexplanation", "1,000"),
        ("answer<|im_end|>x<end_of_utterance>", "answer"),
        ("<end_of_utterance>later", ""),
        ("", ""),
        ("The Assistant: said", "The Assistant: said"),  # only a leading prefix is stripped
    ],
)
def test_clean_generation(text, expected):
    assert clean_generation(text) == expected


RECORDS = [
    {"split": "human", "type": "count", "exact": 1.0, "relaxed": 1.0, "relaxed_strict": 1.0},
    {"split": "human", "type": "yesno", "exact": 0.0, "relaxed": 1.0, "relaxed_strict": 0.0},
    {"split": "augmented", "type": "count", "exact": 0.0, "relaxed": 0.0, "relaxed_strict": 0.0},
    {"split": "augmented", "type": "count", "exact": 0.0, "relaxed": 1.0, "relaxed_strict": 1.0},
    {"split": "augmented", "exact": 1.0, "relaxed": 1.0, "relaxed_strict": 1.0},  # no type
]


def test_aggregate_means():
    out = aggregate(RECORDS)
    assert out["n"] == 5
    assert out["exact_match"] == pytest.approx(2 / 5)
    assert out["relaxed_accuracy"] == pytest.approx(4 / 5)
    assert out["relaxed_accuracy_strict"] == pytest.approx(3 / 5)
    assert out["by_split"]["human"] == pytest.approx(
        {"n": 2, "exact_match": 0.5, "relaxed_accuracy": 1.0, "relaxed_accuracy_strict": 0.5}
    )
    assert out["by_split"]["augmented"] == pytest.approx(
        {"n": 3, "exact_match": 1 / 3, "relaxed_accuracy": 2 / 3, "relaxed_accuracy_strict": 2 / 3}
    )
    # the record without "type" is skipped in by_type only
    assert set(out["by_type"]) == {"count", "yesno"}
    assert out["by_type"]["count"] == pytest.approx(
        {"n": 3, "exact_match": 1 / 3, "relaxed_accuracy": 2 / 3, "relaxed_accuracy_strict": 2 / 3}
    )
    assert out["by_type"]["yesno"] == pytest.approx(
        {"n": 1, "exact_match": 0.0, "relaxed_accuracy": 1.0, "relaxed_accuracy_strict": 0.0}
    )
    assert list(out["by_split"]) == ["augmented", "human"]  # sorted


def test_aggregate_empty_and_custom_keys():
    empty = aggregate([])
    assert empty == {
        "n": 0,
        "exact_match": 0.0,
        "relaxed_accuracy": 0.0,
        "relaxed_accuracy_strict": 0.0,
        "by_split": {},
        "by_type": {},
    }
    out = aggregate(iter(RECORDS), keys=("type", "source"))
    assert set(out) == {
        "n",
        "exact_match",
        "relaxed_accuracy",
        "relaxed_accuracy_strict",
        "by_type",
        "by_source",
    }
    assert out["by_source"] == {}
    assert out["by_type"]["count"]["n"] == 3


def test_aggregate_rejects_record_without_scores():
    with pytest.raises(ValueError, match="relaxed_strict"):
        aggregate([{"exact": 1.0, "relaxed": 1.0}])


def test_metrics_module_is_pure():
    """No torch (or other heavy) import in the metrics module."""
    src = Path(sys.modules[exact_match.__module__].__file__).read_text(encoding="utf-8")
    imported = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "ast", "math", "re", "collections", "typing"}
