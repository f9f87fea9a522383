"""Speed and memory of Best-of-N scoring, measured side by side in one run.

    python benchmarks/best_of_n_speed.py            # about 2 minutes on 2 CPU cores
    python benchmarks/best_of_n_speed.py --real-models --skip-toy --repeats 2   # the real-model rows only

With `--real-models` (needs the model packages, see README "Real models"), SmolLM2-135M-Instruct joins table 1
(chat prompts; target `best_of_n` / `generate` <= 1.05) and table 2 gets rows at SmolLM2's 49k and Gemma-3-270M's
262k vocabulary (target <= 0.1 at 262k).

Prints two tables:

1. Time of `best_of_n` (sample N, score, select, build the dataset) against a plain `model.generate` of the same N
   samples per prompt (the floor: what sampling alone costs), and against the naive approach of generating and then
   re-scoring every sample with a second forward pass. Target: `best_of_n` / `generate` <= 1.10. A last column
   runs `best_of_n` with `generate`'s own prefill of every row instead of one prefill per distinct prompt (as before
   that change): the difference is what sharing the prompt's KV cache saves.
2. Peak memory of `sequence_logprobs` against a naive full-logits log-softmax (`model(...).logits.float()
   .log_softmax(-1)`), at a 32k vocabulary. Each variant runs in a fresh process; a thread polls the resident set
   size during the call and reports its peak above the level before the call. Target: ratio <= 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from unittest import mock

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_sharpen import best_of_n, generation, sequence_logprobs
from trl_sharpen.generation import build_generation_config, generate_completions, left_pad
from trl_sharpen.toy import TOY_MODEL_PATH, load_toy_prompts

from random_llama import save_random_llama  # benchmarks/ is on sys.path when a script here runs


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Best time of each function over `repeats` rounds, the functions taking turns within a round, so that a
    change in the load of a shared machine hits them alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def speed_rows(model, tokenizer, prompts, num_samples, max_new_tokens, batch_size, repeats):
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    config = build_generation_config(
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )

    def plain_generate():
        # the same N samples per prompt, the same batches, nothing but `generate`; best_of_n seeds its first shard
        # with 0 as well, so with one shard both draw the same samples (the same lengths)
        torch.manual_seed(0)
        rows = [ids for ids in prompt_ids for _ in range(num_samples)]
        for start in range(0, len(rows), batch_size):
            input_ids, mask = left_pad(rows[start : start + batch_size], tokenizer.pad_token_id)
            model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)

    def generate_then_rescore():
        torch.manual_seed(0)
        samples = generate_completions(model, prompt_ids, config, num_samples, batch_size, record_logprobs=False)
        sequence_logprobs(model, [prompt_ids[i] for i in samples.prompt_index], samples.completion_ids)

    def ours():
        best_of_n(
            model,
            tokenizer,
            prompts,
            num_samples=num_samples,
            max_completion_length=max_new_tokens,
            sampling_batch_size=batch_size,
            progress=False,
        )

    def ours_without_shared_prefill():
        # best_of_n as it was before each distinct prompt's prefill was shared by its samples (generate prefilled
        # every row): what that change saves, side by side
        with mock.patch.object(generation, "_can_share_prompt_prefill", lambda *args: False):
            ours()

    torch.manual_seed(0)
    ours()  # warm-up
    fns = {
        "generate only": plain_generate,
        "generate + re-score": generate_then_rescore,
        "best_of_n": ours,
        "best_of_n, unshared prefill": ours_without_shared_prefill,
    }
    return timed(fns, repeats)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRss:
    """Polls the resident set size in a thread: the peak above the level when it started."""

    def __enter__(self):
        self.start = self.peak = rss_mib()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, rss_mib())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_mib())
        self.added = self.peak - self.start


def peak_memory_child(kind: str, model_path: str, batch: int, prompt_len: int, completion_len: int) -> None:
    """Runs in a fresh process: prints the peak resident memory (MiB) added by one scoring call."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(2, vocab, (batch, prompt_len))
    completion_ids = torch.randint(2, vocab, (batch, completion_len))
    with torch.no_grad():  # warm up kernels and allocator on a tiny input, then take the baseline
        sequence_logprobs(model, prompt_ids[:1, :4], completion_ids[:1, :4])
        model(torch.cat([prompt_ids[:1, :4], completion_ids[:1, :4]], 1)).logits.float().log_softmax(-1)
    with torch.no_grad(), PeakRss() as peak:
        if kind == "sequence_logprobs":
            values = sequence_logprobs(model, prompt_ids, completion_ids)
        else:
            ids = torch.cat([prompt_ids, completion_ids], dim=1)
            logps = model(ids).logits.float().log_softmax(-1)[:, prompt_len - 1 : -1]
            values = logps.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1).sum(-1)
    print(json.dumps({"peak_mib": peak.added, "checksum": float(values.sum())}))


