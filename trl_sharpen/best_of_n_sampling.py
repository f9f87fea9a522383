"""Inference-time Best-of-N sharpening (Huang et al. 2025, App. C): sample N completions per prompt from the base
model, score them with a self-reward, keep the best.

    >>> from trl_sharpen import best_of_n
    >>> dataset = best_of_n(model, tokenizer, prompts, num_samples=16, self_reward="logprob", output_dir="bon")

Expensive work is never lost: with an `output_dir`, results are written shard by shard as they are produced, and a
run restarted with the same arguments skips the shards already on disk. Under several processes (`accelerate launch`)
the shards are split across ranks; every prompt is generated exactly once. The result is a `datasets.Dataset` (saved
with `save_to_disk` in `output_dir`) holding, per prompt, the input columns plus:

| column                    | content                                                                            |
|---------------------------|------------------------------------------------------------------------------------|
| `prompt_index`            | position of the prompt in the input                                                |
| `prompt_ids`              | the prompt's token ids (chat template applied for conversational prompts)          |
| `completions`             | the sampled completions, decoded without special tokens                            |
| `completion_ids`          | their exact token ids, ending with EOS unless truncated                            |
| `base_logprobs`           | log pi_base(y|x) of each completion                                                |
| `rewards`                 | the self-reward of each completion (with the truncation penalty, if any)           |
| `truncated`               | whether the completion hit `max_new_tokens` without EOS                            |
| `num_samples`             | completions drawn for this prompt (below N when adaptive sampling stopped early)   |
| `selected_index`          | argmax of `rewards` among complete completions (see `select_best`; -1: all dropped) |
| `selected_completion`     | that completion (text), `selected_completion_ids` its ids, `selected_reward` its reward |
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset, Features, List, Value, concatenate_datasets, load_from_disk
from tqdm.auto import tqdm

from .answers import get_answer_extractor
from .data import ensure_pad_token, is_saved_dataset, model_max_length, tokenize_prompts, validate_prompt_dataset
from .errors import check_output_dir
from .fingerprints import dataset_fingerprint, model_fingerprint, tokenizer_fingerprint
from .generation import Completions, eval_mode, generate_completions, sampling_config, seeded
from .output_dir import OutputFiles, output_dir_lock
from .sampling_arguments import (
    BestOfNSamplingArguments,
    answer_gating_on,
    check_majority_samples,
    sampling_arguments,
)
from .self_rewards import MajorityReward, SelfReward, get_self_reward


logger = logging.getLogger(__name__)

RUN_FILE = "bon_run.json"
SHARDS_DIR = "shards"
FINAL_FILES = ("state.json", "dataset_info.json")  # with data-*.arrow: the final dataset, saved beside shards/


def bon_output_files(output_dir, overwrite: bool = False) -> OutputFiles:
    """What `best_of_n` may replace in output_dir: only what a Best-of-N run wrote there (see `OutputFiles`); a
    folder holding anything else is refused unless `overwrite`, and then only written beside those files."""
    return OutputFiles(
        output_dir,
        "bon",
        overwrite=overwrite,
        overwrite_hint="--overwrite (overwrite=True)",
        legacy=_legacy_bon_files,
        planned=(RUN_FILE, SHARDS_DIR, *FINAL_FILES, "data-*.arrow"),
    )


def _legacy_bon_files(folder: Path) -> set[str]:
    """A folder written before the file manifest existed: its run file names it as Best-of-N's."""
    if not (folder / RUN_FILE).is_file():
        return set()
    names = {RUN_FILE, SHARDS_DIR, *FINAL_FILES}
    return {
        p.name for p in folder.iterdir() if p.name in names or (p.name.startswith("data-") and p.suffix == ".arrow")
    }


CHECKSUM_FILE = "checksums.json"  # in each shard folder: sha256 of its files

BON_FEATURES = Features(
    {
        "prompt_index": Value("int64"),
        "prompt_ids": List(Value("int32")),
        "completions": List(Value("string")),
        "completion_ids": List(List(Value("int32"))),
        "base_logprobs": List(Value("float64")),
        "rewards": List(Value("float64")),
        "truncated": List(Value("bool")),
        "num_samples": Value("int64"),
        "selected_index": Value("int64"),
        "selected_completion": Value("string"),
        "selected_completion_ids": List(Value("int32")),
        "selected_reward": Value("float64"),
    }
)

