"""SFT-Sharpening vs self-reward DPO vs XPO on a base with *poor coverage*: greedy accuracy against samples consumed.

Huang et al. 2025 (arXiv 2412.01951) prove that SFT-Sharpening needs a number of samples growing with the coverage
coefficient C_cov = E_x[1 / pi_base(y*(x)|x)] (Thm. 4.1, minimax-optimal, Thm. 3.1), while XPO's exploration bonus
removes that dependence (Thm. 4.3; Algorithm 1). This script tests the prediction on the toy task's `poor_coverage`
variant (trl_sharpen/toy/task.py): the careful worked solution, the sequence argmax, has probability 0.02 under the
pretraining distribution for every prompt, so it is rarely sampled.

    python benchmarks/coverage_experiment.py                        # the table in benchmarks/results/ (~10 min)
    python benchmarks/coverage_experiment.py --budgets 1024 4096 --seeds 0    # a quicker look

1. The base is checked first, on the 200 held-out test prompts: greedy accuracy, pass@16 and Best-of-N accuracy
   (logprob self-reward) for N up to 256, and for how many prompts the careful solution scores above every
   `answer <n>` shortcut and every one of the 256 samples (i.e. is the argmax as far as we can see).
2. Each method trains a fresh copy of the base on the same 256 training prompts with the same seeds, for each budget
   m = the number of completions it samples and scores with log pi_base (the paper's sample-and-evaluate count,
   Def. 3.2), reported split into base-model samples and policy samples:
   - SFT-Sharpening (`BoNSFTTrainer`): N = m / 256 base samples per prompt, SFT on the best one (m base samples).
   - self-reward DPO (`SelfRewardDPOTrainer`, its defaults: sigmoid loss, 2 policy samples per prompt):
     m / 64 steps of 32 prompts (m policy samples).
   - XPO (`XPOTrainer`): m / 64 steps of 32 prompts, one policy and one base sample each (m/2 + m/2), with the
     paper's regression (`sharpen`) and with TRL's former logistic form (`sigmoid`), each with alpha = 1 and with
     alpha = 0 (no bonus), which isolates the bonus.
   Accuracy is greedy accuracy on the 200 test prompts, averaged over the seeds; P(y*) is the policy's mean
   probability of the careful solution on them. Learning rate 1e-3 (the toy recipes'), beta 0.1 (TRL's default);
   alpha, learning rate and beta were fixed before the first run and not tuned.
"""

from __future__ import annotations

import argparse
import contextlib
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
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from trl_sharpen import (  # noqa: E402
    BoNSFTConfig,
    BoNSFTTrainer,
    SelfRewardDPOConfig,
    SelfRewardDPOTrainer,
    XPOConfig,
    XPOTrainer,
)
from trl_sharpen.data import tokenize_prompt  # noqa: E402
from trl_sharpen.evaluation import evaluate_greedy, evaluate_sharpening  # noqa: E402
from trl_sharpen.logprobs import sequence_logprobs  # noqa: E402
from trl_sharpen.metrics import pass_at_k  # noqa: E402
from trl_sharpen.toy import load_toy_prompts  # noqa: E402
from trl_sharpen.toy.task import MAX_NUMBER, careful_solution, terms_from_prompt  # noqa: E402


REPO = Path(__file__).resolve().parents[1]
POOR_COVERAGE_BASE = REPO / "trl_sharpen" / "toy" / "base_model_poor_coverage"
MAX_COMPLETION_LENGTH = 48  # toy completions are at most ~30 tokens
BATCH = 32  # prompts per step (online methods) and per SFT batch


def careful_ids(tokenizer, prompts) -> list[list[int]]:
    return [tokenizer(careful_solution(terms_from_prompt(p)))["input_ids"] + [tokenizer.eos_token_id] for p in prompts]


@torch.no_grad()
def careful_logprobs(model, tokenizer, prompts) -> torch.Tensor:
    """log pi(y*|x) of the careful (correct) solution of each prompt."""
    prompt_ids = [tokenize_prompt(tokenizer, p) for p in prompts]
    return sequence_logprobs(model.eval(), prompt_ids, careful_ids(tokenizer, prompts))


