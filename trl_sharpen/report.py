"""What an evaluation measured: `GreedyEvaluation`, the samples (`SampleSet`), `SharpeningReport` with every metric of
`evaluate_sharpening`, the Table-1 style `lift_over_greedy`, and `format_report` for the terminal."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .metrics import (
    PairedInterval,
    avg_at_k,
    best_of_n_selection_probabilities,
    maj_at_k,
    majority_selection_probabilities,
    mean_pass_at_k,
    paired_bootstrap_interval,
    pass_at_k,
    subset_sizes,
    validate_sample_count,
)


@dataclass
class GreedyEvaluation:
    accuracy: float
    # Mean log pi_base(y|x) of the greedy completions (None when no base model was given)
    mean_base_logprob: float | None
    completions: list[str]
    correct: list[bool]
    # Completions on which the answer checker raised (each counted as wrong)
    checker_errors: int = 0
    wall_time_s: float | None = None
    # Mean number of completion tokens (EOS or stop string included): log-prob rewards favour short answers
    mean_length: float | None = None
    # Per prompt: the greedy completion's token ids, whether it was cut at the length limit, and its log-probability
    # under the evaluated model and under pi_base (None when not computed)
    completion_ids: list[list[int]] | None = None
    truncated: list[bool] | None = None
    logprobs: list[float] | None = None
    base_logprobs: list[float] | None = None


@dataclass
class SampleSet:
    """N samples per prompt (prompt-major lists of lists, N the same for every prompt), with what they are scored by.

    `logprobs` are under the evaluated (sampling) model, `base_logprobs` under pi_base; they are the same numbers
    when the evaluated model is the base. `rewards[name]` holds each sample's self-reward, or None for a majority
    vote, which is recomputed from `answers` within each subset (see `majority_selection_probabilities`).
    """

    completions: list[list[str]]
    answers: list[list[str | None]]
    correct: list[list[bool]]
    base_logprobs: list[list[float]]
    logprobs: list[list[float]]
    truncated: list[list[bool]]
    rewards: dict[str, list[list[float]] | None] = field(default_factory=dict)
    # Samples on which the answer checker raised (counted as wrong)
    checker_errors: int = 0
    # Token ids of the completions (EOS included unless truncated), to rescore them under another model
    completion_ids: list[list[list[int]]] | None = None
    # Per prompt, (log pi_base, log pi) of further complete responses that may be pi_base's most likely one: the
    # greedy outputs of the evaluated model and of pi_base (see `sharpening_errors`)
    mode_candidates: list[list[tuple[float, float]]] | None = None

    @property
    def num_samples(self) -> int:
        return len(self.correct[0])

    def validate(self) -> None:
        if not self.correct:
            raise ValueError("No prompts were evaluated.")
        per_sample = {
            "completions": self.completions,
            "answers": self.answers,
            "correct": self.correct,
            "base_logprobs": self.base_logprobs,
            "logprobs": self.logprobs,
            "truncated": self.truncated,
            **{f"rewards[{k!r}]": v for k, v in self.rewards.items() if v is not None},
        }
        for name, rows in per_sample.items():
            if len(rows) != len(self.correct) or any(len(row) != self.num_samples for row in rows):
                raise ValueError(
                    f"SampleSet.{name} must hold {self.num_samples} samples for each of {len(self.correct)} prompts."
                )

    def selection_probabilities(self, reward: str, n: int) -> list[list[float]]:
        """Per prompt, P(each sample is selected) by Best-of-n under `reward` on a random n-subset."""
        scores = self.rewards[reward]
        if scores is None:
            return [majority_selection_probabilities(answers, n) for answers in self.answers]
        return [best_of_n_selection_probabilities(row, n) for row in scores]


def sharpening_errors(samples: SampleSet) -> list[float]:
    """Per prompt, delta(x) = 1 - pi(y*(x)|x) with y*(x) = argmax_y pi_base(y|x) (Huang et al. 2025, Def. 3.1).

    The argmax over all responses is out of reach; y* is the candidate with the highest log pi_base among the
    complete samples and `samples.mode_candidates` (greedy outputs). Truncated samples are prefixes, not responses
    (a prefix's probability bounds that of every response extending it from above), so they are candidates only when
    nothing complete is. pi is the evaluated model (`samples.logprobs`): measuring it at its own most likely sample
    instead, 1 - max_i pi(y_i|x), would rate a policy that collapsed onto an answer pi_base finds unlikely as sharp.
    """
    errors = []
    for p, (base_row, row, cut_row) in enumerate(zip(samples.base_logprobs, samples.logprobs, samples.truncated)):
        complete = [(b, lp) for b, lp, cut in zip(base_row, row, cut_row) if not cut]
        candidates = complete + list(samples.mode_candidates[p] if samples.mode_candidates else [])
        candidates = candidates or list(zip(base_row, row))
        _, logprob = max(candidates, key=lambda candidate: candidate[0])
        errors.append(1.0 - math.exp(logprob))
    return errors


@dataclass
class SampledAccuracy:
    """The field's metrics of k samples per prompt drawn at one temperature (as label-free RL papers report them):
    `avg_at_k`, the mean accuracy of the samples; `maj_at_k`, the accuracy of each prompt's majority answer;
    `pass_at_k`, the share of prompts with a correct sample. `temperature` None: the sampler's own settings."""

    temperature: float | None
    num_samples: int
    avg_at_k: float
    maj_at_k: float
    pass_at_k: float
    # top-p / top-k of the samples when they were on (None: plain sampling at `temperature`)
    top_p: float | None = None
    top_k: int | None = None

    @classmethod
    def from_flags(
        cls,
        correct: Sequence[Sequence[bool]],
        answers: Sequence[Sequence[str | None]],
        temperature: float | None,
        top_p: float | None = None,
        top_k: int | None = None,
    ) -> SampledAccuracy:
        return cls(
            temperature=temperature,
            num_samples=len(correct[0]),
            avg_at_k=avg_at_k(correct),
            maj_at_k=maj_at_k(answers, correct),
            pass_at_k=mean_pass_at_k(correct),
            top_p=top_p if top_p is not None and top_p < 1 else None,
            top_k=top_k or None,
        )

    @property
    def label(self) -> str:
        """ "T=0.7" (with ", top-p 0.9" / ", top-k 50" when they were on)."""
        text = "T=?" if self.temperature is None else f"T={self.temperature:g}"
        text += "" if self.top_p is None else f", top-p {self.top_p:g}"
        return text + ("" if self.top_k is None else f", top-k {self.top_k}")

    def to_dict(self) -> dict:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "k": self.num_samples,
            "avg_at_k": self.avg_at_k,
            "maj_at_k": self.maj_at_k,
            "pass_at_k": self.pass_at_k,
        }


