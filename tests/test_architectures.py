"""Architecture sweep (issue 18): generation and scoring, shared and unshared, against each model's own `forward` and
`generate`, on tiny random models built from configs (2 layers, width 32, 97-token vocabulary: milliseconds each).

Every architecture is exact (<= 1e-4 nats in float32) or refused with one line; none may be silently wrong. Which
paths share the prompt pass is decided by the cache's capabilities and a once-per-model proof, not by a list: the
sweep pins the verdicts, so a transformers change that moves one shows up here by name.
"""

import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import trl_sharpen.logprobs as logprobs
from trl_sharpen.generation import (
    _can_share_prompt_prefill,
    _generation_padding,
    build_generation_config,
    generate_completions,
    left_pad,
)
from trl_sharpen.logprobs import sequence_logprobs, shared_scoring_is_exact, verified_logit_transform


ATTENTION = dict(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip
# model_type: (config keywords, whether the prompt pass is shared: attention-only caches are, recurrent states are not)
ARCHITECTURES = {
    "llama": (dict(ATTENTION, tie_word_embeddings=False), True),
    "qwen2": (dict(ATTENTION, use_sliding_window=True, sliding_window=4, max_window_layers=1), True),
    "gemma2": (dict(ATTENTION, head_dim=8, final_logit_softcapping=5.0, sliding_window=4), True),
    "gemma3_text": (dict(ATTENTION, head_dim=8, final_logit_softcapping=5.0, sliding_window=4), True),
    "mistral": (dict(ATTENTION, sliding_window=4), True),
    "phi": (ATTENTION, True),
    "gpt2": (dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64), True),
    "gpt_neox": (ATTENTION, True),
    # MPT's checkpoints say use_cache=False in their generation config (set aside now, see test_mpt_...)
    "mpt": (dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64), True),
    "hyperclovax": (dict(ATTENTION, logits_scaling=4.0), True),  # multiplies its logits (Granite divides)
    "mamba": (dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=4, expand=2), False),
    "lfm2": (dict(ATTENTION, layer_types=["conv", "full_attention"]), False),
    "qwen3_next": (
        dict(
            ATTENTION,
            layer_types=["linear_attention", "full_attention"],
            head_dim=8,
            linear_num_value_heads=2,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
        ),  # fmt: skip
        False,
    ),
    "recurrent_gemma": (
        dict(
            ATTENTION,
            lru_width=32,
            attention_window_size=8,
            logits_soft_cap=5.0,
            head_dim=8,
            block_types=["recurrent", "attention"],
        ),  # fmt: skip
        False,
    ),
    # Issue 18's held-out classes, probed: post-head scaling (Cohere's logit_scale, Granite's logits_scaling divides,
    # Falcon-H1's lm_head_multiplier and muP multipliers), hybrid caches (Jamba, Falcon-H1, Granite-4-H), MoE, MLA
    "qwen3": (dict(ATTENTION, head_dim=8), True),
    "qwen3_moe": (dict(ATTENTION, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16), True),
    "olmo2": (ATTENTION, True),
    "cohere": (dict(ATTENTION, logit_scale=0.25), True),
    "cohere2": (dict(ATTENTION, logit_scale=0.25, sliding_window=4), True),
    "granite": (
        dict(
            ATTENTION, logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3
        ),
        True,
    ),
    "starcoder2": (dict(ATTENTION, sliding_window=4), True),
    "falcon": (dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4), True),
    "bloom": (dict(vocab_size=97, hidden_size=32, n_layer=2, n_head=4), True),  # ALiBi
    "opt": (dict(ATTENTION, ffn_dim=64, word_embed_proj_dim=32), True),
    "phi3": (ATTENTION, True),
    "stablelm": (ATTENTION, True),
    "gptj": (dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4), True),
    "codegen": (dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_ctx=64, rotary_dim=4), True),
    "gemma": (dict(ATTENTION, head_dim=8), True),
    "gpt_bigcode": (dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64), True),
    "mixtral": (dict(ATTENTION, num_local_experts=4, num_experts_per_tok=2), True),
    "deepseek_v3": (
        dict(
            ATTENTION,
            num_key_value_heads=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            kv_lora_rank=8,
            q_lora_rank=8,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
        ),  # fmt: skip
        True,
    ),
    "glm4": (dict(ATTENTION, head_dim=8), True),
    "smollm3": (ATTENTION, True),
    "ernie4_5": (dict(ATTENTION, head_dim=8), True),
    "exaone4": (dict(ATTENTION, sliding_window=4), True),
    "jamba": (
        dict(
            ATTENTION,
            num_experts=2,
            num_experts_per_tok=1,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            mamba_d_state=4,
            mamba_expand=2,
            mamba_dt_rank=4,
        ),  # fmt: skip
        False,
    ),
    "falcon_h1": (
        dict(
            ATTENTION,
            head_dim=8,
            mamba_d_ssm=32,
            mamba_n_heads=4,
            mamba_d_head=8,
            mamba_n_groups=1,
            mamba_d_state=4,
            mamba_chunk_size=8,
            lm_head_multiplier=0.5,
            embedding_multiplier=2.0,
            mlp_multipliers=[0.5, 2.0],
            attention_out_multiplier=0.5,
            key_multiplier=0.7,
            ssm_multipliers=[1.5, 0.5, 2.0, 0.7, 1.2],
            ssm_out_multiplier=0.6,
            ssm_in_multiplier=0.9,
        ),  # fmt: skip
        False,
    ),
    "granitemoehybrid": (
        dict(
            ATTENTION,
            logits_scaling=4.0,
            num_local_experts=4,
            num_experts_per_tok=2,
            shared_intermediate_size=16,
            layer_types=["mamba", "attention"],
            mamba_d_state=4,
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_n_groups=1,
            mamba_chunk_size=8,
        ),  # fmt: skip
        False,
    ),
    # RWKV's batched generate in transformers 5.25 mixes the rows' states (alone, a row is exact): sampling refused
    "rwkv": (
        dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32, intermediate_size=64),
        False,
    ),
}
# model_type: the one line it is refused with (none today: every architecture above is exact)
REFUSED: dict[str, str] = {}
# model_type: the one line its sampling is refused with (its scoring is exact)
GENERATION_REFUSED = {"rwkv": "RwkvForCausalLM: transformers' generate does not sample from this model's own"}

