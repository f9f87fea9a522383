"""The `trl-sharpen` command line.

    trl-sharpen bon --model_name_or_path trl_sharpen/toy/base_model --dataset_name trl_sharpen/toy/data \\
        --dataset_split test --num_samples 16 --output_dir outputs/bon
    trl-sharpen eval --model_name_or_path trl_sharpen/toy/base_model --dataset_name trl_sharpen/toy/data \\
        --dataset_split test --num_samples 16 --max_completion_length 48 --output_dir outputs/eval
    trl-sharpen convert gemma-3-270m

Every sub-command takes `--config file.yaml` as well (TRL's `TrlParser`); run `trl-sharpen <command> --help` for
its options. Models load through TRL's `ModelConfig` (`--dtype`, `--attn_implementation`, `--load_in_4bit`, ...).
Under `accelerate launch -m trl_sharpen.cli bon ...` the prompts are split across processes. Bad input gets one line,
`trl-sharpen: error: ...`; `--debug` (or TRL_SHARPEN_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Light imports only (standard library underneath): `trl-sharpen --help` must not load torch
from .errors import check_lora_options, check_model_path, check_output_dir, check_text_fields, clear_errors
from .output_dir import OutputFiles, output_dir_lock
from .real_models import ConvertArguments, resolve_model_name_or_path, run_convert
from .sampling_arguments import BestOfNSamplingArguments, SamplingArguments, check_int, field_like


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
        if self.answer_column is not None and self.answer_column == self.prompt_column:
            raise ValueError(f"--answer_column and --prompt_column are both {self.answer_column!r}; name two columns.")
        if self.num_prompts is not None:  # before reading the file: a count below 1 would select no prompts
            check_int("num_prompts", self.num_prompts, 1, "Use N >= 1 prompts, or leave it unset for all.")
        prompts = load_prompts(self.dataset_name, self.dataset_split, self.prompt_column, self.dataset_config)
        if self.num_prompts is not None:
            prompts = prompts.select(range(min(self.num_prompts, len(prompts))))
        return as_prompt_dataset(
            prompts, self.prompt_column, self.chat_prompts, self.answer_column, self.extract_reference_answers
        )


@dataclass(kw_only=True)
class ModelSourceArguments:
    """What TRL's `ModelConfig` (parsed next to these arguments) leaves out of model loading."""

    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})


@dataclass(kw_only=True)
class BestOfNArguments(PromptDataArguments, ModelSourceArguments, BestOfNSamplingArguments):
    """Arguments of `trl-sharpen bon`: inference-time Best-of-N sharpening (Huang et al. 2025, App. C). The sampling
    settings are `trl_sharpen.sampling_arguments.BestOfNSamplingArguments`; the model is TRL's `ModelConfig`."""

    output_dir: str = field(metadata={"help": "Where shards and the final `datasets` dataset are written."})
    overwrite: bool = field(default=False, metadata={"help": "Discard results from other arguments in output_dir."})
    samples_file: str | None = field(
        default=None,
        metadata={
            "help": "Best-of-N over samples generated elsewhere (vLLM, SGLang, TGI): a JSON-lines file with the N "
            "completions per prompt, optionally their log-probs (format: trl_sharpen.imported_samples). Replaces "
            "--dataset_name and sampling; the model scores and cross-checks."
        },
    )


@dataclass(kw_only=True)
class EvalArguments(PromptDataArguments, ModelSourceArguments, SamplingArguments):
    """Arguments of `trl-sharpen eval`: greedy, temperature-1, BoN@n and pass@n accuracy, the generation-verification
    gap, the sharpening error and answer diversity, from one set of N samples per prompt. The sampling settings are
    `trl_sharpen.sampling_arguments.SamplingArguments`; the model is TRL's `ModelConfig` (`--model_name_or_path`: a
    PEFT adapter folder is loaded with its base)."""

    base_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "pi_base for log-likelihoods and self-rewards when the model is not the base (default: the model "
            "itself, or the base of a PEFT adapter with the adapters disabled)."
        },
    )
    dataset_split: str = field_like(PromptDataArguments, "dataset_split", default="test")
    answer_column: str = field_like(PromptDataArguments, "answer_column", default="answer")
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
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Write report.json, samples.jsonl and the PNG plots here (default: print only)."},
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Write into an output_dir that holds files eval did not write (they are kept: a same-named file "
            "of yours is never replaced). Without it such a folder is refused."
        },
    )
    plots: bool = field(default=True, metadata={"help": "Draw the PNG plots into output_dir (needs matplotlib)."})
    temperature_1_samples: bool = field(
        default=True,
        metadata={
            "help": "When sampling at another temperature (or with top-p / top-k), also draw N samples per prompt at "
            "temperature 1 for avg@k / maj@k / pass@k there (the field's convention); costs a second round of sampling."
        },
    )


