"""LoRA training on a real model (issue 13): each trainer takes optimizer steps on SmolLM2-135M-Instruct with chat
prompts from the arithmetic task; every adapter weight moves and no base weight does.

Two steps, not one: LoRA starts with B = 0, so in the first step A's gradient (B^T times the output gradient) is
exactly zero and Adam leaves A unchanged; from the second step on, both move. Kept small (2 prompts, 2 samples,
8-token completions, no gradient checkpointing) so the three trainers take about a minute on 2 CPU cores.
"""

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoTokenizer
from trl import ModelConfig, TrlParser, get_peft_config

from tests.trainer_args import CPU_TEST_ARGS
from trl_sharpen import BoNSFTConfig, BoNSFTTrainer, SelfRewardDPOConfig, SelfRewardDPOTrainer, XPOConfig, XPOTrainer
from trl_sharpen.tasks import generate_task


pytestmark = pytest.mark.real_model

LORA_FLAGS = ["--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj"]


def chat_prompts(limit: int = 2) -> Dataset:
    rows = generate_task("arithmetic", level="add1", form="chat", num_train=limit, num_test=1)["train"]
    return Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])


def make_trainer(name: str, model_path: str, output_dir):
    (model_args,) = TrlParser((ModelConfig,)).parse_args_and_config(LORA_FLAGS)
    kwargs = {
        **CPU_TEST_ARGS,
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 2,
        "max_steps": 2,
        "learning_rate": 1e-2,
        "max_completion_length": 8,
        "gradient_checkpointing": False,  # speed; checkpointing with LoRA is covered by tests/test_peft.py
    }
    common = dict(
        train_dataset=chat_prompts(),
        processing_class=AutoTokenizer.from_pretrained(model_path),
        peft_config=get_peft_config(model_args),
    )
    if name == "bon_sft":
        return BoNSFTTrainer(model_path, args=BoNSFTConfig(num_samples=2, num_train_epochs=2, **kwargs), **common)
    if name == "self_reward_dpo":
        return SelfRewardDPOTrainer(model_path, args=SelfRewardDPOConfig(**kwargs), **common)
    return XPOTrainer(model_path, args=XPOConfig(**kwargs), **common)


@pytest.mark.parametrize("name", ["bon_sft", "self_reward_dpo", "xpo"])
def test_lora_steps_on_smollm2_move_every_adapter_weight_and_no_base_weight(name, smollm2_path, tmp_path):
    trainer = make_trainer(name, smollm2_path, tmp_path)
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    assert {type(trainer.model.get_base_model()).__name__} == {"LlamaForCausalLM"}
    trainer.train()
    assert trainer.state.global_step == 2

    params = dict(trainer.model.named_parameters())
    unchanged = [n for n, before in adapters.items() if torch.equal(params[n].detach(), before)]
    assert not unchanged, f"adapter weights that never moved: {unchanged}"
    # Base weights against the checkpoint on disk, not against a copy taken from the same (possibly shared) tensors
    saved = load_file(f"{smollm2_path}/model.safetensors")
    base = {
        key.removeprefix("base_model.model.").replace(".base_layer", ""): value
        for key, value in trainer.model.state_dict().items()
        if "lora_" not in key
    }
    assert set(saved) <= set(base)
    moved = [key for key in saved if not torch.equal(base[key], saved[key])]
    assert not moved, f"base weights that moved: {moved}"