# Computes log pi_base(y|x) for (prompt_ids, completion_ids) pairs, when the sampler is not the base model
BaseLogprobsFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], Sequence[float]]


def adaptive_stopping_index(
    logprobs: Sequence[float], mu: float, truncated: Sequence[bool] | None = None
) -> int | None:
    """The adaptive sample size of Huang et al. (2025), App. D, for one prompt:

        N_mu = min { k : 1 / max_{j<=k} pi_base(y_j|x) <= k / mu },   mu = ln(2 / delta),

    i.e. the first k with log(k) + max_{j<=k} log pi_base(y_j|x) >= log(mu). Returns None if no k in the samples
    so far qualifies. Truncated samples count in k but not in the max: the probability of a prefix is not that of a
    response (it bounds every response extending it from above), so a likely prefix must not stop sampling.
    """
    truncated = [False] * len(logprobs) if truncated is None else truncated
    best = -math.inf
    for k, (logprob, cut) in enumerate(zip(logprobs, truncated, strict=True), start=1):
        if not cut:
            best = max(best, logprob)
        if math.log(k) + best >= math.log(mu):
            return k
    return None


def select_best(
    rewards: Sequence[float],
    truncated: Sequence[bool],
    truncated_policy: str,
    truncation_penalty: float,
    has_answer: Sequence[bool] | None = None,
) -> tuple[int, list[float]]:
    """The selected sample and the rewards after the truncation policy: complete samples with an answer first (with
    `has_answer`, under answer gating), then complete samples, then by reward.

    A truncated completion is a prefix, and log pi_base of a prefix bounds that of every completion extending it
    from above: ranked by reward alone, cut-off text would beat complete answers. So under every policy a truncated
    sample is selected only when every sample of the prompt is truncated; then `keep` and `penalize` select the best
    prefix by reward (it stays flagged in `truncated`), and `drop` selects none (-1). `penalize` also subtracts
    `truncation_penalty` from the stored rewards of truncated samples (for downstream use of `rewards`); it does not
    change the selection. First maximum on ties.

    Answer gating (`has_answer`, see `answer_flags`) is the same rule one level up: a self-reward can be hacked by
    text with no answer at all (an echo of the question is likely under pi_base), so a sample without an extractable
    answer is selected only when no complete sample of the prompt has one.
    """
    rewards = [
        r - truncation_penalty if (cut and truncated_policy == "penalize") else r
        for r, cut in zip(rewards, truncated, strict=True)
    ]
    complete = [i for i, cut in enumerate(truncated) if not cut]
    answered = [i for i in complete if has_answer[i]] if has_answer is not None else []
    eligible = answered or complete or ([] if truncated_policy == "drop" else list(range(len(rewards))))
    if not eligible:
        return -1, rewards
    return max(eligible, key=lambda i: rewards[i]), rewards


def answer_flags(
    texts: Sequence[str], truncated: Sequence[bool], answer_extractor, require_answer: bool | None
) -> list[bool] | None:
    """Per completion, whether it counts as having an answer under answer gating; None when gating is off
    (`require_answer` False, or None without an `answer_extractor`: see `SamplingArguments.require_answer`).

    A truncated completion never counts: the answer of a cut text may itself be cut (the "1" of "12"), and it is a
    prefix in any case, so gating never ranks it above a complete one."""
    if not answer_gating_on(require_answer, answer_extractor):
        return None
    extract = get_answer_extractor(answer_extractor)
    return [not cut and extract(text) is not None for text, cut in zip(texts, truncated, strict=True)]


def check_no_written_columns(columns, where: str = "The prompts") -> None:
    """Refuse input columns named like a column the Best-of-N dataset writes: the output would overwrite them."""
    clashing = [name for name in columns if name in BON_FEATURES]
    if clashing:
        raise ValueError(
            f"{where} have a column `{clashing[0]}` that Best-of-N writes ({', '.join(BON_FEATURES)}): it would be "
            f"overwritten. Please rename it (`dataset.rename_column({clashing[0]!r}, 'my_{clashing[0]}')`) or drop it."
        )


def check_output_dir_is_not_input(output_dir: Path, prompts: Dataset) -> None:
    """Refuse an output_dir that holds the input dataset's files: the final save would overwrite the prompts."""
    for cache_file in prompts.cache_files:
        if Path(cache_file["filename"]).resolve().parent == output_dir.resolve():
            raise ValueError(
                f"output_dir {output_dir} holds the input prompts (the saved dataset they were loaded from): the "
                "Best-of-N results would overwrite them. Choose another output_dir."
            )


