"""Sharpening SmolLM2-135M-Instruct with LoRA on CPU, measured in the field's metrics, with monitoring and the guard on.

    python benchmarks/real_model_table.py                                   # both settings, every row (~75 min)
    python benchmarks/real_model_table.py --settings a --rows base sft      # part of it; finished rows are kept
    python benchmarks/real_model_table.py --settings a --rows base sft --num_prompts 8 \\
        --output /tmp/table.md -- --max_steps 1 --num_train_prompts 8      # a smoke run (recipe flags after --)

Settings (the recipes' YAMLs, `recipes/<method>/smollm2_135m_cpu.yaml`, with only the data options changed):

- `a`: chat 1-digit arithmetic, addition widened with subtraction (a >= b) and multiplication
  (`trl_sharpen/tasks/data/arithmetic_mixed1_chat`: 200 test prompts, disjoint from the other 55 of the 255 problems,
  which are the train split), where the base's samples are far below its mode (greedy 0.8, T = 1 samples about 0.2
  on 1-digit addition) and sharpening has something to move toward. Two-digit operands are out: SmolLM2's greedy
  accuracy falls to 0.05-0.40 there.
- `b`: the recipes' own ProntoQA chat setting (200 test prompts), where there is nothing to sharpen toward.

Rows: the base; SFT-, DPO- and XPO-Sharpening; GRPO with the `logprob` self-reward (when its recipe has a SmolLM2
YAML); and a control, the DPO recipe with the `random` self-reward (a reward drawn uniformly per completion, no
signal: a sharpening row must beat it). Each trainer is built from its recipe's YAML exactly as `accelerate launch
recipes/<method>.py --config ...` builds it (monitoring, answer gating, the retention alarm and best-iterate selection
included), with the test split as its prompt-only `eval_dataset`, and trained from scratch.

Columns, on the test prompts, from `evaluate_sharpening` of the model the run returns (the selected iterate): greedy
accuracy; avg@8 at T = 1 and at the training temperature (the policy's own samples); maj@8 and pass@8 of the T = 1
samples; the sharpening error delta (Def. 3.1); mean log pi_base of the greedy outputs; greedy length in tokens; the
top-answer share (the most common extracted greedy answer's share of prompts: "True." everywhere is 1.0); and the
selected step (0 = pi_base itself won the selection). The base row adds BoN@8 by the recipes' self-reward with its
paired bootstrap verdict against greedy.

Every finished row is stored in a JSON file next to the markdown (`--output` with `.json`), so a long table can be
run in parts; the markdown is rewritten from all stored rows after each one.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / "outputs" / "real_model_table"
YAML_NAME = "smollm2_135m_cpu.yaml"
NUM_SAMPLES = 8
EVAL_SEED = 1234  # the same draws for every row


@dataclass(frozen=True)
class Setting:
    title: str
    overrides: tuple[str, ...]


SETTINGS = {
    "a": Setting(
        "(a) SmolLM2 chat 1-digit arithmetic (addition widened with subtraction and multiplication)",
        (
            "--dataset_name", "trl_sharpen/tasks/data/arithmetic_mixed1_chat",
            "--answer_extractor", "trl_sharpen.tasks.arithmetic:extract_answer",
        ),
    ),
    "b": Setting("(b) SmolLM2 chat ProntoQA (the recipes' setting)", ()),
}  # fmt: skip


@dataclass(frozen=True)
class Row:
    label: str
    recipe: str | None  # None: the base, not trained
    trainer: str | None = None  # the trl_sharpen class the recipe builds
    overrides: tuple[str, ...] = ()


ROWS = {
    "base": Row("base (SmolLM2-135M-Instruct)", None),
    "sft": Row("SFT-Sharpening", "sft_sharpen", "BoNSFTTrainer"),
    "dpo": Row("RLHF-Sharpening, DPO loss", "dpo_sharpen", "SelfRewardDPOTrainer"),
    "xpo": Row("XPO-Sharpening", "xpo_sharpen", "XPOTrainer"),
    # XPO's optimism bonus alpha * log pi(y~|x), minimised, lowers the policy's log-prob of pi_base's own samples,
    # which are mostly pi_base's mode: the same run without it tells whether the bonus flattens the policy's samples
    "xpo_alpha0": Row("XPO-Sharpening, alpha 0 (no bonus)", "xpo_sharpen", "XPOTrainer", ("--alpha", "0")),
    "grpo": Row("GRPO-Sharpening, logprob", "grpo_sharpen", "SelfRewardGRPOTrainer", ("--self_reward", "logprob")),
    "random": Row(
        "control: DPO recipe, random reward", "dpo_sharpen", "SelfRewardDPOTrainer", ("--self_reward", "random")
    ),
}


def recipe_args(recipe: str, output_dir: Path, overrides: list[str]):
    """(script_args, training_args, model_args) from the recipe's own parser and its SmolLM2 YAML."""
    yaml = REPO / "recipes" / recipe / YAML_NAME
    if not yaml.is_file():
        raise SystemExit(f"real_model_table: {yaml.relative_to(REPO)} does not exist; leave this row out (--rows).")
    spec = importlib.util.spec_from_file_location(f"recipe_{recipe}", REPO / "recipes" / f"{recipe}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--config", str(yaml), "--output_dir", str(output_dir), *overrides]
    return module.make_parser().parse_args_and_config(argv)


