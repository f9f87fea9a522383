r"""Label-free monitoring of sharpening inside `trainer.evaluate()`, and best-iterate selection the Trainer's way.

Self-improvement without external feedback rises and then collapses (benchmarks/results/coverage_experiment.md). On a
fixed set of held-out prompts, with no labels, each evaluation estimates the paper's objective

$$J_\beta(\pi) = \mathbb{E}_{y\sim\pi}[\log \pi_{base}(y|x)] - \beta\,\mathrm{KL}(\pi\,\|\,\pi_{base})$$

(Huang et al. 2025, Sec. 2.2; Algorithm 1 returns argmax_t J_beta(pi_t)) from k samples of the current policy, with
the KL estimated per sample as log pi(y|x) - log pi_base(y|x), and logs it with the other signals below under the
`eval_` prefix, through the Trainer's own `eval_strategy` / `eval_steps` / `report_to` path:

| metric | meaning |
|---|---|
| `eval_objective` | J_beta: mean of log pi_base(y|x) - beta (log pi(y|x) - log pi_base(y|x)) over the samples |
| `eval_base_logprob` | E_{y~pi}[log pi_base(y|x)], the self-reward the policy collects |
| `eval_kl` | KL(pi ‖ pi_base) estimate, mean of log pi(y|x) - log pi_base(y|x) |
| `eval_entropy` | the policy's entropy proxy, mean -log pi(y|x) of its samples (falls as pi sharpens) |
| `eval_greedy_base_logprob` | mean log pi_base of the policy's greedy outputs (the paper's log-likelihood lift) |
| `eval_sharpening_error` | delta = mean 1 - pi(y*|x), y* = argmax pi_base (see `sharpening_error_against_base`) |
| `eval_distinct_answers` | distinct final answers among the k samples of a prompt (answers that parse) |
| `eval_base_majority_agreement` | share of prompts whose greedy answer is pi_base's majority answer over k samples |
| `eval_top_answer_share` | share of prompts whose greedy answer is the most common greedy answer across prompts |
| `eval_base_top_answer_share` | the same for pi_base's greedy outputs (a constant of the run: the alarm's baseline) |
| `eval_guarded_sharpening_error` | delta, plus 1 at an evaluation the retention alarm's rules flag (see below) |
| `eval_mean_length`, `eval_clipped_ratio` | sample length in tokens, share of samples cut at the length limit |
| `eval_greedy_accuracy`, `eval_bon_accuracy` | only when the rows carry reference answers: greedy and BoN@k |

The two retention metrics need no labels and catch what sharpening toward a self-reward can do on a real model:
`base_majority_agreement` falls when the policy stops giving the answer pi_base's own samples agree on (an echo of
the question has no answer at all), and `top_answer_share` rises when it gives one answer to every prompt ("True."
everywhere). A prompt where pi_base's samples give no answer counts as disagreement, as does a greedy output
without one.

`eval_bon_accuracy` is Best-of-k by log pi_base among the k samples (complete samples before truncated ones, exact
expectation over ties). With `load_best_model_at_end: true` the Trainer keeps the checkpoint with the best
`metric_for_best_model`: by default `guarded_sharpening_error` (the lowest delta among the evaluations the retention
alarm passes; chosen by measurement, see the README), or `objective` for Algorithm 1's argmax_t J_beta(pi_t); and
`transformers.EarlyStoppingCallback` stops a run whose metric has not improved for K evaluations. `CollapseAlarmCallback`, added to every trainer, warns when distinct answers,
length or J_beta fall sharply below their best so far, when `top_answer_share` exceeds pi_base's by
`collapse_top_answer_rise` or more, or when `base_majority_agreement` falls below (1 - `collapse_agreement_drop`)
times its first value.

The base is a candidate: with a prompt-only `eval_dataset` and an `eval_strategy`, pi_base itself is evaluated before
the first step (`evaluate_base`, which sets TrainingArguments' `eval_on_start`). With `load_best_model_at_end` it is
saved as `checkpoint-0` and competes with the trained iterates; if it wins, the run says so in one line and the model
loaded at the end is pi_base (with PEFT, the adapter as initialized, which LoRA makes zero-effect).

Cost per evaluation, for P = `eval_num_prompts` prompts and k = `eval_num_samples` (logged each time): P * (k + 1)
policy generations (k samples at temperature 1, one greedy), P * (k + 1) no-grad pi_base forwards (samples and greedy
outputs) and P no-grad policy forwards (pi_base's greedy output, for delta), plus P pi_base greedy generations once per
run (cached: pi_base does not change), and P * k pi_base samples once per run for its majority answers. Generation
runs `per_device_eval_batch_size` prompts (times k) per call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate.utils import gather_object, is_peft_model
from transformers import TrainerCallback

from .answers import get_answer_extractor
from .checkpoints import check_resume_checkpoint
from .data import tokenize_prompt
from .evaluation import check_answers, get_answer_checker
from .generation import generate_completions, sampling_config, seeded
from .logprobs import sequence_logprobs
from .metrics import best_of_n_selection_probabilities
from .output_dir import output_dir_lock
from .report import SampleSet, sharpening_errors
from .sampling_arguments import check_finite_numbers


logger = logging.getLogger(__name__)

DEFAULT_OBJECTIVE_BETA = 0.1  # for configs without a `beta` (SFT): TRL's DPO default, so all trainers agree

# Direction of each monitoring metric, for `greater_is_better` (transformers guesses from the name: only "...loss"
# is lower-is-better, which would be wrong for the sharpening error)
HIGHER_IS_BETTER = {
    "objective": True,
    "base_logprob": True,
    "kl": False,  # distance from pi_base: the objective's penalty term, never a reason to keep an iterate
    "entropy": False,  # sharpening lowers it; use `objective` to select, this only tells which iterate is sharpest
    "greedy_base_logprob": True,
    "greedy_accuracy": True,
    "bon_accuracy": True,
    "distinct_answers": True,
    "base_majority_agreement": True,
    "top_answer_share": False,  # one answer for every prompt is the collapse it measures
    "base_top_answer_share": False,  # a constant of the run (pi_base's), listed so every metric has a direction
    "mean_length": True,
    "sharpening_error": False,
    "guarded_sharpening_error": False,
    "clipped_ratio": False,
}

# Columns that mark a dataset the parent trainer evaluates itself (preference pairs, SFT sequences, Best-of-N data)
_NOT_PROMPT_ONLY = {"chosen", "rejected", "completion", "input_ids", "messages", "text", "selected_completion_ids"}


@dataclass
class MonitoringArguments:
    """Fields of the label-free sharpening evaluation (`trl_sharpen.monitoring`), shared by every trainer config.

    They apply when the trainer is given a prompt-only `eval_dataset`; evaluation runs on the Trainer's schedule
    (`eval_strategy`, `eval_steps`). Its cost grows with `eval_num_prompts * (eval_num_samples + 1)` generations.
    """

    eval_num_prompts: int | None = field(
        default=64,
        metadata={
            "help": "Held-out prompts per sharpening evaluation: the first this many rows of `eval_dataset` (the same "
            "every time). null: all rows. Cost per evaluation: eval_num_prompts * (eval_num_samples + 1) policy "
            "generations and as many no-grad pi_base forwards."
        },
    )
    eval_num_samples: int = field(
        default=8,
        metadata={
            "help": "k: completions sampled from the policy per prompt (temperature 1, no top-p/top-k: samples of pi "
            "itself) to estimate J_beta, KL, entropy, distinct answers and BoN@k accuracy."
        },
    )
    eval_beta: float | None = field(
        default=None,
        metadata={
            "help": "beta of the objective J_beta = E_pi[log pi_base] - beta KL(pi || pi_base) logged as "
            "`eval_objective`. null: the config's `beta` (DPO, XPO), or 0.1 for configs without one (SFT)."
        },
    )
    eval_reference_column: str | None = field(
        default="answer",
        metadata={
            "help": "Column of reference answers in `eval_dataset`; when the rows have it, greedy and BoN@k accuracy "
            "are also logged (labels score, they never select). null: never compute accuracy."
        },
    )
    eval_checker: str | None = field(
        default=None,
        metadata={
            "help": "'package.module:function' checker(completion, reference) -> bool for the accuracy metrics. "
            "null: the extracted final answer (`answer_extractor`) equals the reference."
        },
    )
    collapse_alarm: bool = field(
        default=True,
        metadata={
            "help": "Log a warning when an evaluation shows distinct answers, completion length or J_beta falling "
            "sharply (thresholds `collapse_min_distinct_answers`, `collapse_length_drop`, `collapse_objective_drop`)."
        },
    )
    collapse_min_distinct_answers: float = field(
        default=1.0,
        metadata={
            "help": "Alarm when eval_distinct_answers falls below this after having been above it (1.0: fewer than "
            "one parsable final answer per prompt among the k samples). Not a relative drop: sharpening itself takes "
            "distinct answers from ~k down to ~1 (measured: halving fired at the best iterate of a run)."
        },
    )
    collapse_length_drop: float = field(
        default=0.5,
        metadata={"help": "Alarm when eval_mean_length < (1 - this) * its best (longest) so far (0.5: halved)."},
    )
    collapse_top_answer_rise: float = field(
        default=0.25,
        metadata={
            "help": "Alarm when eval_top_answer_share (share of prompts whose greedy answer is the most common one) "
            "is at least this much above pi_base's own (eval_base_top_answer_share): e.g. 'True.' to every prompt."
        },
    )
    collapse_agreement_drop: float = field(
        default=0.5,
        metadata={
            "help": "Alarm when eval_base_majority_agreement < (1 - this) * its first value (0.5: halved; the first "
            "evaluation is pi_base's own under evaluate_base): the policy stopped giving the answers pi_base's "
            "samples agree on."
        },
    )
    evaluate_base: bool = field(
        default=True,
        metadata={
            "help": "Evaluate pi_base before the first step (sets eval_on_start when a prompt-only eval_dataset is "
            "monitored), so that with load_best_model_at_end the base is a candidate (saved as checkpoint-0): a run "
            "that only made the model worse ends with pi_base, and says so. false: eval_on_start as given."
        },
    )
    collapse_objective_drop: float = field(
        default=2.0,
        metadata={
            "help": "Alarm when eval_objective < best - this * |best| (J_beta is a negative log-likelihood scale: "
            "2.0 means its magnitude tripled, e.g. -5 -> below -15 nats). Healthy sharpening toward longer answers "
            "lowers J_beta too: the toy recipe's -2.4 -> -3.9 while accuracy went 0.095 -> 1.0; collapse costs tens "
            "to hundreds of nats."
        },
    )

    def __post_init__(self):
        check_finite_numbers(self)  # every float field, this class's and the rest of the config's (nan, inf)
        for name in ("eval_num_samples", "eval_num_prompts"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if self.eval_beta is not None and self.eval_beta < 0:
            raise ValueError(f"eval_beta={self.eval_beta} must be >= 0 (0: J is E_pi[log pi_base] alone).")
        if self.collapse_min_distinct_answers < 0:
            raise ValueError(f"collapse_min_distinct_answers={self.collapse_min_distinct_answers} must be >= 0.")
        if not 0 < self.collapse_length_drop <= 1:
            raise ValueError(f"collapse_length_drop={self.collapse_length_drop} must be in (0, 1].")
        if not self.collapse_objective_drop > 0:
            raise ValueError(f"collapse_objective_drop={self.collapse_objective_drop} must be > 0.")
        if not 0 < self.collapse_top_answer_rise <= 1:
            raise ValueError(
                f"collapse_top_answer_rise={self.collapse_top_answer_rise} must be in (0, 1] (a share of prompts)."
            )
        if not 0 < self.collapse_agreement_drop <= 1:
            raise ValueError(f"collapse_agreement_drop={self.collapse_agreement_drop} must be in (0, 1].")
        # Our evaluation has no eval_loss. The default selection metric was chosen by measurement (README, "Which
        # metric selects the iterate?"): on the six collapsing toy runs the lowest delta reached >= 90% of the best
        # accuracy seen in 6 of 6 (J_beta in 0 of 6 once the base is a candidate: pi_base has the highest J_beta);
        # the guarded form adds the retention alarm's rules against the real-model collapses delta alone kept
        if getattr(self, "load_best_model_at_end", False) and getattr(self, "metric_for_best_model", "") is None:
            self.metric_for_best_model = "guarded_sharpening_error"
        # "objective", "eval_objective", or "eval_<dataset>_objective" with several eval datasets
        metric = getattr(self, "metric_for_best_model", None) or ""
        names = sorted(HIGHER_IS_BETTER, key=len, reverse=True)  # base_top_answer_share before top_answer_share
        name = next((key for key in names if metric == key or metric.endswith(f"_{key}")), None)
        if name is not None:
            direction = HIGHER_IS_BETTER[name]
            if getattr(self, "greater_is_better", None) is None:
                self.greater_is_better = direction
            elif self.greater_is_better != direction:
                raise ValueError(
                    f"greater_is_better={self.greater_is_better} with metric_for_best_model={name!r}: that metric is "
                    f"{'higher' if direction else 'lower'}-is-better. Leave greater_is_better unset."
                )
        elif metric and not metric.endswith("loss") and getattr(self, "greater_is_better", None) is None:
            # transformers would guess higher-is-better for any name not ending in "loss" (a typo is only found at
            # the first evaluation, a metric such as a distance is silently maximized)
            raise ValueError(
                f"metric_for_best_model={metric!r} is not a metric with a known direction: use one of "
                f"{sorted(HIGHER_IS_BETTER)} (their direction is set for you), or set greater_is_better for a metric "
                "of your own."
            )
        super().__post_init__()

    @property
    def objective_beta(self) -> float:
        if self.eval_beta is not None:
            return self.eval_beta
        beta = getattr(self, "beta", None)
        return DEFAULT_OBJECTIVE_BETA if beta is None else float(beta)


# ------------------------------------------------------------------------------------------------- the estimates
@dataclass
class PromptRecord:
    """What one evaluation measured on one prompt (k policy samples, its greedy output, pi_base's greedy output)."""

    sample_logprobs: list[float]  # log pi(y_i|x)
    sample_base_logprobs: list[float]  # log pi_base(y_i|x)
    sample_answers: list[str | None]
    sample_lengths: list[int]
    sample_truncated: list[bool]
    greedy_logprob: float  # log pi(y_greedy|x)
    greedy_base_logprob: float
    base_greedy_logprob: float  # log pi(y_base_greedy|x): the policy on pi_base's own greedy output
    base_greedy_base_logprob: float
    sample_correct: list[bool] | None = None
    greedy_correct: bool | None = None
    greedy_truncated: bool = False  # cut at the length limit: a prefix, not a response
    base_greedy_truncated: bool = False
    greedy_answer: str | None = None  # the final answer of the policy's greedy output
    base_greedy_answer: str | None = None  # of pi_base's greedy output
    base_majority_answer: str | None = None  # the most common answer of k pi_base samples (None: none answered)


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """The most common answer that parses (first in sample order on ties), None when none does."""
    counts = Counter(a for a in answers if a is not None)
    return counts.most_common(1)[0][0] if counts else None


def top_answer_share(answers: Sequence[str | None]) -> float:
    """Share of prompts whose answer is the single most common answer across prompts (no answer counts in the total,
    never as the top answer)."""
    counts = Counter(a for a in answers if a is not None)
    return max(counts.values()) / len(answers) if counts else 0.0


def sharpening_error_against_base(record: PromptRecord) -> float:
    """delta(x) = 1 - pi(y*|x) with y* = argmax pi_base (Def. 3.1), by `trl_sharpen.report.sharpening_errors` (the
    evaluation report's definition): y* is the complete candidate pi_base rates highest among the policy's samples,
    its greedy output and pi_base's greedy output."""
    k = len(record.sample_logprobs)
    greedy_outputs = [
        (record.greedy_base_logprob, record.greedy_logprob, record.greedy_truncated),
        (record.base_greedy_base_logprob, record.base_greedy_logprob, record.base_greedy_truncated),
    ]
    samples = SampleSet(
        completions=[[""] * k],  # texts are not needed for delta
        answers=[record.sample_answers],
        correct=[record.sample_correct or [False] * k],
        base_logprobs=[record.sample_base_logprobs],
        logprobs=[record.sample_logprobs],
        truncated=[record.sample_truncated],
        mode_candidates=[[(base, policy) for base, policy, cut in greedy_outputs if not cut]],
    )
    return sharpening_errors(samples)[0]


def best_of_k_accuracy(record: PromptRecord) -> float:
    """Expected accuracy of Best-of-k by log pi_base over the k samples (ties split evenly); truncated samples are
    candidates only when every sample is truncated (a prefix's log-prob bounds every completion extending it)."""
    rows = [i for i, cut in enumerate(record.sample_truncated) if not cut] or list(range(len(record.sample_truncated)))
    rewards = [record.sample_base_logprobs[i] for i in rows]
    weights = best_of_n_selection_probabilities(rewards, len(rows))
    return float(sum(w * record.sample_correct[i] for w, i in zip(weights, rows)))


def aggregate(records: Sequence[PromptRecord], beta: float) -> dict[str, float]:
    """The monitoring metrics (without prefix) from per-prompt records: means over prompts of per-prompt means."""

    def mean(values):
        return float(np.mean(list(values)))

    def per_prompt(fn):
        return mean(fn(r) for r in records)

    metrics = {
        "objective": per_prompt(
            lambda r: np.mean([b - beta * (p - b) for p, b in zip(r.sample_logprobs, r.sample_base_logprobs)])
        ),
        "base_logprob": per_prompt(lambda r: np.mean(r.sample_base_logprobs)),
        "kl": per_prompt(lambda r: np.mean(np.subtract(r.sample_logprobs, r.sample_base_logprobs))),
        "entropy": per_prompt(lambda r: -np.mean(r.sample_logprobs)),
        "greedy_base_logprob": per_prompt(lambda r: r.greedy_base_logprob),
        "sharpening_error": per_prompt(sharpening_error_against_base),
        "distinct_answers": per_prompt(lambda r: len({a for a in r.sample_answers if a is not None})),
        "base_majority_agreement": per_prompt(
            lambda r: float(r.greedy_answer is not None and r.greedy_answer == r.base_majority_answer)
        ),
        "top_answer_share": top_answer_share([r.greedy_answer for r in records]),
        "base_top_answer_share": top_answer_share([r.base_greedy_answer for r in records]),
        "mean_length": per_prompt(lambda r: np.mean(r.sample_lengths)),
        "clipped_ratio": per_prompt(lambda r: np.mean(r.sample_truncated)),
    }
    if records and records[0].greedy_correct is not None:
        metrics["greedy_accuracy"] = per_prompt(lambda r: float(r.greedy_correct))
        metrics["bon_accuracy"] = per_prompt(best_of_k_accuracy)
    return metrics


@dataclass
class EvaluationCost:
    """Work done by one sharpening evaluation, summed over all processes (padding prompts included: they run too).
    Counts are sequences (completions generated, completions scored), not forwards: a forward batches many."""

    prompts: int
    policy_generations: int
    base_generations: int
    base_scored: int
    policy_scored: int
    seconds: float

    def describe(self) -> str:
        base = f", {self.base_generations} pi_base generations (once per run)" if self.base_generations else ""
        return (
            f"{self.prompts} prompts: {self.policy_generations} policy generations{base}, {self.base_scored} "
            f"completions scored under pi_base, {self.policy_scored} under the policy, {self.seconds:.1f} s"
        )


def _generate_until_stop(
    model, tokenizer, prompt_ids, *, num_samples, do_sample, max_new_tokens, prompts_per_call, stop_strings=None,
    eos_token_id=None,
):  # fmt: skip
    """Completions that end where the run's do (its stop strings, EOS / end-of-turn ids, length limit), sampled at
    temperature 1 without top-k / top-p whatever the run samples with: J_beta and delta are defined for pi itself."""
    config = sampling_config(model, tokenizer, do_sample=do_sample, max_new_tokens=max_new_tokens)
    if eos_token_id is not None:
        config.eos_token_id = eos_token_id
    return generate_completions(
        model, prompt_ids, config, num_samples=num_samples, batch_size=prompts_per_call * num_samples,
        tokenizer=tokenizer, stop_strings=stop_strings,
    )  # fmt: skip


def _score(model, prompt_ids, completion_ids, micro_batch_size) -> list[float]:
    with torch.no_grad():
        return sequence_logprobs(model, prompt_ids, completion_ids, micro_batch_size=micro_batch_size).float().tolist()


@torch.no_grad()
def measure_prompts(
    model_context: Callable[[bool], contextlib.AbstractContextManager],
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    num_samples: int,
    max_new_tokens: int,
    prompts_per_call: int,
    seed: int,
    extractor,
    answers: Sequence | None = None,
    checker=None,
    base_greedy: dict | None = None,
    base_majority: dict | None = None,
    stop_strings: Sequence[str] | None = None,
    eos_token_id: int | list[int] | None = None,
) -> list[PromptRecord]:
    """Sample and score what `aggregate` needs, for `prompt_ids`. `model_context(from_base)` yields the model to
    generate and score with: the policy, or pi_base. `base_greedy` caches pi_base's greedy outputs by prompt, and
    `base_majority` the majority answer of its `num_samples` samples (pi_base is fixed: both are computed once).
    `stop_strings` and `eos_token_id` (default: the model's and tokenizer's EOS ids) end completions as in the run."""
    _generate = functools.partial(_generate_until_stop, stop_strings=stop_strings, eos_token_id=eos_token_id)
    micro = prompts_per_call * num_samples
    cache = {} if base_greedy is None else base_greedy
    missing = [i for i, ids in enumerate(prompt_ids) if tuple(ids) not in cache]
    if missing:
        with model_context(True) as base:
            done = _generate(base, tokenizer, [prompt_ids[i] for i in missing], num_samples=1, do_sample=False,
                             max_new_tokens=max_new_tokens, prompts_per_call=prompts_per_call)  # fmt: skip
        for i, ids, logprob, cut in zip(missing, done.completion_ids, done.logprobs, done.truncated):
            cache[tuple(prompt_ids[i])] = (ids, logprob, cut)
    base_greedy_ids = [cache[tuple(ids)][0] for ids in prompt_ids]
    majority = {} if base_majority is None else base_majority
    missing = [i for i, ids in enumerate(prompt_ids) if tuple(ids) not in majority]
    if missing:
        with model_context(True) as base, seeded(base, seed):
            drawn = _generate(base, tokenizer, [prompt_ids[i] for i in missing], num_samples=num_samples,
                              do_sample=True, max_new_tokens=max_new_tokens,
                              prompts_per_call=prompts_per_call)  # fmt: skip
        drawn_texts = tokenizer.batch_decode(drawn.completion_ids, skip_special_tokens=True)
        for j, i in enumerate(missing):
            answers_of_base = [extractor(text) for text in drawn_texts[j * num_samples : (j + 1) * num_samples]]
            majority[tuple(prompt_ids[i])] = majority_answer(answers_of_base)

    with model_context(False) as policy:
        greedy = _generate(policy, tokenizer, prompt_ids, num_samples=1, do_sample=False,
                           max_new_tokens=max_new_tokens, prompts_per_call=prompts_per_call)  # fmt: skip
        with seeded(policy, seed):  # the same random stream at every evaluation: steps are compared on equal terms
            samples = _generate(policy, tokenizer, prompt_ids, num_samples=num_samples, do_sample=True,
                                max_new_tokens=max_new_tokens, prompts_per_call=prompts_per_call)  # fmt: skip
        policy_on_base_greedy = _score(policy, prompt_ids, base_greedy_ids, micro)
    expanded = [prompt_ids[i] for i in samples.prompt_index]
    with model_context(True) as base:
        sample_base = _score(base, expanded, samples.completion_ids, micro)
        greedy_base = _score(base, prompt_ids, greedy.completion_ids, micro)

    texts = tokenizer.batch_decode(samples.completion_ids, skip_special_tokens=True)
    greedy_texts = tokenizer.batch_decode(greedy.completion_ids, skip_special_tokens=True)
    base_greedy_texts = tokenizer.batch_decode(base_greedy_ids, skip_special_tokens=True)
    correct = greedy_correct = None
    if answers is not None:
        correct, _ = check_answers(checker, texts, [answers[i] for i in samples.prompt_index])
        greedy_correct, _ = check_answers(checker, greedy_texts, answers)
    records = []
    for p in range(len(prompt_ids)):
        rows = slice(p * num_samples, (p + 1) * num_samples)
        records.append(
            PromptRecord(
                sample_logprobs=samples.logprobs[rows],
                sample_base_logprobs=sample_base[rows],
                sample_answers=[extractor(text) for text in texts[rows]],
                sample_lengths=[len(ids) for ids in samples.completion_ids[rows]],
                sample_truncated=samples.truncated[rows],
                greedy_logprob=greedy.logprobs[p],
                greedy_base_logprob=greedy_base[p],
                base_greedy_logprob=policy_on_base_greedy[p],
                base_greedy_base_logprob=cache[tuple(prompt_ids[p])][1],
                sample_correct=None if correct is None else correct[rows],
                greedy_correct=None if greedy_correct is None else greedy_correct[p],
                greedy_truncated=greedy.truncated[p],
                base_greedy_truncated=cache[tuple(prompt_ids[p])][2],
                greedy_answer=extractor(greedy_texts[p]),
                base_greedy_answer=extractor(base_greedy_texts[p]),
                base_majority_answer=majority[tuple(prompt_ids[p])],
            )
        )
    return records


def is_prompt_only(dataset) -> bool:
    columns = set(getattr(dataset, "column_names", None) or [])
    return "prompt" in columns and not columns & _NOT_PROMPT_ONLY


# ------------------------------------------------------------------------------------------------ trainer side
def check_reference_column(args, eval_dataset) -> None:
    """An `eval_reference_column` set to a column the prompt-only eval dataset lacks is refused: the accuracy metrics
    would silently be left out. The default (`answer`) may be absent: then the run logs no accuracy, as documented."""
    column = getattr(args, "eval_reference_column", None)
    default = next(f.default for f in dataclasses.fields(MonitoringArguments) if f.name == "eval_reference_column")
    if not column or column == default or eval_dataset is None:
        return
    datasets = eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval_dataset", eval_dataset)]
    for name, dataset in datasets:
        columns = getattr(dataset, "column_names", None)
        if columns is not None and is_prompt_only(dataset) and column not in columns:
            raise ValueError(
                f"eval_reference_column={column!r} is not a column of {name} (columns: {columns}): name the column "
                "with the reference answers, or set eval_reference_column to null to log no accuracy metrics."
            )


class SharpeningMonitorMixin:
    """`evaluate()` for the sharpening trainers: a prompt-only eval dataset gets the label-free metrics of this
    module (the parent's own evaluation runs on any other dataset). A trainer provides `_monitoring_model(from_base)`,
    a context manager yielding the policy or pi_base, unwrapped and in eval mode, to generate and score with."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("args") is not None:  # before the parent's __init__ (BoNSFT samples its data there)
            check_reference_column(kwargs["args"], kwargs.get("eval_dataset"))
        super().__init__(*args, **kwargs)
        check_reference_column(self.args, self.eval_dataset)
        self._base_greedy_cache: dict = {}  # pi_base's greedy outputs: pi_base is fixed (re-anchoring clears it)
        self._base_majority_cache: dict = {}  # pi_base's majority answers, likewise
        self._first_agreement: dict[str, float] = {}  # the run's first base_majority_agreement, per eval set
        self.last_evaluation_cost: EvaluationCost | None = None
        if getattr(self.args, "collapse_alarm", False):
            self.add_callback(CollapseAlarmCallback())
        if self._monitoring_on() and getattr(self.args, "evaluate_base", False):
            self.args.eval_on_start = True  # pi_base is a candidate: evaluated (and saved, see `_evaluate`) at step 0

    def _monitoring_on(self) -> bool:
        """Whether the Trainer's schedule evaluates a prompt-only dataset (the sharpening metrics)."""
        datasets = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        scheduled = str(getattr(self.args, "eval_strategy", "no")) not in ("no", "IntervalStrategy.NO")
        return scheduled and any(d is not None and is_prompt_only(d) for d in datasets)

    def _evaluate(self, trial, ignore_keys_for_eval, skip_scheduler: bool = False):
        """The Trainer's scheduled evaluation. At step 0 (`eval_on_start`, set by `evaluate_base`) the policy is pi_base:
        with `load_best_model_at_end` its score enters the best-model race and it is saved as `checkpoint-0`, so the
        Trainer can load it back at the end. (The Trainer neither ranks the start evaluation nor saves a checkpoint
        at step 0, and it treats `best_global_step = 0` as unset: `_save_checkpoint` would never point at it.)"""
        metrics = super()._evaluate(trial, ignore_keys_for_eval, skip_scheduler=skip_scheduler)
        args = self.args
        if self.state.global_step == 0 and args.load_best_model_at_end and args.metric_for_best_model:
            self._determine_best_metric(metrics=metrics, trial=trial)
            self.state.best_global_step = 0
            self._save_checkpoint(self.model_wrapped, trial)
            self.state.best_model_checkpoint = os.path.join(self._get_output_dir(trial), "checkpoint-0")
            self._base_checkpoint_metric = self.state.best_metric
        return metrics

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        # `true` is the last checkpoint in output_dir; a checkpoint that lacks a file the resumed run needs (optimizer,
        # RNG state, XPO's replay buffer) is refused: transformers would restart that state without a word
        resume_from_checkpoint = check_resume_checkpoint(self, resume_from_checkpoint)
        self._base_checkpoint_metric, self.base_won = None, False
        # output_dir is this run's alone while it trains (a second run on it, from Python or a recipe, is refused
        # naming this one); the main process locks, re-entrant under a recipe, which holds the lock already
        with output_dir_lock(self.args.output_dir if self.args.should_save else None):
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        self._report_if_the_base_won()
        return output

    def _report_if_the_base_won(self) -> None:
        """One line when load_best_model_at_end kept pi_base: training did not beat the model it started from."""
        state, args = self.state, self.args
        if self._base_checkpoint_metric is None or not args.load_best_model_at_end:
            return
        if state.best_model_checkpoint is None or os.path.basename(state.best_model_checkpoint) != "checkpoint-0":
            return
        peft = " (PEFT: the adapter as initialized, which LoRA's zero-initialized B makes zero-effect)"
        message = (
            f"The base model won: no trained iterate beat pi_base's {args.metric_for_best_model} = "
            f"{state.best_metric:.4g} (step 0), so load_best_model_at_end restored pi_base"
            f"{peft if is_peft_model(self.model) else ''}; the saved model is the base."
        )
        self.base_won = True
        if self.accelerator.is_main_process:
            logger.warning(message)
            print(message, flush=True)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, str):  # `Trainer.evaluate` passes the name of one of several eval datasets
            dataset = self.eval_dataset[dataset]
        if isinstance(dataset, dict) or dataset is None or not is_prompt_only(dataset):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        metrics = self.sharpening_metrics(dataset, metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _guarded_sharpening_error(self, metrics: dict[str, float], metric_key_prefix: str) -> float:
        """delta, plus 1 (more than delta can differ between iterates) when the retention alarm's rules flag this
        evaluation: top-answer share >= pi_base's + `collapse_top_answer_rise`, or base-majority agreement below
        (1 - `collapse_agreement_drop`) x its first value in this run (pi_base's own under `evaluate_base`). Selecting
        by it keeps the lowest-delta iterate among those the alarm passes, the base included."""
        args = self.args
        first = self._first_agreement.setdefault(metric_key_prefix, metrics["base_majority_agreement"])
        flagged = (
            metrics["top_answer_share"] - metrics["base_top_answer_share"] >= args.collapse_top_answer_rise - 1e-12
            or metrics["base_majority_agreement"] < (1 - args.collapse_agreement_drop) * first
        )
        return metrics["sharpening_error"] + (1.0 if flagged else 0.0)

    def sharpening_metrics(self, dataset, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The monitoring metrics on the first `eval_num_prompts` rows of `dataset`, prefixed, on every process."""
        args, start = self.args, time.perf_counter()
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        rows = len(dataset) if args.eval_num_prompts is None else min(args.eval_num_prompts, len(dataset))
        dataset = dataset.select(range(rows))
        answers = None
        if args.eval_reference_column and args.eval_reference_column in dataset.column_names:
            answers = list(dataset[args.eval_reference_column])
        extractor = get_answer_extractor(getattr(args, "answer_extractor", None))
        checker = get_answer_checker(args.eval_checker, extractor) if answers is not None else None
        # Each process takes an equal share (padded by repeating its last prompt, so that every process runs the same
        # generations and forwards, as ZeRO-3 needs); the padding is dropped after gathering
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        share = math.ceil(rows / world)
        indices = list(range(rank * share, min((rank + 1) * share, rows))) or [rows - 1]
        indices += [indices[-1]] * (share - len(indices))
        prompts = dataset.select(indices)["prompt"]
        max_new_tokens = args.max_completion_length  # the training length limit, so clipped_ratio means the same
        if getattr(args, "reanchor_steps", 0):
            self._base_greedy_cache.clear()  # pi_base moves with re-anchoring
            self._base_majority_cache.clear()
        cached, cached_majority = len(self._base_greedy_cache), len(self._base_majority_cache)
        records = measure_prompts(
            self._monitoring_model,
            tokenizer,
            [tokenize_prompt(tokenizer, prompt) for prompt in prompts],
            num_samples=args.eval_num_samples,
            max_new_tokens=max_new_tokens,
            prompts_per_call=args.per_device_eval_batch_size,
            seed=args.seed + rank,
            extractor=extractor,
            answers=None if answers is None else [answers[i] for i in indices],
            checker=checker,
            base_greedy=self._base_greedy_cache,
            base_majority=self._base_majority_cache,
            # the run's stop strings and EOS / end-of-turn ids: monitoring measures the completions that are trained
            stop_strings=getattr(args, "stop_strings", None),
            eos_token_id=getattr(getattr(self, "generation_config", None), "eos_token_id", None),
        )
        gathered = gather_object(list(zip(indices, records))) if world > 1 else list(zip(indices, records))
        unique = dict(gathered)  # padding repeats an index
        metrics = aggregate([unique[i] for i in sorted(unique)], args.objective_beta)
        metrics["guarded_sharpening_error"] = self._guarded_sharpening_error(metrics, metric_key_prefix)
        seconds = time.perf_counter() - start
        generated = share * world
        # Each process's own new pi_base generations (its caches hold its own prompts), summed
        new_base = (len(self._base_greedy_cache) - cached) + (
            len(self._base_majority_cache) - cached_majority
        ) * args.eval_num_samples
        self.last_evaluation_cost = EvaluationCost(
            prompts=rows,
            policy_generations=generated * (args.eval_num_samples + 1),
            base_generations=sum(gather_object([new_base])) if world > 1 else new_base,
            base_scored=generated * (args.eval_num_samples + 1),
            policy_scored=generated,
            seconds=seconds,
        )
        if self.accelerator.is_main_process:
            logger.info(
                "Sharpening evaluation at step %d: %s.", self.state.global_step, self.last_evaluation_cost.describe()
            )
        metrics = {f"{metric_key_prefix}_{key}": value for key, value in metrics.items()}
        metrics[f"{metric_key_prefix}_runtime"] = round(seconds, 4)
        if self.state.epoch is not None:
            metrics["epoch"] = self.state.epoch
        return metrics


class CollapseAlarmCallback(TrainerCallback):
    """Warns when an evaluation shows sharpening turning into collapse, with the config's thresholds:

    - J_beta below its best so far by more than `collapse_objective_drop` x |best| (collapse costs tens to hundreds
      of nats; healthy sharpening toward longer answers can cost a nat or two);
    - the mean sample length below (1 - `collapse_length_drop`) x its longest so far (back to degenerate short outputs);
    - distinct answers below `collapse_min_distinct_answers` after having been above it (the samples stopped giving an
      answer). Sharpening itself lowers distinct answers from ~k toward 1, so a relative fall is no alarm;
    - `top_answer_share` at least `collapse_top_answer_rise` above pi_base's (`base_top_answer_share`, same
      evaluation): one answer for every prompt;
    - `base_majority_agreement` below (1 - `collapse_agreement_drop`) x its first value: the policy no longer gives
      the answers pi_base's samples agree on.

    Each alarm names the metric, its best and current values, and points at `load_best_model_at_end` /
    `EarlyStoppingCallback`."""

    def __init__(self):
        self.best: dict[str, float] = {}
        self.first: dict[str, float] = {}

    def _warn(self, state, key: str, value: float, why: str) -> None:
        logger.warning(
            "Possible collapse at step %d: %s = %.4g, %s. Keep the best iterate with load_best_model_at_end and "
            "metric_for_best_model (the base is a candidate); stop early with transformers.EarlyStoppingCallback.",
            state.global_step, key, value, why,
        )  # fmt: skip

    def _check_retention(self, args, state, metrics: dict) -> None:
        for key, value in metrics.items():
            if not isinstance(value, (int, float)):
                continue
            if key.endswith("_top_answer_share") and not key.endswith("_base_top_answer_share"):
                base = metrics.get(key.removesuffix("top_answer_share") + "base_top_answer_share")
                rise = getattr(args, "collapse_top_answer_rise", 0.25)
                if isinstance(base, (int, float)) and value - base >= rise - 1e-12:
                    why = f"{value - base:.3g} above pi_base's {base:.4g} (collapse_top_answer_rise = {rise:g})"
                    self._warn(state, key, value, why)
            elif key.endswith("_base_majority_agreement"):
                first = self.first.setdefault(key, value)
                drop = getattr(args, "collapse_agreement_drop", 0.5)
                if value < (1 - drop) * first:
                    why = f"below {(1 - drop) * first:.4g} = (1 - collapse_agreement_drop {drop:g}) x its first {first:.4g}"
                    self._warn(state, key, value, why)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._check_retention(args, state, metrics or {})
        for key, value in (metrics or {}).items():
            for suffix, threshold_field in (
                ("_distinct_answers", "collapse_min_distinct_answers"),
                ("_mean_length", "collapse_length_drop"),
                ("_objective", "collapse_objective_drop"),
            ):
                if not key.endswith(suffix) or not isinstance(value, (int, float)):
                    continue
                drop = getattr(args, threshold_field)
                best = self.best.get(key)
                if best is not None:
                    if suffix == "_distinct_answers":
                        floor = drop if best >= drop else -math.inf
                    else:
                        floor = best - drop * abs(best) if suffix == "_objective" else (1 - drop) * best
                    if value < floor:
                        logger.warning(
                            "Possible collapse at step %d: %s = %.4g, below %.4g (its best so far %.4g, minus %s = "
                            "%g). Keep the best iterate with load_best_model_at_end and metric_for_best_model "
                            "(objective or sharpening_error); stop early with transformers.EarlyStoppingCallback.",
                            state.global_step, key, value, floor, best, threshold_field, drop,
                        )  # fmt: skip
                self.best[key] = value if best is None else max(best, value)
