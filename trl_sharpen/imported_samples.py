"""Best-of-N from samples generated elsewhere (vLLM, SGLang, TGI): score, check and select, without generating.

    >>> from trl_sharpen.imported_samples import best_of_n_from_samples
    >>> dataset = best_of_n_from_samples(model, tokenizer, "samples.jsonl", output_dir="bon")
    $ trl-sharpen bon --model_name_or_path MODEL --samples_file samples.jsonl --output_dir bon

The samples file is JSON lines, one object per prompt:

| key              | content                                                                                          |
|------------------|--------------------------------------------------------------------------------------------------|
| `prompt`         | the prompt: a string, or chat messages (the tokenizer's chat template is applied, as in `bon`)   |
| `completions`    | the N completions as text, **or**                                                                |
| `completion_ids` | the N completions as token ids, with the EOS id at the end of a completion that ended on EOS    |
| `finish_reasons` | optional: per completion `"stop"` (ended on EOS or a stop string) or `"length"` (cut)            |
| `logprobs`       | optional: per completion log pi_base(y|x), the sum over its tokens, **or**                       |
| `token_logprobs` | optional: per completion the log-probability of each of its tokens                               |
| `prompt_ids`     | optional: the prompt's token ids as the engine saw them (default: tokenized here)                |

Any other key (e.g. `answer`) is kept as a column. A text completion is tokenized without special tokens and ends
with EOS unless its finish reason is `"length"`; a token-id completion is truncated when its finish reason is
`"length"`, or, without finish reasons, when it does not end with an EOS id.

Log-probabilities reported by the engine must be pi_base's own: log-softmax of the raw logits at temperature 1, before
any temperature, top-k/top-p, repetition penalty or other logits processing (in vLLM, `logprobs_mode="raw_logprobs"`,
its default since it has the option; older engines report processed values). Completions without them are scored here
by `sequence_logprobs` under the model. The engine's values are cross-checked against that scoring on a random
`check_fraction` of the rows that carry them (at least one row), before anything else is scored: a difference beyond
`logprob_tolerance` nats per token stops the run with the row named, which catches temperature-scaled or processed
log-probs (and a prompt tokenized differently from the engine's). How far apart wrong log-probs land depends on the
model's uncertainty: on the nearly deterministic toy base, temperature 0.7 moves most samples by only 0.01-0.03 nats
per token (the least likely by 0.2), so a small file is best checked whole (`check_fraction=1`).

The result is the dataset `best_of_n` writes (same columns, `bon_run.json`, shards resumed after an interruption), so
`BoNSFTTrainer` trains on it as on its own samples: pass the loaded dataset as its `train_dataset`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Sequence
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
from .data import ensure_pad_token, tokenize_prompt, validate_prompt_dataset
from .fingerprints import dataset_fingerprint, model_fingerprint, tokenizer_fingerprint
from .generation import eos_token_ids, eval_mode
from .logprobs import sequence_logprobs
from .sampling_arguments import BestOfNSamplingArguments, sampling_arguments
from .self_rewards import MajorityReward, base_scoring_context, get_self_reward


logger = logging.getLogger(__name__)

# Keys of a samples-file row that describe the samples; every other key is kept as a column
SAMPLE_KEYS = ("completions", "completion_ids", "finish_reasons", "logprobs", "token_logprobs", "prompt_ids")
FINISH_REASONS = ("stop", "length")


def load_samples_file(path: str | os.PathLike) -> Dataset:
    """The rows of a JSON-lines samples file, each checked (one clear error naming the line)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}, line {number}: not a JSON object ({error}).") from None
            problem = _row_problem(row)
            if problem:
                raise ValueError(f"{path}, line {number}: {problem}")
            rows.append(row)
    if not rows:
        raise ValueError(
            f"{path} holds no samples: expected one JSON object per prompt (see trl_sharpen.imported_samples)."
        )
    return Dataset.from_list(rows)


def _row_problem(row) -> str | None:
    if not isinstance(row, dict) or "prompt" not in row:
        return "each line must be a JSON object with a `prompt` (see trl_sharpen.imported_samples)."
    if ("completions" in row) == ("completion_ids" in row):
        return "give the samples as `completions` (text) or as `completion_ids` (token ids), exactly one of them."
    samples = row.get("completions", row.get("completion_ids"))
    if not isinstance(samples, list) or not samples:
        return "the completions must be a non-empty list (N samples of the prompt)."
    if "completion_ids" in row and not all(
        isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids) for ids in samples
    ):
        return "`completion_ids` must be lists of integer token ids."
    if "completions" in row and not all(isinstance(text, str) for text in samples):
        return "`completions` must be strings."
    for key in ("finish_reasons", "logprobs", "token_logprobs"):
        if key in row and (not isinstance(row[key], list) or len(row[key]) != len(samples)):
            return f"`{key}` must be a list with one entry per completion ({len(samples)})."
    if "logprobs" in row and "token_logprobs" in row:
        return "give `logprobs` (per sequence) or `token_logprobs` (per token), not both."
    if any(reason not in FINISH_REASONS for reason in row.get("finish_reasons", [])):
        return f"finish reasons must be one of {list(FINISH_REASONS)}."
    if "token_logprobs" in row and "completion_ids" in row:
        if any(len(lp) != len(ids) for lp, ids in zip(row["token_logprobs"], row["completion_ids"], strict=True)):
            return "each `token_logprobs` entry needs one value per token of its completion."
    return None


