"""`trl-sharpen bon` as a user runs it: a subprocess through the console entry point."""

import subprocess
import sys

from datasets import load_from_disk

from trl_sharpen.toy import TOY_DATA_DIR, TOY_MODEL_PATH


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "trl_sharpen.cli", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_bon_command_writes_a_dataset_and_resumes(tmp_path):
    args = [
        "bon",
        "--model_name_or_path", TOY_MODEL_PATH,
        "--dataset_name", f"{TOY_DATA_DIR}/test.jsonl",
        "--num_prompts", "20",
        "--num_samples", "8",
        "--max_new_tokens", "40",
        "--shard_size", "8",
        "--output_dir", str(tmp_path),
        "--answer_column", "answer",
    ]  # fmt: skip
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "BoN@8 accuracy (logprob)" in first.stdout and "greedy accuracy" in first.stdout
    result = load_from_disk(str(tmp_path))
    assert len(result) == 20 and set(result["num_samples"]) == {8}
    shard_times = sorted(p.stat().st_mtime for p in (tmp_path / "shards").iterdir())
    again = run_cli(*args)  # everything is on disk: nothing is regenerated
    assert again.returncode == 0, again.stderr
    assert sorted(p.stat().st_mtime for p in (tmp_path / "shards").iterdir()) == shard_times
    assert load_from_disk(str(tmp_path))["completion_ids"] == result["completion_ids"]


def test_bon_command_reports_bad_arguments(tmp_path):
    out = run_cli("bon", "--model_name_or_path", TOY_MODEL_PATH, "--output_dir", str(tmp_path), "--dataset_name",
                  f"{TOY_DATA_DIR}/test.jsonl", "--num_samples", "0")  # fmt: skip
    assert out.returncode != 0 and "num_samples must be at least 1" in out.stderr
    assert run_cli("bon", "--help").returncode == 0
    assert run_cli("nonsense").returncode == 2