# Model loading: one place for every sub-command -----------------------------------------------------------------------

DTYPES = ("auto", "bfloat16", "float16", "float32")


def resolve_model_path(name_or_path: str | None, option: str = "--model_name_or_path") -> str:
    """The one place where the CLI turns a model argument into what `from_pretrained` loads: a GGUF file, an
    installed model package or a short name becomes its converted float folder (`trl_sharpen.real_models`); a local
    folder must hold a model (checked here, before transformers asks for unrelated packages)."""
    if not name_or_path:
        raise ValueError(
            f"Pass the model with {option}: a folder written by save_pretrained, a .gguf file, an installed model "
            "package or a Hub id."
        )
    resolved = str(resolve_model_name_or_path(name_or_path))
    check_model_path(name_or_path, resolved, option)
    return resolved


def check_not_the_model_folder(output_dir: str | None, model_path: str) -> None:
    """Results written into the model's own folder would mix with its files (a saved dataset's `state.json` beside
    `config.json`): refuse it before anything is written."""
    if output_dir is not None and Path(model_path).is_dir():
        if Path(output_dir).expanduser().resolve() == Path(model_path).expanduser().resolve():
            raise ValueError(f"output_dir {output_dir} is the model's folder: pass another folder for the results.")


def check_model_config(model_args) -> None:
    """`ModelConfig` fields that do not apply to sampling, or values that a YAML file slipped past argparse."""
    if model_args.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {model_args.dtype!r} (fp16 is `float16`).")
    if model_args.use_peft:
        raise ValueError(
            "--use_peft adds a new adapter for training; bon and eval sample from a model as it is. Pass a trained "
            "adapter folder as --model_name_or_path instead (it is loaded with its base)."
        )
    check_lora_options(model_args)  # --lora_r ... without --use_peft: ignored, say so
    if (model_args.load_in_4bit or model_args.load_in_8bit) and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(  # (transformers says so only once the data is loaded)
            "--load_in_4bit / --load_in_8bit need bitsandbytes, which is not installed: "
            'pip install "trl-sharpen[quantization]", or load the model unquantized.'
        )


def device():
    """The device rule of every sub-command: accelerate's, i.e. this process's GPU under `accelerate launch`, else
    the GPU if there is one, else the CPU."""
    from .distributed import distributed_state

    return distributed_state().device


def quantization_config_of(model_args):
    """TRL's `get_quantization_config`, except that the CLI's default `--dtype auto` is no 4-bit compute dtype (TRL
    passes dtype on as one, and `torch.auto` crashed with a traceback): the compute dtype is then bitsandbytes' own."""
    from trl import get_quantization_config

    if model_args.load_in_4bit and model_args.dtype == "auto":
        model_args = dataclasses.replace(model_args, dtype=None)
    return get_quantization_config(model_args)


