"""PEFT adapter types beyond LoRA (issue 18's class "samples from an adapter type we cannot guarantee"): each is scored
and sampled exactly, adapter on (the policy) and adapter disabled (pi_base), against the PEFT model's own forward, or
refused at the first use with one line. Tiny random llama (2 layers, width 32), adapters given random weights so that
they change the model (most initialise to the identity)."""

import pytest
import torch


peft = pytest.importorskip("peft")

from tests.test_architectures import COMPLETIONS, PROMPTS, ROWS, own_logprobs, sampling, tiny_model  # noqa: E402
from trl_sharpen.generation import generate_completions  # noqa: E402
from trl_sharpen.logprobs import sequence_logprobs  # noqa: E402


TARGETS = ["q_proj", "v_proj"]
ADAPTER_PARAMETERS = ("lora_", "ia3_", "hada_", "lokr_", "vera_lambda", "magnitude", "modules_to_save")


def lora(**kwargs):
    return peft.LoraConfig(**{"r": 4, "target_modules": TARGETS, "init_lora_weights": False, **kwargs})


def two_adapters(model, active):
    """Two LoRA adapters, the named one active: scoring must use that one (and the base when disabled)."""
    model = peft.get_peft_model(model, lora())
    model.add_adapter("other", lora())
    model.set_adapter(active)
    return model


EXACT = {
    "lora": lambda m: peft.get_peft_model(m, lora()),
    "lora_on_lm_head": lambda m: peft.get_peft_model(m, lora(target_modules=[*TARGETS, "lm_head"])),
    "lm_head_in_modules_to_save": lambda m: peft.get_peft_model(m, lora(modules_to_save=["lm_head"])),
    "dora": lambda m: peft.get_peft_model(m, lora(use_dora=True)),
    "ia3": lambda m: peft.get_peft_model(
        m, peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    ),
    "loha": lambda m: peft.get_peft_model(m, peft.LoHaConfig(r=4, target_modules=TARGETS, init_weights=False)),
    "lokr": lambda m: peft.get_peft_model(m, peft.LoKrConfig(r=4, target_modules=TARGETS, init_weights=False)),
    "adalora": lambda m: peft.get_peft_model(
        m, peft.AdaLoraConfig(r=4, target_modules=TARGETS, total_step=10, init_lora_weights=False)
    ),
    "vera": lambda m: peft.get_peft_model(m, peft.VeraConfig(r=4, target_modules=TARGETS)),
    "second_adapter_active": lambda m: two_adapters(m, "other"),
    "adapter_not_named_default": lambda m: peft.get_peft_model(m, lora(), adapter_name="mine"),
}


@pytest.mark.parametrize("adapter", list(EXACT))
def test_adapter_type_is_scored_and_sampled_exactly(adapter):
    prompts = [PROMPTS[i] for i in ROWS]
    base = tiny_model("llama")
    base_expected = own_logprobs(base, prompts, COMPLETIONS)
    model = EXACT[adapter](base)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(key in name for key in ADAPTER_PARAMETERS):
                parameter.add_(torch.randn_like(parameter) * 0.5)
    model.eval()
    expected = own_logprobs(model, prompts, COMPLETIONS)  # the PEFT model's own forward: the policy
    assert (expected - base_expected).abs().max() > 1e-2  # the adapter changes the model
    for share in (True, False):
        got = sequence_logprobs(model, prompts, COMPLETIONS, share_prompts=share)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0, msg=f"{adapter} policy, share={share}")
        with model.disable_adapter():
            got = sequence_logprobs(model, prompts, COMPLETIONS, share_prompts=share)
        torch.testing.assert_close(got, base_expected, atol=1e-4, rtol=0, msg=f"{adapter} base, share={share}")
    for disabled in (False, True):
        with model.disable_adapter() if disabled else torch.no_grad():
            torch.manual_seed(0)
            samples = generate_completions(model, PROMPTS, sampling(), num_samples=3)
            rescored = own_logprobs(model, [PROMPTS[i] for i in samples.prompt_index], samples.completion_ids)
        torch.testing.assert_close(
            torch.tensor(samples.logprobs), rescored, atol=1e-4, rtol=0, msg=f"{adapter} recorded, disabled={disabled}"
        )


REFUSED = {
    # The PEFT wrapper's forward routes by task_ids: the causal LM alone raised a bare "task_ids should not be None"
    "POLY": lambda m: peft.get_peft_model(m, peft.PolyConfig(r=4, target_modules=TARGETS, n_tasks=2)),
    # The wrapper finds the invocation tokens and switches the adapter on after them; the causal LM alone runs the base
    "aLoRA": lambda m: peft.get_peft_model(m, lora(alora_invocation_tokens=[9, 14])),
    "MULTITASK_PROMPT_TUNING": lambda m: peft.get_peft_model(
        m, peft.MultitaskPromptTuningConfig(num_virtual_tokens=3, num_tasks=2, task_type="CAUSAL_LM")
    ),
}


@pytest.mark.parametrize("adapter", list(REFUSED))
def test_adapter_steered_outside_the_causal_lm_is_refused_in_one_line(adapter):
    model = REFUSED[adapter](tiny_model("llama")).eval()
    message = f"^{adapter} adapters are not supported: [^\n]*$"
    with pytest.raises(ValueError, match=message):
        sequence_logprobs(model, [PROMPTS[0]], [COMPLETIONS[0]])
    with pytest.raises(ValueError, match=message):
        generate_completions(model, PROMPTS, sampling(), num_samples=2)


def test_pi_base_of_a_retrained_adapter_is_trls_ref_adapter_in_evaluation_too():
    """Re-training an adapter (a PEFT model passed without `peft_config`): TRL's DPO keeps a frozen copy "ref" of it as
    the reference, and the trainers' pi_base is that copy. Evaluation's pi_base (`base_scoring_context`: the greedy
    evaluation callback, `trl-sharpen eval`'s helpers) disabled every adapter instead, scoring the raw base model."""
    from trl.trainer.utils import use_adapter

    from trl_sharpen.self_rewards import base_scoring_context

    prompts = [PROMPTS[i] for i in ROWS]
    model = peft.get_peft_model(tiny_model("llama"), lora())
    model.add_adapter("ref", lora())  # as TRL's DPOTrainer does: a copy of the adapter as it was given
    with torch.no_grad():
        parameters = dict(model.named_parameters())
        for name, parameter in parameters.items():
            if ".ref." in name:
                parameter.copy_(parameters[name.replace(".ref.", ".default.")])
            elif ".default." in name:  # the policy has trained since
                parameter.add_(torch.randn_like(parameter) * 0.5)
    model.eval()
    with use_adapter(model, "ref"):
        expected = own_logprobs(model, prompts, COMPLETIONS)
    with model.disable_adapter():
        raw_base = own_logprobs(model, prompts, COMPLETIONS)
    assert (expected - raw_base).abs().max() > 1e-2
    with base_scoring_context(model):
        got = sequence_logprobs(model, prompts, COMPLETIONS)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert model.active_adapter == "default"  # restored
