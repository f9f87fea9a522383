"""Sampling N completions per prompt, with the sampler's own sequence log-probabilities recorded for free.

When completions are sampled from the model that will score them (Best-of-N from pi_base, the paper's setting), the
score log pi(y|x) is already computed during generation: each decoding step produces the next-token logits. We record
`log_softmax(raw logits)[sampled token]` at every step, *before* any temperature / top-k / top-p warping or logits
processor, so the sum is the model's own log-probability and equals a separate scoring pass (`sequence_logprobs`).

A completion ends at the first EOS id (`eos_token_ids`: the model's, the tokenizer's and the chat template's
end-of-turn token) or, with `stop_strings` (base models prompted few-shot), at the token that completes the first stop
string in the completion's text. That token is kept whole, even when the stop string ends inside it ("\n\n" may come
as part of ".\n\n"): the completion is then exactly the tokens the model produced up to and including the stop, and
its log-probability, recorded or re-scored, covers the same tokens. A stop string is searched in the completion only,
never across the prompt boundary (unlike `generate(stop_strings=...)`, which also matches text overhanging the prompt).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from .logprobs import (
    CHECK_TOLERANCE,
    _parameter_dtype,
    cache_argument,
    check_token_ids,
    check_tolerance,
    completion_mask_from_eos,
    has_eos,
    is_partitioned,
    once_per_model,
    pad_rows,
    prefill_prompts,
    sequence_logprobs,
    supports_kv_cache_reuse,
    unwrap_causal_lm,
)


logger = logging.getLogger(__name__)


@dataclass
class Completions:
    """Completions in prompt-major order (prompt 0's samples, then prompt 1's, ...), without padding."""

    prompt_index: list[int]
    completion_ids: list[list[int]]
    # Sequence log-probability under the sampling model (None when not recorded)
    logprobs: list[float] | None
    # True when the completion hit `max_new_tokens` without an EOS token or a stop string
    truncated: list[bool]

    def __len__(self) -> int:
        return len(self.completion_ids)


class _SampledTokenLogprobRecorder:
    """Forward hook that keeps log pi(y_t | x, y_<t) of each sampled token during `generate`.

    The logits of step t are seen in forward t; the token sampled from them only arrives as the input of forward t+1
    (or, for the last token, in the returned sequences). So the hook keeps one step of log-probabilities pending and
    gathers it when the sampled token shows up: memory stays at one `(batch, vocab)` float32 tensor.

    Exact only when every forward after the first (the prefill) carries exactly one new token, the one sampled from
    the previous forward's logits; then there is one step per completion token. Anything else (a chunked prefill, a
    forward that brings several tokens) makes `per_token_logprobs` return None, and the caller re-scores.
    """

    def __init__(self):
        self.steps: list[torch.Tensor] = []
        self.pending: torch.Tensor | None = None
        self.failed = False

    def __call__(self, module, args, kwargs, output):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        logits = getattr(output, "logits", None)
        if input_ids is None or logits is None:
            self.failed = True  # e.g. generation from `inputs_embeds`: fall back to rescoring
            return
        if self.pending is not None:
            if input_ids.size(1) != 1:  # not one sampled token per forward (chunked prefill, ...): re-score
                self.failed = True
                return
            self.steps.append(self.pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.pending = logits[:, -1].float().log_softmax(dim=-1)

    def per_token_logprobs(self, completion_ids: torch.Tensor, synced: bool = False) -> torch.Tensor | None:
        """`(batch, C)` log-probabilities of the returned completion tokens, or None unless there was exactly one
        step per completion token. `synced`: `generate(synced_gpus=True)`, where a process whose rows are done keeps
        running forwards (on its last token) until every process is; those trailing steps come after the real ones
        and are dropped. The first of them gathers the last token from the last real forward, as `pending` would."""
        length = completion_ids.size(1)
        if self.failed or self.pending is None or len(self.steps) < length - 1:
            return None
        if len(self.steps) == length - 1:
            last = self.pending.gather(-1, completion_ids[:, -1:].to(self.pending.device)).squeeze(-1)
            return torch.stack([*self.steps, last], dim=1)
        return torch.stack(self.steps[:length], dim=1) if synced else None


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded for `generate`, with their (long) attention mask."""
    ids, mask = pad_rows(rows, pad_token_id, side="left")
    return ids, mask.long()


