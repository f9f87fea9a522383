"""`trl-sharpen eval` on the bundled toy model: the table, the JSON report, the samples, the plots, and bad input.

The command runs in-process through `trl_sharpen.cli.main` (the console entry point's function): a subprocess would
spend most of the test importing torch again. `tests/test_cli.py` covers the entry point itself.
"""

import importlib.util
import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_sharpen import sequence_logprobs
from trl_sharpen.cli import main
from trl_sharpen.toy import TOY_DATA_DIR, TOY_MODEL_PATH


def eval_args(*extra):
    return [
        "eval",
        "--model_name_or_path", TOY_MODEL_PATH,
        "--dataset_name", f"{TOY_DATA_DIR}/test.jsonl",
        "--num_prompts", "12",
        "--max_completion_length", "40",
        *extra,
    ]  # fmt: skip


def test_eval_command_prints_the_table_and_writes_report_samples_and_plots(tmp_path, capsys):
    main(eval_args("--num_samples", "4", "--output_dir", str(tmp_path)))
    out = capsys.readouterr().out
    print(out)
    for line in ("greedy accuracy", "temperature-1 accuracy", "sharpening error delta", "distinct answers among N"):
        assert line in out
    assert "n=1     n=2     n=4" in out and "BoN normalized_logprob" in out and "pass@n (oracle)" in out
    assert "generation-verification gap at n=4" in out

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_prompts"] == 12 and report["num_samples"] == 4 and report["ns"] == [1, 2, 4]
    assert set(report["best_of_n"]) == {"logprob", "normalized_logprob", "majority"}
    assert report["best_of_n"]["logprob"]["1"] == pytest.approx(report["sample_accuracy"])
    assert report["pass_at_n"]["4"] >= report["best_of_n"]["logprob"]["4"] >= report["greedy"]["accuracy"]
    assert report["model"] == TOY_MODEL_PATH and report["settings"]["split"] == "test"
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 * 4 and {"completion", "correct", "base_logprob", "reward/logprob"} <= set(samples[0])
    if importlib.util.find_spec("matplotlib") is not None:  # the plots are skipped, with a note, without it
        for name in ("accuracy_vs_n.png", "loglik_histogram.png"):
            assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_eval_command_without_best_of_n_accepts_one_sample(capsys):
    main(eval_args("--num_prompts", "4", "--num_samples", "1", "--self_rewards", "none"))
    out = capsys.readouterr().out
    assert "temperature-1 accuracy" in out and "BoN" not in out and "gap" not in out


