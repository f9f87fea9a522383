"""The sampling settings, declared once: the dataclasses that the configs and the command line mix in, and that
`best_of_n` and `evaluate_sharpening` take whole.

- `GenerationArguments`: how one completion is drawn (temperature, top-p, top-k, length, stop strings). Mixed into
  every config that samples, including `SelfRewardDPOConfig` and `XPOConfig`.
- `SamplingArguments`: N completions per prompt (`trl-sharpen eval`, `evaluate_sharpening`).
- `BestOfNSamplingArguments`: plus the self-reward, the truncation policy, adaptive sampling and shards (`best_of_n`,
  `trl-sharpen bon`, `BoNSFTConfig`); `fingerprint()` is what a resumed run must match.

Names follow TRL where TRL has one (`max_completion_length`). Old names keep working with a `FutureWarning` (TRL's
own deprecation category): `max_new_tokens`, `generation_batch_size` (TRL's GRPO uses that name for the completions
of one optimizer step, not for a `generate` micro-batch) and `bon_shard_size`.

Validation lives in `__post_init__`, so a bad value fails when the arguments are parsed, before a model is loaded,
with one line that names the setting, the value and the fix. This module imports the standard library only:
`trl-sharpen --help` must not load torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any


TRUNCATION_POLICIES = ("keep", "penalize", "drop")
MIN_TEMPERATURE = 1e-3  # logits / T stay far below float32's range (vLLM samples greedily below 1e-5)

# old name -> current name, for YAML / command-line fields and for the Python API's keyword arguments
DEPRECATED_NAMES = {
    "max_new_tokens": "max_completion_length",
    "generation_batch_size": "sampling_batch_size",
    "bon_shard_size": "shard_size",
}
# keyword arguments of the Python API only (not fields)
DEPRECATED_KEYWORDS = {**DEPRECATED_NAMES, "batch_size": "sampling_batch_size"}


def _hidden_alias() -> Any:
    # argparse.SUPPRESS keeps the old name out of `--help` while the parser (and a YAML file) still accept it
    return field(default=None, metadata={"help": argparse.SUPPRESS})


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value, minimum: int, fix: str) -> None:
    """Refuse non-integers (YAML `true` is a bool, `2.5` a float: neither is a count) and values below `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {show_value(value)}. {fix}")


def check_number(name: str, value, rule: str, ok: bool, fix: str) -> None:
    if not _is_number(value) or not ok:
        raise ValueError(f"{name} must be {rule}, got {show_value(value)}. {fix}")


def show_value(value) -> str:
    """`repr(value)`, with huge numbers abbreviated (a 300-digit integer in a message hides the message)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**12:
        return f"{float(value):.3g}" if abs(value) < 10**308 else f"an integer of {len(str(abs(value)))} digits"
    return repr(value)


def check_temperature(temperature) -> None:
    """A sampling temperature > 0, and at least MIN_TEMPERATURE: logits / 1e-300 overflow (float32 reads 1e-300 as
    0), and below it sampling is greedy in all but name."""
    check_number(
        "temperature", temperature, "> 0", _is_number(temperature) and temperature > 0,
        "Sampling needs a temperature > 0 (the paper samples at 1.0); greedy accuracy is reported separately.",
    )  # fmt: skip
    check_number(
        "temperature", temperature, f">= {MIN_TEMPERATURE}", temperature >= MIN_TEMPERATURE,
        "Lower temperatures overflow the logits; greedy accuracy is reported separately.",
    )  # fmt: skip


def check_finite_numbers(config) -> None:
    """Every float setting of a dataclass config, its own fields and inherited ones (TrainingArguments', TRL's), one
    value or a list of values, must be a finite number. NaN passes every `<` / `>` range check (`eval_beta=nan` gave
    a NaN objective, so load-best kept the last iterate) and inf overflows mid-training (`beta=inf`, `alpha=nan`).
    Applied generically, so that no float field is left out."""
    for config_field in dataclasses.fields(config):
        value = getattr(config, config_field.name, None)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(
                    f"{config_field.name} must be a finite number, got {item!r}. Set a real value (or leave it unset "
                    "for its default)."
                )
            # Beyond int64 no count, size or seed means anything (torch cannot even hold it); said abbreviated, as a
            # 300-digit number printed whole hides the message
            if isinstance(item, int) and not isinstance(item, bool) and abs(item) >= 2**63:
                raise ValueError(
                    f"{config_field.name} is out of range (beyond 64-bit integers): got {show_value(item)}."
                )
        if config_field.name == "temperature" and isinstance(value, (int, float)):  # TRL's GRPO/RLOO configs too
            check_temperature(value)
        rule = INHERITED_RANGES.get(config_field.name)
        if rule is not None and _is_number(value) and not rule[1](value):
            raise ValueError(f"{config_field.name} must be {rule[0]}, got {show_value(value)}. {rule[2]}")
    # Without max_steps the epochs set the length: 0 or fewer trains nothing and saves the base model as the result
    epochs, max_steps = getattr(config, "num_train_epochs", None), getattr(config, "max_steps", None)
    if _is_number(epochs) and _is_number(max_steps) and epochs <= 0 and max_steps <= 0:
        raise ValueError(
            f"num_train_epochs must be > 0 when max_steps is unset, got {show_value(epochs)}: the run would train "
            "nothing and save the base model as its result. Set num_train_epochs > 0, or max_steps."
        )


# Ranges of float settings that configs inherit from TrainingArguments / TRL, which do not check them (a negative
# learning rate trains uphill without a word); our own fields check their ranges in their classes
INHERITED_RANGES = {
    "learning_rate": (">= 0", lambda v: v >= 0, "A negative learning rate maximizes the loss."),
    "weight_decay": (">= 0", lambda v: v >= 0, "Use 0 for none."),
    "max_grad_norm": (">= 0", lambda v: v >= 0, "Use 0 to turn gradient clipping off."),
    "adam_beta1": ("in [0, 1)", lambda v: 0 <= v < 1, "AdamW's default is 0.9."),
    "adam_beta2": ("in [0, 1)", lambda v: 0 <= v < 1, "AdamW's default is 0.999."),
    "adam_epsilon": ("> 0", lambda v: v > 0, "AdamW's default is 1e-8."),
    "label_smoothing_factor": ("in [0, 1)", lambda v: 0 <= v < 1, "Use 0 for none."),
    "ref_model_mixup_alpha": ("in [0, 1]", lambda v: 0 <= v <= 1, "1 copies the policy into the reference."),
    # integer counts TrainingArguments takes unchecked (0 crashed with a ZeroDivisionError or torch's batch_size error)
    "gradient_accumulation_steps": (">= 1", lambda v: v >= 1, "Use 1 for no accumulation."),
    "per_device_train_batch_size": (">= 1", lambda v: v >= 1, "Set the prompts per device and step, e.g. 8."),
    "per_device_eval_batch_size": (">= 1", lambda v: v >= 1, "Set it, e.g. 8."),
    # 0 saved nothing and evaluated every logging_steps (transformers reads 0 as unset), with exit code 0
    "save_steps": ("> 0", lambda v: v > 0, "Give steps between checkpoints (or a fraction < 1 of the run), or set "
                   "save_strategy: no."),
    "eval_steps": ("> 0", lambda v: v > 0, "Give steps between evaluations (or a fraction < 1 of the run), or leave "
                   "it unset for logging_steps."),
}


def warn_deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"`{old}` is deprecated and will be removed in a future release; use `{new}` (same meaning).",
        FutureWarning,
        stacklevel=4,
    )


def field_like(cls: type, name: str, default: Any) -> Any:
    """`name`'s field of `cls` with another default and the same help: a config whose default differs (e.g. the
    paper's N = 50 for training) changes the default without writing the help a second time."""
    original = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field(default=default, metadata=dict(original.metadata), kw_only=True)


@dataclass(kw_only=True)
class GenerationArguments:
    """How one completion is sampled. The checkpoint's own generation defaults are never used."""

    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature, > 0 (paper App. A: 1.0)."})
    top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling threshold in (0, 1]; 1.0 is off (paper: off)."}
    )
    top_k: int = field(default=0, metadata={"help": "Top-k sampling; 0 is off (paper: off)."})
    max_completion_length: int = field(
        default=256,
        metadata={
            "help": "Maximum number of sampled tokens per completion (paper App. A: 512); a completion that reaches "
            "it without EOS is truncated. Formerly `max_new_tokens`."
        },
    )
    stop_strings: list[str] | None = field(
        default=None,
        metadata={
            "help": "Strings that end a completion like EOS (e.g. '\\n\\nQuestion:' for a base model that goes on "
            "with the next exercise). Unset: EOS only."
        },
    )
    max_new_tokens: int | None = _hidden_alias()

    def __post_init__(self):
        self._resolve_deprecated_names()
        check_finite_numbers(self)  # also the temperature (`check_temperature`)
        check_temperature(self.temperature)  # a field, so always checked (even if a subclass retypes it)
        check_number(
            "top_p", self.top_p, "in (0, 1]", _is_number(self.top_p) and 0 < self.top_p <= 1,
            "top_p = 0 would make every sample the greedy one; use 1.0 to turn nucleus sampling off.",
        )  # fmt: skip
        check_int("top_k", self.top_k, 0, "Use 0 to turn top-k sampling off.")
        check_int("max_completion_length", self.max_completion_length, 1, "Set the completion length limit, e.g. 256.")
        if isinstance(self.stop_strings, str):  # `--stop_strings X` or YAML `stop_strings: X`: one string
            self.stop_strings = [self.stop_strings]
        if self.stop_strings is not None:
            self.stop_strings = list(self.stop_strings)
            if not self.stop_strings or not all(isinstance(s, str) and s for s in self.stop_strings):
                raise ValueError(
                    f"stop_strings must be a list of non-empty strings, got {self.stop_strings!r}. Leave it unset "
                    "to stop at EOS only."
                )

    def _resolve_deprecated_names(self) -> None:
        """Move values given under an old name to the current one (once, with a `FutureWarning`)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for old, new in DEPRECATED_NAMES.items():
            if old not in defaults or new not in defaults or getattr(self, old) is None:
                continue
            value = getattr(self, old)
            warn_deprecated(old, new)
            current = getattr(self, new)
            if current != defaults[new] and current != value:
                raise ValueError(f"Got both {old}={value!r} (deprecated) and {new}={current!r}; set only {new}.")
            setattr(self, new, value)
            setattr(self, old, None)

    def sampling_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `trl_sharpen.generation.sampling_config` (not named `generation_kwargs`: TRL configs
        have a field of that name, extra `GenerationConfig` arguments)."""
        kwargs = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_completion_length,
        }
        if self.stop_strings:
            kwargs["stop_strings"] = list(self.stop_strings)
        return kwargs


@dataclass(kw_only=True)
class SamplingArguments(GenerationArguments):
    """N completions per prompt, drawn in micro-batches with a fixed seed."""

    num_samples: int = field(
        default=16,
        metadata={
            "help": "N: completions sampled per prompt (the maximum under adaptive sampling; smaller n in an "
            "evaluation are exact subsamples). Paper App. A: 50."
        },
    )
    sampling_batch_size: int = field(
        default=64,
        metadata={
            "help": "Sequences per `generate` call (and per scoring micro-batch) while sampling. Formerly "
            "`generation_batch_size`, a name TRL's GRPO uses for another thing."
        },
    )
    answer_extractor: str | None = field(
        default=None,
        metadata={
            "help": "Final-answer extractor: 'default' (last number or \\boxed{}) or 'package.module:function'. Used "
            "by the majority self-reward and the answer metrics."
        },
    )
    require_answer: bool | None = field(
        default=None,
        metadata={
            "help": "Answer gating against reward hacking: a completion with no extractable final answer (or a "
            "truncated one) is never selected by Best-of-N, nor the chosen side of a DPO/XPO pair, while the prompt "
            "has a complete completion with an answer. None: on exactly when `answer_extractor` is set."
        },
    )
    seed: int = field(default=0, metadata={"help": "Sampling seed (the caller's random state is left untouched)."})
    generation_batch_size: int | None = _hidden_alias()

    def __post_init__(self):
        super().__post_init__()
        check_int("num_samples", self.num_samples, 1, "Set N, the completions sampled per prompt, e.g. 16.")
        check_int("sampling_batch_size", self.sampling_batch_size, 1, "Set the sequences per generate call, e.g. 64.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}. Use a whole number, e.g. 0.")
        check_require_answer(self.require_answer, self.answer_extractor)


def check_require_answer(require_answer, answer_extractor) -> None:
    """Refuse a non-boolean `require_answer`, and `require_answer: true` without an extractor to find answers with."""
    if require_answer is not None and not isinstance(require_answer, bool):
        raise ValueError(
            f"require_answer must be true, false or unset, got {require_answer!r}. Leave it unset to gate on answers "
            "exactly when answer_extractor is set."
        )
    if require_answer and answer_extractor is None:
        raise ValueError(
            "require_answer=True needs an answer_extractor to tell which completions have an answer. Set "
            "answer_extractor (e.g. 'default', or 'package.module:function'), or leave require_answer unset."
        )


def answer_gating_on(require_answer: bool | None, answer_extractor) -> bool:
    """Whether answer gating applies: `require_answer` when set, else exactly when an answer extractor is set."""
    return answer_extractor is not None if require_answer is None else bool(require_answer)


# Fewer samples always tie under a majority vote: 2 samples are either the same answer (1, 1) or two answers (1/2, 1/2)
MAJORITY_MIN_SAMPLES = 3


def check_majority_samples(num_samples: int) -> None:
    """Refuse Best-of-N by the `majority` self-reward with fewer than `MAJORITY_MIN_SAMPLES` samples per prompt."""
    if num_samples < MAJORITY_MIN_SAMPLES:
        raise ValueError(
            f"self_reward='majority' needs at least {MAJORITY_MIN_SAMPLES} samples per prompt, got "
            f"num_samples={num_samples}: with 2 samples the votes always tie (one answer: 1 and 1; two answers: 1/2 "
            "and 1/2), so Best-of-N would keep sample 0. Raise num_samples, or use self_reward='logprob'."
        )


@dataclass(kw_only=True)
class BestOfNSamplingArguments(SamplingArguments):
    """Best-of-N: rank the N samples by a self-reward and keep the best, resumably, shard by shard."""

    self_reward: str = field(
        default="logprob",
        metadata={
            "help": "Self-reward ranking the N samples: logprob (log pi_base(y|x), the paper's Eq. 2), "
            "normalized_logprob, majority, or 'package.module:function'. From Python, also a module-level function "
            "(checkpoints pickle the config)."
        },
    )
    truncated_completions: str = field(
        default="keep",
        metadata={
            "help": "Completions cut at max_completion_length without EOS are prefixes, never selected while the "
            "prompt has a complete one. When every sample is truncated: keep and penalize select the best prefix, "
            "drop selects none (the prompt is not trained on). penalize also subtracts `truncation_penalty` from the "
            "stored rewards of truncated completions.",
            "choices": list(TRUNCATION_POLICIES),
        },
    )
    truncation_penalty: float = field(
        default=100.0, metadata={"help": "Subtracted from the reward of truncated completions under `penalize`."}
    )
    adaptive_delta: float | None = field(
        default=None,
        metadata={
            "help": "Adaptive sampling (paper App. D) with this delta in (0, 1): a prompt stops after k samples once "
            "1 / max_j pi_base(y_j|x) <= k / ln(2 / delta), at most `num_samples`. Unset: N samples per prompt."
        },
    )
    adaptive_round_size: int = field(
        default=4, metadata={"help": "Samples drawn per still-active prompt per round of adaptive sampling."}
    )
    shard_size: int = field(
        default=64,
        metadata={
            "help": "Prompts per saved shard of Best-of-N results (the unit of resumption and of the split across "
            "processes). Formerly `bon_shard_size` in BoNSFTConfig."
        },
    )
    bon_shard_size: int | None = _hidden_alias()

    def __post_init__(self):
        super().__post_init__()
        if self.truncated_completions not in TRUNCATION_POLICIES:
            raise ValueError(
                f"truncated_completions must be one of {list(TRUNCATION_POLICIES)}, got "
                f"{self.truncated_completions!r}. Pick one of them."
            )
        check_number(
            "truncation_penalty", self.truncation_penalty, ">= 0",
            _is_number(self.truncation_penalty) and self.truncation_penalty >= 0,
            "It is subtracted from the reward of truncated completions.",
        )  # fmt: skip
        if self.adaptive_delta is not None:
            check_number(
                "adaptive_delta", self.adaptive_delta, "in (0, 1)",
                _is_number(self.adaptive_delta) and 0 < self.adaptive_delta < 1,
                "e.g. 0.1; leave it unset to draw num_samples per prompt.",
            )  # fmt: skip
        check_int("adaptive_round_size", self.adaptive_round_size, 1, "Set the samples per adaptive round, e.g. 4.")
        check_int("shard_size", self.shard_size, 1, "Set the prompts per saved shard, e.g. 64.")
        if not (isinstance(self.self_reward, str) and self.self_reward) and not callable(self.self_reward):
            raise ValueError(
                f"self_reward must be a name (logprob, normalized_logprob, majority), a 'package.module:function' "
                f"path or a callable, got {self.self_reward!r}."
            )
        if self.self_reward == "majority":  # here, before any model is loaded (best_of_n checks reward objects too)
            check_majority_samples(self.num_samples)

    def fingerprint(self, self_reward_name: str) -> dict[str, Any]:
        """The settings a resumed run must share with the shards on disk (written to `bon_run.json`). The keys keep
        their first names (`max_new_tokens`) so that results written before the rename still resume."""
        adaptive = self.adaptive_delta is not None
        return {
            "num_samples": self.num_samples,
            "self_reward": self_reward_name,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_completion_length,
            "stop_strings": self.stop_strings,
            "truncated_completions": self.truncated_completions,
            "truncation_penalty": self.truncation_penalty,
            "adaptive_delta": self.adaptive_delta,
            "adaptive_round_size": self.adaptive_round_size if adaptive else None,
            "shard_size": self.shard_size,
            "seed": self.seed,
            # the selection changes with answer gating; None when off, so results from before the setting resume
            "answer_gating": _callable_name(self.answer_extractor)
            if answer_gating_on(self.require_answer, self.answer_extractor)
            else None,
        }


def _callable_name(value) -> str:
    """A JSON-safe name of an extractor given as a 'package.module:function' string or (from Python) a function."""
    return (
        value
        if isinstance(value, str)
        else f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', value)}"
    )


def sampling_arguments(cls: type, sampling=None, /, **kwargs):
    """An instance of `cls` from `sampling` (any object with its fields, e.g. a `BoNSFTConfig`) and keyword
    arguments (which win). Keyword arguments left at None are ignored, and old names are accepted with a
    `FutureWarning`: this is how the Python API's keyword arguments reach the same validation as the configs."""
    names = {f.name for f in dataclasses.fields(cls) if f.name not in DEPRECATED_NAMES}
    for old, new in DEPRECATED_KEYWORDS.items():
        if old in kwargs and new in names:
            value = kwargs.pop(old)
            if value is not None:
                warn_deprecated(old, new)
                if kwargs.get(new) is not None and kwargs[new] != value:
                    raise ValueError(
                        f"Got both {old}={value!r} (deprecated) and {new}={kwargs[new]!r}; pass only {new}."
                    )
                kwargs[new] = value
    unknown = set(kwargs) - names
    if unknown:
        raise TypeError(f"Unknown sampling argument(s) {sorted(unknown)}; the settings are {sorted(names)}.")
    values = {} if sampling is None else {name: getattr(sampling, name) for name in names if hasattr(sampling, name)}
    values.update({name: value for name, value in kwargs.items() if value is not None})
    return cls(**values)
