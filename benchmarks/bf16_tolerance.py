"""How far bf16 sampling and scoring are from float32 (issue 18 case 8): exactness is promised in float32 only.

    python benchmarks/bf16_tolerance.py                      # SmolLM2-135M-Instruct (real-model package), ~1 min
    python benchmarks/bf16_tolerance.py --model toy          # the bundled toy model, seconds

Samples `--num_samples` completions of 4 prompts from the bf16 model (seeded, with and without the shared prompt
prefill), then prints: how many samples the shared prefill reproduces, recorded vs re-scored log-probs (both bf16),
and re-scored bf16 vs the float32 model on the same samples (per sequence and per token).
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_sharpen.generation import generate_completions, sampling_config
from trl_sharpen.logprobs import sequence_logprobs


PROMPTS = {
    "toy": ["Q : 1 + 2 = ?", "Q : 4 + 9 + 3 = ?", "Q : 7 + 7 = ?", "Q : 2 + 8 + 1 + 5 = ?"],
    "real": [
        "Question: What is 12 + 30?\nAnswer:",
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time,",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="'toy', a real-model short name or a path")
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.model == "toy":
        from trl_sharpen.toy import TOY_MODEL_PATH as path
    else:
        from trl_sharpen.real_models import resolve_model_name_or_path

        path = resolve_model_name_or_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    texts = PROMPTS["toy" if args.model == "toy" else "real"]
    prompts = [tokenizer(text)["input_ids"] for text in texts]
    config = sampling_config(bf16, tokenizer, max_new_tokens=args.max_new_tokens)
    runs = {}
    for share in (False, True):
        torch.manual_seed(0)
        runs[share] = generate_completions(
            bf16, prompts, config, num_samples=args.num_samples, share_prompt_prefill=share
        )
    samples = runs[False]
    rows = [prompts[i] for i in samples.prompt_index]
    recorded = torch.tensor(samples.logprobs)
    rescored = sequence_logprobs(bf16, rows, samples.completion_ids)
    exact = sequence_logprobs(fp32, rows, samples.completion_ids)
    lengths = torch.tensor([len(ids) for ids in samples.completion_ids]).float().clamp(min=1)
    same = sum(a == b for a, b in zip(runs[True].completion_ids, runs[False].completion_ids))
    print(f"{args.model}: {len(samples)} bf16 samples, mean length {lengths.mean():.1f}, max {int(lengths.max())}")
    print(f"shared prefill reproduces generate's own samples: {same}/{len(samples)}")
    print(f"recorded vs re-scored (bf16): max {(recorded - rescored).abs().max():.3f} nats per sequence")
    gap = (rescored - exact).abs()
    print(f"re-scored bf16 vs float32: max {gap.max():.3f} nats per sequence, {(gap / lengths).max():.4f} per token")


if __name__ == "__main__":
    main()
