"""Sharpening metrics: each one on hand-built samples with known answers, the subset expectations against brute-force
enumeration, and `evaluate_sharpening` on the bundled toy model (base reused, separate base, LoRA policy)."""

import itertools
import json
import math
import random
from collections import Counter

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from trl_sharpen import sequence_logprobs
from trl_sharpen.answers import extract_answer
from trl_sharpen.evaluation import evaluate_greedy, evaluate_sharpening
from trl_sharpen.metrics import (
    best_of_n_selection_probabilities,
    majority_selection_probabilities,
    pass_at_k,
    subset_sizes,
)
from trl_sharpen.report import GreedyEvaluation, SampleSet, SharpeningReport, format_report, lift_over_greedy
from trl_sharpen.toy import TOY_MODEL_PATH, check_answer, load_toy_prompts


# Brute force: average over every n-subset, ties shared uniformly -------------------------------------------------


def enumerate_selection(n, num_samples, winners_of):
    """P(i selected) by enumerating all n-subsets; `winners_of(subset)` returns the tied winners (uniform among them)."""
    probabilities = [0.0] * num_samples
    subsets = list(itertools.combinations(range(num_samples), n))
    for subset in subsets:
        winners = winners_of(subset)
        for i in winners:
            probabilities[i] += 1 / len(winners) / len(subsets)
    return probabilities


def brute_force_best_of_n(rewards, n):
    def winners_of(subset):
        best = max(rewards[i] for i in subset)
        return [i for i in subset if rewards[i] == best]

    return enumerate_selection(n, len(rewards), winners_of)


def brute_force_majority(answers, n):
    def winners_of(subset):
        votes = Counter(answers[i] for i in subset if answers[i] is not None)
        if not votes:
            return list(subset)  # no answer anywhere: every sample scores 0
        top = max(votes.values())
        return [i for i in subset if answers[i] is not None and votes[answers[i]] == top]

    return enumerate_selection(n, len(answers), winners_of)


def test_pass_at_k_matches_the_closed_form_and_subset_enumeration():
    for num_samples in range(1, 9):
        for num_correct in range(num_samples + 1):
            for k in range(1, num_samples + 1):
                closed_form = 1 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)
                subsets = list(itertools.combinations(range(num_samples), k))
                enumerated = sum(any(i < num_correct for i in s) for s in subsets) / len(subsets)
                assert pass_at_k(num_samples, num_correct, k) == pytest.approx(closed_form, abs=1e-12)
                assert pass_at_k(num_samples, num_correct, k) == pytest.approx(enumerated, abs=1e-12)
    # Large N, where the binomials overflow floats: the product form stays finite and exact
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5)
    assert pass_at_k(2000, 0, 1000) == 0.0
    with pytest.raises(ValueError, match="1 <= k <= N"):
        pass_at_k(4, 1, 5)


def test_best_of_n_subsampling_matches_enumeration_with_uniform_tie_breaking():
    rng = random.Random(0)
    for trial in range(60):
        num_samples = rng.randint(1, 7)
        # few distinct levels, so most trials have ties
        rewards = [float(rng.randint(0, 3 if trial % 2 else 100)) for _ in range(num_samples)]
        for n in range(1, num_samples + 1):
            exact = best_of_n_selection_probabilities(rewards, n)
            assert exact == pytest.approx(brute_force_best_of_n(rewards, n), abs=1e-12), (rewards, n)
            assert sum(exact) == pytest.approx(1.0)


def test_best_of_n_without_ties_is_the_rank_formula():
    """P(i is the argmax of a random n-subset) = C(#samples ranked below i, n-1) / C(N, n)."""
    rewards = [-3.2, -0.5, -7.0, -1.1, -2.4, -0.9]
    for n in range(1, 7):
        below = [sum(other < r for other in rewards) for r in rewards]
        expected = [math.comb(b, n - 1) / math.comb(6, n) for b in below]
        assert best_of_n_selection_probabilities(rewards, n) == pytest.approx(expected, abs=1e-15)
    assert best_of_n_selection_probabilities(rewards, 6) == [0, 1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="1 <= n <= N"):
        best_of_n_selection_probabilities(rewards, 7)


