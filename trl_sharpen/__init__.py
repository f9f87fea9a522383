"""trl_sharpen: self-improvement by sharpening for Hugging Face TRL.

Implements Huang et al., "Self-Improvement in Language Models: The Sharpening Mechanism" (ICLR 2025,
arXiv 2412.01951): the base model's own sequence log-probability is the reward.
"""

__version__ = "0.1.0"

from .answers import answers_match, extract_answer
from .best_of_n_sampling import best_of_n
from .data import load_prompts
from .evaluation import evaluate_greedy, evaluate_sharpening
from .generation import generate_completions
from .logprobs import completion_mask_from_eos, sequence_logprobs
from .metrics import pass_at_k
from .report import SharpeningReport, lift_over_greedy
from .self_rewards import SELF_REWARDS, SelfReward, get_self_reward, register_self_reward


__all__ = [
    "BoNSFTConfig",
    "BoNSFTTrainer",
    "SELF_REWARDS",
    "SelfReward",
    "SelfRewardDPOConfig",
    "SelfRewardDPOTrainer",
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

# Trainers import TRL's trainer stack (seconds): they load on first access, so `import trl_sharpen` stays light
_LAZY_EXPORTS = {
    "BoNSFTConfig": ".bon_sft_config",
    "BoNSFTTrainer": ".bon_sft_trainer",
    "SelfRewardDPOConfig": ".self_reward_dpo_config",
    "SelfRewardDPOTrainer": ".self_reward_dpo_trainer",
    "XPOConfig": ".xpo_config",
    "XPOTrainer": ".xpo_trainer",
}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