# Fields of `GenerationConfig` whose neutral value is not None, set explicitly: transformers 5.x fills every field left
# None from the checkpoint's `generation_config` (Qwen2.5-Instruct ships repetition_penalty 1.05), so a config handed
# to any `generate` (TRL's too) samples from pi. Neutral fields that are None (min_p, prefill_chunk_size,
# cache_implementation, suppress_tokens, ...) cannot be written down: `generate_completions` runs `generate` with the
# checkpoint's generation config set aside (`checkpoint_generation_defaults_off`).
NEUTRAL_GENERATION = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_new_tokens": 0,
    "num_beams": 1,
    "num_return_sequences": 1,
    "length_penalty": 1.0,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "use_cache": True,
}
# What is kept from the checkpoint's generation config: token ids, which say nothing about the distribution
_CHECKPOINT_FIELDS_KEPT = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
_OVERRIDES_LOGGED = "_trl_sharpen_generation_overrides_logged"


def build_generation_config(
    *,
    do_sample: bool,
    temperature: float,
    top_p: float,
    top_k: int,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | list[int],
    **extra,
) -> GenerationConfig:
    """A generation config built from scratch, every processing field neutral unless set in `extra` (see
    `NEUTRAL_GENERATION`), so that a checkpoint's own sampling defaults (a Hub model's `top_k=20` or
    `repetition_penalty=1.05`) do not silently change the distribution we sample from."""
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}
    return GenerationConfig(
        **{**NEUTRAL_GENERATION, **extra},
        do_sample=do_sample,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        **sampling,
    )


@contextlib.contextmanager
def checkpoint_generation_defaults_off(model: torch.nn.Module, generation_config: GenerationConfig):
    """Run `generate` with the checkpoint's generation config set aside (token ids kept), so that every field
    `generation_config` leaves None takes transformers' neutral default rather than the checkpoint's value (a
    `min_p`, `prefill_chunk_size` or `cache_implementation` in its generation_config.json). Logs, once per model and
    setting, which of the checkpoint's settings this overrides."""
    causal_lm = unwrap_causal_lm(model)
    original = getattr(causal_lm, "generation_config", None)
    if not isinstance(original, GenerationConfig):
        yield
        return
    neutral = GenerationConfig(**{name: getattr(original, name, None) for name in _CHECKPOINT_FIELDS_KEPT})
    _log_overridden_settings(causal_lm, original, generation_config)
    causal_lm.generation_config = neutral
    try:
        yield
    finally:
        causal_lm.generation_config = original


def _log_overridden_settings(causal_lm, checkpoint: GenerationConfig, ours: GenerationConfig) -> None:
    defaults = getattr(GenerationConfig, "_get_default_generation_params", dict)()  # transformers' own fallbacks
    logged = causal_lm.__dict__.setdefault(_OVERRIDES_LOGGED, set())
    overridden = {}
    for name, value in checkpoint.to_dict().items():
        if name.startswith("_") or name in _CHECKPOINT_FIELDS_KEPT or name == "transformers_version" or value is None:
            continue
        if name == "max_length" and ours.max_new_tokens is not None:
            continue  # max_new_tokens decides
        used = getattr(ours, name, None)
        used = defaults.get(name) if used is None else used
        if used is None and value is False:
            continue  # an unset flag is off: no difference to report
        if value != used and (name, repr(value)) not in logged:
            overridden[name] = (value, used)
            logged.add((name, repr(value)))
    if overridden:
        logger.info(
            "Sampling from the model's own distribution: ignoring the checkpoint's generation settings %s (set them "
            "explicitly, e.g. in generation_kwargs, to use them).",
            ", ".join(f"{name}={value!r} (using {used!r})" for name, (value, used) in sorted(overridden.items())),
        )


