"""Label-free sharpening metrics in `trainer.evaluate()` (trl_sharpen.monitoring), checked against direct computations
on the toy base, and best-iterate selection through the Trainer's own `load_best_model_at_end`."""

import contextlib
import copy
import logging
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, EarlyStoppingCallback

from trl_sharpen import (
    BoNSFTConfig,
    BoNSFTTrainer,
    SelfRewardDPOConfig,
    SelfRewardDPOTrainer,
    XPOConfig,
    XPOTrainer,
)
from trl_sharpen.answers import answers_match, extract_answer
from trl_sharpen.data import tokenize_prompt
from trl_sharpen.generation import generate_completions, sampling_config, seeded
from trl_sharpen.logprobs import sequence_logprobs
from trl_sharpen.monitoring import (
    CollapseAlarmCallback,
    PromptRecord,
    aggregate,
    measure_prompts,
    sharpening_error_against_base,
)
from trl_sharpen.toy import TOY_MODEL_PATH, load_toy_prompts

from .trainer_args import cpu_test_args


LABEL_FREE = {
    "eval_objective",
    "eval_base_logprob",
    "eval_kl",
    "eval_entropy",
    "eval_greedy_base_logprob",
    "eval_sharpening_error",
    "eval_distinct_answers",
    "eval_base_majority_agreement",
    "eval_top_answer_share",
    "eval_base_top_answer_share",
    "eval_guarded_sharpening_error",
    "eval_mean_length",
    "eval_clipped_ratio",
}
WITH_LABELS = {"eval_greedy_accuracy", "eval_bon_accuracy"}


def record(sample_logprobs, sample_base_logprobs, **overrides):
    k = len(sample_logprobs)
    values = dict(
        sample_logprobs=sample_logprobs,
        sample_base_logprobs=sample_base_logprobs,
        sample_answers=["1"] * k,
        sample_lengths=[5] * k,
        sample_truncated=[False] * k,
        greedy_logprob=-1.0,
        greedy_base_logprob=-2.0,
        base_greedy_logprob=-3.0,
        base_greedy_base_logprob=-50.0,
    )
    values.update(overrides)
    return PromptRecord(**values)


def test_aggregate_matches_hand_computation():
    records = [
        record([-1.0, -2.0], [-3.0, -1.0], sample_answers=["4", None], sample_lengths=[3, 7],
               sample_truncated=[False, True], sample_correct=[True, False], greedy_correct=True),
        record([-0.5, -0.5], [-2.0, -2.5], sample_answers=["4", "5"], sample_lengths=[2, 2],
               sample_correct=[False, True], greedy_correct=False, greedy_base_logprob=-9.0),
    ]  # fmt: skip
    beta = 0.3
    metrics = aggregate(records, beta)
    # J_beta per sample: log pi_base - beta (log pi - log pi_base); mean over samples, then over prompts
    j = [np.mean([-3 - beta * 2, -1 - beta * -1]), np.mean([-2 - beta * 1.5, -2.5 - beta * 2])]
    assert metrics["objective"] == pytest.approx(np.mean(j))
    assert metrics["base_logprob"] == pytest.approx(np.mean([-2.0, -2.25]))
    assert metrics["kl"] == pytest.approx(np.mean([0.5, 1.75]))
    assert metrics["objective"] == pytest.approx(metrics["base_logprob"] - beta * metrics["kl"])
    assert metrics["entropy"] == pytest.approx(np.mean([1.5, 0.5]))
    assert metrics["greedy_base_logprob"] == pytest.approx(-5.5)
    assert metrics["distinct_answers"] == pytest.approx(1.5)  # None is no answer
    assert metrics["mean_length"] == pytest.approx(np.mean([5, 2]))
    assert metrics["clipped_ratio"] == pytest.approx(0.25)
    assert metrics["greedy_accuracy"] == pytest.approx(0.5)
    # BoN@2 by log pi_base: prompt 0's best-scored sample is truncated, so the complete one (correct) is taken;
    # prompt 1 takes sample 0 (-2.0 > -2.5), which is wrong
    assert metrics["bon_accuracy"] == pytest.approx(0.5)
    # delta: y* = the complete candidate pi_base rates highest (prompt 0: not the truncated sample 1 at -1.0 but the
    # greedy output at -2.0, pi = e^-1; prompt 1: sample 0 at -2.0, pi = e^-0.5)
    assert metrics["sharpening_error"] == pytest.approx(np.mean([1 - math.exp(-1.0), 1 - math.exp(-0.5)]))
    assert "greedy_accuracy" not in aggregate([record([-1.0], [-1.0])], beta)


