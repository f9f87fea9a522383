"""Prompt-only datasets: validation with errors that say what is expected, loading, and tokenization.

Sharpening needs prompts only; the completions come from the model. We accept TRL's two prompt-only formats:
standard (`{"prompt": "..."}`) and conversational (`{"prompt": [{"role": "user", "content": "..."}]}`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, Value, load_dataset, load_from_disk

from .answers import extract_answer


logger = logging.getLogger(__name__)

PROMPT_ONLY_HELP = (
    "Expected a prompt-only dataset in TRL's format: a `prompt` column holding either strings (standard) or lists "
    'of chat messages like [{"role": "user", "content": "..."}] (conversational). The completions are sampled from '
    "the model, so no completion or preference columns are needed."
)


def is_conversational_prompt(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)


def prompt_problem(prompt: Any) -> str | None:
    """Why `prompt` is neither a standard nor a conversational prompt, or None when it is one.

    In a `datasets` column of messages a message without `role` still has the key, with the value None: checking
    `"role" in message` would pass it, and the chat template would then render a prompt of just the assistant header.
    """
    if isinstance(prompt, str):
        return None
    if not isinstance(prompt, list):
        return f"the prompt {prompt!r} is a {type(prompt).__name__}, neither a string nor a list of chat messages"
    if not prompt:
        return "the prompt is an empty list of chat messages"
    for index, message in enumerate(prompt, start=1):  # counted from 1, like rows and lines in every message
        if not isinstance(message, dict):
            return f"message {index} is a {type(message).__name__}, not a dict like {{'role': ..., 'content': ...}}"
        if not isinstance(message.get("role"), str):
            return f"message {index} has no `role` ({message!r})"
        if message.get("content") is None:
            return f"message {index} has no `content` ({message!r})"
    return None


def _check_every_prompt(prompts, first_row: int = 0) -> None:
    for index, prompt in enumerate(prompts, start=first_row + 1):
        problem = prompt_problem(prompt)
        if problem is not None:
            raise ValueError(
                f"Row {index} of the prompts (counting from 1) is not a usable prompt: {problem}. {PROMPT_ONLY_HELP}"
            )


def refuse_single_string(value, name: str = "prompts") -> None:
    """A string where a list is expected is a sequence of characters: one prompt per character. Refuse it."""
    if isinstance(value, (str, bytes)):
        raise ValueError(
            f"{name} is a single string ({value[:40]!r}{'...' if len(value) > 40 else ''}), not a list: it would be "
            f"read as one {name[:-1] if name.endswith('s') else name} per character. Pass a list, e.g. [{value[:20]!r}]."
        )


def validate_prompt_dataset(dataset: Dataset | Sequence, prompt_column: str = "prompt") -> None:
    """Raise a `ValueError` that names the problem when `dataset` is not a usable prompt-only dataset."""
    refuse_single_string(dataset)
    if isinstance(dataset, Dataset):
        columns = dataset.column_names
        if len(dataset) == 0:
            raise ValueError("The prompt dataset is empty: there is nothing to sample completions for.")
        if {"chosen", "rejected"} <= set(columns):
            raise ValueError(
                f"Got a preference dataset (columns {columns}), but sharpening samples and ranks its own completions. "
                f"{PROMPT_ONLY_HELP} To reuse it, keep only its prompts: `dataset.select_columns(['prompt'])`."
            )
        if "completion" in columns:
            raise ValueError(
                f"Got a prompt-completion dataset (columns {columns}), but sharpening samples its own completions. "
                f"{PROMPT_ONLY_HELP} To reuse it, drop the completions: `dataset.remove_columns(['completion'])`."
            )
        if prompt_column not in columns:
            hint = " (a `messages` column holds whole conversations, not prompts)" if "messages" in columns else ""
            raise ValueError(
                f"The dataset has no `{prompt_column}` column{hint}; its columns are {columns}. {PROMPT_ONLY_HELP}"
            )
        # Every row, a batch at a time (one pass over the column; a bad message in row 5000 must not slip through)
        column, batch_size = dataset.select_columns([prompt_column]), 4096
        for start in range(0, len(dataset), batch_size):
            _check_every_prompt(column[start : start + batch_size][prompt_column], first_row=start)
    else:
        if len(dataset) == 0:
            raise ValueError("The prompt list is empty: there is nothing to sample completions for.")
        _check_every_prompt(dataset)


FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".arrow")


def check_dataset_path(path_or_name: str) -> None:
    """Refuse a dataset argument that names a local file which is missing or empty, with a message that says so:
    `load_dataset` would ask the Hub for a missing file, and fail on an empty one with a bare StopIteration."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        if path.stat().st_size < 1 << 16 and not path.read_bytes().strip():
            raise ValueError(f"The dataset file {path_or_name} is empty: it holds no prompts.")
    elif not path.exists() and (
        path.suffix in FILE_SUFFIXES or path_or_name.startswith(("/", "./", "../", "~")) or path_or_name.count("/") > 1
    ):
        raise FileNotFoundError(
            f"The dataset file {path_or_name} does not exist: check the path (a Hub dataset is named like `org/name`)."
        )