PROMPTS = [[5, 9, 14, 20, 33, 41], [7, 40]]  # different lengths: the short one is left-padded in a batch
ROWS = [0, 0, 1, 1]
COMPLETIONS = [[10, 11, 12], [50, 51, 52, 53], [60], [70, 71, 72, 73, 74]]
EOS, PAD = 1, 0


def tiny_model(model_type: str, **changes):
    kwargs, _ = ARCHITECTURES[model_type]
    config = AutoConfig.for_model(
        model_type, **{**kwargs, **changes}, bos_token_id=2, eos_token_id=EOS, pad_token_id=PAD
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "falling back to the reference PyTorch implementation" of mamba kernels
        return AutoModelForCausalLM.from_config(config).eval()


def own_logprobs(model, prompts, completions):
    """log pi(y|x) from the model's own forward on each unpadded sequence alone (full float32 log-softmax)."""
    out = []
    for prompt, completion in zip(prompts, completions):
        with torch.no_grad():
            logps = model(input_ids=torch.tensor([prompt + completion])).logits.float().log_softmax(-1)[0]
        out.append(sum(logps[len(prompt) + t - 1, token].item() for t, token in enumerate(completion)))
    return torch.tensor(out)


def sampling(max_new_tokens=6, **extra):
    return build_generation_config(
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, pad_token_id=PAD,
        eos_token_id=EOS, **extra,
    )  # fmt: skip


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_generation_and_scoring_match_the_models_own(model_type):
    model = tiny_model(model_type)
    if model_type in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[model_type]):
            sequence_logprobs(model, [PROMPTS[i] for i in ROWS], COMPLETIONS)
        return
    # Scoring: repeated prompts, shared prompt pass and whole sequences
    prompts = [PROMPTS[i] for i in ROWS]
    expected = own_logprobs(model, prompts, COMPLETIONS)
    for share in (True, False):
        got = sequence_logprobs(model, prompts, COMPLETIONS, share_prompts=share)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0, msg=f"{model_type} scoring, share={share}")
    # Generation: the seeded samples are `generate`'s own on the same left-padded batch, and the log-probs recorded
    # while sampling are the model's own (where generate is not, sampling is refused in one line)
    config = sampling()
    if model_type in GENERATION_REFUSED:
        with pytest.raises(ValueError, match=GENERATION_REFUSED[model_type]):
            generate_completions(model, PROMPTS, config, num_samples=3)
        return
    assert _generation_padding(model, config, None)  # padding is invisible: prompts of any lengths share a batch
    input_ids, attention_mask = left_pad([PROMPTS[i] for i in (0, 0, 0, 1, 1, 1)], PAD)
    torch.manual_seed(0)
    own = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    own = own[:, input_ids.size(1) :].tolist()
    for share in (True, False):
        torch.manual_seed(0)
        samples = generate_completions(model, PROMPTS, config, num_samples=3, share_prompt_prefill=share)
        assert [row[: len(ids)] for row, ids in zip(own, samples.completion_ids)] == samples.completion_ids
        rescored = own_logprobs(model, [PROMPTS[i] for i in samples.prompt_index], samples.completion_ids)
        torch.testing.assert_close(
            torch.tensor(samples.logprobs), rescored, atol=1e-4, rtol=0, msg=f"{model_type} recorded, share={share}"
        )
    # Which paths share is the cache's and the proofs' verdict
    _, shares = ARCHITECTURES[model_type]
    assert verified_logit_transform(model) is not None
    assert shared_scoring_is_exact(model) == shares
    assert _can_share_prompt_prefill(model, config, None) == shares


