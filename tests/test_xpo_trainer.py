"""XPOTrainer (the paper's Algorithm 1) on the toy bases: loss, bonus, replay buffer, bad input, quality, recipe."""

import functools
import logging
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, set_seed

from trl_sharpen import XPOConfig, XPOTrainer
from trl_sharpen.data import tokenize_prompt
from trl_sharpen.generation import build_generation_config, generate_completions
from trl_sharpen.logprobs import sequence_logprobs
from trl_sharpen.toy import TOY_MODEL_PATH, load_toy_prompts

from .launching import launch_toy_recipe, parse_recipe_yaml, recipe_yamls, yaml_values_not_applied
from .sharpening_check import train_and_check_sharpening
from .test_self_reward_dpo_trainer import count_scoring_forwards  # pi_base scoring passes
from .trainer_args import cpu_test_args, online_trainer, train_and_check_basics


REPO = Path(__file__).resolve().parents[1]
POOR_COVERAGE_MODEL_PATH = str(REPO / "trl_sharpen" / "toy" / "base_model_poor_coverage")


make_config = functools.partial(cpu_test_args, XPOConfig)  # (tmp_path, **overrides)
make_trainer = functools.partial(
    online_trainer, XPOTrainer
)  # (tmp_path, model, tokenizer, train_dataset, **overrides)


def logged(log_history, key):
    return [entry[key] for entry in log_history if key in entry]


