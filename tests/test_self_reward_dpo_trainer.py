"""SelfRewardDPOTrainer on the bundled toy base: training mechanics, the shared pi_base pass, bad input, quality."""

import contextlib
import functools
import math
import re

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from trl_sharpen import SelfRewardDPOConfig, SelfRewardDPOTrainer
from trl_sharpen.callbacks import GreedyReportCallback
from trl_sharpen.logprobs import running_a_check, unwrap_causal_lm
from trl_sharpen.toy import TOY_MODEL_PATH, load_toy_prompts

from .launching import launch_toy_recipe, parse_recipe_yaml, recipe_yamls, yaml_values_not_applied
from .sharpening_check import train_and_check_sharpening
from .trainer_args import cpu_test_args, online_trainer, train_and_check_basics


make_config = functools.partial(cpu_test_args, SelfRewardDPOConfig)  # (tmp_path, **overrides)
make_trainer = functools.partial(
    online_trainer, SelfRewardDPOTrainer
)  # (tmp_path, model, tokenizer, train_dataset, **overrides)


def base_state():
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH).state_dict().items()}


def backbone(model):
    return (model.get_base_model() if hasattr(model, "get_base_model") else model).model


@contextlib.contextmanager
def count_scoring_forwards(*models):
    """Count pi_base scoring passes of `models` while inside: each `sequence_logprobs` call of the trainer on them
    (recorded as its number of completions, however it batches them: repeated prompts are scored from one prompt
    pass and its KV cache), and any other backbone call without a KV cache (such as a reference forward of DPO's own;
    generation always runs with a cache). The once-per-model exactness checks (logprobs.once_per_model) are left
    out: they run once per model, not per step. Everything is restored on exit."""
    import trl_sharpen.self_reward_dpo_trainer as trainer_module

    calls, scoring = [], []
    targets = {id(backbone(model)) for model in models}
    real = trainer_module.sequence_logprobs

    def counted(model, prompt_ids, completion_ids, *args, **kwargs):
        mine = id(backbone(unwrap_causal_lm(model))) in targets and not running_a_check()
        if mine:
            calls.append(len(completion_ids))
        scoring.append(mine)
        try:
            return real(model, prompt_ids, completion_ids, *args, **kwargs)
        finally:
            scoring.pop()

    def hook(module, args, kwargs):
        if kwargs.get("use_cache") is False and not any(scoring) and not running_a_check():
            calls.append(kwargs["input_ids"].size(0))

    handles = [backbone(model).register_forward_pre_hook(hook, with_kwargs=True) for model in models]
    trainer_module.sequence_logprobs = counted
    try:
        yield calls
    finally:
        trainer_module.sequence_logprobs = real
        for handle in handles:
            handle.remove()


def test_count_scoring_forwards_removes_its_hooks(toy_model):
    with count_scoring_forwards(toy_model) as calls:
        toy_model(torch.tensor([[1, 2, 3]]), use_cache=False)
    toy_model(torch.tensor([[1, 2, 3]]), use_cache=False)
    assert calls == [1]
    assert not backbone(toy_model)._forward_pre_hooks


def last(log_history, key):
    return [entry[key] for entry in log_history if key in entry]


def test_trains_policy_keeps_reference_tags_and_logs_metrics(tmp_path, toy_model, toy_tokenizer):
    metrics = ["loss", "self_reward/chosen", "self_reward/rejected", "self_reward/margin", "self_reward/ties_skipped"]
    metrics += ["completions/mean_length", "completions/clipped_ratio", "rewards/accuracies", "rewards/margins"]
    metrics += ["logps/chosen", "logps/rejected"]
    trainer = make_trainer(tmp_path, toy_model, toy_tokenizer)
    history = train_and_check_basics(trainer, ["trl", "trl-sharpen", "rlhf-sharpening"], metrics)
    assert all(m >= 0 for m in last(history, "self_reward/margin"))
    trainer.create_model_card(model_name="toy-sharpened")
    card = (tmp_path / "README.md").read_text()
    assert "2412.01951" in card and "Sharpening Mechanism" in card


