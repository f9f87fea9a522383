"""Best-of-N from samples generated elsewhere (`--samples_file`), on samples written by our own generator from the toy
base: text, token ids and log-prob inputs give the dataset `best_of_n` gives; wrong-temperature log-probs are refused."""

import json

import pytest
import torch
from datasets import Dataset, load_from_disk

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
    if per_token:  # the engine's per-token values, cross-checked per token; their sums are the sequence values
        columns = {"token_logprobs": per_prompt(token_logprobs(model, prompt_ids, samples))}
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
    # 0.2 on the least likely), so every row must be checked: the default does (at least 32 rows, here all 6)
    with pytest.raises(
        ValueError, match=r"line \d+: the log-probs .*disagree with the model's own scoring.* temperature 1"
    ):
        best_of_n_from_samples(model, tokenizer, path, output_dir=tmp_path / "bon")
    assert not (tmp_path / "bon").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "row, match",
    [
        ({"prompt": "Q : 1 + 2 = ?"}, "give the samples as `completion_ids` .* and/or `completions`"),
        (
            {"prompt": "Q : 1 + 2 = ?", "completions": ["a"], "completion_ids": [[1]]},
            "here but `completions` .* line 1",
        ),
        ({"prompt": "Q : 1 + 2 = ?", "completion_ids": [["a"]]}, "integer token ids"),
        ({"prompt": "Q : 1 + 2 = ?", "completions": ["a", "b"], "logprobs": [-1.0]}, "one entry per completion"),
        ({"prompt": "Q : 1 + 2 = ?", "completions": ["a"], "finish_reasons": ["eos"]}, "finish reasons"),
        ({"prompt": "Q : 1 + 2 = ?", "completions": ["a"], "logprobs": [True]}, "`logprobs` of completion 1 is True"),
        (
            {"prompt": "Q : 1 + 2 = ?", "completions": ["a"], "token_logprobs": [{"x": 1}]},
            "expected a list, per token",
        ),
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


# --- Values, alignment and terminators (issue 19's samples-file cases, issue 18 case 7) -------------------------------


def token_logprobs(model, prompt_ids, samples):
    """Per completion, log pi_base of each of its tokens (raw logits, temperature 1): what vLLM reports per token."""
    values = []
    with torch.no_grad():
        for p, ids in zip(samples.prompt_index, samples.completion_ids):
            logits = model(input_ids=torch.tensor([prompt_ids[p] + ids])).logits[0, len(prompt_ids[p]) - 1 : -1]
            values.append(logits.log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1).tolist())
    return values


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def rewrite(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def ids_file(tmp_path, generated, **extra):
    _, _, prompts, _, samples = generated
    return write_rows(tmp_path / "s.jsonl", prompts, completion_ids=per_prompt(samples.completion_ids), **extra)


@pytest.mark.parametrize("key, value", [("logprobs", 0.7), ("logprobs", float("nan")), ("token_logprobs", 0.2)])
def test_every_rows_logprobs_must_be_finite_and_not_positive(tmp_path, generated, key, value):
    """One bad value on line 5 of 6 is refused with its line, whichever rows the cross-check samples."""
    model, tokenizer, prompts, prompt_ids, samples = generated
    columns = {"logprobs": per_prompt(samples.logprobs)}
    if key == "token_logprobs":
        columns = {"token_logprobs": per_prompt(token_logprobs(model, prompt_ids, samples))}
    rows = rows_of(ids_file(tmp_path, generated, **columns))
    if key == "logprobs":
        rows[4]["logprobs"][1] = value
    else:
        rows[4]["token_logprobs"][1][0] = value
    path = rewrite(tmp_path / "s.jsonl", rows)
    with pytest.raises(ValueError, match=rf"s.jsonl, line 5: `{key}` of completion 2\b.* is (NaN|0.7|0.2, positive)"):
        best_of_n_from_samples(model, tokenizer, path)


def test_logprobs_in_the_wrong_order_are_caught_by_the_cross_check(tmp_path, generated):
    """Log-probs listed in another order than their completions: the default check covers at least 32 rows (here all
    6), not 1%; line 2 is one the old single-row check never drew."""
    model, tokenizer, *_ = generated
    rows = rows_of(ids_file(tmp_path, generated, logprobs=per_prompt(generated[4].logprobs)))
    rows[1]["logprobs"] = rows[1]["logprobs"][::-1]
    path = rewrite(tmp_path / "s.jsonl", rows)
    with pytest.raises(ValueError, match=r"line 2: .*disagree with the model's own scoring"):
        best_of_n_from_samples(model, tokenizer, path)


def test_per_token_logprobs_are_cross_checked_per_token(tmp_path, generated):
    """Per-token values in the wrong order keep their sum: a per-sequence check passes them, a per-token one not."""
    model, tokenizer, prompts, prompt_ids, samples = generated
    values = per_prompt(token_logprobs(model, prompt_ids, samples))
    rows = rows_of(ids_file(tmp_path, generated, token_logprobs=values))
    rows[0]["token_logprobs"] = [v[::-1] for v in rows[0]["token_logprobs"]]
    path = rewrite(tmp_path / "s.jsonl", rows)
    with pytest.raises(ValueError, match=r"line 1: .*per token"):
        best_of_n_from_samples(model, tokenizer, path, check_fraction=1.0)


def test_vllm_shaped_token_logprobs_are_accepted(tmp_path, generated):
    """vLLM's per-position dicts ({token id: {"logprob", "rank", "decoded_token"}}), OpenAI-style {"logprob"} items
    and per-token lists under `logprobs` give the same dataset as plain per-token lists."""
    model, tokenizer, prompts, prompt_ids, samples = generated
    values = per_prompt(token_logprobs(model, prompt_ids, samples))
    ids = per_prompt(samples.completion_ids)
    vllm = [
        [[{str(t): {"logprob": v, "rank": 1, "decoded_token": "x"}} for t, v in zip(c, lp)] for c, lp in zip(cs, lps)]
        for cs, lps in zip(ids, values)
    ]
    openai = [[[{"token": "x", "logprob": v} for v in lp] for lp in lps] for lps in values]
    expected = best_of_n_from_samples(model, tokenizer, ids_file(tmp_path, generated, token_logprobs=values))
    for columns in ({"token_logprobs": vllm}, {"token_logprobs": openai}, {"logprobs": values}):
        dataset = best_of_n_from_samples(model, tokenizer, ids_file(tmp_path, generated, **columns))
        for row, reference, lps in zip(dataset["base_logprobs"], expected["base_logprobs"], values, strict=True):
            assert row == pytest.approx(reference) and row == pytest.approx([sum(v) for v in lps], abs=1e-5)
    # A vLLM dict for another token than the sampled one: the values are not aligned with the ids
    vllm[2][1][0] = {"7": {"logprob": -0.1}}
    with pytest.raises(ValueError, match=r"line 3: .*completion 2, token 1: .*token 7.*sampled token"):
        best_of_n_from_samples(model, tokenizer, ids_file(tmp_path, generated, token_logprobs=vllm))


def test_prompt_ids_of_another_prompt_are_refused(tmp_path, generated):
    model, tokenizer, prompts, prompt_ids, samples = generated
    shifted = prompt_ids[1:] + prompt_ids[:1]
    path = ids_file(tmp_path, generated, prompt_ids=shifted)
    with pytest.raises(ValueError, match=r"line 1: `prompt_ids` decode to .* not to this row's prompt"):
        best_of_n_from_samples(model, tokenizer, path)
    # The engine's own tokenization of the same prompt is accepted and used
    dataset = best_of_n_from_samples(model, tokenizer, ids_file(tmp_path, generated, prompt_ids=prompt_ids))
    assert dataset["prompt_ids"] == prompt_ids


def test_completion_ids_that_start_with_the_prompt_are_refused(tmp_path, generated):
    """HF `generate` returns prompt + completion: such rows are refused, naming the line and the fix."""
    model, tokenizer, prompts, prompt_ids, samples = generated
    ids = per_prompt([prompt_ids[p] + c for p, c in zip(samples.prompt_index, samples.completion_ids)])
    path = write_rows(tmp_path / "s.jsonl", prompts, completion_ids=ids)
    with pytest.raises(ValueError, match=r"line 1: .*start with the prompt's 9 token ids.*only the generated tokens"):
        best_of_n_from_samples(model, tokenizer, path)


def test_right_padded_completions_are_unpadded(tmp_path, generated, caplog):
    """Completions padded to one length (with pad ids, after EOS or not) score and flag as the unpadded ones."""
    model, tokenizer, prompts, prompt_ids, samples = generated
    width = max(map(len, samples.completion_ids)) + 2
    padded = [c + [tokenizer.pad_token_id] * (width - len(c)) for c in samples.completion_ids]
    path = write_rows(tmp_path / "s.jsonl", prompts, completion_ids=per_prompt(padded))
    check_best_of_n_rows(best_of_n_from_samples(model, tokenizer, path), samples, prompts, samples.logprobs)
    assert f"{len(padded)} completions ended in padding" in caplog.text
    # Something other than padding after the EOS is not a completion
    rows = rows_of(path)
    rows[0]["completion_ids"][2] = rows[0]["completion_ids"][2][:3] + [12, 24]
    with pytest.raises(ValueError, match=r"line 1: completion 3 goes on after its EOS id"):
        best_of_n_from_samples(model, tokenizer, rewrite(path, rows))


def test_text_that_ends_in_the_eos_text_gets_no_second_eos(tmp_path, generated):
    model, tokenizer, prompts, prompt_ids, samples = generated
    texts = per_prompt(tokenizer.batch_decode(samples.completion_ids, skip_special_tokens=False))
    assert texts[0][2].endswith("<eos>")
    path = write_rows(tmp_path / "s.jsonl", prompts, completions=texts, finish_reasons=finish_reasons(samples))
    check_best_of_n_rows(best_of_n_from_samples(model, tokenizer, path), samples, prompts, samples.logprobs)


def test_text_that_does_not_survive_tokenization_is_refused(tmp_path, generated):
    """Out-of-vocabulary text becomes <unk> (and an empty stored completion): refused, naming the line."""
    model, tokenizer, prompts, *_ = generated
    path = write_rows(tmp_path / "s.jsonl", prompts, completions=[["answer 3", "zebra!"]] * NUM_PROMPTS)
    with pytest.raises(
        ValueError,
        match=r"line 1: completion 2 \('zebra!'\) does not survive tokenization: it becomes '<unk>.*completion_ids",
    ):
        best_of_n_from_samples(model, tokenizer, path)


def test_finish_reason_length_on_ids_ending_in_eos_is_refused(tmp_path, generated):
    model, tokenizer, prompts, _, samples = generated
    reasons = per_prompt(["length"] * len(samples.completion_ids))
    path = ids_file(tmp_path, generated, finish_reasons=reasons)
    with pytest.raises(ValueError, match=r"line 1: completion 3 ends with the EOS id 1 but its finish reason is"):
        best_of_n_from_samples(model, tokenizer, path)


def test_completions_longer_than_the_limits_are_refused(tmp_path, generated):
    model, tokenizer, *_ = generated
    path = ids_file(tmp_path, generated)
    with pytest.raises(ValueError, match=r"line 1: completion 1 has 12 tokens, more than max_completion_length=10"):
        best_of_n_from_samples(model, tokenizer, path, max_completion_length=10)
    rows = rows_of(path)
    rows[3]["completion_ids"][0] = [12] * 130
    with pytest.raises(ValueError, match=r"line 4: .*139 tokens.*model's context of 128"):
        best_of_n_from_samples(model, tokenizer, rewrite(path, rows), max_completion_length=200)


def test_columns_are_the_union_of_all_rows(tmp_path, generated):
    """A key missing on some rows is refused naming them (it used to vanish when line 1 lacked it)."""
    model, tokenizer, prompts, *_ = generated
    rows = rows_of(ids_file(tmp_path, generated))
    del rows[0]["answer"]
    with pytest.raises(ValueError, match=r"line 1: no `answer`, which lines 2-6 have.*null"):
        best_of_n_from_samples(model, tokenizer, rewrite(tmp_path / "s.jsonl", rows))
    rows[0]["answer"] = None  # explicit: kept, with null on that row
    dataset = best_of_n_from_samples(model, tokenizer, rewrite(tmp_path / "s.jsonl", rows))
    assert dataset["answer"] == [None, *prompts["answer"][1:]]


@pytest.mark.parametrize("column", ["rewards", "selected_index", "prompt_index", "base_logprobs"])
def test_columns_best_of_n_writes_are_refused(tmp_path, generated, column):
    model, tokenizer, prompts, _, samples = generated
    path = ids_file(tmp_path, generated, **{column: per_prompt(list(range(len(samples.completion_ids))))})
    with pytest.raises(ValueError, match=rf"`{column}` is a column Best-of-N writes.*Rename it"):
        best_of_n_from_samples(model, tokenizer, path)


def test_type_mismatch_and_mixed_rows_name_the_line(tmp_path, generated):
    model, tokenizer, prompts, _, samples = generated
    rows = rows_of(ids_file(tmp_path, generated))
    rows[2]["answer"] = [1, 2]
    with pytest.raises(ValueError, match=r"line 3: `answer` is a list here but a string on line 1"):
        best_of_n_from_samples(model, tokenizer, rewrite(tmp_path / "s.jsonl", rows))
    rows = rows_of(ids_file(tmp_path, generated))
    rows[3] = {**rows[3], "completions": ["answer 3"]}
    del rows[3]["completion_ids"]
    with pytest.raises(
        ValueError, match=r"line 4: .*`completions` \(text\) here but `completion_ids` \(token ids\) on line 1"
    ):
        best_of_n_from_samples(model, tokenizer, rewrite(tmp_path / "s.jsonl", rows))


@pytest.mark.parametrize("bad, match", [(-3, "negative"), (113, "outside the model's vocabulary of 113")])
def test_out_of_range_token_ids_name_the_line(tmp_path, generated, bad, match):
    model, tokenizer, *_ = generated
    rows = rows_of(ids_file(tmp_path, generated))
    rows[4]["completion_ids"][1][0] = bad
    with pytest.raises(ValueError, match=rf"s.jsonl, line 5: completion 2 has token id {bad}.*{match}"):
        best_of_n_from_samples(model, tokenizer, rewrite(tmp_path / "s.jsonl", rows))


def test_sampling_settings_that_do_not_apply_are_refused(tmp_path, generated):
    """The samples are drawn already: a temperature or N of ours would be silently ignored."""
    model, tokenizer, *_ = generated
    for setting in ({"temperature": 0.7}, {"num_samples": 8}, {"adaptive_delta": 0.1}):
        with pytest.raises(ValueError, match=rf"{next(iter(setting))}=.* does not apply to imported samples"):
            best_of_n_from_samples(model, tokenizer, ids_file(tmp_path, generated), **setting)


def test_cli_applies_num_prompts_chat_prompts_and_prompt_column(tmp_path, generated):
    from trl_sharpen.cli import BestOfNArguments
    from trl_sharpen.imported_samples import samples_file_prompts

    path = ids_file(tmp_path, generated)
    args = BestOfNArguments(output_dir=str(tmp_path / "bon"), samples_file=str(path), num_prompts=2, chat_prompts=True)
    prompts = samples_file_prompts(args)
    assert len(prompts) == 2 and prompts.rows[0]["prompt"] == [{"role": "user", "content": generated[2][0]["prompt"]}]
    renamed = rewrite(tmp_path / "q.jsonl", [{"question": row.pop("prompt"), **row} for row in rows_of(path)])
    args = BestOfNArguments(output_dir=str(tmp_path / "bon"), samples_file=str(renamed), prompt_column="question")
    assert samples_file_prompts(args)["prompt"] == generated[2]["prompt"]
    args = BestOfNArguments(output_dir=str(tmp_path / "bon"), samples_file=str(path), dataset_name="x.jsonl")
    with pytest.raises(ValueError, match="--dataset_name .* --samples_file.*one of them"):
        samples_file_prompts(args)


# --- Terminators of text completions (issue 18 case 7) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model():
    """A random tiny Llama on the toy tokenizer plus an `<end_of_turn>` token that closes assistant turns, with
    Gemma-3-it's EOS list (end-of-text first, end-of-turn second)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL_PATH)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|user|> ' + m['content'] + ' ' }}{% else %}"
        "{{ '<|assistant|> ' + m['content'] + '<end_of_turn>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=[1, end_of_turn],
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = [1, end_of_turn]
    return model, tokenizer, end_of_turn


def test_chat_text_completions_end_with_the_end_of_turn_token(tmp_path, chat_model):
    model, tokenizer, end_of_turn = chat_model
    answer = tokenizer("answer 3", add_special_tokens=False)["input_ids"]
    chat = {"prompt": [{"role": "user", "content": "Q : 1 + 2 = ?"}], "completions": ["answer 3"]}
    dataset = best_of_n_from_samples(model, tokenizer, rewrite(tmp_path / "s.jsonl", [chat]))
    assert dataset["completion_ids"] == [[answer + [end_of_turn]]]
    plain = {"prompt": "Q : 1 + 2 = ?", "completions": ["answer 3"]}  # after plain text: the tokenizer's EOS
    dataset = best_of_n_from_samples(model, tokenizer, rewrite(tmp_path / "s.jsonl", [plain]))
    assert dataset["completion_ids"] == [[answer + [tokenizer.eos_token_id]]]


def test_stop_string_endings_get_no_eos(tmp_path, generated):
    """Finish reason "stop" from a stop string (vLLM's `stop_reason` names it, or the text ends with one of
    --stop_strings) ends the completion without an EOS; the stop string vLLM leaves out of the text is put back."""
    model, tokenizer, *_ = generated
    rows = [
        {"prompt": "Q : 1 + 2 = ?", "completions": ["1 + 2 = 3 .", "answer 3", "1 + 2"],
         "finish_reasons": ["stop", "stop", "stop"], "stop_reasons": [None, None, " = 3 ."]},
    ]  # fmt: skip
    dataset = best_of_n_from_samples(model, tokenizer, rewrite(tmp_path / "s.jsonl", rows))
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("1 + 2 = 3 .", "answer 3", "1 + 2 = 3 .")]
    assert dataset[0]["completion_ids"] == [ids[0] + [1], ids[1] + [1], ids[2]]
    assert dataset[0]["truncated"] == [False, False, False]
    del rows[0]["stop_reasons"]
    dataset = best_of_n_from_samples(model, tokenizer, rewrite(tmp_path / "s.jsonl", rows), stop_strings=["."])
    assert dataset[0]["completion_ids"] == [ids[0], ids[1] + [1], tokenizer("1 + 2", add_special_tokens=False)[
        "input_ids"] + [1]]  # fmt: skip


def bpe_model():
    """A byte-level BPE tokenizer where 'answer' is one token and also spelled by its letters, and a random Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(["the answer is 42", "an answer"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


def test_engine_ids_win_over_text_that_retokenizes_differently(tmp_path, caplog):
    """With both `completions` and `completion_ids`, the engine's ids are scored; rows whose text re-tokenizes to
    other ids are counted in a warning (their log-probs would differ)."""
    from trl_sharpen.logprobs import sequence_logprobs

    model, tokenizer = bpe_model()
    canonical = tokenizer("the answer", add_special_tokens=False)["input_ids"]
    spelled = tokenizer("the ", add_special_tokens=False)["input_ids"] + [
        tokenizer.convert_tokens_to_ids(ch) for ch in "answer"
    ]
    assert tokenizer.decode(spelled) == "the answer" and spelled != canonical
    eos = tokenizer.eos_token_id
    rows = [
        {"prompt": "is 42", "completions": ["the answer"] * 2, "completion_ids": [spelled + [eos], canonical + [eos]]},
        {"prompt": "an", "completions": ["the answer"], "completion_ids": [canonical + [eos]]},
    ]
    dataset = best_of_n_from_samples(model, tokenizer, rewrite(tmp_path / "s.jsonl", rows))
    assert dataset[0]["completion_ids"] == [spelled + [eos], canonical + [eos]]
    prompt = tokenizer("is 42")["input_ids"]
    with torch.no_grad():
        expected = sequence_logprobs(model, [prompt, prompt], [spelled + [eos], canonical + [eos]]).tolist()
    assert dataset[0]["base_logprobs"] == pytest.approx(expected, abs=1e-5)
    assert abs(expected[0] - expected[1]) > 0.1  # re-tokenizing would have changed the score
    assert "1 completion (in 1 of 2 rows) re-tokenizes to other ids" in caplog.text
    # Text and ids that are not the same completion: refused
    rows[1]["completions"] = ["an answer"]
    with pytest.raises(ValueError, match=r"line 2: completion 1's text .* is not what its `completion_ids` decode to"):
        best_of_n_from_samples(model, tokenizer, rewrite(tmp_path / "s.jsonl", rows))


def test_cli_refuses_bad_samples_and_options_in_one_line(tmp_path, capsys):
    """At the command line (`trl_sharpen.cli.main`, in process: both refusals come before the model loads): one
    `trl-sharpen: error:` line naming the file and line."""
    from trl_sharpen.cli import main

    path = tmp_path / "s.jsonl"
    rows = [{"prompt": "Q : 1 + 1 = ?", "completion_ids": [[12, 15, 1]], "logprobs": [-1.0]}] * 2
    rows[1] = {**rows[1], "logprobs": [float("nan")]}
    rewrite(path, rows)
    base = ["bon", "--model_name_or_path", TOY_MODEL_PATH, "--output_dir", str(tmp_path / "bon")]
    for options, message in (
        (["--samples_file", str(path)], f"{path}, line 2: `logprobs` of completion 1 is NaN"),
        (["--samples_file", str(path), "--temperature", "0.7"], "temperature=0.7 does not apply to imported samples"),
    ):
        with pytest.raises(SystemExit) as exit_code:
            main([*base, *options])
        err = capsys.readouterr().err
        assert exit_code.value.code == 1 and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith(f"trl-sharpen: error: {message}")


def test_null_logprobs_and_in_memory_rows_are_named(tmp_path, generated):
    """vLLM's cumulative_logprob is None when log-probs were not requested: named, not read as per-token values.
    Rows passed from Python (a list or a `Dataset`) are named by their index."""
    model, tokenizer, prompts, _, samples = generated
    rows = rows_of(ids_file(tmp_path, generated, logprobs=per_prompt(samples.logprobs)))
    rows[2]["logprobs"][0] = None
    with pytest.raises(ValueError, match=r"line 3: `logprobs` of completion 1 is null"):
        best_of_n_from_samples(model, tokenizer, rewrite(tmp_path / "s.jsonl", rows))
    rows[2]["logprobs"][0] = 0.5
    for in_memory in (rows, Dataset.from_list(rows)):
        with pytest.raises(ValueError, match=r"samples\[2\]: `logprobs` of completion 1 is 0.5, positive"):
            best_of_n_from_samples(model, tokenizer, in_memory)


def test_bon_refuses_prompt_columns_it_writes(generated):
    """`bon --dataset_name` keeps the prompts' other columns: one named like an output column was overwritten."""
    from trl_sharpen.best_of_n_sampling import best_of_n

    model, tokenizer, prompts, *_ = generated
    clashing = prompts.add_column("selected_index", list(range(len(prompts))))
    with pytest.raises(ValueError, match=r"prompts have a column `selected_index` that Best-of-N writes.*rename"):
        best_of_n(model, tokenizer, clashing, num_samples=2, max_completion_length=4)
