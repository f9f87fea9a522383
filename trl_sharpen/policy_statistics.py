r"""Per-completion token statistics of a model's next-token distributions, for the label-free rewards of the recent
literature that read the *current policy* rather than pi_base:

- self-certainty (Intuitor, Zhao et al. 2025): per completion token, $\mathrm{logsumexp}(z) - \mathrm{mean}(z)$ of the
  logits z at temperature 1, i.e. KL(U || p) + log V; averaged over the completion's tokens;
- entropy (RENT, Prabhudesai et al. 2025): per completion token, $H(p) = -\sum_j p_j \log p_j$; averaged likewise.

Cost: one no-grad forward of the model per completion (micro-batched), with full-vocabulary logits built only for the
completion positions, a chunk of positions at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .logprobs import LOGITS_CHUNK_BYTES, pack_prompt_completion, unwrap_causal_lm, verified_logit_transform


TokenIds = torch.Tensor | Sequence[Sequence[int]]


@torch.no_grad()
def completion_token_statistics(
    model: torch.nn.Module, prompt_ids: TokenIds, completion_ids: TokenIds, micro_batch_size: int = 16
) -> dict[str, torch.Tensor]:
    """Mean self-certainty and mean entropy over each completion's tokens (float32, shape `(batch,)`, CPU; 0.0 for an
    empty completion), from the model's logits at temperature 1 (final-logit softcapping applied, as the model does)."""
    causal_lm = unwrap_causal_lm(model)
    backbone = causal_lm.base_model
    head = causal_lm.get_output_embeddings()
    transform = verified_logit_transform(causal_lm)  # checked against the model's own logits once per model
    if transform is None:
        raise ValueError(
            f"{type(causal_lm).__name__}: the LM head after the backbone does not reproduce the model's logits, so "
            "self-certainty and entropy cannot be computed from it; use a log-likelihood self-reward."
        )
    vocab_size = getattr(head, "out_features", None) or causal_lm.config.get_text_config().vocab_size
    chunk = max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size))
    device = next(causal_lm.parameters()).device

    input_ids, attention_mask, is_completion = pack_prompt_completion(prompt_ids, completion_ids)
    rows = input_ids.size(0)
    certainty, entropy = torch.zeros(rows), torch.zeros(rows)
    for start in range(0, rows, micro_batch_size):
        batch = slice(start, start + micro_batch_size)
        width = int(attention_mask[batch].sum(dim=1).max()) if rows else 0
        ids, mask = input_ids[batch, :width].to(device), attention_mask[batch, :width].to(device)
        hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        targets = is_completion[batch, 1:width].to(device).bool()  # position t predicts token t+1
        states = hidden[:, :-1][targets]
        per_token_certainty, per_token_entropy = [], []
        for offset in range(0, states.size(0), chunk):
            logits = transform(head(states[offset : offset + chunk]).float())
            log_z = torch.logsumexp(logits, dim=-1)
            per_token_certainty.append(log_z - logits.mean(dim=-1))
            log_p = logits - log_z.unsqueeze(-1)
            per_token_entropy.append(-(log_p.exp() * log_p).sum(dim=-1))
        counts = targets.sum(dim=1)
        owner = torch.repeat_interleave(torch.arange(targets.size(0), device=device), counts)
        for values, out in ((per_token_certainty, certainty), (per_token_entropy, entropy)):
            flat = torch.cat(values) if values else torch.zeros(0, device=device)
            sums = torch.zeros(targets.size(0), device=device).index_add_(0, owner, flat)
            out[batch] = (sums / counts.clamp(min=1)).cpu()
    return {"self_certainty": certainty, "entropy": entropy}