def _file_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file of a saved dataset folder (data, `state.json`, `dataset_info.json`)."""
    checksums = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != CHECKSUM_FILE:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            checksums[path.name] = digest.hexdigest()
    return checksums


class _ShardWriter:
    """Shard folders under `output_dir/shards`, each written atomically (temporary folder, then rename) with the
    sha256 of its files in `checksums.json`. A shard is reused only when its files still match: one that is
    incomplete, edited or corrupted on disk is named in the log and sampled again, and the final dataset is merged
    only from shards that pass the check."""

    def __init__(self, output_dir: Path | None, run: dict, overwrite: bool):
        self.output_dir = output_dir
        if output_dir is None:
            return
        self.shards_dir = output_dir / SHARDS_DIR
        state = PartialState()
        if state.is_main_process:
            run_file = output_dir / RUN_FILE
            # Only what a Best-of-N run wrote may be replaced: a folder of the user's is refused (or, with overwrite,
            # written beside its files, never over them)
            self.files = bon_output_files(output_dir, overwrite)
            self.files.claim(RUN_FILE, SHARDS_DIR)
            if overwrite and self.files.previous_run:  # shards of ours, never a user's folder named `shards`
                shutil.rmtree(self.shards_dir, ignore_errors=True)
            elif self._holds_results():
                # Results of a run that got at least one shard (or the final dataset) written: resume only with the
                # same arguments. A run file alone (a first run that failed before any shard) locks nothing.
                previous = self._previous_run(run_file)
                changed = {k: (previous.get(k), v) for k, v in run.items() if previous.get(k) != v}
                if changed:
                    details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
                    raise ValueError(
                        f"{output_dir} holds Best-of-N results generated with other arguments ({details}). Use "
                        f"another output_dir, or discard them: delete {output_dir}, or pass overwrite=True "
                        "(`trl-sharpen bon --overwrite`)."
                    )
            self.shards_dir.mkdir(parents=True, exist_ok=True)
            run_file.write_text(json.dumps(run, indent=2))
        state.wait_for_everyone()

    def _holds_results(self) -> bool:
        shards = self.shards_dir.is_dir() and any(p.name.startswith("shard-") for p in self.shards_dir.iterdir())
        return shards or is_saved_dataset(self.output_dir)

    def _previous_run(self, run_file: Path) -> dict:
        try:
            return json.loads(run_file.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{self.output_dir} holds Best-of-N results, but their arguments cannot be read from {run_file} "
                f"({error}), so they cannot be resumed safely. Use another output_dir, or discard them: delete "
                f"{self.output_dir}, or pass overwrite=True (`trl-sharpen bon --overwrite`)."
            ) from None

    def path(self, shard: int) -> Path:
        return self.shards_dir / f"shard-{shard:05d}"

    def problem(self, shard: int) -> str | None:
        """Why a shard folder on disk cannot be used (None when its files match their checksums)."""
        path = self.path(shard)
        try:
            expected = json.loads((path / CHECKSUM_FILE).read_text())
        except (OSError, ValueError):
            return f"{CHECKSUM_FILE} is missing or unreadable"
        actual = _file_checksums(path)
        bad = sorted(name for name in expected.keys() | actual.keys() if expected.get(name) != actual.get(name))
        return f"checksum mismatch in {', '.join(bad)}" if bad else None

    def done(self, shard: int) -> bool:
        """Whether the shard is on disk and intact; a damaged one is logged and removed, to be sampled again."""
        if self.output_dir is None or not self.path(shard).exists():
            return False
        problem = self.problem(shard)
        if problem is None:
            return True
        logger.warning("%s failed its checksum check (%s): sampling it again.", self.path(shard), problem)
        shutil.rmtree(self.path(shard), ignore_errors=True)
        return False

    def write(self, shard: int, dataset: Dataset) -> None:
        if self.output_dir is None:
            return
        tmp = self.shards_dir / f".tmp-shard-{shard:05d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        dataset.save_to_disk(str(tmp))
        (tmp / CHECKSUM_FILE).write_text(json.dumps(_file_checksums(tmp), indent=2))
        shutil.rmtree(self.path(shard), ignore_errors=True)  # a damaged copy (rename cannot replace a full folder)
        os.replace(tmp, self.path(shard))

    def read_verified(self, num_shards: int) -> Dataset:
        """All shards, each checked against its checksums first: a damaged shard stops the merge, so the final
        dataset (and a good one already in output_dir) is never replaced by damaged data."""
        for shard in range(num_shards):
            problem = self.problem(shard)
            if problem is not None:
                raise RuntimeError(
                    f"{self.path(shard)} failed its checksum check before merging ({problem}); the final dataset "
                    f"in {self.output_dir} was left as it was. Run again with the same arguments: the damaged shard "
                    "is sampled again."
                )
        return concatenate_datasets([load_from_disk(str(self.path(s))) for s in range(num_shards)])

    def result(self, num_shards: int, local_rows: list[dict], features: Features) -> Dataset:
        """The whole result, on every process: without an output_dir the rows gathered from all processes, else the
        verified shards merged into the final dataset in output_dir (by the main process) and loaded from it."""
        state = PartialState()
        if self.output_dir is None:
            rows = local_rows if state.num_processes == 1 else gather_object(local_rows)
            return Dataset.from_list(sorted(rows, key=lambda r: r["prompt_index"]), features=features)
        state.wait_for_everyone()
        with _quiet_datasets():
            if state.is_main_process:
                _save_final(self.read_verified(num_shards), self.output_dir, self.files)
            state.wait_for_everyone()
            return load_from_disk(str(self.output_dir))


def best_of_n(
    model: torch.nn.Module,
    tokenizer,
    prompts: Dataset | Sequence,
    num_samples: int | None = None,
    self_reward: str | Callable | SelfReward | None = None,
    *,
    sampling: BestOfNSamplingArguments | None = None,
    prompt_column: str = "prompt",
    base_logprobs_fn: BaseLogprobsFn | None = None,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    synced_gpus: bool | None = None,
    progress: bool = True,
    **sampling_kwargs,
) -> Dataset:
    """Best-of-N sharpening: for each prompt sample N completions, score them with a self-reward, select the argmax.

    Args:
        model: the model to sample from. By default it is also pi_base, whose log-probabilities are then taken
            from the generation step itself (no second forward pass).
        tokenizer: its tokenizer (a pad token is set to EOS, with a warning, when missing).
        prompts: a prompt-only `Dataset` (standard or conversational `prompt` column; other columns are kept), or a
            list of prompts (strings or message lists).
        sampling: the sampling settings, a `BestOfNSamplingArguments` (or any object with its fields, such as a
            `BoNSFTConfig`): N, the self-reward, temperature / top-p / top-k, `max_completion_length`, the truncation
            policy, adaptive sampling, `shard_size` and `seed`. Their meaning is documented once, in
            `trl_sharpen.sampling_arguments`. Completions cut at `max_completion_length` are never selected while
            the prompt has a complete one (see `select_best`). Each shard samples with `seed + shard index`, so
            results do not depend on the number of ranks.
        num_samples, self_reward, **sampling_kwargs: the same settings as keyword arguments (`temperature=0.7`,
            `max_completion_length=128`, ...); they override `sampling` and are validated alike. Old names
            (`max_new_tokens`, `generation_batch_size`) still work, with a `FutureWarning`.
        base_logprobs_fn: computes log pi_base(y|x) when `model` is not the base (e.g. sampling from a policy).
        output_dir: write shards and the final dataset here, and resume from it.
        overwrite: discard results in `output_dir` generated with other arguments instead of refusing.
        synced_gpus: forwarded to `generate` (False when ZeRO-3 parameters are already gathered).
    """
    sampling = sampling_arguments(
        BestOfNSamplingArguments, sampling, num_samples=num_samples, self_reward=self_reward, **sampling_kwargs
    )
    num_samples, shard_size, seed = sampling.num_samples, sampling.shard_size, sampling.seed
    max_new_tokens = sampling.max_completion_length
    if not isinstance(prompts, Dataset):
        validate_prompt_dataset(prompts)
        prompts = Dataset.from_dict({prompt_column: list(prompts)})
    validate_prompt_dataset(prompts, prompt_column)
    check_no_written_columns(prompts.column_names)
    ensure_pad_token(tokenizer)
    reward = get_self_reward(
        sampling.self_reward, answer_extractor=sampling.answer_extractor, model=model, tokenizer=tokenizer
    )
    if isinstance(reward, MajorityReward):
        check_majority_samples(num_samples)
    generation_config = sampling_config(model, tokenizer, **sampling.sampling_config_kwargs())
    prompt_ids = tokenize_prompts(
        tokenizer, prompts[prompt_column], max_new_tokens=max_new_tokens, max_length=model_max_length(model)
    )
    check_output_dir(output_dir)  # '' (= '.'), the current directory or above, home, /, a file: refused
    output_dir = Path(output_dir) if output_dir is not None else None
    if output_dir is not None:
        check_output_dir_is_not_input(output_dir, prompts)
    run = {
        "model": model_fingerprint(model),
        "model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "prompts": dataset_fingerprint(prompts),  # content, not path + mtime: an edited file is not served stale
        "num_prompts": len(prompts),
        **sampling.fingerprint(reward.name),
        "base_model_is_sampler": base_logprobs_fn is None,
    }
    # The folder is this run's alone (another run on it is refused, naming it); re-entrant under `trl-sharpen bon`,
    # which holds the lock already
    with output_dir_lock(output_dir):
        writer = _ShardWriter(output_dir, run, overwrite)
        features = Features({**prompts.features, **BON_FEATURES})

        state = PartialState()
        num_shards = math.ceil(len(prompts) / shard_size)
        my_shards = [s for s in range(state.process_index, num_shards, state.num_processes) if not writer.done(s)]
        my_prompts = sum(min(shard_size, len(prompts) - s * shard_size) for s in my_shards)
        if (
            state.num_processes > 1
        ):  # each rank says what it does: a rank that sampled nothing would otherwise go unseen
            logger.info(
                "Best-of-N on process %d of %d: %d of %d shards to sample (%d prompts)",
                state.process_index,
                state.num_processes,
                len(my_shards),
                num_shards,
                my_prompts,
            )
        bar = tqdm(
            total=my_prompts * num_samples,
            desc="Best-of-N sampling",
            unit="sample",
            disable=not progress or not state.is_local_main_process,
        )
        local_rows = []
        try:
            for shard in my_shards:
                indices = list(range(shard * shard_size, min((shard + 1) * shard_size, len(prompts))))
                with eval_mode(model), seeded(model, seed + shard):
                    rows = _best_of_n_shard(
                        model,
                        tokenizer,
                        prompts.select(indices),
                        prompt_column,
                        indices,
                        [prompt_ids[i] for i in indices],
                        reward,
                        generation_config,
                        num_samples=num_samples,
                        batch_size=sampling.sampling_batch_size,
                        truncated_policy=sampling.truncated_completions,
                        truncation_penalty=sampling.truncation_penalty,
                        answer_gating=(sampling.answer_extractor, sampling.require_answer),
                        adaptive_delta=sampling.adaptive_delta,
                        adaptive_round_size=sampling.adaptive_round_size,
                        base_logprobs_fn=base_logprobs_fn,
                        synced_gpus=synced_gpus,
                        progress=bar,
                    )
                with _quiet_datasets():
                    writer.write(shard, Dataset.from_list(rows, features=features))
                local_rows.extend(rows)
        finally:
            bar.close()

        return writer.result(num_shards, local_rows, features)


def _save_final(dataset: Dataset, output_dir: Path, files: OutputFiles) -> None:
    """Save the merged dataset into output_dir (beside `shards/`) without a moment where it holds a half-written one:
    save to a temporary folder, then move the files in, `state.json` (which names the data files) last. Only files a
    Best-of-N run wrote are replaced or removed (`files`): a same-named file of the user's stops the save."""
    tmp = output_dir / f".tmp-final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(str(tmp))
    names = sorted((p.name for p in tmp.iterdir()), key=lambda name: name == "state.json")
    try:
        files.claim(*names)
    except ValueError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for name in names:
        os.replace(tmp / name, output_dir / name)
    tmp.rmdir()
    for stale in output_dir.glob("data-*.arrow"):  # data files of a previous, larger final dataset (ours only)
        if stale.name not in names and files.is_ours(stale.name):
            stale.unlink()