def next_pair_batch(trainer):
    trainer.model.train()
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def pair_rows(batch):
    """Each pair of a batch as a hashable row: its chosen and rejected token ids, base log-probs and rewards."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    chosen, rejected = [
        [row[m.bool()].tolist() for row, m in zip(t, mk)] for t, mk in zip(ids.chunk(2), mask.chunk(2))
    ]
    columns = [batch[key].tolist() for key in ("ref_chosen_logps", "ref_rejected_logps", "chosen_rewards")]
    columns += [batch["rejected_rewards"].tolist(), batch["base_is_chosen"].tolist()]
    return [(tuple(c), tuple(r), *values) for c, r, *values in zip(chosen, rejected, *columns)]


def test_trains_policy_keeps_reference_tags_logs_metrics_and_cites_both_papers(tmp_path, toy_model, toy_tokenizer):
    metrics = ["loss", "xpo/bonus", "xpo/alpha", "xpo/replayed", "logps/base_samples", "self_reward/sharpen_loss"]
    metrics += ["self_reward/policy_samples", "self_reward/base_samples", "self_reward/chosen", "self_reward/rejected"]
    metrics += ["completions/mean_length", "rewards/margins"]
    trainer = make_trainer(tmp_path, toy_model, toy_tokenizer, alpha=0.5)
    history = train_and_check_basics(trainer, ["trl", "trl-sharpen", "xpo"], metrics)
    assert logged(history, "xpo/alpha") == [0.5, 0.5]
    # The bonus is alpha * mean log pi(y~|x); at step 1 the policy is pi_base, so that is alpha * mean self-reward
    assert logged(history, "xpo/bonus")[0] == pytest.approx(0.5 * logged(history, "logps/base_samples")[0], rel=1e-5)
    assert logged(history, "logps/base_samples")[0] == pytest.approx(
        logged(history, "self_reward/base_samples")[0], abs=1e-4
    )
    trainer.create_model_card(model_name="toy-xpo")
    card = (tmp_path / "README.md").read_text()
    assert "2412.01951" in card and "2405.21046" in card and "Exploratory Preference Optimization" in card


@pytest.mark.parametrize("loss_type", ["sharpen", "sigmoid"])
def test_step_one_loss_is_algorithm_1_with_one_pi_base_pass_over_policy_samples(
    tmp_path, toy_model, toy_tokenizer, loss_type
):
    alpha = 0.25
    trainer = make_trainer(tmp_path, toy_model, toy_tokenizer, alpha=alpha, loss_type=loss_type)
    with count_scoring_forwards(trainer.ref_model) as calls:
        batch = next_pair_batch(trainer)
    # pi_base scores only the 8 policy samples y; log pi_base(y~|x) of the base samples came with their generation
    assert calls == [8]
    rows = pair_rows(batch)
    assert len(rows) == 8
    for _, _, ref_chosen, ref_rejected, r_chosen, r_rejected, base_is_chosen in rows:
        assert (ref_chosen, ref_rejected) == (r_chosen, r_rejected)  # logprob self-reward = reference log-probs
        assert r_chosen >= r_rejected and (r_chosen > r_rejected or not base_is_chosen)  # a tie keeps y chosen
    base_logps = torch.where(batch["base_is_chosen"], batch["ref_chosen_logps"], batch["ref_rejected_logps"])
    reward_gap = batch["chosen_rewards"] - batch["rejected_rewards"]
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    # At initialisation pi = pi_base: the log-ratios vanish, the regression is mean (r(y) - r(y~))^2, sigmoid is log 2
    pair_loss = reward_gap.pow(2).mean().item() if loss_type == "sharpen" else math.log(2)
    assert loss.item() == pytest.approx(pair_loss + alpha * base_logps.mean().item(), rel=1e-4)
    assert trainer._metrics["train"]["logps/base_samples"][-1] == pytest.approx(base_logps.mean().item(), abs=1e-4)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters())


counted_completions = []


def counted_logprob(prompts, completions, completion_ids, base_logprobs, **kwargs):
    """The log pi_base(y|x) self-reward, recording how many completions each call scores."""
    counted_completions.append(len(completions))
    return base_logprobs


def test_replay_buffer_replays_stored_triples_without_rescoring_them(tmp_path, toy_model, toy_tokenizer):
    counted_completions.clear()
    trainer = make_trainer(tmp_path, toy_model, toy_tokenizer, replay_buffer_size=16, self_reward=counted_logprob)
    with count_scoring_forwards(trainer.ref_model) as calls:
        batches = [next_pair_batch(trainer) for _ in range(3)]
    rows = [pair_rows(batch) for batch in batches]
    # Each step samples and scores only its own 8 prompts (8 y scored by pi_base, 8 y + 8 y~ by the self-reward) ...
    assert calls == [8, 8, 8] and counted_completions == [16, 16, 16]
    # ... and trains on them plus the stored triples, with their stored ids, base log-probs and rewards
    assert [len(r) for r in rows] == [8, 16, 24]
    assert rows[1][8:] == rows[0]
    assert rows[2][8:] == rows[0] + rows[1][:8]  # the buffer held steps 1 and 2
    # capped at 16 triples, oldest dropped first: steps 2 and 3 are left
    assert buffer_rows(trainer) == rows[1][:8] + rows[2][:8]
    # Evaluation neither replays nor stores
    trainer.model.eval()
    assert len(pair_rows(trainer._prepare_inputs(next(iter(trainer.get_train_dataloader()))))) == 8
    assert buffer_rows(trainer) == rows[1][:8] + rows[2][:8]


def test_paper_preset_replays_all_of_algorithm_1s_growing_dataset(tmp_path, toy_model, toy_tokenizer):
    trainer = make_trainer(tmp_path, toy_model, toy_tokenizer, preset="paper")
    assert (trainer.args.loss_type, trainer.args.replay_buffer_size) == (["sharpen"], -1)
    rows = [pair_rows(next_pair_batch(trainer)) for _ in range(3)]
    assert [len(r) for r in rows] == [8, 16, 24]  # D grows by every step's triples, none dropped
    assert buffer_rows(trainer) == rows[0] + rows[1][:8] + rows[2][:8]


def test_a_truncated_sample_is_never_chosen_over_a_complete_one(tmp_path, toy_model, toy_tokenizer):
    from .test_self_reward_dpo_trainer import pair_ends_with_eos

    trainer = make_trainer(tmp_path, toy_model, toy_tokenizer, loss_type="sigmoid", max_completion_length=12)
    ends = pair_ends_with_eos(next_pair_batch(trainer), toy_tokenizer.eos_token_id)
    assert any(chosen != rejected for chosen, rejected in ends)  # the step has complete-vs-truncated pairs
    assert all(chosen or not rejected for chosen, rejected in ends)  # and their complete sample is always chosen


def test_answer_gating_never_chooses_a_sample_without_an_answer(tmp_path, toy_model, toy_tokenizer):
    from .test_best_of_n import careful_steps_are_no_answer as extractor
    from .test_self_reward_dpo_trainer import pair_answers

    trainer = make_trainer(
        tmp_path, toy_model, toy_tokenizer, answer_extractor="tests.test_best_of_n:careful_steps_are_no_answer"
    )
    answers = pair_answers(next_pair_batch(trainer), toy_tokenizer, extractor)
    assert any(chosen and not rejected for chosen, rejected in answers)  # the step has answer-vs-no-answer pairs
    assert all(chosen or not rejected for chosen, rejected in answers)  # and the answer is always chosen


def buffer_rows(trainer):
    """The stored triples, put through the trainer's own pair-batch builder (as when they are replayed)."""
    prompts, chosen, rejected, ref_chosen, ref_rejected, r_chosen, r_rejected, base_is_chosen = zip(
        *trainer.replay_buffer
    )
    batch = trainer._pair_batch(
        list(prompts),
        list(chosen),
        list(rejected),
        torch.tensor(ref_chosen),
        torch.tensor(ref_rejected),
        chosen_rewards=torch.tensor(r_chosen),
        rejected_rewards=torch.tensor(r_rejected),
        base_is_chosen=torch.tensor(base_is_chosen),
    )
    return pair_rows(batch)


