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

from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from trl_sharpen import SelfRewardDPOConfig, SelfRewardDPOTrainer
from trl_sharpen.distributed import parse_args_and_config
from trl_sharpen.errors import clear_errors
from trl_sharpen.script_utils import (
    SharpenScriptArguments,
    add_greedy_report,
    finish_run,
    load_model_name_and_tokenizer,
    load_prompt_datasets,
    setup_run,
    train_and_save,
)


def main(script_args: SharpenScriptArguments, training_args: SelfRewardDPOConfig, model_args: ModelConfig):
    setup_run(training_args, script_args, model_args)  # also locks output_dir for this run
    model_name, tokenizer = load_model_name_and_tokenizer(model_args, training_args)
    dataset = load_prompt_datasets(script_args)
    test_split = script_args.dataset_test_split

    trainer = SelfRewardDPOTrainer(
        model=model_name,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[test_split] if training_args.eval_strategy != "no" and test_split in dataset else None,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    add_greedy_report(trainer, dataset, script_args)  # greedy accuracy on the test split, before and after training
    train_and_save(trainer, training_args, script_args)
    finish_run(trainer, training_args, script_args)


def make_parser() -> TrlParser:
    return TrlParser((SharpenScriptArguments, SelfRewardDPOConfig, ModelConfig))


if __name__ == "__main__":
    with clear_errors():  # bad input: one line `trl-sharpen: error: ...`; --debug or TRL_SHARPEN_DEBUG=1: traceback
        main(*parse_args_and_config(make_parser()))  # with the launch checks (trl_sharpen/distributed.py)
