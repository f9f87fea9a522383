"""`BoNSFTConfig`: TRL's `SFTConfig` plus the Best-of-N sampling of SFT-Sharpening (Huang et al. 2025, Sec. 2.1)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from .best_of_n_sampling import TRUNCATION_POLICIES, validate_best_of_n_args
from .self_rewards import get_self_reward


SAMPLING_POLICIES = ("base", "current")


@dataclass
class BoNSFTConfig(SFTConfig):
    r"""Configuration of [`BoNSFTTrainer`]: every `trl.SFTConfig` field, plus how the Best-of-N data is drawn.

    SFT-Sharpening (Huang et al. 2025, "Self-Improvement in Language Models: The Sharpening Mechanism", Sec. 2.1):
    for each training prompt x draw y_1..y_N ~ pi_base(.|x), keep y^BoN = argmax_j r(y_j|x) with
    r = log pi_base(y|x) by default, then maximize sum_x log pi(y^BoN|x). Defaults follow the paper's App. A
    (N = 50 samples at temperature 1.0, no top-p / top-k, at most 512 new tokens). With `adaptive_sampling` the number
    of samples per prompt is chosen by the stopping rule of App. D (see `best_of_n_sampling.adaptive_stopping_index`).

    `completion_only_loss` defaults to True here: the loss covers the selected completion's tokens only.
    """

    completion_only_loss: bool | None = field(
        default=True,
        metadata={
            "help": "Compute the loss on the selected completion only (SFT-Sharpening maximizes log pi(y^BoN|x)). "
            "False also trains on the prompt tokens."
        },
    )

    # Best-of-N sampling
    num_samples: int = field(
        default=50,
        metadata={
            "help": "N: completions sampled per prompt (the maximum under adaptive sampling). Paper App. A: 50."
        },
    )
    self_reward: str = field(
        default="logprob",
        metadata={
            "help": "Self-reward ranking the N samples: logprob (log pi_base(y|x), the paper's Eq. 2), "
            "normalized_logprob, majority, or 'package.module:function'. From Python, also a module-level function "
            "(checkpoints pickle the config)."
        },
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (paper App. A: 1.0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold; 1.0 is off (paper: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling; 0 is off (paper: off)."})
    max_completion_length: int = field(
        default=512,
        metadata={
            "help": "Maximum number of sampled tokens per completion (paper App. A: 512); a completion that reaches "
            "it without EOS is truncated."
        },
    )
    generation_batch_size: int = field(
        default=64, metadata={"help": "Sequences per `generate` call (and per scoring micro-batch) while sampling."}
    )
    truncated_completions: str = field(
        default="keep",
        metadata={
            "help": "Completions without EOS: keep (rank them like the others), penalize (subtract "
            "`truncation_penalty` from their reward) or drop (never select them; prompts left without a candidate are "
            "not trained on).",
            "choices": list(TRUNCATION_POLICIES),
        },
    )
    truncation_penalty: float = field(
        default=100.0, metadata={"help": "Subtracted from the reward of truncated completions under `penalize`."}
    )
    adaptive_sampling: bool = field(
        default=False,
        metadata={
            "help": "Adaptive SFT-Sharpening (paper App. D): stop sampling a prompt after k samples once "
            "1 / max_j pi_base(y_j|x) <= k / ln(2 / adaptive_delta), at most `num_samples`. Saves samples on prompts "
            "where the base is already confident."
        },
    )
    adaptive_delta: float = field(
        default=0.1, metadata={"help": "delta in (0, 1) of the adaptive stopping rule: mu = ln(2 / delta)."}
    )
    adaptive_round_size: int = field(
        default=4, metadata={"help": "Samples drawn per still-active prompt per round of adaptive sampling."}
    )
    answer_extractor: str | None = field(
        default=None,
        metadata={
            "help": "Final-answer extractor ('default': last number or \\boxed{}, or 'package.module:function'). "
            "Used by the majority self-reward, and enables the `bon/distinct_answers` metric."
        },
    )
    sampling_policy: str = field(
        default="base",
        metadata={
            "help": "Who samples the Best-of-N data: base (the paper: drawn once from pi_base before training) or "
            "current (iterated: regenerated from the current policy every `regenerate_every_epochs` epochs, still "
            "ranked by the self-reward under pi_base).",
            "choices": list(SAMPLING_POLICIES),
        },
    )
    regenerate_every_epochs: int = field(
        default=1, metadata={"help": "K: with sampling_policy=current, regenerate the data every K epochs."}
    )
    bon_shard_size: int = field(
        default=64,
        metadata={"help": "Prompts per saved shard of Best-of-N data (the unit of resumption and of the rank split)."},
    )

    def __post_init__(self):
        super().__post_init__()
        # The core's checks: N >= 1, a known truncation policy, delta in (0, 1)
        validate_best_of_n_args(self.num_samples, self.truncated_completions, self.adaptive_delta)
        # Unknown registry names fail here, before any model is loaded
        get_self_reward(self.self_reward)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        positive = {
            "top_k": (self.top_k, 0),
            "max_completion_length": (self.max_completion_length, 1),
            "generation_batch_size": (self.generation_batch_size, 1),
            "adaptive_round_size": (self.adaptive_round_size, 1),
            "regenerate_every_epochs": (self.regenerate_every_epochs, 1),
            "bon_shard_size": (self.bon_shard_size, 1),
        }
        for name, (value, minimum) in positive.items():
            if value < minimum:
                raise ValueError(f"{name} must be at least {minimum}, got {value}.")
        if self.sampling_policy not in SAMPLING_POLICIES:
            raise ValueError(f"Unknown sampling_policy {self.sampling_policy!r}; use one of {SAMPLING_POLICIES}.")
        if self.sampling_policy == "current":
            # Regenerated data replaces the rows of the running dataloader in place, so the row count must not change
            if self.packing:
                raise ValueError(
                    "packing=True is not supported with sampling_policy='current': regenerated data must keep one row "
                    "per prompt. Disable packing, or use sampling_policy='base'."
                )
            if self.truncated_completions == "drop":
                raise ValueError(
                    "truncated_completions='drop' is not supported with sampling_policy='current': a prompt whose "
                    "samples are all dropped would change the number of rows mid-training. Use 'penalize', which "
                    "selects a truncated completion only when every sample is truncated."
                )