def top_answer_share(answers: list) -> tuple[str | None, float]:
    """The most common extracted answer (None: no answer) and its share of the prompts."""
    answer, count = Counter(answers).most_common(1)[0]
    return answer, count / len(answers)


def selected_step(trainer) -> int:
    """The step of the iterate the run returns: the best checkpoint's (checkpoint-0 is pi_base) when the run loads
    the best model at the end, else the last step."""
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best:
        match = re.search(r"checkpoint-(\d+)$", str(best).rstrip("/"))
        if match:
            return int(match.group(1))
    return trainer.state.global_step


def measure(model, tokenizer, test, script_args, training_args, self_rewards=(), base_model=None) -> dict:
    """Every column of the table for `model`, scored under `base_model` (None: `model` is the base)."""
    from trl_sharpen.answers import get_answer_extractor
    from trl_sharpen.evaluation import evaluate_sharpening

    extractor = get_answer_extractor(training_args.answer_extractor)
    report = evaluate_sharpening(
        model,
        tokenizer,
        test["prompt"],
        test[script_args.answer_column],
        num_samples=NUM_SAMPLES,
        temperature=training_args.temperature,
        max_completion_length=script_args.eval_max_completion_length,
        answer_extractor=extractor,
        self_rewards=list(self_rewards),
        base_model=base_model,
        seed=EVAL_SEED,
        temperature_1_samples=True,
    )
    at_t1 = report.sampled_at(1.0)
    at_train = report.sampled[0]
    answer, share = top_answer_share([extractor(text) for text in report.greedy.completions])
    row = {
        "greedy": report.greedy.accuracy,
        "avg_t1": at_t1.avg_at_k,
        "avg_train_t": at_train.avg_at_k,
        "maj_t1": at_t1.maj_at_k,
        "pass_t1": at_t1.pass_at_k,
        "maj_train_t": at_train.maj_at_k,
        "pass_train_t": at_train.pass_at_k,
        "delta": report.sharpening_error,
        "greedy_base_logprob": report.greedy.mean_base_logprob,
        "length": report.greedy.mean_length,
        "top_answer": answer,
        "top_answer_share": share,
        "truncated_t_train": report.truncated_fraction,
        "eval_seconds": report.wall_time_s.get("total"),
        "examples": report.greedy.completions[:3],
        "greedy_correct": [bool(c) for c in report.greedy.correct],
    }
    for reward, interval in report.bon_minus_greedy.items():
        row["bon"] = {
            "reward": reward,
            "accuracy": report.best_of_n[reward][NUM_SAMPLES],
            "mean": interval.mean,
            "low": interval.low,
            "high": interval.high,
            "verdict": interval.verdict,
        }
    return row


