"""Launched on 2 processes by tests/test_grpo_distributed.py (`accelerate launch tests/grpo_majority_check.py OUT`):
the majority self-reward of `SelfRewardGRPOTrainer` and of the `get_self_reward("majority")` callable on groups that
TRL splits across the processes, then two training steps with majority. Rank 0 prints one `RESULT {json}` line."""

import json
import sys

from accelerate.utils import gather_object
from datasets import load_dataset
from transformers import AutoTokenizer

from trl_sharpen import SelfRewardGRPOConfig, SelfRewardGRPOTrainer, get_self_reward
from trl_sharpen.distributed import check_launch, print_rank_summary
from trl_sharpen.toy import TOY_DATA_DIR, TOY_MODEL_PATH


# Two groups of 4 completions of one prompt; with 2 completions per process, each group is split in halves whose own
# votes differ from the group's (first half: all "3"; second half: "4" and "5")
GROUPS = [["= 3", "= 3", "= 4", "= 5"], ["= 7", "no answer", "= 7", "= 8"]]


def main(output_dir: str) -> None:
    check_launch()
    args = SelfRewardGRPOConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", save_strategy="no", seed=0,
        self_reward="majority", answer_extractor="default", num_generations=4, per_device_train_batch_size=2,
        max_steps=2, max_completion_length=24, learning_rate=1e-3, gradient_checkpointing=False, logging_steps=1,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL_PATH)
    train = load_dataset(TOY_DATA_DIR, split="train").select(range(16))
    trainer = SelfRewardGRPOTrainer(TOY_MODEL_PATH, args=args, train_dataset=train, processing_class=tokenizer)
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes

    # TRL's layout: the gathered rows are the groups in order, each process holding a contiguous share
    rows = [text for group in GROUPS for text in group]
    share = len(rows) // world
    local = rows[rank * share : (rank + 1) * share]
    prompts = [train[0]["prompt"]] * len(local)
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in local]
    ours = trainer.reward_funcs[0](prompts=prompts, completions=local, completion_ids=ids, trainer_state=trainer.state)
    # The TRL callable groups by equal prompts: give each group its own prompt
    callable_prompts = [train[(rank * share + i) // 4]["prompt"] for i in range(len(local))]
    callable_rewards = get_self_reward("majority")(prompts=callable_prompts, completions=local, completion_ids=ids)

    trainer.train()
    print_rank_summary(trainer)
    result = {"trainer": gather_object(ours), "callable": gather_object(callable_rewards), "world": world}
    if trainer.accelerator.is_main_process:
        print("RESULT " + json.dumps(result), flush=True)
    trainer.accelerator.wait_for_everyone()  # leave together (as the recipes' finish_run): see script_utils
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
