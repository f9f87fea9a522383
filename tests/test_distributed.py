"""Every recipe and `trl-sharpen bon` under 2 processes with DDP, DeepSpeed ZeRO-2 and ZeRO-3, launched with
`accelerate launch` as the README does (CPU configs: see tests/launching.py), and the launch settings we refuse.

The first DeepSpeed launch on a machine JIT-compiles DeepSpeed's CPU communication op (about 80 s, cached in
~/.cache/torch_extensions); later launches take 15-25 s each.
"""

import json
import os
import re
from pathlib import Path

import pytest
import torch
import trl
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.launching import (
    BACKENDS,
    BATCH,
    EXPECTED_BACKEND,
    NUM_PROMPTS,
    RECIPES,
    STEPS,
    failure_output,
    launch,
    launched_recipe,
    rank_lines,
    recipe_command,
)
from trl_sharpen import best_of_n
from trl_sharpen.distributed import check_processes_fit, trainable_weights_digest
from trl_sharpen.toy import TOY_DATA_DIR, TOY_MODEL_PATH, load_toy_prompts


pytestmark = pytest.mark.distributed

RECIPE_CASES = [
    pytest.param(recipe, backend, id=f"{recipe.name}-{backend}")
    for recipe in RECIPES
    if recipe.exists()
    for backend in recipe.backends
]


def tensorboard_scalars(output_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = sorted(output_dir.glob("runs/**/events.out.tfevents.*"))
    scalars = {}
    for path in event_files:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        scalars.update({tag: accumulator.Scalars(tag) for tag in accumulator.Tags()["scalars"]})
    return event_files, scalars


@pytest.mark.parametrize("recipe, backend", RECIPE_CASES)
def test_recipe_trains_on_two_processes(recipe, backend, tmp_path_factory):
    result, output_dir = launched_recipe(recipe, backend, tmp_path_factory)
    assert result.returncode == 0, failure_output(result)

    # Both ranks ran the backend asked for, took every optimizer step and hold the same trained weights
    ranks = rank_lines(result.stdout)
    base_digest = trainable_weights_digest(AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH))
    assert [(rank, processes) for rank, processes, *_ in ranks] == [(0, 2), (1, 2)], failure_output(result)
    assert {(backend_name, steps) for _, _, backend_name, steps, _ in ranks} == {(EXPECTED_BACKEND[backend], STEPS)}
    digests = {digest for *_, digest in ranks}
    assert len(digests) == 1 and base_digest not in digests

    # Each step consumed a batch from each rank: 16 prompts, 4 per rank and step -> one epoch every 2 steps
    state = json.loads((output_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    steps_per_epoch = NUM_PROMPTS // (2 * BATCH)
    losses = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in losses] == list(range(1, STEPS + 1))  # logged once per step, by one process
    assert [entry["epoch"] for entry in losses] == pytest.approx([s / steps_per_epoch for s in range(1, STEPS + 1)])

    # Printed once (main process): the Trainer's metric lines and the recipe's before/after report
    assert len(re.findall(r"^\{'loss': ", result.stdout, re.M)) == STEPS
    assert len(re.findall(r"^\[before\] greedy accuracy", result.stdout, re.M)) == 1
    assert len(re.findall(r"^\[after\] greedy accuracy", result.stdout, re.M)) == 1
    # One tensorboard run (the main process's), holding the loss of every step
    event_files, scalars = tensorboard_scalars(output_dir)
    assert len(event_files) == 1
    assert [event.step for event in scalars["train/loss"]] == list(range(1, STEPS + 1))

    # The saved model is the trained one, complete (gathered from the ZeRO-3 shards), and loads
    saved = AutoModelForCausalLM.from_pretrained(output_dir)
    assert trainable_weights_digest(saved) in digests
    base = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH)
    assert {k: v.shape for k, v in saved.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
    assert recipe.method_tag in (output_dir / "README.md").read_text()

    if recipe.name == "sft_sharpen":  # Best-of-N data: split across the ranks, every prompt exactly once
        for rank in (0, 1):
            assert f"Best-of-N on process {rank} of 2: 2 of 4 shards to sample (8 prompts)" in result.stderr
        bon = load_from_disk(str(output_dir / "bon_data"))
        assert bon["prompt_index"] == list(range(NUM_PROMPTS))
        assert not list((output_dir / "bon_data" / "shards").glob(".tmp-*"))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_bon_command_splits_prompts_across_processes(backend, tmp_path):
    """`accelerate launch -m trl_sharpen.cli bon`: each process samples its shards, every prompt exactly once, and
    the result is the one a single process gets (each shard is seeded by its index)."""
    args = [
        "bon",
        "--model_name_or_path", TOY_MODEL_PATH,
        "--dataset_name", f"{TOY_DATA_DIR}/test.jsonl",
        "--num_prompts", "16",
        "--num_samples", "4",
        "--max_new_tokens", "40",
        "--shard_size", "4",
        "--output_dir", str(tmp_path),
    ]  # fmt: skip
    result = launch(BACKENDS[backend], ["-m", "trl_sharpen.cli"], args)
    assert result.returncode == 0, failure_output(result)
    for rank in (0, 1):
        assert f"Best-of-N on process {rank} of 2: 2 of 4 shards to sample (8 prompts)" in result.stderr
    assert result.stdout.count("Best-of-N: 16 prompts, 64 samples") == 1
    bon = load_from_disk(str(tmp_path))
    assert bon["prompt_index"] == list(range(16))
    assert not list((tmp_path / "shards").glob(".tmp-*"))

    model = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH)
    single = best_of_n(
        model,
        AutoTokenizer.from_pretrained(TOY_MODEL_PATH),
        load_toy_prompts("test", limit=16),
        4,
        max_new_tokens=40,
        shard_size=4,
        progress=False,
    )
    assert bon["completion_ids"] == single["completion_ids"]
    assert bon["selected_index"] == single["selected_index"]


