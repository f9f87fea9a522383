"""What the trainers report: `report_to="tensorboard"` (offline) gets our metric keys and a sample table, log_completions
prints the pairs, generation shows progress bars, and model cards carry the method tag and the paper's citation."""

import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.trainer_args import CPU_TEST_ARGS
from trl_sharpen import BoNSFTConfig, BoNSFTTrainer, SelfRewardDPOConfig, SelfRewardDPOTrainer, best_of_n
from trl_sharpen.report_tables import markdown_table
from trl_sharpen.toy import TOY_DATA_DIR, TOY_MODEL_PATH, load_toy_prompts


COMMON = {key: value for key, value in CPU_TEST_ARGS.items() if key != "report_to"}  # the tests choose report_to
# Per trainer: (our metric keys that must reach tensorboard, the table it logs, its model-card tag)
EXPECTED = {
    "bon_sft": ({"bon/selected_reward", "bon/reward_gap", "bon/samples_per_prompt"}, "bon_samples", "sft-sharpening"),
    "self_reward_dpo": ({"self_reward/margin", "self_reward/chosen", "completions/mean_length"}, "completions",
                        "rlhf-sharpening"),
    "xpo": ({"xpo/bonus", "xpo/alpha", "self_reward/policy_samples"}, "completions", "xpo"),
}  # fmt: skip


def make_trainer(name, output_dir, **overrides):
    kwargs = dict(output_dir=str(output_dir), **COMMON)
    kwargs.update(overrides)
    common = dict(
        train_dataset=load_toy_prompts("train", limit=16),
        processing_class=AutoTokenizer.from_pretrained(TOY_MODEL_PATH),
    )
    if name == "bon_sft":
        return BoNSFTTrainer(TOY_MODEL_PATH, args=BoNSFTConfig(num_samples=4, **kwargs), **common)
    if name == "self_reward_dpo":
        return SelfRewardDPOTrainer(TOY_MODEL_PATH, args=SelfRewardDPOConfig(log_completions=True, **kwargs), **common)
    from trl_sharpen import XPOConfig, XPOTrainer

    return XPOTrainer(TOY_MODEL_PATH, args=XPOConfig(log_completions=True, **kwargs), **common)


def read_events(output_dir):
    (path,) = output_dir.glob("runs/**/events.out.tfevents.*")
    events = EventAccumulator(str(path), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    return events


@pytest.mark.parametrize("name", list(EXPECTED))
def test_tensorboard_gets_our_metrics_a_sample_table_and_the_card_cites_the_paper(name, tmp_path):
    keys, table, tag = EXPECTED[name]
    trainer = make_trainer(name, tmp_path, report_to="tensorboard")
    trainer.train()

    events = read_events(tmp_path)
    scalars = set(events.Tags()["scalars"])
    assert {f"train/{key}" for key in keys} <= scalars, sorted(scalars)
    assert "train/loss" in scalars
    # The table: markdown in tensorboard's TEXT tab (one per logging step; once per round of data for BoN-SFT)
    texts = events.Tensors(f"{table}/text_summary")
    assert texts and texts[0].step >= 1
    first = texts[0].tensor_proto.string_val[0].decode()
    header = first.splitlines()[0]
    assert ("selected_completion" if name == "bon_sft" else "chosen | rejected") in header
    assert len(first.splitlines()) > 2  # header, rule and at least one row

    trainer.create_model_card(dataset_name="toy")
    card = (tmp_path / "README.md").read_text()
    assert f"- {tag}" in card and "- trl-sharpen" in card
    assert "huang2025sharpening" in card and "2412.01951" in card


def test_log_completions_prints_the_pairs(tmp_path, capsys):
    trainer = make_trainer("self_reward_dpo", tmp_path, report_to="none", num_completions_to_print=2)
    trainer.train()
    out = capsys.readouterr().out
    # rich's table: TRL's prompt/completion columns, our rejected column and both self-rewards
    for column in ("Prompt", "Completion", "rejected", "self_reward/chosen", "self_reward/rejected"):
        assert column in out, out[-3000:]


def test_markdown_table_escapes_cells():
    table = markdown_table({"prompt": ["a|b"], "reward": [-1.23456789], "completion": ["x\ny"]})
    assert table.splitlines() == ["prompt | reward | completion", "--- | --- | ---", "a\\|b | -1.235 | x<br>y"]


def test_generation_shows_progress_bars(capsys, tmp_path):
    """Best-of-N sampling (trainer and `trl-sharpen bon`) and `trl-sharpen eval`'s sampling show a tqdm bar."""
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH),
        AutoTokenizer.from_pretrained(TOY_MODEL_PATH),
    )
    prompts = load_toy_prompts("test", limit=4)
    best_of_n(model, tokenizer, prompts, 2, max_new_tokens=8)  # its bar is on unless `progress=False`
    assert "Best-of-N sampling" in capsys.readouterr().err
    best_of_n(model, tokenizer, prompts, 2, max_new_tokens=8, progress=False)
    assert "Best-of-N sampling" not in capsys.readouterr().err

    # tqdm reads TQDM_DISABLE (set by the test suite) when imported: a fresh process without it, as a user runs
    env = {key: value for key, value in os.environ.items() if key != "TQDM_DISABLE"}
    result = subprocess.run(
        [sys.executable, "-m", "trl_sharpen.cli", "eval", "--model_name_or_path", TOY_MODEL_PATH,
         "--dataset_name", f"{TOY_DATA_DIR}/test.jsonl", "--num_prompts", "4", "--num_samples", "2",
         "--max_new_tokens", "8", "--self_rewards", "none"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Sampling for evaluation: 100%" in result.stderr
