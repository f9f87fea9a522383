"""Best-of-N from samples generated elsewhere (vLLM, SGLang, TGI): score, check and select, without generating.

    >>> from trl_sharpen.imported_samples import best_of_n_from_samples
    >>> dataset = best_of_n_from_samples(model, tokenizer, "samples.jsonl", output_dir="bon")
    $ trl-sharpen bon --model_name_or_path MODEL --samples_file samples.jsonl --output_dir bon

The samples file is JSON lines, one object per prompt, every line with the same keys (null where a line has no value):

| key              | content                                                                                          |
|------------------|--------------------------------------------------------------------------------------------------|
| `prompt`         | the prompt: a string, or chat messages (the tokenizer's chat template is applied, as in `bon`)   |
| `completion_ids` | the N completions as the engine's token ids (preferred: scored exactly as sampled), and/or       |
| `completions`    | the N completions as text (with `completion_ids` too: checked against them, the ids are used)    |
| `finish_reasons` | optional: per completion `"stop"` (ended on EOS, a stop string or a stop token) or `"length"`    |
| `stop_reasons`   | optional, vLLM's `stop_reason`: null (ended on EOS), the stop string, or the stop token id        |
| `logprobs`       | optional: per completion log pi_base(y|x), the sum over its tokens, **or**                       |
| `token_logprobs` | optional: per completion the log-probability of each of its tokens: numbers, vLLM's per-position |
|                  | dicts `{token id: logprob or {"logprob": ...}}`, or OpenAI-style `{"logprob": ...}` items        |
| `prompt_ids`     | optional: the prompt's token ids as the engine saw them (default: tokenized here)                |

Any other key (e.g. `answer`) is kept as a column; a key that the Best-of-N dataset writes (`rewards`,
`selected_index`, ...) is refused. Per-token lists under `logprobs` are read as `token_logprobs`.

Completions, token ids first:
- `completion_ids` are the generated tokens only (rows whose completions all start with the prompt's ids, as HF
  `generate` returns them, are refused). A completion ends at its first EOS id (`generation.eos_token_ids`): padding
  after it, or trailing pad ids, are removed (with a warning); other tokens after it are refused. It is truncated
  when its finish reason is `"length"` (refused if it ends with an EOS id), or, without finish reasons, when it has
  no EOS id and its text contains none of `stop_strings`.
- `completions` text is tokenized without special tokens and must decode back to itself (out-of-vocabulary text
  that becomes `<unk>` is refused). Text that already ends with an EOS token's text keeps that one EOS. Otherwise a
  `"stop"` completion gets the token the model ends with: the chat template's end-of-turn token after a chat prompt
  (Llama-3-Instruct's `<|eot_id|>`, Gemma-3-it's `<end_of_turn>`, not `eos_ids[0]`), the tokenizer's EOS after a
  plain one; except when it ended on a stop string (its `stop_reasons` entry is a string, which is appended when the
  text leaves it out, as vLLM does by default; or, without `stop_reasons`, the text contains one of `stop_strings`)
  or on a stop token (its id is appended). Without `finish_reasons` every text completion is taken as `"stop"`.
  An engine's sampled tokens are not always the canonical tokenization of their text (other log-probs): export
  `completion_ids` where you can. With both, the rows whose text re-tokenizes to other ids are counted in a warning.

Checks of every row, before the model loads (from the CLI) and before anything is scored: log-probs are numbers,
finite and <= 0 (per token and per sequence); token ids are in the model's vocabulary; `prompt_ids` decode to the
row's prompt; completions fit `max_completion_length` and the model's context; a column has one type on every line.
Every message names the file and the 1-based line.

Log-probabilities reported by the engine must be pi_base's own: log-softmax of the raw logits at temperature 1, before
any temperature, top-k/top-p, repetition penalty or other logits processing (in vLLM, `logprobs_mode="raw_logprobs"`,
its default since it has the option; older engines report processed values). Completions without them are scored here
by `sequence_logprobs` under the model. The engine's values are cross-checked against that scoring on
`check_min_rows` random rows (default 32, or all when fewer) or a `check_fraction` of them when that is more, before
anything else is scored: per token where the engine gave per-token values (mean |engine - ours| over the tokens, so
errors cannot cancel), per sequence otherwise; a difference beyond `logprob_tolerance` nats per token stops the run
with the line named. That catches temperature-scaled or processed log-probs, log-probs listed in another order than
their completions, and a prompt tokenized differently from the engine's. How far apart wrong log-probs land depends
on the model's uncertainty: on the nearly deterministic toy base, temperature 0.7 moves most samples by only
0.01-0.03 nats per token (the least likely by 0.2), so a small file is best checked whole (`check_fraction=1`).

Of the sampling settings, the self-reward, answer extractor and gating, truncation policy, `stop_strings`,
`max_completion_length`, `shard_size`, `sampling_batch_size` (scoring micro-batch) and `seed` (which rows are
cross-checked) apply; temperature, top-p/top-k, `num_samples` and adaptive sampling do not (the engine drew the
samples), so values other than their defaults are refused.

The result is the dataset `best_of_n` writes (same columns, `bon_run.json`, shards resumed after an interruption), so
`BoNSFTTrainer` trains on it as on its own samples: pass the loaded dataset as its `train_dataset`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset, Features

from .best_of_n_sampling import (
    BON_FEATURES,
    _quiet_datasets,
    _ShardWriter,
    answer_flags,
    check_output_dir_is_not_input,
    select_best,
)
from .data import ensure_pad_token, is_conversational_prompt, model_max_length, prompt_problem, tokenize_prompt
from .fingerprints import model_fingerprint, tokenizer_fingerprint
from .generation import end_of_turn_token_id, eos_token_ids, eval_mode
from .logprobs import sequence_logprobs
from .sampling_arguments import BestOfNSamplingArguments, sampling_arguments
from .self_rewards import MajorityReward, base_scoring_context, get_self_reward


logger = logging.getLogger(__name__)

# Keys of a samples-file row that describe the samples; every other key is kept as a column
SAMPLE_KEYS = (
    "completions",
    "completion_ids",
    "finish_reasons",
    "stop_reasons",
    "logprobs",
    "token_logprobs",
    "prompt_ids",
)
FINISH_REASONS = ("stop", "length")
# Columns the Best-of-N dataset writes from the samples: a user column of the same name would be overwritten
WRITTEN_COLUMNS = tuple(name for name in BON_FEATURES if name not in SAMPLE_KEYS)
# Log-probs above 0 by less than this are float rounding of a certain token, not an export error
LOGPROB_ROUNDING = 1e-3
# Settings of `BestOfNSamplingArguments` that only steer our own sampling: imported samples were drawn already
NOT_APPLICABLE = ("temperature", "top_p", "top_k", "num_samples", "adaptive_delta", "adaptive_round_size")


# Reading and checking the rows (no model needed) ----------------------------------------------------------------------


@dataclass
class ImportedSamples:
    """The checked rows of a samples file (or of in-memory rows), each with where it came from for messages."""

    rows: list[dict]
    numbers: list[int]  # 1-based line numbers in `source`, or 0-based indices of in-memory rows
    source: str | None  # the file, or None for in-memory rows
    dataset: Dataset | None = None  # the input dataset, when one was given (its cache files are never overwritten)

    def where(self, index: int) -> str:
        number = self.numbers[index]
        return f"{self.source}, line {number}" if self.source is not None else f"samples[{number}]"

    def lines(self, indices: Sequence[int]) -> str:
        """'lines 2-6' / 'line 3' / 'lines 2, 5, 9 and 4 more' (or 'rows ...' for in-memory rows)."""
        numbers = [self.numbers[i] for i in indices]
        word = "line" if self.source is not None else "row"
        if len(numbers) == 1:
            return f"{word} {numbers[0]}"
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            return f"{word}s {numbers[0]}-{numbers[-1]}"
        shown = ", ".join(map(str, numbers[:3]))
        return f"{word}s {shown}" + (f" and {len(numbers) - 3} more" if len(numbers) > 3 else "")

    @property
    def column_names(self) -> list[str]:
        names = {}
        for row in self.rows:
            names.update(dict.fromkeys(row))
        return list(names)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, column: str) -> list:
        """A column's values, as `Dataset[column]` gives them (missing keys are refused when the rows are read)."""
        return [row[column] for row in self.rows]

    def select(self, count: int) -> ImportedSamples:
        return dataclasses.replace(self, rows=self.rows[:count], numbers=self.numbers[:count])


