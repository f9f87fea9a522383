"""RLHF-Sharpening with `SelfRewardDPOTrainer`: online DPO where the base model's own log-likelihood is the reward.

Huang et al., "Self-Improvement in Language Models: The Sharpening Mechanism" (ICLR 2025, arXiv 2412.01951),
Sec. 2.2 / 4.2. Each step samples k completions per prompt, ranks them by log pi_base(y|x) and trains on the pair
(best, worst) with a DPO loss against pi_base, or with the paper's regression loss (`--loss_type sharpen`, Eq. 8).
Greedy accuracy on the test split is printed before and after training.

The bundled toy task on CPU (a 139k-parameter model; about a minute):

    accelerate launch recipes/dpo_sharpen.py --config recipes/dpo_sharpen/toy_cpu.yaml

    # the paper's regression loss, or samples drawn from pi_base (Eq. 8) instead of the policy
    accelerate launch recipes/dpo_sharpen.py --config recipes/dpo_sharpen/toy_cpu.yaml --loss_type sharpen
    accelerate launch recipes/dpo_sharpen.py --config recipes/dpo_sharpen/toy_cpu.yaml --sample_from base

Qwen2.5-1.5B-Instruct on GSM8K with LoRA, on GPUs:

    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml recipes/dpo_sharpen.py \\
        --config recipes/dpo_sharpen/qwen2.5_1.5b_instruct_gsm8k.yaml

Every field of `SharpenScriptArguments`, `SelfRewardDPOConfig` and `trl.ModelConfig` can be set in the YAML or on
the command line (`--help` lists them).
"""

from trl import ModelConfig, TrlParser

from trl_sharpen import SelfRewardDPOConfig, SelfRewardDPOTrainer
from trl_sharpen.distributed import parse_args_and_config
from trl_sharpen.errors import clear_errors
from trl_sharpen.script_utils import SharpenScriptArguments, train_online_recipe


def main(script_args: SharpenScriptArguments, training_args: SelfRewardDPOConfig, model_args: ModelConfig):
    train_online_recipe(SelfRewardDPOTrainer, script_args, training_args, model_args)


def make_parser() -> TrlParser:
    return TrlParser((SharpenScriptArguments, SelfRewardDPOConfig, ModelConfig))


if __name__ == "__main__":
    with clear_errors():  # bad input: one line `trl-sharpen: error: ...`; --debug or TRL_SHARPEN_DEBUG=1: traceback
        main(*parse_args_and_config(make_parser()))  # with the launch checks (trl_sharpen/distributed.py)
