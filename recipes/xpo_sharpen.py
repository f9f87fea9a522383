"""Sharpening with exploration, `XPOTrainer`: the paper's Algorithm 1 (XPO with the self-reward log pi_base(y|x)).

Huang et al., "Self-Improvement in Language Models: The Sharpening Mechanism" (ICLR 2025, arXiv 2412.01951),
Sec. 4.2.2 / App. J, adapting XPO (Xie et al. 2024, arXiv 2405.21046). Each step samples y from the policy and y~
from pi_base for every prompt and minimizes the regression of beta * (log-ratio difference) on the self-reward
difference (`--loss_type sharpen`, the paper's) or a TRL DPO loss on (y, y~) ranked by log pi_base (`--loss_type
sigmoid`, TRL's former XPO), plus the exploration bonus alpha * mean log pi(y~|x). Greedy accuracy on the test split
is printed before and after training.

The bundled toy task on CPU (a 139k-parameter model; under a minute):

    accelerate launch recipes/xpo_sharpen.py --config recipes/xpo_sharpen/toy_cpu.yaml

    # TRL's former XPO (logistic DPO loss), or Algorithm 1's growing dataset D (replay the last 256 triples)
    accelerate launch recipes/xpo_sharpen.py --config recipes/xpo_sharpen/toy_cpu.yaml --loss_type sigmoid
    accelerate launch recipes/xpo_sharpen.py --config recipes/xpo_sharpen/toy_cpu.yaml --replay_buffer_size 256

Qwen2.5-1.5B-Instruct on GSM8K with LoRA, on GPUs:

    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml recipes/xpo_sharpen.py \\
        --config recipes/xpo_sharpen/qwen2.5_1.5b_instruct_gsm8k.yaml

Every field of `SharpenScriptArguments`, `XPOConfig` and `trl.ModelConfig` can be set in the YAML or on the command
line (`--help` lists them).
"""

from trl import ModelConfig, TrlParser

from trl_sharpen import XPOConfig, XPOTrainer
from trl_sharpen.distributed import parse_args_and_config
from trl_sharpen.errors import clear_errors
from trl_sharpen.script_utils import SharpenScriptArguments, train_online_recipe


def main(script_args: SharpenScriptArguments, training_args: XPOConfig, model_args: ModelConfig):
    train_online_recipe(XPOTrainer, script_args, training_args, model_args)


def make_parser() -> TrlParser:
    return TrlParser((SharpenScriptArguments, XPOConfig, ModelConfig))


if __name__ == "__main__":
    with clear_errors():  # bad input: one line `trl-sharpen: error: ...`; --debug or TRL_SHARPEN_DEBUG=1: traceback
        main(*parse_args_and_config(make_parser()))  # with the launch checks (trl_sharpen/distributed.py)
