"""Reading a samples file (`trl-sharpen bon --samples_file`) and checking every row, without a model: structure,
values (log-probs finite and <= 0, per token and per sequence), the log-prob shapes engines export, and what must
agree across rows (the same keys and kinds of samples, one type per column, no column Best-of-N writes). Every
problem is one error naming the file and the 1-based line. The format: `trl_sharpen.imported_samples`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from datasets import Dataset

from .best_of_n_sampling import BON_FEATURES, _quiet_datasets
from .data import prompt_problem
from .sampling_arguments import BestOfNSamplingArguments


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
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"--samples_file {path} {what}: pass the JSON-lines file of samples.")
    with open(path, encoding="utf-8-sig") as f:  # a byte-order mark (Windows exports) is not part of line 1
        for number, line in _lines(f, path):
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


def _lines(handle, path):
    """(1-based number, line) of a text file, a file that is not UTF-8 named with the byte where it stops being so."""
    try:
        yield from enumerate(handle, start=1)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason}): save it as UTF-8.") from None


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
    if isinstance(row["prompt"], str) and not row["prompt"].strip():
        raise _RowProblem("`prompt` is empty (or only whitespace): a completion needs a prompt to continue.")
    problem = prompt_problem(row["prompt"])
    if problem:
        raise _RowProblem(f"not a usable prompt: {problem}.")
    row = {key: value for key, value in row.items()}
    for key in SAMPLE_KEYS:
        if key in row and row[key] is None:
            del row[key]  # explicitly absent on this row (a `Dataset` row has every column, None where absent)
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
    for key in ("logprobs", "token_logprobs"):
        missing = next((j for j, value in enumerate(row.get(key) or []) if value is None), None)
        if missing is not None:
            raise _RowProblem(
                f"`{key}` of completion {missing + 1} is null: give every completion's log-probs, or drop `{key}` "
                "on this line to have its completions scored here."
            )
    for j, value in enumerate(row.get("logprobs") or []):
        if not (_is_number(value) or isinstance(value, (list, dict))):
            raise _RowProblem(
                f"`logprobs` of completion {j + 1} is {value!r}: expected a number (the completion's log-prob), or "
                f"per-token values ({TOKEN_LOGPROBS_FORMAT}) under `token_logprobs`."
            )
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
            lacking = set(missing)
            having = [i for i in range(len(rows)) if i not in lacking]
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
            if row[args.answer_column] is not None:
                row[args.answer_column] = extract_answer(row[args.answer_column])
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