def load_samples_file(path: str | os.PathLike, prompt_column: str = "prompt") -> ImportedSamples:
    """The rows of a JSON-lines samples file, every row checked (one clear error naming the file and 1-based line)."""
    rows, numbers = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}, line {number}: not a JSON object ({error}).") from None
            if isinstance(row, dict) and prompt_column != "prompt" and prompt_column in row:
                if "prompt" in row:
                    raise ValueError(
                        f"{path}, line {number}: has both `prompt` and --prompt_column {prompt_column!r}; rename one."
                    )
                row = {"prompt": row.pop(prompt_column), **row}
            rows.append(row)
            numbers.append(number)
    if not rows:
        raise ValueError(
            f"{path} holds no samples: expected one JSON object per prompt (see trl_sharpen.imported_samples)."
        )
    return check_samples(ImportedSamples(rows, numbers, str(path)))


def check_samples(samples: ImportedSamples) -> ImportedSamples:
    """Each row's structure and values, then what must agree across rows (kinds, keys, column types)."""
    raw_keys = [set(row) if isinstance(row, dict) else set() for row in samples.rows]  # an explicit null counts
    normalized = []
    for index, row in enumerate(samples.rows):
        try:
            normalized.append(_normalized_row(row))
        except _RowProblem as problem:
            raise ValueError(f"{samples.where(index)}: {problem}") from None
    samples = dataclasses.replace(samples, rows=normalized)
    _check_across_rows(samples, raw_keys)
    return samples


