"""The `trl-sharpen` command line.

    trl-sharpen bon --model_name_or_path trl_sharpen/toy/base_model --dataset_name trl_sharpen/toy/data \\
        --dataset_split test --num_samples 16 --output_dir outputs/bon
    trl-sharpen eval --model_name_or_path trl_sharpen/toy/base_model --dataset_name trl_sharpen/toy/data \\
        --dataset_split test --num_samples 16 --max_new_tokens 48 --output_dir outputs/eval

Every sub-command takes `--config file.yaml` as well (TRL's `TrlParser`); run `trl-sharpen <command> --help` for
its options. Under `accelerate launch -m trl_sharpen.cli bon ...` the prompts are split across processes.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

from .best_of_n_sampling import TRUNCATION_POLICIES
from .real_models import ConvertArguments, resolve_model_name_or_path, run_convert


@dataclass(kw_only=True)
class PromptDataArguments:
    """Where the prompts (and reference answers) come from; shared by the sub-commands."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Prompts: a saved dataset, a .jsonl/.json/.csv/.parquet/.txt file, or a dataset name."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration (e.g. `main`)."})
    dataset_split: str = field(default="train", metadata={"help": "Split to read when the dataset has several."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompts (e.g. `question`)."})
    chat_prompts: bool = field(
        default=False,
        metadata={"help": "Wrap plain-text prompts as one user message, so the tokenizer's chat template applies."},
    )
    answer_column: str | None = field(default=None, metadata={"help": "Column holding the reference answers."})
    extract_reference_answers: bool = field(
        default=False,
        metadata={"help": "References are worked solutions (GSM8K's '... #### 72'): compare with their final answer."},
    )
    num_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})

    def load_prompts(self):
        """The prompts as a dataset with a `prompt` column (see `trl_sharpen.data.as_prompt_dataset`)."""
        from .data import as_prompt_dataset, load_prompts

        if self.dataset_name is None:
            raise ValueError("Pass the prompts with --dataset_name (a file, a saved dataset or a dataset name).")
        prompts = load_prompts(self.dataset_name, self.dataset_split, self.prompt_column, self.dataset_config)
        if self.num_prompts is not None:
            prompts = prompts.select(range(min(self.num_prompts, len(prompts))))
        return as_prompt_dataset(
            prompts, self.prompt_column, self.chat_prompts, self.answer_column, self.extract_reference_answers
        )


