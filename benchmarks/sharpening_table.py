"""The paper's Table 1 on the bundled toy task: every sharpening method from the same base, on the same prompts.

    python benchmarks/sharpening_table.py          # a few minutes on 2 CPU cores

Rows: the base model's greedy decoding; inference-time Best-of-N (the skyline sharpening should amortise); greedy
decoding after SFT-Sharpening (`BoNSFTTrainer`), RLHF-Sharpening with TRL's DPO loss and with the paper's regression
loss (`SelfRewardDPOTrainer`), XPO (`XPOTrainer`), and GRPO / RLOO with the self-rewards log pi_base, majority,
self-certainty and negative entropy (`SelfRewardGRPOTrainer`, `SelfRewardRLOOTrainer`; `--methods grpo rloo ...`). Each trainer uses its recipe's toy YAML
(`recipes/<method>/toy_cpu.yaml`), so the table shows what the README commands do, over several seeds.

Columns: greedy accuracy on the 200 held-out test prompts (mean +- std over seeds), % lift over the base's greedy
accuracy, log-likelihood lift (mean log pi_base of the greedy outputs minus the base's; the paper's second column),
completions sampled from pi_base and from the policy, and wall time (sampling + training, without evaluation).
Writes `benchmarks/results/sharpening_table.md` and `sharpening_table.png` (the base's accuracy vs N with each
sharpened model's greedy accuracy as a line).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from trl_sharpen.evaluation import evaluate_greedy, evaluate_sharpening  # noqa: E402
from trl_sharpen.plots import plot_accuracy_vs_n  # noqa: E402
from trl_sharpen.report import lift_over_greedy  # noqa: E402
from trl_sharpen.toy import TOY_MODEL_PATH, load_toy_prompts  # noqa: E402


REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def recipe_parser(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_parser()


def recipe_args(name: str, output_dir: str, seed: int, overrides: list[str]):
    yaml = REPO / "recipes" / name / "toy_cpu.yaml"
    quiet = ["--report_to", "none", "--disable_tqdm", "true", "--logging_strategy", "no"]
    # The table measures training and the last iterate: no monitoring (the toy YAMLs evaluate, save and keep the best)
    quiet += ["--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false"]
    argv = ["--config", str(yaml), "--output_dir", output_dir, "--seed", str(seed), *quiet, *overrides]
    script_args, training_args, _ = recipe_parser(name).parse_args_and_config(argv)
    return script_args, training_args


def train(method: dict, tokenizer, seed: int, workdir: str):
    """Build the trainer as its recipe does, train, and return (model, seconds, samples from base, from policy)."""
    from trl_sharpen import (
        BoNSFTTrainer,
        SelfRewardDPOTrainer,
        SelfRewardGRPOTrainer,
        SelfRewardRLOOTrainer,
        XPOTrainer,
    )
    from trl_sharpen.script_utils import load_prompt_datasets

    script_args, args = recipe_args(
        method["recipe"], os.path.join(workdir, f"{method['key']}-{seed}"), seed, method["overrides"]
    )
    train_dataset = load_prompt_datasets(script_args)[script_args.dataset_train_split]
    trainer_class = {
        "sft_sharpen": BoNSFTTrainer,
        "dpo_sharpen": SelfRewardDPOTrainer,
        "xpo_sharpen": XPOTrainer,
        "grpo_sharpen": SelfRewardGRPOTrainer,
        "rloo_sharpen": SelfRewardRLOOTrainer,
    }
    start = time.perf_counter()
    trainer = trainer_class[method["recipe"]](
        model=TOY_MODEL_PATH, args=args, train_dataset=train_dataset, processing_class=tokenizer
    )
    trainer.train()
    seconds = time.perf_counter() - start
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
    if method["recipe"] == "sft_sharpen":
        from_base, from_policy = sum(trainer.bon_dataset["num_samples"]), 0
    elif method["recipe"] == "dpo_sharpen":
        drawn = trainer.state.global_step * batch * args.num_generations
        from_base, from_policy = (drawn, 0) if args.sample_from == "base" else (0, drawn)
    elif method["recipe"] in ("grpo_sharpen", "rloo_sharpen"):  # GRPO/RLOO batches count completions
        from_base, from_policy = 0, trainer.state.global_step * batch
    else:  # XPO: one y from the policy and one y~ from pi_base per prompt and step
        from_base = from_policy = trainer.state.global_step * batch
    return trainer.accelerator.unwrap_model(trainer.model).eval(), seconds, from_base, from_policy


METHODS = [
    {"key": "sft", "label": "SFT-Sharpening (BoNSFTTrainer, N=16)", "recipe": "sft_sharpen", "overrides": []},
    {
        "key": "dpo",
        "label": "RLHF-Sharpening, DPO loss (SelfRewardDPOTrainer)",
        "recipe": "dpo_sharpen",
        "overrides": [],
    },
    {
        "key": "dpo-sharpen",
        "label": "RLHF-Sharpening, regression loss Eq. 8",
        "recipe": "dpo_sharpen",
        "overrides": ["--loss_type", "sharpen"],
    },
    {
        "key": "dpo-paper",
        "label": "RLHF-Sharpening, the paper's setting (preset paper: Eq. 8 on pi_base samples)",
        "recipe": "dpo_sharpen",
        "overrides": ["--preset", "paper"],
    },
    {"key": "xpo", "label": "XPO (XPOTrainer, alpha 0.1)", "recipe": "xpo_sharpen", "overrides": []},
    # GRPO / RLOO (issue 20): the toy recipes (50 steps, 4 generations, last iterate)
    {"key": "grpo", "label": "GRPO, log pi_base (SelfRewardGRPOTrainer)", "recipe": "grpo_sharpen", "overrides": []},
    {"key": "rloo", "label": "RLOO, log pi_base (SelfRewardRLOOTrainer)", "recipe": "rloo_sharpen", "overrides": []},
    {
        "key": "grpo-majority",
        "label": "GRPO, majority vote, beta 0.1",
        "recipe": "grpo_sharpen",
        "overrides": ["--self_reward", "majority", "--beta", "0.1"],
    },
    {
        "key": "grpo-self-certainty",
        "label": "GRPO, self-certainty (Intuitor)",
        "recipe": "grpo_sharpen",
        "overrides": ["--self_reward", "self_certainty"],
    },
    {
        "key": "grpo-negative-entropy",
        "label": "GRPO, negative entropy (RENT)",
        "recipe": "grpo_sharpen",
        "overrides": ["--self_reward", "negative_entropy"],
    },
]


def fmt(values: list[float], digits: int = 3) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--num_samples", type=int, default=16, help="N of the base's Best-of-N skyline.")
    parser.add_argument(
        "--methods", nargs="+", choices=[m["key"] for m in METHODS], help="Only these rows (printed, not saved)."
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest and least disturbed by other jobs

    tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL_PATH)
    base = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH).eval()
    test = load_toy_prompts("test")
    torch.manual_seed(0)
    report = evaluate_sharpening(
        base, tokenizer, test, num_samples=args.num_samples, max_new_tokens=48, self_rewards=("logprob",)
    )
    skyline = report.best_of_n_selection("logprob")
    skyline_lift = lift_over_greedy(skyline, report)
    rows = [
        ("base model, greedy", fmt([report.greedy.accuracy]), "—", "0.00", "0", "0", "—"),
        (
            f"base model, Best-of-{args.num_samples} by log pi_base (inference)",
            fmt([skyline.accuracy]),
            f"{skyline_lift.accuracy_lift_pct:+.0f}%",
            f"{skyline_lift.loglik_lift:+.2f}",
            f"{args.num_samples * len(test)} (at test time)",
            "0",
            f"{sum(report.wall_time_s.values()):.0f} s (all evaluation)",
        ),
    ]
    lines = {}
    with tempfile.TemporaryDirectory() as workdir:
        for method in [m for m in METHODS if not args.methods or m["key"] in args.methods]:
            accuracies, logliks, times, samples = [], [], [], None
            for seed in args.seeds:
                model, seconds, from_base, from_policy = train(method, tokenizer, seed, workdir)
                result = evaluate_greedy(
                    model, tokenizer, test["prompt"], test["answer"], base_model=base, max_new_tokens=48
                )
                lift = lift_over_greedy(result, report)
                accuracies.append(result.accuracy)
                logliks.append(lift.loglik_lift)
                times.append(seconds)
                samples = (from_base, from_policy)
                print(f"{method['label']} seed {seed}: greedy {result.accuracy:.3f} ({seconds:.1f} s)", flush=True)
            mean_accuracy = statistics.fmean(accuracies)
            lift_pct = 100 * (mean_accuracy - report.greedy.accuracy) / report.greedy.accuracy
            rows.append(
                (
                    f"{method['label']}, greedy",
                    fmt(accuracies),
                    f"{lift_pct:+.0f}%",
                    f"{statistics.fmean(logliks):+.2f}",
                    str(samples[0]),
                    str(samples[1]),
                    f"{statistics.fmean(times):.0f} s",
                )
            )
            lines[method["label"].split(" (")[0]] = mean_accuracy

    header = (
        "| method | greedy accuracy | % lift over greedy | log-likelihood lift | samples from pi_base | "
        "samples from policy | wall time |"
    )
    table = [header, "|" + "---|" * 7] + ["| " + " | ".join(row) + " |" for row in rows]
    settings = (
        f"Toy task, 200 held-out test prompts, seeds {args.seeds} (mean ± std), torch {torch.__version__} on "
        f"{torch.get_num_threads()} CPU thread. Command: `python benchmarks/sharpening_table.py`."
    )
    if args.methods:  # a subset: the saved table keeps every row
        print("\n".join(table))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sharpening_table.md").write_text("\n".join([*table, "", settings, ""]))
    plot_accuracy_vs_n(
        report,
        RESULTS / "sharpening_table.png",
        title="Toy base: Best-of-n vs greedy decoding after sharpening",
        reference_lines={f"greedy after {name}": value for name, value in lines.items()},
    )
    print("\n".join(table))
    print(f"\n{settings}\nwrote {RESULTS / 'sharpening_table.md'} and {RESULTS / 'sharpening_table.png'}")


if __name__ == "__main__":
    main()
