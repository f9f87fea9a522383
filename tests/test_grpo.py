"""SelfRewardGRPOTrainer / SelfRewardRLOOTrainer on the bundled toy base: the self-reward equals log pi_base computed
directly, with zero extra pi_base forwards where TRL's reference pass is reused and exactly one otherwise; PEFT's
pi_base is the adapter-disabled model; majority and answer gating over TRL's groups; the literature rewards against a
direct computation; monitoring; bad input; quality (slow); one LoRA run on SmolLM2 (real_model)."""

import contextlib
import functools

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

import trl_sharpen.self_reward_rl_trainer as trainer_module
from trl_sharpen import (
    SelfRewardGRPOConfig,
    SelfRewardGRPOTrainer,
    SelfRewardRLOOConfig,
    SelfRewardRLOOTrainer,
    get_self_reward,
    sequence_logprobs,
)
from trl_sharpen.logprobs import unwrap_causal_lm
from trl_sharpen.monitoring import CollapseAlarmCallback
from trl_sharpen.policy_statistics import completion_token_statistics
from trl_sharpen.toy import TOY_MODEL_PATH, load_toy_prompts

from .launching import launch_toy_recipe, parse_recipe_yaml, recipe_yamls, yaml_values_not_applied
from .sharpening_check import train_and_check_sharpening
from .trainer_args import CPU_TEST_ARGS


RL_ARGS = {**CPU_TEST_ARGS, "num_generations": 4, "max_completion_length": 32, "gradient_checkpointing": False}


def make_trainer(trainer_class, tmp_path, model, tokenizer, train_dataset=None, peft_config=None, **overrides):
    args = trainer_class._config_class(output_dir=str(tmp_path), **{**RL_ARGS, **overrides})
    return trainer_class(
        model=model,
        args=args,
        train_dataset=train_dataset if train_dataset is not None else load_toy_prompts("train").select(range(32)),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


grpo = functools.partial(make_trainer, SelfRewardGRPOTrainer)
rloo = functools.partial(make_trainer, SelfRewardRLOOTrainer)


def record_rewards(trainer, also=None):
    """Record each call of the trainer's self-reward (TRL's first reward function): prompts, completion ids, rewards,
    and `also(trainer, prompts, completion_ids)` computed at that moment (before the policy's update)."""
    calls, original = [], trainer.reward_funcs[0]

    def recorded(prompts, completions, completion_ids, **kwargs):
        rewards = original(prompts, completions, completion_ids, **kwargs)
        extra = also(trainer, prompts, completion_ids) if also else None
        calls.append((list(prompts), [list(ids) for ids in completion_ids], rewards, extra))
        return rewards

    recorded.__name__ = original.__name__
    trainer.reward_funcs[0] = recorded
    return calls


@contextlib.contextmanager
def count_base_passes(trainer):
    """Completions scored by our own pi_base passes (`sequence_logprobs` calls of the trainer module, by size), and
    forwards of pi_base's backbone (TRL's reference model) of any origin. Restored on exit."""
    passes, forwards = [], []
    real = trainer_module.sequence_logprobs

    def counted(model, prompt_ids, completion_ids, *args, **kwargs):
        passes.append(len(completion_ids))
        return real(model, prompt_ids, completion_ids, *args, **kwargs)

    handle = None
    if trainer.ref_model is not None:
        backbone = unwrap_causal_lm(trainer.ref_model).model
        handle = backbone.register_forward_pre_hook(lambda *_: forwards.append(1))
    trainer_module.sequence_logprobs = counted
    try:
        yield passes, forwards
    finally:
        trainer_module.sequence_logprobs = real
        if handle is not None:
            handle.remove()


def direct_base_logprobs(tokenizer, prompts, completion_ids):
    """log pi_base(y|x) of a fresh copy of the base (never trained), one plain pass per completion."""
    base = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH).eval()
    prompt_ids = tokenizer(prompts)["input_ids"]  # TRL's tokenisation of plain-text prompts
    return sequence_logprobs(base, prompt_ids, completion_ids, share_prompts=False).tolist()


