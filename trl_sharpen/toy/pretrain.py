"""Pretrain the bundled toy base model from scratch on CPU (a few minutes on 2 cores).

    python -m trl_sharpen.toy.pretrain                                    # rebuilds trl_sharpen/toy/base_model
    python -m trl_sharpen.toy.pretrain --task poor_coverage --output_dir outputs/toy_poor_coverage

The corpus is sampled on the fly from the task's data-generating process (`trl_sharpen.toy.task`), in both the plain
(`Q : 3 + 5 = ?`) and the chat-template format, never using a held-out test prompt. The result is saved with
`save_pretrained`, so it loads with `AutoModelForCausalLM.from_pretrained` like any Hub checkpoint.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .data import test_prompt_terms
from .task import CHAT_TEMPLATE, NUMBERS, SPECIAL_TOKENS, TASKS, WORDS, format_prompt, question


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: every number 0..99 and every symbol of the task is one token."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS + NUMBERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # `Whitespace` also splits at word/punctuation boundaries, so `"... = ?" + "3 + 5"` tokenizes like `"... = ? 3 + 5"`
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
        model_max_length=128,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer: PreTrainedTokenizerFast, hidden_size: int, num_layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def sample_batch(task, tokenizer, batch_size: int, rng: random.Random, held_out: set[tuple[int, ...]]):
    """Token ids and loss mask (completion and EOS only) for one batch of fresh samples."""
    sequences, masks = [], []
    for _ in range(batch_size):
        terms = task.sample_terms(rng)
        while tuple(terms) in held_out:
            terms = task.sample_terms(rng)
        completion = task.sample_completion(terms, rng)
        if rng.random() < 0.5:
            prompt_ids = tokenizer(format_prompt(terms))["input_ids"]
        else:
            messages = [{"role": "user", "content": question(terms)}]
            prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)[
                "input_ids"
            ]
        completion_ids = tokenizer(completion)["input_ids"] + [tokenizer.eos_token_id]
        sequences.append(prompt_ids + completion_ids)
        masks.append([0] * len(prompt_ids) + [1] * len(completion_ids))
    width = max(map(len, sequences))
    input_ids = torch.full((batch_size, width), tokenizer.pad_token_id)
    loss_mask = torch.zeros((batch_size, width), dtype=torch.bool)
    for i, (seq, mask) in enumerate(zip(sequences, masks)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        loss_mask[i, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    return input_ids, loss_mask


def pretrain(
    task_name: str = "default",
    output_dir: str | Path | None = None,
    steps: int = 3000,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    log_every: int = 100,
) -> Path:
    task = TASKS[task_name]
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size, num_layers)
    held_out = {tuple(terms) for terms in test_prompt_terms()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )
    num_params = sum(p.numel() for p in model.parameters())
    print(f"pretraining a {num_params / 1e3:.0f}k-parameter Llama on the '{task_name}' toy task for {steps} steps")
    model.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        input_ids, loss_mask = sample_batch(task, tokenizer, batch_size, rng, held_out)
        attention_mask = (input_ids != tokenizer.pad_token_id).long()
        labels = input_ids.masked_fill(~loss_mask, -100)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.0f}s")
    if output_dir is None:
        output_dir = Path(__file__).parent / ("base_model" if task_name == "default" else f"base_model_{task_name}")
    output_dir = Path(output_dir)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    print(f"saved to {output_dir}")
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="default", choices=sorted(TASKS))
    parser.add_argument("--output_dir", default=None, help="Defaults to the bundled model folder of the task.")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pretrain(
        task_name=args.task,
        output_dir=args.output_dir,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        seed=args.seed,
    )


if __name__ == "__main__":
    main()
