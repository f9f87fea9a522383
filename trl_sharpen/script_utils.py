"""Pieces shared by the recipes in `recipes/`: script arguments, run setup, dataset loading, the before/after report
(`GreedyReportCallback`) and the end of a run. Each recipe's `main()` reads as the sequence seed -> logging ->
tokenizer -> data -> trainer -> report callback -> train -> save, with the steps below."""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import fnmatch
import functools
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import transformers
from datasets import DatasetDict
from transformers import AutoTokenizer
from trl import ScriptArguments

from .answers import answers_match, get_answer_extractor
from .callbacks import GreedyReportCallback
from .checkpoints import check_resume_checkpoint, resolve_resume_value
from .data import (
    as_prompt_dataset,
    check_dataset_path,
    ensure_pad_token,
    is_saved_dataset,
    load_prompts,
    read_data_files,
)
from .distributed import print_rank_summary
from .errors import check_model_path, check_output_dir
from .output_dir import OutputFiles, acquire_output_dir
from .real_models import resolve_model_name_or_path
from .sampling_arguments import check_int, warn_deprecated
from .toy import TOY_DATA_DIR, TOY_MODEL_PATH


logger = logging.getLogger(__name__)


@dataclass
class SharpenScriptArguments(ScriptArguments):
    """TRL's `ScriptArguments`, defaulting to the bundled toy task, plus the held-out greedy evaluation that recipes
    print before and after training."""

    dataset_name: str | None = field(
        default=TOY_DATA_DIR,
        metadata={"help": "Path or name of the prompt dataset (default: the bundled toy task's prompts)."},
    )
    num_train_prompts: int | None = field(
        default=None, metadata={"help": "Use only the first N training prompts (default: all)."}
    )
    answer_column: str | None = field(
        default="answer",
        metadata={
            "help": "Column with the reference answers; greedy accuracy on the test split is printed before and after "
            "training when it exists. Set to null to skip. Formerly `eval_answer_column` (the CLI's name is this one)."
        },
    )
    num_eval_prompts: int = field(default=200, metadata={"help": "Test prompts used for the greedy evaluation."})
    eval_max_completion_length: int = field(
        default=64, metadata={"help": "Generation length of the greedy evaluation. Formerly `eval_max_new_tokens`."}
    )
    report_num_samples: int = field(
        default=8,
        metadata={
            "help": "Before and after training, also sample the policy k times per test prompt at the run's "
            "temperature and at 1, and print the field's avg@k, maj@k and pass@k (0: greedy only). Costs k sampled "
            "completions per prompt and temperature, twice."
        },
    )
    prompt_column: str = field(
        default="prompt",
        metadata={"help": "Column holding the prompts, renamed to `prompt` (e.g. `question` for openai/gsm8k)."},
    )
    chat_prompts: bool = field(
        default=False,
        metadata={
            "help": "Wrap plain-text prompts as one user message, so the tokenizer's chat template is applied "
            "(instruct models)."
        },
    )
    extract_reference_answers: bool = field(
        default=False,
        metadata={
            "help": "The reference answers are worked solutions (openai/gsm8k: '... #### 72'): compare against the "
            "final answer extracted from them (last \\boxed{} or last number)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into an output_dir that holds another run's checkpoints or model (other arguments): its "
            "checkpoint-<step> folders are deleted first. Without it such a folder is refused (resume it with "
            "--resume_from_checkpoint true instead)."
        },
    )
    # Old names, hidden from --help, still read (with a FutureWarning)
    eval_answer_column: str | None = field(default=None, metadata={"help": argparse.SUPPRESS})
    eval_max_new_tokens: int | None = field(default=None, metadata={"help": argparse.SUPPRESS})

    def __post_init__(self):
        for old, new in (
            ("eval_answer_column", "answer_column"),
            ("eval_max_new_tokens", "eval_max_completion_length"),
        ):
            if getattr(self, old) is not None:
                warn_deprecated(old, new)
                setattr(self, new, getattr(self, old))
                setattr(self, old, None)
        # Sizes below 1 would select no prompts (an empty run) or an empty greedy report
        if self.num_train_prompts is not None:
            check_int("num_train_prompts", self.num_train_prompts, 1, "Use N >= 1, or leave it unset for all.")
        check_int("num_eval_prompts", self.num_eval_prompts, 1, "Set the test prompts of the greedy report, e.g. 200.")
        check_int("eval_max_completion_length", self.eval_max_completion_length, 1, "Set it, e.g. 64.")