def test_majority_subsampling_matches_enumeration():
    rng = random.Random(1)
    cases = [
        ["5", "5", "7", None],
        [None, None, None],
        ["1", "2", "3", "4", "5"],
        ["a", "a", "b", "b", "c", None, None, "a"],
    ]
    for _ in range(40):
        cases.append([rng.choice(["1", "2", "3", None]) for _ in range(rng.randint(1, 8))])
    for answers in cases:
        for n in range(1, len(answers) + 1):
            exact = majority_selection_probabilities(answers, n)
            assert exact == pytest.approx(brute_force_majority(answers, n), abs=1e-12), (answers, n)
            assert sum(exact) == pytest.approx(1.0)


# Every metric on two hand-built prompts ----------------------------------------------------------------------------


def hand_built_report(**kwargs) -> SharpeningReport:
    """Prompt 0 (reference 5) and prompt 1 (reference 3), N = 4 samples each, evaluated model = base."""
    base_logprobs = [[-1.0, -3.0, -2.0, -4.0], [-0.5, -2.0, -2.0, -6.0]]
    samples = SampleSet(
        completions=[["answer 5", "so 5", "answer 7", "no idea"], ["answer 3", "answer 4", "it is 4", "answer 9"]],
        answers=[["5", "5", "7", None], ["3", "4", "4", "9"]],
        correct=[[True, True, False, False], [True, False, False, False]],
        base_logprobs=base_logprobs,
        logprobs=base_logprobs,
        truncated=[[False, False, False, True], [False] * 4],
        rewards={"logprob": base_logprobs, "majority": None},
    )
    greedy = GreedyEvaluation(accuracy=0.5, mean_base_logprob=-3.0, completions=["", ""], correct=[True, False])
    return SharpeningReport.from_samples(samples, greedy, **kwargs)


def test_every_metric_on_hand_built_samples():
    report = hand_built_report()
    assert report.ns == [1, 2, 4] and report.num_samples == 4 and report.num_prompts == 2
    assert report.sample_accuracy == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert report.pass_at_n == pytest.approx({1: 0.375, 2: (5 / 6 + 1 / 2) / 2, 4: 1.0})
    # logprob BoN@2, prompt 0: the correct samples rank 4th and 2nd of 4 -> (3 + 1) / 6; prompt 1: the correct sample
    # ranks first -> 3 / 6 (the tie at -2.0 is between two wrong samples)
    assert report.best_of_n["logprob"] == pytest.approx({1: 0.375, 2: (4 / 6 + 3 / 6) / 2, 4: 1.0})
    assert report.best_of_n_base_logprob["logprob"][4] == pytest.approx((-1.0 - 0.5) / 2)
    # majority@2, prompt 0 over its six pairs {55: 1, 57: 1/2, 5-: 1, 57: 1/2, 5-: 1, 7-: 0} -> 4/6; prompt 1: "3"
    # wins half of each of its three pairs (all ties) -> 1.5/6. majority@4 picks "5" (right) and "4" (wrong).
    assert report.best_of_n["majority"] == pytest.approx({1: 0.375, 2: (4 / 6 + 1.5 / 6) / 2, 4: 0.5})
    assert report.gap == pytest.approx({"logprob": 0.625, "majority": 0.125})
    assert report.relative_gap == pytest.approx({"logprob": 1.0, "majority": 0.125 / 0.625})
    assert report.sharpening_error == pytest.approx(((1 - math.exp(-1.0)) + (1 - math.exp(-0.5))) / 2)
    assert report.sharpened_fraction == 0.5  # only prompt 1 has delta = 1 - e^-0.5 < 1/2
    assert report.mean_distinct_answers == 2.5  # {5, 7} and {3, 4, 9}; None is not an answer
    assert report.truncated_fraction == pytest.approx(1 / 8)
    assert report.mean_sample_base_logprob == pytest.approx((-10.0 / 4 - 10.5 / 4) / 2)
    assert report.num_generated == 2 * 5

    summary = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert summary["best_of_n"]["logprob"]["4"] == 1.0 and summary["pass_at_n"]["1"] == 0.375
    text = format_report(report)
    assert "BoN logprob" in text and "pass@n" in text and "+0.625" in text and "checker" not in text


