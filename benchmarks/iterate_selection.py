"""Can the paper's objective J_beta pick a good iterate without labels? (issue 14; Algorithm 1 returns argmax_t J_beta)

The coverage experiment (benchmarks/results/coverage_experiment.md) has XPO configurations that rise and then
collapse on the poor-coverage toy base. This script reruns them with the label-free monitoring of
`trl_sharpen.monitoring` on, through the Trainer's own machinery only:

- `eval_dataset` = held-out prompts (toy train split rows 900-999, never trained on; no answers), evaluated every
  `--eval_steps` steps: J_beta, E_pi[log pi_base], KL, distinct answers, ... (`eval_*`);
- `metric_for_best_model: objective` + `load_best_model_at_end: true`: the Trainer keeps argmax_t J_beta(pi_t);
- labels only score: a callback measures greedy accuracy on the 200 test prompts at every evaluation, which never
  enters selection.

For each configuration the table gives the greedy accuracy of the last iterate, of the J_beta-selected iterate (the
model `load_best_model_at_end` restored, re-scored after training as a check), and the best accuracy seen at any
evaluation; and the same selection by other label-free signals computed from the logged metrics (J_beta with other
beta from E[log pi_base] and KL; greedy log pi_base; most distinct answers).

    python benchmarks/iterate_selection.py                     # the table and plot in benchmarks/results/
    python benchmarks/iterate_selection.py --from_json benchmarks/results/iterate_selection.json   # redraw only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402

from trl_sharpen import XPOConfig, XPOTrainer  # noqa: E402
from trl_sharpen.evaluation import evaluate_greedy  # noqa: E402
from trl_sharpen.toy import load_toy_prompts  # noqa: E402


REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
POOR_COVERAGE_BASE = REPO / "trl_sharpen" / "toy" / "base_model_poor_coverage"
MAX_COMPLETION_LENGTH = 48
BATCH = 32
# The coverage experiment's configurations whose accuracy fell with more steps (its seeds 1 and 2 show it for all three)
CONFIGS = {
    "XPO (sharpen) alpha=0": {"loss_type": "sharpen", "alpha": 0.0},
    "XPO (sigmoid) alpha=1": {"loss_type": "sigmoid", "alpha": 1.0},
    "XPO (sharpen) alpha=1": {"loss_type": "sharpen", "alpha": 1.0},
}
ALTERNATIVE_BETAS = (0.0, 1.0)


class ScoreWithLabels(TrainerCallback):
    """Greedy test accuracy at every evaluation: labels score, they never select."""

    def __init__(self, tokenizer, test):
        self.tokenizer, self.test, self.accuracy = tokenizer, test, {}

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        result = evaluate_greedy(
            model, self.tokenizer, self.test["prompt"], self.test["answer"], max_new_tokens=MAX_COMPLETION_LENGTH,
            batch_size=200,
        )  # fmt: skip
        self.accuracy[state.global_step] = result.accuracy


def run_config(name: str, settings: dict, args, tokenizer, prompts, heldout, test) -> dict:
    transformers.set_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.base)
    scorer = ScoreWithLabels(tokenizer, test)
    with tempfile.TemporaryDirectory() as output_dir:
        config = XPOConfig(
            output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", disable_tqdm=True, seed=args.seed,
            learning_rate=1e-3, lr_scheduler_type="constant", per_device_train_batch_size=BATCH,
            max_completion_length=MAX_COMPLETION_LENGTH, max_steps=args.max_steps, logging_steps=args.eval_steps,
            eval_strategy="steps", eval_steps=args.eval_steps, eval_on_start=True,
            save_strategy="steps", save_steps=args.eval_steps, save_only_model=True, save_total_limit=2,
            load_best_model_at_end=True, metric_for_best_model="objective",
            eval_num_prompts=len(heldout), eval_num_samples=args.eval_num_samples, per_device_eval_batch_size=100,
            **settings,
        )  # fmt: skip
        trainer = XPOTrainer(
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
        "name": name,
        "seed": args.seed,
        "settings": settings,
        "evaluations": evaluations,
        "best_global_step": trainer.state.best_global_step,
        "restored_accuracy": restored,
        "train_seconds": seconds,
        "evaluation_cost": cost.describe() if cost else None,
    }


def select(evaluations: list[dict], score) -> dict:
    """The evaluation with the highest label-free `score` (first on ties). Step 0 (pi_base) is a candidate when the
    run logged the retention metrics (the code that saves the base as checkpoint-0); older runs had no step-0
    checkpoint to restore."""
    base_is_candidate = "base_majority_agreement" in evaluations[0]
    candidates = [entry for entry in evaluations if entry["step"] > 0 or base_is_candidate]
    return max(candidates, key=score)


def retention_gated(score):
    """`score`, but an evaluation the collapse alarm's retention rules would flag (top-answer share >= pi_base's +
    0.25, or base-majority agreement below half its first value) ranks below every unflagged one."""

    def gated(entry):
        return (not entry.get("_flagged", False), score(entry))

    return gated


def flag_retention(evaluations: list[dict], rise: float = 0.25, drop: float = 0.5) -> None:
    """Mark the evaluations the retention alarm fires on (the defaults of `collapse_top_answer_rise` and
    `collapse_agreement_drop`)."""
    if "base_majority_agreement" not in evaluations[0]:
        return
    first = evaluations[0]["base_majority_agreement"]
    for entry in evaluations:
        entry["_flagged"] = (
            entry["top_answer_share"] - entry["base_top_answer_share"] >= rise
            or entry["base_majority_agreement"] < (1 - drop) * first
        )


def signals_for(beta: float) -> dict:
    """The label-free selection signals compared (higher score = selected)."""
    signals = {f"J_beta (beta={beta:g})": lambda e: e["objective"]}
    for other in ALTERNATIVE_BETAS:
        signals[f"J_beta (beta={other:g})"] = lambda e, b=other: e["base_logprob"] - b * e["kl"]
    signals["greedy log pi_base"] = lambda e: e["greedy_base_logprob"]
    signals["lowest delta"] = lambda e: -e["sharpening_error"]
    signals["most distinct answers"] = lambda e: e["distinct_answers"]
    signals["base_majority_agreement"] = lambda e: e.get("base_majority_agreement", float("nan"))
    signals["agreement - delta"] = lambda e: e.get("base_majority_agreement", float("nan")) - e["sharpening_error"]
    signals["lowest delta, alarm-gated"] = retention_gated(lambda e: -e["sharpening_error"])
    return signals


def comparison(runs: list[dict]) -> str:
    """Per signal: the selected iterate's accuracy as a share of the best seen, in every run, and how many runs reach
    the 90% target."""
    beta = runs[0]["settings"].get("beta", 0.1)
    signals = signals_for(beta)
    names = [f"{run['name']} seed {run.get('seed', '?')}" for run in runs]
    lines = ["| signal | " + " | ".join(names) + " | runs >= 0.9 of best | worst share |",
             "|---|" + "---|" * (len(runs) + 2)]  # fmt: skip
    for label, score in signals.items():
        shares = []
        for run in runs:
            flag_retention(run["evaluations"])
            best = max(e["accuracy"] for e in run["evaluations"])
            picked = select(run["evaluations"], score)
            shares.append((picked["accuracy"] / best if best > 0 else float("nan"), picked["step"]))
        cells = [f"{share:.2f} (step {step})" for share, step in shares]
        hits = sum(share >= 0.9 for share, _ in shares)
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {hits} of {len(runs)} | {min(s for s, _ in shares):.2f} |"
        )
    return "\n".join(lines)


def table(runs: list[dict], beta: float) -> str:
    signals = signals_for(beta)
    header = "| configuration | last iterate | J_beta-selected (Trainer, restored) | best seen | selected / best |"
    lines = [header, "|---|---|---|---|---|"]
    alternatives = ["| configuration | " + " | ".join(signals) + " |", "|---|" + "---|" * len(signals)]
    for run in runs:
        flag_retention(run["evaluations"])
        base_is_candidate = "base_majority_agreement" in run["evaluations"][0]
        evaluations = [e for e in run["evaluations"] if e["step"] > 0 or base_is_candidate]
        last, best = evaluations[-1], max(evaluations, key=lambda e: e["accuracy"])
        chosen = next(e for e in evaluations if e["step"] == run["best_global_step"])
        ratio = chosen["accuracy"] / best["accuracy"] if best["accuracy"] > 0 else float("nan")
        lines.append(
            f"| {run['name']} | {last['accuracy']:.3f} (step {last['step']}) | {chosen['accuracy']:.3f} (step "
            f"{chosen['step']}; restored model: {run['restored_accuracy']:.3f}) | {best['accuracy']:.3f} (step "
            f"{best['step']}) | {ratio:.2f} |"
        )
        cells = []
        for score in signals.values():
            picked = select(run["evaluations"], score)
            share = picked["accuracy"] / best["accuracy"] if best["accuracy"] > 0 else float("nan")
            cells.append(f"{picked['accuracy']:.3f} (step {picked['step']}, {share:.2f} of best)")
        alternatives.append(f"| {run['name']} | " + " | ".join(cells) + " |")
    return (
        "\n".join(lines)
        + "\n\nOther label-free signals (selection among the same evaluations):\n\n"
        + "\n".join(alternatives)
    )


def per_evaluation(runs: list[dict]) -> str:
    """Every evaluation's figures (the plot's data), so the table can be checked without rerunning."""
    keys = ["accuracy", "objective", "base_logprob", "kl", "entropy", "greedy_base_logprob", "sharpening_error",
            "distinct_answers", "mean_length", "base_majority_agreement", "top_answer_share"]  # fmt: skip
    blocks = []
    for run in runs:
        lines = [f"**{run['name']}**", "", "| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for entry in run["evaluations"]:
            marker = " (J_beta-selected)" if entry["step"] == run["best_global_step"] else ""
            cells = " | ".join(f"{entry[key]:.3f}" if key in entry else "-" for key in keys)
            lines.append(f"| {entry['step']}{marker} | {cells} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def plot(runs: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    panels = [
        ("greedy test accuracy\n(labels: scoring only)", "accuracy", "tab:green"),
        ("J_beta (eval_objective)", "objective", "tab:blue"),
        ("log pi_base of greedy output\n(eval_greedy_base_logprob)", "greedy_base_logprob", "tab:purple"),
        ("delta at argmax pi_base\n(eval_sharpening_error)", "sharpening_error", "tab:brown"),
        ("distinct answers among k\n(eval_distinct_answers)", "distinct_answers", "tab:orange"),
    ]
    figure = Figure(figsize=(4.2 * len(runs), 2.4 * len(panels)), dpi=110, layout="constrained")
    grid = figure.subplots(len(panels), len(runs), squeeze=False, sharex="col")
    for column, run in enumerate(runs):
        steps = [e["step"] for e in run["evaluations"]]
        chosen = run["best_global_step"]
        by_delta = select(run["evaluations"], lambda e: -e["sharpening_error"])["step"]
        for row, (label, key, color) in enumerate(panels):
            axes = grid[row][column]
            values = [e[key] for e in run["evaluations"]]
            axes.plot(steps, values, marker="o", markersize=3, color=color)
            if key in ("objective", "greedy_base_logprob") and min(values) < max(values) - 3:
                # a collapse sends these hundreds of nats down: show the top 3 nats, say what is off-scale
                axes.set_ylim(max(values) - 3, max(values) + 0.2)
                off = [step for step, value in zip(steps, values) if value < max(values) - 3]
                axes.text(0.98, 0.04, f"off-scale below from step {off[0]}", transform=axes.transAxes,
                          ha="right", fontsize="x-small")  # fmt: skip
            axes.axvline(chosen, color="red", linestyle="--", linewidth=1)
            axes.plot([chosen], [values[steps.index(chosen)]], marker="*", markersize=14, color="red", linestyle="",
                      label="J_beta-selected (load_best_model_at_end)" if row == 0 else None)  # fmt: skip
            axes.plot([by_delta], [values[steps.index(by_delta)]], marker="^", markersize=9, color="black",
                      linestyle="", label="lowest-delta-selected" if row == 0 else None)  # fmt: skip
            axes.grid(alpha=0.3)
            if column == 0:
                axes.set_ylabel(label, fontsize="small")
            if row == 0:
                axes.set_title(run["name"], fontsize="medium")
                axes.legend(fontsize="small", loc="best")
            if row == len(panels) - 1:
                axes.set_xlabel("training step")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(POOR_COVERAGE_BASE))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument(
        "--seed", type=int, default=1, help="Training seed (1: all three collapse in the coverage run)."
    )
    parser.add_argument("--max_steps", type=int, default=256, help="Steps per run (the coverage run's largest m).")
    parser.add_argument("--eval_steps", type=int, default=16, help="Evaluate (and checkpoint) every this many steps.")
    parser.add_argument("--eval_num_samples", type=int, default=8, help="k samples per held-out prompt.")
    parser.add_argument("--num_prompts", type=int, default=256, help="Training prompts (train split rows 0..).")
    parser.add_argument("--heldout", type=int, default=100, help="Held-out prompts for J_beta (train rows 900..).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--from_json", help="Redraw the table and plot from a saved JSON instead of running.")
    parser.add_argument(
        "--compare", nargs="+", metavar="JSON",
        help="Only print the selection-signal comparison over the runs of these saved JSONs (e.g. both seeds).",
    )  # fmt: skip
    parser.add_argument("--output", default=str(RESULTS / "iterate_selection"), help="Output path without suffix.")
    args = parser.parse_args(argv)
    if args.compare:
        runs = [run for path in args.compare for run in json.loads(Path(path).read_text())["runs"]]
        print(comparison(runs))
        return
    output = Path(args.output)
    command = "python benchmarks/iterate_selection.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        runs, command, notes = saved["runs"], saved["command"], saved["notes"]
    else:
        torch.set_num_threads(args.threads)
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
        notes = (
            f"Base `{Path(args.base).name}`; seed {args.seed}; {args.max_steps} steps of {BATCH} prompts from "
            f"{args.num_prompts} training prompts; learning rate 1e-3 constant, beta 0.1 (J_beta uses the trainer's "
            f"beta); evaluation every {args.eval_steps} steps on {args.heldout} held-out prompts with k = "
            f"{args.eval_num_samples} samples; accuracy = greedy accuracy on the 200 test prompts (scoring only). "
            f"Cost of one evaluation: {runs[-1]['evaluation_cost']}. Total {(time.perf_counter() - start) / 60:.1f} "
            f"min, {args.threads} torch thread(s), on a shared 2-core CPU."
        )
        output.parent.mkdir(parents=True, exist_ok=True)
        output.with_suffix(".json").write_text(
            json.dumps({"command": command, "notes": notes, "runs": runs}, indent=1)
        )
    beta = runs[0]["settings"].get("beta", 0.1)
    text = table(runs, beta)
    output.with_suffix(".md").write_text(
        f"# Iterate selection by J_beta, without labels\n\n`{command.strip()}`\n\n{text}\n\n{notes}\n\n"
        f"![metrics vs step]({output.with_suffix('.png').name})\n\n## Every evaluation\n\n{per_evaluation(runs)}\n",
        encoding="utf-8",
    )
    plot(runs, output.with_suffix(".png"))
    print(f"{text}\n\n{notes}\nwritten to {output.with_suffix('.md')} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