class _RowProblem(Exception):
    """What is wrong with one row; raised as a ValueError prefixed with the file and line."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _normalized_row(row) -> dict:
    """A copy of the row with its samples checked and the log-probs in one shape (numbers)."""
    if not isinstance(row, dict) or "prompt" not in row:
        raise _RowProblem("each line must be a JSON object with a `prompt` (see trl_sharpen.imported_samples).")
    problem = prompt_problem(row["prompt"])
    if problem:
        raise _RowProblem(f"not a usable prompt: {problem}.")
    row = {key: value for key, value in row.items()}
    for key in ("finish_reasons", "stop_reasons", "logprobs", "token_logprobs", "prompt_ids"):
        if key in row and row[key] is None:
            del row[key]  # explicitly absent on this row
    texts, ids = row.get("completions"), row.get("completion_ids")
    if texts is None and ids is None:
        raise _RowProblem("give the samples as `completion_ids` (token ids) and/or `completions` (text).")
    for key, value in (("completions", texts), ("completion_ids", ids)):
        if value is not None and (not isinstance(value, list) or not value):
            raise _RowProblem(f"`{key}` must be a non-empty list (the N samples of the prompt).")
    if texts is not None and not all(isinstance(text, str) for text in texts):
        raise _RowProblem("`completions` must be strings.")
    if ids is not None:
        for j, completion in enumerate(ids):
            if not isinstance(completion, list) or not all(_is_int(t) for t in completion):
                raise _RowProblem("`completion_ids` must be lists of integer token ids.")
            negative = next((t for t in completion if t < 0), None)
            if negative is not None:
                raise _RowProblem(f"completion {j + 1} has token id {negative}: token ids are never negative.")
    if texts is not None and ids is not None and len(texts) != len(ids):
        raise _RowProblem(
            f"`completions` has {len(texts)} entries and `completion_ids` {len(ids)}; give one per sample."
        )
    n = len(ids if ids is not None else texts)
    for key in ("finish_reasons", "stop_reasons", "logprobs", "token_logprobs"):
        if key in row and (not isinstance(row[key], list) or len(row[key]) != n):
            raise _RowProblem(f"`{key}` must be a list with one entry per completion ({n}).")
    reasons = row.get("finish_reasons")
    if reasons is not None and any(reason not in FINISH_REASONS for reason in reasons):
        raise _RowProblem(f"finish reasons must be one of {list(FINISH_REASONS)}.")
    for j, stop in enumerate(row.get("stop_reasons") or []):
        if stop is not None and not (isinstance(stop, str) and stop) and not (_is_int(stop) and stop >= 0):
            raise _RowProblem(
                f"completion {j + 1}'s stop reason {stop!r} must be null (EOS), a stop string or a stop token id."
            )
        if stop is not None and reasons is not None and reasons[j] != "stop":
            raise _RowProblem(f"completion {j + 1} has stop reason {stop!r} but finish reason {reasons[j]!r}.")
    if "prompt_ids" in row:
        prompt_ids = row["prompt_ids"]
        if not isinstance(prompt_ids, list) or not prompt_ids or not all(_is_int(t) and t >= 0 for t in prompt_ids):
            raise _RowProblem("`prompt_ids` must be a non-empty list of non-negative integer token ids.")
    if "logprobs" in row and any(not _is_number(value) for value in row["logprobs"]):
        if "token_logprobs" in row:
            raise _RowProblem("give `logprobs` (per sequence) or `token_logprobs` (per token), not both.")
        row["token_logprobs"] = row.pop("logprobs")  # per-token values under `logprobs`: a common export slip
    if "logprobs" in row and "token_logprobs" in row:
        raise _RowProblem("give `logprobs` (per sequence) or `token_logprobs` (per token), not both.")
    if "logprobs" in row:
        row["logprobs"] = [float(value) for value in row["logprobs"]]
        for j, value in enumerate(row["logprobs"]):
            _check_logprob(value, "logprobs", f"completion {j + 1}")
    if "token_logprobs" in row:
        row["token_logprobs"] = [
            _per_token_values(entry, ids[j] if ids is not None else None, j)
            for j, entry in enumerate(row["token_logprobs"])
        ]
        for j, values in enumerate(row["token_logprobs"]):
            for t, value in enumerate(values):
                _check_logprob(value, "token_logprobs", f"completion {j + 1}, token {t + 1}")
            if ids is not None and len(values) != len(ids[j]):
                raise _RowProblem(
                    f"`token_logprobs` of completion {j + 1} has {len(values)} values for its {len(ids[j])} token ids: "
                    "give one per token (the EOS token included when it ended on EOS)."
                )
    return row


def _check_logprob(value: float, key: str, what: str) -> None:
    if math.isnan(value) or math.isinf(value):
        name = "NaN" if math.isnan(value) else str(value)
        raise _RowProblem(f"`{key}` of {what} is {name}: log-probs must be finite numbers (fix the export).")
    if value > LOGPROB_ROUNDING:
        raise _RowProblem(
            f"`{key}` of {what} is {value:.4g}, positive: a log-probability is <= 0. Export log-probs, not "
            "probabilities, negated values or logits."
        )


TOKEN_LOGPROBS_FORMAT = (
    "per token a number, a vLLM dict {token id: logprob or {'logprob': ...}}, or an OpenAI-style {'logprob': ...} item"
)


def _per_token_values(entry, ids: list[int] | None, j: int) -> list[float]:
    """One completion's per-token log-probs as numbers, from the shapes engines export."""
    what = f"`token_logprobs` of completion {j + 1}"
    if isinstance(entry, dict):  # OpenAI completions {"token_logprobs": [...]} or chat {"content": [...]}
        for key in ("token_logprobs", "content"):
            if isinstance(entry.get(key), list):
                entry = entry[key]
                break
        else:
            raise _RowProblem(
                f"{what} is a dict with keys {sorted(entry)[:5]}: expected a list, {TOKEN_LOGPROBS_FORMAT}."
            )
    if not isinstance(entry, list):
        raise _RowProblem(f"{what} is {type(entry).__name__}: expected a list, {TOKEN_LOGPROBS_FORMAT}.")
    values = []
    for t, item in enumerate(entry):
        where = f"completion {j + 1}, token {t + 1}"
        if _is_number(item):
            values.append(float(item))
            continue
        if isinstance(item, dict) and "logprob" in item and _is_number(item["logprob"]):
            values.append(float(item["logprob"]))  # OpenAI-style item: the sampled token's own entry
            continue
        if isinstance(item, dict) and item:  # vLLM: {token id: Logprob} of the sampled token (and top-k others)
            by_id = {}
            for key, value in item.items():
                value = value.get("logprob") if isinstance(value, dict) else value
                if not (str(key).lstrip("-").isdigit() and _is_number(value)):
                    raise _RowProblem(f"`token_logprobs` of {where}: {item!r} is not {TOKEN_LOGPROBS_FORMAT}.")
                by_id[int(key)] = float(value)
            if ids is not None:
                if t >= len(ids):
                    break  # the count check names the mismatch
                if ids[t] not in by_id:
                    raise _RowProblem(
                        f"`token_logprobs` of {where}: the entry is for token {', '.join(map(str, by_id))}, not the "
                        f"sampled token {ids[t]}: the per-token values are not aligned with `completion_ids`."
                    )
                values.append(by_id[ids[t]])
            elif len(by_id) == 1:
                values.append(next(iter(by_id.values())))
            else:
                raise _RowProblem(
                    f"`token_logprobs` of {where} lists {len(by_id)} tokens: give `completion_ids` too, so that the "
                    "sampled token's value can be picked (or export logprobs=0: the sampled token only)."
                )
            continue
        raise _RowProblem(f"`token_logprobs` of {where} is {item!r}: expected {TOKEN_LOGPROBS_FORMAT}.")
    return values


