"""Resuming: a run stopped after a checkpoint and restarted with `resume_from_checkpoint` ends exactly where the
uninterrupted run ends (same weights, same logged losses), so optimizer, scheduler, RNG (the online trainers sample
with it every step) and the cached Best-of-N data were all restored. One process in-process, two via the recipes."""

import json
import shutil

import pytest
import torch
from datasets import load_from_disk
from safetensors.torch import load_file
from transformers import AutoTokenizer, Trainer

from tests.launching import RECIPES, STEPS, failure_output, launch_recipe, launched_recipe, rank_lines
from tests.trainer_args import CPU_TEST_ARGS
from trl_sharpen import BoNSFTConfig, BoNSFTTrainer, SelfRewardDPOConfig, SelfRewardDPOTrainer
from trl_sharpen.toy import TOY_MODEL_PATH, load_toy_prompts


COMMON = {**CPU_TEST_ARGS, "max_steps": 4, "save_strategy": "steps", "save_steps": 2}


def make_trainer(name, output_dir):
    tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL_PATH)
    prompts = load_toy_prompts("train", limit=16)
    if name == "bon_sft":
        args = BoNSFTConfig(output_dir=str(output_dir), num_samples=4, generation_batch_size=512, **COMMON)
        return BoNSFTTrainer(TOY_MODEL_PATH, args=args, train_dataset=prompts, processing_class=tokenizer)
    if name == "self_reward_dpo":
        args = SelfRewardDPOConfig(output_dir=str(output_dir), **COMMON)
        return SelfRewardDPOTrainer(TOY_MODEL_PATH, args=args, train_dataset=prompts, processing_class=tokenizer)
    from trl_sharpen import XPOConfig, XPOTrainer

    # A replay buffer, so that its restoring counts too
    args = XPOConfig(output_dir=str(output_dir), replay_buffer_size=8, **COMMON)
    return XPOTrainer(TOY_MODEL_PATH, args=args, train_dataset=prompts, processing_class=tokenizer)


def weights(model):
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def losses(log_history):
    return {entry["step"]: entry["loss"] for entry in log_history if "loss" in entry}


def shard_mtimes(output_dir):
    return {path.name: path.stat().st_mtime_ns for path in (output_dir / "bon_data" / "shards").iterdir()}


@pytest.mark.parametrize("name", ["bon_sft", "self_reward_dpo", "xpo"])
def test_resumed_run_matches_the_uninterrupted_one(name, tmp_path):
    full = make_trainer(name, tmp_path)
    full.train()
    expected_weights, expected_losses = weights(full.model), losses(full.state.log_history)
    if name == "bon_sft":
        shards = shard_mtimes(tmp_path)

    # Stopped after checkpoint-2: the later checkpoint never happened
    shutil.rmtree(tmp_path / "checkpoint-4")
    resumed = make_trainer(name, tmp_path)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))

    assert resumed.state.global_step == 4
    # The history up to step 2 comes from the checkpoint; steps 3 and 4 were trained again
    assert losses(resumed.state.log_history) == expected_losses
    for key, value in weights(resumed.model).items():
        assert torch.equal(value, expected_weights[key]), f"{key} differs after resuming"
    if name == "bon_sft":  # the Best-of-N data on disk is reused as is, not sampled again
        assert shard_mtimes(tmp_path) == shards
        assert resumed.bon_dataset["completion_ids"] == full.bon_dataset["completion_ids"]


def test_resume_without_the_rng_state_samples_other_completions(tmp_path):
    """The control for the test above: the online trainer's continuation depends on the restored RNG state, so an
    exact match there is evidence that it was restored (not that the comparison is blind)."""
    full = make_trainer("self_reward_dpo", tmp_path)
    full.train()
    expected = weights(full.model)
    shutil.rmtree(tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-2" / "rng_state.pth").unlink()
    resumed = make_trainer("self_reward_dpo", tmp_path)
    # Such a checkpoint is refused (issue 19) ...
    with pytest.raises(ValueError, match=r"checkpoint-2 is incomplete: rng_state.pth is missing"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    # ... because, forced past the check (transformers' own train), the run ends elsewhere
    Trainer.train(resumed, resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert any(not torch.equal(value, expected[key]) for key, value in weights(resumed.model).items())


# ------------------------------------------------------------------------------------------- two processes
@pytest.mark.distributed
@pytest.mark.parametrize(
    "recipe", [recipe for recipe in RECIPES if recipe.exists() and recipe.resume], ids=lambda r: r.name
)
def test_recipe_resumes_on_two_processes_under_zero3(recipe, tmp_path_factory, tmp_path):
    """The recipe under ZeRO-3 on 2 processes, stopped after checkpoint-2 and relaunched with the same command plus
    `--resume_from_checkpoint`: same final weights on both ranks and on disk, same losses, no Best-of-N resampling."""
    first, first_dir = launched_recipe(recipe, "zero3", tmp_path_factory)
    assert first.returncode == 0, failure_output(first)
    output_dir = tmp_path / "run"
    shutil.copytree(first_dir, output_dir)  # the crashed run's directory: bon_data and checkpoint-2 only
    shutil.rmtree(output_dir / f"checkpoint-{STEPS}")
    for path in output_dir.glob("*.safetensors"):
        path.unlink()
    shards = shard_mtimes(output_dir) if recipe.name == "sft_sharpen" else None

    result = launch_recipe(recipe, "zero3", output_dir, "--resume_from_checkpoint", str(output_dir / "checkpoint-2"))
    assert result.returncode == 0, failure_output(result)

    assert {digest for *_, digest in rank_lines(result.stdout)} == {digest for *_, digest in rank_lines(first.stdout)}
    assert [steps for _, _, _, steps, _ in rank_lines(result.stdout)] == [STEPS, STEPS]
    expected, resumed = load_file(first_dir / "model.safetensors"), load_file(output_dir / "model.safetensors")
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)
    state = json.loads((output_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    first_state = json.loads((first_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert losses(state["log_history"]) == losses(first_state["log_history"])
    if shards is not None:
        for rank in (0, 1):
            assert f"Best-of-N on process {rank} of 2: 0 of 4 shards to sample (0 prompts)" in result.stderr
        assert shard_mtimes(output_dir) == shards
        assert load_from_disk(str(output_dir / "bon_data"))["prompt_index"] == list(range(16))
