"""Real tasks with reference answers, generated offline: graded arithmetic and ProntoQA-style deduction.

Each task has a deterministic (seeded) generator with disjoint train and test splits, a chat form (one user message,
for instruct models) and a few-shot form (a plain-text k-shot prompt for base models, ending at a stop string), and
an answer extractor usable wherever trl_sharpen takes one:

    python -m trl_sharpen.tasks prontoqa --form chat --output_dir data/prontoqa_chat
    trl-sharpen eval --model_name_or_path ... --dataset_name data/prontoqa_chat/test.jsonl \\
        --answer_extractor trl_sharpen.tasks.prontoqa:extract_answer

`TASKS` maps a task name to its module; `generate_task(name, **options)` returns `{"train": rows, "test": rows}`.
"""

from __future__ import annotations

from types import ModuleType

from . import arithmetic, prontoqa
from .common import FORMS, STOP_STRINGS, cut_at_stop


TASKS: dict[str, ModuleType] = {"arithmetic": arithmetic, "prontoqa": prontoqa}


def get_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}: use one of {', '.join(TASKS)}.")
    return TASKS[name]


# Far above any evaluation or training set here (the defaults are 50-500); a typo like 1000000000 would otherwise run
# for hours before writing anything
MAX_EXAMPLES = 100_000


def check_sizes(**sizes) -> None:
    """`num_train` / `num_test` must be whole numbers in [1, MAX_EXAMPLES]; `num_shots` in [0, 64]."""
    for option, value in sizes.items():
        low, high = (0, 64) if option == "num_shots" else (1, MAX_EXAMPLES)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            shown = f"{value:.3g}" if isinstance(value, (int, float)) and abs(value) >= 1e9 else repr(value)
            raise ValueError(f"--{option} must be a whole number from {low} to {high:,}, got {shown}.")


def generate_task(name: str, **options) -> dict[str, list[dict]]:
    check_sizes(**{key: options.get(key) for key in ("num_train", "num_test", "num_shots")})
    return get_task(name).generate(**options)


def extractor_path(name: str) -> str:
    """The `--answer_extractor` value of a task, e.g. `trl_sharpen.tasks.prontoqa:extract_answer`."""
    return f"{get_task(name).__name__}:extract_answer"


__all__ = ["FORMS", "STOP_STRINGS", "TASKS", "cut_at_stop", "extractor_path", "generate_task", "get_task"]