def test_sharpening_error_is_measured_at_the_base_argmax():
    # A policy collapsed onto a sequence pi_base rates low (its own mode has pi = 0.99): delta must be large
    collapsed = record([math.log(0.99), math.log(0.99)], [-30.0, -30.0], greedy_logprob=math.log(0.99),
                       greedy_base_logprob=-30.0, base_greedy_logprob=math.log(1e-4), base_greedy_base_logprob=-1.0)  # fmt: skip
    assert sharpening_error_against_base(collapsed) == pytest.approx(1 - 1e-4)
    # The policy sharpened onto pi_base's argmax: delta small
    sharpened = record([math.log(0.99)], [-1.0], greedy_logprob=math.log(0.99), greedy_base_logprob=-1.0)
    assert sharpening_error_against_base(sharpened) == pytest.approx(0.01)


# ---------------------------------------------------------------------------------------------- on the toy base
def perturbed_copy(model, scale=0.05):
    """A model that differs from `model`, as a stand-in pi_base, so that KL and delta are not trivially 0."""
    other = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return other


def contexts(policy, base):
    @contextlib.contextmanager
    def model_context(from_base):
        yield base if from_base else policy

    return model_context


def test_each_metric_matches_a_direct_computation(toy_model, toy_tokenizer):
    policy, base = toy_model, perturbed_copy(toy_model)
    test = load_toy_prompts("test").select(range(6))
    prompt_ids = [tokenize_prompt(toy_tokenizer, p) for p in test["prompt"]]
    k, length, beta, seed = 4, 24, 0.2, 7
    checker = answers_match
    records = measure_prompts(
        contexts(policy, base), toy_tokenizer, prompt_ids, num_samples=k, max_new_tokens=length,
        prompts_per_call=3, seed=seed, extractor=extract_answer, answers=test["answer"], checker=checker,
    )  # fmt: skip
    metrics = aggregate(records, beta)

    # Direct: the same samples (same seed and batch layout), every log-prob from a separate scoring pass
    with seeded(policy, seed):
        config = sampling_config(policy, toy_tokenizer, max_new_tokens=length)
        samples = generate_completions(policy, prompt_ids, config, num_samples=k, batch_size=3 * k)
    greedy_config = sampling_config(policy, toy_tokenizer, do_sample=False, max_new_tokens=length)
    greedy = generate_completions(policy, prompt_ids, greedy_config, batch_size=3)
    base_greedy = generate_completions(base, prompt_ids, greedy_config, batch_size=3)
    expanded = [prompt_ids[i] for i in samples.prompt_index]
    logp = sequence_logprobs(policy, expanded, samples.completion_ids).view(-1, k).numpy()
    base_logp = sequence_logprobs(base, expanded, samples.completion_ids).view(-1, k).numpy()
    texts = np.array(toy_tokenizer.batch_decode(samples.completion_ids, skip_special_tokens=True)).reshape(-1, k)
    truncated = np.array(samples.truncated).reshape(-1, k)
    greedy_texts = toy_tokenizer.batch_decode(greedy.completion_ids, skip_special_tokens=True)

    assert metrics["objective"] == pytest.approx(float(np.mean(base_logp - beta * (logp - base_logp))), abs=1e-4)
    assert metrics["kl"] == pytest.approx(float(np.mean(logp - base_logp)), abs=1e-4)
    assert metrics["kl"] != pytest.approx(0.0, abs=1e-3)
    assert metrics["entropy"] == pytest.approx(float(-logp.mean()), abs=1e-4)
    assert metrics["base_logprob"] == pytest.approx(float(base_logp.mean()), abs=1e-4)
    greedy_base = sequence_logprobs(base, prompt_ids, greedy.completion_ids).numpy()
    assert metrics["greedy_base_logprob"] == pytest.approx(float(greedy_base.mean()), abs=1e-4)
    distinct = [len({extract_answer(t) for t in row} - {None}) for row in texts]
    assert metrics["distinct_answers"] == pytest.approx(np.mean(distinct))
    lengths = [len(ids) for ids in samples.completion_ids]
    assert metrics["mean_length"] == pytest.approx(np.mean(lengths))
    assert metrics["clipped_ratio"] == pytest.approx(truncated.mean())
    correct = np.array([[checker(t, a) for t in row] for row, a in zip(texts, test["answer"])])
    assert metrics["greedy_accuracy"] == pytest.approx(
        np.mean([checker(t, a) for t, a in zip(greedy_texts, test["answer"])])
    )
    # BoN@k: the complete sample with the highest log pi_base (no ties among these continuous scores)
    bon = [correct[p][max(np.flatnonzero(~truncated[p]) if (~truncated[p]).any() else range(k), key=lambda i: base_logp[p][i])]
           for p in range(len(prompt_ids))]  # fmt: skip
    assert metrics["bon_accuracy"] == pytest.approx(np.mean(bon))
    # delta: y* = argmax pi_base among the complete samples, policy greedy and pi_base greedy; delta = 1 - pi(y*)
    deltas = []
    for p in range(len(prompt_ids)):
        candidates = [samples.completion_ids[p * k + i] for i in range(k) if not truncated[p][i]]
        candidates += [out.completion_ids[p] for out in (greedy, base_greedy) if not out.truncated[p]]
        scores = sequence_logprobs(base, [prompt_ids[p]] * len(candidates), candidates)
        best = candidates[int(scores.argmax())]
        deltas.append(1 - sequence_logprobs(policy, [prompt_ids[p]], [best]).exp().item())
    assert metrics["sharpening_error"] == pytest.approx(np.mean(deltas), abs=1e-4)


