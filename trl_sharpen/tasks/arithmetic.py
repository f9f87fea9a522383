"""Arithmetic of graded difficulty: `a + b` and `a * b` with a fixed number of digits per operand.

Levels (`LEVELS`), easiest first: `add1` (1-digit + 1-digit), `add_upto2x1` (a + b with a of at most 2 digits and b
of 1: add1 widened to 1,000 problems, so 200 test prompts fit beside a train split), `add2`, `add3`, `mul1` (1-digit x
1-digit), `mul2x1` (2-digit x 1-digit), `mul2` (2-digit x 2-digit). The problems of a level are all ordered pairs (a, b) in its digit
range; they are shuffled with the seed and cut into disjoint train and test splits, so no test question (nor its
few-shot examples) appears in the train split. The few-shot examples of every prompt are drawn from the train split.

    chat:     [{"role": "user", "content": "What is 23 + 58? Reply with only the number."}]
    few_shot: "Q: What is 12 + 40?\\nA: 52\\n\\nQ: What is 71 + 9?\\nA: 80\\n\\n...Q: What is 23 + 58?\\nA:"

The answer is the exact integer result. `extract_answer` reads the completion up to its first stop string and takes
its last number, so "The answer is 81." and " 81\\n\\nQ: What is ..." both give "81".
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..answers import extract_answer as _last_number
from ..answers import normalize_number
from .common import chat_prompt, check_form, cut_at_stop, few_shot_prompt, split_items


@dataclass(frozen=True)
class Level:
    operator: str
    digits_a: int
    digits_b: int
    # Operands of fewer digits too (0 .. 10**digits - 1), e.g. add_upto2x1's first operand 0..99
    up_to: bool = False

    def operands(self, digits: int) -> range:
        return range(0 if digits == 1 or self.up_to else 10 ** (digits - 1), 10**digits)

    def problems(self) -> list[tuple[int, int]]:
        return [(a, b) for a in self.operands(self.digits_a) for b in self.operands(self.digits_b)]

    def result(self, a: int, b: int) -> int:
        return a + b if self.operator == "+" else a * b


LEVELS = {
    "add1": Level("+", 1, 1),
    "add_upto2x1": Level("+", 2, 1, up_to=True),  # 0-99 + 0-9: contains add1's 100 problems
    "add2": Level("+", 2, 2),
    "add3": Level("+", 3, 3),
    "mul1": Level("*", 1, 1),
    "mul2x1": Level("*", 2, 1),
    "mul2": Level("*", 2, 2),
}

CHAT_INSTRUCTION = "Reply with only the number."


def question(a: int, b: int, operator: str) -> str:
    return f"What is {a} {operator} {b}?"


def generate(
    level: str = "add2",
    form: str = "chat",
    num_train: int = 200,
    num_test: int = 50,
    num_shots: int = 3,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """Train and test examples of one level: `prompt`, `answer` (the integer as a string), `a`, `b`, `level`."""
    if level not in LEVELS:
        raise ValueError(f"Unknown arithmetic level {level!r}: use one of {', '.join(LEVELS)}.")
    check_form(form)
    spec = LEVELS[level]
    test, train = split_items(spec.problems(), num_train, num_test, seed)
    if form == "few_shot" and num_shots > len(train):
        raise ValueError(f"{num_shots} few-shot examples need at least that many train problems; raise --num_train.")
    rng = random.Random(seed + 1)  # shots: a separate stream, so the split does not depend on num_shots

    def example(a: int, b: int, is_train: bool) -> dict:
        text = question(a, b, spec.operator)
        if form == "chat":
            prompt = chat_prompt(f"{text} {CHAT_INSTRUCTION}")
        else:
            pool = [p for p in train if p != (a, b)] if is_train else train
            shots = [(question(x, y, spec.operator), str(spec.result(x, y))) for x, y in rng.sample(pool, num_shots)]
            prompt = few_shot_prompt(shots, text)
        return {"prompt": prompt, "answer": str(spec.result(a, b)), "a": a, "b": b, "level": level}

    return {
        "train": [example(a, b, True) for a, b in train],
        "test": [example(a, b, False) for a, b in test],
    }


def extract_answer(text: str) -> str | None:
    """The last number before the first stop string ("\\n\\n" or "\\nQ:"), normalized; None when there is none."""
    return _last_number(cut_at_stop(text))


def check_answer(completion: str, reference: str) -> bool:
    """Checker for `trl-sharpen eval --checker trl_sharpen.tasks.arithmetic:check_answer`."""
    predicted = extract_answer(completion)
    return predicted is not None and predicted == normalize_number(str(reference))