# ------------------------------------------------------------------------------------ the reward and its cost
@pytest.mark.parametrize(
    "trainer, beta, temperature, reused",
    [
        (grpo, 0.0, 1.0, False),  # TRL computes no reference: one pi_base pass (our frozen copy)
        (grpo, 0.04, 1.0, True),  # TRL's reference pass is log pi_base at T=1: reused
        (grpo, 0.04, 0.7, False),  # TRL's reference is log pi_base^(T): not the reward, so one pass at T=1
        (rloo, 0.05, 1.0, True),  # RLOO's default beta
    ],
    ids=["grpo-beta0", "grpo-beta0.04", "grpo-beta0.04-T0.7", "rloo-beta0.05"],
)
def test_logprob_reward_is_log_pi_base_with_zero_or_one_pi_base_pass(
    trainer, beta, temperature, reused, tmp_path, toy_model, toy_tokenizer
):
    trainer = trainer(tmp_path, toy_model, toy_tokenizer, beta=beta, temperature=temperature, max_steps=2)
    calls = record_rewards(trainer)
    with count_base_passes(trainer) as (passes, forwards):
        trainer.train()
    assert len(calls) == 2 and trainer.state.global_step == 2
    per_step = RL_ARGS["per_device_train_batch_size"]
    if reused:  # zero extra forwards: pi_base's backbone ran only TRL's own reference pass (one micro-batch a step)
        assert passes == [] and len(forwards) == 2
        assert (trainer.reused_reference_rows, trainer.base_scored_rows) == (2 * per_step, 0)
    else:  # exactly one pass over each completion
        assert passes == [per_step, per_step]
        assert (trainer.reused_reference_rows, trainer.base_scored_rows) == (0, 2 * per_step)
    for prompts, completion_ids, rewards, _ in calls:
        expected = direct_base_logprobs(toy_tokenizer, prompts, completion_ids)
        assert rewards == pytest.approx(expected, abs=1e-5)
    # the policy moved, so "equal to pi_base" is not "equal to the policy"
    assert any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), toy_model_copy().parameters()))


def toy_model_copy():
    return AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH)


def test_normalized_logprob_divides_by_the_completion_length(tmp_path, toy_model, toy_tokenizer):
    trainer = grpo(tmp_path, toy_model, toy_tokenizer, self_reward="normalized_logprob", beta=0.04, max_steps=1)
    calls = record_rewards(trainer)
    trainer.train()
    prompts, completion_ids, rewards, _ = calls[0]
    expected = direct_base_logprobs(toy_tokenizer, prompts, completion_ids)
    assert rewards == pytest.approx([lp / len(ids) for lp, ids in zip(expected, completion_ids)], abs=1e-5)


@pytest.mark.parametrize("beta, reused", [(0.0, False), (0.04, True)])
def test_peft_pi_base_is_the_adapter_disabled_model_with_no_copy(beta, reused, tmp_path, toy_model, toy_tokenizer):
    from peft import LoraConfig

    trainer = grpo(
        tmp_path, toy_model, toy_tokenizer, beta=beta, max_steps=3, learning_rate=5e-2,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )  # fmt: skip
    assert trainer.ref_model is None  # no second model in memory
    calls = record_rewards(trainer)
    trainer.train()
    assert (trainer.reused_reference_rows > 0) == reused and (trainer.base_scored_rows > 0) == (not reused)
    prompts, completion_ids, rewards, _ = calls[-1]  # after two updates of the adapter
    assert rewards == pytest.approx(direct_base_logprobs(toy_tokenizer, prompts, completion_ids), abs=1e-5)
    with torch.no_grad():
        policy = sequence_logprobs(trainer.model, toy_tokenizer(prompts)["input_ids"], completion_ids).tolist()
    assert max(abs(p - r) for p, r in zip(policy, rewards)) > 1e-3  # the adapter changed the policy