@pytest.mark.parametrize("num_generations", [2, 4])
def test_logprob_reward_and_reference_logps_come_from_one_pi_base_forward(
    tmp_path, toy_model, toy_tokenizer, num_generations
):
    trainer = make_trainer(tmp_path, toy_model, toy_tokenizer, num_generations=num_generations, max_steps=3)
    with count_scoring_forwards(trainer.ref_model) as calls:
        trainer.train()
    # One pi_base forward per step, over all k samples of every prompt; DPO runs no reference forward of its own
    assert calls == [8 * num_generations] * 3
    history = trainer.state.log_history
    # Step 1: the policy is still pi_base, so DPO's policy log-probs equal the self-reward log pi_base(y|x) it was
    # ranked by, and the implicit rewards beta * log(pi / pi_ref) from the reference log-probs in the batch are 0
    assert last(history, "logps/chosen")[0] == pytest.approx(last(history, "self_reward/chosen")[0], abs=1e-4)
    assert last(history, "logps/rejected")[0] == pytest.approx(last(history, "self_reward/rejected")[0], abs=1e-4)
    assert last(history, "rewards/chosen")[0] == pytest.approx(0.0, abs=1e-5)
    assert last(history, "rewards/rejected")[0] == pytest.approx(0.0, abs=1e-5)


def test_sample_from_base_needs_no_scoring_forward(tmp_path, toy_model, toy_tokenizer):
    trainer = make_trainer(tmp_path, toy_model, toy_tokenizer, sample_from="base")
    with (
        count_scoring_forwards(trainer.ref_model) as base_calls,
        count_scoring_forwards(trainer.model) as policy_calls,
    ):
        trainer.train()
    assert base_calls == []  # log pi_base(y|x) of base samples is recorded during generation
    history = trainer.state.log_history
    # The policy runs only DPO's loss forward, over the chosen and rejected rows of each step's pairs
    assert policy_calls == [2 * (8 - ties) for ties in last(history, "self_reward/ties_skipped")]
    assert last(history, "logps/chosen")[0] == pytest.approx(last(history, "self_reward/chosen")[0], abs=1e-3)
    assert last(history, "rewards/margins")[0] == pytest.approx(0.0, abs=1e-4)


def test_reward_that_ignores_pi_base_scores_only_the_pairs(tmp_path, toy_model, toy_tokenizer):
    def answer_length(prompts, completions, completion_ids, **kwargs):
        return [float(len(ids)) for ids in completion_ids]

    trainer = make_trainer(
        tmp_path, toy_model, toy_tokenizer, self_reward=answer_length, num_generations=4, max_steps=1
    )
    with count_scoring_forwards(trainer.ref_model) as calls:
        trainer.train()
    pairs = 8 - last(trainer.state.log_history, "self_reward/ties_skipped")[0]
    assert calls == [2 * pairs]  # reference log-probs of the chosen and rejected samples only, in one forward


def test_sharpen_loss_is_the_papers_regression(tmp_path, toy_model, toy_tokenizer):
    trainer = make_trainer(tmp_path, toy_model, toy_tokenizer, loss_type=["sigmoid", "sharpen"], loss_weights=[1, 2],
                           sharpen_huber_delta=None)  # fmt: skip
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    reward_gap = batch["chosen_rewards"] - batch["rejected_rewards"]
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    # At initialisation pi = pi_base: log-ratios are 0, so Eq. 8 is mean((r(y) - r(y'))^2) and sigmoid is log 2
    expected = math.log(2) + 2 * reward_gap.pow(2).mean().item()
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert trainer._metrics["train"]["self_reward/sharpen_loss"][-1] == pytest.approx(reward_gap.pow(2).mean().item())
    loss.backward()  # and it has gradients through the policy
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters())


def test_sharpen_huber_loss_is_the_square_inside_delta_and_its_tangent_beyond(tmp_path, toy_model, toy_tokenizer):
    delta = 3.0
    trainer = make_trainer(tmp_path, toy_model, toy_tokenizer, loss_type="sharpen", sharpen_huber_delta=delta)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    gap = (batch["chosen_rewards"] - batch["rejected_rewards"]).abs()  # = |residual| at pi = pi_base
    assert (gap < delta).any() and (gap > delta).any()  # both branches are exercised
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    expected = torch.where(gap <= delta, gap**2, 2 * delta * gap - delta**2).mean().item()
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert loss.item() < gap.pow(2).mean().item()  # large residuals weigh less than in the squared loss
    assert trainer._metrics["train"]["self_reward/sharpen_residual_sq"][-1] == pytest.approx(gap.pow(2).mean().item())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters())


