"""What every task shares: the two prompt forms, splits, stop strings, and writing the jsonl files.

A task example is a dict with `prompt` (a chat message list in the `chat` form, a plain k-shot string in the
`few_shot` form), `answer` (the reference final answer, a string) and task-specific metadata columns. Chat prompts go
through the model's chat template and end at its end-of-turn token; few-shot prompts are for base models and end at a
stop string (`STOP_STRINGS`): the next `Q:` block or a blank line.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path


FORMS = ("chat", "few_shot")

# A few-shot completion is the answer line only: it ends where the model starts the next example.
STOP_STRINGS = ("\n\n", "\nQ:")

_STOP = re.compile(r"\n\s*\n|\nQ:")


def cut_at_stop(text: str) -> str:
    """The part of a completion before its first stop string (the whole text for a chat answer without one)."""
    match = _STOP.search(text)
    return text if match is None else text[: match.start()]


def check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"Unknown prompt form {form!r}: use one of {', '.join(FORMS)}.")


def few_shot_prompt(shots: Sequence[tuple[str, str]], question: str) -> str:
    """`Q: ...\\nA: ...` blocks separated by blank lines, then the question and an open `A:`."""
    blocks = [f"Q: {q}\nA: {a}" for q, a in shots]
    return "\n\n".join([*blocks, f"Q: {question}\nA:"])


def chat_prompt(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def split_items(items: Sequence, num_train: int, num_test: int, seed: int) -> tuple[list, list]:
    """Shuffle distinct `items` with `seed` and cut them into disjoint (test, train) lists."""
    if len(set(items)) != len(items):
        raise ValueError("split_items needs distinct items (train and test must be disjoint).")
    if num_train + num_test > len(items):
        raise ValueError(
            f"Asked for {num_train} train + {num_test} test examples but only {len(items)} distinct problems exist; "
            "lower --num_train/--num_test or pick a harder level."
        )
    items = list(items)
    random.Random(seed).shuffle(items)
    return items[:num_test], items[num_test : num_test + num_train]  # test first: it does not move with num_train


def write_jsonl(rows: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def write_splits(splits: dict[str, list[dict]], output_dir: str | Path) -> list[Path]:
    """`{split}.jsonl` for each split: `trl-sharpen eval --dataset_name output_dir/test.jsonl` reads one."""
    return [write_jsonl(rows, Path(output_dir) / f"{name}.jsonl") for name, rows in splits.items()]