# ------------------------------------------------------------------------------- groups, gating, user rewards
def texts_and_ids(tokenizer, texts):
    return texts, [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def test_majority_votes_within_trls_groups_of_num_generations(tmp_path, toy_model, toy_tokenizer):
    trainer = grpo(tmp_path, toy_model, toy_tokenizer, self_reward="majority", max_steps=1)
    # 8 rows of one prompt are two groups of 4 (TRL's consecutive rows), not one group of 8
    texts, ids = texts_and_ids(toy_tokenizer, ["= 3", "= 3", "= 4", "= 3", "= 5", "= 5", "= 3", "= 9"])
    rewards = trainer.reward_funcs[0](prompts=["1 + 2"] * 8, completions=texts, completion_ids=ids)
    assert rewards == [0.75, 0.75, 0.25, 0.75, 0.5, 0.5, 0.25, 0.25]


def test_answer_gating_gives_a_completion_without_answer_its_groups_lowest_reward(tmp_path, toy_model, toy_tokenizer):
    trainer = grpo(tmp_path, toy_model, toy_tokenizer, answer_extractor="default", max_steps=1)
    texts, ids = texts_and_ids(toy_tokenizer, ["1 + 2 = 3", "no", "1 = 1", "a b", "2 2 4", "x", "y", "= 5"])
    prompts = ["1 + 2"] * 8
    ungated = direct_base_logprobs(toy_tokenizer, prompts, ids)
    rewards = trainer.reward_funcs[0](prompts=prompts, completions=texts, completion_ids=ids)
    for group in (range(0, 4), range(4, 8)):
        lowest = min(ungated[i] for i in group)
        for i in group:
            assert rewards[i] == pytest.approx(lowest if texts[i] in ("no", "a b", "x", "y") else ungated[i], abs=1e-5)
    # off when asked
    trainer = grpo(tmp_path, toy_model, toy_tokenizer, answer_extractor="default", require_answer=False, max_steps=1)
    rewards = trainer.reward_funcs[0](prompts=prompts, completions=texts, completion_ids=ids)
    assert rewards == pytest.approx(ungated, abs=1e-5)


def test_user_reward_funcs_are_added_on_top_with_reward_weights(tmp_path, toy_model, toy_tokenizer):
    def length(prompts, completions, completion_ids, **kwargs):
        return [float(len(ids)) for ids in completion_ids]

    args = SelfRewardGRPOConfig(output_dir=str(tmp_path), reward_weights=[1.0, 0.5], **{**RL_ARGS, "max_steps": 1})
    trainer = SelfRewardGRPOTrainer(
        toy_model, reward_funcs=[length], args=args, train_dataset=load_toy_prompts("train").select(range(8)),
        processing_class=toy_tokenizer,
    )  # fmt: skip
    assert trainer.reward_func_names == ["logprob", "length"]
    trainer.train()
    logged = trainer.state.log_history[0]
    assert {"rewards/logprob/mean", "rewards/length/mean"} <= set(logged)
    expected = logged["rewards/logprob/mean"] + 0.5 * logged["rewards/length/mean"]
    assert logged["reward"] == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------------------------- the literature's rewards
def direct_statistics(model, prompt_ids, completion_ids):
    """Per completion: mean over its tokens of logsumexp(z) - mean(z) and of the entropy, from a plain forward."""
    certainty, entropy = [], []
    with torch.no_grad():
        for prompt, completion in zip(prompt_ids, completion_ids):
            if not completion:
                certainty.append(0.0), entropy.append(0.0)
                continue
            logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].double()
            certainty.append((torch.logsumexp(logits, -1) - logits.mean(-1)).mean().item())
            p = torch.softmax(logits, -1)
            entropy.append((-(p * torch.log(p)).sum(-1)).mean().item())
    return certainty, entropy


def test_token_statistics_equal_a_direct_computation(toy_model):
    prompt_ids = [[1, 5, 6], [1, 7], [1, 5, 6], [2]]
    completion_ids = [[8, 9, 10, 2], [11], [], [12, 13]]
    statistics = completion_token_statistics(toy_model, prompt_ids, completion_ids, micro_batch_size=3)
    certainty, entropy = direct_statistics(toy_model, prompt_ids, completion_ids)
    assert statistics["self_certainty"].tolist() == pytest.approx(certainty, abs=1e-5)
    assert statistics["entropy"].tolist() == pytest.approx(entropy, abs=1e-5)
    assert min(certainty[i] for i in (0, 1, 3)) > 0  # logsumexp > mean: never 0 except for an empty completion


@pytest.mark.parametrize("name, sign, key", [("self_certainty", 1, 0), ("negative_entropy", -1, 1)])
def test_self_certainty_and_negative_entropy_read_the_current_policy(name, sign, key, tmp_path, toy_tokenizer):
    def direct(trainer, prompts, completion_ids):
        policy = trainer.accelerator.unwrap_model(trainer.model)
        return direct_statistics(policy, toy_tokenizer(prompts)["input_ids"], completion_ids)[key]

    model = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH)
    trainer = grpo(tmp_path, model, toy_tokenizer, self_reward=name, max_steps=2)
    assert trainer.ref_model is None  # neither reward needs pi_base: no copy
    calls = record_rewards(trainer, also=direct)
    trainer.train()
    assert trainer.policy_scored_rows == 2 * RL_ARGS["per_device_train_batch_size"]
    for _, _, rewards, expected in calls:
        assert rewards == pytest.approx([sign * value for value in expected], abs=1e-4)
    # as a TRL reward function, built on the policy
    reward = get_self_reward(name, model=model, tokenizer=toy_tokenizer)
    prompts, completion_ids = calls[-1][0], calls[-1][1]
    values = reward(prompts, [""] * len(prompts), completion_ids)
    expected = direct(trainer, prompts, completion_ids)
    assert values == pytest.approx([sign * value for value in expected], abs=1e-4)