def test_replay_buffer_is_logged_saved_with_checkpoints_and_restored_on_resume(tmp_path, toy_model, toy_tokenizer):
    trainer = make_trainer(
        tmp_path, toy_model, toy_tokenizer, replay_buffer_size=12, save_strategy="steps", save_steps=2
    )
    trainer.train()
    assert logged(trainer.state.log_history, "xpo/replayed") == [0.0, 8.0]
    saved = torch.load(tmp_path / "checkpoint-2" / "xpo_replay_buffer_0.pt", weights_only=False)
    assert saved == list(trainer.replay_buffer) and len(saved) == 12

    model = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH)
    resumed = make_trainer(tmp_path, model, toy_tokenizer, replay_buffer_size=12, max_steps=3)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3
    assert logged(resumed.state.log_history, "xpo/replayed")[-1] == 12.0  # the restored buffer was replayed
    assert list(resumed.replay_buffer)[:4] == saved[-4:]


def test_alpha_list_runs_per_epoch_then_keeps_its_last_value(tmp_path, toy_model, toy_tokenizer, caplog):
    train = load_toy_prompts("train").select(range(8))  # one step per epoch
    trainer = make_trainer(
        tmp_path, toy_model, toy_tokenizer, train_dataset=train, alpha=[0.5, 0.2], max_steps=-1, num_train_epochs=3
    )
    with caplog.at_level(logging.WARNING, logger="trl_sharpen.xpo_trainer"):
        trainer.train()
    assert logged(trainer.state.log_history, "xpo/alpha") == [0.5, 0.2, 0.2]
    warnings = [r.getMessage() for r in caplog.records if "alpha has 2 values" in r.getMessage()]
    assert len(warnings) == 1 and "epoch 3" in warnings[0] and "0.2" in warnings[0]