def end_of_turn_token_id(tokenizer) -> int | None:
    """The special token the tokenizer's chat template closes an assistant turn with (SmolLM2 and Qwen:
    `<|im_end|>`, Gemma: `<end_of_turn>`), or None without a chat template or without such a token."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "Zq7xMarker"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # a template that needs other roles or fields: no end-of-turn token to add
        return None
    if not isinstance(text, str) or marker not in text:
        return None
    after = tokenizer(text[text.rindex(marker) + len(marker) :], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return after[0] if after and after[0] in special else None


def eos_token_ids(model, tokenizer) -> int | list[int]:
    """The ids that end a completion: the model's generation config EOS ids (chat models often list several), the
    tokenizer's EOS, and the chat template's end-of-turn token, so that a chat model stops at the end of its turn even
    when its generation config names another EOS."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    for extra in (tokenizer.eos_token_id, end_of_turn_token_id(tokenizer)):
        if extra is not None and extra not in ids:
            ids.append(extra)
    if not ids:
        raise ValueError("Neither the model's generation config nor the tokenizer defines an EOS token.")
    return ids[0] if len(ids) == 1 else ids


class StopStringCriteria(StoppingCriteria):
    """Ends a row of `generate` at the first token whose completion text contains one of `stop_strings`, and
    remembers where (`stop_lengths`: completion tokens up to and including that token). Rows that reached an EOS id
    are not searched (what follows an EOS is padding)."""

    def __init__(self, tokenizer, stop_strings: Sequence[str], prompt_width: int, eos_token_ids, batch_size: int):
        self.tokenizer = tokenizer
        self.stop_strings = list(stop_strings)
        self.prompt_width = prompt_width
        self.eos_ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
        self.stop_lengths: list[int | None] = [None] * batch_size

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        completion = input_ids[:, self.prompt_width :]
        ended = has_eos(completion, self.eos_ids).tolist()
        rows = [i for i, length in enumerate(self.stop_lengths) if length is None and not ended[i]]
        if rows:
            # The whole completion is decoded (not a tail window): a tail may decode differently at its start
            texts = self.tokenizer.batch_decode(completion[rows].tolist(), skip_special_tokens=False)
            for row, text in zip(rows, texts):
                if any(stop in text for stop in self.stop_strings):
                    self.stop_lengths[row] = completion.size(1)
        return torch.tensor([length is not None for length in self.stop_lengths], device=input_ids.device)


def sampling_config(
    model,
    tokenizer,
    *,
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    **extra,
) -> GenerationConfig:
    """`build_generation_config` with the pad token from `tokenizer` and the EOS ids from `model` (see
    `eos_token_ids`). Defaults: plain sampling from the model's own distribution, as in the paper (App. A.4).
    Refuses a model that cannot be sampled and scored exactly (a prompt-learning adapter: `unwrap_causal_lm`), so that
    trainers and samplers, which build their config here, refuse it at construction."""
    unwrap_causal_lm(model)
    return build_generation_config(
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_token_ids(model, tokenizer),
        **extra,
    )


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Dropout off while generating or scoring (a model may arrive mid-training), restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def seeded(model: torch.nn.Module, seed: int):
    """Sample with `seed` without touching the caller's random state (a trainer's RNG must not depend on whether it
    generated): the CPU and CUDA generators are restored on exit."""
    devices = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _can_share_prompt_prefill(model, generation_config: GenerationConfig, synced_gpus: bool | None) -> bool:
    """Whether `_prefilled_cache` may be used: no step-synchronised generation across processes, the default dynamic
    cache (no other cache implementation asked for: the checkpoint's own is set aside by
    `checkpoint_generation_defaults_off`), a cache that can be repeated per sample (`supports_kv_cache_reuse`), and the
    shared prefill proven to sample what `generate`'s own does on this model (`_shared_prefill_is_exact`)."""
    if synced_gpus or generation_config.cache_implementation is not None or generation_config.use_cache is False:
        return False
    if generation_config.prefill_chunk_size is not None:
        return False  # the user asked for chunked prefill: leave the prefill to `generate`
    causal_lm = unwrap_causal_lm(model)
    return supports_kv_cache_reuse(causal_lm) and _shared_prefill_is_exact(model, generation_config)


_PROVING = "_trl_sharpen_proving_shared_prefill"


def _proof_config(generation_config: GenerationConfig) -> GenerationConfig:
    """What the once-per-model generation proofs sample with: greedy, 3 tokens, the run's pad and EOS ids."""
    return build_generation_config(
        do_sample=False, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=3,
        pad_token_id=generation_config.pad_token_id if generation_config.pad_token_id is not None else 0,
        eos_token_id=generation_config.eos_token_id,
    )  # fmt: skip