@torch.no_grad()
def best_shortcut_logprobs(model, tokenizer, prompts) -> torch.Tensor:
    """max over n of log pi('answer n' EOS | x): the best of the 101 shortcut sequences."""
    shortcuts = [tokenizer(f"answer {n}")["input_ids"] + [tokenizer.eos_token_id] for n in range(MAX_NUMBER + 1)]
    best = []
    for prompt in prompts:
        ids = tokenize_prompt(tokenizer, prompt)
        best.append(sequence_logprobs(model.eval(), [ids] * len(shortcuts), shortcuts).max())
    return torch.stack(best)


def check_base(model, tokenizer, test, num_samples: int, seed: int) -> tuple[str, dict]:
    report = evaluate_sharpening(
        model, tokenizer, test, num_samples=num_samples, self_rewards=["logprob"],
        max_new_tokens=MAX_COMPLETION_LENGTH, batch_size=512, seed=seed,
    )  # fmt: skip
    careful = careful_logprobs(model, tokenizer, test["prompt"])
    shortcut = best_shortcut_logprobs(model, tokenizer, test["prompt"])
    # the best of the N samples of each prompt under pi_base, from the report's own samples
    per_prompt_best = torch.tensor([max(row) for row in report.samples.base_logprobs])
    # Samples that are the careful solution itself (a shortcut guess is also right ~1% of the time: the tiny model
    # cannot leave the correct sum out of its guesses without computing it)
    targets = [tokenizer.decode(ids, skip_special_tokens=True) for ids in careful_ids(tokenizer, test["prompt"])]
    careful_counts = [
        sum(text.strip() == target for text in row) for row, target in zip(report.samples.completions, targets)
    ]
    figures = {
        "greedy": report.greedy.accuracy,
        "pass@16 (any correct answer)": report.pass_at_n[16],
        "y*-coverage@16 (a sample is the careful solution)": sum(
            pass_at_k(num_samples, count, 16) for count in careful_counts
        )
        / len(careful_counts),
        f"pass@{num_samples}": report.pass_at_n[num_samples],
        **{f"BoN@{n}": report.best_of_n["logprob"][n] for n in report.ns if n >= 16},
        "P(y*) mean": careful.exp().mean().item(),
        "y* beats every shortcut": (careful > shortcut).float().mean().item(),
        f"y* beats every shortcut and all {num_samples} samples": (
            (careful > shortcut) & (careful >= per_prompt_best - 1e-4)
        )
        .float()
        .mean()
        .item(),
    }
    lines = ["| base check (200 test prompts) | value |", "|---|---|"]
    lines += [f"| {key} | {value:.3f} |" for key, value in figures.items()]
    return "\n".join(lines), figures


def common_args(output_dir: str, seed: int) -> dict:
    return dict(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=10,
        learning_rate=1e-3,  # the toy recipes' value
        max_completion_length=MAX_COMPLETION_LENGTH,
        per_device_train_batch_size=BATCH,
        seed=seed,
        disable_tqdm=True,
    )