def load_prompt_datasets(script_args: SharpenScriptArguments) -> DatasetDict:
    if is_saved_dataset(script_args.dataset_name):
        from datasets import load_from_disk

        dataset = load_from_disk(script_args.dataset_name)
    elif Path(script_args.dataset_name).expanduser().is_file():
        # One file (.jsonl, .csv, ...) is the train split, read as `trl-sharpen bon` / `eval` read it (`load_dataset`
        # on a file path looks for a folder of data files and finds none)
        prompts = load_prompts(
            str(Path(script_args.dataset_name).expanduser()), prompt_column=script_args.prompt_column
        )
        dataset = DatasetDict({script_args.dataset_train_split: prompts})
    else:
        check_dataset_path(script_args.dataset_name)  # a missing or empty local file: say so, do not ask the Hub
        dataset = read_data_files(script_args.dataset_name, name=script_args.dataset_config)
    if script_args.num_train_prompts is not None:
        train = dataset[script_args.dataset_train_split]
        dataset[script_args.dataset_train_split] = train.select(range(min(len(train), script_args.num_train_prompts)))
    return as_prompt_dataset(
        dataset,
        script_args.prompt_column,
        script_args.chat_prompts,
        script_args.answer_column,
        script_args.extract_reference_answers,
    )


def add_greedy_report(trainer, dataset: DatasetDict, script_args: SharpenScriptArguments) -> None:
    """Add the before/after greedy report (`GreedyReportCallback`) on the test split, when it has reference answers."""
    split, column = script_args.dataset_test_split, script_args.answer_column
    if column is None or split not in dataset or column not in dataset[split].column_names:
        return
    test = dataset[split].select(range(min(len(dataset[split]), script_args.num_eval_prompts)))
    # The run's answer extractor reads the greedy outputs too: with the default (last number) a True/False task such
    # as ProntoQA would score every greedy output as wrong
    extractor = get_answer_extractor(getattr(trainer.args, "answer_extractor", None))
    trainer.add_callback(
        GreedyReportCallback(
            trainer,
            test,
            answer_column=column,
            max_new_tokens=script_args.eval_max_completion_length,
            checker=functools.partial(answers_match, extractor=extractor),
            name=split,
            # the policy's own samples, at the run's sampling temperature and at the field's T = 1
            num_samples=script_args.report_num_samples,
            temperatures=(getattr(trainer.args, "temperature", 1.0), 1.0),
            answer_extractor=extractor,
            seed=getattr(trainer.args, "seed", 0),
        )
    )


def setup_run(training_args, script_args=None, model_args=None) -> None:
    """Seed and logging, as TRL's example scripts do, then claim the output_dir (`claim_output_dir`)."""
    transformers.set_seed(training_args.seed)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    claim_output_dir(training_args, script_args, model_args)


RUN_FILE = "_trl_sharpen_run.json"  # the arguments of the run that wrote output_dir (`_`: not pushed to the Hub)
# Settings that may change between a run and its continuation without making it another run
_NOT_RUN_ARGUMENTS = {
    "output_dir", "logging_dir", "resume_from_checkpoint", "overwrite_output_dir", "run_name", "report_to",
    "push_to_hub", "hub_model_id", "hub_token", "hub_strategy", "hub_private_repo", "local_rank", "dataloader_num_workers",
    "logging_steps", "disable_tqdm", "log_level", "log_level_replica", "eval_steps", "save_steps", "save_total_limit",
}  # fmt: skip


def run_arguments(*arguments) -> dict:
    """The settings that define a run, as JSON values (each dataclass's fields, minus `_NOT_RUN_ARGUMENTS`)."""
    values = {}
    for value in arguments:
        if value is None:
            continue
        fields = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
        for key, item in fields.items():
            if key not in _NOT_RUN_ARGUMENTS and not key.startswith("_"):
                values[key] = json.loads(json.dumps(item, default=repr))
    return values