def test_a_run_on_zero_pairs_warns_each_step_and_fails(tmp_path, toy_model, toy_tokenizer, caplog):
    def constant(prompts, completions, completion_ids, **kwargs):
        return [1.0] * len(completions)

    trainer = make_trainer(tmp_path, toy_model, toy_tokenizer, self_reward=constant, max_steps=2)
    before = {k: v.clone() for k, v in trainer.model.named_parameters()}
    with pytest.raises(RuntimeError, match="ran 2 batches on zero pairs.*'constant'"):
        trainer.train()
    assert [r.getMessage() for r in caplog.records if "trains on zero pairs" in r.getMessage()] == [
        f"Step {step} trains on zero pairs (8 of 8 prompts' pairs were ties; self_reward='constant', "
        "num_generations=2, tie_tolerance=0.0001): this step changes nothing."
        for step in (1, 2)
    ]
    assert last(trainer.state.log_history, "self_reward/ties_skipped") == [8.0, 8.0]
    assert last(trainer.state.log_history, "loss") == [0.0, 0.0]
    for name, p in trainer.model.named_parameters():  # the all-tie steps ran at zero weight
        assert torch.equal(p, before[name])


def test_a_step_on_zero_pairs_does_not_fail_a_run_that_trained(tmp_path, toy_model, toy_tokenizer, caplog):
    calls = []

    def tied_first(prompts, completions, completion_ids, **kwargs):
        calls.append(1)
        return [1.0] * len(completions) if len(calls) == 1 else [float(len(ids)) for ids in completion_ids]

    trainer = make_trainer(tmp_path, toy_model, toy_tokenizer, self_reward=tied_first, max_steps=2)
    trainer.train()  # step 1 trained on nothing, step 2 on its pairs: a warning, no error
    assert sum("trains on zero pairs" in r.getMessage() for r in caplog.records) == 1


def test_reanchoring_copies_the_policy_into_pi_base(tmp_path, toy_model, toy_tokenizer):
    trainer = make_trainer(tmp_path, toy_model, toy_tokenizer, reanchor_steps=2, max_steps=2)
    trainer.train()
    base = base_state()
    ref = trainer.ref_model.state_dict()
    policy = trainer.model.state_dict()
    assert any(not torch.equal(ref[name], base[name]) for name in ref), "pi_base was never re-anchored"
    for name, value in ref.items():
        assert torch.equal(value, policy[name]), f"{name}: pi_base differs from the policy after re-anchoring"


