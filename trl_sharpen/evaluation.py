"""Evaluation of sharpening: greedy accuracy and the base log-likelihood of greedy outputs.

Sharpening should make greedy decoding do what Best-of-N did: the two numbers to watch after training are the greedy
accuracy and the mean log pi_base(y_greedy|x), the paper's "log-likelihood lift" (Huang et al. 2025, Table 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .answers import answers_match
from .data import ensure_pad_token, model_max_length, tokenize_prompts
from .generation import build_generation_config, generate_completions
from .logprobs import sequence_logprobs
from .self_rewards import base_scoring_context


AnswerChecker = Callable[[str, str], bool]


@dataclass
class GreedyEvaluation:
    accuracy: float
    # Mean log pi_base(y|x) of the greedy completions (None when no base model was given)
    mean_base_logprob: float | None
    completions: list[str]
    correct: list[bool]


@torch.no_grad()
def evaluate_greedy(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence,
    answers: Sequence[str],
    checker: AnswerChecker = answers_match,
    base_model: torch.nn.Module | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 64,
) -> GreedyEvaluation:
    """Greedy-decode every prompt, check it against its reference answer, and score it under the base model.

    Args:
        base_model: pi_base for the log-likelihood of the greedy outputs; a PEFT model is scored with its adapters
            disabled, so pass the LoRA policy itself to score under its base.
        checker: `checker(completion, reference) -> bool`. A checker that raises counts the sample as wrong.
    """
    ensure_pad_token(tokenizer)
    prompt_ids = tokenize_prompts(tokenizer, prompts, max_new_tokens, model_max_length(model))
    config = build_generation_config(
        do_sample=False,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id
        if getattr(model.generation_config, "eos_token_id", None) is None
        else model.generation_config.eos_token_id,
    )
    was_training = model.training
    model.eval()
    try:
        greedy = generate_completions(model, prompt_ids, config, batch_size=batch_size, record_logprobs=False)
    finally:
        model.train(was_training)
    texts = tokenizer.batch_decode(greedy.completion_ids, skip_special_tokens=True)
    correct = []
    for text, answer in zip(texts, answers, strict=True):
        try:
            correct.append(bool(checker(text, answer)))
        except Exception:
            correct.append(False)
    mean_base_logprob = None
    if base_model is not None:
        with base_scoring_context(base_model):
            logprobs = sequence_logprobs(base_model, prompt_ids, greedy.completion_ids)
        mean_base_logprob = logprobs.mean().item()
    return GreedyEvaluation(
        accuracy=sum(correct) / len(correct),
        mean_base_logprob=mean_base_logprob,
        completions=texts,
        correct=correct,
    )