def test_zero3_lora_with_partitioned_generation(tmp_path):
    """ZeRO-3 + LoRA, pi_base samples from the adapter-disabled policy without gathering the weights
    (`ds3_gather_for_generation: false`, for models too large to gather): generation must run synced across the
    processes (it crashed on a collective mismatch before), and only the adapter is saved."""
    recipe = next(recipe for recipe in RECIPES if recipe.name == "dpo_sharpen")
    extra = ["--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "--sample_from", "base",
             "--ds3_gather_for_generation", "false", "--save_strategy", "no", "--report_to", "none",
             "--eval_strategy", "no", "--load_best_model_at_end", "false"]  # fmt: skip
    result = launch(*recipe_command(recipe, "zero3", tmp_path, *extra))
    assert result.returncode == 0, failure_output(result)
    ranks = rank_lines(result.stdout)
    assert [(rank, backend, steps) for rank, _, backend, steps, _ in ranks] == [
        (0, EXPECTED_BACKEND["zero3"], STEPS),
        (1, EXPECTED_BACKEND["zero3"], STEPS),
    ]
    assert len({digest for *_, digest in ranks}) == 1
    assert (tmp_path / "adapter_model.safetensors").exists() and not (tmp_path / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------- bad input
def test_more_processes_than_devices_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"starts 8 processes on this machine, but it has 2 GPU.*--num_processes 2"):
        check_processes_fit(8, 2, "GPU devices")
    check_processes_fit(2, 2, "GPU devices")


def test_launch_with_more_processes_than_cpu_cores_fails_clearly(tmp_path):
    """On a machine without GPUs a device is a CPU core: a GPU config's process count is refused before any work."""
    cores = len(os.sched_getaffinity(0))
    result = launch(
        ["--config_file", "accelerate_configs/cpu_2proc.yaml", "--num_processes", str(cores + 1)],
        ["-m", "trl_sharpen.cli"],
        [*BON_ARGS, "--output_dir", str(tmp_path)],
    )
    assert result.returncode != 0
    assert f"starts {cores + 1} processes on this machine, but it has {cores} CPU cores" in result.stderr
    assert not (tmp_path / "shards").exists()


BON_ARGS = ["bon", "--model_name_or_path", TOY_MODEL_PATH, "--dataset_name", f"{TOY_DATA_DIR}/test.jsonl"]
TRL_FSDP2_CONFIG = str(Path(trl.__file__).parent / "accelerate_configs" / "fsdp2.yaml")


@pytest.mark.parametrize(
    "launch_args, env, message",
    [
        # ACCELERATE_USE_CPU, as some CPU guides suggest, would silently turn DeepSpeed off while ZeRO-3 weights load
        # partitioned ("'weight' must be 2-D" at the first generation)
        (BACKENDS["zero3"], {"ACCELERATE_USE_CPU": "1"}, "ACCELERATE_USE_CPU is set in a DeepSpeed launch"),
        # TRL's own FSDP2 config: generation on FSDP-sharded weights would deadlock
        (["--config_file", TRL_FSDP2_CONFIG, "--num_processes", "2", "--mixed_precision", "no"], {},
         "FSDP is not supported by the trl_sharpen trainers"),
    ],
    ids=["deepspeed-with-ACCELERATE_USE_CPU", "trl-fsdp2-config"],
)  # fmt: skip
def test_unsupported_launch_settings_fail_clearly(launch_args, env, message, tmp_path):
    result = launch(launch_args, ["-m", "trl_sharpen.cli"], [*BON_ARGS, "--output_dir", str(tmp_path)], env=env)
    assert result.returncode != 0 and message in result.stderr, failure_output(result)
    assert not (tmp_path / "shards").exists()


def test_training_config_without_use_cpu_is_refused_on_cpu_processes(monkeypatch):
    from trl_sharpen import SelfRewardDPOConfig
    from trl_sharpen.distributed import check_training_args

    if torch.accelerator.is_available():
        pytest.skip("the check concerns machines without GPUs")
    args = SelfRewardDPOConfig(output_dir="unused", bf16=False, use_cpu=True)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as `accelerate launch` sets it
    check_training_args(args)
    args.use_cpu = False
    with pytest.raises(ValueError, match="each process would train alone.*use_cpu: true"):
        check_training_args(args)