def test_peft_uses_the_adapter_disabled_model_as_pi_base(tmp_path, toy_model, toy_tokenizer):
    from peft import LoraConfig

    trainer = SelfRewardDPOTrainer(
        model=toy_model,
        args=make_config(tmp_path, sample_from="base", learning_rate=1e-2),
        train_dataset=load_toy_prompts("train").select(range(64)),
        processing_class=toy_tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    assert trainer.ref_model is None
    adapter_before = {k: v.clone() for k, v in trainer.model.named_parameters() if "lora_B" in k}
    trainer.train()
    assert any(
        not torch.equal(p, adapter_before[k]) for k, p in trainer.model.named_parameters() if k in adapter_before
    )
    base = base_state()
    with trainer.model.disable_adapter():
        for name, value in trainer.model.get_base_model().state_dict().items():
            if "lora_" not in name:
                assert torch.equal(value, base[name.replace(".base_layer", "")]), name
    history = trainer.state.log_history
    # base samples scored at generation with the adapter disabled = the policy's own log-probs at step 1
    assert last(history, "logps/chosen")[0] == pytest.approx(last(history, "self_reward/chosen")[0], abs=1e-3)


def test_conversational_prompts_and_evaluate(tmp_path, toy_model, toy_tokenizer):
    train = load_toy_prompts("train", conversational=True).select(range(16))
    trainer = SelfRewardDPOTrainer(
        model=toy_model,
        args=make_config(tmp_path, max_steps=1),
        train_dataset=train,
        eval_dataset=load_toy_prompts("test", conversational=True).select(range(8)),
        processing_class=toy_tokenizer,
    )
    trainer.train()
    # Prompt-only eval data gets the label-free sharpening metrics (trl_sharpen.monitoring), from chat prompts too
    metrics = trainer.evaluate()
    assert {"eval_objective", "eval_kl", "eval_greedy_accuracy"} <= set(metrics)
    # a dataset handed to `evaluate` later is handled the same way
    assert "eval_objective" in trainer.evaluate(load_toy_prompts("test").select(range(8)))


def test_greedy_report_callback_reports_before_and_after_training(tmp_path, toy_model, toy_tokenizer, capsys):
    trainer = make_trainer(tmp_path, toy_model, toy_tokenizer, max_steps=2)
    callback = GreedyReportCallback(trainer, load_toy_prompts("test").select(range(16)), max_new_tokens=40)
    trainer.add_callback(callback)
    trainer.train()
    out = capsys.readouterr().out
    for label in ("before", "after"):
        line = rf"^\[{label}\] greedy accuracy on 16 test prompts: [\d.]+, mean log pi_base\(greedy\) -[\d.]+, mean length "
        assert re.search(line, out, re.M), out
    before, after = callback.results["before"], callback.results["after"]
    assert after.completions != before.completions  # the policy moved
    # pi_base is the reference model; without one (full fine-tuning, e.g. BoNSFTTrainer) it is loaded again from the
    # policy's path for the report: the same numbers
    trainer.ref_model = None
    assert callback._report("after", policy_is_base=False).mean_base_logprob == pytest.approx(after.mean_base_logprob)


def pair_ends_with_eos(batch, eos_token_id):
    """(chosen complete, rejected complete) per pair of a pair batch: whether each completion ends with EOS."""
    complete = [
        row[m.bool()][-1].item() == eos_token_id for row, m in zip(batch["input_ids"], batch["completion_mask"])
    ]
    half = len(complete) // 2
    return list(zip(complete[:half], complete[half:]))


def test_a_truncated_sample_is_never_chosen_over_a_complete_one(tmp_path, toy_model, toy_tokenizer):
    # 12 tokens cut many toy completions; their prefixes have high log pi_base, which used to win the pair
    trainer = make_trainer(tmp_path, toy_model, toy_tokenizer, num_generations=4, max_completion_length=12)
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ends = pair_ends_with_eos(batch, toy_tokenizer.eos_token_id)
    assert any(chosen != rejected for chosen, rejected in ends)  # the step has complete-vs-truncated pairs
    assert all(chosen or not rejected for chosen, rejected in ends)  # and their complete sample is always chosen


def test_prompts_beyond_the_models_context_are_dropped(tmp_path, toy_model, toy_tokenizer, caplog):
    # The toy model has 128 positions: with max_completion_length=40, prompts over 88 tokens cannot fit, although
    # max_length (1024) would allow them
    short = load_toy_prompts("train")["prompt"][:8]
    long = [" ".join([prompt.removesuffix(" = ?")] * 20) + " = ?" for prompt in short]
    assert all(88 < len(toy_tokenizer(p)["input_ids"]) < 1024 - 40 for p in long)
    trainer = make_trainer(tmp_path, toy_model, toy_tokenizer, Dataset.from_dict({"prompt": short + long}))
    assert sorted(trainer.train_dataset["prompt"]) == sorted(short)
    assert "Dropped 8 of 16 train prompts" in caplog.text and "context of 128 positions" in caplog.text
    with pytest.raises(ValueError, match="max_completion_length=128 leaves no room .* context of 128 positions"):
        make_trainer(tmp_path, toy_model, toy_tokenizer, max_completion_length=128)


def test_paper_preset_selects_the_papers_setting_by_name(tmp_path):
    args = make_config(tmp_path, preset="paper")
    assert (args.loss_type, args.sample_from, args.self_reward, args.num_generations) == (
        ["sharpen"],
        "base",
        "logprob",
        2,
    )
    with pytest.raises(ValueError, match="preset='paper' sets loss_type=\\['sharpen'\\], but loss_type=\\['ipo'\\]"):
        make_config(tmp_path, preset="paper", loss_type="ipo")


# --------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"num_generations": 1}, "num_generations=1"),
        ({"self_reward": "majority", "num_generations": 2}, "self_reward='majority' with num_generations=2"),
        ({"preset": "fast"}, "preset='fast'"),
        ({"sample_from": "reference"}, "sample_from='reference'"),
        ({"ties": "random"}, "ties='random'"),
        ({"precompute_ref_log_probs": True}, "precompute_ref_log_probs"),
        ({"max_length": 32, "max_completion_length": 40}, "max_length=32"),
        ({"reanchor_steps": -1}, "reanchor_steps=-1"),
        ({"sharpen_huber_delta": 0.0}, "sharpen_huber_delta must be > 0"),
    ],
)
def test_bad_config_values_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config(tmp_path, **overrides)


def test_preference_dataset_is_refused_with_the_expected_format(tmp_path, toy_model, toy_tokenizer):
    preference = Dataset.from_dict({"prompt": ["Q : 1 + 2 = ?"], "chosen": ["answer 3"], "rejected": ["answer 4"]})
    with pytest.raises(ValueError, match="preference dataset.*prompt-only"):
        make_trainer(tmp_path, toy_model, toy_tokenizer, train_dataset=preference)


def wrong_length(prompts, completions, completion_ids, **kwargs):
    return [0.0]