def load_model(model_args, path: str, trust_remote_code: bool):
    """A causal LM (or a PEFT adapter with its base) from TRL's `ModelConfig` loading options, on `device()`
    (quantized models are placed by their device map)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    quantization_config = quantization_config_of(model_args)
    kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
    }
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map={"": str(device())})
    if (Path(path) / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model if quantization_config is not None else model.to(device())


def load_tokenizer(model, path: str, model_args, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if hasattr(model, "peft_config") and not (Path(path) / "tokenizer_config.json").is_file():
        path = model.peft_config[model.active_adapter].base_model_name_or_path  # adapters often ship none
    return AutoTokenizer.from_pretrained(path, revision=model_args.model_revision, trust_remote_code=trust_remote_code)


def check_same_tokenizer(base_model, base_path: str, tokenizer, model_args, trust_remote_code: bool) -> None:
    """pi_base scores the evaluated model's token ids: a base with another vocabulary would crash on an id it lacks
    (IndexError) or, worse, score other tokens and report a wrong log-likelihood without a word."""
    rows = base_model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise ValueError(
            f"--base_model_name_or_path {base_path} has {rows} token embeddings, fewer than the {len(tokenizer)} "
            "tokens of the evaluated model's tokenizer: it is another model family. Pass the base of the evaluated "
            "model (same tokenizer)."
        )
    if (Path(base_path) / "tokenizer_config.json").is_file() or (Path(base_path) / "tokenizer.json").is_file():
        base_tokenizer = load_tokenizer(base_model, base_path, model_args, trust_remote_code)
        if base_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"--base_model_name_or_path {base_path} has another tokenizer than the evaluated model (their "
                "vocabularies differ): its log-likelihoods of the model's token ids would be of other text. Pass the "
                "base of the evaluated model (same tokenizer)."
            )


# Sub-commands ---------------------------------------------------------------------------------------------------------


def run_best_of_n(args: BestOfNArguments, model_args):
    from .answers import answers_match, get_answer_extractor
    from .best_of_n_sampling import best_of_n
    from .distributed import distributed_state
    from .evaluation import evaluate_greedy
    from .self_rewards import get_self_reward

    # Everything that can be checked is checked before the model loads and the sampling starts
    check_model_config(model_args)
    check_output_dir(args.output_dir)
    get_self_reward(args.self_reward)  # an unknown name or 'module:function' path
    extractor = get_answer_extractor(args.answer_extractor)
    if args.samples_file is not None:
        from .imported_samples import check_settings_apply, samples_file_prompts

        check_settings_apply(args)  # temperature, N, ...: the engine drew the samples
        prompts = samples_file_prompts(args)  # every line checked, the prompt options applied, before the model loads
        args.dataset_name = args.samples_file  # named in the messages below
    else:
        prompts = args.load_prompts()
    if args.answer_column is not None and args.answer_column not in prompts.column_names:
        raise ValueError(
            f"--answer_column {args.answer_column!r} is not a column of {args.dataset_name} (columns: "
            f"{prompts.column_names}); name the column with the reference answers, or leave --answer_column unset."
        )
    if args.answer_column is not None:
        from .evaluation import reference_answers

        reference_answers(prompts, args.answer_column)  # rows without a reference: refused, as `eval` refuses them
    path = resolve_model_path(model_args.model_name_or_path)
    check_not_the_model_folder(args.output_dir, path)
    from .best_of_n_sampling import bon_output_files

    bon_output_files(args.output_dir, args.overwrite)  # a folder of the user's: refused before the model loads
    state = distributed_state()  # under `accelerate launch`: the shards are split across the processes
    model = load_model(model_args, path, args.trust_remote_code)
    tokenizer = load_tokenizer(model, path, model_args, args.trust_remote_code)
    if args.samples_file is not None:
        from .imported_samples import best_of_n_from_samples

        result = best_of_n_from_samples(
            model, tokenizer, prompts, sampling=args, output_dir=args.output_dir, overwrite=args.overwrite
        )
    else:
        result = best_of_n(
            model, tokenizer, prompts, sampling=args, output_dir=args.output_dir, overwrite=args.overwrite
        )
    if state.is_main_process:
        samples = sum(result["num_samples"])
        print(f"Best-of-N: {len(result)} prompts, {samples} samples, saved to {args.output_dir}")
        if args.answer_column is not None:
            answers = result[args.answer_column]
            greedy = evaluate_greedy(
                model,
                tokenizer,
                result["prompt"],
                answers,
                # the same answer extractor as Best-of-N's, so the two accuracies compare like with like
                checker=lambda completion, reference: answers_match(completion, reference, extractor),
                max_new_tokens=args.max_completion_length,
                stop_strings=args.stop_strings,
            )
            selected = result["selected_completion"]
            bon = [c is not None and answers_match(c, a, extractor) for c, a in zip(selected, answers, strict=True)]
            print(f"greedy accuracy:            {greedy.accuracy:.3f}")
            n = max(result["num_samples"]) if args.samples_file else args.num_samples  # a samples file sets its N
            print(f"BoN@{n} accuracy ({args.self_reward}): {sum(bon) / len(bon):.3f}")
    return result


def run_eval(args: EvalArguments, model_args):
    from .evaluation import evaluate_sharpening, reference_answers
    from .metrics import validate_sample_count
    from .report import format_report

    check_model_config(model_args)
    check_output_dir(args.output_dir)
    self_rewards = [] if [r.lower() for r in args.self_rewards] == ["none"] else list(args.self_rewards)
    validate_sample_count(args.num_samples, self_rewards)  # before loading anything
    prompts = args.load_prompts()
    answers = reference_answers(prompts, args.answer_column)  # fail before loading a model
    path = resolve_model_path(model_args.model_name_or_path)
    check_not_the_model_folder(args.output_dir, path)
    # Only files an earlier eval wrote are replaced: a folder of the user's is refused before the model loads
    files = None
    if args.output_dir is not None:
        planned = ("report.json", "samples.jsonl", "accuracy_vs_n.png", "loglik_histogram.png")  # plots.PLOT_FILES
        files = OutputFiles(args.output_dir, "eval", overwrite=args.overwrite, planned=planned)
    base_path = None
    if args.base_model_name_or_path is not None:
        base_path = resolve_model_path(args.base_model_name_or_path, "--base_model_name_or_path")
    model = load_model(model_args, path, args.trust_remote_code)
    is_adapter = hasattr(model, "peft_config")
    if base_path is not None:
        base_model = load_model(model_args, base_path, args.trust_remote_code)
    else:
        base_model = model if is_adapter else None  # an adapter's base: the same weights with adapters disabled
    tokenizer = load_tokenizer(model, path, model_args, args.trust_remote_code)
    if base_path is not None:
        check_same_tokenizer(base_model, base_path, tokenizer, model_args, args.trust_remote_code)
    report = evaluate_sharpening(
        model,
        tokenizer,
        prompts["prompt"],
        answers,
        sampling=args,
        checker=args.checker,
        base_model=base_model,
        self_rewards=self_rewards,
        temperature_1_samples=args.temperature_1_samples,
    )
    report.model_name = path
    report.base_model_name = base_path or (f"{path} with adapters disabled" if is_adapter else path)
    report.settings.update(dataset=args.dataset_name, split=args.dataset_split)
    print(format_report(report), flush=True)
    if args.output_dir is not None:
        output_dir = Path(args.output_dir)
        files.claim("report.json", "samples.jsonl")  # a same-named file of the user's (appeared since): refused
        written = [report.save_json(output_dir / "report.json"), report.save_samples(output_dir / "samples.jsonl")]
        if args.plots:
            try:
                from .plots import PLOT_FILES, save_plots

                files.claim(*PLOT_FILES)
                written += list(save_plots(report, output_dir).values())
            except ImportError as error:
                print(f"Skipping the plots: {error}", file=sys.stderr)
        print("\nwrote " + ", ".join(str(p) for p in written))
    return report


def _with_model_config(*classes):
    from trl import ModelConfig

    return (*classes, ModelConfig)


COMMANDS = {
    "bon": ((BestOfNArguments,), run_best_of_n),
    "eval": ((EvalArguments,), run_eval),
    "convert": ((ConvertArguments,), run_convert),
}
MODEL_COMMANDS = ("bon", "eval")  # parsed with TRL's ModelConfig
LOCKED_COMMANDS = ("bon", "eval")  # their output_dir is locked for the run (convert locks its own folders)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with clear_errors(argv=argv):
            _main(argv)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback from wherever the sampling loop was
        resume = " bon keeps the shards it wrote: the same command resumes from them." if argv[:1] == ["bon"] else ""
        print(f"trl-sharpen: interrupted.{resume}", file=sys.stderr, flush=True)
        sys.exit(130)


def _main(argv: list[str]) -> None:
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

    classes, run = COMMANDS[argv[0]]
    positional = getattr(classes[0], "positional_argument", None)  # e.g. `trl-sharpen convert FILE`
    if positional and len(argv) > 1 and not argv[1].startswith("-"):
        argv = [argv[0], f"--{positional}", *argv[1:]]
    if argv[0] in MODEL_COMMANDS:
        classes = _with_model_config(*classes)
    parser = TrlParser(classes, prog=f"trl-sharpen {argv[0]}")
    if argv[0] in MODEL_COMMANDS:
        parser.set_defaults(dtype="auto")  # the checkpoint's own dtype (TRL's scripts default to float32)
    parsed = parser.parse_args_and_config(argv[1:])
    check_text_fields(*parsed)  # a YAML `dataset_name: 5`, `output_dir: null`, `stop_strings: "\n"`: refused here
    output_dir = getattr(parsed[0], "output_dir", None) if argv[0] in LOCKED_COMMANDS else None
    check_output_dir(output_dir)  # before the lock creates the folder: not '', '.', home, /, a file, unwritable
    with output_dir_lock(output_dir):  # a second run on the same folder is refused, naming the first
        run(*parsed)


if __name__ == "__main__":
    main()
