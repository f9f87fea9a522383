"""GRPO on the poor-coverage toy base with the label-free monitoring on (issue 20): does rise-then-fall appear, and does
label-free selection keep >= 90% of the best accuracy seen? benchmarks/iterate_selection.py's study (its table, its
selection signals, its plot), with `SelfRewardGRPOTrainer` instead of XPO.

    python benchmarks/grpo_iterate_selection.py            # benchmarks/results/iterate_selection_grpo.{md,json,png}

Each configuration trains from the same base and seed; every `--eval_steps` steps the Trainer evaluates on held-out
prompts (train rows 900-999, no answers: J_beta, delta, distinct answers, ...), saves a checkpoint, and keeps the
best by `metric_for_best_model: objective` (Algorithm 1's argmax_t J_beta); greedy accuracy on the 200 test prompts
is measured at every evaluation by a callback, for scoring only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from iterate_selection import (  # benchmarks/ is on sys.path when a script here runs
    POOR_COVERAGE_BASE,
    RESULTS,
    ScoreWithLabels,
    comparison,
    per_evaluation,
    plot,
    table,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_sharpen import SelfRewardGRPOConfig, SelfRewardGRPOTrainer
from trl_sharpen.evaluation import evaluate_greedy
from trl_sharpen.toy import load_toy_prompts


MAX_COMPLETION_LENGTH = 48
CONFIGS = {
    "GRPO logprob beta=0": {"self_reward": "logprob", "beta": 0.0},
    "GRPO logprob beta=0.1": {"self_reward": "logprob", "beta": 0.1},
    "GRPO majority beta=0": {"self_reward": "majority", "beta": 0.0},
}


def run_config(name, settings, args, tokenizer, prompts, heldout, test) -> dict:
    transformers.set_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.base)
    scorer = ScoreWithLabels(tokenizer, test)
    with tempfile.TemporaryDirectory() as output_dir:
        config = SelfRewardGRPOConfig(
            output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", disable_tqdm=True, seed=args.seed,
            learning_rate=args.learning_rate, lr_scheduler_type="constant", per_device_train_batch_size=args.batch,
            num_generations=4, max_completion_length=MAX_COMPLETION_LENGTH, max_steps=args.max_steps,
            gradient_checkpointing=False, logging_steps=args.eval_steps, eval_strategy="steps",
            eval_steps=args.eval_steps, eval_on_start=True, save_strategy="steps", save_steps=args.eval_steps,
            save_only_model=True, save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="objective",
            eval_beta=0.1, eval_num_prompts=len(heldout), eval_num_samples=args.eval_num_samples,
            per_device_eval_batch_size=100, **settings,
        )  # fmt: skip
        trainer = SelfRewardGRPOTrainer(
            model=model, args=config, train_dataset=prompts, eval_dataset=heldout, processing_class=tokenizer,
            callbacks=[scorer],
        )  # fmt: skip
        began = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - began
        restored = evaluate_greedy(
            trainer.model, tokenizer, test["prompt"], test["answer"], max_new_tokens=MAX_COMPLETION_LENGTH
        ).accuracy
    evaluations = [
        {key.removeprefix("eval_"): value for key, value in entry.items()}
        for entry in trainer.state.log_history
        if "eval_objective" in entry
    ]
    for entry in evaluations:
        entry["accuracy"] = scorer.accuracy[entry["step"]]
    cost = trainer.last_evaluation_cost
    return {
        # "beta": the J_beta beta of the logged objective (eval_beta), which iterate_selection's tables read
        "name": name, "seed": args.seed, "settings": {"beta": 0.1, "trained_with": settings}, "evaluations": evaluations,
        "best_global_step": trainer.state.best_global_step, "restored_accuracy": restored, "train_seconds": seconds,
        "evaluation_cost": cost.describe() if cost else None,
    }  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(POOR_COVERAGE_BASE))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max_steps", type=int, default=160)
    parser.add_argument("--eval_steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32, help="Completions per step (batch / 4 prompts).")
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--eval_num_samples", type=int, default=4)
    parser.add_argument("--num_prompts", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=100)
    parser.add_argument("--output", default=str(RESULTS / "iterate_selection_grpo"))
    parser.add_argument("--from_json", help="Redraw the table and plot from a saved JSON instead of running.")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        write(output, saved["command"], saved["notes"], saved["runs"])
        return
    torch.set_num_threads(1)
    logging.disable(logging.INFO)
    transformers.utils.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    train = load_toy_prompts("train")
    prompts = train.select(range(args.num_prompts))
    heldout = train.select(range(900, 900 + args.heldout)).remove_columns("answer")
    test = load_toy_prompts("test")
    runs, start = [], time.perf_counter()
    for name in args.configs:
        with contextlib.redirect_stdout(sys.stderr):
            runs.append(run_config(name, CONFIGS[name], args, tokenizer, prompts, heldout, test))
        print(f"{name}: {json.dumps(runs[-1])}", flush=True)
    command = "python benchmarks/grpo_iterate_selection.py " + " ".join(sys.argv[1:] if argv is None else argv)
    notes = (
        f"Base `{Path(args.base).name}`; seed {args.seed}; {args.max_steps} steps of {args.batch} completions "
        f"({args.batch // 4} prompts x 4 generations) from {args.num_prompts} training prompts; learning rate "
        f"{args.learning_rate} constant; J_beta with beta 0.1 (eval_beta); evaluation every {args.eval_steps} steps on "
        f"{args.heldout} held-out prompts with k = {args.eval_num_samples}; accuracy = greedy accuracy on the 200 test "
        f"prompts (scoring only). Cost of one evaluation: {runs[-1]['evaluation_cost']}. Total "
        f"{(time.perf_counter() - start) / 60:.1f} min, 1 torch thread, on a shared 2-core CPU."
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps({"command": command, "notes": notes, "runs": runs}, indent=1))
    write(output, command, notes, runs)


def write(output: Path, command: str, notes: str, runs: list[dict]) -> None:
    text = table(runs, 0.1)
    output.with_suffix(".md").write_text(
        f"# GRPO: iterate selection without labels\n\n`{command.strip()}`\n\n{text}\n\n"
        f"Selection signals, as a share of the best accuracy seen:\n\n{comparison(runs)}\n\n{notes}\n\n"
        f"![metrics vs step]({output.with_suffix('.png').name})\n\n## Every evaluation\n\n{per_evaluation(runs)}\n",
        encoding="utf-8",
    )
    plot(runs, output.with_suffix(".png"))
    print(text + "\n\n" + comparison(runs))


if __name__ == "__main__":
    main()