def read_data_files(path_or_name: str, *args, **kwargs):
    """`load_dataset(path_or_name, ...)` for local data: a file that `datasets` cannot parse is named with its first
    bad line (JSON lines) or the parser's reason, instead of "An error occurred while generating the dataset"; a folder
    mixing data formats is refused (`datasets` would read only the most common one and drop the rest silently)."""
    from datasets.exceptions import DatasetGenerationError

    folder = Path(path_or_name).expanduser()
    if folder.is_dir() and not is_saved_dataset(folder):
        kinds = sorted({p.suffix for p in folder.iterdir() if p.is_file() and p.suffix in FILE_SUFFIXES})
        if len({".json" if k == ".jsonl" else k for k in kinds}) > 1:
            raise ValueError(
                f"The dataset folder {path_or_name} holds {' and '.join(kinds)} files: `datasets` would read only one "
                "kind and silently drop the others. Keep one format in the folder, or pass one file."
            )
    try:
        return load_dataset(path_or_name, *args, **kwargs)
    except (DatasetGenerationError, UnicodeDecodeError) as error:
        files = kwargs.get("data_files")
        candidates = (
            [Path(files)] if isinstance(files, str) else sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
        )
        for candidate in candidates:
            if candidate.suffix == ".jsonl":
                check_jsonl_lines(candidate)
        cause = error if isinstance(error, UnicodeDecodeError) else error.__cause__ or error.__context__
        where = files or path_or_name
        raise ValueError(
            f"Cannot read the dataset {where}: {type(cause).__name__ if cause else 'error'}: {cause or error}. Check "
            "that the file is of the format its suffix says (.jsonl: one JSON object per line; .csv: a header row)."
        ) from None