def bon_minus_greedy_intervals(
    samples: SampleSet, greedy: GreedyEvaluation, rewards: Sequence[str], seed: int = 0
) -> dict[str, PairedInterval]:
    """Per self-reward, the paired bootstrap 95% interval over prompts of BoN@N accuracy (its exact expectation per
    prompt) minus greedy correctness: the evidence that Best-of-N helps this model beyond the noise of few prompts."""
    if len(greedy.correct) != len(samples.correct):
        return {}
    greedy_correct = [float(c) for c in greedy.correct]
    intervals = {}
    for reward in rewards:
        weights = samples.selection_probabilities(reward, samples.num_samples)
        per_prompt = [float(np.dot(w, np.asarray(c, dtype=np.float64))) for w, c in zip(weights, samples.correct)]
        intervals[reward] = paired_bootstrap_interval(per_prompt, greedy_correct, seed=seed)
    return intervals


@dataclass
class Selection:
    """Accuracy and mean log pi_base(y|x) of one way of answering each prompt (greedy, BoN@n, ...)."""

    accuracy: float
    mean_base_logprob: float | None


@dataclass
class SharpeningReport:
    """Everything `evaluate_sharpening` measures, from one set of N samples per prompt. Keys of per-n dicts are n.

    - `sample_accuracy`: temperature-1 accuracy, the mean correctness of all samples (= BoN@1 = pass@1).
    - `pass_at_n[n]`: unbiased pass@n (`pass_at_k`), the coverage skyline (needs the ground truth).
    - `best_of_n[reward][n]`, `best_of_n_base_logprob[reward][n]`: expected accuracy and log pi_base of the sample
      that Best-of-n selects (exact subset expectation, see `best_of_n_selection_probabilities`).
    - `gap[reward]`: generation-verification gap at n = N (Song et al. 2025, Def. 2.1): BoN@N accuracy minus
      `sample_accuracy`; `relative_gap[reward]` = gap / (1 - sample_accuracy) (Def. 2.2; None when every sample is
      correct).
    - `sharpening_error`: mean over prompts of delta(x) = 1 - pi(y*(x)|x) with y*(x) = argmax_y pi_base(y|x) (Def.
      3.1): the probability the evaluated model puts off pi_base's most likely response. y* is estimated as the
      response that pi_base rates highest among the complete samples and the greedy outputs (see
      `sharpening_errors`). `sharpened_fraction`: share of prompts with delta < 1/2, where the evaluated model's
      greedy decoding provably returns y* (Prop. 3.1).
    - `mean_distinct_answers`: distinct extracted answers among the N samples (None answers not counted).
    - `sampled`: the field's avg@k / maj@k / pass@k (`SampledAccuracy`, k = N) of the samples above, then of any
      further sample sets (e.g. at temperature 1 when the report samples at another temperature).
    - `bon_minus_greedy[reward]`: paired bootstrap 95% interval over prompts of BoN@N accuracy - greedy accuracy, with
      its verdict ("helps", "no evidence", "hurts"; see `bon_minus_greedy_intervals`).
    """

    model_name: str | None
    base_model_name: str | None
    num_prompts: int
    num_samples: int
    greedy: GreedyEvaluation
    sample_accuracy: float
    mean_sample_base_logprob: float
    pass_at_n: dict[int, float]
    best_of_n: dict[str, dict[int, float]]
    best_of_n_base_logprob: dict[str, dict[int, float]]
    gap: dict[str, float]
    relative_gap: dict[str, float | None]
    sharpening_error: float
    sharpened_fraction: float
    mean_distinct_answers: float
    truncated_fraction: float
    sample_checker_errors: int
    settings: dict = field(default_factory=dict)
    wall_time_s: dict[str, float] = field(default_factory=dict)
    samples: SampleSet | None = field(default=None, repr=False)
    # Mean completion length in tokens of all samples, and of the sample Best-of-n selects (per reward, per n); None /
    # empty when the samples carry no token ids
    mean_sample_length: float | None = None
    best_of_n_length: dict[str, dict[int, float]] = field(default_factory=dict)
    sampled: list[SampledAccuracy] = field(default_factory=list)
    bon_minus_greedy: dict[str, PairedInterval] = field(default_factory=dict)

    def sampled_at(self, temperature: float) -> SampledAccuracy | None:
        """The plain sample set (no top-p / top-k) drawn at `temperature`, if the report has one."""
        for sampled in self.sampled:
            if sampled.temperature == temperature and sampled.top_p is None and sampled.top_k is None:
                return sampled
        return None

    @property
    def ns(self) -> list[int]:
        return sorted(self.pass_at_n)

    @property
    def num_generated(self) -> int:
        """Completions generated: N samples plus one greedy decoding per prompt, and any further sample sets."""
        return self.num_prompts * (self.num_samples + 1 + sum(s.num_samples for s in self.sampled[1:]))

    def best_of_n_selection(self, reward: str = "logprob", n: int | None = None) -> Selection:
        """BoN@n (default n = N) as a `Selection`, e.g. the inference-time skyline row of a benchmark table."""
        n = self.num_samples if n is None else n
        return Selection(self.best_of_n[reward][n], self.best_of_n_base_logprob[reward][n])

    @classmethod
    def from_samples(
        cls,
        samples: SampleSet,
        greedy: GreedyEvaluation,
        ns: Sequence[int] | None = None,
        model_name: str | None = None,
        base_model_name: str | None = None,
        settings: dict | None = None,
        wall_time_s: dict[str, float] | None = None,
    ) -> SharpeningReport:
        """Compute every metric from the samples (no model needed: the tests build samples by hand)."""
        samples.validate()
        num_samples = samples.num_samples
        ns = subset_sizes(num_samples) if ns is None else sorted(set(ns))
        if ns[0] < 1 or ns[-1] > num_samples:
            raise ValueError(f"Every n must be in [1, N={num_samples}], got {ns}.")
        validate_sample_count(num_samples, list(samples.rewards))
        correct = [np.asarray(row, dtype=np.float64) for row in samples.correct]
        base_logprobs = [np.asarray(row, dtype=np.float64) for row in samples.base_logprobs]
        sample_accuracy = float(np.mean([row.mean() for row in correct]))
        lengths = (
            None
            if samples.completion_ids is None
            else [np.asarray([len(ids) for ids in row], dtype=np.float64) for row in samples.completion_ids]
        )
        best_of_n, best_of_n_logprob, best_of_n_length = {}, {}, {}
        for reward in samples.rewards:
            best_of_n[reward], best_of_n_logprob[reward] = {}, {}
            for n in ns:
                weights = samples.selection_probabilities(reward, n)
                best_of_n[reward][n] = float(np.mean([w @ c for w, c in zip(weights, correct, strict=True)]))
                best_of_n_logprob[reward][n] = float(
                    np.mean([w @ lp for w, lp in zip(weights, base_logprobs, strict=True)])
                )
                if lengths is not None:
                    best_of_n_length.setdefault(reward, {})[n] = float(
                        np.mean([w @ n_tokens for w, n_tokens in zip(weights, lengths, strict=True)])
                    )
        gap = {
            reward: curve[num_samples] - sample_accuracy for reward, curve in best_of_n.items() if num_samples in curve
        }
        headroom = 1.0 - sample_accuracy
        relative_gap = {reward: (value / headroom if headroom > 0 else None) for reward, value in gap.items()}
        delta = sharpening_errors(samples)
        settings = dict(settings or {})
        sampled = SampledAccuracy.from_flags(
            samples.correct, samples.answers, settings.get("temperature"), settings.get("top_p"), settings.get("top_k")
        )
        return cls(
            model_name=model_name,
            base_model_name=base_model_name,
            num_prompts=len(correct),
            num_samples=num_samples,
            greedy=greedy,
            sample_accuracy=sample_accuracy,
            mean_sample_base_logprob=float(np.mean([row.mean() for row in base_logprobs])),
            pass_at_n={n: float(np.mean([pass_at_k(num_samples, int(row.sum()), n) for row in correct])) for n in ns},
            best_of_n=best_of_n,
            best_of_n_base_logprob=best_of_n_logprob,
            gap=gap,
            relative_gap=relative_gap,
            sharpening_error=float(np.mean(delta)),
            sharpened_fraction=float(np.mean([d < 0.5 for d in delta])),
            mean_distinct_answers=float(np.mean([len({a for a in row if a is not None}) for row in samples.answers])),
            truncated_fraction=float(np.mean([np.mean(row) for row in samples.truncated])),
            sample_checker_errors=samples.checker_errors,
            settings=settings,
            wall_time_s=dict(wall_time_s or {}),
            samples=samples,
            mean_sample_length=None if lengths is None else float(np.mean([row.mean() for row in lengths])),
            best_of_n_length=best_of_n_length,
            sampled=[sampled],
            bon_minus_greedy=bon_minus_greedy_intervals(samples, greedy, [r for r in best_of_n if num_samples in ns]),
        )

    def to_dict(self) -> dict:
        """The summary as JSON-ready data (per-n keys become strings; the samples are left out)."""

        def by_n(curve: Mapping[int, float]) -> dict[str, float]:
            return {str(n): value for n, value in sorted(curve.items())}

        return {
            "model": self.model_name,
            "base_model": self.base_model_name,
            "num_prompts": self.num_prompts,
            "num_samples": self.num_samples,
            "ns": self.ns,
            "greedy": {
                "accuracy": self.greedy.accuracy,
                "mean_base_logprob": self.greedy.mean_base_logprob,
                "checker_errors": self.greedy.checker_errors,
                "mean_length": self.greedy.mean_length,
            },
            "sample_accuracy": self.sample_accuracy,
            "mean_sample_base_logprob": self.mean_sample_base_logprob,
            "pass_at_n": by_n(self.pass_at_n),
            "best_of_n": {reward: by_n(curve) for reward, curve in self.best_of_n.items()},
            "best_of_n_base_logprob": {reward: by_n(curve) for reward, curve in self.best_of_n_base_logprob.items()},
            "gap": self.gap,
            "relative_gap": self.relative_gap,
            "sharpening_error": self.sharpening_error,
            "sharpened_fraction": self.sharpened_fraction,
            "mean_distinct_answers": self.mean_distinct_answers,
            "truncated_fraction": self.truncated_fraction,
            "mean_sample_length": self.mean_sample_length,
            "best_of_n_length": {reward: by_n(curve) for reward, curve in self.best_of_n_length.items()},
            "sample_checker_errors": self.sample_checker_errors,
            "sampled": [sampled.to_dict() for sampled in self.sampled],
            "bon_minus_greedy": {
                reward: {
                    "mean": interval.mean,
                    "low": interval.low,
                    "high": interval.high,
                    "confidence": interval.confidence,
                    "num_prompts": interval.num_prompts,
                    "verdict": interval.verdict,
                }
                for reward, interval in self.bon_minus_greedy.items()
            },
            "num_generated": self.num_generated,
            "settings": self.settings,
            "wall_time_s": self.wall_time_s,
        }

    def save_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def save_samples(self, path: str | os.PathLike) -> Path:
        """One JSON line per sample: prompt index, completion (text and token ids), extracted answer, correctness,
        log-probs under the evaluated model and pi_base, self-rewards."""
        if self.samples is None:
            raise ValueError("This report carries no samples.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        s = self.samples
        with open(path, "w") as f:
            for p, row in enumerate(s.completions):
                for i, completion in enumerate(row):
                    record = {
                        "prompt_index": p,
                        "completion": completion,
                        "answer": s.answers[p][i],
                        "correct": s.correct[p][i],
                        "base_logprob": s.base_logprobs[p][i],
                        "logprob": s.logprobs[p][i],
                        "truncated": s.truncated[p][i],
                        **{f"reward/{k}": v[p][i] for k, v in s.rewards.items() if v is not None},
                    }
                    if s.completion_ids is not None:
                        record["completion_ids"] = s.completion_ids[p][i]
                    f.write(json.dumps(record) + "\n")
        return path


@dataclass
class Lift:
    """One row of the paper's Table 1 against the base model's greedy decoding.

    `accuracy_lift_pct` = 100 * (accuracy - greedy accuracy) / greedy accuracy, the "% lift over greedy (accuracy)"
    (None when the greedy accuracy is 0); `loglik_lift` = mean log pi_base(y|x) - that of the base's greedy outputs,
    the "lift over greedy (avg seq. log-likelihood)" (None when either log-likelihood is unknown).
    """

    accuracy: float
    accuracy_lift_pct: float | None
    mean_base_logprob: float | None
    loglik_lift: float | None


def lift_over_greedy(
    result: GreedyEvaluation | Selection | SharpeningReport, baseline: GreedyEvaluation | SharpeningReport
) -> Lift:
    """Accuracy and log-likelihood lift of `result` over the base model's greedy decoding (Huang et al. 2025, Table 1).

    A `SharpeningReport` stands for its greedy decoding; use `report.best_of_n_selection("logprob")` for BoN@N.
    Compare models on the same prompts with log-likelihoods under the same base (`evaluate_greedy(...,
    base_model=base)`):

        >>> base = evaluate_sharpening(base_model, tokenizer, prompts, answers, num_samples=16)
        >>> lift_over_greedy(base.best_of_n_selection("logprob"), base)  # inference-time skyline
        >>> lift_over_greedy(evaluate_greedy(trained, tokenizer, prompts, answers, base_model=base_model), base)
    """
    if isinstance(result, SharpeningReport):
        result = result.greedy
    if isinstance(baseline, SharpeningReport):
        baseline = baseline.greedy
    lift_pct = 100.0 * (result.accuracy - baseline.accuracy) / baseline.accuracy if baseline.accuracy > 0 else None
    loglik_lift = (
        None
        if result.mean_base_logprob is None or baseline.mean_base_logprob is None
        else result.mean_base_logprob - baseline.mean_base_logprob
    )
    return Lift(result.accuracy, lift_pct, result.mean_base_logprob, loglik_lift)


def _fmt(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if sign else f"{value:.3f}"


def _fmt_tokens(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_report(report: SharpeningReport) -> str:
    """A readable plain-text summary of a `SharpeningReport` for the terminal."""
    n_max = report.num_samples
    temperature = report.settings.get("temperature")
    sampling = "sample" if temperature is None else f"temperature-{temperature:g}"
    base_note = "" if report.base_model_name == report.model_name else f"   (pi_base: {report.base_model_name})"
    rows = [
        ("greedy accuracy", _fmt(report.greedy.accuracy)),
        (f"{sampling} accuracy (mean over samples)", _fmt(report.sample_accuracy)),
        ("mean log pi_base(greedy output)", _fmt(report.greedy.mean_base_logprob)),
        ("mean log pi_base(sample)", _fmt(report.mean_sample_base_logprob)),
        (
            "sharpening error delta (mean)",
            f"{_fmt(report.sharpening_error)}   ({100 * report.sharpened_fraction:.1f}% of prompts have delta < 1/2)",
        ),
        ("distinct answers among N (mean)", f"{report.mean_distinct_answers:.2f}"),
        ("truncated samples", f"{100 * report.truncated_fraction:.1f}%"),
    ]
    if report.greedy.mean_length is not None or report.mean_sample_length is not None:
        # log-prob self-rewards favour short answers: show what each way of answering costs in tokens
        lengths = [
            f"greedy {_fmt_tokens(report.greedy.mean_length)}",
            f"sample {_fmt_tokens(report.mean_sample_length)}",
        ]
        lengths += [
            f"BoN@{n_max} {reward} {_fmt_tokens(curve.get(n_max))}"
            for reward, curve in report.best_of_n_length.items()
        ]
        rows.append(("mean completion length (tokens)", ", ".join(lengths)))
    if report.greedy.checker_errors or report.sample_checker_errors:
        errors = report.greedy.checker_errors + report.sample_checker_errors
        rows.append(
            (
                "answer checker errors",
                f"{errors} completions counted as wrong ({report.greedy.checker_errors} greedy, "
                f"{report.sample_checker_errors} sampled)",
            )
        )
    width = max(len(label) for label, _ in rows) + 3
    lines = [
        f"model: {report.model_name}{base_note}",
        f"{report.num_prompts} prompts, N = {n_max} samples per prompt, {report.num_generated} completions generated",
        "",
        *(f"  {label:<{width}}{value}" for label, value in rows),
    ]
    label_width = max([len("pass@n (oracle)")] + [len(f"BoN {r}") for r in report.best_of_n]) + 2
    header = "accuracy".ljust(label_width) + "".join(f"n={n}".rjust(8) for n in report.ns)
    lines += ["", header, "-" * len(header)]
    for reward, curve in report.best_of_n.items():
        lines.append(f"BoN {reward}".ljust(label_width) + "".join(_fmt(curve[n]).rjust(8) for n in report.ns))
    lines.append("pass@n (oracle)".ljust(label_width) + "".join(_fmt(report.pass_at_n[n]).rjust(8) for n in report.ns))
    if report.gap:
        header = (
            "self-reward".ljust(label_width)
            + "gap".rjust(8)
            + "relative gap".rjust(14)
            + "BoN lift over greedy".rjust(22)
            + "log pi_base(BoN)".rjust(18)
        )
        lines += [
            "",
            f"generation-verification gap at n={n_max} (Song et al. 2025): BoN@{n_max} accuracy - {sampling} accuracy",
            header,
            "-" * len(header),
        ]
        for reward, value in report.gap.items():
            selection = report.best_of_n_selection(reward)
            lift = lift_over_greedy(selection, report.greedy)
            lines.append(
                reward.ljust(label_width)
                + _fmt(value, sign=True).rjust(8)
                + _fmt(report.relative_gap[reward], sign=True).rjust(14)
                + (f"{lift.accuracy_lift_pct:+.1f}%" if lift.accuracy_lift_pct is not None else "-").rjust(22)
                + _fmt(selection.mean_base_logprob).rjust(18)
            )
    lines += format_field_metrics(report)
    return "\n".join(lines)


def format_field_metrics(report: SharpeningReport) -> list[str]:
    """The field's metrics (greedy, then avg@k / maj@k / pass@k per sample set) and one verdict line per self-reward
    for BoN@N - greedy."""
    if not report.sampled:
        return []
    label_width = max(len("greedy decoding"), *(len(s.label) for s in report.sampled)) + 4
    header = "samples".ljust(label_width) + "".join(name.rjust(9) for name in ("greedy", "avg@k", "maj@k", "pass@k"))
    lines = ["", f"the field's metrics, k = {report.num_samples} samples per prompt", header, "-" * len(header)]
    lines.append("greedy decoding".ljust(label_width) + _fmt(report.greedy.accuracy).rjust(9))
    for sampled in report.sampled:
        lines.append(
            sampled.label.ljust(label_width)
            + "".rjust(9)
            + "".join(_fmt(v).rjust(9) for v in (sampled.avg_at_k, sampled.maj_at_k, sampled.pass_at_k))
        )
    if report.bon_minus_greedy:
        lines.append("")
    for reward, interval in report.bon_minus_greedy.items():
        lines.append(
            f"verdict, BoN@{report.num_samples} by {reward} - greedy: {interval.verdict} "
            f"({interval.mean:+.3f}, paired bootstrap {100 * interval.confidence:g}% interval "
            f"[{interval.low:+.3f}, {interval.high:+.3f}] over {interval.num_prompts} prompts)"
        )
    return lines
