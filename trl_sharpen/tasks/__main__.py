"""Write a task's train and test splits as jsonl (`prompt`, `answer` and metadata columns).

python -m trl_sharpen.tasks arithmetic --level add2 --form few_shot --output_dir data/add2_few_shot
python -m trl_sharpen.tasks prontoqa --form chat --depths 1 2 3 --num_test 60 --output_dir data/prontoqa_chat
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import check_output_dir
from . import TASKS, check_sizes, extractor_path, generate_task
from .arithmetic import LEVELS, MIXTURES
from .common import FORMS, STOP_STRINGS, write_splits
from .prontoqa import DEPTHS


def check_overwrite(splits: dict[str, list[dict]], output_dir: str, overwrite: bool) -> None:
    """A split file that exists with other content is someone's data (or another task's): refuse to replace it
    unless asked. The same file again (the same command) is fine."""
    for name, rows in splits.items():
        path = Path(output_dir) / f"{name}.jsonl"
        if path.exists() and not overwrite and path.read_text() != "".join(json.dumps(row) + "\n" for row in rows):
            raise ValueError(f"{path} already exists with other content: pass another --output_dir, or --overwrite.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trl_sharpen.tasks", description=__doc__.strip().splitlines()[0])
    parser.add_argument("task", choices=list(TASKS))
    parser.add_argument("--output_dir", required=True, help="Folder for train.jsonl and test.jsonl.")
    parser.add_argument("--form", choices=FORMS, default="chat", help="chat (instruct models) or few_shot (base).")
    parser.add_argument("--num_train", type=int, default=None, help="Train examples (task default if unset).")
    parser.add_argument("--num_test", type=int, default=None, help="Test examples (task default if unset).")
    parser.add_argument("--num_shots", type=int, default=None, help="Examples in each few-shot prompt.")
    parser.add_argument("--seed", type=int, default=0, help="Generator seed (same seed, same files).")
    parser.add_argument(
        "--level", choices=[*LEVELS, *MIXTURES], default="add2", help="arithmetic: difficulty level or mixture."
    )
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS), help="prontoqa: proof depths.")
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace train.jsonl / test.jsonl that hold other examples."
    )
    args = parser.parse_args(argv)
    options = {"form": args.form, "seed": args.seed}
    for name in ("num_train", "num_test", "num_shots"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.task == "arithmetic":
        options["level"] = args.level
    else:
        options["depths"] = tuple(args.depths)
    try:
        check_sizes(num_train=args.num_train, num_test=args.num_test, num_shots=args.num_shots)
        check_output_dir(args.output_dir)  # not '', '.', home or /; a folder we can write
        splits = generate_task(args.task, **options)
        check_overwrite(splits, args.output_dir, args.overwrite)
    except ValueError as error:
        parser.error(str(error))
    for path in write_splits(splits, args.output_dir):
        print(f"wrote {path}")
    print(f"answer extractor: --answer_extractor {extractor_path(args.task)}")
    if args.form == "few_shot":
        print(f"few-shot completions end at the stop strings {list(STOP_STRINGS)}")


if __name__ == "__main__":
    main()
