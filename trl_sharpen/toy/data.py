"""Prompt datasets of the toy task: a fixed held-out test split and a disjoint training split.

The splits are drawn deterministically, so the committed JSONL files under `trl_sharpen/toy/data/` can be regenerated
(`python -m trl_sharpen.toy.data`) and are checked against this code by the tests. Test prompts never appear in the
base model's pretraining corpus.
"""

from __future__ import annotations

import json
import random
from functools import cache
from pathlib import Path

from datasets import Dataset

from .task import DEFAULT_TASK, format_prompt, question


DATA_DIR = Path(__file__).parent / "data"
NUM_TEST_PROMPTS = 200
NUM_TRAIN_PROMPTS = 1000


def _unique_terms(count: int, seed: int, exclude: set[tuple[int, ...]]) -> list[list[int]]:
    rng = random.Random(seed)
    seen, out = set(exclude), []
    while len(out) < count:
        terms = DEFAULT_TASK.sample_terms(rng)
        if tuple(terms) not in seen:
            seen.add(tuple(terms))
            out.append(terms)
    return out


@cache
def _splits() -> dict[str, tuple[tuple[int, ...], ...]]:
    test = _unique_terms(NUM_TEST_PROMPTS, seed=2024_12_02, exclude=set())
    train = _unique_terms(NUM_TRAIN_PROMPTS, seed=2025_04_24, exclude={tuple(t) for t in test})
    return {"test": tuple(map(tuple, test)), "train": tuple(map(tuple, train))}


def test_prompt_terms() -> list[list[int]]:
    return [list(terms) for terms in _splits()["test"]]


def prompt_rows(split: str) -> list[dict]:
    """Rows of a split in TRL's standard prompt-only format, plus the reference `answer` for evaluation."""
    if split not in ("train", "test"):
        raise ValueError(f"Unknown toy split {split!r}; expected 'train' or 'test'.")
    return [
        {"prompt": format_prompt(list(terms)), "answer": str(sum(terms)), "num_terms": len(terms)}
        for terms in _splits()[split]
    ]


def load_toy_prompts(split: str = "train", conversational: bool = False, limit: int | None = None) -> Dataset:
    """The toy task's prompts as a `datasets.Dataset` with columns `prompt`, `answer` and `num_terms`.

    With `conversational=True` the prompt is a list of chat messages (TRL's conversational prompt-only format), to
    be rendered with the toy tokenizer's chat template.
    """
    rows = prompt_rows(split)[:limit]
    if conversational:
        for row in rows:
            row["prompt"] = [{"role": "user", "content": row["prompt"].removeprefix("Q : ")}]
    return Dataset.from_list(rows)


def conversational_prompt(terms: list[int]) -> list[dict[str, str]]:
    return [{"role": "user", "content": question(terms)}]


def write_prompt_files(data_dir: Path = DATA_DIR) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        with open(data_dir / f"{split}.jsonl", "w") as f:
            for row in prompt_rows(split):
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    write_prompt_files()
    print(f"wrote {DATA_DIR}/train.jsonl and {DATA_DIR}/test.jsonl")
