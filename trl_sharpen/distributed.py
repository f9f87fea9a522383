"""Launching runs (`accelerate launch`, recipes): clear errors for launch and model settings that would otherwise fail
obscurely or silently run something else, and the one workaround machines without GPUs need. Recipes parse their
arguments with `parse_args_and_config` (which runs every check), code that runs without a `Trainer`
(`trl-sharpen bon`) gets its processes from `distributed_state`, and `print_rank_summary` says what each rank ran.

What accelerate 1.15 / transformers 5 / DeepSpeed 0.19 do with 2 processes on a machine without GPUs (checked):

- DDP: `distributed_type: MULTI_GPU` (accelerate_configs/cpu_2proc.yaml) starts 2 ranks; the training config's
  `use_cpu: true` makes transformers create a gloo process group. Without it each rank finds no GPU backend,
  believes it is alone and trains its own copy into the same output_dir: refused.
- DeepSpeed ZeRO-2/3: the same `use_cpu: true` gives DeepSpeed that gloo group (it runs on its CPU accelerator).
  `ACCELERATE_USE_CPU=1` must *not* be set: accelerate then turns DeepSpeed off without a word while transformers
  still loads ZeRO-3-partitioned weights (generation fails with "'weight' must be 2-D"; ZeRO-2 quietly runs DDP).
- Without a `Trainer`, `PartialState()` under the DeepSpeed launcher also finds no GPU backend and reports one process
  on every rank (each rank would sample every Best-of-N shard): `PartialState(cpu=True)` creates the gloo group.
  This is the CPU-only workaround, applied by `distributed_state` only when there is no GPU.
- FSDP: accelerate does not enable it for CPU processes (they silently run DDP), so it cannot be tested here, and
  the trainers generate step by step on each rank without syncing the forward passes FSDP's all-gathers need:
  refused, with ZeRO-3 as the sharded alternative.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
from accelerate import PartialState

from .errors import check_lora_options, check_text_fields
from .fingerprints import trainable_weights_digest


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _has_accelerator() -> bool:
    return torch.accelerator.is_available()


def available_devices() -> tuple[int, str]:
    """What one process per device means here: the visible GPUs (or other accelerators), else the usable CPU cores."""
    if _has_accelerator():
        return torch.accelerator.device_count(), f"{torch.accelerator.current_accelerator().type.upper()} devices"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores, "CPU cores"


def check_processes_fit(local_processes: int, devices: int, kind: str) -> None:
    """One process per device: more GPU processes than GPUs fail deep in CUDA ("invalid device ordinal"); more CPU
    processes than cores (a GPU config's `num_processes: 8` on a laptop) multiply the memory and thrash the cores."""
    if local_processes > devices:
        raise ValueError(
            f"The launch starts {local_processes} processes on this machine, but it has {devices} {kind}: use one "
            f"process per device, e.g. `accelerate launch --num_processes {devices} ...` (set `num_processes` in the "
            "accelerate config; on a machine without GPUs accelerate_configs/cpu_2proc.yaml runs 2 processes)."
        )


def check_launch() -> None:
    """Checks on the `accelerate launch` settings, run before the training config claims a device."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_processes > 1:
        check_processes_fit(local_processes, *available_devices())
    if _env_flag("ACCELERATE_USE_FSDP"):
        raise ValueError(
            "FSDP is not supported by the trl_sharpen trainers: they generate on every rank each step, and FSDP's "
            "per-layer all-gathers deadlock when ranks run different numbers of forward passes. To shard a model, "
            "use DeepSpeed ZeRO-3 (accelerate_configs/deepspeed_zero3.yaml), which gathers the weights for generation."
        )
    if _env_flag("ACCELERATE_USE_DEEPSPEED") and _env_flag("ACCELERATE_USE_CPU"):
        raise ValueError(
            "ACCELERATE_USE_CPU is set in a DeepSpeed launch: accelerate then silently disables DeepSpeed while "
            "transformers still loads ZeRO-3-partitioned weights. "
            "Unset it; on a machine without GPUs put `use_cpu: true` in the training config instead (the toy recipes "
            "do), which runs DeepSpeed on its CPU accelerator."
        )


def check_training_args(args) -> None:
    """Checks on a training config for the processes it was launched with."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator() and not args.use_cpu:
        raise ValueError(
            "Several processes were launched on a machine without GPUs, but the training config has use_cpu=False: "
            "each process would train alone, all writing to the same output_dir. Set `use_cpu: true` in the training "
            "config (or pass `--use_cpu true`)."
        )


def check_model_args(model_args) -> None:
    """Checks on TRL's `ModelConfig` before any model is loaded: quantized loading (`--load_in_4bit` /
    `--load_in_8bit`, QLoRA) needs bitsandbytes, and 4-bit loading does not train on CPU; LoRA options need
    `--use_peft`."""
    check_lora_options(model_args)
    if not (getattr(model_args, "load_in_4bit", False) or getattr(model_args, "load_in_8bit", False)):
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "--load_in_4bit / --load_in_8bit (QLoRA) need bitsandbytes, which is not installed: "
            'pip install "trl-sharpen[quantization]"'
        )
    if model_args.load_in_4bit and not _has_accelerator():
        # Checked with bitsandbytes 0.50 on a CPU with AVX512-BF16: the first eval-mode forward (our trainers generate
        # before and during training) repacks each Linear4bit weight into an inference-only CPU layout, and every
        # gradient through it is zero from then on: the adapter would silently never change.
        raise ValueError(
            "--load_in_4bit (QLoRA) does not train on CPU: bitsandbytes repacks 4-bit weights for CPU inference at the "
            "first generation, after which no gradient reaches the LoRA adapter. Use a GPU, or LoRA without "
            "--load_in_4bit (--use_peft)."
        )


