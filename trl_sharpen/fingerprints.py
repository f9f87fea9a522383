"""Cheap identities of a model and a tokenizer, saved with generated data so that it is never reused with another.

Hashing every weight of a 7B model takes minutes, so the model fingerprint hashes its config and a few thousand
values from its first, middle and last parameters: enough to tell two checkpoints apart, fast on any size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json

import torch

from .logprobs import unwrap_causal_lm


_SAMPLED_VALUES = 4096
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache", "architectures"}


def _gathered(param: torch.nn.Parameter):
    if hasattr(param, "ds_id"):  # DeepSpeed ZeRO-3 partitioned parameter
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        # Already gathered by an enclosing context (e.g. `unwrap_model_for_generation` while BoNSFTTrainer samples):
        # DeepSpeed refuses nested `GatheredParameters` on the same parameter
        if param.ds_status == ZeroParamStatus.AVAILABLE:
            return contextlib.nullcontext()
        return deepspeed.zero.GatheredParameters([param])
    return contextlib.nullcontext()


def _sampled_values(named_parameters: list[tuple[str, torch.nn.Parameter]]):
    """(name, first few thousand values as float32 bytes) of the first, middle and last parameter."""
    params = named_parameters
    for name, param in (params[0], params[len(params) // 2], params[-1]):
        with _gathered(param):
            values = param.detach().reshape(-1)[:_SAMPLED_VALUES].to("cpu", torch.float32)
        yield name, values.numpy().tobytes()


def model_fingerprint(model: torch.nn.Module) -> str:
    causal_lm = unwrap_causal_lm(model)
    digest = hashlib.sha256()
    config = {k: v for k, v in causal_lm.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    # Base weights only: a freshly added LoRA adapter must not change the fingerprint of the model it adapts
    for name, values in _sampled_values([(n, p) for n, p in causal_lm.named_parameters() if "lora_" not in n]):
        digest.update(name.encode())
        digest.update(values)
    return digest.hexdigest()[:16]


def trainable_weights_digest(model: torch.nn.Module) -> str:
    """A short hash of sampled values of the trainable parameters (gathered under ZeRO-3): equal on all ranks when
    their replicas are in sync, different once training moved them."""
    digest = hashlib.sha256()
    for _, values in _sampled_values([(n, p) for n, p in model.named_parameters() if p.requires_grad]):
        digest.update(values)
    return digest.hexdigest()[:12]


def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer.all_special_tokens).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return digest.hexdigest()[:16]


def dataset_fingerprint(dataset) -> str:
    """A hash of a `datasets.Dataset`'s content: its features and every row. `Dataset._fingerprint` of a dataset read
    from a file is derived from the file's path and modification time, so an edit that keeps the mtime would go
    unseen; this one changes with any edited value."""
    digest = hashlib.sha256()
    digest.update(json.dumps(dataset.features.to_dict(), sort_keys=True, default=str).encode())
    for batch in dataset.with_format(None).iter(batch_size=4096):
        digest.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]