def _holds_results(folder: Path) -> list[str]:
    """What in `folder` is a trained result another run would overwrite: checkpoints and a saved model."""
    found = sorted(p.name for p in folder.glob("checkpoint-*") if p.is_dir())
    found += [name for name in ("model.safetensors", "adapter_model.safetensors") if (folder / name).is_file()]
    return found


# What a recipe run writes into output_dir (transformers' save_model / checkpoints / model card / logs, BoN-SFT's data)
RECIPE_WRITES = (
    RUN_FILE, "checkpoint-*", "README.md", "config.json", "generation_config.json", "*.safetensors",
    "*.safetensors.index.json", "pytorch_model*.bin", "adapter_config.json", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "vocab.*", "merges.txt", "*.model", "training_args.bin",
    "*results.json", "trainer_state.json", "runs", "bon_data",
)  # fmt: skip


def _recipe_files(folder: Path) -> set[str]:
    """A folder a recipe wrote before the file manifest existed (its run file names it): the names a recipe writes."""
    if not (folder / RUN_FILE).is_file():
        return set()
    return {p.name for p in folder.iterdir() if any(fnmatch.fnmatchcase(p.name, w) for w in RECIPE_WRITES)}


def _is_trainer_checkpoint(folder: Path) -> bool:
    """A `checkpoint-<step>` folder as transformers writes it (its trainer_state.json)."""
    return (folder / "trainer_state.json").is_file()


def claim_output_dir(training_args, script_args=None, model_args=None) -> None:
    """Before anything is loaded: refuse an unsafe output_dir ('', '.', home, /), lock it for this run (a second run
    on it is refused, naming this one), and refuse a folder holding another run's checkpoints or model written with
    other arguments unless this run resumes it (`resume_from_checkpoint`) or overwrites it (`overwrite_output_dir`).
    The run's arguments are then recorded in `<output_dir>/_trl_sharpen_run.json`."""
    check_output_dir(training_args.output_dir)
    folder = Path(training_args.output_dir)
    for source, option in ((getattr(model_args, "model_name_or_path", None), "model_name_or_path"),
                           (getattr(script_args, "dataset_name", None), "dataset_name")):  # fmt: skip
        if source and Path(source).expanduser().exists() and Path(source).expanduser().resolve() == folder.resolve():
            raise ValueError(
                f"output_dir {folder} is the --{option} folder: saving the trained model there would overwrite the "
                "files it was loaded from. Pass another --output_dir."
            )
    atexit.register(acquire_output_dir(training_args.output_dir))
    if not training_args.process_index == 0:
        return
    resume = resolve_resume_value(training_args.resume_from_checkpoint, folder)  # `true`: there must be one
    overwrite = bool(getattr(script_args, "overwrite_output_dir", False))
    current = run_arguments(script_args, training_args, model_args)
    results, discard = _holds_results(folder), []
    if results and resume is None:
        try:
            previous = json.loads((folder / RUN_FILE).read_text())
        except (OSError, ValueError):
            previous = None
        changed = {}
        if previous is not None:
            changed = {k: (previous.get(k), v) for k, v in current.items() if k in previous and previous[k] != v}
        if overwrite:
            # Only Trainer checkpoints are discarded: a user's folder that happens to be named checkpoint-<n> is kept
            foreign = [n for n in results if n.startswith("checkpoint-") and not _is_trainer_checkpoint(folder / n)]
            if foreign:
                raise ValueError(
                    f"output_dir {folder} holds {', '.join(foreign[:3])}, which is not a Trainer checkpoint (no "
                    "trainer_state.json): --overwrite_output_dir never deletes it. Move it away, or pass another "
                    "--output_dir."
                )
            discard = [name for name in results if name.startswith("checkpoint-")]  # once the folder passed below
        elif previous is None or changed:
            what = ", ".join(results[:3]) + (f" and {len(results) - 3} more" if len(results) > 3 else "")
            why = (
                "of another run whose arguments were not recorded"
                if previous is None
                else "of a run with other arguments ("
                + ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(changed.items())[:5])
                + ")"
            )
            raise ValueError(
                f"output_dir {folder} holds {what} {why}: this run would overwrite them. Resume that run with "
                "--resume_from_checkpoint true, discard its checkpoints with --overwrite_output_dir true, or pass "
                "another --output_dir."
            )
    if resume is None:
        # The saved model, its card (README.md), tokenizer and training_args.bin replace same-named files: a folder of
        # the user's is refused (with --overwrite_output_dir written beside its files, never over them)
        OutputFiles(
            folder,
            "recipe",
            overwrite=overwrite,
            overwrite_hint="--overwrite_output_dir true",
            legacy=_recipe_files,
            planned=tuple(name for name in RECIPE_WRITES if name != "checkpoint-*"),  # checkpoints: handled above
            who="a trl-sharpen recipe",
        ).claim(RUN_FILE)
    for name in discard:
        shutil.rmtree(folder / name)  # the user asked; checkpoints of the earlier run must not mix in
    if discard:
        logger.warning("overwrite_output_dir: discarded %s in %s.", ", ".join(discard), folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_FILE).write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")


