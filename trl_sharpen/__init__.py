"""trl_sharpen: self-improvement by sharpening for Hugging Face TRL.

Implements Huang et al., "Self-Improvement in Language Models: The Sharpening Mechanism" (ICLR 2025,
arXiv 2412.01951): the base model's own sequence log-probability is the reward.
"""

__version__ = "0.1.0"

from .answers import answers_match, extract_answer
from .metrics import pass_at_k
from .report import SharpeningReport, lift_over_greedy
from .sampling_arguments import BestOfNSamplingArguments, GenerationArguments, SamplingArguments


__all__ = [
    "BestOfNSamplingArguments",
    "BoNSFTConfig",
    "GenerationArguments",
    "BoNSFTTrainer",
    "SELF_REWARDS",
    "SamplingArguments",
    "SelfReward",
    "SelfRewardDPOConfig",
    "SelfRewardDPOTrainer",
    "SelfRewardGRPOConfig",
    "SelfRewardGRPOTrainer",
    "SelfRewardRLOOConfig",
    "SelfRewardRLOOTrainer",
    "SharpeningReport",
    "XPOConfig",
    "XPOTrainer",
    "answers_match",
    "best_of_n",
    "completion_mask_from_eos",
    "evaluate_greedy",
    "evaluate_sharpening",
    "extract_answer",
    "generate_completions",
    "get_self_reward",
    "lift_over_greedy",
    "load_prompts",
    "pass_at_k",
    "register_self_reward",
    "sequence_logprobs",
]

# Everything that imports torch, datasets or TRL's trainer stack (seconds) loads on first access, so that
# `import trl_sharpen` and `trl-sharpen --help` stay light
_LAZY_EXPORTS = {
    "best_of_n": ".best_of_n_sampling",
    "load_prompts": ".data",
    "evaluate_greedy": ".evaluation",
    "evaluate_sharpening": ".evaluation",
    "generate_completions": ".generation",
    "completion_mask_from_eos": ".logprobs",
    "sequence_logprobs": ".logprobs",
    "SELF_REWARDS": ".self_rewards",
    "SelfReward": ".self_rewards",
    "get_self_reward": ".self_rewards",
    "register_self_reward": ".self_rewards",
    "BoNSFTConfig": ".bon_sft_config",
    "BoNSFTTrainer": ".bon_sft_trainer",
    "SelfRewardDPOConfig": ".self_reward_dpo_config",
    "SelfRewardDPOTrainer": ".self_reward_dpo_trainer",
    "SelfRewardGRPOConfig": ".self_reward_rl_config",
    "SelfRewardGRPOTrainer": ".self_reward_rl_trainer",
    "SelfRewardRLOOConfig": ".self_reward_rl_config",
    "SelfRewardRLOOTrainer": ".self_reward_rl_trainer",
    "XPOConfig": ".xpo_config",
    "XPOTrainer": ".xpo_trainer",
}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
