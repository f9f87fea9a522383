"""LoRA and QLoRA through TRL's `ModelConfig` (`--use_peft`, `--lora_r`, `--load_in_4bit`), for every trainer: the
adapter trains under (reentrant) gradient checkpointing, base weights never move, and pi_base, which samples, scores
and serves as reference, is the adapter-disabled model."""

import importlib.util
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, TrlParser, get_peft_config

from tests.launching import REPO
from tests.trainer_args import CPU_TEST_ARGS
from trl_sharpen import BoNSFTConfig, BoNSFTTrainer, SelfRewardDPOConfig, SelfRewardDPOTrainer, sequence_logprobs
from trl_sharpen.distributed import check_model_args
from trl_sharpen.toy import TOY_MODEL_PATH, load_toy_prompts


TRAINERS = ["bon_sft", "self_reward_dpo", "xpo"]
LORA_FLAGS = ["--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj"]


def model_config(*flags) -> ModelConfig:
    """TRL's `ModelConfig` from command-line flags, as the recipes parse it."""
    (model_args,) = TrlParser((ModelConfig,)).parse_args_and_config(list(flags))
    return model_args


def make_trainer(name, output_dir, model=TOY_MODEL_PATH, peft_config=None, quantization_config=None, **overrides):
    kwargs = {**CPU_TEST_ARGS, "output_dir": str(output_dir), "learning_rate": 1e-2, "max_steps": 3, **overrides}
    common = dict(
        train_dataset=load_toy_prompts("train", limit=24),
        processing_class=AutoTokenizer.from_pretrained(TOY_MODEL_PATH),
        peft_config=peft_config,
        quantization_config=quantization_config,
    )
    if name == "bon_sft":
        args = BoNSFTConfig(num_samples=4, generation_batch_size=512, **kwargs)
        return BoNSFTTrainer(model, args=args, **common)
    if name == "self_reward_dpo":
        return SelfRewardDPOTrainer(model, args=SelfRewardDPOConfig(**kwargs), **common)
    from trl_sharpen import XPOConfig, XPOTrainer

    return XPOTrainer(model, args=XPOConfig(**kwargs), **common)


def base_state_dict():
    return AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH).state_dict()


def non_adapter_weights(peft_model):
    """The wrapped base model's weights under their original names."""
    return {
        key.removeprefix("base_model.model.").replace(".base_layer", ""): value
        for key, value in peft_model.state_dict().items()
        if "lora_" not in key
    }


@pytest.mark.parametrize("name", TRAINERS)
def test_lora_with_reentrant_checkpointing_trains_every_adapter_weight_and_no_base_weight(name, tmp_path):
    """Reentrant checkpointing (what PEFT + ZeRO-3 forces) passes no gradient into a checkpointed block whose input
    does not require grad: without `enable_input_require_grads` (TRL's job, redone after every generation toggles
    checkpointing off and on) no LoRA weight would get a gradient. See the control below."""
    peft_config = get_peft_config(model_config(*LORA_FLAGS))
    trainer = make_trainer(
        name,
        tmp_path,
        peft_config=peft_config,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert before and all("lora_" in n for n in before)
    trainer.train()

    unchanged = [n for n, p in trainer.model.named_parameters() if n in before and torch.equal(p, before[n])]
    assert not unchanged, f"adapter weights that never moved: {unchanged}"
    assert trainer.model.is_gradient_checkpointing  # restored after the generations
    base = base_state_dict()
    weights = non_adapter_weights(trainer.model)
    assert weights.keys() == base.keys()
    assert all(torch.equal(weights[key], base[key]) for key in base)


def test_reentrant_checkpointing_without_input_grads_cuts_lora_off():
    """The control for the test above: the pitfall is real on this model, so the test above can fail."""
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    ids = torch.randint(3, 100, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)
    model.base_model.model.disable_input_require_grads()
    # Every LoRA weight sits in a checkpointed block: the loss is cut off from all of them
    with pytest.raises(RuntimeError, match="does not require grad"):
        model(input_ids=ids, labels=ids).loss.backward()


def trained_adapter(seed=0):
    """A LoRA model whose adapter is not the identity (lora_B is zero at initialization)."""
    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    return model


def test_bon_sft_samples_and_scores_with_the_adapter_disabled_model(tmp_path):
    """A PEFT model whose adapter already moved (e.g. trained before): the Best-of-N data still comes from pi_base."""
    trainer = make_trainer("bon_sft", tmp_path, model=trained_adapter())
    bon = trainer.bon_dataset.select(range(6))
    prompts = [row["prompt_ids"] for row in bon for _ in row["completion_ids"]]
    completions = [ids for row in bon for ids in row["completion_ids"]]
    recorded = torch.tensor([lp for row in bon for lp in row["base_logprobs"]])
    base = sequence_logprobs(AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH), prompts, completions)
    adapted = sequence_logprobs(trainer.model, prompts, completions)
    torch.testing.assert_close(recorded, base, atol=1e-4, rtol=1e-4)
    assert (adapted - base).abs().max() > 0.1  # the adapter matters, so the match above is not vacuous