def load_model_name_and_tokenizer(model_args, training_args):
    """The model to train (default: the bundled toy base) with `ModelConfig`'s loading options moved into the
    trainer's `model_init_kwargs`, and its tokenizer (EOS as pad token when it has none)."""
    # A GGUF file or model package becomes its converted float folder (once, cached; other ranks wait for it). The
    # rewritten `model_name_or_path` is what the trainer, a reference model and the tokenizer then load.
    requested = model_args.model_name_or_path or TOY_MODEL_PATH
    model_args.model_name_or_path = resolve_model_name_or_path(requested)
    check_model_path(requested, model_args.model_name_or_path)  # a non-model folder: say so before TRL loads it
    model_name = model_args.model_name_or_path
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    tokenizer = AutoTokenizer.from_pretrained(
        model_name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
    )
    ensure_pad_token(tokenizer)
    return model_name, tokenizer


def train_and_save(trainer, training_args, script_args) -> None:
    """Train (resuming when asked), print what every rank did, save the model and its model card."""
    # `--resume_from_checkpoint true` arrives as the string 'true': the last checkpoint in output_dir, as HF means it;
    # the checkpoint must hold every file the resumed run needs (optimizer, RNG, replay buffer, ...)
    resume = check_resume_checkpoint(trainer, training_args.resume_from_checkpoint)
    if resume is not None:
        logger.info("Resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    print_rank_summary(trainer)  # every rank: its backend, steps and weights
    trainer.save_model(training_args.output_dir)
    trainer.create_model_card(dataset_name=script_args.dataset_name)
    logger.info("Model saved to %s", training_args.output_dir)


def train_online_recipe(trainer_class, script_args, training_args, model_args) -> None:
    """The online recipes' whole run (DPO, XPO, GRPO, RLOO: they differ only in `trainer_class`): check and lock the
    output folder, load, train on the prompt-only train split with the test split for monitoring, report greedy
    accuracy before and after, save."""
    from trl import get_peft_config, get_quantization_config

    setup_run(training_args, script_args, model_args)  # also locks output_dir for this run
    model_name, tokenizer = load_model_name_and_tokenizer(model_args, training_args)
    dataset = load_prompt_datasets(script_args)
    test_split = script_args.dataset_test_split
    trainer = trainer_class(
        model=model_name,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[test_split] if training_args.eval_strategy != "no" and test_split in dataset else None,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    add_greedy_report(trainer, dataset, script_args)  # greedy accuracy on the test split, before and after training
    train_and_save(trainer, training_args, script_args)
    finish_run(trainer, training_args, script_args)


def finish_run(trainer, training_args, script_args) -> None:
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    # Leave together: `end_training` destroys the process group at once, and a process that does so while another
    # still holds it (rank 0 writing the model card) aborted in gloo ("terminate called without an active exception")
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
