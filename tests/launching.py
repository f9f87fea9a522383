"""Launching the recipes and `trl-sharpen bon` with `accelerate launch` exactly as the README does, on CPU processes.

The README's GPU commands become the tested CPU commands by swapping the accelerate config:

| backend | GPU (README)                            | CPU (tests, 2 processes)                                  |
|---------|-----------------------------------------|-----------------------------------------------------------|
| ddp     | accelerate_configs/multi_gpu.yaml       | accelerate_configs/cpu_2proc.yaml                         |
| zero2   | accelerate_configs/deepspeed_zero2.yaml | the same file + `--num_processes 2 --mixed_precision no`  |
| zero3   | accelerate_configs/deepspeed_zero3.yaml | the same file + `--num_processes 2 --mixed_precision no`  |

and the recipe's toy YAML (`use_cpu: true`, `bf16: false`) for its GPU YAML; the tiny overrides below only shrink the
run. The DeepSpeed files are run as shipped (only the process count and precision are overridden), so the tested
`deepspeed_config` block is the one users get.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]

BACKENDS = {
    "ddp": ["--config_file", "accelerate_configs/cpu_2proc.yaml"],
    "zero2": ["--config_file", "accelerate_configs/deepspeed_zero2.yaml", "--num_processes", "2", "--mixed_precision", "no"],
    "zero3": ["--config_file", "accelerate_configs/deepspeed_zero3.yaml", "--num_processes", "2", "--mixed_precision", "no"],
}  # fmt: skip
# What `rank_summary` must report per backend: a silent fallback (e.g. DeepSpeed quietly off) fails the tests
EXPECTED_BACKEND = {
    "ddp": "MULTI_CPU (DistributedDataParallel)",
    "zero2": "DEEPSPEED ZeRO-2 (DeepSpeedEngine)",
    "zero3": "DEEPSPEED ZeRO-3 (DeepSpeedEngine)",
}

# 16 prompts, 4 per process and step: with 2 processes one epoch is 2 optimizer steps
NUM_PROMPTS, BATCH, STEPS, SAVE_STEPS = 16, 4, 4, 2
TINY = [
    "--num_train_prompts", str(NUM_PROMPTS),
    "--per_device_train_batch_size", str(BATCH),
    "--max_steps", str(STEPS),
    "--logging_steps", "1",
    "--save_strategy", "steps",
    "--save_steps", str(SAVE_STEPS),
    "--num_eval_prompts", "8",
    "--report_to", "tensorboard",
]  # fmt: skip


@dataclass(frozen=True)
class Recipe:
    name: str
    method_tag: str  # the trainer's model-card tag
    overrides: tuple[str, ...] = ()  # the recipe's own tiny settings
    backends: tuple[str, ...] = ("ddp", "zero2", "zero3")  # those of BACKENDS its distributed test runs
    resume: bool = True  # whether tests/test_resume.py relaunches its ZeRO-3 run from checkpoint-2

    @property
    def script(self) -> str:
        return f"recipes/{self.name}.py"

    @property
    def toy_yaml(self) -> str:
        return f"recipes/{self.name}/toy_cpu.yaml"

    def exists(self) -> bool:
        return (REPO / self.script).exists() and (REPO / self.toy_yaml).exists()


GROUPS_OF_4 = ("--per_device_train_batch_size", "16", "--num_generations", "4")

# A recipe takes part in every recipe test once its script and toy YAML exist
RECIPES = [
    # 4 shards of 4 prompts: each process samples 2
    Recipe("sft_sharpen", "sft-sharpening", ("--num_samples", "4", "--bon_shard_size", "4")),
    Recipe("dpo_sharpen", "rlhf-sharpening"),
    Recipe("xpo_sharpen", "xpo"),
    # GRPO/RLOO batches count completions: 16 = 4 prompts x 4 generations per process and step, as BATCH prompts above.
    # ZeRO-3 only, for CI time: GRPO as its YAML has it (beta 0: a frozen pi_base copy, partitioned, for the reward
    # and the monitoring; its resume test reuses the launch), RLOO with log pi_base from TRL's reference pass and no
    # resume (the same mixin; its sampler reseeding was checked by hand). Majority with groups split across the
    # processes, under ZeRO-2 and ZeRO-3: tests/test_grpo_distributed.py
    Recipe("grpo_sharpen", "rlhf-sharpening", GROUPS_OF_4, backends=("zero3",)),
    Recipe("rloo_sharpen", "rlhf-sharpening", GROUPS_OF_4, backends=("zero3",), resume=False),
]


def free_port() -> int:
    """A free TCP port for the launch's rendezvous: other runs on this machine may hold accelerate's default."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_executable() -> str:
    candidate = Path(sys.executable).parent / "accelerate"
    return str(candidate) if candidate.exists() else "accelerate"