# ---------------------------------------------------------------------------------------------- monitoring
@pytest.mark.parametrize("trainer", [grpo, rloo], ids=["grpo", "rloo"])
def test_evaluate_gives_the_sharpening_metrics_and_the_collapse_alarm_is_on(
    trainer, tmp_path, toy_model, toy_tokenizer
):
    trainer = trainer(tmp_path, toy_model, toy_tokenizer, max_steps=1, eval_num_prompts=4, eval_num_samples=2)
    assert any(isinstance(c, CollapseAlarmCallback) for c in trainer.callback_handler.callbacks)
    metrics = trainer.evaluate(load_toy_prompts("test").select(range(4)))
    for key in ("eval_objective", "eval_kl", "eval_sharpening_error", "eval_greedy_accuracy", "eval_bon_accuracy"):
        assert key in metrics
    assert metrics["eval_kl"] == pytest.approx(0.0, abs=1e-4)  # the untrained policy is pi_base


# ----------------------------------------------------------------------------------------------- bad input
def test_a_self_reward_built_with_its_own_model_in_reward_funcs_is_refused(tmp_path, toy_model, toy_tokenizer):
    copy = get_self_reward("logprob", model=toy_model_copy(), tokenizer=toy_tokenizer)
    args = SelfRewardGRPOConfig(output_dir=str(tmp_path), **RL_ARGS)
    with pytest.raises(ValueError, match=r"built with its own model .* set `self_reward: logprob` and drop it"):
        SelfRewardGRPOTrainer(toy_model, reward_funcs=[copy], args=args, train_dataset=load_toy_prompts("test"))


