"""Pieces shared by the recipes in `recipes/`: script arguments, dataset loading and the before/after report."""

from __future__ import annotations

from dataclasses import dataclass, field

from accelerate import PartialState
from datasets import DatasetDict, load_dataset
from trl import ScriptArguments

from .answers import extract_answer
from .data import is_saved_dataset
from .evaluation import evaluate_greedy
from .toy import TOY_DATA_DIR


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
    eval_answer_column: str | None = field(
        default="answer",
        metadata={
            "help": "Column of the test split with reference answers; greedy accuracy on the test split is printed "
            "before and after training when it exists. Set to null to skip."
        },
    )
    num_eval_prompts: int = field(default=200, metadata={"help": "Test prompts used for the greedy evaluation."})
    eval_max_new_tokens: int = field(default=64, metadata={"help": "Generation length of the greedy evaluation."})
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


def load_prompt_datasets(script_args: SharpenScriptArguments) -> DatasetDict:
    if is_saved_dataset(script_args.dataset_name):
        from datasets import load_from_disk

        dataset = load_from_disk(script_args.dataset_name)
    else:
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    if script_args.num_train_prompts is not None:
        train = dataset[script_args.dataset_train_split]
        dataset[script_args.dataset_train_split] = train.select(range(min(len(train), script_args.num_train_prompts)))
    if script_args.prompt_column != "prompt":
        dataset = dataset.rename_column(script_args.prompt_column, "prompt")
    if script_args.chat_prompts:
        dataset = dataset.map(lambda example: {"prompt": [{"role": "user", "content": example["prompt"]}]})
    column = script_args.eval_answer_column
    if script_args.extract_reference_answers and column is not None:
        dataset = dataset.map(lambda example: {column: extract_answer(example[column])})
    return dataset


def report_greedy_accuracy(model, tokenizer, dataset: DatasetDict, script_args, label: str, base_model=None):
    """Print (main process) and return the greedy accuracy on the test split, if it has reference answers."""
    split = script_args.dataset_test_split
    column = script_args.eval_answer_column
    if column is None or split not in dataset or column not in dataset[split].column_names:
        return None
    test = dataset[split].select(range(min(len(dataset[split]), script_args.num_eval_prompts)))
    result = evaluate_greedy(
        model,
        tokenizer,
        test["prompt"],
        test[column],
        base_model=base_model,
        max_new_tokens=script_args.eval_max_new_tokens,
    )
    if PartialState().is_main_process:
        loglik = (
            "" if result.mean_base_logprob is None else f", mean log pi_base(greedy) {result.mean_base_logprob:.3f}"
        )
        print(f"[{label}] greedy accuracy on {len(test)} {split} prompts: {result.accuracy:.3f}{loglik}", flush=True)
    return result
