"""`BoNSFTConfig`: TRL's `SFTConfig` plus the Best-of-N sampling of SFT-Sharpening (Huang et al. 2025, Sec. 2.1)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from .errors import check_output_dir, check_resume_from_checkpoint
from .monitoring import MonitoringArguments
from .sampling_arguments import BestOfNSamplingArguments, check_int, field_like, warn_deprecated
from .self_rewards import get_self_reward


SAMPLING_POLICIES = ("base", "current")
PAPER_ADAPTIVE_DELTA = 0.1  # what `adaptive_sampling: true` meant before `adaptive_delta` alone switched it on


@dataclass
class BoNSFTConfig(MonitoringArguments, SFTConfig, BestOfNSamplingArguments):
    r"""Configuration of [`BoNSFTTrainer`]: every `trl.SFTConfig` field, plus how the Best-of-N data is drawn (the
    fields of `trl_sharpen.sampling_arguments.BestOfNSamplingArguments`, shared with `best_of_n` and the CLI).

    SFT-Sharpening (Huang et al. 2025, "Self-Improvement in Language Models: The Sharpening Mechanism", Sec. 2.1):
    for each training prompt x draw y_1..y_N ~ pi_base(.|x), keep y^BoN = argmax_j r(y_j|x) with
    r = log pi_base(y|x) by default, then maximize sum_x log pi(y^BoN|x). Defaults follow the paper's App. A
    (N = 50 samples at temperature 1.0, no top-p / top-k, at most 512 new tokens). With `adaptive_delta` set, the
    number of samples per prompt is chosen by the stopping rule of App. D (see
    `best_of_n_sampling.adaptive_stopping_index`). The sampling seed is TrainingArguments' `seed`.

    `completion_only_loss` defaults to True here: the loss covers the selected completion's tokens only.

    Parameters:
        num_samples (`int`, *optional*, defaults to `50`):
            N: completions sampled per prompt (the maximum under adaptive sampling). The other sampling fields
            (`self_reward`, `temperature`, `truncated_completions`, `adaptive_delta`, `shard_size`, ...) are
            `BestOfNSamplingArguments`', documented there once.
        max_completion_length (`int`, *optional*, defaults to `512`):
            Maximum sampled tokens per completion; one that reaches it without EOS is truncated.
        completion_only_loss (`bool` or `None`, *optional*, defaults to `True`):
            Loss on the selected completion only (SFT-Sharpening maximizes log pi(y^BoN|x)).
        sampling_policy (`str`, *optional*, defaults to `"base"`):
            `"base"` (the paper: drawn once from pi_base) or `"current"` (regenerated from the current policy every
            `regenerate_every_epochs` epochs, still ranked under pi_base).
        regenerate_every_epochs (`int`, *optional*, defaults to `1`):
            K: with `sampling_policy="current"`, regenerate the data every K epochs.
        adaptive_sampling (`bool` or `None`, *optional*, defaults to `None`):
            Deprecated: set `adaptive_delta` instead.
    """

    completion_only_loss: bool | None = field(
        default=True,
        metadata={
            "help": "Compute the loss on the selected completion only (SFT-Sharpening maximizes log pi(y^BoN|x)). "
            "False also trains on the prompt tokens."
        },
    )

    # Best-of-N sampling: the fields of BestOfNSamplingArguments, with the paper's N as default
    num_samples: int = field_like(BestOfNSamplingArguments, "num_samples", default=50)
    max_completion_length: int = field_like(BestOfNSamplingArguments, "max_completion_length", default=512)
    adaptive_sampling: bool | None = field(
        default=None,
        metadata={
            "help": f"Deprecated: set `adaptive_delta` (e.g. {PAPER_ADAPTIVE_DELTA}) to turn adaptive sampling on. "
            f"true = adaptive_delta {PAPER_ADAPTIVE_DELTA} unless given; false = off."
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

    def __post_init__(self):
        if self.adaptive_sampling is not None:
            warn_deprecated("adaptive_sampling", "adaptive_delta")
            if not self.adaptive_sampling:
                self.adaptive_delta = None
            elif self.adaptive_delta is None:
                self.adaptive_delta = PAPER_ADAPTIVE_DELTA
            self.adaptive_sampling = None
        # The sampling checks first: cheap, and they name the setting (SFTConfig's own follow)
        BestOfNSamplingArguments.__post_init__(self)
        super().__post_init__()
        # Unknown registry names fail here, before any model is loaded
        get_self_reward(self.self_reward)
        check_int("regenerate_every_epochs", self.regenerate_every_epochs, 1, "Regenerate every K >= 1 epochs.")
        # Best-of-N sampling runs in the trainer's __init__: a bad checkpoint or output folder must fail before it
        check_resume_from_checkpoint(self.resume_from_checkpoint)
        check_output_dir(self.output_dir)
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