def _best_of_n_shard(
    model,
    tokenizer,
    shard_prompts: Dataset,
    prompt_column: str,
    indices: list[int],
    prompt_ids: list[list[int]],
    reward: SelfReward,
    generation_config,
    *,
    truncated_policy: str,
    truncation_penalty: float,
    answer_gating: tuple = (None, None),
    **sampling,
) -> list[dict]:
    samples = _sample(model, prompt_ids, generation_config, tokenizer=tokenizer, **sampling)
    # Decode and score all completions of the shard in one call each; `group_ids` tells group-wise rewards (majority)
    # which prompt a completion belongs to
    group_ids = [p for p, (ids, _, _) in enumerate(samples) for _ in ids]
    flat_ids = [ids for prompt_samples, _, _ in samples for ids in prompt_samples]
    flat_texts = tokenizer.batch_decode(flat_ids, skip_special_tokens=True)
    input_rows = shard_prompts.to_list()
    all_rewards = reward(
        [input_rows[p][prompt_column] for p in group_ids],
        flat_texts,
        flat_ids,
        base_logprobs=[lp for _, logprobs, _ in samples for lp in logprobs],
        group_ids=group_ids,
    )
    rows, offset = [], 0
    for p, (ids, logprobs, truncated) in enumerate(samples):
        span = slice(offset, offset + len(ids))
        offset += len(ids)
        texts = flat_texts[span]
        has_answer = answer_flags(texts, truncated, *answer_gating)
        selected, effective = select_best(
            all_rewards[span], truncated, truncated_policy, truncation_penalty, has_answer
        )
        rows.append(
            {
                **input_rows[p],
                "prompt_index": indices[p],
                "prompt_ids": prompt_ids[p],
                "completions": texts,
                "completion_ids": ids,
                "base_logprobs": logprobs,
                "rewards": effective,
                "truncated": truncated,
                "num_samples": len(ids),
                "selected_index": selected,
                "selected_completion": texts[selected] if selected >= 0 else None,
                "selected_completion_ids": ids[selected] if selected >= 0 else None,
                "selected_reward": effective[selected] if selected >= 0 else None,
            }
        )
    return rows