def _shared_prefill_is_exact(model, generation_config: GenerationConfig) -> bool:
    """Once per model (`once_per_model`): greedy 3-token completions of two prompts of different lengths (one
    left-padded), 2 samples each, with and without the shared prefill, give the same tokens and recorded log-probs
    within `check_tolerance`. A model whose forward treats a handed-in cache otherwise is sampled unshared."""
    causal_lm = unwrap_causal_lm(model)
    if causal_lm.__dict__.get(_PROVING):  # the proof's own shared run
        return True
    config = _proof_config(generation_config)
    prompts = check_token_ids(causal_lm, [5, 3])

    def check():
        causal_lm.__dict__[_PROVING] = True
        try:
            runs = [
                generate_completions(model, prompts, config, num_samples=2, share_prompt_prefill=share)
                for share in (False, True)
            ]
        except Exception:  # e.g. a cache the model's forward does not take: unshared
            return False
        finally:
            causal_lm.__dict__.pop(_PROVING, None)
        error = max(abs(a - b) for a, b in zip(runs[0].logprobs, runs[1].logprobs))
        same_tokens = runs[0].completion_ids == runs[1].completion_ids
        return same_tokens and error <= check_tolerance(causal_lm) * config.max_new_tokens

    return once_per_model(causal_lm, "shared_prefill", check, when_partitioned=False)


_PROVING_GENERATION = "_trl_sharpen_proving_generation"
# Half precision: `_generation_padding` allows this many times `check_tolerance`. Rounding alone reached 0.16 nats
# over its 3 greedy tokens on Gemma-3-270M in bf16 (0.15 allowed); there the proof catches gross errors only (nats:
# padding read as text, a generate that mixes rows), not subtle ones.
HALF_PRECISION_PROOF_FACTOR = 10


def _generation_padding(model, generation_config: GenerationConfig, synced_gpus: bool | None) -> bool:
    """Whether prompts of different lengths may share a `generate` call (left-padded), proven once per model
    (`once_per_model`) on greedy 3-token completions of a 2-token prompt, 2 rows per prompt (as sampling runs):

    - its recorded log-probs must equal the model's own forward on prompt + completion (`sequence_logprobs`, within
      `check_tolerance`); else transformers' `generate` does not sample from this model's own distribution (RWKV in
      transformers 5.25, whose batched generation mixes the rows' states: 0.06 nats off over 3 greedy tokens, 1.4
      over 6 sampled) and sampling is refused with one line (ValueError);
    - left-padded beside a 6-token prompt, its recorded log-probs must still be those of the forward on the unpadded
      prompt: then padding is invisible (True); else the model reads padding as text, and `generate_completions`
      batches only prompts of one length (False)."""
    causal_lm = unwrap_causal_lm(model)
    if causal_lm.__dict__.get(_PROVING_GENERATION):  # the proof's own runs
        return True
    config = _proof_config(generation_config)
    long, short = check_token_ids(causal_lm, [6, 2])
    tolerance = check_tolerance(causal_lm) * config.max_new_tokens
    if _parameter_dtype(causal_lm) not in CHECK_TOLERANCE:
        tolerance *= HALF_PRECISION_PROOF_FACTOR

    def sample(prompts):  # 2 rows per prompt, as sampling runs (RWKV's state mixes the rows of a batch)
        return generate_completions(
            model, prompts, config, num_samples=2, share_prompt_prefill=False, synced_gpus=synced_gpus
        )

    def check():
        causal_lm.__dict__[_PROVING_GENERATION] = True
        try:
            padded, alone = sample([long, short]), sample([short])
        finally:
            causal_lm.__dict__.pop(_PROVING_GENERATION, None)

        def error(samples):  # recorded vs the model's own forward on the short prompt, unpadded
            rows = samples.completion_ids[-2:]
            rescored = sequence_logprobs(model, [short, short], rows, share_prompts=False).tolist()
            return max(abs(a - b) for a, b in zip(samples.logprobs[-2:], rescored))

        alone_error = error(alone)
        if alone_error > tolerance:
            return f"{alone_error:.3g}"
        return "padded" if error(padded) <= tolerance else "unpadded"

    # Under ZeRO-3 the proof cannot run in step on every process (see `once_per_model`): padding is taken as invisible,
    # as for every architecture before the proof existed; the README says the proof runs on one process only
    verdict = once_per_model(causal_lm, "generation", check, when_partitioned="padded")
    if verdict not in ("padded", "unpadded"):
        raise ValueError(
            f"{type(causal_lm).__name__}: transformers' generate does not sample from this model's own distribution "
            f"(log-probs of its greedy tokens differ from the model's forward by {verdict} nats), so samples would not "
            "come from pi. This architecture is not supported for sampling (scoring is)."
        )
    return verdict == "padded"


