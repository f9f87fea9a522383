"""The paper's Table 1 on a real model: SFT-, DPO- and XPO-Sharpening of SmolLM2-135M-Instruct with LoRA, on CPU.

    python benchmarks/real_model_table.py                   # every method (see the results file for the time)
    python benchmarks/real_model_table.py --methods sft     # one method

Each trainer is built from its recipe's YAML (`recipes/<method>/smollm2_135m_cpu.yaml`: model, LoRA, data, sampling
and training settings), exactly as `accelerate launch recipes/<method>.py --config ...` builds it, and trained. Before
training (the base) and after each one, greedy decoding on the test prompts of the recipe's task gives: accuracy, the
mean log pi_base of the greedy outputs (the paper's log-likelihood column) and the mean completion length in tokens
(log-prob rewards favour short answers). Also: samples drawn from pi_base and from the policy, and training wall time
(sampling included). The inference-time skyline, the base's BoN@N by log-prob, comes from
`benchmarks/real_model_eval.py`'s report for the same setting when it exists.

Writes `benchmarks/results/real_model_table.md` (after every method, so a long run keeps what it finished).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / "outputs" / "real_model_table"
YAML_NAME = "smollm2_135m_cpu.yaml"
# The real_model_eval.py setting the recipes train in (its BoN@N by the recipes' self-reward is the inference-time
# skyline): the one where the base's Best-of-N beat its greedy decoding
EVAL_SETTING = "smollm2-chat-prontoqa-T0.7"

METHODS = {
    "sft": ("sft_sharpen", "SFT-Sharpening (BoNSFTTrainer)"),
    "dpo": ("dpo_sharpen", "RLHF-Sharpening, DPO loss (SelfRewardDPOTrainer)"),
    "xpo": ("xpo_sharpen", "XPO-Sharpening, regression loss (XPOTrainer)"),
}


def recipe_args(recipe: str, output_dir: Path, overrides: list[str]):
    """(script_args, training_args, model_args) from the recipe's own parser and its smollm2 YAML."""
    spec = importlib.util.spec_from_file_location(f"recipe_{recipe}", REPO / "recipes" / f"{recipe}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--config", str(REPO / "recipes" / recipe / YAML_NAME), "--output_dir", str(output_dir), *overrides]
    return module.make_parser().parse_args_and_config(argv)


def greedy(model, tokenizer, test, extractor, script_args) -> dict:
    from trl_sharpen.answers import answers_match
    from trl_sharpen.evaluation import evaluate_greedy

    result = evaluate_greedy(
        model,
        tokenizer,
        test["prompt"],
        test[script_args.answer_column],
        lambda completion, reference: answers_match(completion, reference, extractor),
        base_model=model,  # a LoRA policy is scored with its adapters disabled: log pi_base
        max_new_tokens=script_args.eval_max_completion_length,
    )
    return {
        "accuracy": result.accuracy,
        "logprob": result.mean_base_logprob,
        "length": result.mean_length,
        "seconds": result.wall_time_s,
        "examples": result.completions[:3],
        # The most frequent extracted answer and its share: a policy that always says "False" scores the base rate
        "top_answer": Counter(map(extractor, result.completions)).most_common(1)[0],
    }


