"""The generation metrics on hand-made pairs, and the order they promise (exact => first lines => contains)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nibbletune.evaluation.metrics import (
    contains_answer,
    exact_match,
    first_lines_match,
    match_rates,
    normalize_whitespace,
    perplexity,
)

# generation, reference, exact, first lines, contains
CASES = [
    (" c b a", "c b a", True, True, True),
    ("c b a\n", " c b a", True, True, True),
    ("c b a\nand more", "c b a", False, True, True),
    ("\n\nc b a  \nmore", "c b a", False, True, True),
    ("so: c  b\ta!", "c b a", False, False, True),
    ("so: cb a", "c b a", False, False, False),
    ("so: c  b\n a!", "c b a", False, False, True),
    ("def f(x):\n    return x\nprint(f)", "def f(x):\n    return x", False, True, True),
    ("def f(x):\n  return x", "def f(x):\n    return x", False, False, True),
    ("c b", "c b a", False, False, False),
    ("C B A", "c b a", False, False, False),
]


@pytest.mark.parametrize("generation, reference, exact, first_lines, contains", CASES)
def test_each_metric_on_hand_made_pairs(generation, reference, exact, first_lines, contains):
    assert exact_match(generation, reference) is exact
    assert first_lines_match(generation, reference) is first_lines
    assert contains_answer(generation, reference) is contains


text = st.text(alphabet=st.sampled_from("ab \n\t"), max_size=12)


@given(text, text.filter(lambda reference: reference.strip()))
def test_exact_implies_first_lines_implies_contains(generation, reference):
    for candidate in (generation, reference + generation, " " + reference + "\n" + generation):
        if exact_match(candidate, reference):
            assert first_lines_match(candidate, reference)
        if first_lines_match(candidate, reference):
            assert contains_answer(candidate, reference)


def test_rates_and_perplexity():
    assert match_rates(["x", " y", "y\nz", "q"], ["x", "y", "y", "y"]) == {
        "exact_match": 0.5, "first_lines_match": 0.75, "contains_answer": 0.75}
    assert match_rates([], []) == {"exact_match": None, "first_lines_match": None, "contains_answer": None}
    assert normalize_whitespace("  a \n\t b ") == "a b"
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(1e9) == math.exp(50.0)