def _generation_batches(prompt_lengths: Sequence[int], batch_size: int, padding_ok: bool) -> list[list[int]]:
    """Row positions per `generate` call: consecutive runs of `batch_size`, or, where left padding is not invisible
    to the model (`_generation_padding`), runs of rows whose prompts have one length."""
    positions = list(range(len(prompt_lengths)))
    groups = [positions]
    if not padding_ok:
        by_length: dict[int, list[int]] = {}
        for position, length in zip(positions, prompt_lengths):
            by_length.setdefault(length, []).append(position)
        groups = list(by_length.values())
    return [group[start : start + batch_size] for group in groups for start in range(0, len(group), batch_size)]


def _prefilled_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_rows: Sequence[int]):
    """The KV cache of every prompt but its last token, computed once per distinct prompt and repeated for its
    samples.

    `generate(num_return_sequences=N)` (or N copies of a prompt) runs the prompt's prefill N times; with few-shot
    prompts on a CPU that prefill is most of the sampling time. Given a cache that covers all but the last prompt
    token, `generate` only runs that token and then decodes, exactly as it would after its own prefill (the same
    positions: left padding counts as in `generate`). Returns None when the batch has no repeated prompt.
    """
    distinct = list(dict.fromkeys(batch_rows))
    if len(distinct) == len(batch_rows) or input_ids.size(1) < 2:
        return None
    first = [batch_rows.index(i) for i in distinct]
    cache, _ = prefill_prompts(unwrap_causal_lm(model), input_ids[first, :-1], attention_mask[first, :-1])
    cache.batch_select_indices(torch.tensor([distinct.index(i) for i in batch_rows], device=input_ids.device))
    return cache


