"""Best-of-N from samples generated elsewhere (`--samples_file`), on samples written by our own generator from the toy
base: text, token ids and log-prob inputs give the dataset `best_of_n` gives; wrong-temperature log-probs are refused."""

import json

import pytest
import torch
from datasets import load_from_disk

from trl_sharpen.best_of_n_sampling import RUN_FILE, select_best
from trl_sharpen.data import tokenize_prompt
from trl_sharpen.generation import generate_completions, sampling_config
from trl_sharpen.imported_samples import best_of_n_from_samples
from trl_sharpen.logprobs import pack_prompt_completion
from trl_sharpen.toy import TOY_MODEL_PATH, load_toy_prompts


NUM_PROMPTS, N = 6, 4


@pytest.fixture(scope="module")
def generated():
    """N samples per toy prompt from our generator, with the log pi_base it recorded (raw logits, temperature 1)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL_PATH)
    model = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH).eval()
    prompts = load_toy_prompts("train").select(range(NUM_PROMPTS))
    prompt_ids = [tokenize_prompt(tokenizer, p) for p in prompts["prompt"]]
    torch.manual_seed(0)
    # 12 new tokens: some toy completions are cut, so finish reasons matter
    config = sampling_config(model, tokenizer, max_new_tokens=12)
    samples = generate_completions(model, prompt_ids, config, num_samples=N, record_logprobs=True)
    return model, tokenizer, prompts, prompt_ids, samples


def per_prompt(values):
    return [values[p * N : (p + 1) * N] for p in range(NUM_PROMPTS)]


def write_rows(path, prompts, **columns):
    with open(path, "w") as f:
        for p, row in enumerate(prompts):
            f.write(
                json.dumps({"prompt": row["prompt"], "answer": row["answer"], **{k: v[p] for k, v in columns.items()}})
            )
            f.write("\n")
    return path


def finish_reasons(samples):
    return per_prompt(["length" if cut else "stop" for cut in samples.truncated])


def logprobs_at_temperature(model, prompt_ids, samples, temperature):
    """log pi(y|x) of the samples under softmax(logits / temperature): what an engine reports as 'processed'."""
    rows = [prompt_ids[p] for p in samples.prompt_index]
    ids, mask, completion = pack_prompt_completion(rows, samples.completion_ids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1] / temperature
    token_logprobs = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_logprobs * completion[:, 1:]).sum(-1).tolist()


def check_best_of_n_rows(dataset, samples, prompts, expected_logprobs):
    assert len(dataset) == NUM_PROMPTS and dataset["answer"] == prompts["answer"]
    ids, cut, logps = per_prompt(samples.completion_ids), per_prompt(samples.truncated), per_prompt(expected_logprobs)
    for p, row in enumerate(dataset):
        assert row["prompt_index"] == p and row["num_samples"] == N
        assert row["completion_ids"] == ids[p] and row["truncated"] == cut[p]
        assert row["base_logprobs"] == pytest.approx(logps[p], abs=1e-4)
        selected, _ = select_best(row["base_logprobs"], cut[p], "keep", 100.0)  # complete first, then log pi_base
        assert row["selected_index"] == selected and row["selected_completion_ids"] == ids[p][selected]


def test_token_ids_without_logprobs_are_scored_by_the_base_model(tmp_path, generated):
    model, tokenizer, prompts, _, samples = generated
    path = write_rows(tmp_path / "s.jsonl", prompts, completion_ids=per_prompt(samples.completion_ids))
    dataset = best_of_n_from_samples(model, tokenizer, path)
    assert any(samples.truncated) and not all(samples.truncated)  # cut samples are flagged by their missing EOS
    check_best_of_n_rows(dataset, samples, prompts, samples.logprobs)


def test_text_completions_are_tokenized_with_eos_unless_cut(tmp_path, generated):
    model, tokenizer, prompts, _, samples = generated
    texts = per_prompt(tokenizer.batch_decode(samples.completion_ids, skip_special_tokens=True))
    path = write_rows(tmp_path / "s.jsonl", prompts, completions=texts, finish_reasons=finish_reasons(samples))
    check_best_of_n_rows(best_of_n_from_samples(model, tokenizer, path), samples, prompts, samples.logprobs)


@pytest.mark.parametrize("per_token", [False, True])
def test_engine_logprobs_are_cross_checked_and_used(tmp_path, generated, per_token):
    model, tokenizer, prompts, prompt_ids, samples = generated
    ids = per_prompt(samples.completion_ids)
    if per_token:  # the engine's per-token values: here the sequence value spread evenly (only the sum is used)
        values = [
            [[lp / len(c)] * len(c) for lp, c in zip(lps, cs)] for lps, cs in zip(per_prompt(samples.logprobs), ids)
        ]
        columns = {"token_logprobs": values}
    else:
        columns = {"logprobs": per_prompt(samples.logprobs)}
    path = write_rows(
        tmp_path / "s.jsonl", prompts, completion_ids=ids, finish_reasons=finish_reasons(samples), **columns
    )
    dataset = best_of_n_from_samples(model, tokenizer, path, output_dir=tmp_path / "bon")
    check_best_of_n_rows(dataset, samples, prompts, samples.logprobs)
    assert json.loads((tmp_path / "bon" / RUN_FILE).read_text())["samples"] == "imported"


def test_temperature_scaled_logprobs_are_refused(tmp_path, generated):
    model, tokenizer, prompts, prompt_ids, samples = generated
    scaled = logprobs_at_temperature(model, prompt_ids, samples, temperature=0.7)
    # The same computation at temperature 1 reproduces the recorded values: only the temperature is wrong
    assert logprobs_at_temperature(model, prompt_ids, samples, 1.0) == pytest.approx(samples.logprobs, abs=1e-4)
    path = write_rows(
        tmp_path / "s.jsonl", prompts, completion_ids=per_prompt(samples.completion_ids), logprobs=per_prompt(scaled)
    )
    # The toy base is nearly deterministic on most samples (0.01-0.03 nats per token apart at temperature 0.7, up to
    # 0.2 on the least likely), so this checks every row; the default 1% suits models with real uncertainty
    with pytest.raises(ValueError, match="disagree with the model's own scoring: row .* temperature 1"):
        best_of_n_from_samples(model, tokenizer, path, check_fraction=1.0, output_dir=tmp_path / "bon")
    assert not (tmp_path / "bon").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "row, match",
    [
        ({"prompt": "Q : 1 + 2 = ?"}, "exactly one of them"),
        ({"prompt": "Q : 1 + 2 = ?", "completions": ["a"], "completion_ids": [[1]]}, "exactly one of them"),
        ({"prompt": "Q : 1 + 2 = ?", "completion_ids": [["a"]]}, "integer token ids"),
        ({"prompt": "Q : 1 + 2 = ?", "completions": ["a", "b"], "logprobs": [-1.0]}, "one entry per completion"),
        ({"prompt": "Q : 1 + 2 = ?", "completions": ["a"], "finish_reasons": ["eos"]}, "finish reasons"),
    ],
)
def test_bad_rows_are_refused_naming_the_line(tmp_path, generated, row, match):
    model, tokenizer, *_ = generated
    path = tmp_path / "s.jsonl"
    path.write_text(
        json.dumps({"prompt": "Q : 1 + 1 = ?", "completions": ["answer 2"]}) + "\n" + json.dumps(row) + "\n"
    )
    with pytest.raises(ValueError, match=f"line 2: .*{match}"):
        best_of_n_from_samples(model, tokenizer, path)


def test_output_resumes_and_trains_bon_sft(tmp_path, generated, monkeypatch, caplog):
    from trl_sharpen import BoNSFTConfig, BoNSFTTrainer, imported_samples

    model, tokenizer, prompts, _, samples = generated
    path = write_rows(tmp_path / "s.jsonl", prompts, completion_ids=per_prompt(samples.completion_ids))
    first = best_of_n_from_samples(model, tokenizer, path, output_dir=tmp_path / "bon")

    def no_scoring(*args, **kwargs):
        raise AssertionError("a finished run was scored again")

    monkeypatch.setattr(imported_samples, "_score", no_scoring)
    again = best_of_n_from_samples(model, tokenizer, path, output_dir=tmp_path / "bon")
    assert again.to_list() == first.to_list()

    args = BoNSFTConfig(
        output_dir=str(tmp_path / "sft"), use_cpu=True, bf16=False, report_to="none", max_steps=1,
        per_device_train_batch_size=NUM_PROMPTS, save_strategy="no",
    )  # fmt: skip
    trainer = BoNSFTTrainer(
        model=TOY_MODEL_PATH,
        args=args,
        train_dataset=load_from_disk(str(tmp_path / "bon")),
        processing_class=tokenizer,
    )
    assert trainer.bon_dataset["selected_completion_ids"] == first["selected_completion_ids"]  # no sampling of its own
    assert "generated with" not in caplog.text  # imported samples have no sampling settings to compare
    trainer.train()


def test_cli_bon_samples_file(tmp_path, generated):
    """`trl-sharpen bon --samples_file` as a user runs it (a subprocess through the module entry point)."""
    import subprocess
    import sys

    model, tokenizer, prompts, _, samples = generated
    path = write_rows(tmp_path / "s.jsonl", prompts, completion_ids=per_prompt(samples.completion_ids))
    args = ["bon", "--model_name_or_path", TOY_MODEL_PATH, "--samples_file", str(path)]
    args += ["--output_dir", str(tmp_path / "bon"), "--answer_column", "answer", "--max_completion_length", "40"]
    result = subprocess.run(
        [sys.executable, "-m", "trl_sharpen.cli", *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert f"Best-of-N: {NUM_PROMPTS} prompts, {NUM_PROMPTS * N} samples" in result.stdout
    assert f"BoN@{N} accuracy (logprob)" in result.stdout
    check_best_of_n_rows(load_from_disk(str(tmp_path / "bon")), samples, prompts, samples.logprobs)