def test_sharpening_error_is_measured_under_the_evaluated_model():
    """delta = 1 - pi(y*|x) under the evaluated model pi, at y* = pi_base's most likely sample (Def. 3.1); see
    tests/test_fidelity.py for a policy whose own mode is elsewhere."""
    base_logprobs, policy_logprobs = [[-2.0, -3.0, -4.0]], [[-0.1, -5.0, -6.0]]
    samples = SampleSet(
        [["a", "b", "c"]], [["1", "2", "3"]], [[True, False, False]], base_logprobs, policy_logprobs, [[False] * 3]
    )
    report = SharpeningReport.from_samples(samples, GreedyEvaluation(1.0, -2.0, ["a"], [True]))
    assert report.sharpening_error == pytest.approx(1 - math.exp(-0.1)) and report.sharpened_fraction == 1.0
    assert report.mean_sample_base_logprob == pytest.approx(-3.0)


def test_relative_gap_is_undefined_when_every_sample_is_correct():
    logprobs = [[-1.0, -2.0]]
    samples = SampleSet(
        [["a", "b"]], [["1", "1"]], [[True, True]], logprobs, logprobs, [[False, False]], {"logprob": logprobs}
    )
    report = SharpeningReport.from_samples(samples, GreedyEvaluation(1.0, -1.0, ["a"], [True]))
    assert report.gap == {"logprob": 0.0} and report.relative_gap == {"logprob": None}


def test_lift_over_greedy_is_the_papers_table_1_row():
    report = hand_built_report()
    skyline = lift_over_greedy(report.best_of_n_selection("logprob"), report)
    assert skyline.accuracy == 1.0 and skyline.accuracy_lift_pct == pytest.approx(100.0)
    assert skyline.loglik_lift == pytest.approx(-0.75 - (-3.0))
    trained = GreedyEvaluation(accuracy=0.6, mean_base_logprob=-2.0, completions=[], correct=[])
    assert lift_over_greedy(trained, report.greedy).accuracy_lift_pct == pytest.approx(20.0)
    assert lift_over_greedy(report, GreedyEvaluation(0.0, None, [], [])).accuracy_lift_pct is None


def test_best_of_n_needs_two_samples():
    logprobs = [[-1.0], [-2.0]]
    samples = SampleSet([["a"], ["b"]], [["1"], ["2"]], [[True], [False]], logprobs, logprobs, [[False]] * 2)
    greedy = GreedyEvaluation(0.5, None, ["", ""], [True, False])
    only_sampling = SharpeningReport.from_samples(samples, greedy)  # greedy / temperature-1 / pass@1 still work
    assert only_sampling.sample_accuracy == 0.5 and only_sampling.best_of_n == {}
    samples.rewards = {"logprob": logprobs}
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        SharpeningReport.from_samples(samples, greedy)


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from trl_sharpen.plots import plot_loglik_histogram, save_plots

    report = hand_built_report()
    paths = save_plots(report, tmp_path)
    assert set(paths) == {"accuracy_vs_n", "loglik_histogram"}
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    report.samples = None
    with pytest.raises(ValueError, match="no samples"):
        plot_loglik_histogram(report, tmp_path / "h.png")


# On the bundled toy model ------------------------------------------------------------------------------------------


def test_evaluate_sharpening_on_the_toy_model(toy_model, toy_tokenizer):
    test = load_toy_prompts("test", limit=24)
    report = evaluate_sharpening(toy_model, toy_tokenizer, test, num_samples=8, max_new_tokens=40, seed=0)
    print(format_report(report))
    greedy = evaluate_greedy(toy_model, toy_tokenizer, test["prompt"], test["answer"], max_new_tokens=40)
    assert report.greedy.accuracy == greedy.accuracy
    assert set(report.best_of_n) == {"logprob", "normalized_logprob", "majority"} and report.ns == [1, 2, 4, 8]
    # The toy task is built so that the sequence argmax is right where greedy is wrong (sharpening must help)
    assert report.greedy.accuracy <= 0.3 and report.best_of_n["logprob"][8] >= report.greedy.accuracy + 0.4
    assert report.best_of_n_base_logprob["logprob"][8] > report.greedy.mean_base_logprob + 1.0
    for reward, curve in report.best_of_n.items():
        assert curve[1] == pytest.approx(report.sample_accuracy)
        assert all(curve[n] <= report.pass_at_n[n] + 1e-9 for n in report.ns), reward
    # The evaluated model is the base: generation-time log-probs are the base log-probs, no second scoring pass
    assert report.samples.base_logprobs == report.samples.logprobs and report.settings["base_is_model"]
    assert report.samples.answers[0] == [extract_answer(c) for c in report.samples.completions[0]]
    assert report.sample_checker_errors == 0 and report.wall_time_s["total"] > 0


