"""Metrics of one prompt's N samples, exact in expectation: pass@k and the probability that Best-of-n (by a score, or
by majority vote) selects each sample of a uniformly random n-subset of the N samples. Pure functions of the samples'
scores and answers; `trl_sharpen.report` turns them into curves."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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


# The field's sampled-accuracy metrics and the paired verdict -----------------------------------------------------------
# Pure functions of per-prompt correctness flags and answers (numbers in, numbers out), as reported by label-free RL
# papers (TTRL, RENT, SRT): avg@k, the mean accuracy of k samples at a temperature; maj@k, the accuracy of the
# majority answer of k samples; pass@k, whether any of k samples is correct.


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """avg@k: the mean over prompts of the share of a prompt's k samples that are correct."""
    if not correct or any(len(row) == 0 for row in correct):
        raise ValueError("avg@k needs at least one sample for each of at least one prompt.")
    return float(np.mean([np.mean(np.asarray(row, dtype=np.float64)) for row in correct]))


def maj_at_k(answers: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]]) -> float:
    """maj@k: the mean over prompts of whether the most common extracted answer of the prompt's k samples is correct.

    Ties between answers are broken uniformly at random (the expectation is returned); samples without an answer
    (None) do not vote, and a prompt whose samples all lack one scores as a uniformly random sample of them. A sample
    is judged by its own correctness flag, so a checker that accepts several spellings of one answer still counts.
    """
    if len(answers) != len(correct):
        raise ValueError(f"maj@k: {len(answers)} rows of answers but {len(correct)} rows of correctness flags.")
    values = []
    for row_answers, row_correct in zip(answers, correct):
        if len(row_answers) != len(row_correct) or not row_answers:
            raise ValueError("maj@k: each prompt needs as many answers as correctness flags, and at least one.")
        weights = majority_selection_probabilities(row_answers, len(row_answers))
        values.append(float(np.dot(weights, np.asarray(row_correct, dtype=np.float64))))
    return float(np.mean(values))


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int | None = None) -> float:
    """pass@k averaged over prompts (k = each prompt's number of samples when None), unbiased (`pass_at_k`)."""
    if not correct:
        raise ValueError("pass@k needs at least one prompt.")
    return float(np.mean([pass_at_k(len(row), int(sum(map(bool, row))), k or len(row)) for row in correct]))


@dataclass(frozen=True)
class PairedInterval:
    """Mean over prompts of `a - b`, and a percentile bootstrap interval for it (prompts resampled in pairs)."""

    mean: float
    low: float
    high: float
    confidence: float
    num_prompts: int

    @property
    def verdict(self) -> str:
        return interval_verdict(self.low, self.high)


def paired_bootstrap_interval(
    a: Sequence[float],
    b: Sequence[float],
    confidence: float = 0.95,
    num_resamples: int = 10_000,
    seed: int = 0,
) -> PairedInterval:
    """Paired percentile bootstrap for mean(a - b) over prompts: resample the prompts with replacement (a and b of a
    prompt stay together, so what the two ways of answering share per prompt cancels), `num_resamples` times with a
    fixed `seed` (the same data gives the same interval), and take the central `confidence` range of the means."""
    if len(a) != len(b):
        raise ValueError(f"A paired interval needs one value of each per prompt: got {len(a)} and {len(b)}.")
    if not a:
        raise ValueError("A paired interval needs at least one prompt.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    differences = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(differences), size=(num_resamples, len(differences)))
    means = differences[indices].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return PairedInterval(float(differences.mean()), float(low), float(high), confidence, len(differences))


def interval_verdict(low: float, high: float) -> str:
    """'helps' when the whole interval is above 0, 'hurts' when it is below 0, else 'no evidence'."""
    if low > 0:
        return "helps"
    if high < 0:
        return "hurts"
    return "no evidence"
