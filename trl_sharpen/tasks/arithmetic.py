"""Arithmetic of graded difficulty: `a + b` and `a * b` with a fixed number of digits per operand.

Levels (`LEVELS`), easiest first: `add1` (1-digit + 1-digit), `sub1` (1-digit - 1-digit, a >= b), `add_upto2x1`
(a + b with a of at most 2 digits and b of 1), `add2`, `add3`, `mul1` (1-digit x 1-digit), `mul2x1` (2-digit x
1-digit), `mul2` (2-digit x 2-digit). Mixtures (`MIXTURES`) pool the problems of several levels before the split:
`mixed1` is every 1-digit problem (add1 + sub1 + mul1: 255), so that 200 test prompts of 1-digit arithmetic fit
beside a disjoint train split (add1 alone has 100 problems; SmolLM2-135M-Instruct's greedy accuracy is 0.85 on add1
and 0.80 on mul1, but 0.05-0.40 once a has two digits). The problems of a level are all ordered pairs (a, b) in its digit
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
        pairs = [(a, b) for a in self.operands(self.digits_a) for b in self.operands(self.digits_b)]
        return [(a, b) for a, b in pairs if self.operator != "-" or a >= b]  # no negative differences

    def result(self, a: int, b: int) -> int:
        return {"+": a + b, "-": a - b, "*": a * b}[self.operator]


LEVELS = {
    "add1": Level("+", 1, 1),
    "sub1": Level("-", 1, 1),  # a >= b: 55 problems
    "add_upto2x1": Level("+", 2, 1, up_to=True),  # 0-99 + 0-9: contains add1's 100 problems
    "add2": Level("+", 2, 2),
    "add3": Level("+", 3, 3),
    "mul1": Level("*", 1, 1),
    "mul2x1": Level("*", 2, 1),
    "mul2": Level("*", 2, 2),
}

# Levels whose problems are pooled, then split: each row keeps its own level in its `level` column
MIXTURES = {"mixed1": ("add1", "sub1", "mul1")}

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
    """Train and test examples of one level or mixture: `prompt`, `answer` (the integer as a string), `a`, `b`,
    `level` (the problem's own level)."""
    if level not in LEVELS and level not in MIXTURES:
        raise ValueError(f"Unknown arithmetic level {level!r}: use one of {', '.join([*LEVELS, *MIXTURES])}.")
    check_form(form)
    # (level, a, b) problems; shuffling depends only on their number, so a single level splits as it always did
    problems = [(name, a, b) for name in MIXTURES.get(level, (level,)) for a, b in LEVELS[name].problems()]
    test, train = split_items(problems, num_train, num_test, seed)
    if form == "few_shot" and num_shots > len(train):
        raise ValueError(f"{num_shots} few-shot examples need at least that many train problems; raise --num_train.")
    rng = random.Random(seed + 1)  # shots: a separate stream, so the split does not depend on num_shots

    def solved(name: str, a: int, b: int) -> tuple[str, str]:
        spec = LEVELS[name]
        return question(a, b, spec.operator), str(spec.result(a, b))

    def example(name: str, a: int, b: int, is_train: bool) -> dict:
        text, answer = solved(name, a, b)
        if form == "chat":
            prompt = chat_prompt(f"{text} {CHAT_INSTRUCTION}")
        else:
            pool = [p for p in train if p != (name, a, b)] if is_train else train
            prompt = few_shot_prompt([solved(*shot) for shot in rng.sample(pool, num_shots)], text)
        return {"prompt": prompt, "answer": answer, "a": a, "b": b, "level": name}

    return {
        "train": [example(*problem, True) for problem in train],
        "test": [example(*problem, False) for problem in test],
    }


def extract_answer(text: str) -> str | None:
    """The last number before the first stop string ("\\n\\n" or "\\nQ:"), normalized; None when there is none."""
    return _last_number(cut_at_stop(text))


def check_answer(completion: str, reference: str) -> bool:
    """Checker for `trl-sharpen eval --checker trl_sharpen.tasks.arithmetic:check_answer`."""
    predicted = extract_answer(completion)
    return predicted is not None and predicted == normalize_number(str(reference))
