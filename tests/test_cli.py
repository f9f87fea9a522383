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
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == (
        "trl-sharpen: error: num_samples must be an integer >= 1, got 0. Set N, the completions sampled per prompt, "
        "e.g. 16."
    )
    assert "Traceback" not in out.stderr
    assert run_cli("bon", "--help").returncode == 0
    assert run_cli("nonsense").returncode == 2


def test_gsm8k_style_columns_are_mapped(tmp_path):
    """`question` prompts wrapped as chat messages, worked-solution references reduced to their final answer."""
    import json

    from trl_sharpen.toy.task import careful_solution, question

    rows = [{"question": question(t), "answer": f"{careful_solution(t)} #### {sum(t)}"} for t in ([3, 5], [9, 1, 4])]
    data = tmp_path / "gsm8k_like.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    mapping = ["--prompt_column", "question", "--chat_prompts", "--extract_reference_answers"]
    out = run_cli("eval", "--model_name_or_path", TOY_MODEL_PATH, "--dataset_name", str(data), "--num_samples", "8",
                  "--max_new_tokens", "40", "--output_dir", str(tmp_path / "eval"), "--no_plots", *mapping)  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    # chat-formatted prompts: the toy base answers them like the plain ones (its BoN finds the careful solution)
    assert report["best_of_n"]["logprob"]["8"] >= 0.5
    bon = run_cli("bon", "--model_name_or_path", TOY_MODEL_PATH, "--dataset_name", str(data), "--num_samples", "4",
                  "--max_new_tokens", "40", "--output_dir", str(tmp_path / "bon"), "--answer_column", "answer",
                  *mapping)  # fmt: skip
    assert bon.returncode == 0, bon.stderr
    result = load_from_disk(str(tmp_path / "bon"))
    assert result[0]["prompt"] == [{"role": "user", "content": "3 + 5 = ?"}] and result[0]["answer"] == "8"
