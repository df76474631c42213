"""How a greedy generation is scored against its reference, and loss as perplexity.

Three string tests, each a property of one (generation, reference) pair; a rate is the fraction
of generation examples that pass. Whitespace at either end never counts: a completion written
as " c b a" (leading space, as training data often has) is matched by "c b a".

* exact match: the generation equals the reference, both stripped of surrounding whitespace.
* first lines match: the generation's first N lines equal the reference, where N is the
  reference's line count, both stripped. For a one-line reference this is "the first line
  equals" - the answer followed by anything on later lines (a model that keeps writing after
  its answer instead of stopping) still counts.
* contains answer: the reference occurs anywhere in the generation, after every run of
  whitespace (spaces, tabs, newlines) in both is replaced by one space.

Each implies the next: exact match => first lines match => contains answer, so the three
rates never decrease in that order.
"""

from __future__ import annotations

import math

PERPLEXITY_MAX_LOSS = 50.0
"""Loss above which perplexity is reported as exp(50), as the training loop logs it (finite JSON)."""


def normalize_whitespace(text: str) -> str:
    """`text` with surrounding whitespace removed and every inner run of whitespace made one space."""
    return " ".join(text.split())


def exact_match(generation: str, reference: str) -> bool:
    """The generation equals the reference, both stripped of surrounding whitespace."""
    return generation.strip() == reference.strip()


def first_lines_match(generation: str, reference: str) -> bool:
    """The generation's first N lines (N = the reference's line count) equal the reference, both stripped."""
    expected = reference.strip()
    line_count = expected.count("\n") + 1
    head = "\n".join(generation.strip().split("\n")[:line_count])
    return head.strip() == expected


def contains_answer(generation: str, reference: str) -> bool:
    """The whitespace-normalized reference occurs in the whitespace-normalized generation."""
    return normalize_whitespace(reference) in normalize_whitespace(generation)


MATCHERS = {"exact_match": exact_match, "first_lines_match": first_lines_match, "contains_answer": contains_answer}
"""Each generation metric's name (as reported) and its test, strictest first."""


def match_rates(generations: list[str], references: list[str]) -> dict[str, float | None]:
    """The fraction of pairs passing each test of MATCHERS; None for each when there are no pairs."""
    if not references:
        return {name: None for name in MATCHERS}
    return {name: sum(test(g, r) for g, r in zip(generations, references)) / len(references)
            for name, test in MATCHERS.items()}


def perplexity(loss: float) -> float:
    """exp(loss), the loss capped at PERPLEXITY_MAX_LOSS."""
    return math.exp(min(loss, PERPLEXITY_MAX_LOSS))
