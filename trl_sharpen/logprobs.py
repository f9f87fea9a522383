"""Exact, memory-lean sequence log-probabilities: the self-reward r(y|x) = log pi(y|x) of Huang et al. (2025), Eq. 2.

`sequence_logprobs` never builds the float32 `(batch, length, vocab)` logits of a whole batch: it runs the model's
backbone one micro-batch at a time and projects through the LM head only the positions that predict a completion
token, a chunk of positions at a time, taking a log-softmax of each chunk in float32.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from collections.abc import Sequence

import torch
from accelerate.utils import extract_model_from_parallel, is_peft_model


logger = logging.getLogger(__name__)
TokenIds = torch.Tensor | Sequence[Sequence[int]]

# Float32 logits alive at a time while scoring: the positions projected through the LM head at once are
# `LOGITS_CHUNK_BYTES // (4 * vocab_size)`, so the bound holds at any vocabulary (1024 positions at 32k, 682 at
# SmolLM2's 49k, 128 at Gemma's 262k).
LOGITS_CHUNK_BYTES = 128 * 2**20


def unwrap_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The `*ForCausalLM` module inside DDP / DeepSpeed / PEFT wrappers (PEFT's LoRA layers stay in place).

    Prompt-learning adapters (prompt tuning, prefix tuning, p-tuning) are refused: they live in the PEFT wrapper, not
    in the causal LM, so scoring the causal LM would score pi_base, and peft's `generate` ignores a prefix-tuning
    cache."""
    model = extract_model_from_parallel(model)
    if is_peft_model(model):
        check_not_prompt_learning(model)
        model = model.get_base_model()
    return model


def check_not_prompt_learning(model: torch.nn.Module) -> None:
    """Refuse with one line a PEFT model whose policy is not the causal LM inside it (see `unwrap_causal_lm`):
    prompt learning (virtual tokens), and adapters that the PEFT wrapper's own forward steers, which calls of the causal
    LM skip: X-LoRA (a scaling pass picks the mixture), Poly (routing by `task_ids`), aLoRA (LoRA with
    `alora_invocation_tokens`: the wrapper finds the invocation and switches the adapter on after it; without it the
    layers run the base). Every other adapter type lives in the causal LM's layers and is scored exactly
    (tests/test_peft_types.py)."""
    model = extract_model_from_parallel(model)
    config = getattr(model, "active_peft_config", None) if is_peft_model(model) else None
    if config is None:
        return
    if config.is_prompt_learning:
        raise ValueError(
            f"{config.peft_type.value} adapters are not supported: the sampled and scored model would be pi_base, "
            "not the policy (the virtual tokens live outside the causal LM). Use LoRA (--use_peft with --lora_r) or "
            "full fine-tuning."
        )
    peft_type = getattr(config.peft_type, "value", str(config.peft_type))
    steered = peft_type in ("XLORA", "POLY") or bool(getattr(config, "alora_invocation_tokens", None))
    if steered:
        name = "aLoRA" if peft_type == "LORA" else peft_type
        raise ValueError(
            f"{name} adapters are not supported: the PEFT wrapper's own forward steers them, which sampling and "
            "scoring (run on the causal LM inside it) would skip, so they would sample and score another model than "
            "the policy. Use plain LoRA (--use_peft with --lora_r) or full fine-tuning."
        )


