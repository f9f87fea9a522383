"""Does sharpening help a real model? `trl-sharpen eval` on SmolLM2-135M-Instruct and Gemma-3-270M, on the real tasks.

    python benchmarks/real_model_eval.py                       # every setting below (see the results file for time)
    python benchmarks/real_model_eval.py --only smollm2-chat   # settings whose name contains a string

Each setting is one `trl-sharpen eval` command (run in-process through `trl_sharpen.cli.main`, printed as a user
would type it): a model, a task in chat or few-shot form, a sampling temperature, N samples per prompt, and the three
self-rewards of the paper (App. A.2): `logprob`, `normalized_logprob`, `majority`. Few-shot prompts end at the stop
strings "\\n\\n" / "\\nQ:". The tasks come from `python -m trl_sharpen.tasks` (seed 0); the first `--num_prompts` test
prompts are used.

Writes `benchmarks/results/real_model_eval.md`: per setting greedy accuracy, sample accuracy, BoN@n per self-reward
(n = 1, 2, 4, 8), pass@n, the generation-verification gap and relative gap (Song et al. 2025) at n = N, the
sharpening error delta (Huang et al. 2025, Def. 3.1), mean completion length of greedy outputs and samples, and wall
time; then the list of settings where a self-reward's BoN@N beats greedy and where it does not. Each report.json and
samples.jsonl stays under `outputs/real_model_eval/<setting>/`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / "outputs" / "real_model_eval"
SELF_REWARDS = ("logprob", "normalized_logprob", "majority")


@dataclass(frozen=True)
class Setting:
    model: str  # short name of a bundled model package (trl_sharpen.real_models)
    task: str  # trl_sharpen.tasks name
    form: str  # chat or few_shot
    temperature: float
    max_new_tokens: int
    task_options: tuple[tuple[str, object], ...] = ()

    @property
    def data_name(self) -> str:
        options = "_".join(str(v) if not isinstance(v, tuple) else "".join(map(str, v)) for _, v in self.task_options)
        return f"{self.task}_{options + '_' if options else ''}{self.form}"

    @property
    def name(self) -> str:
        model = self.model.split("-")[0]
        return f"{model}-{self.form.replace('_', '')}-{self.data_name.removesuffix('_' + self.form)}-T{self.temperature:g}"


def settings() -> list[Setting]:
    """What a practitioner would try, in the order they run (CPU is scarce: the most informative first): the instruct
    model in chat form, the base model few-shot, the instruct model few-shot; the paper's temperature 1 and Mind the
    Gap's 0.7. Short completion limits: the answers are a number or True/False (chat answers may be a sentence;
    few-shot ones end at a stop string)."""
    smol, gemma = "smollm2-135m-instruct", "gemma-3-270m"
    add1 = (("level", "add1"),)
    return [
        Setting(smol, "arithmetic", "chat", 1.0, 16, add1),
        Setting(smol, "prontoqa", "chat", 1.0, 16),
        Setting(gemma, "arithmetic", "few_shot", 1.0, 8, add1),
        Setting(smol, "arithmetic", "chat", 0.7, 16, add1),
        Setting(smol, "prontoqa", "chat", 0.7, 16),
        Setting(gemma, "prontoqa", "few_shot", 1.0, 8),
        Setting(gemma, "arithmetic", "few_shot", 0.7, 8, add1),
        Setting(gemma, "prontoqa", "few_shot", 0.7, 8),
        Setting(smol, "arithmetic", "few_shot", 1.0, 8, add1),
        Setting(smol, "prontoqa", "few_shot", 1.0, 8),
        Setting(smol, "arithmetic", "chat", 1.0, 16, (("level", "add2"),)),
        Setting(gemma, "arithmetic", "few_shot", 1.0, 8, (("level", "add2"),)),
    ]


DEFAULT_NUM_PROMPTS = 40


def with_num_prompts(name: str, num_prompts: int) -> str:
    """A data folder's or run's name: other prompt counts than the default get their own (`...-p200`)."""
    return name if num_prompts == DEFAULT_NUM_PROMPTS else f"{name}-p{num_prompts}"


def task_options(setting: Setting, num_prompts: int) -> dict:
    return {"form": setting.form, "num_train": 40, "num_test": max(num_prompts, 40), **dict(setting.task_options)}


def data_command(setting: Setting, num_prompts: int) -> str:
    flags = " ".join(f"--{k} {v}" for k, v in task_options(setting, num_prompts).items())
    return f"python -m trl_sharpen.tasks {setting.task} {flags} --output_dir {WORK.relative_to(REPO)}/data/{with_num_prompts(setting.data_name, num_prompts)}"


def write_task(setting: Setting, num_prompts: int) -> Path:
    from trl_sharpen.tasks import generate_task
    from trl_sharpen.tasks.common import write_splits

    folder = WORK / "data" / with_num_prompts(setting.data_name, num_prompts)
    if not (folder / "test.jsonl").is_file():
        write_splits(generate_task(setting.task, **task_options(setting, num_prompts)), folder)
    return folder / "test.jsonl"


def shell_quote(arg: str) -> str:
    """As a shell user types it: `$'\\n\\nQ:'` for a stop string with newlines."""
    return (
        "$'" + arg.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"
        if "\n" in arg
        else shlex.quote(arg)
    )


def eval_argv(setting: Setting, data: Path, output_dir: Path, args) -> list[str]:
    argv = [
        "eval",
        "--model_name_or_path", setting.model,
        "--dataset_name", str(data),
        "--num_prompts", str(args.num_prompts),
        "--num_samples", str(args.num_samples),
        "--self_rewards", *SELF_REWARDS,
        "--answer_extractor", f"trl_sharpen.tasks.{setting.task}:extract_answer",
        "--temperature", f"{setting.temperature:g}",
        "--max_completion_length", str(setting.max_new_tokens),
        "--dtype", "float32",
        "--seed", "0",
        "--plots", "false",
        "--output_dir", str(output_dir),
    ]  # fmt: skip
    if setting.form == "few_shot":
        from trl_sharpen.tasks import STOP_STRINGS  # the tasks' few-shot format defines where a completion ends

        argv += ["--stop_strings", *STOP_STRINGS]
    return argv


def run(setting: Setting, args) -> dict:
    from trl_sharpen.cli import main as cli_main

    data = write_task(setting, args.num_prompts)
    output_dir = WORK / with_num_prompts(setting.name, args.num_prompts)
    argv = eval_argv(setting, data, output_dir, args)  # the model by short name: converted once, cached
    shown = eval_argv(setting, data.relative_to(REPO), output_dir.relative_to(REPO), args)
    command = "trl-sharpen " + " ".join(shell_quote(a) for a in shown)
    print(f"\n=== {setting.name}\n$ {command}", flush=True)
    done = output_dir / "command.txt"  # a finished setting with the same command is reused (--reuse)
    if args.reuse and done.is_file() and done.read_text() == command and (output_dir / "report.json").is_file():
        print("(reused)")
    else:
        cli_main(argv)
        done.write_text(command)
    report = json.loads((output_dir / "report.json").read_text())
    return {"setting": setting, "command": command, "report": report, "wall_s": report["wall_time_s"]["total"]}


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(results: list[dict], args, total_s: float) -> str:
    n_max = args.num_samples
    lines = [
        "# Does sharpening help a real model? (`python benchmarks/real_model_eval.py`)",
        "",
        f"{args.num_prompts} test prompts per setting, N = {n_max} samples per prompt, seed 0, float32 on CPU "
        f"(2 cores); total wall time {total_s / 60:.1f} min, the sum of the settings' `wall s` (model loading "
        "excluded). BoN@n and pass@n for n < N are exact subset "
        "expectations over the N samples. gap = BoN@N - sample accuracy (Song et al. 2025); rel = gap / (1 - sample "
        "accuracy); delta = mean sharpening error 1 - pi(y*|x), y* the complete sample or greedy output pi_base rates highest (Huang et al. 2025, Def. 3.1). len = mean "
        "completion length in tokens (greedy / samples / the sample BoN@N by logprob selects).",
        "",
        "| setting | T | greedy | sample | "
        + " | ".join(f"BoN@{n_max} {r}" for r in SELF_REWARDS)
        + f" | pass@{n_max} | gap lp / nlp / maj | rel gap lp / nlp / maj | delta | len greedy / sample / BoN lp | wall s |",
        "|---|---|---|---|" + "---|" * len(SELF_REWARDS) + "---|---|---|---|---|---|",
    ]
    for result in results:
        s, r = result["setting"], result["report"]
        bon = [r["best_of_n"][name][str(n_max)] for name in SELF_REWARDS]
        gaps = " / ".join(fmt(r["gap"][name], 2) for name in SELF_REWARDS)
        rel = " / ".join(fmt(r["relative_gap"][name], 2) for name in SELF_REWARDS)
        lengths = [r["greedy"].get("mean_length"), r.get("mean_sample_length")]
        lengths.append(r.get("best_of_n_length", {}).get("logprob", {}).get(str(n_max)))
        lines.append(
            f"| {s.name.rsplit('-T', 1)[0]} | {s.temperature:g} | {fmt(r['greedy']['accuracy'])} | "
            f"{fmt(r['sample_accuracy'])} | "
            + " | ".join(fmt(b) for b in bon)
            + f" | {fmt(r['pass_at_n'][str(n_max)])} | {gaps} | {rel} | {fmt(r['sharpening_error'], 2)} | "
            f"{' / '.join(fmt(x, 1) for x in lengths)} | {result['wall_s']:.0f} |"
        )
    lines += ["", f"## BoN@n curves (n = {', '.join(map(str, results[0]['report']['ns']))})", ""]
    lines += ["| setting | T | curve | " + " | ".join(f"n={n}" for n in results[0]["report"]["ns"]) + " |"]
    lines += ["|---|---|---|" + "---|" * len(results[0]["report"]["ns"])]
    for result in results:
        s, r = result["setting"], result["report"]
        curves = {f"BoN {name}": r["best_of_n"][name] for name in SELF_REWARDS} | {"pass@n": r["pass_at_n"]}
        for label, curve in curves.items():
            values = " | ".join(fmt(curve[str(n)]) for n in r["ns"])
            lines.append(f"| {s.name.rsplit('-T', 1)[0]} | {s.temperature:g} | {label} | {values} |")
    wins, losses = [], []
    for result in results:
        s, r = result["setting"], result["report"]
        for name in SELF_REWARDS:
            bon, greedy = r["best_of_n"][name][str(n_max)], r["greedy"]["accuracy"]
            entry = f"{s.name} {name}: BoN@{n_max} {bon:.3f} vs greedy {greedy:.3f}"
            (wins if bon > greedy else losses).append(entry)
    lines += ["", f"## Where BoN@{n_max} beats greedy ({len(wins)} of {len(wins) + len(losses)})", ""]
    lines += [f"- {w}" for w in wins] or ["- none"]
    lines += ["", f"## Where it does not (BoN@{n_max} <= greedy)", ""]
    lines += [f"- {w}" for w in losses] or ["- none"]
    lines += ["", "## Commands", "", "Data (written by the script when missing):", ""]
    lines += sorted({f"    {data_command(result['setting'], args.num_prompts)}" for result in results})
    lines += ["", "Evaluations:", ""] + [f"    {result['command']}" for result in results]
    return "\n".join(lines) + "\n"


def positive_int(text: str) -> int:
    """argparse type: refuse 0 and negatives before any data is written or model loaded."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--num_prompts", type=positive_int, default=DEFAULT_NUM_PROMPTS, help="Test prompts per setting (others than 40 "
        "get their own data and run folders, `<setting>-p<num_prompts>`)."
    )  # fmt: skip
    parser.add_argument("--num_samples", type=positive_int, default=8, help="N samples per prompt.")
    parser.add_argument("--only", nargs="*", default=None, help="Run the settings whose name contains one of these.")
    parser.add_argument("--output", default=str(RESULTS / "real_model_eval.md"))
    parser.add_argument("--reuse", action="store_true", help="Keep settings already run with the same command.")
    parser.add_argument(
        "--report_only", action="store_true", help="Only tabulate the settings already run (implies --reuse)."
    )
    args = parser.parse_args()
    chosen = [s for s in settings() if not args.only or any(key in s.name for key in args.only)]
    if not chosen:
        sys.exit(f"No setting matches {args.only}; names: {', '.join(s.name for s in settings())}")
    results = []
    args.reuse = args.reuse or args.report_only
    for setting in chosen:
        if (
            args.report_only
            and not (WORK / with_num_prompts(setting.name, args.num_prompts) / "command.txt").is_file()
        ):
            continue
        results.append(run(setting, args))
        text = markdown(results, args, sum(result["wall_s"] for result in results))
        Path(args.output).write_text(text)  # after every setting: a long run keeps what it finished
    print("\n" + text)


if __name__ == "__main__":
    main()