@pytest.mark.parametrize("name", ["self_reward_dpo", "xpo"])
def test_online_trainers_pi_base_is_the_adapter_disabled_model_after_training(name, tmp_path):
    """After LoRA training: base samples carry log pi_base, and the pi_base pass (self-reward and DPO reference)
    scores with the adapter disabled, while the policy itself has moved."""
    trainer = make_trainer(name, tmp_path, peft_config=get_peft_config(model_config(*LORA_FLAGS)))
    trainer.train()
    assert trainer.ref_model is None  # no second copy of the model
    prompt_ids = trainer.train_dataset["prompt_ids"][:4]
    samples = trainer._generate(prompt_ids, 2, from_base=True)
    prompts = [prompt_ids[i] for i in samples.prompt_index]
    base = sequence_logprobs(AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH), prompts, samples.completion_ids)
    torch.testing.assert_close(torch.tensor(samples.logprobs), base, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(trainer._base_logprobs(prompts, samples.completion_ids), base, atol=1e-4, rtol=1e-4)
    policy = sequence_logprobs(trainer.model, prompts, samples.completion_ids)
    assert (policy - base).abs().max() > 0.01


# ------------------------------------------------------------------------------------------------------ QLoRA
HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.skipif(HAS_BITSANDBYTES, reason="bitsandbytes is installed: the missing-package error cannot happen")
def test_load_in_4bit_without_bitsandbytes_names_the_extra(tmp_path):
    result = subprocess.run(
        [sys.executable, "recipes/dpo_sharpen.py", "--config", "recipes/dpo_sharpen/toy_cpu.yaml", *LORA_FLAGS,
         "--load_in_4bit", "--output_dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert 'pip install "trl-sharpen[quantization]"' in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "adapter_model.safetensors").exists()


@pytest.mark.skipif(
    not HAS_BITSANDBYTES, reason='bitsandbytes is not installed (pip install "trl-sharpen[quantization]")'
)
@pytest.mark.parametrize("name", TRAINERS)
def test_qlora_samples_and_scores_with_the_quantized_base(name, tmp_path):
    """QLoRA through ModelConfig: 4-bit base layers, LoRA on top, Best-of-N / pair data sampled and scored by the
    adapter-disabled quantized model. On CPU the training part is skipped: bitsandbytes (0.50) repacks 4-bit weights
    for CPU inference at the first generation and no gradient reaches the adapter afterwards, which the recipes
    refuse (`check_model_args`)."""
    from trl import get_quantization_config

    model_args = model_config(*LORA_FLAGS, "--load_in_4bit", "--bnb_4bit_quant_type", "nf4", "--dtype", "float32")
    quantization = get_quantization_config(model_args)
    trainer = make_trainer(name, tmp_path, peft_config=get_peft_config(model_args), quantization_config=quantization)
    layer = trainer.model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(layer.base_layer).__name__ == "Linear4bit" and "default" in layer.lora_A

    if name == "bon_sft":
        bon = trainer.bon_dataset.select(range(4))
        prompts = [row["prompt_ids"] for row in bon for _ in row["completion_ids"]]
        completions = [ids for row in bon for ids in row["completion_ids"]]
        recorded = torch.tensor([lp for row in bon for lp in row["base_logprobs"]])
        with trainer.model.disable_adapter():
            expected = sequence_logprobs(trainer.model, prompts, completions)
        torch.testing.assert_close(recorded, expected, atol=1e-3, rtol=1e-3)
    else:
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
        assert torch.isfinite(batch["ref_chosen_logps"]).all() and (batch["ref_chosen_logps"] < 0).all()

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="does not train on CPU"):
            check_model_args(model_args)
        pytest.skip("4-bit training on CPU gets no gradients after bitsandbytes repacks the weights for generation")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert all(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)


def test_quantization_extra_installs_a_bitsandbytes_that_transformers_accepts():
    """The extra the error message names must be enough: transformers refuses older bitsandbytes for 4-bit."""
    import configparser

    from packaging.requirements import Requirement
    from packaging.version import Version
    from transformers.utils.import_utils import BITSANDBYTES_MIN_VERSION

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    extra = [Requirement(line) for line in config["options.extras_require"]["quantization"].split("\n") if line]
    (bitsandbytes,) = [requirement for requirement in extra if requirement.name == "bitsandbytes"]
    lower = [Version(spec.version) for spec in bitsandbytes.specifier if spec.operator in (">=", "==", "~=")]
    assert lower and min(lower) >= Version(BITSANDBYTES_MIN_VERSION)
    check_model_args(model_config(*LORA_FLAGS))  # no quantization: nothing to check