def setup(overrides: list[str]):
    """Tokenizer, test prompts and answer checker of the recipes' task (read from the SFT recipe's YAML)."""
    from transformers import AutoTokenizer

    from trl_sharpen.answers import get_answer_extractor
    from trl_sharpen.real_models import resolve_model_name_or_path
    from trl_sharpen.script_utils import load_prompt_datasets

    script_args, training_args, model_args = recipe_args("sft_sharpen", WORK / "setup", overrides)
    model_path = resolve_model_name_or_path(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dataset = load_prompt_datasets(script_args)
    test = dataset[script_args.dataset_test_split]
    test = test.select(range(min(len(test), script_args.num_eval_prompts)))
    extractor = get_answer_extractor(training_args.answer_extractor)
    return model_path, tokenizer, test, extractor, script_args


def train(key: str, overrides: list[str]) -> tuple[torch.nn.Module, dict]:
    from trl import get_peft_config

    from trl_sharpen import BoNSFTTrainer, SelfRewardDPOTrainer, XPOTrainer
    from trl_sharpen.script_utils import load_model_name_and_tokenizer, load_prompt_datasets

    recipe = METHODS[key][0]
    # From scratch: the wall time is the table's, and samples of an earlier run (other settings) must not be resumed
    shutil.rmtree(WORK / key, ignore_errors=True)
    script_args, args, model_args = recipe_args(recipe, WORK / key, overrides)
    model_name, tokenizer = load_model_name_and_tokenizer(model_args, args)
    train_dataset = load_prompt_datasets(script_args)[script_args.dataset_train_split]
    trainer_class = {"sft_sharpen": BoNSFTTrainer, "dpo_sharpen": SelfRewardDPOTrainer, "xpo_sharpen": XPOTrainer}
    start = time.perf_counter()
    trainer = trainer_class[recipe](
        model=model_name,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    seconds = time.perf_counter() - start
    prompts = trainer.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
    if recipe == "sft_sharpen":
        from_base, from_policy = sum(trainer.bon_dataset["num_samples"]), 0
    elif recipe == "dpo_sharpen":
        drawn = prompts * args.num_generations
        from_base, from_policy = (drawn, 0) if args.sample_from == "base" else (0, drawn)
    else:  # XPO: one y from the policy and one y~ from pi_base per prompt and step
        from_base = from_policy = prompts
    stats = {
        "seconds": seconds,
        "from_base": from_base,
        "from_policy": from_policy,
        "steps": trainer.state.global_step,
    }
    return trainer.accelerator.unwrap_model(trainer.model), stats


def fmt(value, digits: int = 3, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def top_answer(result: dict, num_prompts: int) -> str:
    answer, count = result["top_answer"]
    return f"{answer} ({count / num_prompts:.2f})"


def markdown(
    base: dict, rows: list[dict], skyline: dict | None, total_s: float, num_prompts: int, constant: tuple
) -> str:
    lines = [
        "# Sharpening SmolLM2-135M-Instruct with LoRA on CPU (`python benchmarks/real_model_table.py`)",
        "",
        f"Task: the recipes' test split ({num_prompts} prompts), greedy decoding before and after training. Layout of "
        "Huang et al. 2025, Table 1: % lift of greedy accuracy over the base's greedy, and lift of the mean "
        "log pi_base of the greedy outputs. Samples = completions drawn from pi_base / from the policy during "
        f"training; wall = training time incl. sampling, 2 CPU cores, float32. Total: {total_s / 60:.1f} min. "
        f"Top answer = the most frequent extracted greedy answer and its share; answering {constant[0]!r} to every "
        f"prompt would score {constant[1] / num_prompts:.3f}.",
        "",
        "| model | greedy acc. | % lift | log pi_base(greedy) | lift | length (tokens) | top answer | samples base / "
        "policy | steps | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| base (SmolLM2-135M-Instruct) | {fmt(base['accuracy'])} | - | {fmt(base['logprob'], 2)} | - | "
        f"{fmt(base['length'], 1)} | {top_answer(base, num_prompts)} | - | - | - |",
    ]
    if skyline is not None:
        lines.append(
            f"| base, inference-time BoN@{skyline['n']} by {skyline['reward']} (real_model_eval) | {fmt(skyline['accuracy'])} | "
            f"{fmt(pct(skyline['accuracy'], base['accuracy']), 1, sign=True)} | {fmt(skyline['logprob'], 2)} | "
            f"{fmt(skyline['logprob'] - base['logprob'], 2, sign=True)} | {fmt(skyline['length'], 1)} | - | "
            f"{skyline['samples']} / 0 | - | - |"
        )
    for row in rows:
        after, stats = row["after"], row["stats"]
        lines.append(
            f"| {row['label']} | {fmt(after['accuracy'])} | {fmt(pct(after['accuracy'], base['accuracy']), 1, sign=True)}"
            f" | {fmt(after['logprob'], 2)} | {fmt(after['logprob'] - base['logprob'], 2, sign=True)} | "
            f"{fmt(base['length'], 1)} -> {fmt(after['length'], 1)} | {top_answer(after, num_prompts)} | "
            f"{stats['from_base']} / {stats['from_policy']} | "
            f"{stats['steps']} | {stats['seconds']:.0f} |"
        )
    lines += ["", "Greedy outputs (first 3 test prompts):", ""]
    lines += [f"- base: {base['examples']!r}"] + [f"- {row['label']}: {row['after']['examples']!r}" for row in rows]
    return "\n".join(lines) + "\n"


def pct(value: float, reference: float) -> float | None:
    return None if reference == 0 else 100.0 * (value - reference) / reference


def skyline_row(script_args) -> dict | None:
    """The base's BoN@N by the SFT recipe's self-reward, from real_model_eval.py's report of the same setting."""
    from real_model_eval import with_num_prompts  # benchmarks/ is on sys.path when a script here runs

    path = REPO / "outputs" / "real_model_eval" / with_num_prompts(EVAL_SETTING, script_args.num_eval_prompts)
    path = path / "report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    _, training_args, _ = recipe_args("sft_sharpen", WORK / "setup", [])
    sampled_at = report["settings"]["temperature"]
    if report["num_prompts"] != script_args.num_eval_prompts:
        raise SystemExit(
            f"{path} has {report['num_prompts']} prompts, the recipes evaluate {script_args.num_eval_prompts}"
        )
    if abs(sampled_at - training_args.temperature) > 1e-9:
        raise SystemExit(
            f"{path} was sampled at T = {sampled_at}, the recipes sample at T = {training_args.temperature}"
        )
    reward, n = training_args.self_reward, report["num_samples"]
    return {
        "n": n,
        "reward": reward,
        "accuracy": report["best_of_n"][reward][str(n)],
        "logprob": report["best_of_n_base_logprob"][reward][str(n)],
        "length": report.get("best_of_n_length", {}).get(reward, {}).get(str(n)),
        "samples": report["num_prompts"] * n,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--output", default=str(RESULTS / "real_model_table.md"))
    parser.add_argument("overrides", nargs="*", help="Extra recipe flags for every method, after `--`.")
    args = parser.parse_args()
    start = time.perf_counter()
    from transformers import AutoModelForCausalLM

    model_path, tokenizer, test, extractor, script_args = setup(args.overrides)
    base_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    base = greedy(base_model, tokenizer, test, extractor, script_args)
    print(f"base: greedy {base['accuracy']:.3f}, log pi_base {base['logprob']:.2f}, length {base['length']:.1f}")
    del base_model
    rows = []
    for key in args.methods:
        model, stats = train(key, args.overrides)
        after = greedy(model, tokenizer, test, extractor, script_args)
        rows.append({"label": METHODS[key][1], "after": after, "stats": stats})
        print(f"{key}: greedy {after['accuracy']:.3f}, log pi_base {after['logprob']:.2f}, {stats}", flush=True)
        del model
        gc.collect()
        constant = Counter(test[script_args.answer_column]).most_common(1)[0]
        text = markdown(base, rows, skyline_row(script_args), time.perf_counter() - start, len(test), constant)
        Path(args.output).write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