@dataclass(kw_only=True)
class BestOfNArguments(PromptDataArguments):
    """Arguments of `trl-sharpen bon`: inference-time Best-of-N sharpening (Huang et al. 2025, App. C)."""

    model_name_or_path: str = field(
        metadata={"help": "Model to sample from and score with (path, Hub id, .gguf file or model package)."}
    )
    output_dir: str = field(metadata={"help": "Where shards and the final `datasets` dataset are written."})
    num_samples: int = field(default=16, metadata={"help": "N: completions sampled per prompt."})
    self_reward: str = field(
        default="logprob",
        metadata={"help": "logprob, normalized_logprob, majority, or 'package.module:function'."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (paper: 1.0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (1.0 = off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Maximum completion length (paper: 512)."})
    generation_batch_size: int = field(default=64, metadata={"help": "Sequences per generate call."})
    truncated_completions: str = field(
        default="keep",
        metadata={
            "help": "Completions without EOS are never selected while a complete one exists; when all are: keep or "
            "penalize select the best prefix, drop selects none.",
            "choices": list(TRUNCATION_POLICIES),
        },
    )
    truncation_penalty: float = field(
        default=100.0, metadata={"help": "Subtracted from the stored rewards of truncated completions (penalize)."}
    )
    adaptive_delta: float | None = field(
        default=None, metadata={"help": "Enable adaptive sampling (App. D) with this delta in (0, 1)."}
    )
    adaptive_round_size: int = field(default=4, metadata={"help": "Samples per active prompt per adaptive round."})
    answer_extractor: str | None = field(
        default=None, metadata={"help": "'package.module:function' for the majority reward (default: last number)."}
    )
    answer_column: str | None = field(
        default=None,
        metadata={"help": "Column with reference answers: if set, print greedy and Best-of-N accuracy side by side."},
    )
    shard_size: int = field(default=64, metadata={"help": "Prompts per shard (unit of resumption)."})
    overwrite: bool = field(default=False, metadata={"help": "Discard results from other arguments in output_dir."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, bfloat16, float16 or float32."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})


def run_best_of_n(args: BestOfNArguments):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .answers import answers_match, get_answer_extractor
    from .best_of_n_sampling import best_of_n
    from .distributed import distributed_state
    from .evaluation import evaluate_greedy

    prompts = args.load_prompts()
    state = distributed_state()  # under `accelerate launch`: the shards are split across the processes
    args.model_name_or_path = resolve_model_name_or_path(args.model_name_or_path)  # GGUF / package: converted folder
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_name_or_path, dtype=dtype, trust_remote_code=args.trust_remote_code
    ).to(state.device)
    result = best_of_n(
        model,
        tokenizer,
        prompts,
        num_samples=args.num_samples,
        self_reward=args.self_reward,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        generation_batch_size=args.generation_batch_size,
        truncated_completions=args.truncated_completions,
        truncation_penalty=args.truncation_penalty,
        adaptive_delta=args.adaptive_delta,
        adaptive_round_size=args.adaptive_round_size,
        answer_extractor=args.answer_extractor,
        output_dir=args.output_dir,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        seed=args.seed,
    )
    if state.is_main_process:
        samples = sum(result["num_samples"])
        print(f"Best-of-N: {len(result)} prompts, {samples} samples, saved to {args.output_dir}")
        if args.answer_column is not None:
            extractor = get_answer_extractor(args.answer_extractor)
            answers = result[args.answer_column]
            greedy = evaluate_greedy(model, tokenizer, result["prompt"], answers, max_new_tokens=args.max_new_tokens)
            selected = result["selected_completion"]
            bon = [c is not None and answers_match(c, a, extractor) for c, a in zip(selected, answers, strict=True)]
            print(f"greedy accuracy:            {greedy.accuracy:.3f}")
            print(f"BoN@{args.num_samples} accuracy ({args.self_reward}): {sum(bon) / len(bon):.3f}")
    return result


@dataclass(kw_only=True)
class EvalArguments(PromptDataArguments):
    """Arguments of `trl-sharpen eval`: greedy, temperature-1, BoN@n and pass@n accuracy, the generation-verification
    gap, the sharpening error and answer diversity, from one set of N samples per prompt."""

    model_name_or_path: str = field(
        metadata={"help": "Model to evaluate (path or Hub id); a PEFT adapter folder is loaded with its base."}
    )
    base_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "pi_base for log-likelihoods and self-rewards when the model is not the base (default: the model "
            "itself, or the base of a PEFT adapter with the adapters disabled)."
        },
    )
    dataset_split: str = field(default="test", metadata={"help": "Split to read when the dataset has several."})
    answer_column: str = field(default="answer", metadata={"help": "Column holding the reference answers."})
    num_samples: int = field(
        default=16, metadata={"help": "N: completions sampled per prompt; smaller n are obtained by subsampling."}
    )
    self_rewards: list[str] = field(
        default_factory=lambda: ["logprob", "normalized_logprob", "majority"],
        metadata={"help": "Self-rewards for Best-of-N (names or 'package.module:function'); 'none' for no BoN."},
    )
    checker: str | None = field(
        default=None,
        metadata={
            "help": "'package.module:function(completion, reference) -> bool' (default: extracted answer == reference)."
        },
    )
    answer_extractor: str | None = field(
        default=None,
        metadata={"help": "'package.module:function' extracting the final answer (default: last number)."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (paper: 1.0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (1.0 = off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Maximum completion length (paper: 512)."})
    generation_batch_size: int = field(default=64, metadata={"help": "Sequences per generate call."})
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Write report.json, samples.jsonl and the PNG plots here (default: print only)."},
    )
    plots: bool = field(default=True, metadata={"help": "Draw the PNG plots into output_dir (needs matplotlib)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, bfloat16, float16 or float32."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})


def run_eval(args: EvalArguments):
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluation import evaluate_sharpening, reference_answers
    from .metrics import validate_sample_count
    from .report import format_report

    self_rewards = [] if [r.lower() for r in args.self_rewards] == ["none"] else list(args.self_rewards)
    validate_sample_count(args.num_samples, self_rewards)  # before loading anything
    prompts = args.load_prompts()
    answers = reference_answers(prompts, args.answer_column)  # fail before loading a model
    # A GGUF file or model package: its converted float folder (converted once, cached)
    args.model_name_or_path = resolve_model_name_or_path(args.model_name_or_path)
    args.base_model_name_or_path = resolve_model_name_or_path(args.base_model_name_or_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    load = {"dtype": dtype, "trust_remote_code": args.trust_remote_code}
    is_adapter = (Path(args.model_name_or_path) / "adapter_config.json").is_file()
    if is_adapter:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(args.model_name_or_path, **load)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **load)
    model.to(device)
    if args.base_model_name_or_path is not None:
        base_model = AutoModelForCausalLM.from_pretrained(args.base_model_name_or_path, **load).to(device)
    else:
        base_model = model if is_adapter else None  # an adapter's base: the same weights with adapters disabled
    tokenizer_path = args.model_name_or_path
    if is_adapter and not (Path(tokenizer_path) / "tokenizer_config.json").is_file():
        tokenizer_path = model.peft_config[model.active_adapter].base_model_name_or_path  # adapters often ship none
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=args.trust_remote_code)
    report = evaluate_sharpening(
        model,
        tokenizer,
        prompts["prompt"],
        answers,
        num_samples=args.num_samples,
        checker=args.checker,
        answer_extractor=args.answer_extractor,
        base_model=base_model,
        self_rewards=self_rewards,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.generation_batch_size,
        seed=args.seed,
    )
    report.model_name = args.model_name_or_path
    report.base_model_name = args.base_model_name_or_path or (
        f"{args.model_name_or_path} with adapters disabled" if is_adapter else args.model_name_or_path
    )
    report.settings.update(dataset=args.dataset_name, split=args.dataset_split)
    print(format_report(report), flush=True)
    if args.output_dir is not None:
        output_dir = Path(args.output_dir)
        written = [report.save_json(output_dir / "report.json"), report.save_samples(output_dir / "samples.jsonl")]
        if args.plots:
            try:
                from .plots import save_plots

                written += list(save_plots(report, output_dir).values())
            except ImportError as error:
                print(f"Skipping the plots: {error}", file=sys.stderr)
        print("\nwrote " + ", ".join(str(p) for p in written))
    return report


COMMANDS = {
    "bon": (BestOfNArguments, run_best_of_n),
    "eval": (EvalArguments, run_eval),
    "convert": (ConvertArguments, run_convert),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        print(f"\ncommands: {', '.join(COMMANDS)}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            sys.exit(2)
        return
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # trl_sharpen's INFO lines (one per process under `accelerate launch`), only warnings from everything else
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("trl_sharpen").setLevel(logging.INFO)
    from trl import TrlParser

    arguments_class, run = COMMANDS[argv[0]]
    positional = getattr(arguments_class, "positional_argument", None)  # e.g. `trl-sharpen convert FILE`
    if positional and len(argv) > 1 and not argv[1].startswith("-"):
        argv = [argv[0], f"--{positional}", *argv[1:]]
    parser = TrlParser(arguments_class, prog=f"trl-sharpen {argv[0]}")
    (args,) = parser.parse_args_and_config(argv[1:])
    run(args)


if __name__ == "__main__":
    main()