def _completion_ids(row: dict, tokenizer, eos_ids: list[int]) -> tuple[list[list[int]], list[bool]]:
    """(token ids, truncated) of a row's completions, following the module docstring's rules."""
    reasons = row.get("finish_reasons")
    if row.get("completion_ids") is not None:
        ids = [list(c) for c in row["completion_ids"]]
        if reasons is not None:
            return ids, [reason == "length" for reason in reasons]
        return ids, [not c or c[-1] not in eos_ids for c in ids]
    reasons = reasons or ["stop"] * len(row["completions"])
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in row["completions"]]
    ids = [c if reason == "length" else [*c, eos_ids[0]] for c, reason in zip(ids, reasons, strict=True)]
    return ids, [reason == "length" for reason in reasons]


def _engine_logprobs(row: dict) -> list[float] | None:
    if row.get("logprobs") is not None:
        return [float(value) for value in row["logprobs"]]
    if row.get("token_logprobs") is not None:
        return [float(sum(values)) for values in row["token_logprobs"]]
    return None


def _score(model, prompt_ids, completion_ids, micro_batch_size: int) -> list[float]:
    with torch.no_grad(), eval_mode(model), base_scoring_context(model):
        return sequence_logprobs(model, prompt_ids, completion_ids, micro_batch_size=micro_batch_size).tolist()


def best_of_n_from_samples(
    model: torch.nn.Module,
    tokenizer,
    samples: str | os.PathLike | Dataset | Sequence[dict],
    self_reward=None,
    *,
    sampling: BestOfNSamplingArguments | None = None,
    check_fraction: float = 0.01,
    logprob_tolerance: float = 0.05,
    scoring_batch_size: int = 16,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    **sampling_kwargs,
) -> Dataset:
    """Best-of-N over samples generated elsewhere: the same dataset as `best_of_n`, without generating.

    Args:
        model: pi_base, which scores the completions that carry no log-probs and checks those that do.
        tokenizer: its tokenizer.
        samples: a samples file (JSON lines, format in the module docstring), or its rows as a `Dataset` or a list.
        sampling / self_reward / **sampling_kwargs: as for `best_of_n`; of the settings only the self-reward, the
            answer extractor, the truncation policy, `shard_size` and `seed` (which rows are cross-checked) apply:
            the samples are already drawn.
        check_fraction: share of the rows with engine log-probs cross-checked against our scoring (at least one).
        logprob_tolerance: largest accepted |engine - ours| per token, in nats, in the cross-check.
        scoring_batch_size: sequences per forward pass of the scoring.
        output_dir, overwrite: as for `best_of_n` (shards, resume, `bon_run.json`).
    """
    sampling = sampling_arguments(BestOfNSamplingArguments, sampling, self_reward=self_reward, **sampling_kwargs)
    if not 0 < check_fraction <= 1:
        raise ValueError(f"check_fraction={check_fraction} must be in (0, 1]: at least one row is always checked.")
    if not logprob_tolerance > 0:
        raise ValueError(f"logprob_tolerance={logprob_tolerance} must be > 0 (nats per token).")
    if isinstance(samples, (str, os.PathLike)):
        samples = load_samples_file(samples)
    elif not isinstance(samples, Dataset):
        for index, row in enumerate(samples):
            problem = _row_problem(row)
            if problem:
                raise ValueError(f"samples row {index}: {problem}")
        samples = Dataset.from_list(list(samples))
    validate_prompt_dataset(samples)
    ensure_pad_token(tokenizer)
    reward = get_self_reward(
        sampling.self_reward, answer_extractor=sampling.answer_extractor, model=model, tokenizer=tokenizer
    )
    rows = samples.to_list()
    num_samples = [len(row.get("completions") or row["completion_ids"]) for row in rows]
    if isinstance(reward, MajorityReward) and min(num_samples) < MajorityReward.min_samples:
        raise ValueError(
            f"self_reward='majority' needs at least {MajorityReward.min_samples} completions per prompt; a row of the "
            f"samples has {min(num_samples)}. Use self_reward='logprob'."
        )
    eos_ids = eos_token_ids(model, tokenizer)
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    prepared = []
    for row in rows:
        prompt_ids = row.get("prompt_ids") or tokenize_prompt(tokenizer, row["prompt"])
        completion_ids, truncated = _completion_ids(row, tokenizer, eos_ids)
        prepared.append((prompt_ids, completion_ids, truncated, _engine_logprobs(row)))

    # The cross-check comes first: a file of wrong log-probs must fail before anything else is scored
    with_engine = [i for i, (*_, logprobs) in enumerate(prepared) if logprobs is not None]
    if with_engine:
        count = max(1, math.ceil(check_fraction * len(with_engine)))
        checked = sorted(random.Random(sampling.seed).sample(with_engine, count))
        _cross_check(model, prepared, checked, logprob_tolerance, scoring_batch_size)

    output_dir = Path(output_dir) if output_dir is not None else None
    if output_dir is not None:
        check_output_dir_is_not_input(output_dir, samples)
    fingerprint = sampling.fingerprint(reward.name)
    run = {
        "model": model_fingerprint(model),
        "model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "prompts": dataset_fingerprint(samples),  # the samples file's content (prompts and completions)
        "num_prompts": len(samples),
        "samples": "imported",  # generated elsewhere: the generation settings below were not ours
        **{k: fingerprint[k] for k in ("self_reward", "truncated_completions", "truncation_penalty", "shard_size")},
        "num_samples": max(num_samples),
        "base_model_is_sampler": False,
    }
    writer = _ShardWriter(output_dir, run, overwrite)
    kept = {name: feature for name, feature in samples.features.items() if name not in SAMPLE_KEYS}
    features = Features({**kept, **BON_FEATURES})
    state = PartialState()
    num_shards = math.ceil(len(rows) / sampling.shard_size)
    local_rows = []
    for shard in range(state.process_index, num_shards, state.num_processes):
        if writer.done(shard):
            continue
        indices = range(shard * sampling.shard_size, min((shard + 1) * sampling.shard_size, len(rows)))
        shard_rows = _score_and_select(
            model, tokenizer, rows, prepared, list(indices), reward, sampling, kept, scoring_batch_size
        )
        with _quiet_datasets():
            writer.write(shard, Dataset.from_list(shard_rows, features=features))
        local_rows.extend(shard_rows)
    return writer.result(num_shards, local_rows, features)


