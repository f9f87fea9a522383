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

import logging

import transformers
from transformers import AutoTokenizer
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config
from trl.models.utils import unwrap_model_for_generation

from trl_sharpen import XPOConfig, XPOTrainer
from trl_sharpen.data import ensure_pad_token
from trl_sharpen.distributed import parse_args_and_config, print_rank_summary
from trl_sharpen.script_utils import SharpenScriptArguments, load_prompt_datasets, report_greedy_accuracy
from trl_sharpen.toy import TOY_MODEL_PATH


logger = logging.getLogger(__name__)


def greedy_report(trainer, tokenizer, dataset, script_args, label):
    """Greedy accuracy of the policy, and the mean log pi_base of its greedy outputs."""
    with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as policy:
        # With PEFT, `report_greedy_accuracy` scores the policy with its adapters disabled, i.e. under pi_base
        base = policy if trainer.ref_model is None else trainer.accelerator.unwrap_model(trainer.ref_model)
        return report_greedy_accuracy(policy, tokenizer, dataset, script_args, label, base_model=base)


def main(script_args: SharpenScriptArguments, training_args: XPOConfig, model_args: ModelConfig):
    transformers.set_seed(training_args.seed)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())

    model_name = model_args.model_name_or_path or TOY_MODEL_PATH
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    tokenizer = AutoTokenizer.from_pretrained(
        model_name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
    )
    ensure_pad_token(tokenizer)
    dataset = load_prompt_datasets(script_args)
    test_split = script_args.dataset_test_split

    quantization_config = get_quantization_config(model_args)
    trainer = XPOTrainer(
        model=model_name,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[test_split] if training_args.eval_strategy != "no" and test_split in dataset else None,
        processing_class=tokenizer,
        quantization_config=quantization_config,
        peft_config=get_peft_config(model_args),
    )
    if quantization_config is None and not trainer.is_deepspeed_enabled:
        trainer.model.to(trainer.accelerator.device)  # `Trainer` places it only when training starts
    greedy_report(trainer, tokenizer, dataset, script_args, "before")

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    print_rank_summary(trainer)  # every rank: its backend, steps and weights
    trainer.save_model(training_args.output_dir)
    trainer.create_model_card(dataset_name=script_args.dataset_name)
    logger.info("Model saved to %s", training_args.output_dir)

    greedy_report(trainer, tokenizer, dataset, script_args, "after")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.accelerator.end_training()


def make_parser() -> TrlParser:
    return TrlParser((SharpenScriptArguments, XPOConfig, ModelConfig))


if __name__ == "__main__":
    main(*parse_args_and_config(make_parser()))  # with the launch checks (trl_sharpen/distributed.py)
