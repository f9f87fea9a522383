"""The quality check every online trainer test shares: training really sharpens the bundled toy base."""

import time

from transformers import AutoModelForCausalLM

from trl_sharpen.evaluation import evaluate_greedy
from trl_sharpen.toy import TOY_MODEL_PATH, load_toy_prompts


def train_and_check_sharpening(trainer, tokenizer, label: str):
    """Train, then require greedy accuracy on the 200 held-out prompts to rise from the base's value to >= 0.7 within
    5 min of CPU training, and the mean log pi_base of the greedy outputs to rise too (the paper's log-likelihood
    lift). pi_base is a fresh copy of the base, which the training cannot touch."""
    test = load_toy_prompts("test")
    base = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH).eval()
    before = evaluate_greedy(trainer.model, tokenizer, test["prompt"], test["answer"], base_model=base)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    after = evaluate_greedy(trainer.model, tokenizer, test["prompt"], test["answer"], base_model=base)
    print(
        f"{label}: greedy accuracy {before.accuracy:.3f} -> {after.accuracy:.3f}, mean log pi_base(greedy) "
        f"{before.mean_base_logprob:.3f} -> {after.mean_base_logprob:.3f} in {seconds:.0f} s of training"
    )
    assert before.accuracy < 0.15
    assert after.accuracy >= 0.7
    assert after.mean_base_logprob > before.mean_base_logprob + 1.0
    assert seconds <= 300
