"""Evaluation of sharpening: does sharpening help this model, and what did it do?

Two entry points:

- `evaluate_greedy`: greedy accuracy and the base log-likelihood of greedy outputs, the two numbers to watch after
  training (sharpening should make greedy decoding do what Best-of-N did; Huang et al. 2025, Table 1).
- `evaluate_sharpening`: the full view from one set of N samples per prompt, as in the paper's App. A: greedy and
  temperature-1 accuracy, BoN@n for n = 1, 2, 4, ..., N per self-reward, pass@n, the generation-verification gap of
  Song et al. (2025, "Mind the Gap", Def. 2.1-2.2), the sharpening error delta (Def. 3.1) and answer diversity.

    >>> report = evaluate_sharpening(model, tokenizer, prompts, answers, num_samples=16)
    >>> print(format_report(report))
    >>> report.save_json("eval/report.json")

Smaller n are *not* sampled again: BoN@n and pass@n are exact expectations over uniformly random n-subsets of the N
samples (the paper simulates them "by subsampling the 50 draws", App. A.4; we take the expectation instead of Monte
Carlo draws, so the curves carry no subsampling noise). The exact estimators are in `trl_sharpen.metrics`; the report,
its JSON and `format_report` in `trl_sharpen.report`; the plots in `trl_sharpen.plots`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch
from accelerate.utils import is_peft_model
from tqdm.auto import tqdm

from .answers import AnswerExtractor, answers_match, get_answer_extractor, load_callable
from .data import ensure_pad_token, model_max_length, refuse_single_string, tokenize_prompts
from .generation import eval_mode, generate_completions, sampling_config, seeded
from .logprobs import sequence_logprobs
from .metrics import validate_sample_count
from .report import GreedyEvaluation, SampledAccuracy, SampleSet, SharpeningReport
from .sampling_arguments import SamplingArguments, sampling_arguments
from .self_rewards import MajorityReward, SelfReward, base_scoring_context, get_self_reward


logger = logging.getLogger(__name__)

AnswerChecker = Callable[[str, str], bool]

DEFAULT_SELF_REWARDS = ("logprob", "normalized_logprob", "majority")


def check_answers(checker: AnswerChecker, completions: Sequence[str], references: Sequence) -> tuple[list[bool], int]:
    """`checker(completion, reference)` for each pair; a checker that raises counts that completion as wrong.

    Returns the correctness flags and the number of completions on which the checker raised. A user checker that
    crashes on one odd completion should not lose a whole evaluation, but it must not go unnoticed either: the count
    is reported and the first error is logged.
    """
    correct, errors = [], 0
    for text, reference in zip(completions, references, strict=True):
        try:
            correct.append(bool(checker(text, reference)))
        except Exception as error:
            if errors == 0:
                logger.warning("The answer checker raised on %r (counted as wrong): %r", text[:200], error)
            errors += 1
            correct.append(False)
    return correct, errors


@torch.no_grad()
def evaluate_greedy(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence,
    answers: Sequence[str],
    checker: AnswerChecker = answers_match,
    base_model: torch.nn.Module | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    stop_strings: Sequence[str] | None = None,
) -> GreedyEvaluation:
    """Greedy-decode every prompt, check it against its reference answer, and score it under the base model.

    Args:
        base_model: pi_base for the log-likelihood of the greedy outputs; a PEFT model is scored with its adapters
            disabled, so pass the LoRA policy itself to score under its base.
        checker: `checker(completion, reference) -> bool`. A checker that raises counts the sample as wrong.
        stop_strings: end a completion at the token that completes one of these strings (few-shot prompts).
    """
    start = time.perf_counter()
    ensure_pad_token(tokenizer)
    prompt_ids = tokenize_prompts(tokenizer, prompts, max_new_tokens, model_max_length(model))
    config = sampling_config(model, tokenizer, do_sample=False, max_new_tokens=max_new_tokens)
    with eval_mode(model):
        greedy = generate_completions(
            model,
            prompt_ids,
            config,
            batch_size=batch_size,
            tokenizer=tokenizer,
            stop_strings=stop_strings,
        )
    texts = tokenizer.batch_decode(greedy.completion_ids, skip_special_tokens=True)
    correct, checker_errors = check_answers(checker, texts, answers)
    base_logprobs = mean_base_logprob = None
    if base_model is model and not is_peft_model(model):
        base_logprobs = list(greedy.logprobs)  # recorded while decoding: no second forward
    elif base_model is not None:
        with eval_mode(base_model), base_scoring_context(base_model):
            base_logprobs = sequence_logprobs(base_model, prompt_ids, greedy.completion_ids).tolist()
    if base_logprobs is not None:
        mean_base_logprob = sum(base_logprobs) / len(base_logprobs)
    return GreedyEvaluation(
        accuracy=sum(correct) / len(correct),
        mean_base_logprob=mean_base_logprob,
        completions=texts,
        correct=correct,
        checker_errors=checker_errors,
        wall_time_s=time.perf_counter() - start,
        mean_length=sum(map(len, greedy.completion_ids)) / len(greedy.completion_ids),
        completion_ids=greedy.completion_ids,
        truncated=greedy.truncated,
        logprobs=greedy.logprobs,
        base_logprobs=base_logprobs,
    )


def is_plain_temperature_1(temperature: float, top_p: float | None, top_k: int | None) -> bool:
    """Whether samples are the model's own distribution (T = 1, no top-p / top-k), the field's avg@k convention."""
    return temperature == 1 and (top_p is None or top_p >= 1) and not top_k


def _seeded_samples(
    model, tokenizer, prompt_ids, *, num_samples, temperature, top_p, top_k, max_new_tokens, batch_size, stop_strings,
    seed, desc,
):  # fmt: skip
    """N seeded samples per prompt from `model` in eval mode, with a progress bar named `desc`."""
    config = sampling_config(
        model, tokenizer, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens
    )
    with eval_mode(model), seeded(model, seed):
        with tqdm(total=len(prompt_ids) * num_samples, desc=desc, unit="sample") as bar:
            return generate_completions(
                model,
                prompt_ids,
                config,
                num_samples=num_samples,
                batch_size=batch_size,
                progress=bar,
                tokenizer=tokenizer,
                stop_strings=stop_strings,
            )


def _sample_and_check(
    model,
    tokenizer,
    prompt_ids,
    answers,
    checker,
    extractor,
    *,
    num_samples,
    temperature,
    top_p,
    top_k,
    max_new_tokens,
    batch_size,
    stop_strings,
    seed,
    desc,
) -> tuple[list[list[bool]], list[list[str | None]], int]:
    """N samples per prompt from `model` (seeded), checked against the references: per-prompt correctness flags,
    extracted answers, and the number of completions on which the checker raised."""
    sampled = _seeded_samples(
        model, tokenizer, prompt_ids, num_samples=num_samples, temperature=temperature, top_p=top_p, top_k=top_k,
        max_new_tokens=max_new_tokens, batch_size=batch_size, stop_strings=stop_strings, seed=seed, desc=desc,
    )  # fmt: skip
    texts = tokenizer.batch_decode(sampled.completion_ids, skip_special_tokens=True)
    correct, errors = check_answers(checker, texts, [answers[p] for p in sampled.prompt_index])
    rows = range(len(prompt_ids))
    return (
        [correct[p * num_samples : (p + 1) * num_samples] for p in rows],
        [[extractor(t) for t in texts[p * num_samples : (p + 1) * num_samples]] for p in rows],
        errors,
    )  # fmt: skip


@torch.no_grad()
def evaluate_sampled_accuracy(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence,
    answers: Sequence[str],
    *,
    num_samples: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    checker: str | AnswerChecker | None = None,
    answer_extractor: str | AnswerExtractor | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    stop_strings: Sequence[str] | None = None,
    seed: int = 0,
) -> SampledAccuracy:
    """avg@k, maj@k and pass@k (k = `num_samples`) of the model's own samples at `temperature`: what a sharpened
    policy does when sampled, not only greedily (a policy can raise greedy accuracy and still sample worse than the
    base). Seeded; the caller's random state is left as it was. No scoring under pi_base: see `evaluate_sharpening`
    for the full report."""
    validate_sample_count(num_samples, [])
    extractor = get_answer_extractor(answer_extractor)
    checker = get_answer_checker(checker, extractor)
    ensure_pad_token(tokenizer)
    prompt_ids = tokenize_prompts(tokenizer, list(prompts), max_new_tokens, model_max_length(model))
    correct, extracted, _ = _sample_and_check(
        model, tokenizer, prompt_ids, list(answers), checker, extractor, num_samples=num_samples,
        temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, batch_size=batch_size,
        stop_strings=stop_strings, seed=seed, desc=f"Sampling at T={temperature:g}",
    )  # fmt: skip
    return SampledAccuracy.from_flags(correct, extracted, temperature, top_p, top_k)


# Running an evaluation -----------------------------------------------------------------------------------------------


def reference_answers(dataset, answer_column: str = "answer") -> list:
    """The reference answers of a `datasets.Dataset`, with an error that says which column is expected."""
    if answer_column not in dataset.column_names:
        raise ValueError(
            f"Evaluation needs reference answers: expected a `{answer_column}` column, but the dataset's columns are "
            f"{dataset.column_names}. Name the column that holds them (`answer_column=` / `--answer_column`)."
        )
    answers = list(dataset[answer_column])
    missing = [i for i, a in enumerate(answers) if a is None]
    if missing:
        raise ValueError(
            f"{len(missing)} rows have no reference answer in `{answer_column}` (first: row {missing[0] + 1}, counting "
            "from 1); drop or fill them before evaluating."
        )
    return answers


def get_answer_checker(checker: str | AnswerChecker | None, answer_extractor: AnswerExtractor) -> AnswerChecker:
    """A checker from a callable or a `"package.module:function"` path; by default the extracted answer must equal
    the normalized reference (`answers_match` with `answer_extractor`)."""
    if checker is None:
        return lambda completion, reference: answers_match(completion, reference, answer_extractor)
    if isinstance(checker, str):
        checker = load_callable(checker)
    if not callable(checker):
        raise ValueError(f"The answer checker must be callable, got {type(checker).__name__}.")
    return checker


def _mode_candidates(
    model, base_model, tokenizer, prompt_ids, greedy, max_new_tokens, batch_size, scoring_batch_size, stop_strings
) -> list[list[tuple[float, float]]]:
    """Per prompt, (log pi_base, log pi) of the complete greedy outputs: candidates, beside the samples, for pi_base's
    most likely response y* of the sharpening error (`report.sharpening_errors`). When the evaluated model is not
    pi_base, pi_base's own greedy output (adapters off for a PEFT model) joins, scored under the evaluated model:
    the samples of a policy that collapsed elsewhere may all be unlikely under pi_base."""
    candidates = [
        [(base_lp, lp)] if not cut and base_lp is not None else []
        for base_lp, lp, cut in zip(
            greedy.base_logprobs or [None] * len(prompt_ids), greedy.logprobs, greedy.truncated
        )
    ]
    if base_model is None:
        return candidates  # the evaluated model is pi_base: its greedy output is pi_base's
    config = sampling_config(base_model, tokenizer, do_sample=False, max_new_tokens=max_new_tokens)
    with eval_mode(base_model), base_scoring_context(base_model):
        base_greedy = generate_completions(
            base_model, prompt_ids, config, batch_size=batch_size, tokenizer=tokenizer, stop_strings=stop_strings
        )
    with eval_mode(model):
        under_model = sequence_logprobs(
            model, prompt_ids, base_greedy.completion_ids, micro_batch_size=scoring_batch_size
        ).tolist()
    for row, base_lp, lp, cut in zip(candidates, base_greedy.logprobs, under_model, base_greedy.truncated):
        if not cut:
            row.append((base_lp, lp))
    return candidates


def _model_name(model) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None)


@torch.no_grad()
def evaluate_sharpening(
    model: torch.nn.Module,
    tokenizer,
    prompts,
    answers: Sequence | None = None,
    num_samples: int | None = None,
    *,
    sampling: SamplingArguments | None = None,
    checker: str | AnswerChecker | None = None,
    answer_extractor: str | AnswerExtractor | None = None,
    base_model: torch.nn.Module | None = None,
    self_rewards: Sequence[str | Callable | SelfReward] = DEFAULT_SELF_REWARDS,
    ns: Sequence[int] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    scoring_batch_size: int = 16,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    seed: int | None = None,
    stop_strings: Sequence[str] | None = None,
    temperature_1_samples: bool = True,
    **sampling_kwargs,
) -> SharpeningReport:
    """Greedy-decode each prompt and sample N completions from `model`, then report every sharpening metric from
    those samples (see `SharpeningReport`; BoN@n and pass@n for n < N by exact subsampling).

    Args:
        model: the model to evaluate (a base, or a sharpened policy).
        prompts: a `datasets.Dataset` with `prompt_column` (and `answer_column` when `answers` is None), or a list of
            prompts (strings or chat-message lists).
        answers: reference answers, one per prompt; read from `answer_column` when None.
        checker: `checker(completion, reference) -> bool`, or its `"package.module:function"` path. A checker that
            raises counts that completion as wrong; the number of such completions is reported. Default: the
            extracted answer equals the normalized reference.
        answer_extractor: final-answer extractor, for the `majority` self-reward, answer diversity and the default
            checker (default: last `\\boxed{}` or last number).
        base_model: pi_base for log-likelihoods, self-rewards and the sharpening error when `model` is not the base:
            a separate model, or `model` itself when it is a PEFT model (its adapters are disabled for scoring). When
            None, `model` is the base and the log-probabilities recorded during sampling are reused (no second
            forward pass); a PEFT `model` is then its own base, with adapters disabled, everywhere in the report.
        self_rewards: self-rewards to run Best-of-N with (registry names, callables or `SelfReward`s); `()` for
            greedy, temperature-1 and pass@n only. Needs num_samples >= 2.
        ns: subset sizes for the curves (default 1, 2, 4, ..., N).
        sampling: the sampling settings as a whole (`trl_sharpen.sampling_arguments.SamplingArguments`, or any
            object with its fields): num_samples, temperature / top_p / top_k (paper: plain sampling at temperature
            1, App. A.4), max_completion_length (greedy and sampled completions; truncated ones are kept),
            stop_strings (greedy and sampled completions end at the token that completes one; the scores cover
            exactly the tokens up to and including it), sampling_batch_size, answer_extractor and seed (the global
            RNG state is restored afterwards).
        num_samples, temperature, top_p, top_k, seed, stop_strings, answer_extractor, **sampling_kwargs: the same
            settings as keyword arguments, overriding `sampling`; `max_new_tokens` and `batch_size` are the old
            names of max_completion_length and sampling_batch_size (FutureWarning).
        scoring_batch_size: sequences per forward when scoring under a separate base model.
        temperature_1_samples: when the samples are not plain temperature-1 samples, draw N more per prompt at T = 1
            for the field's avg@k / maj@k / pass@k at temperature 1 (`report.sampled`, next to those at the sampling
            temperature). They cost a second round of sampling and are not scored under pi_base.
    """
    timer = {"start": time.perf_counter()}
    # One validation for every entry point: the sampling settings as a whole `SamplingArguments` (keyword arguments
    # override it; the old names max_new_tokens / batch_size still work, with a FutureWarning)
    sampling = sampling_arguments(
        SamplingArguments, sampling, num_samples=num_samples, answer_extractor=answer_extractor,
        temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, batch_size=batch_size,
        seed=seed, stop_strings=stop_strings, **sampling_kwargs,
    )  # fmt: skip
    num_samples, answer_extractor, seed = sampling.num_samples, sampling.answer_extractor, sampling.seed
    temperature, top_p, top_k, stop_strings = (
        sampling.temperature,
        sampling.top_p,
        sampling.top_k,
        sampling.stop_strings,
    )
    max_new_tokens, batch_size = sampling.max_completion_length, sampling.sampling_batch_size
    self_rewards = list(self_rewards)
    validate_sample_count(num_samples, [getattr(r, "__name__", r) for r in self_rewards])
    if hasattr(prompts, "column_names"):
        if prompt_column not in prompts.column_names:
            raise ValueError(f"The dataset has no `{prompt_column}` column; its columns are {prompts.column_names}.")
        if answers is None:
            answers = reference_answers(prompts, answer_column)
        prompts = prompts[prompt_column]
    elif answers is None:
        raise ValueError("Pass the reference answers (`answers=`), or a dataset with an `answer_column`.")
    refuse_single_string(prompts, "prompts")
    refuse_single_string(answers, "answers")
    prompts, answers = list(prompts), list(answers)
    if len(prompts) != len(answers):
        raise ValueError(f"Got {len(prompts)} prompts but {len(answers)} reference answers; pass one per prompt.")
    if not prompts:
        raise ValueError("No prompts to evaluate.")
    extractor = get_answer_extractor(answer_extractor)
    checker = get_answer_checker(checker, extractor)
    # Scoring a plain model under itself is what generation already recorded: skip the second forward.
    if base_model is model and not is_peft_model(model):
        base_model = None
    # pi_base is one model throughout a report: a PEFT policy without a separate base is scored with its adapters
    # disabled everywhere (samples, self-rewards, BoN by log-prob, greedy outputs), never with them on for some
    if base_model is None and is_peft_model(model):
        base_model = model
    scorer = model if base_model is None else base_model

    ensure_pad_token(tokenizer)
    greedy = evaluate_greedy(
        model,
        tokenizer,
        prompts,
        answers,
        checker,
        base_model=scorer,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stop_strings=stop_strings,
    )
    timer["greedy"] = time.perf_counter()

    prompt_ids = tokenize_prompts(tokenizer, prompts, max_new_tokens, model_max_length(model))
    # The long part of an evaluation (N samples per prompt): a progress bar, like Best-of-N sampling
    sampled = _seeded_samples(
        model, tokenizer, prompt_ids, num_samples=num_samples, temperature=temperature, top_p=top_p, top_k=top_k,
        max_new_tokens=max_new_tokens, batch_size=batch_size, stop_strings=stop_strings, seed=seed,
        desc="Sampling for evaluation",
    )  # fmt: skip
    timer["sampling"] = time.perf_counter()

    expanded_prompt_ids = [prompt_ids[p] for p in sampled.prompt_index]
    if base_model is None:
        base_logprobs = list(sampled.logprobs)
    else:
        with eval_mode(base_model), base_scoring_context(base_model):
            base_logprobs = sequence_logprobs(
                base_model, expanded_prompt_ids, sampled.completion_ids, micro_batch_size=scoring_batch_size
            ).tolist()
    texts = tokenizer.batch_decode(sampled.completion_ids, skip_special_tokens=True)
    references = [answers[p] for p in sampled.prompt_index]
    correct, checker_errors = check_answers(checker, texts, references)

    rewards: dict[str, list[float] | None] = {}
    for spec in self_rewards:
        reward = get_self_reward(spec, answer_extractor=extractor, model=scorer, tokenizer=tokenizer)
        if isinstance(reward, MajorityReward):
            rewards[reward.name] = None  # recomputed within each subset from the extracted answers
            missing = sum(extractor(text) is None for text in texts)
            if 2 * missing > len(texts):  # then BoN majority mostly picks at random among answers that score 0
                logger.warning(
                    "majority self-reward: %d of %d samples (%.0f%%) have no answer the extractor can read; its "
                    "BoN curve then mostly measures random picks. Pass an answer extractor that fits the task.",
                    missing,
                    len(texts),
                    100 * missing / len(texts),
                )
        else:
            rewards[reward.name] = reward(
                [prompts[p] for p in sampled.prompt_index],
                texts,
                sampled.completion_ids,
                base_logprobs=base_logprobs,
                group_ids=sampled.prompt_index,
            )
    mode_candidates = _mode_candidates(
        model, base_model, tokenizer, prompt_ids, greedy, max_new_tokens, batch_size, scoring_batch_size, stop_strings
    )
    timer["scoring"] = time.perf_counter()

    def per_prompt(values):
        return [list(values[p * num_samples : (p + 1) * num_samples]) for p in range(len(prompts))]

    samples = SampleSet(
        completions=per_prompt(texts),
        answers=per_prompt([extractor(t) for t in texts]),
        correct=per_prompt(correct),
        base_logprobs=per_prompt(base_logprobs),
        logprobs=per_prompt(sampled.logprobs),
        truncated=per_prompt(sampled.truncated),
        rewards={name: None if values is None else per_prompt(values) for name, values in rewards.items()},
        checker_errors=checker_errors,
        completion_ids=per_prompt(sampled.completion_ids),
        mode_candidates=mode_candidates,
    )
    settings = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "max_new_tokens": max_new_tokens,
        "stop_strings": list(stop_strings) if stop_strings else None,
        "seed": seed,
        "self_rewards": list(rewards),
        "base_is_model": base_model is None,
    }
    report = SharpeningReport.from_samples(
        samples,
        greedy,
        ns=ns,
        model_name=_model_name(model),
        base_model_name=_model_name(scorer),
        settings=settings,
    )
    report.wall_time_s = {
        "greedy": timer["greedy"] - timer["start"],
        "sampling": timer["sampling"] - timer["greedy"],
        "scoring": timer["scoring"] - timer["sampling"],
    }
    if temperature_1_samples and not is_plain_temperature_1(temperature, top_p, top_k):
        # The field reports avg@k at the sampling temperature *and* at 1: a policy sharpened at T = 0.7 can look
        # good there and still sample worse than the base at T = 1
        start = time.perf_counter()
        correct_t1, answers_t1, errors_t1 = _sample_and_check(
            model, tokenizer, prompt_ids, answers, checker, extractor, num_samples=num_samples, temperature=1.0,
            top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, batch_size=batch_size, stop_strings=stop_strings,
            seed=seed, desc="Sampling at T=1 for avg@k",
        )  # fmt: skip
        report.sampled.append(SampledAccuracy.from_flags(correct_t1, answers_t1, 1.0))
        report.sample_checker_errors += errors_t1
        report.wall_time_s["temperature_1_sampling"] = time.perf_counter() - start
    report.wall_time_s["total"] = time.perf_counter() - timer["start"]
    return report