@pytest.mark.parametrize(
    "model_type, wrong_by_old_list", [("hyperclovax", "divided by logits_scaling"), ("recurrent_gemma", "no soft cap")]
)
def test_a_head_transform_the_list_gets_wrong_falls_back_to_the_models_own_forward(
    model_type, wrong_by_old_list, monkeypatch
):
    """Issue 18 case 2. The post-head transforms are a hand-kept list: it divided HyperCLOVA X's logits by
    logits_scaling (-90.65 vs -15.25) and missed RecurrentGemma's logits_soft_cap (-100.3 vs -18.8). Now the list is
    checked against model(x).logits once per model; a model it gets wrong is scored through its own forward."""
    prompts = [PROMPTS[i] for i in ROWS]
    model = tiny_model(model_type)
    expected = own_logprobs(model, prompts, COMPLETIONS)
    torch.testing.assert_close(sequence_logprobs(model, prompts, COMPLETIONS), expected, atol=1e-4, rtol=0)
    # A list that has drifted again (here: no transform at all) is caught, and scoring stays exact
    monkeypatch.setattr(logprobs, "_logit_transform", lambda config: lambda logits: logits)
    model = tiny_model(model_type)
    assert verified_logit_transform(model) is None
    assert not shared_scoring_is_exact(model)
    for share in (True, False):
        got = sequence_logprobs(model, prompts, COMPLETIONS, share_prompts=share)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0, msg=wrong_by_old_list)