def cache_argument(module: torch.nn.Module) -> str:
    """The name a transformers `forward` (and `generate`) takes a KV cache by: `cache` since transformers 5.2x,
    `past_key_values` before (still accepted there, with a FutureWarning)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def supports_kv_cache_reuse(causal_lm: torch.nn.Module) -> bool:
    """Whether a prompt's KV cache may be computed once and reused for several continuations, judged by what the
    cache can do: a transformers model whose default cache is a `DynamicCache` made only of attention layers (keys and
    values per position, which `batch_select_indices` can repeat), outside ZeRO-3 (whose processes must run the same
    number of forwards; reuse makes that number depend on how many prompts repeat).

    Hybrid and linear-attention models (LFM2, Mamba, Qwen3-Next, Jamba, ...) keep a recurrent state instead and are
    left to the unshared paths. Passing this gate is necessary, not sufficient: each shared path is also proven
    against the unshared one once per model (`shared_scoring_is_exact`, and generation's `_shared_prefill_is_exact`).
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin
    from transformers.integrations import is_deepspeed_zero3_enabled

    supports = getattr(causal_lm, "_supports_default_dynamic_cache", None)
    if not callable(supports) or not supports() or is_deepspeed_zero3_enabled():
        return False
    try:
        layers = DynamicCache(config=causal_lm.config).layers
    except Exception:  # a config the cache cannot read: no reuse
        return False
    return bool(layers) and all(
        isinstance(layer, DynamicLayer)
        and not isinstance(layer, LinearAttentionCacheLayerMixin)  # Qwen3-Next's hybrid layers are DynamicLayers too
        and callable(getattr(layer, "batch_select_indices", None))
        for layer in layers
    )


# ----------------------------------------------------------------------------------- once-per-model exactness checks
# A check runs on a few tokens at the first use of a path, and its verdict is kept on the model object (keyed by the
# path and the parameter dtype), so later calls cost nothing.
_CHECKS_ATTRIBUTE = "_trl_sharpen_exactness_checks"
# Tolerance of a check, in nats or logits: float32 must agree to rounding; half precision rounds every matmul (the
# fast path and the model's own forward group them differently), which the looser bound allows for.
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}
HALF_PRECISION_CHECK_TOLERANCE = 5e-2


def check_tolerance(causal_lm: torch.nn.Module) -> float:
    return CHECK_TOLERANCE.get(_parameter_dtype(causal_lm), HALF_PRECISION_CHECK_TOLERANCE)


def _parameter_dtype(module: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


_checks_running = 0  # > 0 while a once-per-model check runs (its forwards are not the work being measured)


def running_a_check() -> bool:
    """Whether a once-per-model exactness check is running now: forward counters leave its passes out."""
    return _checks_running > 0


def is_partitioned(module: torch.nn.Module) -> bool:
    """Whether the weights are ZeRO-3 partitioned: every forward is then a collective that all processes must run."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled() or any(hasattr(p, "ds_id") for p in module.parameters())


def once_per_model(causal_lm: torch.nn.Module, name: str, check, *, when_partitioned):
    """`check()`'s verdict for `causal_lm`, computed at the first call and kept on the model (per dtype). The model
    runs in eval mode and without gradients meanwhile (dropout would make any comparison fail).

    Under ZeRO-3 the check does not run and the verdict is `when_partitioned`: a first use can come from one process
    alone (a batch whose prompts repeat on one rank only), and its extra forwards would leave the processes' gathers
    mismatched (a crash: "Is there a distributed collective mismatch"). Callers pass the conservative path."""
    checks = causal_lm.__dict__.setdefault(_CHECKS_ATTRIBUTE, {})
    key = (name, _parameter_dtype(causal_lm))
    if key not in checks and is_partitioned(causal_lm):
        checks[key] = when_partitioned
    if key not in checks:
        global _checks_running
        was_training = causal_lm.training
        causal_lm.eval()
        _checks_running += 1
        try:
            with torch.no_grad():
                checks[key] = check()
        finally:
            _checks_running -= 1
            causal_lm.train(was_training)
    return checks[key]


def check_token_ids(causal_lm: torch.nn.Module, rows: Sequence[int]) -> list[list[int]]:
    """A few ordinary token ids to run checks on: `rows` rows of the given lengths, avoiding ids 0-2 (often special)."""
    vocab = causal_lm.config.get_text_config().vocab_size
    return [[3 + (7 * row + 5 * i) % max(1, vocab - 3) for i in range(length)] for row, length in enumerate(rows)]


def _logit_transform(config):
    """Post-LM-head transforms some architectures apply inside `forward` (so a bare head call would miss them). This
    list is only a fast path: `verified_logit_transform` checks it against the model's own forward."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text_config, "model_type", "")
    scale = getattr(text_config, "logit_scale", None)  # Cohere
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)  # Falcon-H1
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        # HyperCLOVA X multiplies (MuP), Granite divides
        multiplies = model_type.startswith("hyperclovax")
        scale = text_config.logits_scaling if multiplies else 1.0 / text_config.logits_scaling
    softcap = None
    for name in ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap"):  # Gemma 2/3, RecurrentGemma,
        softcap = softcap or getattr(text_config, name, None)  # xLSTM

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return transform


