"""A randomly initialised Llama with a real-sized vocabulary, for the speed and memory benchmarks."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from trl_sharpen.toy import TOY_MODEL_PATH


def save_random_llama(
    path: str, vocab_size: int, hidden_size: int, num_layers: int, max_position_embeddings: int
) -> str:
    """Save a random Llama (seed 0) and a word-level tokenizer of its vocabulary to `path`. The toy task's words come
    first with their toy ids, so the toy tokenizer and toy prompts work with it too; every variant a benchmark compares
    loads this one checkpoint the same way."""
    vocab = dict(AutoTokenizer.from_pretrained(TOY_MODEL_PATH).get_vocab())
    for i in range(vocab_size - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=vocab["<pad>"],
        eos_token_id=vocab["<eos>"],
        bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path