def not_a_number(prompts, completions, completion_ids, **kwargs):
    return [math.nan] * len(completions)


def infinite(prompts, completions, completion_ids, **kwargs):
    return [-math.inf] * len(completions)


@pytest.mark.parametrize("reward", [wrong_length, not_a_number, infinite])
def test_bad_reward_values_raise_naming_the_reward(tmp_path, toy_model, toy_tokenizer, reward):
    trainer = make_trainer(tmp_path, toy_model, toy_tokenizer, self_reward=reward, max_steps=1)
    with pytest.raises(ValueError, match=f"`{reward.__name__}`"):
        trainer.train()


def test_pi_base_with_another_tokenizer_is_refused(tmp_path, toy_model, toy_tokenizer):
    config = LlamaConfig(
        vocab_size=200, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    other_base = LlamaForCausalLM(config)
    with pytest.raises(ValueError, match="tokenizer.*vocabulary sizes differ"):
        SelfRewardDPOTrainer(
            model=toy_model,
            ref_model=other_base,
            args=make_config(tmp_path, sample_from="base"),
            train_dataset=load_toy_prompts("train").select(range(8)),
            processing_class=toy_tokenizer,
        )


def test_reanchoring_with_peft_is_refused(tmp_path, toy_model, toy_tokenizer):
    from peft import LoraConfig

    with pytest.raises(ValueError, match="reanchor_steps=2.*PEFT"):
        SelfRewardDPOTrainer(
            model=toy_model,
            args=make_config(tmp_path, reanchor_steps=2),
            train_dataset=load_toy_prompts("train").select(range(8)),
            processing_class=toy_tokenizer,
            peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        )


# ----------------------------------------------------------------------------------------------------- quality
# The toy recipe's hyperparameters (recipes/dpo_sharpen/toy_cpu.yaml), with fewer steps
QUALITY = dict(per_device_train_batch_size=32, max_steps=10, learning_rate=1e-3, lr_scheduler_type="constant")


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["sigmoid", "sharpen"])
def test_sharpening_lifts_toy_greedy_accuracy(tmp_path, toy_model, toy_tokenizer, loss_type):
    trainer = make_trainer(
        tmp_path, toy_model, toy_tokenizer, train_dataset=load_toy_prompts("train"), loss_type=loss_type, **QUALITY
    )
    train_and_check_sharpening(trainer, toy_tokenizer, loss_type)


# ------------------------------------------------------------------------------------------------------ recipe
@pytest.mark.parametrize("yaml_path", recipe_yamls("dpo_sharpen"), ids=lambda p: p.name)
def test_dpo_sharpen_recipe_yamls_parse(yaml_path):
    assert yaml_values_not_applied(yaml_path, parse_recipe_yaml(yaml_path)) == {}


@pytest.mark.slow
def test_dpo_sharpen_toy_recipe_runs_end_to_end(tmp_path):
    accuracy = launch_toy_recipe("dpo_sharpen", tmp_path)
    assert accuracy["before"] < 0.15 and accuracy["after"] >= 0.7
    assert (tmp_path / "model.safetensors").exists() and "rlhf-sharpening" in (tmp_path / "README.md").read_text()


def pair_answers(batch, tokenizer, extractor):
    """(chosen has an answer, rejected has an answer) per pair of a pair batch, by `extractor` on the decoded text."""
    texts = [
        tokenizer.decode(row[m.bool()], skip_special_tokens=True)
        for row, m in zip(batch["input_ids"], batch["completion_mask"])
    ]
    found = [extractor(text) is not None for text in texts]
    half = len(found) // 2
    return list(zip(found[:half], found[half:]))


def test_answer_gating_never_chooses_a_sample_without_an_answer(tmp_path, toy_model, toy_tokenizer):
    # The test extractor finds no answer in the careful solutions, the base's most likely samples: without gating
    # they are chosen; with it, a shortcut with an answer must be chosen whenever the prompt has one
    from .test_best_of_n import careful_steps_are_no_answer as extractor

    trainer = make_trainer(
        tmp_path,
        toy_model,
        toy_tokenizer,
        num_generations=4,
        answer_extractor="tests.test_best_of_n:careful_steps_are_no_answer",
    )
    assert trainer.args.require_answer is None  # on because an extractor is set
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    answers = pair_answers(batch, toy_tokenizer, extractor)
    assert any(chosen and not rejected for chosen, rejected in answers)  # the step has answer-vs-no-answer pairs
    assert all(chosen or not rejected for chosen, rejected in answers)  # and the answer is always chosen