def test_retention_metrics_match_a_direct_computation(toy_model, toy_tokenizer):
    policy, base = toy_model, perturbed_copy(toy_model, scale=0.02)
    prompt_ids = [tokenize_prompt(toy_tokenizer, p) for p in load_toy_prompts("test")["prompt"][:12]]
    k, length, seed, per_call = 5, 40, 3, 4
    majority_cache, greedy_cache = {}, {}
    records = measure_prompts(
        contexts(policy, base), toy_tokenizer, prompt_ids, num_samples=k, max_new_tokens=length,
        prompts_per_call=per_call, seed=seed, extractor=extract_answer, base_majority=majority_cache,
        base_greedy=greedy_cache,
    )  # fmt: skip
    metrics = aggregate(records, 0.1)

    # Direct: pi_base's k samples (same seed and batch layout), their most common answer (first seen on ties)
    with seeded(base, seed):
        config = sampling_config(base, toy_tokenizer, max_new_tokens=length)
        base_samples = generate_completions(base, prompt_ids, config, num_samples=k, batch_size=per_call * k)
    texts = toy_tokenizer.batch_decode(base_samples.completion_ids, skip_special_tokens=True)
    majority = []
    for p in range(len(prompt_ids)):
        answers = [a for a in map(extract_answer, texts[p * k : (p + 1) * k]) if a is not None]
        majority.append(max(answers, key=lambda a: (answers.count(a), -answers.index(a))) if answers else None)
    greedy_config = sampling_config(policy, toy_tokenizer, do_sample=False, max_new_tokens=length)
    greedy = [extract_answer(t) for t in toy_tokenizer.batch_decode(
        generate_completions(policy, prompt_ids, greedy_config, batch_size=4).completion_ids, skip_special_tokens=True)]  # fmt: skip
    base_greedy = [extract_answer(t) for t in toy_tokenizer.batch_decode(
        generate_completions(base, prompt_ids, greedy_config, batch_size=4).completion_ids, skip_special_tokens=True)]  # fmt: skip
    agreement = np.mean([g is not None and g == m for g, m in zip(greedy, majority)])
    assert metrics["base_majority_agreement"] == pytest.approx(agreement)
    assert 0 < agreement < 1  # the toy base's greedy shortcut often misses its samples' (careful) majority
    assert metrics["top_answer_share"] == pytest.approx(max(greedy.count(a) for a in set(greedy) - {None}) / 12)
    assert metrics["base_top_answer_share"] == pytest.approx(
        max(base_greedy.count(a) for a in set(base_greedy) - {None}) / 12
    )
    # pi_base's part is computed once: a second evaluation (of another policy) generates nothing with pi_base
    assert len(majority_cache) == 12
    calls = []
    generate = base.generate
    base.generate = lambda *args, **kwargs: calls.append(1) or generate(*args, **kwargs)
    again = measure_prompts(
        contexts(perturbed_copy(toy_model, 0.05), base), toy_tokenizer, prompt_ids, num_samples=k,
        max_new_tokens=length, prompts_per_call=per_call, seed=seed, extractor=extract_answer,
        base_majority=majority_cache, base_greedy=greedy_cache,
    )  # fmt: skip
    assert not calls and [r.base_majority_answer for r in again] == majority


