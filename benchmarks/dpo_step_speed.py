"""Training-step time of SelfRewardDPOTrainer against TRL's OnlineDPOTrainer with a log pi_base(y|x) reward callable.

    python benchmarks/dpo_step_speed.py            # about 12 minutes on a 2-core CPU
    python benchmarks/dpo_step_speed.py --models smollm2 --checkpointing off   # one row
    python benchmarks/dpo_step_speed.py --rounds 2 --steps 3   # steadier on a busy machine (about 35 minutes)

Both trainers get the same model (loaded from the same path), prompts, per-device batch, 2 samples per prompt,
sampling settings, completion length and optimiser. Each runs `--warmup + --steps` optimizer steps, alternating
with the other for `--rounds` rounds; the table reports the median step time of the best round (generation, scoring,
loss, backward and optimizer step included), as CPU time of the process (robust on a shared machine) and wall time.
Torch runs on one thread, so the two agree on a dedicated machine.

- SelfRewardDPOTrainer (`self_reward="logprob"`): one generation, one pi_base pass over the samples whose result is
  both the self-reward and DPO's reference log-probs, one policy forward and backward (DPO's loss forward; on CPU
  its LM head is `trl_sharpen.logprobs.add_cpu_lm_head`'s chunked log-softmax, on GPUs TRL's fused kernel).
- SelfRewardDPOTrainer with the same callable as OnlineDPOTrainer below as its self-reward: a pi_base pass for the
  reward, another for DPO's reference log-probs of the pairs. The ratio to it isolates what the shared pass saves.
- OnlineDPOTrainer (`trl.experimental.online_dpo`) with a reward callable that recomputes log pi_base(y|x) the way a
  TRL user would write it today (re-tokenise, forward a copy of the base model, log-softmax of the full logits): one
  generation, a policy forward with full logits, a reference forward, and the reward's own base forward.

Rows: gradient checkpointing on (both trainers' TRL default; OnlineDPOTrainer then also generates without a KV
cache, while SelfRewardDPOTrainer switches checkpointing off for generation) and off. Models (`--models`): a randomly
initialised Llama with a 32k vocabulary (saved to a temporary directory with a matching word-level tokenizer), the
bundled toy model, and SmolLM2-135M-Instruct (its converted float32 checkpoint, `trl-sharpen convert
smollm2-135m-instruct`; the toy prompts as plain text, `--smollm2-batch-size` prompts, `--smollm2-completion-length`
tokens). A last line times the LM head alone: TRL's fused kernel (without Triton, i.e. on CPU, it runs as torch ops
that cost more than full logits), full logits, and the CPU path SelfRewardDPOTrainer uses instead.
Target: SelfRewardDPOTrainer / OnlineDPOTrainer <= 0.8.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
from trl.kernels import ChunkedLogProbFunction

from trl_sharpen import SelfRewardDPOConfig, SelfRewardDPOTrainer, logprobs
from trl_sharpen.logprobs import _cpu_lm_head_outputs
from trl_sharpen.real_models import resolve_model_name_or_path
from trl_sharpen.toy import TOY_MODEL_PATH, load_toy_prompts

from random_llama import save_random_llama  # benchmarks/ is on sys.path when a script here runs


MODELS = ("random", "toy", "smollm2")


class NaiveBaseLogProb:
    """log pi_base(y|x) as a TRL reward function, written the way a TRL user would today."""

    __name__ = "base_logprob"

    def __init__(self, path: str, tokenizer):
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        self.tokenizer = tokenizer

    @torch.no_grad()
    def __call__(self, prompts, completions, completion_ids, **kwargs):
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        rows, completion_lengths = [], []
        for prompt, ids in zip(prompts, completion_ids):
            ids = ids[: ids.index(eos) + 1] if eos in ids else ids  # OnlineDPO pads completions after their EOS
            rows.append(self.tokenizer(prompt)["input_ids"] + ids)
            completion_lengths.append(len(ids))
        width = max(len(row) for row in rows)
        input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
        attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        token_logps = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        rewards = []
        for i, (row, length) in enumerate(zip(rows, completion_lengths)):
            rewards.append(token_logps[i, len(row) - 1 - length : len(row) - 1].sum().item())
        return rewards


class StepTimer(TrainerCallback):
    """CPU time (`process_time`) and wall time of each optimizer step."""

    def __init__(self):
        self.cpu: list[float] = []
        self.wall: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = (time.process_time(), time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.cpu.append(time.process_time() - self.start[0])
        self.wall.append(time.perf_counter() - self.start[1])


def common_args(args, output_dir: str, gradient_checkpointing: bool, batch_size: int) -> dict:
    return dict(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=gradient_checkpointing,
        per_device_train_batch_size=batch_size,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-5,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
    )


def time_trainer(build, args) -> tuple[float, float]:
    """Median (CPU, wall) seconds per step after the warm-up steps."""
    timer = StepTimer()
    trainer = build()
    trainer.add_callback(timer)
    trainer.train()
    return statistics.median(timer.cpu[args.warmup :]), statistics.median(timer.wall[args.warmup :])


def benchmark(
    name: str, path: str, args, completion_length: int, gradient_checkpointing: bool, batch_size: int
) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = load_toy_prompts("train").select_columns(["prompt"])
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())

    def ours(self_reward):
        config = SelfRewardDPOConfig(
            max_completion_length=completion_length,
            self_reward=self_reward,
            **common_args(args, output_dir, gradient_checkpointing, batch_size),
        )
        return SelfRewardDPOTrainer(model=path, args=config, train_dataset=prompts, processing_class=tokenizer)

    def online_dpo():
        config = OnlineDPOConfig(
            max_new_tokens=completion_length,
            max_length=512,
            **common_args(args, output_dir, gradient_checkpointing, batch_size),
        )
        return OnlineDPOTrainer(
            model=path,
            reward_funcs=NaiveBaseLogProb(path, tokenizer),
            args=config,
            train_dataset=prompts,
            processing_class=tokenizer,
        )

    builders = {
        "ours": lambda: ours("logprob"),
        # the same trainer, but the reward recomputed by the user callable: isolates the shared pi_base pass
        "ours_callable": lambda: ours(NaiveBaseLogProb(path, tokenizer)),
        "online_dpo": online_dpo,
    }
    times = {key: [] for key in builders}
    with tempfile.TemporaryDirectory() as output_dir:
        # Alternate the trainers and keep each one's best round: the machine may be shared
        for _ in range(args.rounds):
            for key, build in builders.items():
                times[key].append(time_trainer(build, args))
    gc = "on (TRL default)" if gradient_checkpointing else "off"
    best = {key: min(values) for key, values in times.items()}
    return {"model": name, "params": params, "gc": gc, "batch": batch_size, "length": completion_length, **best}


def cell(value: tuple[float, float]) -> str:
    return f"{value[0]:.3f} s ({value[1]:.3f} s)"


def ratio(a: tuple[float, float], b: tuple[float, float]) -> str:
    return f"{a[0] / b[0]:.2f}x ({a[1] / b[1]:.2f}x)"


def lm_head_seconds(tokens: int, hidden_size: int, vocab_size: int, repeats: int = 3) -> tuple[float, ...]:
    """Forward + backward of the LM head and token log-probs: TRL's fused kernel, full logits, our CPU path."""
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab_size, hidden_size) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab_size, (tokens,))
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")  # what DPOTrainer asks of it

    def fused():
        ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, outputs)[0].sum().backward()

    def full_logits():
        (hidden @ weight.t()).log_softmax(-1).gather(-1, targets[:, None]).sum().backward()

    def cpu_path():
        head = torch.nn.Linear(hidden_size, vocab_size, bias=False)
        head.weight = torch.nn.Parameter(weight.detach(), requires_grad=True)
        chunk = max(1, 128 * 2**20 // (4 * vocab_size))
        _cpu_lm_head_outputs(hidden, head, targets, lambda x: x, outputs[1:], chunk)["log_probs"].sum().backward()

    result = []
    for fn in (fused, full_logits, cpu_path):
        fn()
        start = time.process_time()
        for _ in range(repeats):
            fn()
        result.append((time.process_time() - start) / repeats)
    return tuple(result)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per trainer and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds per trainer; the best is kept")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per step (2 samples each)")
    parser.add_argument("--completion-length", type=int, default=64, help="max completion length (32k model)")
    parser.add_argument("--vocab-size", type=int, default=32_000)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady timings on a shared CPU)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="rows to run (default: all)")
    parser.add_argument(
        "--checkpointing", nargs="+", choices=("on", "off"), default=["on", "off"], help="gradient checkpointing"
    )
    parser.add_argument("--smollm2-batch-size", type=int, default=4, help="prompts per step for SmolLM2")
    parser.add_argument("--smollm2-completion-length", type=int, default=24, help="max completion length (SmolLM2)")
    parser.add_argument(
        "--lm-head",
        choices=("auto", "fused"),
        default="auto",
        help="SelfRewardDPOTrainer's LM head: auto (the CPU path on CPU) or fused (TRL's kernel everywhere, as before)",
    )
    args = parser.parse_args()
    if args.lm_head == "fused":
        logprobs.CPU_LM_HEAD_MAX_BYTES = 0  # `uses_cpu_lm_head` is then never true
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    modes = [mode == "on" for mode in ("on", "off") if mode in args.checkpointing]
    if "random" in args.models:
        with tempfile.TemporaryDirectory() as model_dir:
            path = save_random_llama(
                model_dir, args.vocab_size, args.hidden_size, args.layers, max_position_embeddings=512
            )
            label = f"random Llama {args.layers}x{args.hidden_size}, {args.vocab_size // 1000}k vocab"
            for checkpointing in modes:
                rows.append(benchmark(label, path, args, args.completion_length, checkpointing, args.batch_size))
    if "toy" in args.models:
        for checkpointing in modes:
            rows.append(benchmark("bundled toy model", TOY_MODEL_PATH, args, 40, checkpointing, args.batch_size))
    if "smollm2" in args.models:
        path = resolve_model_name_or_path("smollm2-135m-instruct")  # converted once, cached
        for checkpointing in modes:
            length, batch = args.smollm2_completion_length, args.smollm2_batch_size
            rows.append(benchmark("SmolLM2-135M-Instruct, 49k vocab", path, args, length, checkpointing, batch))

    print(
        f"\nCPU seconds per training step (wall seconds in brackets): median of {args.steps} steps after "
        f"{args.warmup} warm-up, best of {args.rounds} alternating round(s); 2 samples per prompt; "
        f"{torch.get_num_threads()} torch thread(s), float32; SelfRewardDPOTrainer's LM head: {args.lm_head}. CPU time is what this process computed, so other jobs "
        "on a shared machine barely change it; wall time is what a dedicated machine with this thread count shows.\n"
    )
    print(
        "| model | params | prompts x max tokens | gradient checkpointing | SelfRewardDPOTrainer "
        "| SelfRewardDPOTrainer + callable | OnlineDPOTrainer + callable | ratio vs OnlineDPO | ratio vs + callable |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['model']} | {row['params'] / 1e6:.2f}M | {row['batch']} x {row['length']} | {row['gc']} "
            f"| {cell(row['ours'])} "
            f"| {cell(row['ours_callable'])} | {cell(row['online_dpo'])} | {ratio(row['ours'], row['online_dpo'])} "
            f"| {ratio(row['ours'], row['ours_callable'])} |"
        )
    tokens = 2 * args.batch_size * (args.completion_length + 10)
    fused, full, ours = lm_head_seconds(tokens, args.hidden_size, args.vocab_size)
    print(
        f"\nLM head + log-probs, forward and backward, {tokens} tokens x {args.vocab_size} vocab, CPU seconds: TRL's "
        f"fused kernel (torch fallback without Triton) {fused:.3f} s, full logits {full:.3f} s, "
        f"SelfRewardDPOTrainer's CPU path (chunked log-softmax with DPO's metrics) {ours:.3f} s."
    )


if __name__ == "__main__":
    main()
