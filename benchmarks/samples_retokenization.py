"""How often imported text completions re-tokenize to other ids than the sampled ones, and what that does to their
log pi_base (issue 18 case 7c). SmolLM2-135M-Instruct, one chat prompt per toy task, N samples at temperature 1.

    python benchmarks/samples_retokenization.py --num_prompts 4 --num_samples 16

Prints the share of samples whose decoded text re-tokenizes differently, the log-prob gaps, and that
`best_of_n_from_samples` (text + ids) scores the engine's ids and warns with the same count."""

import argparse
import logging
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_sharpen.data import tokenize_prompt
from trl_sharpen.generation import generate_completions, sampling_config
from trl_sharpen.imported_samples import best_of_n_from_samples
from trl_sharpen.logprobs import sequence_logprobs
from trl_sharpen.real_models import resolve_model_name_or_path
from trl_sharpen.toy import load_toy_prompts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_prompts", type=int, default=4)
    parser.add_argument("--num_samples", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    args = parser.parse_args()
    path = resolve_model_name_or_path("smollm2-135m-instruct")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    prompts = [[{"role": "user", "content": p}] for p in load_toy_prompts("test")["prompt"][: args.num_prompts]]
    prompt_ids = [tokenize_prompt(tokenizer, p) for p in prompts]
    torch.manual_seed(0)
    config = sampling_config(model, tokenizer, max_new_tokens=args.max_new_tokens)
    samples = generate_completions(model, prompt_ids, config, num_samples=args.num_samples, record_logprobs=True)
    eos = set(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id])
    texts = tokenizer.batch_decode(samples.completion_ids, skip_special_tokens=True)
    retokenized, gaps = [], []
    for k, (ids, text) in enumerate(zip(samples.completion_ids, texts)):
        again = tokenizer(text, add_special_tokens=False)["input_ids"]
        body = [t for t in ids if t not in eos]
        if again != body:
            again = again + ids[len(body) :]  # the same terminator
            with torch.no_grad():
                other = sequence_logprobs(model, [prompt_ids[samples.prompt_index[k]]], [again]).item()
            retokenized.append(k)
            gaps.append(abs(other - samples.logprobs[k]))
    total = len(samples.completion_ids)
    print(f"{len(retokenized)} of {total} samples re-tokenize to other ids; |log-prob gap| "
          f"{min(gaps, default=0):.2f}-{max(gaps, default=0):.2f} nats")  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        import json

        path = f"{folder}/s.jsonl"
        n = args.num_samples
        with open(path, "w") as f:
            for p, prompt in enumerate(prompts):
                span = slice(p * n, (p + 1) * n)
                f.write(json.dumps({"prompt": prompt, "completions": texts[span],
                                    "completion_ids": samples.completion_ids[span]}) + "\n")  # fmt: skip
        logging.basicConfig(level=logging.WARNING)
        dataset = best_of_n_from_samples(model, tokenizer, path, max_completion_length=args.max_new_tokens)
        scored = [v for row in dataset["base_logprobs"] for v in row]
        worst = max(abs(a - b) for a, b in zip(scored, samples.logprobs))
        print(f"best_of_n_from_samples scored the engine's ids: max |ours - recorded| = {worst:.2e} nats")
        # Text alone (with finish reasons): the end token is chosen here; exact wherever the text re-tokenizes alike
        with open(path, "w") as f:
            for p, prompt in enumerate(prompts):
                span = slice(p * n, (p + 1) * n)
                reasons = ["length" if cut else "stop" for cut in samples.truncated[span]]
                f.write(json.dumps({"prompt": prompt, "completions": texts[span], "finish_reasons": reasons}) + "\n")
        dataset = best_of_n_from_samples(model, tokenizer, path, max_completion_length=args.max_new_tokens + 8)
        scored = [v for row in dataset["base_logprobs"] for v in row]
        exact = [k for k, (a, b) in enumerate(zip(scored, samples.logprobs)) if abs(a - b) < 1e-3]
        alike = [k for k in range(total) if k not in retokenized]
        print(f"text only: {len(exact)} of {total} scored as sampled (expected the {len(alike)} that re-tokenize "
              f"alike: {sorted(exact) == alike})")  # fmt: skip
        # Issue 18 case 7a: a Llama-3 / Gemma-3-it style EOS list whose first id is end-of-text, not end-of-turn
        model.generation_config.eos_token_id = [
            tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            tokenizer.eos_token_id,
        ]
        dataset = best_of_n_from_samples(model, tokenizer, path, max_completion_length=args.max_new_tokens + 8)
        scored = [v for row in dataset["base_logprobs"] for v in row]
        ended = [k for k in alike if not samples.truncated[k]]
        first_id = model.generation_config.eos_token_id[0]
        with torch.no_grad():
            old_rule = sequence_logprobs(  # what appending eos_ids[0] gave
                model, [prompt_ids[samples.prompt_index[k]] for k in ended],
                [samples.completion_ids[k][:-1] + [first_id] for k in ended],
            ).tolist()  # fmt: skip
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        print(f"EOS ids {model.generation_config.eos_token_id}, {len(ended)} ended text samples: mean log pi_base "
              f"recorded {mean([samples.logprobs[k] for k in ended]):.2f}, scored here "
              f"{mean([scored[k] for k in ended]):.2f}, with eos_ids[0] appended {mean(old_rule):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