def run_method(method: dict, budget: int, prompts, base_path: str, tokenizer, seed: int, sft_epochs: int):
    """Train a fresh copy of the base with `budget` sampled completions; return (trained model, counts)."""
    transformers.set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path)
    with tempfile.TemporaryDirectory() as output_dir:
        if method["kind"] == "sft":
            num_samples = budget // len(prompts)
            args = BoNSFTConfig(
                **common_args(output_dir, seed), num_samples=num_samples, generation_batch_size=512,
                num_train_epochs=sft_epochs, lr_scheduler_type="linear",
            )  # fmt: skip
            trainer = BoNSFTTrainer(model=model, args=args, train_dataset=prompts, processing_class=tokenizer)
            counts = {"base": num_samples * len(prompts), "policy": 0}
        else:
            steps = budget // (2 * BATCH)
            common = {**common_args(output_dir, seed), "max_steps": steps, "lr_scheduler_type": "constant"}
            if method["kind"] == "dpo":
                trainer = SelfRewardDPOTrainer(
                    model=model, args=SelfRewardDPOConfig(**common), train_dataset=prompts, processing_class=tokenizer
                )
                counts = {"base": 0, "policy": 2 * BATCH * steps}
            else:
                args = XPOConfig(**common, alpha=method["alpha"], loss_type=method["loss_type"])
                trainer = XPOTrainer(model=model, args=args, train_dataset=prompts, processing_class=tokenizer)
                counts = {"base": BATCH * steps, "policy": BATCH * steps}
        trainer.train()
        counts["steps"] = trainer.state.global_step
        return trainer.model.eval(), counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(POOR_COVERAGE_BASE), help="The poor-coverage base model.")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1024, 4096, 16384], help="Completions sampled.")
    parser.add_argument("--num_prompts", type=int, default=256, help="Training prompts (the same for every method).")
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.0], help="XPO's alpha values to run.")
    parser.add_argument(
        "--xpo_loss_types", nargs="+", default=["sharpen", "sigmoid"],
        help="XPO's loss forms: sharpen (the paper's regression), sigmoid (TRL's former XPO), ...",
    )  # fmt: skip
    parser.add_argument("--sft_epochs", type=int, default=3, help="SFT-Sharpening epochs over the BoN data.")
    parser.add_argument("--check_samples", type=int, default=256, help="Samples per test prompt for the base check.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="Training seeds; accuracy is averaged.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny model).")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "coverage_experiment.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    command = "python benchmarks/coverage_experiment.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"command: {command.strip()}\nsettings: {vars(args)}", flush=True)

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    test = load_toy_prompts("test")
    prompts = load_toy_prompts("train").select(range(args.num_prompts))
    start = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(args.base).eval()
    base_table, _ = check_base(base, tokenizer, test, args.check_samples, args.seeds[0])
    print(base_table, flush=True)

    methods = [{"name": "SFT-Sharpening", "kind": "sft"}, {"name": "self-reward DPO (sigmoid)", "kind": "dpo"}]
    methods += [
        {"name": f"XPO ({loss_type}) alpha={alpha:g}", "kind": "xpo", "loss_type": loss_type, "alpha": alpha}
        for loss_type in args.xpo_loss_types
        for alpha in args.alphas
    ]
    per_seed = " (per seed)" if len(args.seeds) > 1 else ""
    rows = [
        "| method | budget m (sampled completions) | base samples | policy samples | steps | greedy accuracy"
        f"{per_seed} | P(y*) | train+eval s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for budget in args.budgets:
        for method in methods:
            accuracies, p_stars, began = [], [], time.perf_counter()
            for seed in args.seeds:
                with contextlib.redirect_stdout(sys.stderr):  # trainers print their logs; keep stdout for the tables
                    model, counts = run_method(method, budget, prompts, args.base, tokenizer, seed, args.sft_epochs)
                test_prompts, answers = test["prompt"], test["answer"]
                accuracies.append(evaluate_greedy(model, tokenizer, test_prompts, answers, max_new_tokens=48).accuracy)
                p_stars.append(careful_logprobs(model, tokenizer, test_prompts).exp().mean().item())
            accuracy = f"{sum(accuracies) / len(accuracies):.3f}"
            if per_seed:
                accuracy += " (" + " / ".join(f"{value:.2f}" for value in accuracies) + ")"
            row = (
                f"| {method['name']} | {budget} | {counts['base']} | {counts['policy']} | {counts['steps']} "
                f"| {accuracy} | {sum(p_stars) / len(p_stars):.3f} | {time.perf_counter() - began:.0f} |"
            )
            rows.append(row)
            print(row, flush=True)
    table = "\n".join(rows)
    total = time.perf_counter() - start
    notes = (
        f"Base: `{Path(args.base).relative_to(REPO) if Path(args.base).is_relative_to(REPO) else args.base}`; "
        f"{args.num_prompts} training prompts, {BATCH} prompts per step, learning rate 1e-3, seeds {args.seeds}, "
        f"{args.threads} torch thread(s); SFT-Sharpening: {args.sft_epochs} epochs, linear decay; online methods: "
        "constant learning rate, beta 0.1; P(y*) = mean policy probability of the careful solution on the test "
        f"prompts. Total {total / 60:.1f} min."
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        f"# Coverage experiment\n\n`{command.strip()}`\n\n{base_table}\n\n{table}\n\n{notes}\n", encoding="utf-8"
    )
    print(f"\n{table}\n\n{notes}\nwritten to {output}")


if __name__ == "__main__":
    main()
