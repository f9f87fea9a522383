"""The bundled toy task: adding a list of digits, where greedy decoding fails but the most likely answer is right.

Data-generating process (what the bundled base model was pretrained on)
----------------------------------------------------------------------
A prompt asks for the sum of ``k`` single digits, ``k`` in 2..5::

    Q : 3 + 5 + 2 + 7 = ?

Each pretraining completion is, independently,

* with probability ``careful_prob[k]`` a *careful* worked solution that keeps a running sum, one step per term,
  then states the answer. It is deterministic given the prompt, so all of this mass sits on **one** sequence::

      3 + 5 = 8 , 8 + 2 = 10 , 10 + 7 = 17 . answer 17

* otherwise a *shortcut*: ``answer`` followed by a blind guess drawn uniformly from the 99 wrong numbers in 0..99.
  The shortcut mass, although larger in total, is spread over 99 sequences::

      answer 42

Why sharpening matters here (Huang et al. 2025, Prop. 3.1 and Sec. 3.1): with ``careful_prob[k] < 1/2`` the first
token ``answer`` is more likely than the first careful token, so token-wise greedy decoding commits to a shortcut and
is wrong. The single most likely *sequence*, however, is the careful one (``careful_prob[k]`` against
``(1 - careful_prob[k]) / 99`` for any one guess), so Best-of-N by sequence log-probability finds it as soon as one of
the N samples is careful. Prompts with two terms are "easy" (``careful_prob = 0.85``): the base is already confident
there, which is what adaptive sampling exploits.

The ``poor_coverage`` variant keeps the same format but makes careful solutions rare (``careful_prob = 0.02``): the
argmax sequence is still the careful one, but few base samples ever reach it, the regime in which the paper predicts
exploration (XPO) to beat SFT-Sharpening. Its bundled base (``base_model_poor_coverage``, 15000 pretraining steps)
samples the careful solution within 16 draws on 27% of the test prompts; pass@16 is 0.38 because a blind guess
cannot avoid the sum it never computed and hits it about 1% of the time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


MAX_NUMBER = 99
MIN_TERMS, MAX_TERMS = 2, 5

# Token inventory of the toy tokenizer (word level); numbers 0..99 are single tokens.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]
WORDS = ["Q", ":", "+", "=", "?", ",", ".", "answer"]
NUMBERS = [str(i) for i in range(MAX_NUMBER + 1)]

# Chat template of the toy tokenizer: `<|user|> 3 + 5 = ? <|assistant|> 3 + 5 = 8 . answer 8 <eos>`.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|> ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|> ' + message['content'] + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class ToyTask:
    """Parameters of the data-generating process (see the module docstring)."""

    name: str
    # P(careful worked solution | number of terms)
    careful_prob: dict[int, float]
    # Mix of prompt lengths (number of terms)
    terms_weights: dict[int, float] = field(default_factory=lambda: {2: 0.15, 3: 0.30, 4: 0.30, 5: 0.25})

    def sample_terms(self, rng: random.Random) -> list[int]:
        lengths, weights = zip(*sorted(self.terms_weights.items()))
        k = rng.choices(lengths, weights=weights)[0]
        return [rng.randint(0, 9) for _ in range(k)]

    def sample_completion(self, terms: list[int], rng: random.Random) -> str:
        if rng.random() < self.careful_prob[len(terms)]:
            return careful_solution(terms)
        return shortcut_answer(terms, rng)


DEFAULT_TASK = ToyTask(name="default", careful_prob={2: 0.85, 3: 0.40, 4: 0.35, 5: 0.30})
POOR_COVERAGE_TASK = ToyTask(name="poor_coverage", careful_prob={2: 0.02, 3: 0.02, 4: 0.02, 5: 0.02})
TASKS = {task.name: task for task in (DEFAULT_TASK, POOR_COVERAGE_TASK)}


def question(terms: list[int]) -> str:
    """The bare question, used as the user message of conversational prompts: ``3 + 5 + 2 = ?``."""
    return " + ".join(map(str, terms)) + " = ?"


def format_prompt(terms: list[int]) -> str:
    """The standard (plain-text) prompt: ``Q : 3 + 5 + 2 = ?``."""
    return "Q : " + question(terms)


def careful_solution(terms: list[int]) -> str:
    """The deterministic worked solution: one running-sum step per term, then the answer."""
    steps, total = [], terms[0]
    for term in terms[1:]:
        steps.append(f"{total} + {term} = {total + term}")
        total += term
    return " , ".join(steps) + f" . answer {total}"


def shortcut_answer(terms: list[int], rng: random.Random) -> str:
    """A blind guess: any number in 0..99 except the correct sum, uniformly."""
    guess = rng.randint(0, MAX_NUMBER - 1)
    if guess >= sum(terms):
        guess += 1
    return f"answer {guess}"


def terms_from_prompt(prompt: str) -> list[int]:
    return [int(token) for token in prompt.replace("Q :", "").split("=")[0].split("+")]