def test_y_comes_from_the_policy_and_y_tilde_from_the_reference_model(tmp_path, toy_tokenizer):
    """Policy = the poor-coverage base (careful solutions ~2% of samples), pi_base = the default toy base (~50%)."""
    policy = AutoModelForCausalLM.from_pretrained(POOR_COVERAGE_MODEL_PATH)
    trainer = XPOTrainer(
        model=policy,
        ref_model=AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH),
        args=make_config(tmp_path, per_device_train_batch_size=32),
        train_dataset=load_toy_prompts("train").select(range(64)),
        processing_class=toy_tokenizer,
    )
    batch = next_pair_batch(trainer)
    completions = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["completion_mask"])]
    careful = torch.tensor([ids[0] != toy_tokenizer.convert_tokens_to_ids("answer") for ids in completions])
    careful_chosen, careful_rejected = careful.chunk(2)
    base_is_chosen = batch["base_is_chosen"]
    careful_base = torch.where(base_is_chosen, careful_chosen, careful_rejected).sum().item()
    careful_policy = torch.where(base_is_chosen, careful_rejected, careful_chosen).sum().item()
    assert careful_base >= 8 and careful_policy <= 3, (careful_base, careful_policy)


def test_peft_samples_base_completions_from_the_adapter_disabled_model(tmp_path, toy_model, toy_tokenizer):
    from peft import LoraConfig

    trainer = XPOTrainer(
        model=toy_model,
        args=make_config(tmp_path, learning_rate=1e-2, alpha=0.1),
        train_dataset=load_toy_prompts("train").select(range(64)),
        processing_class=toy_tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    assert trainer.ref_model is None
    adapter = {k: v.clone() for k, v in trainer.model.named_parameters() if "lora_B" in k}
    trainer.train()
    assert any(not torch.equal(p, adapter[k]) for k, p in trainer.model.named_parameters() if k in adapter)
    base = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH).state_dict()
    with trainer.model.disable_adapter():
        for name, value in trainer.model.get_base_model().state_dict().items():
            if "lora_" not in name:
                assert torch.equal(value, base[name.replace(".base_layer", "")]), name
    history = trainer.state.log_history
    # y~ scored at generation with the adapter disabled = the policy's own log-probs at step 1 (LoRA starts at 0)
    assert logged(history, "logps/base_samples")[0] == pytest.approx(
        logged(history, "self_reward/base_samples")[0], abs=1e-3
    )
    # at step 2 the policy has moved: the y~ log-probs recorded at generation are pi_base's, not the policy's
    assert logged(history, "self_reward/base_samples")[1] != logged(history, "logps/base_samples")[1]


def test_parent_hooks_xpo_builds_on_keep_their_parameters():
    """XPO calls these SelfRewardDPOTrainer hooks positionally: a changed signature must fail here, by name."""
    import inspect

    from trl_sharpen.self_reward_dpo_trainer import SelfRewardDPOTrainer

    hooks = {
        "_generate": ["self", "prompt_ids", "num_samples", "from_base"],
        "_base_logprobs": ["self", "prompt_ids", "completion_ids"],
        "_self_rewards": ["self", "inputs", "samples", "base_logps"],
        "_pair_batch": ["self", "prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"],
        "_log_samples": ["self", "inputs", "samples", "rewards", "selection"],
        "_auxiliary_loss": ["self", "chosen_logps", "rejected_logps", "inputs", "extras"],
    }
    for name, parameters in hooks.items():
        signature = inspect.signature(getattr(SelfRewardDPOTrainer, name))
        assert list(signature.parameters)[: len(parameters)] == parameters, name


# --------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"alpha": -0.1}, r"alpha=\[-0.1\].*>= 0"),
        ({"alpha": [0.1, -1.0]}, r"alpha=\[0.1, -1.0\]"),
        ({"alpha": []}, "alpha=.*empty"),
        ({"replay_buffer_size": -2}, "replay_buffer_size=-2"),
        ({"self_reward": "majority"}, "self_reward='majority' with num_generations=2"),
        ({"num_generations": 4}, "num_generations=4"),
        ({"sample_from": "base"}, "sample_from='base'"),
        ({"ties": "skip"}, "ties='skip'"),
        ({"replay_buffer_size": 8, "reanchor_steps": 2}, "replay_buffer_size=8 with reanchor_steps=2"),
    ],
)
def test_bad_config_values_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config(tmp_path, **overrides)


