"""`sequence_logprobs` against a naive full-logits reference, under every padding layout and batch split."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from trl_sharpen.generation import _can_share_prompt_prefill, build_generation_config, generate_completions
from trl_sharpen.logprobs import (
    completion_mask_from_eos,
    pack_prompt_completion,
    sequence_logprobs,
    shared_scoring_is_exact,
    verified_logit_transform,
)


def naive_logprobs(model, prompts, completions):
    """One unpadded sequence at a time, full float32 log-softmax over the vocabulary."""
    out = []
    for prompt, completion in zip(prompts, completions):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logps = model(input_ids=ids).logits.float().log_softmax(-1)[0]
        out.append(sum(logps[len(prompt) + t - 1, tok].item() for t, tok in enumerate(completion)))
    return torch.tensor(out)


@pytest.fixture
def samples(toy_tokenizer):
    prompts = [
        toy_tokenizer("Q : 3 + 5 = ?")["input_ids"],
        toy_tokenizer("Q : 1 + 2 + 3 + 4 + 5 = ?")["input_ids"],
        toy_tokenizer.apply_chat_template(
            [{"role": "user", "content": "9 + 9 = ?"}], add_generation_prompt=True, return_dict=True
        )["input_ids"],
        toy_tokenizer("Q : 7 + 0 + 2 = ?")["input_ids"],
    ]
    eos = toy_tokenizer.eos_token_id
    completions = [
        toy_tokenizer("3 + 5 = 8 . answer 8")["input_ids"] + [eos],
        toy_tokenizer("answer 42")["input_ids"] + [eos],
        toy_tokenizer("9 + 9 = 18 . answer")["input_ids"],  # truncated: no EOS
        [eos],
    ]
    return prompts, completions


def pad(rows, side, value=0):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


def test_matches_naive_reference_for_lists(toy_model, samples):
    prompts, completions = samples
    expected = naive_logprobs(toy_model, prompts, completions)
    got = sequence_logprobs(toy_model, prompts, completions)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got < 0).all()


@pytest.mark.parametrize("prompt_side", ["left", "right"])
def test_padding_side_does_not_change_the_result(toy_model, samples, prompt_side):
    prompts, completions = samples
    expected = naive_logprobs(toy_model, prompts, completions)
    prompt_ids, prompt_mask = pad(prompts, prompt_side, value=5)  # pad with a real token id: the mask must matter
    completion_ids, completion_mask = pad(completions, "right", value=5)
    got = sequence_logprobs(toy_model, prompt_ids, completion_ids, prompt_mask, completion_mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("micro_batch_size", [16, 2])
def test_repeated_prompts_are_scored_from_one_prompt_pass(toy_model, samples, micro_batch_size):
    """N samples of a prompt: the prompt runs through the model once and each completion is scored from its KV cache
    (including a one-token and an empty completion, left-padded prompts padded with a real token id, and groups split
    across micro-batches); the values are the naive ones."""
    prompts, completions = samples
    rows = [0, 1, 0, 2, 1, 0, 3, 0]  # prompt 0 four times, prompt 1 twice
    row_prompts, row_completions = [prompts[i] for i in rows], [completions[(i + j) % 4] for j, i in enumerate(rows)]
    row_completions[5] = []
    expected = naive_logprobs(toy_model, row_prompts, row_completions)
    prompt_ids, prompt_mask = pad(row_prompts, "left", value=5)
    completion_ids, completion_mask = pad([c or [5] for c in row_completions], "right", value=5)
    completion_mask[5] = 0
    shapes = {True: [], False: []}  # (rows, tokens) of each backbone forward
    assert shared_scoring_is_exact(toy_model)  # the once-per-model proof runs first, outside the count

    def score(share):
        hook = toy_model.model.register_forward_hook(
            lambda m, a, kw, o: shapes[share].append(tuple(kw["input_ids"].shape)), with_kwargs=True
        )
        try:
            return sequence_logprobs(
                toy_model, prompt_ids, completion_ids, prompt_mask, completion_mask,
                micro_batch_size=micro_batch_size, share_prompts=share,
            )  # fmt: skip
        finally:
            hook.remove()

    got, unshared = score(True), score(False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unshared, expected, atol=1e-5, rtol=1e-5)
    tokens = {share: sum(r * w for r, w in forwards) for share, forwards in shapes.items()}
    assert tokens[True] < 0.75 * tokens[False], shapes
    if micro_batch_size == 16:  # one forward of the 4 distinct prompts, then one of the 8 completions
        assert shapes[True] == [(4, max(map(len, prompts))), (8, max(map(len, completions)) - 1)]
    empty = sequence_logprobs(toy_model, [prompts[0]] * 2, [[], []], micro_batch_size=micro_batch_size)
    assert empty.tolist() == [0.0, 0.0]


def test_batch_split_invariance(toy_model, samples):
    prompts, completions = samples
    whole = sequence_logprobs(toy_model, prompts, completions, micro_batch_size=64, logits_chunk_tokens=4096)
    split = sequence_logprobs(toy_model, prompts, completions, micro_batch_size=1, logits_chunk_tokens=3)
    torch.testing.assert_close(whole, split, atol=1e-6, rtol=1e-6)
    # and one row alone gives the same value as inside a batch
    alone = sequence_logprobs(toy_model, prompts[1:2], completions[1:2])
    torch.testing.assert_close(alone[0], whole[1], atol=1e-6, rtol=1e-6)


def test_eos_counted_once_when_pad_is_eos(toy_model, samples, toy_tokenizer):
    prompts, completions = samples
    # as in generate's output, only completions that ended with EOS are followed by padding
    prompts, completions = [prompts[i] for i in (0, 1, 3)], [completions[i] for i in (0, 1, 3)]
    eos = toy_tokenizer.eos_token_id
    # right-pad with EOS, as generate does when pad == eos: only the first EOS belongs to the completion
    completion_ids, _ = pad(completions, "right", value=eos)
    completion_ids = torch.cat([completion_ids, torch.full((len(completions), 3), eos)], dim=1)
    mask = completion_mask_from_eos(completion_ids, eos)
    got = sequence_logprobs(toy_model, prompts, completion_ids, completion_mask=mask)
    torch.testing.assert_close(got, naive_logprobs(toy_model, prompts, completions), atol=1e-5, rtol=1e-5)
    assert mask.sum(1).tolist() == [len(c) for c in completions]


def test_empty_completion_scores_zero_and_empty_prompt_is_refused(toy_model, samples):
    prompts, completions = samples
    got = sequence_logprobs(toy_model, prompts[:2], [[], completions[1]])
    assert got[0].item() == 0.0 and got[1].item() < 0
    with pytest.raises(ValueError, match=r"Prompt 2 \(counting from 1\) is empty"):
        sequence_logprobs(toy_model, [prompts[0], []], completions[:2])


def test_peft_model_with_adapter_disabled_scores_as_the_base(toy_model, samples):
    prompts, completions = samples
    base = sequence_logprobs(toy_model, prompts, completions)
    peft_model = get_peft_model(
        toy_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapted = sequence_logprobs(peft_model, prompts, completions)
    assert not torch.allclose(adapted, base, atol=1e-4), "a non-zero LoRA adapter must change the scores"
    with peft_model.disable_adapter():
        disabled = sequence_logprobs(peft_model, prompts, completions)
    torch.testing.assert_close(disabled, base, atol=1e-6, rtol=1e-6)


def tiny_model(model_type: str, **extra):
    """A 2-layer, 32-wide model of `model_type` with a 97-token vocabulary, seeded weights."""
    config = AutoConfig.for_model(
        model_type,
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **extra,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    "model_type, extra",
    [
        ("llama", {"tie_word_embeddings": False}),
        ("qwen2", {}),
        ("gemma2", {"final_logit_softcapping": 5.0, "head_dim": 8}),  # logits soft-capped inside forward
        ("cohere", {"logit_scale": 0.5}),  # logits scaled inside forward
    ],
)
def test_architectures_match_their_own_forward(model_type, extra):
    model = tiny_model(model_type, **extra).eval()
    prompts = [[1, 5, 9, 4], [7, 3]]
    completions = [[10, 11, 12], [40, 41, 42, 43, 44]]
    torch.testing.assert_close(
        sequence_logprobs(model, prompts, completions),
        naive_logprobs(model, prompts, completions),
        atol=1e-5,
        rtol=1e-5,
    )


def test_pack_prompt_completion_moves_padding_right():
    prompt_ids = torch.tensor([[0, 0, 1, 2], [3, 4, 5, 6]])
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    completion_ids = torch.tensor([[7, 8, 0], [9, 0, 0]])
    completion_mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    ids, attention, is_completion = pack_prompt_completion(prompt_ids, completion_ids, prompt_mask, completion_mask)
    assert ids.tolist() == [[1, 2, 7, 8, 0], [3, 4, 5, 6, 9]]
    assert attention.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert is_completion.long().tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_generation_time_logprobs_equal_rescored_logprobs(toy_model, toy_tokenizer, temperature, top_k, top_p):
    prompts = [toy_tokenizer(f"Q : {a} + {b} + 3 = ?")["input_ids"] for a, b in [(1, 2), (4, 9), (0, 0)]]
    prompts.append(
        toy_tokenizer.apply_chat_template(
            [{"role": "user", "content": "5 + 5 = ?"}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
    )
    config = build_generation_config(
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        max_new_tokens=12,  # short enough that some samples are truncated
        pad_token_id=toy_tokenizer.pad_token_id,
        eos_token_id=toy_tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    samples = generate_completions(toy_model, prompts, config, num_samples=8, batch_size=12)
    assert len(samples) == 32 and any(samples.truncated) and not all(samples.truncated)
    rescored = sequence_logprobs(toy_model, [prompts[i] for i in samples.prompt_index], samples.completion_ids)
    torch.testing.assert_close(torch.tensor(samples.logprobs), rescored, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("with_lora", [False, True])
def test_shared_prompt_prefill_samples_what_generate_samples(toy_model, toy_tokenizer, with_lora):
    """Each distinct prompt's prefill runs once per batch and its KV cache is repeated for its samples: the seeded
    samples and their log-probabilities are those of `generate`'s own per-row prefill, including batches that cut
    through one prompt's samples (batch_size 5, 3 samples) and prompts of different lengths (left padding)."""
    if with_lora:
        toy_model = get_peft_model(
            toy_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
    prompts = [
        toy_tokenizer(text)["input_ids"] for text in ["Q : 3 + 5 = ?", "Q : 1 + 2 + 3 + 4 + 5 = ?", "Q : 7 = ?"]
    ]
    config = build_generation_config(
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=10,
        pad_token_id=toy_tokenizer.pad_token_id, eos_token_id=toy_tokenizer.eos_token_id,
    )  # fmt: skip
    assert _can_share_prompt_prefill(toy_model, config, None)  # its once-per-model proof runs here, outside the count
    prefill_rows = []  # (rows, width) of each forward that sees more than one token: the prompts' prefills
    backbone = toy_model.get_base_model().model if with_lora else toy_model.model
    hook = backbone.register_forward_hook(
        lambda m, a, kw, o: prefill_rows.append(tuple(kw["input_ids"].shape)) if kw["input_ids"].size(1) > 1 else None,
        with_kwargs=True,
    )
    runs = {}
    try:
        for share in (False, True):
            torch.manual_seed(0)
            runs[share] = generate_completions(
                toy_model, prompts, config, num_samples=3, batch_size=5, share_prompt_prefill=share
            )
    finally:
        hook.remove()
    assert runs[True].completion_ids == runs[False].completion_ids
    assert runs[True].truncated == runs[False].truncated
    torch.testing.assert_close(
        torch.tensor(runs[True].logprobs), torch.tensor(runs[False].logprobs), atol=1e-4, rtol=0
    )
    width = max(map(len, prompts))
    # generate's own prefill: every row of the batches (rows of prompts 0,0,0,1,1 then 1,2,2,2); shared: the distinct
    # prompts of each batch (0 and 1, then 1 and 2) over all but the last prompt token
    assert prefill_rows == [(5, width), (4, width), (2, width - 1), (2, width - 1)]


def test_default_chunking_follows_the_vocabulary(toy_model, samples, monkeypatch):
    """The default chunk holds LOGITS_CHUNK_BYTES of float32 logits whatever the vocabulary (128 positions at
    Gemma's 262k): forcing 3 positions per chunk gives the same values and projects 3 positions at a time."""
    import trl_sharpen.logprobs as logprobs

    prompts, completions = samples
    vocab = toy_model.config.vocab_size
    monkeypatch.setattr(logprobs, "LOGITS_CHUNK_BYTES", 4 * vocab * 3)
    assert verified_logit_transform(toy_model) is not None  # its once-per-model check runs here, outside the count
    widths = []
    hook = toy_model.get_output_embeddings().register_forward_hook(lambda m, i, o: widths.append(o.shape[0]))
    try:
        got = sequence_logprobs(toy_model, prompts, completions)
    finally:
        hook.remove()
    assert max(widths) == 3 and sum(widths) == sum(map(len, completions))
    torch.testing.assert_close(got, naive_logprobs(toy_model, prompts, completions), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "model_type, extra",
    [
        ("llama", {"tie_word_embeddings": False}),
        ("gemma2", {"final_logit_softcapping": 5.0, "head_dim": 8}),
        ("cohere", {"logit_scale": 0.5}),
    ],
)
def test_cpu_lm_head_equals_trls_fused_kernel(model_type, extra, monkeypatch):
    """DPO's policy forward on CPU (`add_cpu_lm_head`) gives TRL's fused kernel's log-probs, metrics and gradients."""
    from trl.trainer.utils import add_fused_lm_head

    import trl_sharpen.logprobs as logprobs

    model = tiny_model(model_type, **extra)
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    add_fused_lm_head(model, outputs=outputs)
    logprobs.add_cpu_lm_head(model, outputs)
    # Two pairs' rows as DPO collates them: prompt (labels -100), completion, right padding (-100)
    input_ids = torch.randint(1, 97, (4, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = attention_mask[3, 6:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100
    labels[2, :7] = -100

    def run(max_bytes):
        monkeypatch.setattr(logprobs, "CPU_LM_HEAD_MAX_BYTES", max_bytes)  # 0: TRL's fused kernel runs
        model.zero_grad()
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        out.log_probs.sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return out, grads

    ours, our_grads = run(2**30)
    fused, fused_grads = run(0)
    torch.testing.assert_close(ours.log_probs, fused.log_probs, atol=1e-5, rtol=1e-5)
    for name in ("entropy", "mean_logits", "log_sum_sq_probs"):
        # TRL's CPU fallback scores every position; both give 0 where the label is -100
        torch.testing.assert_close(getattr(ours, name), getattr(fused, name), atol=1e-5, rtol=1e-5, msg=name)
    assert torch.equal(ours.is_top1, fused.is_top1)
    torch.testing.assert_close(ours.loss, fused.loss, atol=1e-5, rtol=1e-5)
    assert len(our_grads) == len(fused_grads) > 0
    for ours_grad, fused_grad in zip(our_grads, fused_grads):
        torch.testing.assert_close(ours_grad, fused_grad, atol=1e-5, rtol=1e-4)
    # Generation (no `fused_lm_head`) still returns logits
    assert model(input_ids=input_ids).logits.shape == (4, 12, 97)


def test_repeated_prompts_under_gradient_checkpointing_in_training_mode(toy_model, samples):
    """With gradient checkpointing on in training mode, transformers may drop the KV cache (versions before 5.2x did
    even without gradients): scoring then takes the unshared path, and stays exact either way."""
    prompts, completions = samples
    rows = [0, 0, 1, 1]
    toy_model.gradient_checkpointing_enable()
    toy_model.train()
    got = sequence_logprobs(toy_model, [prompts[i] for i in rows], [completions[i] for i in rows])
    toy_model.eval()
    expected = naive_logprobs(toy_model, [prompts[i] for i in rows], [completions[i] for i in rows])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("adapter", ["prompt_tuning", "prefix_tuning", "p_tuning"])
def test_prompt_learning_adapters_are_refused_with_one_line(toy_model, toy_tokenizer, adapter):
    """Issue 18 case 3. A prompt-learning adapter lives in the PEFT wrapper, outside the causal LM: scoring the causal
    LM scored pi_base (prompt tuning: -68.04 recorded where the policy gives -64.87), and peft's `generate` ignores a
    prefix-tuning cache. Such models are refused where a sampler or trainer is built (`sampling_config`) and wherever
    they are sampled or scored, with one line naming the adapter and the fix."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    from trl_sharpen.generation import sampling_config

    config_class = {
        "prompt_tuning": PromptTuningConfig,
        "prefix_tuning": PrefixTuningConfig,
        "p_tuning": PromptEncoderConfig,
    }[adapter]
    policy = get_peft_model(toy_model, config_class(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    prompts = [toy_tokenizer("Q : 3 + 5 = ?")["input_ids"]]
    message = r"^[A-Z_]+ adapters are not supported: .* Use LoRA"
    with pytest.raises(ValueError, match=message):
        sampling_config(policy, toy_tokenizer, max_new_tokens=4)
    config = sampling_config(toy_model, toy_tokenizer, max_new_tokens=4)
    with pytest.raises(ValueError, match=message):
        generate_completions(policy, prompts, config, num_samples=2)
    with pytest.raises(ValueError, match=message):
        sequence_logprobs(policy, prompts, [[5, 6]])


def test_the_checkpoints_generation_settings_do_not_leak_into_sampling(toy_model, toy_tokenizer, caplog):
    """Issue 18 case 1. transformers 5.x fills every field a generation config leaves None from the checkpoint's
    generation_config: with repetition_penalty=3 and no_repeat_ngram_size=1 there, the toy model's samples went from
    '1 + 2 = 3 . answer 3' to 'answer 17' and the mean recorded log pi from -1.73 to -6.44. min_p (neutral value None)
    is set aside too. The samples are pi's, and one log line names the settings ignored."""
    from trl_sharpen.generation import sampling_config

    prompts = [toy_tokenizer(text)["input_ids"] for text in ["Q : 1 + 2 = ?", "Q : 4 + 9 = ?"]]

    def sample(model):
        config = sampling_config(model, toy_tokenizer, max_new_tokens=12)
        torch.manual_seed(0)
        return generate_completions(model, prompts, config, num_samples=4)

    clean = sample(toy_model)
    leaky = copy.deepcopy(toy_model)
    leaky.generation_config.update(repetition_penalty=3.0, no_repeat_ngram_size=1, min_p=0.5, top_k=2)
    with caplog.at_level("INFO", logger="trl_sharpen.generation"):
        got = sample(leaky)
    assert got.completion_ids == clean.completion_ids
    assert got.logprobs == clean.logprobs
    lines = [
        r.getMessage() for r in caplog.records if "ignoring the checkpoint's generation settings" in r.getMessage()
    ]
    logged = " ".join(lines)
    for setting in ("repetition_penalty=3.0", "no_repeat_ngram_size=1", "min_p=0.5", "top_k=2 (using 0)"):
        assert logged.count(setting) == 1, logged  # said once, however many generate calls ran
    assert leaky.generation_config.repetition_penalty == 3.0  # restored afterwards
    # Asked for explicitly, a setting is used
    config = sampling_config(toy_model, toy_tokenizer, max_new_tokens=12, repetition_penalty=3.0)
    torch.manual_seed(0)
    assert generate_completions(toy_model, prompts, config, num_samples=4).completion_ids != clean.completion_ids


def test_recorded_logprobs_need_one_new_token_per_forward(toy_model, toy_tokenizer):
    """Issue 18 case 4. A chunked prefill (asked for with prefill_chunk_size) runs several forwards before the first
    sampled token: the recorder used to keep the first C steps anyway (recorded [-28.74, -26.78] vs re-scored
    [-4.98, -4.99]). Now a forward that is not one new token makes generation re-score, and the values are exact."""
    prompts = [toy_tokenizer(text)["input_ids"] for text in ["Q : 1 + 2 + 3 + 4 = ?", "Q : 4 + 9 = ?"]]
    config = build_generation_config(
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8, prefill_chunk_size=3,
        pad_token_id=toy_tokenizer.pad_token_id, eos_token_id=toy_tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    samples = generate_completions(toy_model, prompts, config, num_samples=1)
    rescored = sequence_logprobs(toy_model, prompts, samples.completion_ids)
    torch.testing.assert_close(torch.tensor(samples.logprobs), rescored, atol=1e-4, rtol=0)


def test_half_precision_models_are_scored_with_a_float32_head(toy_model, samples):
    """Issue 18 case 8. In bf16 the LM head's logits were rounded to bf16 before the log-softmax. Now the head and the
    log-softmax run in float32 on the backbone's states (as TRL's cast_lm_head_to_fp32); what remains is the
    backbone's own rounding (README, Exactness; benchmarks/bf16_tolerance.py)."""
    prompts, completions = samples
    model = toy_model.to(torch.bfloat16)
    got = sequence_logprobs(model, prompts[:1], completions[:1], share_prompts=False)
    ids = torch.tensor([prompts[0] + completions[0]])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0, len(prompts[0]) - 1 : -1]
        logps = (hidden.float() @ model.lm_head.weight.float().T).log_softmax(-1)
    expected = logps.gather(-1, torch.tensor(completions[0]).unsqueeze(-1)).sum()
    torch.testing.assert_close(got, expected.reshape(1), atol=1e-4, rtol=0)


def test_recorder_drops_the_trailing_forwards_of_synced_generation(toy_model, toy_tokenizer):
    """Under `generate(synced_gpus=True)` (ZeRO-3), a process whose rows are done keeps running forwards on its last
    token until every process is done. The recorder keeps the real steps and drops those; without `synced` the extra
    steps mean "re-score" (None). Re-scoring on one process alone crashed ZeRO-3's gathers."""
    from types import SimpleNamespace

    from trl_sharpen.generation import _SampledTokenLogprobRecorder

    prompt = toy_tokenizer("Q : 1 + 2 = ?")["input_ids"]
    config = build_generation_config(
        do_sample=False,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=6,
        pad_token_id=0,
        eos_token_id=toy_tokenizer.eos_token_id,
    )
    sampled = generate_completions(toy_model, [prompt], config, num_samples=1, share_prompt_prefill=False)
    tokens = sampled.completion_ids[0]
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = toy_model(ids).logits
    recorder = _SampledTokenLogprobRecorder()
    start = len(prompt)

    def forward(position, new_ids):  # the hook as generate calls it: the input ids, then the logits they gave
        recorder(None, (), {"input_ids": new_ids}, SimpleNamespace(logits=logits[:, position - 1 : position]))

    forward(start, ids[:, :start])
    for t in range(1, len(tokens)):
        forward(start + t, ids[:, start + t - 1 : start + t])
    for _ in range(3):  # synced_gpus: the finished process goes on running its last token
        forward(len(prompt) + len(tokens), ids[:, -1:])
    completion = torch.tensor([tokens])
    assert recorder.per_token_logprobs(completion) is None
    got = recorder.per_token_logprobs(completion, synced=True).sum().item()
    assert got == pytest.approx(sampled.logprobs[0], abs=1e-4)