def _sample(
    model,
    prompt_ids,
    generation_config,
    *,
    tokenizer,
    num_samples,
    batch_size,
    adaptive_delta,
    adaptive_round_size,
    base_logprobs_fn,
    synced_gpus,
    progress,
) -> list[tuple[list[list[int]], list[float], list[bool]]]:
    """Per prompt: (completion ids, base log-probs, truncated flags), N each or fewer under adaptive sampling."""
    per_prompt = [([], [], []) for _ in prompt_ids]
    active = list(range(len(prompt_ids)))
    mu = math.log(2 / adaptive_delta) if adaptive_delta is not None else None
    while active:
        draw = num_samples if mu is None else min(adaptive_round_size, num_samples - len(per_prompt[active[0]][0]))
        completions = generate_completions(
            model,
            [prompt_ids[p] for p in active],
            generation_config,
            num_samples=draw,
            batch_size=batch_size,
            record_logprobs=base_logprobs_fn is None,
            synced_gpus=synced_gpus,
            progress=progress,
            tokenizer=tokenizer,  # reads the completions when the config has stop strings
        )
        logprobs = _base_logprobs(completions, [prompt_ids[p] for p in active], base_logprobs_fn)
        for row, local in enumerate(completions.prompt_index):
            ids, lps, cut = per_prompt[active[local]]
            ids.append(completions.completion_ids[row])
            lps.append(logprobs[row])
            cut.append(completions.truncated[row])
        if mu is None:
            break
        still_active = []
        for p in active:
            ids, lps, cut = per_prompt[p]
            stop = adaptive_stopping_index(lps, mu, cut)
            if stop is not None:
                if progress is not None:
                    progress.update(num_samples - len(ids))  # the samples this prompt will not need
                del ids[stop:], lps[stop:], cut[stop:]
            elif len(ids) < num_samples:
                still_active.append(p)
        active = still_active
    return per_prompt


def _base_logprobs(completions: Completions, prompt_ids, base_logprobs_fn) -> list[float]:
    if base_logprobs_fn is None:
        return completions.logprobs
    expanded = [prompt_ids[i] for i in completions.prompt_index]
    return [float(x) for x in base_logprobs_fn(expanded, completions.completion_ids)]


class _quiet_datasets:
    """Silence `datasets`' progress bars for the small saves and loads of shards."""

    def __enter__(self):
        self.enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()

    def __exit__(self, *exc):
        if self.enabled:
            datasets.enable_progress_bars()
