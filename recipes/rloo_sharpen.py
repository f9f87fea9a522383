"""RLOO-Sharpening with `SelfRewardRLOOTrainer`: TRL's RLOO where the base model's own log-likelihood is the reward.

Huang et al., "Self-Improvement in Language Models: The Sharpening Mechanism" (ICLR 2025, arXiv 2412.01951),
Sec. 2.2, with RLOO (leave-one-out baseline, KL to pi_base in the reward) as the RL algorithm. The same script as
recipes/grpo_sharpen.py with TRL's `RLOOTrainer` underneath. RLOO's default beta (0.05) makes TRL compute the
reference log-probs, which at temperature 1 are log pi_base itself: the reward costs no extra forward.

The bundled toy task on CPU:

    accelerate launch recipes/rloo_sharpen.py --config recipes/rloo_sharpen/toy_cpu.yaml

Every field of `SharpenScriptArguments`, `SelfRewardRLOOConfig` and `trl.ModelConfig` can be set in the YAML or on the
command line.
"""

from trl import ModelConfig, TrlParser

from trl_sharpen import SelfRewardRLOOConfig, SelfRewardRLOOTrainer
from trl_sharpen.distributed import parse_args_and_config
from trl_sharpen.errors import clear_errors
from trl_sharpen.script_utils import SharpenScriptArguments, train_online_recipe


TRAINER, CONFIG = SelfRewardRLOOTrainer, SelfRewardRLOOConfig


def main(script_args: SharpenScriptArguments, training_args, model_args: ModelConfig):
    train_online_recipe(TRAINER, script_args, training_args, model_args)


def make_parser() -> TrlParser:
    return TrlParser((SharpenScriptArguments, CONFIG, ModelConfig))


if __name__ == "__main__":
    with clear_errors():  # bad input: one line `trl-sharpen: error: ...`; --debug or TRL_SHARPEN_DEBUG=1: traceback
        main(*parse_args_and_config(make_parser()))  # with the launch checks (trl_sharpen/distributed.py)
