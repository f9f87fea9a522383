"""The field's sampled-accuracy metrics (avg@k, maj@k, pass@k) against a direct computation, and the paired bootstrap
verdict for BoN@N - greedy: pure functions of numbers, so every test here runs in milliseconds."""

import itertools
import math
import random
from collections import Counter

import numpy as np
import pytest

from trl_sharpen.metrics import (
    avg_at_k,
    interval_verdict,
    maj_at_k,
    mean_pass_at_k,
    paired_bootstrap_interval,
)


def direct_majority_correct(answers, correct) -> float:
    """The majority answer's correctness by counting votes, ties broken by averaging over the tied answers' samples."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return sum(correct) / len(correct)
    top = max(votes.values())
    tied = [a for a, count in votes.items() if count == top]
    # each tied answer wins with probability 1/len(tied); its samples share the win equally
    return sum(sum(c for a2, c in zip(answers, correct) if a2 == a) / votes[a] / len(tied) for a in tied)


def direct_pass_at_k(correct, k) -> float:
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in subset) for subset in subsets) / len(subsets)


def random_prompts(seed: int, num_prompts: int = 30, k: int = 8):
    rng = random.Random(seed)
    answers, correct = [], []
    for _ in range(num_prompts):
        reference = "1"
        row = [rng.choice(["1", "2", "3", None]) for _ in range(k)]
        answers.append(row)
        correct.append([a == reference for a in row])
    return answers, correct


@pytest.mark.parametrize("seed", range(5))
def test_avg_maj_and_pass_at_k_match_a_direct_computation(seed):
    answers, correct = random_prompts(seed)
    assert avg_at_k(correct) == pytest.approx(sum(sum(row) / len(row) for row in correct) / len(correct))
    expected_maj = np.mean([direct_majority_correct(a, c) for a, c in zip(answers, correct)])
    assert maj_at_k(answers, correct) == pytest.approx(expected_maj)
    for k in (1, 3, 8):
        expected_pass = np.mean([direct_pass_at_k(row, k) for row in correct])
        assert mean_pass_at_k(correct, k) == pytest.approx(expected_pass)
    assert mean_pass_at_k(correct) == pytest.approx(np.mean([any(row) for row in correct]))


def test_maj_at_k_on_hand_built_prompts():
    # prompt 1: "7" wins 3-2 and is right; prompt 2: "5" and "6" tie 2-2, the right one wins half the time;
    # prompt 3: no sample has an answer (all wrong); prompt 4: the right answer is a minority
    answers = [["7", "7", "7", "1", "1"], ["5", "5", "6", "6", None], [None] * 5, ["2", "2", "2", "9", None]]
    correct = [[a == ref for a in row] for row, ref in zip(answers, ["7", "5", "0", "9"])]
    assert maj_at_k(answers, correct) == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert avg_at_k(correct) == pytest.approx((3 / 5 + 2 / 5 + 0 + 1 / 5) / 4)
    assert mean_pass_at_k(correct) == pytest.approx(3 / 4)


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="at least one sample"):
        avg_at_k([[]])
    with pytest.raises(ValueError, match="rows of answers"):
        maj_at_k([["1"]], [[True], [False]])
    with pytest.raises(ValueError, match="one value of each per prompt"):
        paired_bootstrap_interval([1.0, 0.0], [1.0])


def paired_case(both_right: int, only_a: int, only_b: int, both_wrong: int):
    a = [1.0] * both_right + [1.0] * only_a + [0.0] * only_b + [0.0] * both_wrong
    b = [1.0] * both_right + [0.0] * only_a + [1.0] * only_b + [0.0] * both_wrong
    return a, b


def test_the_40_prompt_prontoqa_win_is_no_evidence():
    # Built like the study's SmolLM2 chat ProntoQA "win" on 40 prompts: BoN@8 0.625 vs greedy 0.475, i.e. +6
    # prompts, but from 14 prompts BoN gets and greedy misses against 8 the other way round (high paired variance).
    # On 200 prompts the win shrank to 0.505 vs 0.480: the interval must not call the 40-prompt gap a help.
    bon, greedy = paired_case(both_right=11, only_a=14, only_b=8, both_wrong=7)
    assert np.mean(bon) == pytest.approx(0.625) and np.mean(greedy) == pytest.approx(0.475)
    interval = paired_bootstrap_interval(bon, greedy)
    assert interval.mean == pytest.approx(0.15)
    assert interval.low < 0 < interval.high
    assert interval.verdict == "no evidence"
    # the same +6 of 40 without the discordant prompts that go the other way is clear evidence
    assert paired_bootstrap_interval(*paired_case(19, 6, 0, 15)).verdict == "helps"


def test_clear_cases_help_or_hurt_and_the_interval_is_the_normal_one():
    bon, greedy = paired_case(both_right=80, only_a=40, only_b=10, both_wrong=70)  # 200 prompts, +30
    helps = paired_bootstrap_interval(bon, greedy)
    assert helps.verdict == "helps" and helps.mean == pytest.approx(0.15) and helps.num_prompts == 200
    # the bootstrap of a mean of 200 values is close to the normal interval mean +- 1.96 sd / sqrt(n)
    differences = np.subtract(bon, greedy)
    half_width = 1.96 * differences.std() / math.sqrt(len(differences))
    assert helps.low == pytest.approx(0.15 - half_width, abs=0.01)
    assert helps.high == pytest.approx(0.15 + half_width, abs=0.01)
    hurts = paired_bootstrap_interval(greedy, bon)
    assert hurts.verdict == "hurts" and hurts.mean == pytest.approx(-0.15)
    # BoN@N per prompt is an expectation (fractional); identical answers give a zero-width interval: no evidence
    same = paired_bootstrap_interval([0.5, 0.25, 1.0], [0.5, 0.25, 1.0])
    assert (same.low, same.high, same.verdict) == (0.0, 0.0, "no evidence")


def test_the_interval_is_reproducible_and_resamples_prompts():
    rng = random.Random(0)  # fractional BoN@N expectations: the quantiles do not fall on a grid
    bon, greedy = [rng.random() for _ in range(40)], [float(rng.random() < 0.5) for _ in range(40)]
    first, second = paired_bootstrap_interval(bon, greedy), paired_bootstrap_interval(bon, greedy)
    assert first == second  # fixed seed
    other_seed = paired_bootstrap_interval(bon, greedy, seed=1)
    assert other_seed != first and other_seed.mean == first.mean
    assert paired_bootstrap_interval(bon, greedy, confidence=0.5).high < first.high


def test_interval_verdict_bounds():
    assert interval_verdict(0.01, 0.2) == "helps"
    assert interval_verdict(-0.2, -0.01) == "hurts"
    assert interval_verdict(-0.1, 0.1) == interval_verdict(0.0, 0.1) == interval_verdict(-0.1, 0.0) == "no evidence"


def test_random_control_reward_is_uniform_seeded_and_blind_to_the_completion():
    from trl_sharpen.self_rewards import get_self_reward

    reward = get_self_reward("random", tokenizer=None, answer_extractor=None)
    completions = ["7", "7", "I do not know"] * 200
    values = reward(["What is 3 + 4?"] * len(completions), completions, [[1]] * len(completions))
    assert all(0 <= v < 1 for v in values) and abs(np.mean(values) - 0.5) < 0.05
    # the same completion gets different rewards, and a new reward with the same seed repeats the draws
    assert values[0] != values[1]
    again = get_self_reward("random")(["q"] * len(completions), completions, [[1]] * len(completions))
    assert again == values
    assert get_self_reward("random", seed=1)(["q"], ["7"], [[1]]) != values[:1]