def test_trained_models_are_scored_under_the_base(toy_model, toy_tokenizer):
    """A separate base scores the samples (same weights here, so the same numbers as generation recorded); a LoRA
    policy passed as its own base is scored with its adapters disabled."""
    test = load_toy_prompts("test", limit=6)
    kwargs = {"num_samples": 4, "max_new_tokens": 40, "self_rewards": ("logprob",)}
    base_copy = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH).train()  # e.g. a reference mid-training
    separate = evaluate_sharpening(toy_model, toy_tokenizer, test, base_model=base_copy, **kwargs)
    assert not separate.settings["base_is_model"] and base_copy.training  # eval mode only while scoring
    assert torch.allclose(
        torch.tensor(separate.samples.base_logprobs), torch.tensor(separate.samples.logprobs), atol=1e-4
    )

    policy = get_peft_model(toy_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    torch.manual_seed(1)
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0.0, 1.0)  # make the policy differ from its base
    report = evaluate_sharpening(policy, toy_tokenizer, test, base_model=policy, **kwargs)
    prompt_ids = [toy_tokenizer(p)["input_ids"] for p in test["prompt"] for _ in range(4)]
    completion_ids = [ids for row in report.samples.completion_ids for ids in row]
    under_base = sequence_logprobs(base_copy, prompt_ids, completion_ids)
    flat = [lp for row in report.samples.base_logprobs for lp in row]
    assert torch.allclose(torch.tensor(flat), under_base, atol=1e-3)
    policy_logprobs = torch.tensor([lp for row in report.samples.logprobs for lp in row])
    assert (policy_logprobs - under_base).abs().max() > 0.1


def test_a_raising_checker_counts_as_wrong_and_is_reported(toy_model, toy_tokenizer):
    def fussy_checker(completion, reference):
        answer = extract_answer(completion)
        if answer is None or int(answer) % 2:
            raise ValueError("odd answers are not supported")
        return check_answer(completion, reference)

    test = load_toy_prompts("test", limit=8)
    report = evaluate_sharpening(
        toy_model, toy_tokenizer, test, num_samples=4, max_new_tokens=40, checker=fussy_checker, self_rewards=()
    )
    odd = [[a is None or int(a) % 2 == 1 for a in row] for row in report.samples.answers]
    assert report.sample_checker_errors == sum(map(sum, odd)) > 0
    assert not any(c for row_c, row_odd in zip(report.samples.correct, odd) for c, o in zip(row_c, row_odd) if o)
    greedy_odd = sum(extract_answer(c) is None or int(extract_answer(c)) % 2 == 1 for c in report.greedy.completions)
    assert report.greedy.checker_errors == greedy_odd
    assert "answer checker errors" in format_report(report)


def test_bad_inputs_say_what_is_expected(toy_model, toy_tokenizer):
    no_answers = Dataset.from_dict({"prompt": ["Q : 1 + 2 = ?"], "solution": ["3"]})
    with pytest.raises(ValueError, match=r"expected a `answer` column.*\['prompt', 'solution'\]"):
        evaluate_sharpening(toy_model, toy_tokenizer, no_answers, num_samples=4)
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        evaluate_sharpening(toy_model, toy_tokenizer, ["Q : 1 + 2 = ?"], ["3"], num_samples=1)
    with pytest.raises(ValueError, match="1 prompts but 2 reference answers"):
        evaluate_sharpening(toy_model, toy_tokenizer, ["Q : 1 + 2 = ?"], ["3", "4"], num_samples=2)


def test_subset_sizes():
    assert subset_sizes(1) == [1] and subset_sizes(16) == [1, 2, 4, 8, 16]
    assert subset_sizes(50) == [1, 2, 4, 8, 16, 32, 50]