def head_logits(head: torch.nn.Module, states: torch.Tensor, transform) -> torch.Tensor:
    """float32 `transform(head(states))`. A plain `nn.Linear` head with half-precision weights is applied in float32
    (as TRL's `cast_lm_head_to_fp32`), so scores keep their digits whatever the training dtype; any other head (LoRA
    on the head, quantized) runs as it is and its output is cast."""
    weight = getattr(head, "weight", None)
    if type(head) is torch.nn.Linear and weight.dtype in (torch.bfloat16, torch.float16) and weight.numel() > 0:
        bias = None if head.bias is None else head.bias.float()
        return transform(torch.nn.functional.linear(states.float(), weight.float(), bias))
    if type(head) is torch.nn.Linear and states.dtype != weight.dtype:
        states = states.to(weight.dtype)  # a float32 head (`_float32_head`) on half-precision states
    # Called as a module otherwise, so hooks run (ZeRO-3 gathers a partitioned head in one; its weight has numel 0)
    return transform(head(states).float())


def verified_logit_transform(causal_lm: torch.nn.Module):
    """The transform that, after the LM head, gives the model's own logits, or None when `_logit_transform` does not
    reproduce `model(x).logits` (an architecture with a head transform we do not know): callers then use the model's
    own forward. Checked once per model on a few tokens (`once_per_model`)."""
    transform = _logit_transform(causal_lm.config)

    def check():
        ids = torch.tensor(check_token_ids(causal_lm, [5]), device=_device_of(causal_lm))
        expected = causal_lm(input_ids=ids, use_cache=False).logits.float()
        try:
            hidden = causal_lm.base_model(input_ids=ids, use_cache=False).last_hidden_state
            got = head_logits(causal_lm.get_output_embeddings(), hidden, transform)
            error = (got - expected).abs().max().item()
        except Exception as exc:  # e.g. a backbone without `last_hidden_state`
            error = f"not computable ({type(exc).__name__})"
        if isinstance(error, float) and error <= check_tolerance(causal_lm) * max(1.0, expected.abs().max().item()):
            return True
        logger.warning(
            "%s: the LM head after the backbone does not give the model's own logits (difference %s); scoring with the "
            "model's forward (slower). If that forward was patched, check that it is this model's.",
            type(causal_lm).__name__, error if isinstance(error, str) else f"{error:.3g}",
        )  # fmt: skip
        return False

    return transform if once_per_model(causal_lm, "logit_transform", check, when_partitioned=False) else None


def _device_of(causal_lm: torch.nn.Module) -> torch.device:
    head = causal_lm.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return next(causal_lm.parameters()).device


