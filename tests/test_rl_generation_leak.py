"""Issue 18 case 1 in TRL's own generation (SelfRewardGRPOTrainer / SelfRewardRLOOTrainer sample with TRL's
`generate` call): transformers 5.x fills every generation field TRL leaves None (no_repeat_ngram_size, typical_p,
min_p, prefill_chunk_size, ...) from the checkpoint's generation_config. On the toy model with repetition_penalty=3
and no_repeat_ngram_size=1 in its generation config, TRL's samples changed from "4 + 6 = 10 , 10 + 2 = 12 . answer 12"
to "answer 18": the self-reward then trained on samples of another distribution than pi. Generation now runs with the
checkpoint's generation config set aside (TRL's own settings and `generation_kwargs` kept), as trl_sharpen's."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from trl_sharpen import SelfRewardGRPOTrainer, SelfRewardRLOOTrainer
from trl_sharpen.toy import TOY_MODEL_PATH, load_toy_prompts

from .trainer_args import CPU_TEST_ARGS


def trl_samples(trainer_class, tmp_path, tokenizer, leaky: bool, **overrides):
    """Completions of TRL's generation step (`_generate_single_turn`) for 2 prompts x 2 samples, seeded."""
    model = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH).eval()
    if leaky:
        model.generation_config.repetition_penalty = 3.0
        model.generation_config.no_repeat_ngram_size = 1
    settings = {**CPU_TEST_ARGS, "num_generations": 4, "max_completion_length": 16, "gradient_checkpointing": False}
    args = trainer_class._config_class(output_dir=str(tmp_path / str(leaky)), **{**settings, **overrides})
    prompts = load_toy_prompts("train").select(range(8))
    trainer = trainer_class(model=model, args=args, train_dataset=prompts, processing_class=tokenizer)
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts["prompt"][:2]] * 2
    extra = (2,) if trainer_class is SelfRewardGRPOTrainer else ()  # GRPO's num_generations argument
    torch.manual_seed(0)
    out = trainer._generate_single_turn(prompt_ids, None, {}, *extra)
    completions = out[0] if trainer_class is SelfRewardGRPOTrainer else out
    assert model.generation_config.no_repeat_ngram_size == (1 if leaky else None)  # the checkpoint's, restored
    return [list(ids) for ids in completions]


@pytest.mark.parametrize("trainer_class", [SelfRewardGRPOTrainer, SelfRewardRLOOTrainer])
def test_trls_generation_ignores_the_checkpoints_generation_settings(trainer_class, tmp_path, toy_tokenizer):
    clean = trl_samples(trainer_class, tmp_path, toy_tokenizer, leaky=False)
    assert trl_samples(trainer_class, tmp_path, toy_tokenizer, leaky=True) == clean


def test_a_setting_passed_in_generation_kwargs_is_still_used(tmp_path, toy_tokenizer):
    clean = trl_samples(SelfRewardGRPOTrainer, tmp_path, toy_tokenizer, leaky=False)
    asked = trl_samples(
        SelfRewardGRPOTrainer, tmp_path, toy_tokenizer, leaky=False, generation_kwargs={"no_repeat_ngram_size": 1}
    )
    assert asked != clean
    assert all(len(set(ids)) == len(ids) for ids in asked)  # no token repeats within a completion
