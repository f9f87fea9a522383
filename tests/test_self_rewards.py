"""Each self-reward on hand-built cases, the registry, validation, and use as a TRL reward function."""

import math

import pytest
import torch
from datasets import Dataset

from trl_sharpen import SELF_REWARDS, extract_answer, get_self_reward, sequence_logprobs
from trl_sharpen.self_rewards import SelfReward, check_rewards, group_ids_of


PROMPTS = ["Q1", "Q1", "Q1", "Q1", "Q2", "Q2"]
COMPLETIONS = ["so 5", "it is 5", "7", "no idea", "\\boxed{12}", "the answer is 12"]
COMPLETION_IDS = [[1, 2], [1, 2, 3, 4], [9], [], [5, 6, 7], [8]]
BASE_LOGPROBS = [-1.0, -2.0, -0.5, 0.0, -3.0, -6.0]


def test_logprob_is_the_base_log_probability():
    reward = get_self_reward("logprob")
    assert reward(PROMPTS, COMPLETIONS, COMPLETION_IDS, base_logprobs=BASE_LOGPROBS) == BASE_LOGPROBS


def test_normalized_logprob_divides_by_length_in_tokens():
    reward = get_self_reward("normalized_logprob")
    got = reward(PROMPTS, COMPLETIONS, COMPLETION_IDS, base_logprobs=BASE_LOGPROBS)
    # the empty completion (0 tokens) keeps its log-prob instead of dividing by zero
    assert got == [-0.5, -0.5, -0.5, 0.0, -1.0, -6.0]


def test_majority_is_the_share_of_the_prompts_samples_with_the_same_answer():
    reward = get_self_reward("majority")
    got = reward(PROMPTS, COMPLETIONS, COMPLETION_IDS)
    # Q1: answers 5, 5, 7, None -> 2/4, 2/4, 1/4, 0 ; Q2: 12 (boxed), 12 -> 1, 1
    assert got == [0.5, 0.5, 0.25, 0.0, 1.0, 1.0]


def test_majority_groups_by_explicit_group_ids_and_takes_a_custom_extractor():
    reward = get_self_reward("majority", answer_extractor=lambda text: text.split()[0])
    got = reward(["p"] * 4, ["a x", "a y", "b", "a"], [[1]] * 4, group_ids=[0, 0, 1, 1])
    assert got == [1.0, 1.0, 0.5, 0.5]


def test_default_answer_extractor():
    assert extract_answer("3 + 5 = 8 . answer 8") == "8"
    assert extract_answer("so the total is 1,234.0 dollars.") == "1234"
    assert extract_answer("first \\boxed{x} then \\boxed{\\frac{1}{2}} and 7") == "\\frac{1}{2}"
    assert extract_answer("no digits here") is None
    assert extract_answer("cut off \\boxed{12") == "12"  # unbalanced box: fall back to the last number


def my_reward(prompts, completions, completion_ids, base_logprobs, **kwargs):
    return [lp + len(ids) for lp, ids in zip(base_logprobs, completion_ids)]


def test_user_callable_gets_base_logprobs_when_its_signature_asks():
    reward = get_self_reward(my_reward)
    assert reward.requires_base_logprobs and reward.name == "my_reward"
    assert reward(PROMPTS, COMPLETIONS, COMPLETION_IDS, base_logprobs=BASE_LOGPROBS)[:2] == [1.0, 2.0]
    # the same function named by import path, as from YAML
    by_path = get_self_reward("tests.test_self_rewards:my_reward")
    assert by_path(PROMPTS, COMPLETIONS, COMPLETION_IDS, base_logprobs=BASE_LOGPROBS)[:2] == [1.0, 2.0]


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(ValueError, match="Unknown self-reward 'loglik'.*logprob.*majority.*normalized_logprob"):
        get_self_reward("loglik")
    assert {"logprob", "normalized_logprob", "majority"} <= set(SELF_REWARDS)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda prompts, completions, completion_ids, **kw: [1.0], "returned 1 values for 6 completions"),
        (lambda prompts, completions, completion_ids, **kw: [float("nan")] * 6, "returned nan for completion 0"),
        (lambda prompts, completions, completion_ids, **kw: [0.0] * 5 + [math.inf], "returned inf for completion 5"),
        (lambda prompts, completions, completion_ids, **kw: None, "returned None"),
    ],
)
def test_bad_reward_values_are_reported_with_the_reward_name(bad, message):
    bad.__name__ = "flaky_judge"
    with pytest.raises(ValueError, match=f"`flaky_judge` {message}"):
        get_self_reward(bad)(PROMPTS, COMPLETIONS, COMPLETION_IDS)


def test_check_rewards_accepts_tensors():
    assert check_rewards("r", torch.tensor([1.0, 2.0]), 2) == [1.0, 2.0]


def test_group_ids_treat_equal_chat_prompts_as_one_prompt():
    chat = [{"role": "user", "content": "hi"}]
    assert group_ids_of([chat, "hi", list(chat), "hi"]) == [0, 1, 0, 1]


def test_logprob_as_trl_reward_function_scores_with_its_model(toy_model, toy_tokenizer):
    prompts = ["Q : 3 + 5 = ?", [{"role": "user", "content": "3 + 5 = ?"}]]
    completion_ids = [toy_tokenizer("3 + 5 = 8 . answer 8")["input_ids"] + [toy_tokenizer.eos_token_id]] * 2
    reward = get_self_reward("logprob", model=toy_model, tokenizer=toy_tokenizer)
    got = reward(prompts, ["3 + 5 = 8 . answer 8"] * 2, completion_ids)
    prompt_ids = [
        toy_tokenizer(prompts[0])["input_ids"],
        toy_tokenizer.apply_chat_template(prompts[1], add_generation_prompt=True, return_dict=True)["input_ids"],
    ]
    torch.testing.assert_close(torch.tensor(got), sequence_logprobs(toy_model, prompt_ids, completion_ids))
    with pytest.raises(ValueError, match="needs the base model"):
        get_self_reward("logprob")(prompts, ["x", "y"], completion_ids)


def test_self_reward_plugs_into_grpo_trainer(toy_model, toy_tokenizer, tmp_path):
    """A GRPO user can pass a self-reward as one of `reward_funcs` (here the base scores the policy's samples)."""
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from trl_sharpen.toy import TOY_MODEL_PATH

    base = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH).eval()
    reward = get_self_reward("normalized_logprob", model=base, tokenizer=toy_tokenizer)
    assert isinstance(reward, SelfReward) and not isinstance(reward, torch.nn.Module)
    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=16,
        max_steps=2,
        logging_steps=1,
        gradient_checkpointing=False,
    )
    dataset = Dataset.from_dict({"prompt": ["Q : 1 + 2 = ?", "Q : 4 + 4 = ?"] * 4})
    trainer = GRPOTrainer(
        model=TOY_MODEL_PATH, reward_funcs=[reward], args=args, train_dataset=dataset, processing_class=toy_tokenizer
    )
    trainer.train()
    logged = [log for log in trainer.state.log_history if "rewards/normalized_logprob/mean" in log]
    assert logged and all(log["rewards/normalized_logprob/mean"] < 0 for log in logged)