def prefill_prompts(causal_lm: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """Run left-padded prompts through the backbone once, with a KV cache: returns the cache and each prompt's last
    hidden state (which predicts the first token after it). Positions count real tokens only, as `generate` counts
    them, so the left padding is invisible. Generation repeats the cache for N samples (`_prefilled_cache`), scoring
    for N completions (`_shared_prompt_logprobs`)."""
    from transformers import DynamicCache

    backbone = causal_lm.base_model
    cache = DynamicCache(config=causal_lm.config)
    hidden = backbone(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
        **{cache_argument(backbone): cache},
    ).last_hidden_state
    if cache.get_seq_length() != prompt_ids.size(1):  # never continue a prompt the cache does not hold
        raise RuntimeError(
            "The model did not fill its KV cache; pass share_prompts=False / share_prompt_prefill=False."
        )
    return cache, hidden[:, -1]


def pad_rows(
    rows: Sequence[Sequence[int]], pad_value: int = 0, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged token-id rows as a `(batch, longest)` long tensor padded on `side`, and its boolean mask."""
    rows = [list(row) for row in rows]
    width = max((len(row) for row in rows), default=0)
    out = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        out[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = True
    return out, mask


def _as_padded(ids: TokenIds, mask: torch.Tensor | None, pad_value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) as padded tensors; ragged lists become right-padded tensors with their mask."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 2:
            raise ValueError(f"Token ids must be a 2-D (batch, length) tensor, got shape {tuple(ids.shape)}.")
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        return ids.long(), mask.bool()
    return pad_rows(ids, pad_value)


def pack_prompt_completion(
    prompt_ids: TokenIds,
    completion_ids: TokenIds,
    prompt_mask: torch.Tensor | None = None,
    completion_mask: torch.Tensor | None = None,
    pad_token_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate prompt and completion per row with all padding moved to the right.

    Prompts may be left- or right-padded and completions right-padded (the layout `generate` returns); packing makes
    every row start at position 0, so no query row is fully masked and positions are the plain `arange`.

    Returns:
        `input_ids`, `attention_mask` and `completion_mask`, each `(batch, length)`.
    """
    prompt_ids, prompt_mask = _as_padded(prompt_ids, prompt_mask, pad_token_id)
    completion_ids, completion_mask = _as_padded(completion_ids, completion_mask, pad_token_id)
    if prompt_ids.size(0) != completion_ids.size(0):
        raise ValueError(
            f"Got {prompt_ids.size(0)} prompts but {completion_ids.size(0)} completions; pass one prompt per "
            "completion (repeat a prompt for its N samples)."
        )
    completion_ids = completion_ids.to(prompt_ids.device)
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    real = torch.cat([prompt_mask.to(prompt_ids.device), completion_mask.to(prompt_ids.device)], dim=1)
    is_completion = torch.cat([torch.zeros_like(prompt_mask), completion_mask], dim=1).to(prompt_ids.device)
    # A stable sort on "is padding" moves the real tokens left, in order.
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
    ids, real, is_completion = (t.gather(1, order) for t in (ids, real, is_completion))
    ids = ids.masked_fill(~real, pad_token_id)
    width = int(real.sum(dim=1).max().item()) if real.numel() else 0
    return ids[:, :width], real[:, :width].long(), is_completion[:, :width]


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module,
    prompt_ids: TokenIds,
    completion_ids: TokenIds,
    prompt_mask: torch.Tensor | None = None,
    completion_mask: torch.Tensor | None = None,
    micro_batch_size: int = 16,
    logits_chunk_tokens: int | None = None,
    share_prompts: bool = True,
) -> torch.Tensor:
    r"""Sequence log-probability of each completion given its prompt, summed over completion tokens only:

    $$\log \pi(y \mid x) = \sum_{t=1}^{|y|} \log \pi(y_t \mid x, y_{<t}),$$

    the maximum-likelihood self-reward of Huang et al. (2025), "Self-Improvement in Language Models: The Sharpening
    Mechanism", Eq. 2.

    Args:
        model: a causal LM, a PEFT model (call it inside `model.disable_adapter()` to score with the base), or a
            DDP / DeepSpeed wrapper of one. Runs without gradients.
        prompt_ids: `(batch, P)` tensor (left- or right-padded, see `prompt_mask`) or a list of token-id lists.
            Every prompt needs at least one token (the first completion token is predicted from the last prompt
            token).
        completion_ids: `(batch, C)` right-padded tensor or a list of token-id lists; an EOS token that ends a
            completion belongs to it and is scored once. With `pad == eos`, pass `completion_mask` (see
            `completion_mask_from_eos`) so that trailing pads are not counted as more EOS tokens.
        prompt_mask, completion_mask: 1 for real tokens. Default: every position of a tensor is real.
        micro_batch_size: sequences per backbone forward.
        logits_chunk_tokens: completion positions projected through the LM head at once (default: as many as
            fit in `LOGITS_CHUNK_BYTES` of float32 logits at the model's vocabulary size).
        share_prompts: when a prompt repeats (N samples of one prompt), run its tokens through the model once and
            score each completion from its KV cache (`_shared_prompt_logprobs`), where the model allows it.

    Returns:
        float32 tensor of shape `(batch,)` on the model's device; 0.0 for an empty completion.
    """
    causal_lm = unwrap_causal_lm(model)
    head = causal_lm.get_output_embeddings()
    transform = verified_logit_transform(causal_lm)  # None: the head alone misses what forward does; use forward
    # out_features, not weight.shape: a ZeRO-3 partitioned weight has shape (0,)
    vocab_size = getattr(head, "out_features", None) or causal_lm.config.get_text_config().vocab_size
    chunk_tokens = logits_chunk_tokens or max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size))
    device = _device_of(causal_lm)

    input_ids, attention_mask, is_completion = pack_prompt_completion(
        prompt_ids, completion_ids, prompt_mask, completion_mask
    )
    if input_ids.size(0) == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    starts_with_completion = is_completion[:, 0].bool() if input_ids.size(1) else torch.zeros(0, dtype=torch.bool)
    if starts_with_completion.any():
        row = int(starts_with_completion.nonzero()[0, 0])
        raise ValueError(
            f"Prompt {row + 1} (counting from 1) is empty: the first completion token needs at least one prompt token."
        )

    # Gradient checkpointing in training mode can make transformers drop the KV cache (use_cache=False; recent versions
    # only with gradients enabled): no sharing then
    checkpointing = causal_lm.training and any(
        getattr(m, "gradient_checkpointing", False) for m in causal_lm.modules()
    )
    if share_prompts and not checkpointing and transform is not None:
        prompt_rows, completion_rows = _real_rows(prompt_ids, prompt_mask), _real_rows(completion_ids, completion_mask)
        if len(set(map(tuple, prompt_rows))) < len(prompt_rows) and shared_scoring_is_exact(causal_lm):
            return _shared_prompt_logprobs(
                causal_lm, prompt_rows, completion_rows, micro_batch_size, chunk_tokens, transform, device
            )
    return _unshared_logprobs(
        causal_lm, input_ids, attention_mask, is_completion, micro_batch_size, chunk_tokens, transform, device
    )


