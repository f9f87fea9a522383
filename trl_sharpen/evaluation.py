"""Evaluation of sharpening: does sharpening help this model, and what did it do?

Two entry points:

- `evaluate_greedy`: greedy accuracy and the base log-likelihood of greedy outputs, the two numbers to watch after
  training (sharpening should make greedy decoding do what Best-of-N did; Huang et al. 2025, Table 1).
- `evaluate_sharpening`: the full view from one set of N samples per prompt, as in the paper's App. A: greedy and
  temperature-1 accuracy, BoN@n for n = 1, 2, 4, ..., N per self-reward, pass@n, the generation-verification gap of
  Song et al. (2025, "Mind the Gap", Def. 2.1-2.2), the sharpening error delta (Def. 3.1) and answer diversity.

    >>> report = evaluate_sharpening(model, tokenizer, prompts, answers, num_samples=16)
    >>> print(format_report(report))
    >>> report.save_json("eval/report.json")

Smaller n are *not* sampled again: BoN@n and pass@n are exact expectations over uniformly random n-subsets of the N
samples (the paper simulates them "by subsampling the 50 draws", App. A.4; we take the expectation instead of Monte
Carlo draws, so the curves carry no subsampling noise).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import is_peft_model
from tqdm.auto import tqdm

from .answers import AnswerExtractor, answers_match, get_answer_extractor, load_callable
from .data import ensure_pad_token, model_max_length, tokenize_prompts
from .generation import generate_completions, sampling_config, seeded
from .logprobs import sequence_logprobs
from .self_rewards import MajorityReward, SelfReward, base_scoring_context, get_self_reward


logger = logging.getLogger(__name__)

AnswerChecker = Callable[[str, str], bool]

DEFAULT_SELF_REWARDS = ("logprob", "normalized_logprob", "majority")


@dataclass
class GreedyEvaluation:
    accuracy: float
    # Mean log pi_base(y|x) of the greedy completions (None when no base model was given)
    mean_base_logprob: float | None
    completions: list[str]
    correct: list[bool]
    # Completions on which the answer checker raised (each counted as wrong)
    checker_errors: int = 0
    wall_time_s: float | None = None


def check_answers(checker: AnswerChecker, completions: Sequence[str], references: Sequence) -> tuple[list[bool], int]:
    """`checker(completion, reference)` for each pair; a checker that raises counts that completion as wrong.

    Returns the correctness flags and the number of completions on which the checker raised. A user checker that
    crashes on one odd completion should not lose a whole evaluation, but it must not go unnoticed either: the count
    is reported and the first error is logged.
    """
    correct, errors = [], 0
    for text, reference in zip(completions, references, strict=True):
        try:
            correct.append(bool(checker(text, reference)))
        except Exception as error:
            if errors == 0:
                logger.warning("The answer checker raised on %r (counted as wrong): %r", text[:200], error)
            errors += 1
            correct.append(False)
    return correct, errors


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Dropout off while generating or scoring (a model may arrive mid-training), restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_greedy(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence,
    answers: Sequence[str],
    checker: AnswerChecker = answers_match,
    base_model: torch.nn.Module | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 64,
) -> GreedyEvaluation:
    """Greedy-decode every prompt, check it against its reference answer, and score it under the base model.

    Args:
        base_model: pi_base for the log-likelihood of the greedy outputs; a PEFT model is scored with its adapters
            disabled, so pass the LoRA policy itself to score under its base.
        checker: `checker(completion, reference) -> bool`. A checker that raises counts the sample as wrong.
    """
    start = time.perf_counter()
    ensure_pad_token(tokenizer)
    prompt_ids = tokenize_prompts(tokenizer, prompts, max_new_tokens, model_max_length(model))
    config = sampling_config(model, tokenizer, do_sample=False, max_new_tokens=max_new_tokens)
    with eval_mode(model):
        greedy = generate_completions(model, prompt_ids, config, batch_size=batch_size, record_logprobs=False)
    texts = tokenizer.batch_decode(greedy.completion_ids, skip_special_tokens=True)
    correct, checker_errors = check_answers(checker, texts, answers)
    mean_base_logprob = None
    if base_model is not None:
        with eval_mode(base_model), base_scoring_context(base_model):
            logprobs = sequence_logprobs(base_model, prompt_ids, greedy.completion_ids)
        mean_base_logprob = logprobs.mean().item()
    return GreedyEvaluation(
        accuracy=sum(correct) / len(correct),
        mean_base_logprob=mean_base_logprob,
        completions=texts,
        correct=correct,
        checker_errors=checker_errors,
        wall_time_s=time.perf_counter() - start,
    )


# Metrics of one prompt's N samples ---------------------------------------------------------------------------------


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    r"""Unbiased pass@k from N samples of which c are correct (Chen et al. 2021, "Evaluating Large Language Models
    Trained on Code", Eq. 1): the probability that a uniformly random k-subset holds a correct sample,

    $$\text{pass@}k = 1 - \binom{N-c}{k} \Big/ \binom{N}{k} = 1 - \prod_{i=N-c+1}^{N} \left(1 - \frac{k}{i}\right),$$

    computed with the product form, which stays exact in floating point for any N.
    """
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@k needs 1 <= k <= N; got k={k} with N={num_samples} samples.")
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"num_correct must be in [0, N={num_samples}], got {num_correct}.")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(num_samples - num_correct + 1, num_samples + 1))


def subset_sizes(num_samples: int) -> list[int]:
    """n = 1, 2, 4, ..., and N itself (the paper's N = 50 is not a power of two)."""
    sizes = [2**i for i in range(num_samples.bit_length()) if 2**i <= num_samples]
    return sizes if sizes[-1] == num_samples else [*sizes, num_samples]


def best_of_n_selection_probabilities(rewards: Sequence[float], n: int) -> list[float]:
    r"""P(sample i is selected) by Best-of-n on a uniformly random n-subset of N samples scored by `rewards`.

    Ties are broken uniformly at random among the tied samples of the subset (the expectation of `best_of_n`, which
    keeps the first maximum of randomly ordered samples). For a reward level v with a samples below it and t samples
    at it, the subset's maximum is v with probability [C(a+t, n) - C(a, n)] / C(N, n), and each of the t tied samples
    is then selected with probability 1/t by symmetry. Without ties (t = 1) this is the familiar C(a, n-1) / C(N, n):
    sample i wins when it is in the subset and the other n-1 members all rank below it.

    Best-of-n accuracy is then sum_i P(i selected) * correct_i, with no Monte Carlo noise.
    """
    total = len(rewards)
    if not 1 <= n <= total:
        raise ValueError(f"Best-of-n needs 1 <= n <= N; got n={n} with N={total} samples.")
    level_sizes = Counter(float(r) for r in rewards)
    below, level_probability = 0, {}
    for level in sorted(level_sizes):
        tied = level_sizes[level]
        level_probability[level] = (math.comb(below + tied, n) - math.comb(below, n)) / math.comb(total, n) / tied
        below += tied
    return [level_probability[float(r)] for r in rewards]


def majority_selection_probabilities(answers: Sequence[str | None], n: int) -> list[float]:
    r"""P(sample i is selected) by majority vote (self-consistency) on a uniformly random n-subset of N samples.

    The `majority` self-reward of a sample is the share of the *subset* that gives the same answer (App. A.2), so it
    is recomputed within each subset: using all N votes to rank n samples would let BoN@n see N samples. A sample
    without an answer (None) scores 0 and is selected only from a subset without any answer. Ties between answers
    are broken uniformly among the tied samples, as in `best_of_n_selection_probabilities`.

    Exact computation: answer a (m_a samples) wins with count j when the subset holds j of its samples, at most j of
    every other answer, and the rest from answers with fewer than j samples or no answer (free choices). Answers able
    to reach j are convolved one by one, tracking how many of them tie at j (t ties leave a with 1/(t+1) of the win):

    $$P(a) = \sum_{j \ge 1} \binom{m_a}{j} \sum_{(i_b \le j)} \prod_b \binom{m_b}{i_b}
             \binom{F_j}{n - j - \sum_b i_b} \frac{1}{1 + |\{b: i_b = j\}|} \Big/ \binom{N}{n}.$$

    The samples of a are exchangeable, so each gets P(a) / m_a. Answers of equal size have equal P(a) and share one
    computation. Float64 throughout (binomials stay finite up to N of about 1000).
    """
    total = len(answers)
    if not 1 <= n <= total:
        raise ValueError(f"Best-of-n needs 1 <= n <= N; got n={n} with N={total} samples.")
    class_sizes = Counter(a for a in answers if a is not None)
    no_answer = total - sum(class_sizes.values())
    subsets = math.comb(total, n)
    sizes = list(class_sizes.values())
    win_probability = {}
    for size in set(sizes):
        others = list(sizes)
        others.remove(size)
        ways = 0.0
        for j in range(1, min(size, n) + 1):
            rest = n - j
            rivals = [m for m in others if m >= j]
            free = no_answer + sum(m for m in others if m < j)
            # table[s, t]: ways to take s samples from the rivals, each rival at most j, t rivals exactly at j
            table = np.zeros((rest + 1, len(rivals) + 1))
            table[0, 0] = 1.0
            for m in rivals:
                grown = np.zeros_like(table)
                for i in range(min(j, rest) + 1):
                    if i == j:
                        grown[i:, 1:] += math.comb(m, i) * table[: rest + 1 - i, :-1]
                    else:
                        grown[i:, :] += math.comb(m, i) * table[: rest + 1 - i, :]
                table = grown
            free_ways = np.array([math.comb(free, rest - s) for s in range(rest + 1)], dtype=np.float64)
            by_ties = free_ways @ table
            ways += math.comb(size, j) * float((by_ties / np.arange(1, len(rivals) + 2)).sum())
        win_probability[size] = ways / subsets
    none_probability = math.comb(no_answer, n) / subsets / no_answer if no_answer else 0.0
    return [none_probability if a is None else win_probability[class_sizes[a]] / class_sizes[a] for a in answers]


def validate_sample_count(num_samples: int, self_rewards: Sequence) -> None:
    """Best-of-N selects among samples: refuse N = 1 when self-rewards are asked for, rather than report BoN@1."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
    if self_rewards and num_samples < 2:
        raise ValueError(
            f"Best-of-N with self-rewards {list(self_rewards)} needs at least 2 samples per prompt, got "
            "num_samples=1: with one sample there is nothing to select. Raise num_samples, or evaluate without "
            "self-rewards (self_rewards=() / --self_rewards none) for greedy and temperature-1 accuracy only."
        )


# Reports -------------------------------------------------------------------------------------------------------------


@dataclass
class SampleSet:
    """N samples per prompt (prompt-major lists of lists, N the same for every prompt), with what they are scored by.

    `logprobs` are under the evaluated (sampling) model, `base_logprobs` under pi_base; they are the same numbers
    when the evaluated model is the base. `rewards[name]` holds each sample's self-reward, or None for a majority
    vote, which is recomputed from `answers` within each subset (see `majority_selection_probabilities`).
    """

    completions: list[list[str]]
    answers: list[list[str | None]]
    correct: list[list[bool]]
    base_logprobs: list[list[float]]
    logprobs: list[list[float]]
    truncated: list[list[bool]]
    rewards: dict[str, list[list[float]] | None] = field(default_factory=dict)
    # Samples on which the answer checker raised (counted as wrong)
    checker_errors: int = 0
    # Token ids of the completions (EOS included unless truncated), to rescore them under another model
    completion_ids: list[list[list[int]]] | None = None

    @property
    def num_samples(self) -> int:
        return len(self.correct[0])

    def validate(self) -> None:
        if not self.correct:
            raise ValueError("No prompts were evaluated.")
        per_sample = {
            "completions": self.completions,
            "answers": self.answers,
            "correct": self.correct,
            "base_logprobs": self.base_logprobs,
            "logprobs": self.logprobs,
            "truncated": self.truncated,
            **{f"rewards[{k!r}]": v for k, v in self.rewards.items() if v is not None},
        }
        for name, rows in per_sample.items():
            if len(rows) != len(self.correct) or any(len(row) != self.num_samples for row in rows):
                raise ValueError(
                    f"SampleSet.{name} must hold {self.num_samples} samples for each of {len(self.correct)} prompts."
                )

    def selection_probabilities(self, reward: str, n: int) -> list[list[float]]:
        """Per prompt, P(each sample is selected) by Best-of-n under `reward` on a random n-subset."""
        scores = self.rewards[reward]
        if scores is None:
            return [majority_selection_probabilities(answers, n) for answers in self.answers]
        return [best_of_n_selection_probabilities(row, n) for row in scores]


@dataclass
class Selection:
    """Accuracy and mean log pi_base(y|x) of one way of answering each prompt (greedy, BoN@n, ...)."""

    accuracy: float
    mean_base_logprob: float | None


@dataclass
class SharpeningReport:
    """Everything `evaluate_sharpening` measures, from one set of N samples per prompt. Keys of per-n dicts are n.

    - `sample_accuracy`: temperature-1 accuracy, the mean correctness of all samples (= BoN@1 = pass@1).
    - `pass_at_n[n]`: unbiased pass@n (`pass_at_k`), the coverage skyline (needs the ground truth).
    - `best_of_n[reward][n]`, `best_of_n_base_logprob[reward][n]`: expected accuracy and log pi_base of the sample
      that Best-of-n selects (exact subset expectation, see `best_of_n_selection_probabilities`).
    - `gap[reward]`: generation-verification gap at n = N (Song et al. 2025, Def. 2.1): BoN@N accuracy minus
      `sample_accuracy`; `relative_gap[reward]` = gap / (1 - sample_accuracy) (Def. 2.2; None when every sample is
      correct).
    - `sharpening_error`: mean over prompts of delta_hat(x) = 1 - max_i pi(y_i|x), the probability the evaluated
      model puts off its most likely sampled completion (Def. 3.1's delta, measured at the model's own mode; an upper
      bound on 1 - max_y pi(y|x), since the mode may be unsampled). `sharpened_fraction`: share of prompts with
      delta_hat < 1/2, where greedy decoding provably returns that completion (Prop. 3.1).
    - `mean_distinct_answers`: distinct extracted answers among the N samples (None answers not counted).
    """

    model_name: str | None
    base_model_name: str | None
    num_prompts: int
    num_samples: int
    greedy: GreedyEvaluation
    sample_accuracy: float
    mean_sample_base_logprob: float
    pass_at_n: dict[int, float]
    best_of_n: dict[str, dict[int, float]]
    best_of_n_base_logprob: dict[str, dict[int, float]]
    gap: dict[str, float]
    relative_gap: dict[str, float | None]
    sharpening_error: float
    sharpened_fraction: float
    mean_distinct_answers: float
    truncated_fraction: float
    sample_checker_errors: int
    settings: dict = field(default_factory=dict)
    wall_time_s: dict[str, float] = field(default_factory=dict)
    samples: SampleSet | None = field(default=None, repr=False)

    @property
    def ns(self) -> list[int]:
        return sorted(self.pass_at_n)

    @property
    def num_generated(self) -> int:
        """Completions generated: N samples plus one greedy decoding per prompt."""
        return self.num_prompts * (self.num_samples + 1)

    def best_of_n_selection(self, reward: str = "logprob", n: int | None = None) -> Selection:
        """BoN@n (default n = N) as a `Selection`, e.g. the inference-time skyline row of a benchmark table."""
        n = self.num_samples if n is None else n
        return Selection(self.best_of_n[reward][n], self.best_of_n_base_logprob[reward][n])

    @classmethod
    def from_samples(
        cls,
        samples: SampleSet,
        greedy: GreedyEvaluation,
        ns: Sequence[int] | None = None,
        model_name: str | None = None,
        base_model_name: str | None = None,
        settings: dict | None = None,
        wall_time_s: dict[str, float] | None = None,
    ) -> SharpeningReport:
        """Compute every metric from the samples (no model needed: the tests build samples by hand)."""
        samples.validate()
        num_samples = samples.num_samples
        ns = subset_sizes(num_samples) if ns is None else sorted(set(ns))
        if ns[0] < 1 or ns[-1] > num_samples:
            raise ValueError(f"Every n must be in [1, N={num_samples}], got {ns}.")
        validate_sample_count(num_samples, list(samples.rewards))
        correct = [np.asarray(row, dtype=np.float64) for row in samples.correct]
        base_logprobs = [np.asarray(row, dtype=np.float64) for row in samples.base_logprobs]
        sample_accuracy = float(np.mean([row.mean() for row in correct]))
        best_of_n, best_of_n_logprob = {}, {}
        for reward in samples.rewards:
            best_of_n[reward], best_of_n_logprob[reward] = {}, {}
            for n in ns:
                weights = samples.selection_probabilities(reward, n)
                best_of_n[reward][n] = float(np.mean([w @ c for w, c in zip(weights, correct, strict=True)]))
                best_of_n_logprob[reward][n] = float(
                    np.mean([w @ lp for w, lp in zip(weights, base_logprobs, strict=True)])
                )
        gap = {
            reward: curve[num_samples] - sample_accuracy for reward, curve in best_of_n.items() if num_samples in curve
        }
        headroom = 1.0 - sample_accuracy
        relative_gap = {reward: (value / headroom if headroom > 0 else None) for reward, value in gap.items()}
        delta = [1.0 - math.exp(max(row)) for row in samples.logprobs]
        return cls(
            model_name=model_name,
            base_model_name=base_model_name,
            num_prompts=len(correct),
            num_samples=num_samples,
            greedy=greedy,
            sample_accuracy=sample_accuracy,
            mean_sample_base_logprob=float(np.mean([row.mean() for row in base_logprobs])),
            pass_at_n={n: float(np.mean([pass_at_k(num_samples, int(row.sum()), n) for row in correct])) for n in ns},
            best_of_n=best_of_n,
            best_of_n_base_logprob=best_of_n_logprob,
            gap=gap,
            relative_gap=relative_gap,
            sharpening_error=float(np.mean(delta)),
            sharpened_fraction=float(np.mean([d < 0.5 for d in delta])),
            mean_distinct_answers=float(np.mean([len({a for a in row if a is not None}) for row in samples.answers])),
            truncated_fraction=float(np.mean([np.mean(row) for row in samples.truncated])),
            sample_checker_errors=samples.checker_errors,
            settings=dict(settings or {}),
            wall_time_s=dict(wall_time_s or {}),
            samples=samples,
        )

    def to_dict(self) -> dict:
        """The summary as JSON-ready data (per-n keys become strings; the samples are left out)."""

        def by_n(curve: Mapping[int, float]) -> dict[str, float]:
            return {str(n): value for n, value in sorted(curve.items())}

        return {
            "model": self.model_name,
            "base_model": self.base_model_name,
            "num_prompts": self.num_prompts,
            "num_samples": self.num_samples,
            "ns": self.ns,
            "greedy": {
                "accuracy": self.greedy.accuracy,
                "mean_base_logprob": self.greedy.mean_base_logprob,
                "checker_errors": self.greedy.checker_errors,
            },
            "sample_accuracy": self.sample_accuracy,
            "mean_sample_base_logprob": self.mean_sample_base_logprob,
            "pass_at_n": by_n(self.pass_at_n),
            "best_of_n": {reward: by_n(curve) for reward, curve in self.best_of_n.items()},
            "best_of_n_base_logprob": {reward: by_n(curve) for reward, curve in self.best_of_n_base_logprob.items()},
            "gap": self.gap,
            "relative_gap": self.relative_gap,
            "sharpening_error": self.sharpening_error,
            "sharpened_fraction": self.sharpened_fraction,
            "mean_distinct_answers": self.mean_distinct_answers,
            "truncated_fraction": self.truncated_fraction,
            "sample_checker_errors": self.sample_checker_errors,
            "num_generated": self.num_generated,
            "settings": self.settings,
            "wall_time_s": self.wall_time_s,
        }

    def save_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def save_samples(self, path: str | os.PathLike) -> Path:
        """One JSON line per sample: prompt index, completion (text and token ids), extracted answer, correctness,
        log-probs under the evaluated model and pi_base, self-rewards."""
        if self.samples is None:
            raise ValueError("This report carries no samples.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        s = self.samples
        with open(path, "w") as f:
            for p, row in enumerate(s.completions):
                for i, completion in enumerate(row):
                    record = {
                        "prompt_index": p,
                        "completion": completion,
                        "answer": s.answers[p][i],
                        "correct": s.correct[p][i],
                        "base_logprob": s.base_logprobs[p][i],
                        "logprob": s.logprobs[p][i],
                        "truncated": s.truncated[p][i],
                        **{f"reward/{k}": v[p][i] for k, v in s.rewards.items() if v is not None},
                    }
                    if s.completion_ids is not None:
                        record["completion_ids"] = s.completion_ids[p][i]
                    f.write(json.dumps(record) + "\n")
        return path


@dataclass
class Lift:
    """One row of the paper's Table 1 against the base model's greedy decoding.

    `accuracy_lift_pct` = 100 * (accuracy - greedy accuracy) / greedy accuracy, the "% lift over greedy (accuracy)"
    (None when the greedy accuracy is 0); `loglik_lift` = mean log pi_base(y|x) - that of the base's greedy outputs,
    the "lift over greedy (avg seq. log-likelihood)" (None when either log-likelihood is unknown).
    """

    accuracy: float
    accuracy_lift_pct: float | None
    mean_base_logprob: float | None
    loglik_lift: float | None


def lift_over_greedy(
    result: GreedyEvaluation | Selection | SharpeningReport, baseline: GreedyEvaluation | SharpeningReport
) -> Lift:
    """Accuracy and log-likelihood lift of `result` over the base model's greedy decoding (Huang et al. 2025, Table 1).

    A `SharpeningReport` stands for its greedy decoding; use `report.best_of_n_selection("logprob")` for BoN@N.
    Compare models on the same prompts with log-likelihoods under the same base (`evaluate_greedy(...,
    base_model=base)`):

        >>> base = evaluate_sharpening(base_model, tokenizer, prompts, answers, num_samples=16)
        >>> lift_over_greedy(base.best_of_n_selection("logprob"), base)  # inference-time skyline
        >>> lift_over_greedy(evaluate_greedy(trained, tokenizer, prompts, answers, base_model=base_model), base)
    """
    if isinstance(result, SharpeningReport):
        result = result.greedy
    if isinstance(baseline, SharpeningReport):
        baseline = baseline.greedy
    lift_pct = 100.0 * (result.accuracy - baseline.accuracy) / baseline.accuracy if baseline.accuracy > 0 else None
    loglik_lift = (
        None
        if result.mean_base_logprob is None or baseline.mean_base_logprob is None
        else result.mean_base_logprob - baseline.mean_base_logprob
    )
    return Lift(result.accuracy, lift_pct, result.mean_base_logprob, loglik_lift)


# Running an evaluation -----------------------------------------------------------------------------------------------


def reference_answers(dataset, answer_column: str = "answer") -> list:
    """The reference answers of a `datasets.Dataset`, with an error that says which column is expected."""
    if answer_column not in dataset.column_names:
        raise ValueError(
            f"Evaluation needs reference answers: expected a `{answer_column}` column, but the dataset's columns are "
            f"{dataset.column_names}. Name the column that holds them (`answer_column=` / `--answer_column`)."
        )
    answers = list(dataset[answer_column])
    missing = [i for i, a in enumerate(answers) if a is None]
    if missing:
        raise ValueError(
            f"{len(missing)} rows have no reference answer in `{answer_column}` (first: row {missing[0]}); drop or "
            "fill them before evaluating."
        )
    return answers


def get_answer_checker(checker: str | AnswerChecker | None, answer_extractor: AnswerExtractor) -> AnswerChecker:
    """A checker from a callable or a `"package.module:function"` path; by default the extracted answer must equal
    the normalized reference (`answers_match` with `answer_extractor`)."""
    if checker is None:
        return lambda completion, reference: answers_match(completion, reference, answer_extractor)
    if isinstance(checker, str):
        checker = load_callable(checker)
    if not callable(checker):
        raise ValueError(f"The answer checker must be callable, got {type(checker).__name__}.")
    return checker


def _model_name(model) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None)


@torch.no_grad()
def evaluate_sharpening(
    model: torch.nn.Module,
    tokenizer,
    prompts,
    answers: Sequence | None = None,
    num_samples: int = 16,
    *,
    checker: str | AnswerChecker | None = None,
    answer_extractor: str | AnswerExtractor | None = None,
    base_model: torch.nn.Module | None = None,
    self_rewards: Sequence[str | Callable | SelfReward] = DEFAULT_SELF_REWARDS,
    ns: Sequence[int] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 64,
    scoring_batch_size: int = 16,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    seed: int = 0,
) -> SharpeningReport:
    """Greedy-decode each prompt and sample N completions from `model`, then report every sharpening metric from
    those samples (see `SharpeningReport`; BoN@n and pass@n for n < N by exact subsampling).

    Args:
        model: the model to evaluate (a base, or a sharpened policy).
        prompts: a `datasets.Dataset` with `prompt_column` (and `answer_column` when `answers` is None), or a list of
            prompts (strings or chat-message lists).
        answers: reference answers, one per prompt; read from `answer_column` when None.
        checker: `checker(completion, reference) -> bool`, or its `"package.module:function"` path. A checker that
            raises counts that completion as wrong; the number of such completions is reported. Default: the
            extracted answer equals the normalized reference.
        answer_extractor: final-answer extractor, for the `majority` self-reward, answer diversity and the default
            checker (default: last `\\boxed{}` or last number).
        base_model: pi_base for log-likelihoods and self-rewards when `model` is not the base: a separate model, or
            `model` itself when it is a PEFT model (its adapters are disabled for scoring). When None, `model` is
            the base and the log-probabilities recorded during sampling are reused (no second forward pass).
        self_rewards: self-rewards to run Best-of-N with (registry names, callables or `SelfReward`s); `()` for
            greedy, temperature-1 and pass@n only. Needs num_samples >= 2.
        ns: subset sizes for the curves (default 1, 2, 4, ..., N).
        temperature, top_p, top_k: sampling parameters (paper: plain sampling at temperature 1, App. A.4).
        max_new_tokens: completion length limit for greedy and sampled completions (truncated completions are kept).
        batch_size: sequences per `generate` call; scoring_batch_size: sequences per forward when scoring under a
            separate base model.
        seed: sampling seed (the global RNG state is restored afterwards).
    """
    timer = {"start": time.perf_counter()}
    self_rewards = list(self_rewards)
    validate_sample_count(num_samples, [getattr(r, "__name__", r) for r in self_rewards])
    if hasattr(prompts, "column_names"):
        if prompt_column not in prompts.column_names:
            raise ValueError(f"The dataset has no `{prompt_column}` column; its columns are {prompts.column_names}.")
        if answers is None:
            answers = reference_answers(prompts, answer_column)
        prompts = prompts[prompt_column]
    elif answers is None:
        raise ValueError("Pass the reference answers (`answers=`), or a dataset with an `answer_column`.")
    prompts, answers = list(prompts), list(answers)
    if len(prompts) != len(answers):
        raise ValueError(f"Got {len(prompts)} prompts but {len(answers)} reference answers; pass one per prompt.")
    if not prompts:
        raise ValueError("No prompts to evaluate.")
    extractor = get_answer_extractor(answer_extractor)
    checker = get_answer_checker(checker, extractor)
    # Scoring a plain model under itself is what generation already recorded: skip the second forward.
    if base_model is model and not is_peft_model(model):
        base_model = None
    scorer = model if base_model is None else base_model

    ensure_pad_token(tokenizer)
    greedy = evaluate_greedy(
        model,
        tokenizer,
        prompts,
        answers,
        checker,
        base_model=scorer,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    timer["greedy"] = time.perf_counter()

    prompt_ids = tokenize_prompts(tokenizer, prompts, max_new_tokens, model_max_length(model))
    config = sampling_config(
        model, tokenizer, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens
    )
    with eval_mode(model), seeded(model, seed):
        # The long part of an evaluation (N samples per prompt): a progress bar, like Best-of-N sampling
        with tqdm(total=len(prompt_ids) * num_samples, desc="Sampling for evaluation", unit="sample") as bar:
            sampled = generate_completions(
                model, prompt_ids, config, num_samples=num_samples, batch_size=batch_size, progress=bar
            )
    timer["sampling"] = time.perf_counter()

    expanded_prompt_ids = [prompt_ids[p] for p in sampled.prompt_index]
    if base_model is None:
        base_logprobs = list(sampled.logprobs)
    else:
        with eval_mode(base_model), base_scoring_context(base_model):
            base_logprobs = sequence_logprobs(
                base_model, expanded_prompt_ids, sampled.completion_ids, micro_batch_size=scoring_batch_size
            ).tolist()
    texts = tokenizer.batch_decode(sampled.completion_ids, skip_special_tokens=True)
    references = [answers[p] for p in sampled.prompt_index]
    correct, checker_errors = check_answers(checker, texts, references)

    rewards: dict[str, list[float] | None] = {}
    for spec in self_rewards:
        reward = get_self_reward(spec, answer_extractor=extractor, model=scorer, tokenizer=tokenizer)
        if isinstance(reward, MajorityReward):
            rewards[reward.name] = None  # recomputed within each subset from the extracted answers
        else:
            rewards[reward.name] = reward(
                [prompts[p] for p in sampled.prompt_index],
                texts,
                sampled.completion_ids,
                base_logprobs=base_logprobs,
                group_ids=sampled.prompt_index,
            )
    timer["scoring"] = time.perf_counter()

    def per_prompt(values):
        return [list(values[p * num_samples : (p + 1) * num_samples]) for p in range(len(prompts))]

    samples = SampleSet(
        completions=per_prompt(texts),
        answers=per_prompt([extractor(t) for t in texts]),
        correct=per_prompt(correct),
        base_logprobs=per_prompt(base_logprobs),
        logprobs=per_prompt(sampled.logprobs),
        truncated=per_prompt(sampled.truncated),
        rewards={name: None if values is None else per_prompt(values) for name, values in rewards.items()},
        checker_errors=checker_errors,
        completion_ids=per_prompt(sampled.completion_ids),
    )
    settings = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "self_rewards": list(rewards),
        "base_is_model": base_model is None,
    }
    report = SharpeningReport.from_samples(
        samples,
        greedy,
        ns=ns,
        model_name=_model_name(model),
        base_model_name=_model_name(scorer),
        settings=settings,
    )
    report.wall_time_s = {
        "greedy": timer["greedy"] - timer["start"],
        "sampling": timer["sampling"] - timer["greedy"],
        "scoring": timer["scoring"] - timer["sampling"],
        "total": time.perf_counter() - timer["start"],
    }
    return report


# Terminal table -----------------------------------------------------------------------------------------------------


def _fmt(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if sign else f"{value:.3f}"


def format_report(report: SharpeningReport) -> str:
    """A readable plain-text summary of a `SharpeningReport` for the terminal."""
    n_max = report.num_samples
    temperature = report.settings.get("temperature")
    sampling = "sample" if temperature is None else f"temperature-{temperature:g}"
    base_note = "" if report.base_model_name == report.model_name else f"   (pi_base: {report.base_model_name})"
    rows = [
        ("greedy accuracy", _fmt(report.greedy.accuracy)),
        (f"{sampling} accuracy (mean over samples)", _fmt(report.sample_accuracy)),
        ("mean log pi_base(greedy output)", _fmt(report.greedy.mean_base_logprob)),
        ("mean log pi_base(sample)", _fmt(report.mean_sample_base_logprob)),
        (
            "sharpening error delta (mean)",
            f"{_fmt(report.sharpening_error)}   ({100 * report.sharpened_fraction:.1f}% of prompts have delta < 1/2)",
        ),
        ("distinct answers among N (mean)", f"{report.mean_distinct_answers:.2f}"),
        ("truncated samples", f"{100 * report.truncated_fraction:.1f}%"),
    ]
    if report.greedy.checker_errors or report.sample_checker_errors:
        errors = report.greedy.checker_errors + report.sample_checker_errors
        rows.append(
            (
                "answer checker errors",
                f"{errors} completions counted as wrong ({report.greedy.checker_errors} greedy, "
                f"{report.sample_checker_errors} sampled)",
            )
        )
    width = max(len(label) for label, _ in rows) + 3
    lines = [
        f"model: {report.model_name}{base_note}",
        f"{report.num_prompts} prompts, N = {n_max} samples per prompt, {report.num_generated} completions generated",
        "",
        *(f"  {label:<{width}}{value}" for label, value in rows),
    ]
    label_width = max([len("pass@n (oracle)")] + [len(f"BoN {r}") for r in report.best_of_n]) + 2
    header = "accuracy".ljust(label_width) + "".join(f"n={n}".rjust(8) for n in report.ns)
    lines += ["", header, "-" * len(header)]
    for reward, curve in report.best_of_n.items():
        lines.append(f"BoN {reward}".ljust(label_width) + "".join(_fmt(curve[n]).rjust(8) for n in report.ns))
    lines.append("pass@n (oracle)".ljust(label_width) + "".join(_fmt(report.pass_at_n[n]).rjust(8) for n in report.ns))
    if report.gap:
        header = (
            "self-reward".ljust(label_width)
            + "gap".rjust(8)
            + "relative gap".rjust(14)
            + "BoN lift over greedy".rjust(22)
            + "log pi_base(BoN)".rjust(18)
        )
        lines += [
            "",
            f"generation-verification gap at n={n_max} (Song et al. 2025): BoN@{n_max} accuracy - {sampling} accuracy",
            header,
            "-" * len(header),
        ]
        for reward, value in report.gap.items():
            selection = report.best_of_n_selection(reward)
            lift = lift_over_greedy(selection, report.greedy)
            lines.append(
                reward.ljust(label_width)
                + _fmt(value, sign=True).rjust(8)
                + _fmt(report.relative_gap[reward], sign=True).rjust(14)
                + (f"{lift.accuracy_lift_pct:+.1f}%" if lift.accuracy_lift_pct is not None else "-").rjust(22)
                + _fmt(selection.mean_base_logprob).rjust(18)
            )
    return "\n".join(lines)


__all__ = [
    "DEFAULT_SELF_REWARDS",
    "GreedyEvaluation",
    "Lift",
    "SampleSet",
    "Selection",
    "SharpeningReport",
    "best_of_n_selection_probabilities",
    "check_answers",
    "evaluate_greedy",
    "evaluate_sharpening",
    "format_report",
    "lift_over_greedy",
    "majority_selection_probabilities",
    "pass_at_k",
    "reference_answers",
    "subset_sizes",
]
