"""Step time and weights in memory: SelfRewardGRPOTrainer against TRL's GRPOTrainer with the log pi_base(y|x) reward
callable a TRL user writes today, `get_self_reward("logprob", model=base, tokenizer=tok)` (a second copy of pi_base).

    python benchmarks/grpo_step_speed.py                                   # toy: beta 0 / 0.04, LoRA off / on
    python benchmarks/grpo_step_speed.py --models smollm2 --betas 0.04 --lora on   # one SmolLM2 row

Both trainers get the same model path, prompts, batch (`--batch` completions = batch / 4 prompts x 4 generations),
completion length, sampling (temperature 1) and optimiser; each runs `--warmup + --steps` optimizer steps, the two
alternating for `--rounds` rounds. Reported: the median step time of the best round as process CPU time (robust on a
shared machine; torch runs on one thread) and wall time, and the float32 weights the trainer holds (every distinct
parameter tensor reachable from the policy, TRL's reference model and the reward functions; LoRA's base weights are
shared by the policy and the adapter-disabled pi_base). Rows where TRL computes a reference pass (beta > 0) are where
ours saves a forward: it sums TRL's reference log-probs instead of running the callable's own pi_base pass.
Target: ours / TRL <= 0.8 in time, one model copy fewer in memory.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch
from transformers import AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from trl_sharpen import SelfRewardGRPOConfig, SelfRewardGRPOTrainer, get_self_reward
from trl_sharpen.real_models import resolve_model_name_or_path
from trl_sharpen.toy import TOY_MODEL_PATH, load_toy_prompts


MODELS = {"toy": (TOY_MODEL_PATH, 32), "smollm2": ("smollm2-135m-instruct", 16)}  # path, completion length


class StepTimer(TrainerCallback):
    def __init__(self):
        self.cpu, self.wall = [], []
        self._start = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = (time.process_time(), time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.cpu.append(time.process_time() - self._start[0])
        self.wall.append(time.perf_counter() - self._start[1])


def weights_bytes(trainer) -> int:
    """Bytes of distinct parameter tensors held by the policy, TRL's reference model and the reward functions."""
    modules = [trainer.model, getattr(trainer, "ref_model", None)]
    modules += [getattr(func, "model", None) for func in trainer.reward_funcs]
    seen, total = set(), 0
    for module in modules:
        if module is None:
            continue
        for parameter in module.parameters():
            if parameter.data_ptr() not in seen:
                seen.add(parameter.data_ptr())
                total += parameter.numel() * parameter.element_size()
    return total


def build(kind: str, path: str, tokenizer, beta: float, lora: bool, batch: int, length: int, steps: int, workdir):
    from peft import LoraConfig

    common = dict(
        output_dir=f"{workdir}/{kind}", use_cpu=True, bf16=False, report_to="none", save_strategy="no", seed=0,
        per_device_train_batch_size=batch, num_generations=4, max_completion_length=length, max_steps=steps,
        learning_rate=1e-4, beta=beta, gradient_checkpointing=False, logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]) if lora else None
    prompts = load_toy_prompts("train").select(range(64))
    if kind == "ours":
        return SelfRewardGRPOTrainer(
            model=path, args=SelfRewardGRPOConfig(self_reward="logprob", **common), train_dataset=prompts,
            processing_class=tokenizer, peft_config=peft_config,
        )  # fmt: skip
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    reward = get_self_reward("logprob", model=base, tokenizer=tokenizer)
    return GRPOTrainer(
        model=path, reward_funcs=[reward], args=GRPOConfig(**common), train_dataset=prompts,
        processing_class=tokenizer, peft_config=peft_config,
    )  # fmt: skip


def measure(kind, path, tokenizer, beta, lora, batch, length, warmup, steps, workdir):
    torch.manual_seed(0)
    trainer = build(kind, path, tokenizer, beta, lora, batch, length, warmup + steps, workdir)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    memory = weights_bytes(trainer)
    return statistics.median(timer.cpu[warmup:]), statistics.median(timer.wall[warmup:]), memory


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["toy"])
    parser.add_argument("--betas", nargs="+", type=float, default=[0.0, 0.04])
    parser.add_argument("--lora", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--batch", type=int, default=16, help="Completions per step (batch / 4 prompts).")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    header = (
        "| model | beta | LoRA | ours CPU s/step | TRL + callable CPU s/step | ratio (CPU) | ours wall | TRL wall | "
        "ours weights MB | TRL weights MB |"
    )
    rows = [header, "|" + "---|" * 10]
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            path, length = MODELS[name]
            path = resolve_model_name_or_path(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
            for beta in args.betas:
                for lora in args.lora:
                    best = {}
                    for _ in range(args.rounds):
                        for kind in ("ours", "trl"):
                            result = measure(kind, path, tokenizer, beta, lora == "on", args.batch, length,
                                             args.warmup, args.steps, workdir)  # fmt: skip
                            if kind not in best or result[0] < best[kind][0]:
                                best[kind] = result
                    (ours_cpu, ours_wall, ours_mem), (trl_cpu, trl_wall, trl_mem) = best["ours"], best["trl"]
                    row = (
                        f"| {name} | {beta} | {lora} | {ours_cpu:.3f} | {trl_cpu:.3f} | {ours_cpu / trl_cpu:.2f}x | "
                        f"{ours_wall:.3f} | {trl_wall:.3f} | {ours_mem / 2**20:.1f} | {trl_mem / 2**20:.1f} |"
                    )
                    rows.append(row)
                    print(row, flush=True)
    settings = (
        f"batch {args.batch} completions (4 generations), {args.warmup} warm-up + {args.steps} measured steps, best of "
        f"{args.rounds} rounds, torch {torch.__version__} on 1 CPU thread. Command: `python benchmarks/grpo_step_speed.py "
        f"--models {' '.join(args.models)}`."
    )
    print("\n".join(rows) + "\n\n" + settings)


if __name__ == "__main__":
    main()