def _kind(row: dict) -> str:
    has_text, has_ids = "completions" in row, "completion_ids" in row
    if has_text and has_ids:
        return "both `completions` and `completion_ids`"
    return "`completions` (text)" if has_text else "`completion_ids` (token ids)"


def _type_name(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if _is_number(value):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def _check_across_rows(samples: ImportedSamples, raw_keys: list[set[str]]) -> None:
    rows = samples.rows
    kind = _kind(rows[0])
    for index, row in enumerate(rows):
        if _kind(row) != kind:
            raise ValueError(
                f"{samples.where(index)}: the samples are {_kind(row)} here but {kind} on {samples.lines([0])}: give "
                "every row's samples the same way."
            )
    # The union of all rows' keys: a key on some rows only is refused (it used to vanish when line 1 lacked it)
    all_keys = list(dict.fromkeys(key for keys in raw_keys for key in sorted(keys)))
    for key in all_keys:
        if key in ("completions", "completion_ids"):
            continue
        missing = [i for i, keys in enumerate(raw_keys) if key not in keys]
        if missing:
            having = [i for i in range(len(rows)) if i not in set(missing)]
            raise ValueError(
                f"{samples.where(missing[0])}: no `{key}`, which {samples.lines(having)} "
                f"{'has' if len(having) == 1 else 'have'}: give every line the same keys (null where a line has "
                f"no value){f'; {len(missing)} lines lack it' if len(missing) > 1 else ''}."
            )
    for key in samples.column_names:
        if key in WRITTEN_COLUMNS:
            raise ValueError(
                f"`{key}` is a column Best-of-N writes ({', '.join(WRITTEN_COLUMNS)}): it would be overwritten. "
                f"Rename it in the samples file ({samples.lines([0])} has it)."
            )
    # One type per kept column, named at the first line that breaks it (Arrow would fail without a line)
    for key in samples.column_names:
        if key in SAMPLE_KEYS:
            continue
        values = [row[key] for row in rows]
        if _arrow_accepts(values):
            continue
        low, high = 1, len(values)  # the shortest failing prefix: its last row is the first that breaks the type
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if not _arrow_accepts(values[:middle]) else (middle + 1, high)
        bad = low - 1
        first = next(i for i, value in enumerate(values) if value is not None)
        raise ValueError(
            f"{samples.where(bad)}: `{key}` is {_type_name(values[bad])} here but {_type_name(values[first])} on "
            f"{samples.lines([first])}{' (their items differ)' if _type_name(values[bad]) == _type_name(values[first]) else ''}"
            ": give a column one type on every line."
        )


def _arrow_accepts(values: list) -> bool:
    try:
        with _quiet_datasets():
            Dataset.from_dict({"column": values})
    except Exception:  # pyarrow's type errors, whichever class
        return False
    return True


# The CLI's prompt options on a samples file ---------------------------------------------------------------------------


def samples_file_prompts(args) -> ImportedSamples:
    """`trl-sharpen bon --samples_file`: the file read and checked, with every prompt option applied or refused
    (`--num_prompts`, `--chat_prompts`, `--prompt_column`, `--extract_reference_answers` apply; `--dataset_name`,
    `--dataset_config` and `--dataset_split` name another source of prompts)."""
    from .answers import extract_answer

    for option, value, default in (
        ("dataset_name", args.dataset_name, None),
        ("dataset_config", args.dataset_config, None),
        ("dataset_split", args.dataset_split, "train"),
    ):
        if value != default:
            raise ValueError(
                f"--{option} {value} and --samples_file {args.samples_file} both name the prompts: the samples file "
                "holds its prompts. Pass one of them."
            )
    if args.num_prompts is not None and (not _is_int(args.num_prompts) or args.num_prompts < 1):
        raise ValueError(f"--num_prompts must be >= 1, got {args.num_prompts}; leave it unset for every row.")
    if args.extract_reference_answers and args.answer_column is None:
        raise ValueError("--extract_reference_answers reduces the --answer_column's references: name that column.")
    if args.answer_column is not None and args.answer_column == args.prompt_column:
        raise ValueError(f"--answer_column and --prompt_column are both {args.answer_column!r}; name two columns.")
    samples = load_samples_file(args.samples_file, args.prompt_column)
    if args.num_prompts is not None:
        samples = samples.select(args.num_prompts)
    if args.chat_prompts:
        for index, row in enumerate(samples.rows):
            if not isinstance(row["prompt"], str):
                raise ValueError(
                    f"{samples.where(index)}: --chat_prompts wraps plain-text prompts as one user message, but this "
                    "prompt is already chat messages: drop --chat_prompts, their chat template applies anyway."
                )
            row["prompt"] = [{"role": "user", "content": row["prompt"]}]
    if args.extract_reference_answers and args.answer_column in samples.column_names:
        for row in samples.rows:
            row[args.answer_column] = extract_answer(row[args.answer_column]) if row[args.answer_column] else None
    return samples


def check_settings_apply(sampling: BestOfNSamplingArguments) -> None:
    """Refuse sampling settings that imported samples cannot follow, instead of ignoring them."""
    defaults = {f.name: f.default for f in dataclasses.fields(BestOfNSamplingArguments)}
    for name in NOT_APPLICABLE:
        value = getattr(sampling, name)
        if value != defaults[name]:
            raise ValueError(
                f"{name}={value} does not apply to imported samples: the engine drew them (N is each row's number of "
                f"completions). Leave {name} unset, or sample here with `bon --dataset_name`."
            )


# Token ids of the completions (needs the tokenizer and the model) -----------------------------------------------------


@dataclass
class _Prepared:
    prompt_ids: list[int]
    completion_ids: list[list[int]]
    truncated: list[bool]
    logprobs: list[float] | None  # the engine's per completion, or None: scored here
    token_logprobs: list[list[float]] | None  # the engine's per token, when it gave them


class _Preparer:
    """Turns checked rows into token ids, following the module docstring's rules; counts what it warns about."""

    def __init__(self, model, tokenizer, sampling: BestOfNSamplingArguments):
        self.tokenizer = tokenizer
        eos = eos_token_ids(model, tokenizer)
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos)
        self.end_of_turn = end_of_turn_token_id(tokenizer)
        self.pad_id = tokenizer.pad_token_id
        self.stop_strings = list(sampling.stop_strings or [])
        self.max_completion_length = sampling.max_completion_length
        self.context = model_max_length(model)
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.vocab_size = getattr(embeddings, "num_embeddings", None) or len(tokenizer)
        self.unpadded = 0
        self.retokenized = []  # (row index, completions whose text re-tokenizes to other ids)
        self.engine_prompts = 0  # rows whose prompt_ids differ from our tokenization of the same text

    def end_token(self, prompt) -> int:
        """What the model ends a turn with after this prompt: the chat template's end-of-turn token after chat
        messages, the tokenizer's EOS after plain text (generation stops at any of `eos_ids`; a text completion
        does not say which, so the one the model emits in this position is used)."""
        if is_conversational_prompt(prompt) and self.end_of_turn is not None:
            return self.end_of_turn
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.eos_ids[0]

    def decode(self, ids, skip_special_tokens=False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def check_ids(self, ids: list[int], what: str) -> None:
        for t in ids:
            if t >= self.vocab_size:
                raise _RowProblem(
                    f"{what} has token id {t}, outside the model's vocabulary of {self.vocab_size} ids "
                    f"(0-{self.vocab_size - 1}): the samples come from another model or tokenizer."
                )

    def prompt_ids(self, row: dict) -> list[int]:
        ours = tokenize_prompt(self.tokenizer, row["prompt"])
        given = row.get("prompt_ids")
        if given is None or given == ours:
            return ours
        self.check_ids(given, "`prompt_ids`")
        theirs, text = self.decode(given, True).strip(), self.decode(ours, True).strip()
        if theirs != text:
            raise _RowProblem(
                f"`prompt_ids` decode to {_short(theirs)}, not to this row's prompt ({_short(text)}): they belong to "
                "another prompt, or to another tokenizer. Export the engine's prompt token ids of this row."
            )
        self.engine_prompts += 1  # the same text tokenized otherwise: the engine's ids are what it conditioned on
        return list(given)

    def completions(self, row: dict, prompt_ids: list[int], index: int) -> tuple[list[list[int]], list[bool]]:
        texts, ids = row.get("completions"), row.get("completion_ids")
        reasons = row.get("finish_reasons")
        stops = row.get("stop_reasons") or [None] * len(texts if ids is None else ids)
        if ids is not None:
            self._refuse_prompt_prefix(ids, prompt_ids)
            out, truncated = [], []
            for j, completion in enumerate(ids):
                self.check_ids(completion, f"completion {j + 1}")
                completion = self._unpadded(completion, j)
                ends_on_eos = bool(completion) and completion[-1] in self.eos_ids
                if reasons is not None:
                    if reasons[j] == "length" and ends_on_eos:
                        raise _RowProblem(
                            f"completion {j + 1} ends with the EOS id {completion[-1]} but its finish reason is "
                            "'length': an EOS ends a completion ('stop'). Check that `finish_reasons` follow the "
                            "order of `completion_ids`."
                        )
                    cut = reasons[j] == "length"
                else:
                    cut = not ends_on_eos and not self._has_stop_string(completion)
                if texts is not None:
                    self._check_text_matches(texts[j], completion, j, index)
                out.append(completion)
                truncated.append(cut)
            return out, truncated
        reasons = reasons or ["stop"] * len(texts)
        out, truncated = [], []
        for j, (text, reason, stop) in enumerate(zip(texts, reasons, stops, strict=True)):
            if isinstance(stop, str) and not text.endswith(stop):
                text += stop  # vLLM leaves the stop string out of the text unless include_stop_str_in_output
            completion = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            back = self.decode(completion)
            if back.strip() != text.strip() or (self.tokenizer.unk_token_id in completion):
                raise _RowProblem(
                    f"completion {j + 1} ({_short(text)}) does not survive tokenization: it becomes {_short(back)}. "
                    "Out-of-vocabulary or normalized text would be scored and stored as other text: export the "
                    "engine's `completion_ids` instead."
                )
            self.check_ids(completion, f"completion {j + 1}")
            ends_on_eos = bool(completion) and completion[-1] in self.eos_ids
            if reason == "length" and ends_on_eos:
                raise _RowProblem(
                    f"completion {j + 1} ends with the EOS token's text but its finish reason is 'length': an EOS "
                    "ends a completion ('stop'). Check that `finish_reasons` follow the order of `completions`."
                )
            if reason == "stop" and not ends_on_eos:
                if _is_int(stop):
                    completion = [*completion, stop]  # a stop token id: generated, left out of the text
                elif stop is None and not any(s in text for s in self.stop_strings):
                    completion = [*completion, self.end_token(row["prompt"])]
            out.append(completion)
            truncated.append(reason == "length")
        return out, truncated

    def _refuse_prompt_prefix(self, ids: list[list[int]], prompt_ids: list[int]) -> None:
        """HF `generate` returns prompt + completion (left-padded in a batch): refuse instead of scoring the prompt
        twice. Only when every completion starts so: one completion repeating its prompt can be a real sample."""
        n = len(prompt_ids)

        def starts_with_prompt(completion):
            start = 0
            while start < len(completion) and completion[start] == self.pad_id and prompt_ids[0] != self.pad_id:
                start += 1
            return completion[start : start + n] == prompt_ids

        if all(starts_with_prompt(completion) for completion in ids):
            raise _RowProblem(
                f"the `completion_ids` start with the prompt's {n} token ids (HF `generate` returns prompt + "
                "completion): store only the generated tokens, output[len(prompt_ids):]."
            )

    def _unpadded(self, completion: list[int], j: int) -> list[int]:
        """The completion up to its first EOS id; padding after it (or trailing pad ids) removed and counted."""
        end = next((t for t, token in enumerate(completion) if token in self.eos_ids), None)
        if end is not None:
            rest = completion[end + 1 :]
            if rest and any(token != self.pad_id and token not in self.eos_ids for token in rest):
                raise _RowProblem(
                    f"completion {j + 1} goes on after its EOS id {completion[end]} (position {end + 1} of "
                    f"{len(completion)}): a completion ends at its first EOS id. Store each completion up to it."
                )
            self.unpadded += bool(rest)
            return completion[: end + 1]
        if self.pad_id is not None and completion and completion[-1] == self.pad_id:
            length = len(completion)
            while length and completion[length - 1] == self.pad_id:
                length -= 1
            self.unpadded += 1
            return completion[:length]
        return completion

    def _has_stop_string(self, completion: list[int]) -> bool:
        return bool(self.stop_strings) and any(s in self.decode(completion) for s in self.stop_strings)

    def _check_text_matches(self, text: str, completion: list[int], j: int, index: int) -> None:
        decoded = self.decode(completion, skip_special_tokens=True)
        if not decoded.strip().startswith(text.strip()):  # a prefix: vLLM leaves stop strings out of the text
            raise _RowProblem(
                f"completion {j + 1}'s text ({_short(text)}) is not what its `completion_ids` decode to "
                f"({_short(decoded)}): the two lists are not the same samples in the same order."
            )
        if decoded == text:
            body = [t for t in completion if t not in self.eos_ids]
            if self.tokenizer(text, add_special_tokens=False)["input_ids"] != body:
                if self.retokenized and self.retokenized[-1][0] == index:
                    self.retokenized[-1][1] += 1
                else:
                    self.retokenized.append([index, 1])

    def check_lengths(self, prompt_ids: list[int], completion_ids: list[list[int]]) -> None:
        for j, completion in enumerate(completion_ids):
            if len(completion) > self.max_completion_length:
                raise _RowProblem(
                    f"completion {j + 1} has {len(completion)} tokens, more than max_completion_length="
                    f"{self.max_completion_length}: raise --max_completion_length to the engine's max_tokens."
                )
            if self.context is not None and len(prompt_ids) + len(completion) > self.context:
                raise _RowProblem(
                    f"prompt and completion {j + 1} are {len(prompt_ids) + len(completion)} tokens, more than the "
                    f"model's context of {self.context}: it cannot score them. Drop the row or regenerate shorter."
                )


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def prepare_samples(model, tokenizer, samples: ImportedSamples, sampling: BestOfNSamplingArguments) -> list[_Prepared]:
    """Every row's prompt and completion ids, flags and engine log-probs, each row checked against the model."""
    preparer = _Preparer(model, tokenizer, sampling)
    prepared = []
    for index, row in enumerate(samples.rows):
        try:
            prompt_ids = preparer.prompt_ids(row)
            completion_ids, truncated = preparer.completions(row, prompt_ids, index)
            preparer.check_lengths(prompt_ids, completion_ids)
            token_values = row.get("token_logprobs")
            for j, values in enumerate(token_values or []):
                if len(values) != len(completion_ids[j]):
                    raise _RowProblem(
                        f"`token_logprobs` of completion {j + 1} has {len(values)} values, but its text tokenizes to "
                        f"{len(completion_ids[j])} tokens (its end token included): export the engine's "
                        "`completion_ids` with them."
                    )
        except _RowProblem as problem:
            raise ValueError(f"{samples.where(index)}: {problem}") from None
        sums = [math.fsum(values) for values in token_values] if token_values is not None else row.get("logprobs")
        prepared.append(_Prepared(prompt_ids, completion_ids, truncated, sums, token_values))
    if preparer.unpadded:
        logger.warning("%d completions ended in padding, which was removed (a completion ends at its first EOS).",
                       preparer.unpadded)  # fmt: skip
    if preparer.retokenized:
        count = sum(n for _, n in preparer.retokenized)
        logger.warning(
            "%d completion%s (in %d of %d rows) re-tokenize%s to other ids than the engine's; the engine's "
            "`completion_ids` are scored (from text alone, their log-probs would differ). First: %s.",
            count, "" if count == 1 else "s", len(preparer.retokenized), len(samples),
            "s" if count == 1 else "", samples.where(preparer.retokenized[0][0]),
        )  # fmt: skip
    if "completion_ids" not in samples.rows[0]:
        logger.warning(
            "The samples are text: re-tokenized here. An engine's sampled tokens are not always the canonical "
            "tokenization of their text (other log-probs); export `completion_ids` to score exactly what was sampled."
        )
    if preparer.engine_prompts:
        logger.info("%d rows' `prompt_ids` tokenize their prompt differently from here: the engine's are used.",
                    preparer.engine_prompts)  # fmt: skip
    return prepared


# Scoring, cross-check, selection --------------------------------------------------------------------------------------


def _score(model, prompt_ids, completion_ids, micro_batch_size: int) -> list[float]:
    with torch.no_grad(), eval_mode(model), base_scoring_context(model):
        return sequence_logprobs(model, prompt_ids, completion_ids, micro_batch_size=micro_batch_size).tolist()


def _score_per_token(model, prompt_ids, completion_ids) -> list[list[float]]:
    """log pi_base of each completion token, one sequence per forward (only the cross-checked rows come here)."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad(), eval_mode(model), base_scoring_context(model):
        for prompt, completion in zip(prompt_ids, completion_ids, strict=True):
            if not completion:
                out.append([])
                continue
            ids = torch.tensor([[*prompt, *completion]], device=device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            targets = torch.tensor(completion, device=device)[:, None]
            out.append(logits.log_softmax(-1).gather(-1, targets).squeeze(-1).tolist())
    return out


def _as_samples(samples) -> ImportedSamples:
    if isinstance(samples, ImportedSamples):
        return samples
    if isinstance(samples, (str, os.PathLike)):
        return load_samples_file(samples)
    dataset = samples if isinstance(samples, Dataset) else None
    rows = samples.to_list() if dataset is not None else list(samples)
    if not rows:
        raise ValueError("The samples are empty: expected one row per prompt (see trl_sharpen.imported_samples).")
    return check_samples(ImportedSamples(rows, list(range(len(rows))), None, dataset))


def best_of_n_from_samples(
    model: torch.nn.Module,
    tokenizer,
    samples: str | os.PathLike | Dataset | Sequence[dict] | ImportedSamples,
    self_reward=None,
    *,
    sampling: BestOfNSamplingArguments | None = None,
    check_fraction: float = 0.01,
    check_min_rows: int = 32,
    logprob_tolerance: float = 0.05,
    scoring_batch_size: int | None = None,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    **sampling_kwargs,
) -> Dataset:
    """Best-of-N over samples generated elsewhere: the same dataset as `best_of_n`, without generating.

    Args:
        model: pi_base, which scores the completions that carry no log-probs and checks those that do.
        tokenizer: its tokenizer.
        samples: a samples file (JSON lines, format in the module docstring), or its rows as a `Dataset` or a list.
        sampling / self_reward / **sampling_kwargs: as for `best_of_n`; the settings that steer sampling itself
            (temperature, top-p/top-k, num_samples, adaptive sampling) are refused unless left at their defaults:
            the samples are drawn already (see the module docstring for those that apply).
        check_fraction, check_min_rows: the engine log-probs of max(check_min_rows, check_fraction of the rows)
            random rows (all when fewer) are cross-checked against our scoring.
        logprob_tolerance: largest accepted difference per token, in nats, in the cross-check.
        scoring_batch_size: sequences per forward pass of the scoring (default: `sampling_batch_size`).
        output_dir, overwrite: as for `best_of_n` (shards, resume, `bon_run.json`).
    """
    sampling = sampling_arguments(BestOfNSamplingArguments, sampling, self_reward=self_reward, **sampling_kwargs)
    check_settings_apply(sampling)
    if not 0 < check_fraction <= 1:
        raise ValueError(f"check_fraction={check_fraction} must be in (0, 1]: at least one row is always checked.")
    if not (_is_int(check_min_rows) and check_min_rows >= 1):
        raise ValueError(f"check_min_rows={check_min_rows} must be an integer >= 1 (rows cross-checked at least).")
    if not logprob_tolerance > 0:
        raise ValueError(f"logprob_tolerance={logprob_tolerance} must be > 0 (nats per token).")
    batch_size = scoring_batch_size or sampling.sampling_batch_size
    samples = _as_samples(samples)
    ensure_pad_token(tokenizer)
    reward = get_self_reward(
        sampling.self_reward, answer_extractor=sampling.answer_extractor, model=model, tokenizer=tokenizer
    )
    num_samples = [len(row.get("completion_ids") or row["completions"]) for row in samples.rows]
    if isinstance(reward, MajorityReward) and min(num_samples) < MajorityReward.min_samples:
        raise ValueError(
            f"self_reward='majority' needs at least {MajorityReward.min_samples} completions per prompt; a row of the "
            f"samples has {min(num_samples)}. Use self_reward='logprob'."
        )
    prepared = prepare_samples(model, tokenizer, samples, sampling)

    # The cross-check comes first: a file of wrong log-probs must fail before anything else is scored
    with_engine = [i for i, row in enumerate(prepared) if row.logprobs is not None]
    if with_engine:
        count = min(len(with_engine), max(check_min_rows, math.ceil(check_fraction * len(with_engine))))
        checked = sorted(random.Random(sampling.seed).sample(with_engine, count))
        _cross_check(model, samples, prepared, checked, logprob_tolerance, batch_size)

    output_dir = Path(output_dir) if output_dir is not None else None
    if output_dir is not None and samples.dataset is not None:
        check_output_dir_is_not_input(output_dir, samples.dataset)
    fingerprint = sampling.fingerprint(reward.name)
    run = {
        "model": model_fingerprint(model),
        "model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "prompts": _rows_fingerprint(samples.rows),  # the samples' content (prompts, completions, log-probs)
        "num_prompts": len(samples),
        "samples": "imported",  # generated elsewhere: the generation settings below were not ours
        **{k: fingerprint[k] for k in ("self_reward", "truncated_completions", "truncation_penalty", "shard_size")},
        "num_samples": max(num_samples),
        "base_model_is_sampler": False,
    }
    writer = _ShardWriter(output_dir, run, overwrite)
    kept_names = [name for name in samples.column_names if name not in SAMPLE_KEYS]
    with _quiet_datasets():
        kept = Dataset.from_list([{name: row[name] for name in kept_names} for row in samples.rows]).features
    features = Features({**kept, **BON_FEATURES})
    state = PartialState()
    num_shards = math.ceil(len(samples) / sampling.shard_size)
    local_rows = []
    for shard in range(state.process_index, num_shards, state.num_processes):
        if writer.done(shard):
            continue
        indices = range(shard * sampling.shard_size, min((shard + 1) * sampling.shard_size, len(samples)))
        shard_rows = _score_and_select(
            model, tokenizer, samples.rows, prepared, list(indices), reward, sampling, kept_names, batch_size
        )
        with _quiet_datasets():
            writer.write(shard, Dataset.from_list(shard_rows, features=features))
        local_rows.extend(shard_rows)
    return writer.result(num_shards, local_rows, features)


def _rows_fingerprint(rows: list[dict]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _cross_check(model, samples: ImportedSamples, prepared, checked: list[int], tolerance: float, batch_size) -> None:
    """The engine's log-probs against the model's own: per token where the engine gave per-token values (mean
    absolute difference: errors in opposite directions cannot cancel), per sequence otherwise."""
    per_token = [i for i in checked if prepared[i].token_logprobs is not None]
    per_sequence = [i for i in checked if prepared[i].token_logprobs is None]
    differences = []  # (row, completion, nats per token, engine, ours)
    if per_sequence:
        pairs = [(i, j) for i in per_sequence for j in range(len(prepared[i].completion_ids))]
        ours = _score(
            model, [prepared[i].prompt_ids for i, _ in pairs], [prepared[i].completion_ids[j] for i, j in pairs],
            batch_size,
        )  # fmt: skip
        for (i, j), own in zip(pairs, ours, strict=True):
            engine = prepared[i].logprobs[j]
            differences.append((i, j, abs(engine - own) / max(1, len(prepared[i].completion_ids[j])), engine, own))
    if per_token:
        pairs = [(i, j) for i in per_token for j in range(len(prepared[i].completion_ids))]
        ours = _score_per_token(
            model, [prepared[i].prompt_ids for i, _ in pairs], [prepared[i].completion_ids[j] for i, j in pairs]
        )
        for (i, j), own in zip(pairs, ours, strict=True):
            engine = prepared[i].token_logprobs[j]
            gap = math.fsum(abs(e - o) for e, o in zip(engine, own, strict=True)) / max(1, len(own))
            differences.append((i, j, gap, math.fsum(engine), math.fsum(own)))
    for i, j, gap, engine, own in sorted(differences):
        if not gap <= tolerance:
            how = "mean |difference| per token" if prepared[i].token_logprobs is not None else "per token"
            raise ValueError(
                f"{samples.where(i)}: the log-probs in the samples disagree with the model's own scoring: completion "
                f"{j + 1} ({len(prepared[i].completion_ids[j])} tokens) reports {engine:.3f}, the model gives "
                f"{own:.3f} ({gap:.3f} nats {how}, tolerance {tolerance}). The engine's log-probs must be "
                "log-softmax of the raw logits at temperature 1 (not temperature-scaled or after top-k/top-p or "
                "penalties), from this same model and prompt tokenization, in the order of the completions. Fix the "
                "export, or drop the `logprobs` / `token_logprobs` keys to have every completion scored here."
            )
    logger.info(
        "Engine log-probs cross-checked on %d rows (%d completions, %d per token): within tolerance.",
        len(checked), len(differences), sum(len(prepared[i].completion_ids) for i in per_token),
    )  # fmt: skip


def _score_and_select(model, tokenizer, rows, prepared, indices, reward, sampling, kept, batch_size) -> list[dict]:
    """The `best_of_n` rows of one shard: base log-probs (the engine's, or scored here), rewards, selection."""
    to_score = [
        (i, j) for i in indices if prepared[i].logprobs is None for j in range(len(prepared[i].completion_ids))
    ]
    scored = []
    if to_score:
        prompts = [prepared[i].prompt_ids for i, _ in to_score]
        scored = _score(model, prompts, [prepared[i].completion_ids[j] for i, j in to_score], batch_size)
    base = {i: list(prepared[i].logprobs) if prepared[i].logprobs is not None else [] for i in indices}
    for (i, _), value in zip(to_score, scored, strict=True):
        base[i].append(value)
    group_ids = [p for p, i in enumerate(indices) for _ in prepared[i].completion_ids]
    flat_ids = [ids for i in indices for ids in prepared[i].completion_ids]
    texts = tokenizer.batch_decode(flat_ids, skip_special_tokens=True)
    all_rewards = reward(
        [rows[indices[p]]["prompt"] for p in group_ids],
        texts,
        flat_ids,
        base_logprobs=[value for i in indices for value in base[i]],
        group_ids=group_ids,
    )
    out, offset = [], 0
    for i in indices:
        row = prepared[i]
        n = len(row.completion_ids)
        has_answer = answer_flags(
            texts[offset : offset + n], row.truncated, sampling.answer_extractor, sampling.require_answer
        )
        selected, rewards = select_best(
            all_rewards[offset : offset + n],
            row.truncated,
            sampling.truncated_completions,
            sampling.truncation_penalty,
            has_answer,
        )
        out.append(
            {
                **{name: rows[i][name] for name in kept},
                "prompt_index": i,
                "prompt_ids": row.prompt_ids,
                "completions": texts[offset : offset + n],
                "completion_ids": row.completion_ids,
                "base_logprobs": base[i],
                "rewards": rewards,
                "truncated": row.truncated,
                "num_samples": n,
                "selected_index": selected,
                "selected_completion": texts[offset + selected] if selected >= 0 else None,
                "selected_completion_ids": row.completion_ids[selected] if selected >= 0 else None,
                "selected_reward": rewards[selected] if selected >= 0 else None,
            }
        )
        offset += n
    return out