def _cross_check(model, prepared, checked: list[int], tolerance: float, batch_size: int) -> None:
    prompts = [prepared[i][0] for i in checked for _ in prepared[i][1]]
    completions = [ids for i in checked for ids in prepared[i][1]]
    ours = _score(model, prompts, completions, batch_size)
    reported = [value for i in checked for value in prepared[i][3]]
    rows = [i for i in checked for _ in prepared[i][1]]
    for row, ids, engine, own in zip(rows, completions, reported, ours, strict=True):
        per_token = abs(engine - own) / max(1, len(ids))
        if per_token > tolerance:
            raise ValueError(
                f"The log-probs in the samples disagree with the model's own scoring: row {row} reports {engine:.3f} "
                f"for a {len(ids)}-token completion, the model gives {own:.3f} ({per_token:.3f} nats per token, "
                f"tolerance {tolerance}). The engine's log-probs must be log-softmax of the raw logits at temperature "
                "1 (not temperature-scaled or after top-k/top-p or penalties), from this same model and prompt "
                "tokenization. Fix the export, or drop the `logprobs` / `token_logprobs` keys to have every "
                "completion scored here."
            )
    logger.info(
        "Engine log-probs cross-checked on %d rows (%d completions): within tolerance.", len(checked), len(rows)
    )


def _score_and_select(model, tokenizer, rows, prepared, indices, reward, sampling, kept, batch_size) -> list[dict]:
    """The `best_of_n` rows of one shard: base log-probs (the engine's, or scored here), rewards, selection."""
    to_score = [(i, j) for i in indices if prepared[i][3] is None for j in range(len(prepared[i][1]))]
    scored = []
    if to_score:
        prompts = [prepared[i][0] for i, _ in to_score]
        scored = _score(model, prompts, [prepared[i][1][j] for i, j in to_score], batch_size)
    base = {i: list(prepared[i][3]) if prepared[i][3] is not None else [] for i in indices}
    for (i, _), value in zip(to_score, scored, strict=True):
        base[i].append(value)
    group_ids = [p for p, i in enumerate(indices) for _ in prepared[i][1]]
    flat_ids = [ids for i in indices for ids in prepared[i][1]]
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
        prompt_ids, completion_ids, truncated, _ = prepared[i]
        n = len(completion_ids)
        has_answer = answer_flags(
            texts[offset : offset + n], truncated, sampling.answer_extractor, sampling.require_answer
        )
        selected, rewards = select_best(
            all_rewards[offset : offset + n],
            truncated,
            sampling.truncated_completions,
            sampling.truncation_penalty,
            has_answer,
        )
        out.append(
            {
                **{name: rows[i][name] for name in kept},
                "prompt_index": i,
                "prompt_ids": prompt_ids,
                "completions": texts[offset : offset + n],
                "completion_ids": completion_ids,
                "base_logprobs": base[i],
                "rewards": rewards,
                "truncated": truncated,
                "num_samples": n,
                "selected_index": selected,
                "selected_completion": texts[offset + selected] if selected >= 0 else None,
                "selected_completion_ids": completion_ids[selected] if selected >= 0 else None,
                "selected_reward": rewards[selected] if selected >= 0 else None,
            }
        )
        offset += n
    return out