def test_top_answer_share_counts_no_answer_in_the_total_only():
    records = [record([-1.0], [-1.0], greedy_answer=a, base_majority_answer="7") for a in ("7", "7", None, "3")]
    metrics = aggregate(records, 0.1)
    assert metrics["top_answer_share"] == pytest.approx(2 / 4)
    assert metrics["base_majority_agreement"] == pytest.approx(2 / 4)
    assert aggregate([record([-1.0], [-1.0])], 0.1)["top_answer_share"] == 0.0  # no answer anywhere


def test_objective_of_the_base_itself_is_its_log_likelihood(toy_model, toy_tokenizer):
    prompt_ids = [tokenize_prompt(toy_tokenizer, p) for p in load_toy_prompts("test")["prompt"][:8]]
    records = measure_prompts(contexts(toy_model, toy_model), toy_tokenizer, prompt_ids, num_samples=4,
                              max_new_tokens=24, prompts_per_call=8, seed=0, extractor=extract_answer)  # fmt: skip
    for beta in (0.1, 1.0):
        metrics = aggregate(records, beta)
        assert metrics["kl"] == pytest.approx(0.0, abs=1e-5)
        assert metrics["objective"] == pytest.approx(metrics["base_logprob"], abs=1e-5)
        assert metrics["entropy"] == pytest.approx(-metrics["base_logprob"], abs=1e-5)
    for r in records:  # per sample too, not only on average
        assert np.allclose(r.sample_logprobs, r.sample_base_logprobs, atol=1e-4)