def check_utf8(path: str | os.PathLike) -> None:
    """A text data file must be UTF-8: Arrow stores invalid bytes unchecked and fails (or not) only when the prompt is
    read. Decoded in blocks (cheap next to parsing); the first bad byte is named with its 1-based line."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as error:
                position = offset + error.start
                handle.seek(0)
                line = handle.read(position).count(b"\n") + 1
                raise ValueError(
                    f"{path}, line {line}: not UTF-8 text (byte 0x{block[error.start]:02x}, {error.reason}): save the "
                    "file as UTF-8."
                ) from None
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not UTF-8 text (it ends inside a character): save the file as UTF-8.") from None


def check_jsonl_lines(path: str | os.PathLike) -> None:
    """Name the first line of a JSON-lines file that is not one JSON object (1-based; blank lines and a BOM are fine)."""
    import json

    try:
        with open(path, encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError as error:
                    raise ValueError(
                        f"{path}, line {number}: not valid JSON ({getattr(error, 'msg', error)}, column "
                        f"{getattr(error, 'colno', '?')}): each line of a .jsonl file must be one JSON object, e.g. "
                        '{"prompt": "..."}.'
                    ) from None
                if not isinstance(value, dict):
                    raise ValueError(
                        f"{path}, line {number}: a JSON {type(value).__name__}, not an object: each line of a .jsonl "
                        'file must be one JSON object, e.g. {"prompt": "..."}.'
                    )
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text ({error.reason} at byte {error.start}): save it as UTF-8."
        ) from None


def load_prompts(
    path_or_name: str, split: str = "train", prompt_column: str = "prompt", config: str | None = None
) -> Dataset:
    """Load prompts from a saved dataset (`save_to_disk`), any file `datasets` reads (.jsonl, .json, .csv, .parquet,
    .txt: one prompt per line), or a dataset name (with its `config`, e.g. `openai/gsm8k`, `main`)."""
    path = Path(path_or_name)
    check_dataset_path(path_or_name)
    if is_saved_dataset(path):
        dataset = load_from_disk(str(path))
    elif path.is_file():
        builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}.get(
            path.suffix
        )
        if builder is None:
            raise ValueError(f"Cannot read prompts from {path}: use .jsonl, .json, .csv, .parquet or .txt.")
        if builder in ("json", "csv", "text"):
            check_utf8(path)
        # Read the file itself: `datasets` caches it under a key of path and modification time, so an edit that
        # keeps the mtime (a copy with `cp -p`, a sync tool) would otherwise return the old prompts
        dataset = read_data_files(builder, data_files=str(path), split="train", download_mode="force_redownload")
        if builder == "text":
            dataset = dataset.rename_column("text", prompt_column)
    else:
        dataset = read_data_files(path_or_name, name=config)
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise ValueError(f"{path_or_name} has no split {split!r}; its splits are {list(dataset)}.")
        dataset = dataset[split]
    validate_prompt_dataset(dataset, prompt_column)
    return dataset


def as_prompt_dataset(
    dataset: Dataset | DatasetDict,
    prompt_column: str = "prompt",
    chat_prompts: bool = False,
    answer_column: str | None = None,
    extract_reference_answers: bool = False,
) -> Dataset | DatasetDict:
    """Map a dataset with prompts and reference answers to what trl_sharpen uses: the prompts in a `prompt` column,
    optionally wrapped as one user message (`chat_prompts`, so that an instruct model's chat template is applied),
    and reference answers that are worked solutions (GSM8K's `... #### 72`) reduced to their final answer."""
    if prompt_column != "prompt":
        dataset = dataset.rename_column(prompt_column, "prompt")
    if chat_prompts:
        for split in dataset.values() if isinstance(dataset, DatasetDict) else [dataset]:
            feature = split.features["prompt"]
            if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
                raise ValueError(
                    "--chat_prompts wraps plain-text prompts as one user message, but these prompts are already chat "
                    "messages (lists of role/content dicts): drop --chat_prompts, their chat template applies anyway."
                )
        dataset = dataset.map(lambda example: {"prompt": [{"role": "user", "content": example["prompt"]}]})
    if extract_reference_answers and answer_column is not None:
        dataset = dataset.map(lambda example: {answer_column: extract_answer(example[answer_column])})
    return dataset


def ensure_pad_token(tokenizer) -> None:
    """Batched generation needs a pad token; fall back to EOS (what TRL's trainers do), but say so."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad token nor an EOS token; set `tokenizer.pad_token`.")
        logger.warning(
            "The tokenizer has no pad token; using its EOS token %r for padding. Completions end at their first EOS.",
            tokenizer.eos_token,
        )
        tokenizer.pad_token = tokenizer.eos_token


def tokenize_prompt(tokenizer, prompt: str | list[dict], **chat_template_kwargs) -> list[int]:
    """Token ids of one prompt, exactly as TRL's trainers tokenize it (chat template with the generation prompt for
    conversational prompts, the tokenizer's own special tokens for plain text)."""
    if is_conversational_prompt(prompt):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "The prompts are chat messages but the tokenizer has no chat template. Set `tokenizer.chat_template` "
                "(or use the instruct version of the model), or pass plain-text prompts."
            )
        return list(
            tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=True, **chat_template_kwargs
            )["input_ids"]
        )
    return list(tokenizer(prompt)["input_ids"])


def model_max_length(model) -> int | None:
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "max_position_embeddings", None)


def tokenize_prompts(
    tokenizer, prompts: Sequence, max_new_tokens: int = 0, max_length: int | None = None
) -> list[list[int]]:
    """Tokenize all prompts, refusing any prompt that leaves no room for `max_new_tokens` within `max_length`."""
    refuse_single_string(prompts)
    token_ids = [tokenize_prompt(tokenizer, prompt) for prompt in prompts]
    for index, ids in enumerate(token_ids, start=1):  # counted from 1, like rows and lines in every message
        if not ids:
            raise ValueError(f"Prompt {index} tokenizes to no tokens; a completion needs a non-empty prompt.")
        if max_length is not None and len(ids) + max_new_tokens > max_length:
            raise ValueError(
                f"Prompt {index} (counting from 1) is {len(ids)} tokens long; with max_completion_length="
                f"{max_new_tokens} that exceeds the model's maximum length of {max_length} tokens. Shorten or filter "
                "the prompt, or lower max_completion_length."
            )
    return token_ids


def prompt_key(prompt: str | list[dict]) -> str:
    """A hashable identity of a prompt (for grouping the N samples of one prompt)."""
    return prompt if isinstance(prompt, str) else repr([(m.get("role"), m.get("content")) for m in prompt])


def is_saved_dataset(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())