def parse_args_and_config(parser, args=None):
    """`TrlParser.parse_args_and_config` for recipes, with the launch checks around it: `check_launch` before the
    training config is created (creating it claims a device), `check_training_args` and `check_model_args` after."""
    check_launch()
    parsed = parser.parse_args_and_config(args)
    check_text_fields(*parsed)  # YAML values of the wrong type that argparse never sees
    for value in parsed:
        if hasattr(value, "use_cpu") and hasattr(value, "output_dir"):  # the TrainingArguments
            check_training_args(value)
        if hasattr(value, "load_in_4bit"):  # TRL's ModelConfig
            check_model_args(value)
    return parsed


def distributed_state() -> PartialState:
    """The processes of this launch, for code that runs without a `Trainer`. On a machine without GPUs, accelerate
    sets up the gloo process group only when asked for the CPU (under the DeepSpeed launcher it would otherwise report
    one process on every rank); with GPUs this is plain `PartialState()`."""
    check_launch()
    return PartialState(cpu=not _has_accelerator())


def rank_summary(trainer) -> str:
    """One line per rank after training: its backend (so that a silent fallback, e.g. DeepSpeed quietly disabled,
    shows), its optimizer steps, and the digest of its trainable weights. Collective under ZeRO-3: call it on all
    ranks."""
    accelerator = trainer.accelerator
    backend = accelerator.distributed_type.value
    if trainer.is_deepspeed_enabled:
        backend += f" ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    digest = trainable_weights_digest(accelerator.unwrap_model(trainer.model_wrapped))
    return (
        f"[rank {accelerator.process_index}/{accelerator.num_processes}] {backend} "
        f"({type(trainer.model_wrapped).__name__}): {trainer.state.global_step} optimizer steps, "
        f"trainable weights {digest}"
    )


def print_rank_summary(trainer) -> None:
    """Print `rank_summary` on every rank, as one write so that the ranks' lines do not interleave."""
    line = rank_summary(trainer)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