def error_line(capsys, argv) -> str:
    """The one line a user sees for bad input (exit code 1, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("trl-sharpen: error: ")]
    return line


def test_eval_command_bad_input(tmp_path, capsys):
    assert "at least 2 samples per prompt" in error_line(capsys, eval_args("--num_samples", "1"))
    no_answers = tmp_path / "no_answers.jsonl"
    Dataset.from_dict({"prompt": ["Q : 1 + 2 = ?"], "solution": ["3"]}).to_json(no_answers)
    line = error_line(capsys, ["eval", "--model_name_or_path", TOY_MODEL_PATH, "--dataset_name", str(no_answers)])
    assert "expected a `answer` column" in line and "['prompt', 'solution']" in line
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):  # --debug: the exception itself
        main([*eval_args("--num_samples", "1"), "--debug"])
    main(["eval", "--model_name_or_path", TOY_MODEL_PATH, "--dataset_name", str(no_answers), "--answer_column",
          "solution", "--num_samples", "2", "--max_new_tokens", "8", "--self_rewards", "logprob"])  # fmt: skip
    assert "1 prompts, N = 2 samples" in capsys.readouterr().out
    with pytest.raises(SystemExit) as help_exit:
        main(["eval", "--help"])
    assert help_exit.value.code == 0
    assert "--self_rewards" in capsys.readouterr().out


def test_eval_command_scores_a_lora_adapter_under_its_base(tmp_path, capsys):
    base = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH).eval()
    policy = get_peft_model(
        AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    torch.manual_seed(0)
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0.0, 1.0)  # a policy that differs from its base
    policy.save_pretrained(tmp_path / "adapter")  # no tokenizer saved: it comes from the base
    args = eval_args("--num_prompts", "4", "--num_samples", "2", "--self_rewards", "logprob")
    main([*args, "--model_name_or_path", str(tmp_path / "adapter"), "--output_dir", str(tmp_path / "eval")])
    assert "with adapters disabled" in capsys.readouterr().out
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    prompts = [json.loads(line)["prompt"] for line in open(f"{TOY_DATA_DIR}/test.jsonl")][:4]
    tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL_PATH)
    under_base = sequence_logprobs(
        base,
        [tokenizer(prompts[s["prompt_index"]])["input_ids"] for s in samples],
        [s["completion_ids"] for s in samples],
    )
    assert torch.allclose(torch.tensor([s["base_logprob"] for s in samples]), under_base, atol=1e-3)
    assert max(abs(s["logprob"] - s["base_logprob"]) for s in samples) > 0.1


def test_eval_command_reports_the_fields_metrics_at_both_temperatures_and_a_verdict(tmp_path, capsys):
    main(eval_args("--num_samples", "4", "--temperature", "0.7", "--seed", "3", "--output_dir", str(tmp_path)))
    out = capsys.readouterr().out
    assert "the field's metrics, k = 4 samples per prompt" in out
    (verdict,) = [line for line in out.splitlines() if line.startswith("verdict, BoN@4 by logprob - greedy: ")]
    assert any(word in verdict for word in ("helps", "no evidence", "hurts")) and "over 12 prompts" in verdict

    report = json.loads((tmp_path / "report.json").read_text())
    at_sampling, at_1 = report["sampled"]
    assert (at_sampling["temperature"], at_1["temperature"], at_1["k"]) == (0.7, 1.0, 4)
    # the sampling temperature's set is the report's own samples: avg@k, maj@k, pass@k are its other metrics
    assert at_sampling["avg_at_k"] == pytest.approx(report["sample_accuracy"])
    assert at_sampling["maj_at_k"] == pytest.approx(report["best_of_n"]["majority"]["4"])
    assert at_sampling["pass_at_k"] == pytest.approx(report["pass_at_n"]["4"])
    interval = report["bon_minus_greedy"]["logprob"]
    assert interval["mean"] == pytest.approx(report["best_of_n"]["logprob"]["4"] - report["greedy"]["accuracy"])
    assert interval["low"] <= interval["mean"] <= interval["high"] and interval["num_prompts"] == 12
    assert interval["verdict"] in verdict
    assert report["num_generated"] == 12 * (4 + 1 + 4)

    # the temperature-1 set is what evaluate_sampled_accuracy measures with the same seed
    from trl_sharpen.evaluation import evaluate_sampled_accuracy

    rows = [json.loads(line) for line in open(f"{TOY_DATA_DIR}/test.jsonl")][:12]
    direct = evaluate_sampled_accuracy(
        AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH),
        AutoTokenizer.from_pretrained(TOY_MODEL_PATH),
        [r["prompt"] for r in rows],
        [r["answer"] for r in rows],
        num_samples=4,
        temperature=1.0,
        max_new_tokens=40,
        seed=3,
    )
    assert (direct.avg_at_k, direct.maj_at_k, direct.pass_at_k) == pytest.approx(
        (at_1["avg_at_k"], at_1["maj_at_k"], at_1["pass_at_k"])
    )

    # at T = 1 the samples already are the field's: no second round
    main(
        eval_args("--num_prompts", "4", "--num_samples", "3", "--self_rewards", "none", "--output_dir", str(tmp_path))
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["temperature"] for s in report["sampled"]] == [1.0] and report["bon_minus_greedy"] == {}
