"""GRPO-Sharpening with `SelfRewardGRPOTrainer`: TRL's GRPO where the base model's own log-likelihood is the reward.

Huang et al., "Self-Improvement in Language Models: The Sharpening Mechanism" (ICLR 2025, arXiv 2412.01951),
Sec. 2.2: RLHF-Sharpening with GRPO as the RL algorithm. Each step samples `num_generations` completions per prompt
with TRL's own generation (`use_vllm: true` on GPUs), rewards each with `self_reward` (default log pi_base(y|x)) and
takes TRL's GRPO step. Greedy accuracy on the test split is printed before and after training.

The bundled toy task on CPU (a 139k-parameter model; under a minute):

    accelerate launch recipes/grpo_sharpen.py --config recipes/grpo_sharpen/toy_cpu.yaml

    # majority vote instead of log pi_base (label-free self-consistency), or the new literature rewards
    accelerate launch recipes/grpo_sharpen.py --config recipes/grpo_sharpen/toy_cpu.yaml --self_reward majority
    accelerate launch recipes/grpo_sharpen.py --config recipes/grpo_sharpen/toy_cpu.yaml --self_reward self_certainty

Qwen2.5-1.5B-Instruct on GSM8K with vLLM generation and ZeRO-3, on GPUs (not run by this project):

    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/grpo_sharpen.py \\
        --config recipes/grpo_sharpen/qwen2.5_1.5b_instruct_gsm8k_vllm.yaml

RLOO: recipes/rloo_sharpen.py, the same script with `SelfRewardRLOOTrainer`. Every field of
`SharpenScriptArguments`, `SelfRewardGRPOConfig` and `trl.ModelConfig` can be set in the YAML or on the command line.
"""

from trl import ModelConfig, TrlParser

from trl_sharpen import SelfRewardGRPOConfig, SelfRewardGRPOTrainer
from trl_sharpen.distributed import parse_args_and_config
from trl_sharpen.errors import clear_errors
from trl_sharpen.script_utils import SharpenScriptArguments, train_online_recipe


TRAINER, CONFIG = SelfRewardGRPOTrainer, SelfRewardGRPOConfig


def main(script_args: SharpenScriptArguments, training_args, model_args: ModelConfig):
    train_online_recipe(TRAINER, script_args, training_args, model_args)


def make_parser() -> TrlParser:
    return TrlParser((SharpenScriptArguments, CONFIG, ModelConfig))


if __name__ == "__main__":
    with clear_errors():  # bad input: one line `trl-sharpen: error: ...`; --debug or TRL_SHARPEN_DEBUG=1: traceback
        main(*parse_args_and_config(make_parser()))  # with the launch checks (trl_sharpen/distributed.py)