def setup(setting: Setting, overrides: list[str]):
    """Tokenizer, test prompts and the recipes' settings of a table setting (read from the SFT recipe's YAML)."""
    from transformers import AutoTokenizer

    from trl_sharpen.real_models import resolve_model_name_or_path
    from trl_sharpen.script_utils import load_prompt_datasets

    script_args, training_args, model_args = recipe_args(
        "sft_sharpen", WORK / "setup", [*setting.overrides, *overrides]
    )
    model_path = resolve_model_name_or_path(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    test = load_prompt_datasets(script_args)[script_args.dataset_test_split]
    test = test.select(range(min(len(test), script_args.num_eval_prompts)))
    return model_path, tokenizer, test, script_args, training_args


def train(row: Row, key: str, overrides: list[str]):
    """Train one row from scratch with its recipe's settings; returns (policy, stats)."""
    from trl import get_peft_config

    import trl_sharpen
    from trl_sharpen.script_utils import load_model_name_and_tokenizer, load_prompt_datasets

    output_dir = WORK / key
    shutil.rmtree(output_dir, ignore_errors=True)  # our own scratch folder: samples of another setting must not resume
    script_args, args, model_args = recipe_args(row.recipe, output_dir, [*row.overrides, *overrides])
    model_name, tokenizer = load_model_name_and_tokenizer(model_args, args)
    dataset = load_prompt_datasets(script_args)
    test_split = script_args.dataset_test_split
    trainer_class = getattr(trl_sharpen, row.trainer)
    start = time.perf_counter()
    trainer = trainer_class(
        model=model_name,
        args=args,
        train_dataset=dataset[script_args.dataset_train_split],
        # as the recipes do: the test prompts (no labels used) for monitoring and best-iterate selection
        eval_dataset=dataset[test_split] if args.eval_strategy != "no" and test_split in dataset else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    evaluations = [  # every monitoring evaluation (step 0 = pi_base): the selection comparison's input
        {"step": entry["step"], **{k: v for k, v in entry.items() if k.startswith("eval_") and isinstance(v, float)}}
        for entry in trainer.state.log_history
        if "eval_sharpening_error" in entry
    ]
    stats = {
        "train_seconds": time.perf_counter() - start,
        "steps": trainer.state.global_step,
        "selected_step": selected_step(trainer),
        "eval_strategy": str(args.eval_strategy),
        "load_best_model_at_end": bool(args.load_best_model_at_end),
        "metric_for_best_model": args.metric_for_best_model,
        "require_answer": getattr(args, "require_answer", None),
        "temperature": args.temperature,
        "self_reward": getattr(args, "self_reward", None),
        "evaluations": evaluations,
        "monitored_prompts": min(args.eval_num_prompts or len(dataset[test_split]), len(dataset[test_split])),
    }
    return trainer.accelerator.unwrap_model(trainer.model), stats, script_args, args


# Label-free selection signals compared on the runs' own monitoring evaluations (metric, higher is better)
SELECTION_SIGNALS = {
    "delta": ("eval_sharpening_error", False),
    "guarded delta": ("eval_guarded_sharpening_error", False),
    "J_beta": ("eval_objective", True),
    "base majority agreement": ("eval_base_majority_agreement", True),
}


def selection_comparison(rows: dict) -> list[str]:
    """Which evaluation each label-free signal would keep in each trained run, scored by the greedy accuracy the
    monitoring logged on its `eval_num_prompts` labelled prompts (labels only score). The target: no selected iterate
    below pi_base's (step 0) by more than one standard error."""
    lines = []
    for key in ROWS:
        evaluations = rows.get(key, {}).get("stats", {}).get("evaluations") or []
        base = next((e for e in evaluations if e["step"] == 0), None)
        if base is None or "eval_greedy_accuracy" not in base:
            continue
        n = rows[key]["stats"]["monitored_prompts"]
        p0 = base["eval_greedy_accuracy"]
        se = (p0 * (1 - p0) / n) ** 0.5
        cells = []
        for metric, higher in SELECTION_SIGNALS.values():
            scored = [e for e in evaluations if metric in e]
            if not scored:
                cells.append("-")
                continue
            # the Trainer keeps the first best on ties (strict improvement)
            best = scored[0]
            for e in scored[1:]:
                if (e[metric] > best[metric]) if higher else (e[metric] < best[metric]):
                    best = e
            accuracy = best.get("eval_greedy_accuracy", float("nan"))
            flag = " **below**" if accuracy < p0 - se else ""
            cells.append(f"step {best['step']}: {accuracy:.3f}{flag}")
        best_seen = max(e.get("eval_greedy_accuracy", 0.0) for e in evaluations)
        lines.append(f"| {ROWS[key].label} | {p0:.3f} ± {se:.3f} | {best_seen:.3f} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    header = "| run | pi_base (step 0) ± 1 SE | best seen | " + " | ".join(SELECTION_SIGNALS) + " |"
    return [
        "",
        "Selection by each label-free signal, scored by the greedy accuracy monitoring logged on its labelled eval "
        "prompts (step: accuracy; **below**: more than one standard error under pi_base's):",
        "",
        header,
        "|" + "---|" * (3 + len(SELECTION_SIGNALS)),
        *lines,
    ]


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(results: dict, command_note: str) -> str:
    lines = [
        "# Sharpening SmolLM2-135M-Instruct with LoRA on CPU, with monitoring and the guard on",
        "",
        "`python benchmarks/real_model_table.py` (see its docstring). Test prompts of each setting; the policy the run "
        f"returns (its selected iterate). avg@{NUM_SAMPLES} = mean accuracy of {NUM_SAMPLES} samples per prompt at "
        f"T = 1 and at the training temperature; maj@{NUM_SAMPLES} / pass@{NUM_SAMPLES} of the T = 1 samples; delta = "
        "sharpening error (Def. 3.1); log pi_base and length of the greedy outputs; top answer = share of prompts "
        "given the most common greedy answer; step = the selected iterate (0 = pi_base). One prompt of 200 is 0.005; "
        "the standard error of a greedy accuracy p on n prompts is sqrt(p(1-p)/n). 2 CPU cores shared with other "
        "jobs: wall times are upper bounds.",
        "",
        command_note,
    ]
    for setting_key, setting in SETTINGS.items():
        rows = {key.split("/", 1)[1]: value for key, value in results.items() if key.split("/", 1)[0] == setting_key}
        if not rows:
            continue
        base = rows.get("base")
        temperature = next((r["stats"]["temperature"] for r in rows.values() if "stats" in r), None)
        temperature = temperature if temperature is not None else (base or {}).get("train_temperature")
        t_label = "T" if temperature is None else f"T={temperature:g}"
        k = NUM_SAMPLES
        lines += [
            "",
            f"## {setting.title}",
            "",
            f"| row | prompts | greedy | avg@{k} T=1 | avg@{k} {t_label} | maj@{k} | pass@{k} | delta | "
            "log pi_base(greedy) | length | top answer | step | train s | eval s | run |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key in ROWS:
            if key not in rows:
                continue
            r = rows[key]
            stats = r.get("stats", {})
            step = "-" if not stats else f"{stats['selected_step']} of {stats['steps']}"
            lines.append(
                f"| {ROWS[key].label} | {r['num_prompts']} | {fmt(r['greedy'])} | {fmt(r['avg_t1'])} | "
                f"{fmt(r['avg_train_t'])} | {fmt(r['maj_t1'])} | {fmt(r['pass_t1'])} | {fmt(r['delta'])} | "
                f"{fmt(r['greedy_base_logprob'], 2)} | {fmt(r['length'], 1)} | {r['top_answer']!r} "
                f"({r['top_answer_share']:.2f}) | {step} | {fmt(stats.get('train_seconds'), 0)} | "
                f"{fmt(r['eval_seconds'], 0)} | {' '.join(r['overrides']) or ('recipe as is' if stats else '-')} |"
            )
        if base is not None and "bon" in base:
            bon = base["bon"]
            lines += [
                "",
                f"Base, BoN@{k} by {bon['reward']} at {t_label}: {bon['accuracy']:.3f}; BoN@{k} - greedy "
                f"{bon['mean']:+.3f}, paired bootstrap 95% interval [{bon['low']:+.3f}, {bon['high']:+.3f}]: "
                f"**{bon['verdict']}**.",
            ]
        lines += selection_comparison(rows)
        lines += ["", "Greedy outputs (first 3 test prompts):", ""]
        lines += [f"- {ROWS[key].label}: {rows[key]['examples']!r}" for key in ROWS if key in rows]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--num_prompts", type=int, default=None, help="Test prompts (default: the recipes' 200).")
    parser.add_argument("--output", default=str(RESULTS / "real_model_table_guarded.md"))
    parser.add_argument("--report_only", action="store_true", help="Rewrite the markdown from the stored rows.")
    parser.add_argument("overrides", nargs="*", help="Extra recipe flags for every trained row, after `--`.")
    args = parser.parse_args()
    if args.report_only:
        results = json.loads(Path(args.output).with_suffix(".json").read_text())
        commands = sorted({row["command"] for row in results.values()})
        Path(args.output).write_text(markdown(results, "Commands: " + "; ".join(f"`{c}`" for c in commands) + "."))
        print(Path(args.output).read_text())
        return
    import torch
    from transformers import AutoModelForCausalLM

    output = Path(args.output)
    store = output.with_suffix(".json")
    results = json.loads(store.read_text()) if store.is_file() else {}
    overrides = list(args.overrides)
    if args.num_prompts is not None:
        overrides += ["--num_eval_prompts", str(args.num_prompts)]
    command = "python benchmarks/real_model_table.py " + " ".join(
        ["--settings", *args.settings, "--rows", *args.rows]
        + (["--num_prompts", str(args.num_prompts)] if args.num_prompts else [])
        + (["--", *args.overrides] if args.overrides else [])
    )
    for setting_key in args.settings:
        setting = SETTINGS[setting_key]
        model_path, tokenizer, test, script_args, training_args = setup(setting, overrides)
        for key in args.rows:
            row = ROWS[key]
            start = time.perf_counter()
            if row.recipe is None:
                model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
                result = measure(model, tokenizer, test, script_args, training_args, [training_args.self_reward])
                result["train_temperature"] = training_args.temperature
            else:
                model, stats, row_script_args, row_args = train(
                    row, f"{setting_key}_{key}", [*setting.overrides, *overrides]
                )
                base_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
                if hasattr(model, "merge_and_unload"):
                    # LoRA merged into the weights: the same function, generated at the base model's speed (the
                    # unmerged adapter's extra matmuls made the evaluation several times slower on CPU)
                    model = model.merge_and_unload()
                result = measure(model, tokenizer, test, row_script_args, row_args, base_model=base_model)
                result["stats"] = stats
                del base_model
            result.update(
                num_prompts=len(test),
                overrides=[*row.overrides, *args.overrides],
                seconds=time.perf_counter() - start,
                command=command,
            )
            results[f"{setting_key}/{key}"] = result
            print(
                f"{setting_key}/{key}: greedy {result['greedy']:.3f}, avg@{NUM_SAMPLES} T=1 {result['avg_t1']:.3f}, "
                f"at T={training_args.temperature:g} {result['avg_train_t']:.3f}, maj {result['maj_t1']:.3f}, "
                f"pass {result['pass_t1']:.3f}, delta {result['delta']:.3f}, top answer "
                f"{result['top_answer_share']:.2f}, {result['seconds']:.0f} s",
                flush=True,
            )
            del model
            gc.collect()
            store.parent.mkdir(parents=True, exist_ok=True)
            store.write_text(json.dumps(results, indent=1) + "\n")
            output.write_text(markdown(results, f"Last command: `{command}`."))
    print("\n" + output.read_text())


if __name__ == "__main__":
    main()