def launch(launch_args, target, args, timeout=600, env=None) -> subprocess.CompletedProcess:
    """`accelerate launch <launch_args> <target> <args>` from the repository root, as a user runs it."""
    command = [
        accelerate_executable(),
        "launch",
        *launch_args,
        "--main_process_port",
        str(free_port()),
        *target,
        *args,
    ]
    return subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def recipe_command(recipe: Recipe, backend: str, output_dir, *extra) -> tuple[list, list, list]:
    return BACKENDS[backend], [recipe.script], ["--config", recipe.toy_yaml, *TINY, *recipe.overrides,
                                                 "--output_dir", str(output_dir), *extra]  # fmt: skip


def launch_recipe(recipe: Recipe, backend: str, output_dir, *extra) -> subprocess.CompletedProcess:
    return launch(*recipe_command(recipe, backend, output_dir, *extra))


# Not anchored: a recipe that prints the line with `print` may interleave it with the other rank's
RANK_LINE = re.compile(r"\[rank (\d+)/(\d+)\] ([^:\[]+?): (\d+) optimizer steps, trainable weights ([0-9a-f]{12})")


def rank_lines(stdout: str) -> list[tuple[int, int, str, int, str]]:
    """The `rank_summary` lines: (rank, processes, backend, steps, weights digest), by rank."""
    return sorted((int(r), int(n), b, int(s), d) for r, n, b, s, d in RANK_LINE.findall(stdout))


def failure_output(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"


def load_recipe(script: Path):
    """A recipe script as a module (its `main`, `make_parser`), without running it."""
    spec = importlib.util.spec_from_file_location(f"recipe_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_yamls(name: str) -> list[Path]:
    return sorted((REPO / "recipes" / name).glob("*.yaml"))


def parse_recipe_yaml(yaml_path: Path) -> tuple:
    """(script args, training args, model args) of a recipe YAML, parsed by its own script's parser (unknown keys are
    errors). `--use_cpu` lets a GPU YAML's bf16 validate on a machine without GPUs; everything else is the YAML's."""
    recipe = load_recipe(yaml_path.parent.with_suffix(".py"))
    return recipe.make_parser().parse_args_and_config(["--config", str(yaml_path), "--use_cpu", "true"])


def yaml_values_not_applied(yaml_path: Path, parsed: tuple) -> dict:
    """The keys of a recipe YAML whose value did not reach every parsed dataclass that has the field (read by
    another dataclass only, or changed by a `__post_init__`), as {key: (YAML value, parsed values)}; {} when all did."""
    import enum

    import yaml

    def same(parsed_value, value) -> bool:
        if isinstance(parsed_value, enum.Enum):
            parsed_value = parsed_value.value
        if value == "none" and parsed_value == []:  # report_to: none
            return True
        if isinstance(parsed_value, (list, tuple)):
            values = value if isinstance(value, (list, tuple)) else [value]
            return len(parsed_value) == len(values) and all(map(same, parsed_value, values))
        if isinstance(parsed_value, (int, float)) and not isinstance(parsed_value, bool):
            try:  # YAML reads 1e-3 as a string; the parser makes it a float
                return not isinstance(value, bool) and float(parsed_value) == float(value)
            except (TypeError, ValueError):
                return False
        return parsed_value == value

    not_applied = {}
    for key, value in yaml.safe_load(yaml_path.read_text()).items():
        found = [getattr(arguments, key) for arguments in parsed if hasattr(arguments, key)]
        if not found or not all(same(parsed_value, value) for parsed_value in found):
            not_applied[key] = (value, found)
    return not_applied


ACCURACY_LINE = re.compile(r"^\[(before|after)\] greedy accuracy on 200 test prompts: ([\d.]+)", re.M)


def launch_toy_recipe(name: str, output_dir, *extra) -> dict[str, float]:
    """`accelerate launch recipes/<name>.py --config recipes/<name>/toy_cpu.yaml`, the README's command (one process);
    returns the greedy accuracies it printed before and after training."""
    args = ["--config", f"recipes/{name}/toy_cpu.yaml", "--output_dir", str(output_dir), *extra]
    result = launch([], [f"recipes/{name}.py"], args)
    assert result.returncode == 0, failure_output(result)
    accuracy = {when: float(value) for when, value in ACCURACY_LINE.findall(result.stdout)}
    assert set(accuracy) == {"before", "after"}, failure_output(result)
    return accuracy


_CACHE: dict = {}


def launched_recipe(recipe: Recipe, backend: str, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One launch per (recipe, backend) per test session, shared by the distributed and resume tests; callers that
    change the output directory work on a copy (`copy_run`)."""
    key = (recipe.name, backend)
    if key not in _CACHE:
        output_dir = tmp_path_factory.mktemp(f"{recipe.name}-{backend}")
        _CACHE[key] = (launch_recipe(recipe, backend, output_dir), output_dir)
    return _CACHE[key]


def copy_run(output_dir: Path, destination: Path) -> Path:
    shutil.copytree(output_dir, destination)
    return destination