def test_a_shared_path_that_drifts_is_caught_by_its_proof(monkeypatch):
    """Issue 18 case 5. Sharing is proven against the unshared path once per model, at first use: a prompt prefill
    that puts the prompts one position late (as a model that treats a handed-in cache otherwise would) fails the
    proof, and both scoring and generation fall back to the unshared paths, exact."""
    real_prefill = logprobs.prefill_prompts

    def drifting_prefill(causal_lm, prompt_ids, prompt_mask):
        ids = torch.cat([prompt_ids[:, :1], prompt_ids], dim=1)
        return real_prefill(causal_lm, ids, torch.cat([prompt_mask[:, :1], prompt_mask], dim=1))

    model = tiny_model("llama")
    monkeypatch.setattr(logprobs, "prefill_prompts", drifting_prefill)
    monkeypatch.setattr("trl_sharpen.generation.prefill_prompts", drifting_prefill)
    assert not shared_scoring_is_exact(model)
    config = sampling()
    assert not _can_share_prompt_prefill(model, config, None)
    prompts = [PROMPTS[i] for i in ROWS]
    torch.testing.assert_close(
        sequence_logprobs(model, prompts, COMPLETIONS), own_logprobs(model, prompts, COMPLETIONS), atol=1e-4, rtol=0
    )
    samples = generate_completions(model, PROMPTS, config, num_samples=3)
    rescored = own_logprobs(model, [PROMPTS[i] for i in samples.prompt_index], samples.completion_ids)
    torch.testing.assert_close(torch.tensor(samples.logprobs), rescored, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cache_implementation", ["static", "dynamic"])
def test_a_checkpoints_cache_implementation_is_set_aside(cache_implementation):
    """Issue 18 case 5. A `cache_implementation` in the checkpoint's generation config made the shared prefill raise
    (the gate read only the config passed in). The checkpoint's setting is set aside like its other sampling settings:
    generation shares and stays exact."""
    model = tiny_model("llama")
    model.generation_config.cache_implementation = cache_implementation
    config = sampling()
    torch.manual_seed(0)
    samples = generate_completions(model, PROMPTS, config, num_samples=3)
    rescored = own_logprobs(model, [PROMPTS[i] for i in samples.prompt_index], samples.completion_ids)
    torch.testing.assert_close(torch.tensor(samples.logprobs), rescored, atol=1e-4, rtol=0)
    assert model.generation_config.cache_implementation == cache_implementation  # restored


def test_dpos_policy_log_probs_are_exact_where_trls_fused_head_misses_a_transform(monkeypatch):
    """TRL's fused LM head keeps its own list of head transforms and misses RecurrentGemma's logits_soft_cap: on a GPU
    (where TRL's kernel runs) DPO's policy log-probs were silently wrong. `add_cpu_lm_head` checks TRL's kernel once
    and routes such a model through its own exact path on every device."""
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_model("recurrent_gemma", logits_soft_cap=0.5)  # a cap that bites on a random model's small logits
    add_fused_lm_head(model)
    ids = torch.tensor([[5, 9, 14, 20, 33, 41, 7]])
    with torch.no_grad():
        own = model(input_ids=ids).logits.float().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        trls = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
    assert (trls - own).abs().max() > 0.05  # TRL's kernel alone misses the soft cap
    logprobs.add_cpu_lm_head(model)
    monkeypatch.setattr(logprobs, "uses_cpu_lm_head", lambda *args: False)  # as on a GPU
    with torch.no_grad():
        got = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
    torch.testing.assert_close(got, own, atol=1e-4, rtol=0)


def test_a_model_that_reads_left_padding_is_sampled_without_padding(monkeypatch):
    """A model that ignores the attention mask reads left padding as text, so its samples would not be from
    pi(.|x). Generation proves padding invisible once per model; where it is not, only prompts of one length share a
    `generate` call, and sampling stays exact (here the mask is dropped, as such a model drops it)."""
    import trl_sharpen.generation as generation

    real_left_pad = generation.left_pad

    def left_pad_read_as_text(rows, pad_token_id):
        ids, _ = real_left_pad(rows, pad_token_id)
        return ids, torch.ones_like(ids)

    monkeypatch.setattr(generation, "left_pad", left_pad_read_as_text)
    model = tiny_model("llama")
    config = sampling()
    assert not _generation_padding(model, config, None)
    samples = generate_completions(model, PROMPTS, config, num_samples=3)
    assert samples.prompt_index == [0, 0, 0, 1, 1, 1]  # prompt-major order kept across the length groups
    rescored = own_logprobs(model, [PROMPTS[i] for i in samples.prompt_index], samples.completion_ids)
    torch.testing.assert_close(torch.tensor(samples.logprobs), rescored, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="reads left padding as text"):
        generate_completions(model, PROMPTS, config, num_samples=3, synced_gpus=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_generation_proof_passes_half_precision_models(dtype):
    """Half precision rounds a cached step otherwise than a full forward (README, Exactness): the once-per-model
    generation proof must not mistake that for a generate that mixes rows or reads padding (it would refuse sampling,
    or split batches by prompt length). Checked on SmolLM2 and Gemma-3-270M in bf16 / fp16 too (by hand)."""
    model = tiny_model("llama").to(dtype)
    assert _generation_padding(model, sampling(), None)
    samples = generate_completions(model, PROMPTS, sampling(), num_samples=2)
    assert len(samples) == 4
