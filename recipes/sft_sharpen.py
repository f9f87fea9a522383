"""SFT-Sharpening with `BoNSFTTrainer`: SFT on the base model's own Best-of-N samples, ranked by log pi_base(y|x).

Huang et al., "Self-Improvement in Language Models: The Sharpening Mechanism" (ICLR 2025, arXiv 2412.01951),
Sec. 2.1 / App. A.3. Before training, N completions are sampled per prompt from pi_base and the most likely one under
pi_base is kept (saved under `<output_dir>/bon_data`, reused when the run is restarted); the model is then fine-tuned
on (prompt, selected completion). Greedy accuracy on the test split, and the mean log pi_base of the greedy outputs,
are printed before and after training.

The bundled toy task on CPU (a 139k-parameter model; a minute or two), from the repository root:

    accelerate launch recipes/sft_sharpen.py --config recipes/sft_sharpen/toy_cpu.yaml

    # adaptive sampling (App. D: fewer samples where the base is confident), or iterated sharpening
    accelerate launch recipes/sft_sharpen.py --config recipes/sft_sharpen/toy_cpu.yaml --adaptive_delta 0.1
    accelerate launch recipes/sft_sharpen.py --config recipes/sft_sharpen/toy_cpu.yaml --sampling_policy current \\
        --num_train_epochs 2 --output_dir outputs/sft_sharpen/toy_current

Qwen2.5-1.5B-Instruct on GSM8K with LoRA (the paper's App. A.3 / Table 2 settings), on GPUs:

    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml recipes/sft_sharpen.py \\
        --config recipes/sft_sharpen/qwen2.5_1.5b_instruct_gsm8k.yaml

Every field of `SharpenScriptArguments`, `BoNSFTConfig` and `trl.ModelConfig` can be set in the YAML or on the
command line (`--help` lists them).
"""

from accelerate import PartialState
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from trl_sharpen import BoNSFTConfig, BoNSFTTrainer, answers_match
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


def report_bon_data(trainer: BoNSFTTrainer, script_args: SharpenScriptArguments) -> None:
    """Accuracy of the selected completions the model is trained on (the teacher: BoN@N on the train prompts)."""
    bon, column = trainer.bon_dataset, script_args.answer_column
    if column is None or column not in bon.column_names or not PartialState().is_main_process:
        return
    correct = [c is not None and answers_match(c, a) for c, a in zip(bon["selected_completion"], bon[column])]
    samples = sum(bon["num_samples"]) / len(bon)
    print(
        f"[bon data] BoN accuracy on {len(bon)} train prompts: {sum(correct) / len(correct):.3f} "
        f"({samples:.1f} samples per prompt)",
        flush=True,
    )


def main(script_args: SharpenScriptArguments, training_args: BoNSFTConfig, model_args: ModelConfig):
    setup_run(training_args, script_args, model_args)  # also locks output_dir for this run
    model_name, tokenizer = load_model_name_and_tokenizer(model_args, training_args)
    dataset = load_prompt_datasets(script_args)
    test_split = script_args.dataset_test_split

    # Samples (or reloads) the Best-of-N data under <output_dir>/bon_data before returning
    trainer = BoNSFTTrainer(
        model=model_name,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        # held-out prompts for the label-free sharpening metrics and best-iterate selection (trl_sharpen.monitoring)
        eval_dataset=dataset[test_split] if training_args.eval_strategy != "no" and test_split in dataset else None,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    report_bon_data(trainer, script_args)
    add_greedy_report(trainer, dataset, script_args)  # greedy accuracy on the test split, before and after training
    train_and_save(trainer, training_args, script_args)
    finish_run(trainer, training_args, script_args)


def make_parser() -> TrlParser:
    return TrlParser((SharpenScriptArguments, BoNSFTConfig, ModelConfig))


if __name__ == "__main__":
    with clear_errors():  # bad input: one line `trl-sharpen: error: ...`; --debug or TRL_SHARPEN_DEBUG=1: traceback
        main(*parse_args_and_config(make_parser()))  # with the launch checks (trl_sharpen/distributed.py)