@torch.no_grad()
def generate_completions(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    generation_config: GenerationConfig,
    num_samples: int = 1,
    batch_size: int = 64,
    record_logprobs: bool = True,
    synced_gpus: bool | None = None,
    progress=None,
    tokenizer=None,
    stop_strings: Sequence[str] | None = None,
    share_prompt_prefill: bool = True,
) -> Completions:
    """Generate `num_samples` completions for each prompt, `batch_size` sequences per `generate` call.

    Args:
        model: the model to sample from (unwrapped; a PEFT model inside `disable_adapter()` samples from the base).
        prompt_ids: token ids of each prompt, unpadded.
        generation_config: see `build_generation_config` (its `stop_strings`, if any, are used as `stop_strings`).
        tokenizer: decodes completions to find stop strings (needed only with stop strings).
        stop_strings: end each completion at the token that completes the first of these strings in its text
            (see the module docstring); such a completion is not truncated.
        record_logprobs: record log pi(y|x) of each completion under `model` from the generation step itself.
        synced_gpus: forwarded to `generate`; pass False when ZeRO-3 parameters are already gathered.
        share_prompt_prefill: run each distinct prompt's prefill once per batch and repeat its KV cache for the
            prompt's samples (see `_prefilled_cache`), where the model supports it. False: `generate`'s own prefill
            of every row (the benchmarks' baseline).
        progress: optional tqdm bar, advanced by the number of completions produced.
    """
    eos_ids = generation_config.eos_token_id
    pad_id = generation_config.pad_token_id
    if stop_strings is None:
        stop_strings = getattr(generation_config, "stop_strings", None)
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
    if stop_strings:
        if tokenizer is None:
            raise ValueError("Stop strings need the tokenizer to read the completions: pass tokenizer=... as well.")
        # Our criterion replaces `generate`'s own, which would also match text overhanging the prompt
        generation_config = copy.copy(generation_config)
        generation_config.stop_strings = None
    rows = [i for i in range(len(prompt_ids)) for _ in range(num_samples)]
    device = next(unwrap_causal_lm(model).parameters()).device
    padding_ok = _generation_padding(model, generation_config, synced_gpus)  # (refuses a model generate gets wrong)
    share_prompt_prefill = (
        share_prompt_prefill and num_samples > 1 and _can_share_prompt_prefill(model, generation_config, synced_gpus)
    )
    lengths_of_rows = [len(prompt_ids[i]) for i in rows]
    if not padding_ok and synced_gpus and len(set(lengths_of_rows)) > 1:
        raise ValueError(
            f"{type(unwrap_causal_lm(model)).__name__} reads left padding as text (it ignores the attention mask), "
            "so prompts of different lengths are generated in separate batches, which step-synchronised generation "
            "across processes (ZeRO-3) cannot do. Use prompts of one length, or train without ZeRO-3."
        )
    n = len(rows)
    out = Completions(
        prompt_index=rows,
        completion_ids=[None] * n,
        logprobs=[None] * n if record_logprobs else None,
        truncated=[None] * n,
    )
    # Under synced generation (ZeRO-3) a finished process runs extra forwards; re-scoring on one process alone would
    # leave the gathers mismatched, so the recorder expects those steps
    synced = bool(synced_gpus) or (synced_gpus is None and is_partitioned(unwrap_causal_lm(model)))
    for batch in _generation_batches(lengths_of_rows, batch_size, padding_ok):
        batch_rows = [rows[position] for position in batch]
        input_ids, attention_mask = left_pad([prompt_ids[i] for i in batch_rows], pad_id)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        # Before the recorder's hook is registered: the prefill's logits are not a sampling step
        cache = _prefilled_cache(model, input_ids, attention_mask, batch_rows) if share_prompt_prefill else None
        recorder = _SampledTokenLogprobRecorder()
        stops = (
            StopStringCriteria(tokenizer, stop_strings, input_ids.size(1), eos_ids, len(batch_rows))
            if stop_strings
            else None
        )
        handle = unwrap_causal_lm(model).register_forward_hook(recorder, with_kwargs=True) if record_logprobs else None
        try:
            with checkpoint_generation_defaults_off(model, generation_config):
                sequences = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=generation_config,
                    stopping_criteria=StoppingCriteriaList([stops] if stops else []),
                    synced_gpus=synced_gpus,
                    **({cache_argument(unwrap_causal_lm(model)): cache} if cache is not None else {}),
                )
        finally:
            if handle is not None:
                handle.remove()
        completion_ids = sequences[:, input_ids.size(1) :]
        completion_mask = completion_mask_from_eos(completion_ids, eos_ids)
        truncated = ~has_eos(completion_ids, eos_ids)
        if stops is not None:
            # A row stopped by a string ends with the token that completed it; after it comes padding (which, with
            # pad == EOS, would otherwise read as an EOS) and it is not truncated
            limit = torch.tensor([n if n is not None else completion_ids.size(1) for n in stops.stop_lengths])
            positions = torch.arange(completion_ids.size(1)).unsqueeze(0)
            completion_mask = completion_mask & (positions < limit.unsqueeze(1)).to(completion_mask.device)
            stopped = torch.tensor([n is not None for n in stops.stop_lengths], device=truncated.device)
            truncated = truncated & ~stopped
        if record_logprobs:
            per_token = recorder.per_token_logprobs(completion_ids, synced=synced)
            if per_token is None:
                # generation did not expose input ids and logits (e.g. `inputs_embeds`): score separately
                seq_logprobs = sequence_logprobs(model, input_ids, completion_ids, attention_mask, completion_mask)
            else:
                seq_logprobs = (per_token * completion_mask.to(per_token.device)).sum(dim=1)
            for position, value in zip(batch, seq_logprobs.tolist()):
                out.logprobs[position] = value
        lengths = completion_mask.sum(dim=1).tolist()
        for position, row, length, cut in zip(batch, completion_ids.tolist(), lengths, truncated.tolist()):
            out.completion_ids[position], out.truncated[position] = row[:length], cut
        if progress is not None:
            progress.update(len(batch_rows))
    return out
