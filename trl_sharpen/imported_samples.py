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

Checks of every row (reading and the checks that need no model: `trl_sharpen.samples_file`), before the model loads
(from the CLI) and before anything is scored: log-probs are numbers, finite and <= 0 (per token and per sequence);
token ids are in the model's vocabulary; `prompt_ids` decode to the row's prompt; completions fit
`max_completion_length` and the model's context; a column has one type on every line. Every message names the file
and the 1-based line.

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
0.01-0.03 nats per token (the least likely by 0.2): one wrong row can pass while others fail, hence every row of a
file of up to 32, and at least 32 rows of a larger one (`check_fraction=1` checks all).

Of the sampling settings, the self-reward, answer extractor and gating, truncation policy, `stop_strings`,
`max_completion_length`, `shard_size`, `sampling_batch_size` (scoring micro-batch) and `seed` (which rows are
cross-checked) apply; temperature, top-p/top-k, `num_samples` and adaptive sampling do not (the engine drew the
samples), so values other than their defaults are refused.

The result is the dataset `best_of_n` writes (same columns, `bon_run.json`, shards resumed after an interruption), so
`BoNSFTTrainer` trains on it as on its own samples: pass the loaded dataset as its `train_dataset`.
"""

from __future__ import annotations

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
from .data import ensure_pad_token, is_conversational_prompt, model_max_length, tokenize_prompt
from .fingerprints import model_fingerprint, tokenizer_fingerprint
from .generation import end_of_turn_token_id, eos_token_ids, eval_mode
from .logprobs import sequence_logprobs
from .samples_file import (
    SAMPLE_KEYS,
    ImportedSamples,
    _is_int,
    _RowProblem,
    check_samples,
    check_settings_apply,
    load_samples_file,
    samples_file_prompts,
)
from .sampling_arguments import BestOfNSamplingArguments, sampling_arguments
from .self_rewards import MajorityReward, base_scoring_context, get_self_reward


__all__ = [
    "ImportedSamples",
    "best_of_n_from_samples",
    "check_settings_apply",
    "load_samples_file",
    "samples_file_prompts",
]


logger = logging.getLogger(__name__)

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