@pytest.mark.parametrize(
    "config, overrides, match",
    [
        (SelfRewardGRPOConfig, {"self_reward": "majority", "num_generations": 2}, "needs num_generations >= 3"),
        (SelfRewardGRPOConfig, {"self_reward": "majority", "num_generations": 1}, "needs num_generations >= 3"),
        (SelfRewardRLOOConfig, {"self_reward": "majority", "num_generations": 2}, "needs num_generations >= 3"),
        (SelfRewardGRPOConfig, {"self_reward": "log_prob"}, r"Unknown self_reward 'log_prob'. Valid names: \["),
        (SelfRewardGRPOConfig, {"require_answer": True}, "needs an answer_extractor"),
        (SelfRewardGRPOConfig, {"scoring_batch_size": 0}, "must be a positive integer"),
        # transformers fills a None top_k with its default 50: samples would not come from pi
        (SelfRewardGRPOConfig, {"top_k": None}, r"top_k=None: give an integer >= 0"),
        (SelfRewardRLOOConfig, {"top_k": -1}, r"top_k=-1: give an integer >= 0"),
        (SelfRewardGRPOConfig, {"temperature": 0.0}, r"temperature must be > 0"),
        (SelfRewardRLOOConfig, {"save_steps": 0}, r"save_steps must be > 0"),
        (SelfRewardRLOOConfig, {"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
    ],
)
def test_bad_config_values_are_refused_in_one_line(config, overrides, match, tmp_path):
    with pytest.raises(ValueError, match=match) as error:
        config(output_dir=str(tmp_path), **{**RL_ARGS, **overrides})
    assert "\n" not in str(error.value)


def test_reward_weights_must_count_the_self_reward_first(tmp_path, toy_model, toy_tokenizer):
    args = SelfRewardGRPOConfig(output_dir=str(tmp_path), reward_weights=[1.0], **RL_ARGS)
    with pytest.raises(ValueError, match=r"reward_weights has 1 values for 2 rewards: give the self-reward's weight"):
        SelfRewardGRPOTrainer(
            toy_model, reward_funcs=[lambda **kw: [0.0]], args=args, train_dataset=load_toy_prompts("test")
        )


def test_a_trl_config_is_refused_with_the_class_to_use(tmp_path, toy_model):
    from trl import GRPOConfig

    with pytest.raises(ValueError, match="needs a SelfRewardGRPOConfig"):
        SelfRewardGRPOTrainer(toy_model, args=GRPOConfig(output_dir=str(tmp_path), **RL_ARGS))


# ----------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize(
    "yaml_path", recipe_yamls("grpo_sharpen") + recipe_yamls("rloo_sharpen"), ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_grpo_and_rloo_recipe_yamls_parse(yaml_path):
    assert yaml_values_not_applied(yaml_path, parse_recipe_yaml(yaml_path)) == {}


# ----------------------------------------------------------------------------------------------- quality
# The toy recipe's hyperparameters (recipes/grpo_sharpen/toy_cpu.yaml) without the monitoring and its best-checkpoint
# selection; majority with a KL penalty (without one, 100 steps reached 0.44 while log pi_base of the greedy outputs
# fell from -4.4 to -21). Measured: logprob 0.095 -> 0.945, majority 0.095 -> 0.960 in 50 steps (10 s each); at 100
# steps the last iterate had fallen back (logprob 0.745, log pi_base(greedy) -6.6: rise, then fall)
QUALITY = dict(per_device_train_batch_size=16, max_steps=50, learning_rate=5e-4, lr_scheduler_type="constant")


@pytest.mark.slow
@pytest.mark.parametrize("self_reward, beta", [("logprob", 0.0), ("majority", 0.1)])
def test_grpo_sharpening_lifts_toy_greedy_accuracy(self_reward, beta, tmp_path, toy_model, toy_tokenizer):
    trainer = grpo(
        tmp_path, toy_model, toy_tokenizer, train_dataset=load_toy_prompts("train"), self_reward=self_reward,
        beta=beta, max_completion_length=48, **QUALITY,
    )  # fmt: skip
    train_and_check_sharpening(trainer, toy_tokenizer, f"grpo-{self_reward}")


@pytest.mark.slow
def test_grpo_sharpen_toy_recipe_reaches_095(tmp_path):
    accuracy = launch_toy_recipe("grpo_sharpen", tmp_path)
    assert accuracy["before"] < 0.15 and accuracy["after"] >= 0.95
    assert (tmp_path / "model.safetensors").exists() and "rlhf-sharpening" in (tmp_path / "README.md").read_text()


# -------------------------------------------------------------------------------------------- real model
@pytest.mark.real_model
def test_lora_steps_on_smollm2_reuse_the_reference_pass_and_move_only_the_adapter(smollm2_path, tmp_path):
    from peft import LoraConfig

    from .test_real_models_training import chat_prompts

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    trainer = grpo(
        tmp_path, smollm2_path, tokenizer, train_dataset=chat_prompts(), beta=0.04, max_steps=2, learning_rate=1e-2,
        max_completion_length=8, per_device_train_batch_size=4, num_generations=2,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )  # fmt: skip
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.ref_model is None
    assert trainer.reused_reference_rows == 8 and trainer.base_scored_rows == 0  # zero extra forwards, no copy
    params = dict(trainer.model.named_parameters())
    assert all(not torch.equal(params[n].detach(), before) for n, before in adapters.items())
    assert all("lora_" in n for n in adapters)


def test_positional_arguments_follow_trls_order(tmp_path, toy_model, toy_tokenizer):
    args = SelfRewardRLOOConfig(output_dir=str(tmp_path), **{**RL_ARGS, "max_steps": 1})
    prompts, test = load_toy_prompts("train").select(range(8)), load_toy_prompts("test").select(range(4))
    trainer = SelfRewardRLOOTrainer(toy_model, None, args, prompts, test, toy_tokenizer)
    assert (trainer.train_dataset, trainer.eval_dataset, trainer.processing_class) == (prompts, test, toy_tokenizer)


def test_exports():
    import trl_sharpen

    for name in ("SelfRewardGRPOTrainer", "SelfRewardGRPOConfig", "SelfRewardRLOOTrainer", "SelfRewardRLOOConfig"):
        assert name in trl_sharpen.__all__ and getattr(trl_sharpen, name).__name__ == name


def test_prompt_only_dataset_with_extra_columns_passes_them_to_user_rewards(tmp_path, toy_model, toy_tokenizer):
    seen = []

    def reads_answer(prompts, completions, completion_ids, answer, **kwargs):
        seen.extend(answer)
        return [0.0] * len(prompts)

    data = Dataset.from_dict({"prompt": ["1 + 2 =", "3 + 4 ="], "answer": ["3", "7"]})
    args = SelfRewardGRPOConfig(output_dir=str(tmp_path), **{**RL_ARGS, "max_steps": 1})
    trainer = SelfRewardGRPOTrainer(
        toy_model, reward_funcs=[reads_answer], args=args, train_dataset=data, processing_class=toy_tokenizer
    )
    trainer.train()
    assert sorted(set(seen)) == ["3", "7"] and len(seen) == RL_ARGS["per_device_train_batch_size"]


def test_transformers_fills_a_none_top_k_with_50_which_is_why_it_is_refused():
    """The reason for the top_k refusal above: transformers' generate fills a None sampling field from its global
    defaults, and top_k's is 50 (if this changes, the refusal's message must change with it)."""
    from transformers import GenerationConfig

    assert GenerationConfig._get_default_generation_params()["top_k"] == 50
