"""Pieces shared by the recipes in `recipes/`: script arguments, run setup, dataset loading, the before/after report
(`GreedyReportCallback`) and the end of a run. Each recipe's `main()` reads as the sequence seed -> logging ->
tokenizer -> data -> trainer -> report callback -> train -> save, with the steps below."""

from __future__ import annotations

import argparse
import functools
import logging
from dataclasses import dataclass, field

import transformers
from datasets import DatasetDict, load_dataset
from transformers import AutoTokenizer
from trl import ScriptArguments

from .answers import answers_match, get_answer_extractor
from .callbacks import GreedyReportCallback
from .data import as_prompt_dataset, check_dataset_path, ensure_pad_token, is_saved_dataset
from .distributed import print_rank_summary
from .errors import check_model_path
from .real_models import resolve_model_name_or_path
from .sampling_arguments import warn_deprecated
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


def load_prompt_datasets(script_args: SharpenScriptArguments) -> DatasetDict:
    if is_saved_dataset(script_args.dataset_name):
        from datasets import load_from_disk

        dataset = load_from_disk(script_args.dataset_name)
    else:
        check_dataset_path(script_args.dataset_name)  # a missing or empty local file: say so, do not ask the Hub
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
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
        )
    )


def setup_run(training_args) -> None:
    """Seed and logging, as TRL's example scripts do."""
    transformers.set_seed(training_args.seed)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())


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
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    print_rank_summary(trainer)  # every rank: its backend, steps and weights
    trainer.save_model(training_args.output_dir)
    trainer.create_model_card(dataset_name=script_args.dataset_name)
    logger.info("Model saved to %s", training_args.output_dir)


def finish_run(trainer, training_args, script_args) -> None:
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.accelerator.end_training()