def _unshared_logprobs(causal_lm, input_ids, attention_mask, is_completion, micro_batch_size, chunk_tokens,
                       transform, device) -> torch.Tensor:  # fmt: skip
    """`sequence_logprobs` of packed rows (`pack_prompt_completion`), a micro-batch of whole sequences per forward.
    With `transform` None the model's own forward gives the logits (all positions of a micro-batch at once)."""
    head = causal_lm.get_output_embeddings()
    lengths = attention_mask.sum(dim=1)
    # Longest first, so each micro-batch is trimmed to similar lengths and the first one shows the peak memory.
    order = torch.argsort(lengths, descending=True)
    result = torch.zeros(input_ids.size(0), dtype=torch.float32, device=device)
    for start in range(0, input_ids.size(0), micro_batch_size):
        rows = order[start : start + micro_batch_size]
        width = int(lengths[rows].max())
        ids = input_ids[rows, :width].to(device)
        mask = attention_mask[rows, :width].to(device)
        # Position t predicts token t+1: keep the positions whose next token is a completion token.
        targets_mask = is_completion[rows, 1:width].to(device).bool()
        targets = ids[:, 1:][targets_mask]
        if transform is None:
            logits = causal_lm(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][targets_mask]
            sums = _summed_token_logprobs(logits, targets, targets_mask, torch.nn.Identity(), _same, chunk_tokens)
        else:
            hidden = causal_lm.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            states = hidden[:, :-1][targets_mask]
            sums = _summed_token_logprobs(states, targets, targets_mask, head, transform, chunk_tokens)
        result[rows.to(device)] = sums
    return result


def _same(logits: torch.Tensor) -> torch.Tensor:
    return logits


