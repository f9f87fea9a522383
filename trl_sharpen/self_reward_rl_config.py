"""Configurations of `SelfRewardGRPOTrainer` and `SelfRewardRLOOTrainer`: TRL's `GRPOConfig` / `RLOOConfig` plus the
self-reward fields (`SelfRewardRLArguments`) and the label-free monitoring fields (`MonitoringArguments`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig, RLOOConfig

from .monitoring import MonitoringArguments
from .sampling_arguments import MAJORITY_MIN_SAMPLES, SamplingArguments, check_require_answer, field_like


@dataclass(kw_only=True)
class SelfRewardRLArguments:
    """The self-reward of a GRPO / RLOO sharpening run (shared by both configs)."""

    self_reward: str = field(
        default="logprob",
        metadata={
            "help": "The reward: 'logprob' (log pi_base(y|x), the paper's), 'normalized_logprob' (per token), "
            "'majority' (share of the prompt's group with the same final answer, voted over the whole group across "
            "processes), 'self_certainty' (Intuitor) or 'negative_entropy' (RENT) of the current policy, a registered "
            "name, a 'package.module:function' path or a callable with TRL's reward protocol. `reward_funcs` passed "
            "to the trainer are added on top, weighted by `reward_weights` = [self_reward's, then each of theirs]."
        },
    )
    answer_extractor: str | None = field_like(SamplingArguments, "answer_extractor", default=None)
    require_answer: bool | None = field(
        default=None,
        metadata={
            "help": "Answer gating: a completion with no extractable final answer gets the lowest self-reward of its "
            "group (a number, not NaN, so it still counts in the group's baseline). None: on exactly when "
            "`answer_extractor` is set."
        },
    )
    scoring_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Sequences per micro-batch of the pi_base (or policy-statistics) scoring pass. None: "
            "per_device_train_batch_size."
        },
    )

    def _check_self_reward(self) -> None:
        from .self_rewards import SELF_REWARDS

        if isinstance(self.self_reward, str) and self.self_reward not in SELF_REWARDS and ":" not in self.self_reward:
            raise ValueError(
                f"Unknown self_reward {self.self_reward!r}. Valid names: {sorted(SELF_REWARDS)}; or a "
                "'package.module:function' path, or a callable."
            )
        if self.self_reward == "majority":
            for name in ("num_generations", "num_generations_eval"):
                value = getattr(self, name, None)
                if value is not None and value < MAJORITY_MIN_SAMPLES:
                    raise ValueError(
                        f"self_reward='majority' needs {name} >= {MAJORITY_MIN_SAMPLES}, got {value}: with fewer "
                        "completions per prompt the votes always tie and every advantage is 0. Set "
                        f"{name}: {MAJORITY_MIN_SAMPLES} or more."
                    )
        check_require_answer(self.require_answer, self.answer_extractor)
        if self.scoring_batch_size is not None and (
            isinstance(self.scoring_batch_size, bool) or not isinstance(self.scoring_batch_size, int)
            or self.scoring_batch_size < 1
        ):  # fmt: skip
            raise ValueError(f"scoring_batch_size={self.scoring_batch_size!r} must be a positive integer or null.")
        self._check_sampling()

    def _check_sampling(self) -> None:
        """TRL's sampling fields, checked before the model loads (temperature: `check_finite_numbers`, for every
        config). None is refused where transformers would fill in
        its own default: a GenerationConfig's top_k=None samples with top_k=50, not from pi."""
        top_k = getattr(self, "top_k", 0)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(
                f"top_k={top_k!r}: give an integer >= 0; 0 turns top-k sampling off (None would let transformers "
                "sample with its default top_k=50, not from pi)."
            )
        top_p = getattr(self, "top_p", 1.0)
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p!r} must be in (0, 1]; 1.0 turns nucleus sampling off.")


@dataclass
class SelfRewardGRPOConfig(MonitoringArguments, GRPOConfig, SelfRewardRLArguments):
    """Configuration for [`SelfRewardGRPOTrainer`]: every `trl.GRPOConfig` field keeps its meaning (`beta`,
    `temperature`, `use_vllm`, `loss_type`, `scale_rewards`, ...), plus `SelfRewardRLArguments` (the self-reward) and
    `MonitoringArguments` (the `eval_*` label-free monitoring fields). See the trainer for what each reward costs."""

    def __post_init__(self):
        self._check_self_reward()
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        return _named_self_reward(super().to_dict())


@dataclass
class SelfRewardRLOOConfig(MonitoringArguments, RLOOConfig, SelfRewardRLArguments):
    """Configuration for [`SelfRewardRLOOTrainer`]: `trl.RLOOConfig` (whose `beta` defaults to 0.05: TRL's reference
    pass then supplies log pi_base at temperature 1 for free) plus the self-reward and monitoring fields."""

    def __post_init__(self):
        self._check_self_reward()
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        return _named_self_reward(super().to_dict())


def _named_self_reward(output: dict[str, Any]) -> dict[str, Any]:
    """A callable self-reward by its name: logging integrations dump the config as JSON."""
    if callable(output.get("self_reward")):
        reward = output["self_reward"]
        output["self_reward"] = getattr(reward, "__name__", type(reward).__name__)
    return output
