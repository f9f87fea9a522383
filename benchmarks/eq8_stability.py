"""Eq. 8 (`loss_type: sharpen`) over seeds: is the paper's regression stable on policy samples?

The setting of issue 21 (item 7): SelfRewardDPOTrainer on the toy base, `loss_type: sharpen`, beta 0.5, learning
rate 5e-4 (constant), k = 2 samples per prompt from the policy, 150 steps of 32 prompts (the toy recipe's other
settings, recipes/dpo_sharpen/toy_cpu.yaml, without monitoring). Greedy accuracy on the 200 held-out test prompts
after training, per seed, for the squared residual (the paper's Eq. 8) and for its Huber form
(`sharpen_huber_delta`), plus the largest and the last logged `self_reward/sharpen_residual_sq` (Eq. 8's own value,
whatever loss trains).

    python benchmarks/eq8_stability.py --seeds 0 1 2 3 4 --variants squared huber1   # ~1 min per run on 1 core
    python benchmarks/eq8_stability.py --base poor_coverage --seeds 0 1 2 3 4 --variants huber1

Writes benchmarks/results/eq8_stability[_<base>].md (one row per run, then mean ± sd and the worst seed per variant).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from sharpening_table import recipe_args  # noqa: E402

from trl_sharpen import SelfRewardDPOTrainer  # noqa: E402
from trl_sharpen.evaluation import evaluate_greedy  # noqa: E402
from trl_sharpen.script_utils import load_prompt_datasets  # noqa: E402
from trl_sharpen.toy import TOY_MODEL_PATH, load_toy_prompts  # noqa: E402


BASES = {"toy": TOY_MODEL_PATH, "poor_coverage": str(REPO / "trl_sharpen" / "toy" / "base_model_poor_coverage")}
VARIANTS = {
    "squared": [],
    "huber1": ["--sharpen_huber_delta", "1.0"],
    "huber4": ["--sharpen_huber_delta", "4.0"],
    "sigmoid": ["--loss_type", "sigmoid"],  # a control: TRL's DPO loss in the same setting (no residual logged)
}
SETTING = ["--loss_type", "sharpen", "--beta", "0.5", "--learning_rate", "5e-4", "--num_generations", "2",
           "--max_steps", "150", "--sample_from", "policy", "--logging_strategy", "steps", "--logging_steps", "10"]  # fmt: skip


def run(base: str, variant: str, seed: int, workdir: str, learning_rate: str = "5e-4") -> dict:
    overrides = SETTING + VARIANTS[variant] + ["--learning_rate", learning_rate]
    script_args, args = recipe_args("dpo_sharpen", os.path.join(workdir, f"{variant}-{seed}"), seed, overrides)
    if variant == "squared":
        args.sharpen_huber_delta = None  # whatever the default is now: the paper's squared residual
    tokenizer = AutoTokenizer.from_pretrained(BASES[base])
    train = load_prompt_datasets(script_args)[script_args.dataset_train_split]
    start = time.perf_counter()
    trainer = SelfRewardDPOTrainer(model=BASES[base], args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    seconds = time.perf_counter() - start
    test = load_toy_prompts("test")
    policy = trainer.accelerator.unwrap_model(trainer.model).eval()
    accuracy = evaluate_greedy(policy, tokenizer, test["prompt"], test["answer"], max_new_tokens=48).accuracy
    residuals = [e["self_reward/sharpen_residual_sq"] for e in trainer.state.log_history
                 if "self_reward/sharpen_residual_sq" in e]  # fmt: skip
    residuals = residuals or [float("nan")]  # sigmoid: no Eq. 8 residual
    return {"variant": variant, "seed": seed, "accuracy": accuracy, "first": residuals[0], "max": max(residuals),
            "last": residuals[-1], "seconds": seconds}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", choices=list(BASES), default="toy")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["squared", "huber1"])
    parser.add_argument("--learning_rate", default="5e-4", help="A stress test: the same setting at another rate.")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    base_accuracy = evaluate_greedy(
        AutoModelForCausalLM.from_pretrained(BASES[args.base]).eval(), AutoTokenizer.from_pretrained(BASES[args.base]),
        load_toy_prompts("test")["prompt"], load_toy_prompts("test")["answer"], max_new_tokens=48,
    ).accuracy  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for variant in args.variants:
            for seed in args.seeds:
                rows.append(run(args.base, variant, seed, workdir, args.learning_rate))
                r = rows[-1]
                print(f"{variant} seed {seed}: accuracy {r['accuracy']:.3f}, Eq. 8 residual^2 first {r['first']:.3g} "
                      f"max {r['max']:.3g} last {r['last']:.3g}, {r['seconds']:.0f} s", flush=True)  # fmt: skip
    lines = [f"# Eq. 8 stability on the {args.base} base (greedy accuracy of the base: {base_accuracy:.3f})", "",
             "    python benchmarks/eq8_stability.py --base " + args.base + " --seeds " + " ".join(map(str, args.seeds))
             + " --variants " + " ".join(args.variants) + f" --learning_rate {args.learning_rate}", "",
             f"Setting: SelfRewardDPOTrainer, loss_type sharpen, beta 0.5, lr {args.learning_rate} constant, k = 2 policy samples, "
             "150 steps x 32 prompts; greedy accuracy on the 200 test prompts. `residual^2`: Eq. 8's mean squared "
             "residual as logged every 10 steps (first / largest / last).", "",
             "| variant | seed | greedy accuracy | residual^2 first | max | last | seconds |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['accuracy']:.3f} | {r['first']:.3g} | {r['max']:.3g} | "
                     f"{r['last']:.3g} | {r['seconds']:.0f} |")  # fmt: skip
    lines += ["", "| variant | mean ± sd | worst seed | worst / mean |", "|---|---|---|---|"]
    for variant in args.variants:
        values = [r["accuracy"] for r in rows if r["variant"] == variant]
        mean = statistics.fmean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        worst = min(values)
        lines.append(f"| {variant} | {mean:.3f} ± {sd:.3f} | {worst:.3f} | {worst / mean if mean else 0:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    suffix = "" if args.base == "toy" else f"_{args.base}"
    output = Path(args.output) if args.output else REPO / "benchmarks" / "results" / f"eq8_stability{suffix}.md"
    output.write_text(text)


if __name__ == "__main__":
    main()