def test_a_self_reward_dpo_config_is_refused(tmp_path, toy_model, toy_tokenizer):
    from trl_sharpen import SelfRewardDPOConfig

    args = SelfRewardDPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    with pytest.raises(TypeError, match="XPOConfig"):
        XPOTrainer(model=toy_model, args=args, train_dataset=load_toy_prompts("train").select(range(8)))


# ---------------------------------------------------------------------------------------------- the bonus
def mean_logprob_of_fixed_base_samples(model, tokenizer, base, num_prompts=64, num_samples=4):
    """Mean log pi(y~|x) over a fixed set of pi_base samples (held-out prompts, own seed), not a training batch."""
    prompt_ids = [tokenize_prompt(tokenizer, p) for p in load_toy_prompts("test")["prompt"][:num_prompts]]
    config = build_generation_config(
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=40,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    set_seed(1234)
    samples = generate_completions(base, prompt_ids, config, num_samples=num_samples, batch_size=256)
    rows = [prompt_ids[i] for i in samples.prompt_index]
    with torch.no_grad():
        return sequence_logprobs(model.eval(), rows, samples.completion_ids).mean().item()


@pytest.mark.slow
def test_bonus_lowers_the_policy_log_prob_of_base_samples(tmp_path, toy_tokenizer):
    """Same seed, same 32 steps, alpha = 1 vs 0, on the poor-coverage base (the regime the bonus is for): the bonus
    pushes probability away from what pi_base samples. Measured on fixed base samples of held-out prompts.

    (About 4 nats here; other seeds and prompt sets gave 2.5-3.8. On the default toy base, where half the base samples are the careful
    solution that the regression sharpens towards, the bonus does not win against sharpening: about +0.2 nats.)"""
    measured = {}
    for alpha in (0.0, 1.0):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(POOR_COVERAGE_MODEL_PATH)
        trainer = make_trainer(
            tmp_path / str(alpha), model, toy_tokenizer, alpha=alpha, max_steps=32, per_device_train_batch_size=16,
            lr_scheduler_type="constant",
        )  # fmt: skip
        trainer.train()
        base = AutoModelForCausalLM.from_pretrained(POOR_COVERAGE_MODEL_PATH).eval()
        measured[alpha] = mean_logprob_of_fixed_base_samples(trainer.model, toy_tokenizer, base)
    measured["base"] = mean_logprob_of_fixed_base_samples(base, toy_tokenizer, base)
    print(f"mean log pi(y~|x) on fixed base samples: {measured}")
    assert measured[1.0] < measured[0.0] - 1.0


# ----------------------------------------------------------------------------------------------------- quality
@pytest.mark.slow
def test_xpo_lifts_toy_greedy_accuracy(tmp_path, toy_model, toy_tokenizer):
    # The toy recipe's hyperparameters (recipes/xpo_sharpen/toy_cpu.yaml), with fewer steps
    trainer = make_trainer(
        tmp_path,
        toy_model,
        toy_tokenizer,
        train_dataset=load_toy_prompts("train"),
        per_device_train_batch_size=32,
        max_steps=10,
        lr_scheduler_type="constant",
        alpha=0.1,
    )
    train_and_check_sharpening(trainer, toy_tokenizer, "XPO")


# ------------------------------------------------------------------------------------------------------ recipe
@pytest.mark.parametrize("yaml_path", recipe_yamls("xpo_sharpen"), ids=lambda p: p.name)
def test_xpo_sharpen_recipe_yamls_parse(yaml_path):
    assert yaml_values_not_applied(yaml_path, parse_recipe_yaml(yaml_path)) == {}


@pytest.mark.slow
def test_xpo_sharpen_toy_recipe_runs_with_accelerate_launch(tmp_path):
    accuracy = launch_toy_recipe("xpo_sharpen", tmp_path)
    assert accuracy["before"] < 0.15 and accuracy["after"] >= 0.7
    assert (tmp_path / "model.safetensors").exists() and "xpo" in (tmp_path / "README.md").read_text()