def _summed_token_logprobs(states, targets, mask, head, transform, chunk_tokens) -> torch.Tensor:
    """Per row of `mask` (rows, positions), the sum of log softmax(transform(head(state)))[target] over its True
    positions, in float32 (`head_logits`); `states` and `targets` hold those positions in row-major order. The LM head
    runs `chunk_tokens` positions at a time, so float32 logits never exceed one chunk."""
    row_of_token = torch.arange(mask.size(0), device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    sums = torch.zeros(mask.size(0), dtype=torch.float32, device=mask.device)
    head = _float32_head(head)
    for start in range(0, targets.numel(), chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        logits = head_logits(head, states[piece], transform)
        token_logps = logits.gather(-1, targets[piece].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)
        sums.index_add_(0, row_of_token[piece], token_logps)
        del logits
    return sums


def _float32_head(head: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy of a half-precision plain `nn.Linear` head, made once per scoring call rather than per chunk
    (`head_logits` would cast the weight at every chunk); any other head is returned as it is."""
    weight = getattr(head, "weight", None)
    if type(head) is not torch.nn.Linear or weight.dtype not in (torch.bfloat16, torch.float16) or not weight.numel():
        return head
    copy_ = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    copy_.weight = torch.nn.Parameter(head.weight.detach().float(), requires_grad=False)
    if head.bias is not None:
        copy_.bias = torch.nn.Parameter(head.bias.detach().float(), requires_grad=False)
    return copy_


def _real_rows(ids: TokenIds, mask: torch.Tensor | None) -> list[list[int]]:
    """The real (unpadded) token ids of each row."""
    ids, mask = _as_padded(ids, mask)
    return [row[keep].tolist() for row, keep in zip(ids, mask.to(ids.device))]


def _shared_prompt_logprobs(
    causal_lm, prompt_rows, completion_rows, micro_batch_size, chunk_tokens, transform, device
):
    """`sequence_logprobs` when prompts repeat: each distinct prompt runs through the backbone once (left-padded, a
    micro-batch of prompts at a time), and its KV cache is repeated for the completions that follow it.

    Completion token j is predicted by the hidden state before it: the prompt's last position for j = 0, the
    completion's position j - 1 after. Positions continue from each prompt's real length, so left padding is
    invisible, as in `generate`. With N samples of a P-token prompt this runs P + N x C tokens instead of
    N x (P + C)."""
    backbone, head = causal_lm.base_model, causal_lm.get_output_embeddings()
    cache_name = cache_argument(backbone)
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, prompt in enumerate(prompt_rows):
        groups.setdefault(tuple(prompt), []).append(row)
    prompts = list(groups)
    largest_group = max(len(rows) for rows in groups.values())
    prompts_per_forward = max(1, micro_batch_size // largest_group)
    result = torch.zeros(len(prompt_rows), dtype=torch.float32, device=device)
    for start in range(0, len(prompts), prompts_per_forward):
        chunk = prompts[start : start + prompts_per_forward]
        prompt_ids, prompt_mask = pad_rows(chunk, side="left")
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.long().to(device)
        cache, last_prompt_state = prefill_prompts(causal_lm, prompt_ids, prompt_mask)
        rows = [(i, row) for i, prompt in enumerate(chunk) for row in groups[prompt]]
        for row_start in range(0, len(rows), micro_batch_size):
            part = rows[row_start : row_start + micro_batch_size]
            which = torch.tensor([i for i, _ in part], device=device)
            targets, target_mask = pad_rows([completion_rows[row] for _, row in part])
            targets, target_mask = targets.to(device), target_mask.to(device)
            states = last_prompt_state[which].unsqueeze(1)
            if targets.size(1) > 1:
                # The completion's last token predicts nothing we score: feed all but it
                row_cache = copy.deepcopy(cache)
                row_cache.batch_select_indices(which)
                completion_states = backbone(
                    input_ids=targets[:, :-1],
                    attention_mask=torch.cat([prompt_mask[which], target_mask[:, :-1].long()], dim=1),
                    position_ids=prompt_mask[which].sum(-1, keepdim=True)
                    + torch.arange(targets.size(1) - 1, device=device),
                    use_cache=True,
                    **{cache_name: row_cache},
                ).last_hidden_state
                states = torch.cat([states, completion_states], dim=1)
                del row_cache
            states = states[:, : targets.size(1)][target_mask]  # (an all-empty part has width 0)
            sums = _summed_token_logprobs(states, targets[target_mask], target_mask, head, transform, chunk_tokens)
            result[torch.tensor([row for _, row in part], device=device)] = sums
    return result


def shared_scoring_is_exact(causal_lm: torch.nn.Module) -> bool:
    """Whether `_shared_prompt_logprobs` gives what the unshared pass gives on this model: the cache gate
    (`supports_kv_cache_reuse`), then, once per model (`once_per_model`), both paths on two prompts of different
    lengths (so one is left-padded) with two completions each, within `check_tolerance`. A model whose cache or
    positions behave otherwise (MPT with a user cache drifted 0.25 nats over 8 tokens) is scored unshared."""
    if not supports_kv_cache_reuse(causal_lm):
        return False
    transform = verified_logit_transform(causal_lm)
    if transform is None:
        return False

    def check():
        prompts, completions = check_token_ids(causal_lm, [5, 2]), check_token_ids(causal_lm, [4, 3, 1, 4])[::-1]
        rows = [0, 0, 1, 1]
        prompt_rows = [prompts[i] for i in rows]
        device = _device_of(causal_lm)
        chunk = max(1, LOGITS_CHUNK_BYTES // (4 * causal_lm.config.get_text_config().vocab_size))
        try:
            shared = _shared_prompt_logprobs(causal_lm, prompt_rows, completions, 4, chunk, transform, device)
        except Exception:  # e.g. a cache layer that cannot be repeated: unshared
            return False
        packed = pack_prompt_completion(prompt_rows, completions)
        unshared = _unshared_logprobs(causal_lm, *packed, 4, chunk, transform, device)
        return (shared - unshared).abs().max().item() <= check_tolerance(causal_lm) * max(1.0, len(completions[0]))

    return once_per_model(causal_lm, "shared_scoring", check, when_partitioned=False)


def completion_mask_from_eos(completion_ids: torch.Tensor, eos_token_ids: int | Sequence[int]) -> torch.Tensor:
    """Mask of the real tokens of right-padded completions: everything up to and including the first EOS.

    Works when the pad token is the EOS token, where the padding alone cannot tell where a completion ends.
    """
    eos_ids = torch.tensor([eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids))
    is_eos = torch.isin(completion_ids, eos_ids.to(completion_ids.device))
    eos_before = is_eos.long().cumsum(dim=1) - is_eos.long()
    return eos_before == 0


def has_eos(completion_ids: torch.Tensor, eos_token_ids: int | Sequence[int]) -> torch.Tensor:
    eos_ids = torch.tensor([eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids))
    return torch.isin(completion_ids, eos_ids.to(completion_ids.device)).any(dim=1)


# ---------------------------------------------------------------------------------------- training LM head on CPU
# DPOTrainer computes the policy's per-token log-probs with TRL's fused LM head (`add_fused_lm_head`). Where the LM head
# lives decides which implementation is faster, and this is the one place that chooses:
# - Any accelerator (CUDA / XPU run it in Triton): TRL's fused kernel, untouched. It never materialises the logits and
#   is the fast path there. Also under DeepSpeed ZeRO-3, whose partitioned LM head TRL's forward gathers itself (and
#   every rank must take the same path).
# - CPU: TRL's kernel falls back to torch ops that score every position (prompt and padding too), recompute every
#   logits tile in the backward and fold the metrics with vocabulary-wide masks: about twice the cost of plain logits
#   (benchmarks/dpo_step_speed.py prints both). `_cpu_lm_head_outputs` instead projects only the completion positions,
#   a chunk at a time, through an ordinary autograd `log_softmax` (no recomputation), and derives the metrics from the
#   same tile without gradients. Its float32 logits of the completion tokens stay alive until the backward: on CPU
#   that is RAM, bounded by `CPU_LM_HEAD_MAX_BYTES` (beyond it the fused kernel runs, which keeps nothing).
CPU_LM_HEAD_MAX_BYTES = 2 * 2**30


def uses_cpu_lm_head(device: torch.device, num_tokens: int, vocab_size: int) -> bool:
    """Whether `add_cpu_lm_head`'s path scores `num_tokens` positions on `device` (else TRL's fused kernel)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return (
        device.type == "cpu"
        and 4 * num_tokens * vocab_size <= CPU_LM_HEAD_MAX_BYTES
        and not is_deepspeed_zero3_enabled()
    )


def _cpu_lm_head_outputs(hidden, head, targets, transform, outputs, chunk_tokens):
    """Per-token log-probs (with gradients) of `targets` under `transform(head(hidden))`, and the optional metrics of
    TRL's `FusedCausalLMOutput` (`entropy`, `log_sum_sq_probs`, `mean_logits`, `is_top1`; without gradients)."""
    pieces = {name: [] for name in ("log_probs", *outputs)}
    for start in range(0, targets.numel(), chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        logits = head_logits(head, hidden[piece], transform)
        log_probs = logits.log_softmax(dim=-1)
        pieces["log_probs"].append(log_probs.gather(-1, targets[piece].unsqueeze(-1)).squeeze(-1))
        with torch.no_grad():
            detached = log_probs.detach()
            if "entropy" in outputs or "log_sum_sq_probs" in outputs:
                probs = detached.exp()
            if "entropy" in outputs:
                pieces["entropy"].append(-(probs * detached).sum(dim=-1))
            if "log_sum_sq_probs" in outputs:
                pieces["log_sum_sq_probs"].append(probs.square().sum(dim=-1).log())
            if "mean_logits" in outputs:
                pieces["mean_logits"].append(logits.detach().mean(dim=-1))
            if "is_top1" in outputs:
                pieces["is_top1"].append(detached.argmax(dim=-1) == targets[piece])
        del logits
    return {name: torch.cat(values) for name, values in pieces.items() if values}


def _fused_lm_head_is_exact(model: torch.nn.Module, fused_forward) -> bool:
    """Whether TRL's fused LM head (`fused_forward`, installed by `add_fused_lm_head`) gives the log-probs of the
    model's own logits, on a few tokens (TRL keeps its own list of head transforms)."""

    def check():
        ids = torch.tensor(check_token_ids(model, [6]), device=_device_of(model))
        expected = fused_forward(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)[:, :-1]
        expected = expected.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        got = fused_forward(input_ids=ids, labels=ids, fused_lm_head=True).log_probs.float()
        return (got - expected).abs().max().item() <= check_tolerance(model) * max(1.0, expected.abs().max().item())

    try:
        return once_per_model(model, "fused_lm_head", check, when_partitioned=True)
    except Exception:  # a kernel that cannot run here (e.g. Triton without a GPU): judged where it runs, by TRL
        return True


def add_cpu_lm_head(model: torch.nn.Module, outputs: Sequence[str] = ("log_probs",)) -> None:
    """Route `model(..., labels=labels, fused_lm_head=True)` through `_cpu_lm_head_outputs` when the LM head is on the
    CPU (see the comment above `CPU_LM_HEAD_MAX_BYTES`), and on any device when TRL's kernel does not reproduce the
    model's own logits (checked once, here); elsewhere the call goes to the forward TRL's `add_fused_lm_head`
    installed, unchanged. Refuses a model neither reproduces. Call after `add_fused_lm_head(model, outputs=outputs)`, on the same
    module; returns the same `FusedCausalLMOutput`. Temperature 1 only (DPO's policy forward)."""
    import types

    from transformers.integrations import is_deepspeed_zero3_enabled
    from trl.trainer.utils import FusedCausalLMOutput

    fused_forward = model.forward
    # Checked now, before any training hook sees the checks' forwards. ZeRO-3 (the LM head is never on the CPU path
    # there) skips them and keeps TRL's forward.
    zero3 = is_deepspeed_zero3_enabled()
    transform = None if zero3 else verified_logit_transform(model)
    fused_exact = zero3 or _fused_lm_head_is_exact(model, fused_forward)
    if not fused_exact and transform is None:
        raise ValueError(
            f"{type(model).__name__}: neither TRL's fused LM head nor trl_sharpen's reproduces the model's own logits, "
            "so the policy's log-probs in training would be wrong. This architecture is not supported for DPO/XPO."
        )
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    outputs = tuple(name for name in outputs if name != "log_probs")

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        head = self.get_output_embeddings()
        vocab_size = getattr(head, "out_features", None) or text_config.vocab_size
        if not fused_lm_head or labels is None or shift_labels is not None or kwargs.get("output_router_logits"):
            use_cpu = False  # generation, context parallelism, MoE auxiliary loss: TRL's forward handles them
        else:
            # TRL's kernel where it is exact and faster; ours on any device where TRL's misses a head transform
            # (RecurrentGemma's, xLSTM's soft cap)
            num_tokens = int((labels[:, 1:] != -100).sum())
            use_cpu = not fused_exact or uses_cpu_lm_head(head.weight.device, num_tokens, vocab_size)
        if not use_cpu or transform is None:
            return fused_forward(
                *args,
                fused_lm_head=fused_lm_head,
                labels=labels,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        shifted = labels[:, 1:].to(head.weight.device)
        mask = shifted != -100
        chunk_tokens = max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size))
        per_token = _cpu_lm_head_outputs(
            hidden.to(head.weight.device)[mask], head, shifted[mask], transform, outputs, chunk_tokens
        )
        # `masked_scatter` keeps the output connected to the graph even when no label is valid (as TRL's does)
        per_token = {
            name: value.new_zeros(mask.shape).masked_scatter(mask, value) for name, value in per_token.items()
        }
        log_probs = per_token["log_probs"]
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(
            loss=loss,
            log_probs=log_probs,
            entropy=per_token.get("entropy"),
            log_sum_sq_probs=per_token.get("log_sum_sq_probs"),
            mean_logits=per_token.get("mean_logits"),
            is_top1=per_token.get("is_top1"),
            label_mask=mask,
        )

    model.forward = types.MethodType(functools.wraps(type(model).forward)(forward), model)