# ----------------------------------------------------------------------------------------------- the trainers
def build_trainer(kind, tmp_path, eval_dataset, peft_config=None, **overrides):
    train = load_toy_prompts("train").select(range(8))
    model = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH)
    common = {"eval_num_prompts": 6, "eval_num_samples": 3, **overrides}
    if kind == "sft":
        args = cpu_test_args(BoNSFTConfig, tmp_path, num_samples=2, **common)
        trainer_class = BoNSFTTrainer
    else:
        config_class, trainer_class = {
            "dpo": (SelfRewardDPOConfig, SelfRewardDPOTrainer),
            "xpo": (XPOConfig, XPOTrainer),
        }[kind]
        args = cpu_test_args(config_class, tmp_path, **common)
    tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL_PATH)
    return trainer_class(
        model=model, args=args, train_dataset=train, eval_dataset=eval_dataset, processing_class=tokenizer,
        peft_config=peft_config,
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["sft", "dpo", "xpo"])
def test_evaluate_returns_the_sharpening_metrics(kind, tmp_path):
    test = load_toy_prompts("test").select(range(10))
    trainer = build_trainer(kind, tmp_path, test)
    metrics = trainer.evaluate()
    assert LABEL_FREE | WITH_LABELS <= set(metrics)
    # Before training the policy is pi_base: J_beta = E[log pi_base], KL = 0
    assert metrics["eval_kl"] == pytest.approx(0.0, abs=1e-4)
    assert metrics["eval_objective"] == pytest.approx(metrics["eval_base_logprob"], abs=1e-4)
    assert trainer.state.log_history[-1]["eval_objective"] == metrics["eval_objective"]  # through `log`
    cost = trainer.last_evaluation_cost
    assert (cost.prompts, cost.policy_generations, cost.base_scored, cost.policy_scored) == (6, 6 * 4, 6 * 4, 6)
    # The same prompts without answers: label-free metrics only
    unlabeled = trainer.evaluate(eval_dataset=test.remove_columns("answer"))
    assert set(unlabeled) & (LABEL_FREE | WITH_LABELS) == LABEL_FREE
    assert unlabeled["eval_objective"] == pytest.approx(metrics["eval_objective"])  # same prompts, same seed


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_evaluate_with_peft_scores_under_the_adapter_disabled_base(kind, tmp_path):
    trainer = build_trainer(kind, tmp_path, load_toy_prompts("test").select(range(6)),
                            peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # fmt: skip
    assert getattr(trainer, "_frozen_base", None) is None  # no second copy of the weights
    assert trainer.evaluate()["eval_kl"] == pytest.approx(0.0, abs=1e-4)  # LoRA starts as the identity
    with torch.no_grad():  # move the adapters: the policy leaves pi_base, which stays the adapter-disabled model
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    moved = trainer.evaluate()
    assert moved["eval_kl"] > 0.05
    assert moved["eval_objective"] == pytest.approx(moved["eval_base_logprob"] - 0.1 * moved["eval_kl"], abs=1e-4)


def test_metric_direction_and_validation(tmp_path):
    args = cpu_test_args(XPOConfig, tmp_path, eval_strategy="steps", eval_steps=1, save_steps=1,
                         save_strategy="steps", load_best_model_at_end=True)  # fmt: skip
    assert (args.metric_for_best_model, args.greater_is_better) == ("guarded_sharpening_error", False)
    for metric in ("eval_sharpening_error", "sharpening_error", "eval_heldout_sharpening_error"):
        args = cpu_test_args(SelfRewardDPOConfig, tmp_path, metric_for_best_model=metric)
        assert args.greater_is_better is False, metric
    with pytest.raises(ValueError, match="greater_is_better"):
        cpu_test_args(SelfRewardDPOConfig, tmp_path, metric_for_best_model="objective", greater_is_better=False)
    for bad in ({"eval_num_samples": 0}, {"eval_num_prompts": True}, {"collapse_length_drop": 1.5}, {"collapse_min_distinct_answers": -1.0},
                {"eval_beta": -1.0}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            cpu_test_args(BoNSFTConfig, tmp_path, **bad)


def test_collapse_alarm(caplog, tmp_path):
    args = cpu_test_args(XPOConfig, tmp_path)
    alarm = CollapseAlarmCallback()
    state = type("State", (), {"global_step": 0})()
    # The measured start of the sigmoid XPO run (benchmarks/results/iterate_selection.md): the base, then the best
    # iterate, whose distinct answers fell from 7.75 to 3.59 (sharpening, no alarm), J_beta by a third of a nat
    base = {"eval_objective": -4.62, "eval_distinct_answers": 7.75, "eval_mean_length": 3.4}
    sharpened = {"eval_objective": -4.96, "eval_distinct_answers": 1.5, "eval_mean_length": 15.2}
    with caplog.at_level(logging.WARNING, logger="trl_sharpen.monitoring"):
        for step, metrics in enumerate([base, sharpened], 1):
            state.global_step = step
            alarm.on_evaluate(args, state, None, metrics=metrics)
        # Healthy sharpening can cost J_beta more than half its magnitude: the toy DPO recipe went -2.38 -> -3.89
        # (accuracy 0.095 -> 1.0) as answers grew long; no alarm for the same relative fall here
        state.global_step = 3
        alarm.on_evaluate(args, state, None, metrics={"eval_objective": -4.62 * 3.89 / 2.38})
        assert not caplog.records
        state.global_step = 4
        alarm.on_evaluate(args, state, None, metrics={"eval_objective": -28.3, "eval_distinct_answers": 0.12,
                                                      "eval_mean_length": 1.5})  # fmt: skip
    assert len(caplog.records) == 3
    messages = " ".join(r.getMessage() for r in caplog.records)
    for key in ("eval_objective", "eval_distinct_answers", "eval_mean_length"):
        assert key in messages
    trainer = build_trainer("dpo", tmp_path, load_toy_prompts("test").select(range(2)))
    assert any(isinstance(c, CollapseAlarmCallback) for c in trainer.callback_handler.callbacks)


def test_collapse_alarm_on_retention_metrics(caplog, tmp_path):
    args = cpu_test_args(XPOConfig, tmp_path)
    assert (args.collapse_top_answer_rise, args.collapse_agreement_drop) == (0.25, 0.5)
    state = type("State", (), {"global_step": 0})()

    def alarms(*evaluations, args=args):
        alarm = CollapseAlarmCallback()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="trl_sharpen.monitoring"):
            for step, metrics in enumerate(evaluations):
                state.global_step = step
                alarm.on_evaluate(args, state, None, metrics=metrics)
        return [r.getMessage() for r in caplog.records]

    # "True." to every prompt: top-answer share 0.57 (the base's) -> 0.82 fires (+0.25), 0.81 does not
    base = {"eval_top_answer_share": 0.57, "eval_base_top_answer_share": 0.57, "eval_base_majority_agreement": 0.6}
    assert alarms(base, {**base, "eval_top_answer_share": 0.81}) == []
    fired = alarms(base, {**base, "eval_top_answer_share": 0.82})
    assert len(fired) == 1 and "eval_top_answer_share" in fired[0] and "collapse_top_answer_rise" in fired[0]
    # The echo: no answers left, agreement 0.6 -> 0.29 fires (below half its first value), 0.31 does not
    assert alarms(base, {**base, "eval_base_majority_agreement": 0.31}) == []
    fired = alarms(base, {**base, "eval_base_majority_agreement": 0.29})
    assert len(fired) == 1 and "eval_base_majority_agreement" in fired[0] and "collapse_agreement_drop" in fired[0]
    # Sharpening raises agreement (and the first value stays the reference); the thresholds are the config's
    assert (
        alarms(base, {**base, "eval_base_majority_agreement": 0.9}, {**base, "eval_base_majority_agreement": 0.4})
        == []
    )
    strict = cpu_test_args(XPOConfig, tmp_path, collapse_top_answer_rise=0.1, collapse_agreement_drop=0.2)
    assert (
        len(alarms(base, {**base, "eval_top_answer_share": 0.7, "eval_base_majority_agreement": 0.45}, args=strict))
        == 2
    )
    for bad in ({"collapse_top_answer_rise": 0.0}, {"collapse_agreement_drop": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            cpu_test_args(BoNSFTConfig, tmp_path, **bad)


def test_guarded_sharpening_error_adds_one_where_the_retention_alarm_fires(tmp_path):
    trainer = build_trainer("dpo", tmp_path, load_toy_prompts("test").select(range(2)))
    base = {"sharpening_error": 0.9, "top_answer_share": 0.5, "base_top_answer_share": 0.5,
            "base_majority_agreement": 0.6}  # fmt: skip
    assert trainer._guarded_sharpening_error(base, "eval") == pytest.approx(0.9)  # the first value: 0.6
    sharpened = {**base, "sharpening_error": 0.2, "top_answer_share": 0.7, "base_majority_agreement": 0.9}
    assert trainer._guarded_sharpening_error(sharpened, "eval") == pytest.approx(0.2)
    one_answer = {**sharpened, "sharpening_error": 0.1, "top_answer_share": 0.75}  # +0.25 over the base's
    assert trainer._guarded_sharpening_error(one_answer, "eval") == pytest.approx(1.1)
    no_answers = {**sharpened, "sharpening_error": 0.05, "base_majority_agreement": 0.29}  # below 0.5 x 0.6
    assert trainer._guarded_sharpening_error(no_answers, "eval") == pytest.approx(1.05)
    assert "eval_guarded_sharpening_error" in trainer.evaluate()


def test_new_metrics_have_a_direction_for_metric_for_best_model(tmp_path):
    for metric, direction in [("base_majority_agreement", True), ("eval_top_answer_share", False),
                              ("base_top_answer_share", False), ("guarded_sharpening_error", False)]:  # fmt: skip
        assert (
            cpu_test_args(SelfRewardDPOConfig, tmp_path, metric_for_best_model=metric).greater_is_better is direction
        )


def test_the_base_is_evaluated_first_and_saved_as_a_candidate(tmp_path):
    heldout = load_toy_prompts("train").select(range(900, 904)).remove_columns("answer")
    trainer = build_trainer(
        "dpo", tmp_path, heldout, max_steps=1, eval_strategy="steps", eval_steps=1, save_strategy="steps",
        save_steps=1, save_only_model=True, load_best_model_at_end=True, eval_num_prompts=4, eval_num_samples=2,
    )  # fmt: skip
    assert trainer.args.eval_on_start  # evaluate_base (default) turned it on: a prompt-only eval set is monitored
    trainer.train()
    steps = [e["step"] for e in trainer.state.log_history if "eval_objective" in e]
    assert steps[0] == 0  # pi_base itself was evaluated, before the first step
    assert (tmp_path / "checkpoint-0").is_dir()
    off = build_trainer("dpo", tmp_path / "off", heldout, eval_strategy="steps", evaluate_base=False)
    assert not off.args.eval_on_start
    no_monitoring = build_trainer("dpo", tmp_path / "none", None)
    assert not no_monitoring.args.eval_on_start


@pytest.mark.slow
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_the_base_wins_selection_on_a_run_built_to_collapse(tmp_path, capsys, peft):
    """DPO at a learning rate 500x the recipes' wrecks the toy policy within a few steps: the base, evaluated at
    step 0, must win selection, the run must say so, and the model in hand must be pi_base (with LoRA: the adapter as
    initialized, which changes nothing)."""
    heldout = load_toy_prompts("train").select(range(900, 916)).remove_columns("answer")
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if peft else None
    trainer = build_trainer(
        "dpo", tmp_path, heldout, peft_config=lora, learning_rate=0.5 if not peft else 2.0, max_steps=4, lr_scheduler_type="constant",
        eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, save_only_model=True,
        load_best_model_at_end=True, metric_for_best_model="objective", eval_num_prompts=16,
        eval_num_samples=4,
    )  # fmt: skip
    trainer.train()
    evaluations = {e["step"]: e["eval_objective"] for e in trainer.state.log_history if "eval_objective" in e}
    assert sorted(evaluations) == [0, 2, 4]
    assert evaluations[0] > max(evaluations[2], evaluations[4]) + 10  # it did collapse, by more than 10 nats
    assert trainer.state.best_global_step == 0 and trainer.base_won
    out = capsys.readouterr().out
    assert "The base model won" in out
    if peft:
        assert "zero-effect" in out
        lora_b = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
        assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)
        assert trainer.evaluate()["eval_kl"] == pytest.approx(0.0, abs=1e-5)
        return
    base = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH).state_dict()
    for name, parameter in trainer.model.state_dict().items():
        assert torch.equal(parameter, base[name]), name
    trainer.save_model(str(tmp_path / "final"))
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final")).state_dict()
    assert all(torch.equal(saved[name], base[name]) for name in base)


@pytest.mark.slow
def test_load_best_model_at_end_restores_the_best_iterate_after_collapse(tmp_path):
    """A learning rate 50x the recipes' makes DPO collapse; the Trainer's own best-model machinery, driven by J_beta,
    must hand back the earlier, better iterate, and EarlyStoppingCallback must stop the run."""
    heldout = load_toy_prompts("train").select(range(900, 916)).remove_columns("answer")
    trainer = build_trainer(
        "dpo", tmp_path, heldout, learning_rate=5e-2, max_steps=24, lr_scheduler_type="constant",
        eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, save_only_model=True,
        load_best_model_at_end=True, metric_for_best_model="objective", eval_num_prompts=16, eval_num_samples=4,
    )  # fmt: skip
    trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=3))
    trainer.train()
    evaluations = [e for e in trainer.state.log_history if "eval_objective" in e]
    best = max(evaluations, key=lambda e: e["eval_objective"])
    last = evaluations[-1]
    assert trainer.state.best_global_step == best["step"] < last["step"]
    assert last["eval_objective"] < best["eval_objective"] - 1.0  # it did collapse, by more than a nat
    assert trainer.state.global_step < 24  # early stopping cut the run
    # The model in hand is the best iterate: evaluating it again gives the best J_beta (same prompts, same seed)
    assert trainer.evaluate()["eval_objective"] == pytest.approx(best["eval_objective"], abs=1e-3)