def memory_rows(model_path, batch, prompt_len, completion_len):
    out = {}
    for kind in ("naive full-logits log-softmax", "sequence_logprobs"):
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-child",
                "naive" if kind.startswith("naive") else "sequence_logprobs",
                model_path,
                str(batch),
                str(prompt_len),
                str(completion_len),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        out[kind] = json.loads(child.stdout.strip().splitlines()[-1])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--real-models", action="store_true", help="add SmolLM2-135M and Gemma-3-270M rows")
    parser.add_argument("--skip-toy", action="store_true", help="only the real-model rows")
    parser.add_argument("--skip-memory", action="store_true", help="only the time table")
    parser.add_argument("--memory-child", nargs=5, metavar=("KIND", "MODEL", "BATCH", "PROMPT", "COMPLETION"))
    args = parser.parse_args()
    if args.memory_child:
        kind, path, batch, prompt_len, completion_len = args.memory_child
        peak_memory_child(kind, path, int(batch), int(prompt_len), int(completion_len))
        return

    # One thread: the timings of small models on a 2-core machine are steadier (and no slower) without intra-op threads
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, device cpu\n")
    with tempfile.TemporaryDirectory() as tmp:
        rows, memory_settings = {}, []
        batch, prompt_len, completion_len = 32, 64, 448
        if not args.skip_toy:
            toy_tok = AutoTokenizer.from_pretrained(TOY_MODEL_PATH)
            toy = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH).eval()
            prompts = load_toy_prompts("test")["prompt"]
            rows["toy base (vocab 113), 200 prompts x N=16, 48 new tokens"] = speed_rows(
                toy, toy_tok, prompts, num_samples=16, max_new_tokens=48, batch_size=256, repeats=args.repeats
            )
            # A 32k-vocabulary model: the per-step log-softmax the scoring needs is as wide as a real LLM's
            big_path = save_random_llama(
                os.path.join(tmp, "llama32k"),
                vocab_size=32000,
                hidden_size=256,
                num_layers=4,
                max_position_embeddings=1024,
            )
            big = AutoModelForCausalLM.from_pretrained(big_path).eval()
            rows["random Llama (vocab 32k, 4x256), 16 prompts x N=8, 32 new tokens"] = speed_rows(
                big, toy_tok, prompts[:16], num_samples=8, max_new_tokens=32, batch_size=128, repeats=args.repeats
            )
            memory_settings.append(("random Llama, vocab 32k", big_path, batch, prompt_len, completion_len))
        if args.real_models:
            from trl_sharpen.real_models import resolve_model_name_or_path

            smol_path = resolve_model_name_or_path("smollm2-135m-instruct")
            smol_tok = AutoTokenizer.from_pretrained(smol_path)
            smol = AutoModelForCausalLM.from_pretrained(smol_path).eval()
            # chat prompts as text (the template applied once), so both sides sample from the same token ids
            chat = [
                smol_tok.apply_chat_template(
                    [{"role": "user", "content": f"What is {a} + {b}? Reply with only the number."}],
                    tokenize=False,
                    add_generation_prompt=True,
                )
                for a, b in [(12, 7), (35, 48), (9, 66), (21, 21), (57, 18), (40, 39), (8, 93), (74, 15)]
            ]
            rows["SmolLM2-135M-Instruct (vocab 49k), 8 chat prompts x N=8, 32 new tokens"] = speed_rows(
                smol, smol_tok, chat, num_samples=8, max_new_tokens=32, batch_size=64, repeats=args.repeats
            )
            # Few-shot prompts are long (2 ProntoQA examples and the question): there prefill dominates sampling
            from trl_sharpen.tasks import generate_task

            few_shot = [
                row["prompt"] for row in generate_task("prontoqa", form="few_shot", num_train=40, num_test=4)["test"]
            ]
            tokens = sum(len(smol_tok(p)["input_ids"]) for p in few_shot) // len(few_shot)
            rows[f"SmolLM2-135M-Instruct, 4 ProntoQA 2-shot prompts (~{tokens} tokens) x N=8, 8 new tokens"] = (
                speed_rows(
                    smol, smol_tok, few_shot, num_samples=8, max_new_tokens=8, batch_size=64, repeats=args.repeats
                )
            )
            del smol
            # 8 x 256 tokens: the naive pass holds 2 GiB of float32 logits at 262k (and its log-softmax as much)
            memory_settings.append(("SmolLM2-135M, vocab 49k", smol_path, 8, 64, 192))
            memory_settings.append(
                ("Gemma-3-270M, vocab 262k", resolve_model_name_or_path("gemma-3-270m"), 8, 64, 192)
            )

        print(f"Best-of-N time (best of {args.repeats} runs)")
        print(
            f"| {'setting':<84} | {'generate only':>13} | {'gen + re-score':>14} | {'best_of_n':>9} | "
            f"{'best_of_n / generate':>20} | {'re-score / generate':>19} | {'unshared prefill / generate':>27} |"
        )
        print(f"|{'-' * 86}|{'-' * 15}|{'-' * 16}|{'-' * 11}|{'-' * 22}|{'-' * 21}|{'-' * 29}|")
        for name, t in rows.items():
            print(
                f"| {name:<84} | {t['generate only']:>12.2f}s | {t['generate + re-score']:>13.2f}s | "
                f"{t['best_of_n']:>8.2f}s | {t['best_of_n'] / t['generate only']:>20.3f} | "
                f"{t['generate + re-score'] / t['generate only']:>19.3f} | "
                f"{t['best_of_n, unshared prefill'] / t['generate only']:>27.3f} |"
            )

        for label, path, batch, prompt_len, completion_len in [] if args.skip_memory else memory_settings:
            memory = memory_rows(path, batch, prompt_len, completion_len)
            naive = memory["naive full-logits log-softmax"]["peak_mib"]
            print(f"\nPeak memory of scoring {batch} sequences of {prompt_len}+{completion_len} tokens, {label}")
            print(f"| {'method':<31} | {'peak MiB above baseline':>23} | {'ratio to naive':>14} |")
            print(f"|{'-' * 33}|{'-' * 25}|{'-' * 16}|")
            for kind, result in memory.items():
                print(f"| {kind:<31} | {result['peak_mib']:>23.0f} | {result['peak_mib'] / naive:>14.3f} |")
            a, b = (memory[k]["checksum"] for k in memory)
            print(f"\n(both compute the same values: checksums {a:.3f} vs {b:.3f})")


if __name__ == "__main__":
    main()
