"""Best-of-N: selection, truncation policies, adaptive sampling, resumption, and bad input."""

import json
import logging

import pytest
import torch
from datasets import Dataset, load_from_disk

from trl_sharpen import best_of_n
from trl_sharpen.best_of_n_sampling import adaptive_stopping_index
from trl_sharpen.toy import check_answer, load_toy_prompts


FAST = {"max_new_tokens": 40, "generation_batch_size": 128, "progress": False}


@pytest.fixture(scope="module")
def prompts():
    return load_toy_prompts("test", limit=24)


def test_selects_the_argmax_of_the_rewards(toy_model, toy_tokenizer, prompts):
    result = best_of_n(toy_model, toy_tokenizer, prompts, num_samples=8, **FAST)
    assert len(result) == len(prompts)
    assert result["prompt"] == prompts["prompt"] and result["answer"] == prompts["answer"]  # input columns kept
    for row in result:
        assert len(row["completions"]) == len(row["rewards"]) == len(row["completion_ids"]) == row["num_samples"] == 8
        assert row["rewards"] == row["base_logprobs"]  # `logprob` reward, nothing truncated at 40 tokens
        best = max(range(8), key=lambda i: row["rewards"][i])
        assert row["selected_index"] == best
        assert row["selected_reward"] == max(row["rewards"])
        assert row["selected_completion"] == row["completions"][best]
        assert row["selected_completion_ids"] == row["completion_ids"][best]
        assert row["completion_ids"][best][-1] == toy_tokenizer.eos_token_id
    # the toy base's most likely sample is the careful solution: BoN is right where greedy is not
    accuracy = sum(check_answer(r["selected_completion"], r["answer"]) for r in result) / len(result)
    assert accuracy >= 0.9


@pytest.mark.parametrize("policy", ["keep", "penalize", "drop"])
def test_truncated_completions_are_flagged_and_handled(toy_model, toy_tokenizer, prompts, policy):
    # 8 new tokens cut every careful solution of 3+ terms; shortcuts ("answer N <eos>") still fit
    result = best_of_n(
        toy_model,
        toy_tokenizer,
        prompts,
        num_samples=6,
        max_new_tokens=8,
        truncated_completions=policy,
        progress=False,
    )
    flags = [flag for row in result for flag in row["truncated"]]
    assert any(flags) and not all(flags)
    for row in result:
        for ids, cut in zip(row["completion_ids"], row["truncated"]):
            assert cut == (toy_tokenizer.eos_token_id not in ids)
        selected = row["selected_index"]
        if not all(row["truncated"]):  # a prefix never wins while a complete answer exists (tests/test_fidelity.py)
            assert not row["truncated"][selected]
        if policy == "drop":
            assert selected == -1 if all(row["truncated"]) else not row["truncated"][selected]
            if selected == -1:
                assert row["selected_completion"] is None
        if policy == "penalize":
            for reward, logprob, cut in zip(row["rewards"], row["base_logprobs"], row["truncated"]):
                assert reward == pytest.approx(logprob - 100.0 if cut else logprob)


def test_adaptive_stopping_rule():
    mu = 3.0  # stop at the first k with k * max_j p_j >= mu
    assert adaptive_stopping_index([torch.log(torch.tensor(0.9)).item()] * 10, mu) == 4  # 4 * 0.9 >= 3
    assert adaptive_stopping_index([torch.log(torch.tensor(0.1)).item()] * 10, mu) is None  # 10 * 0.1 < 3
    assert adaptive_stopping_index([-10.0, -10.0, 0.0], mu) == 3  # a certain sample at k=3


def test_adaptive_sampling_spends_less_on_confident_prompts(toy_model, toy_tokenizer):
    prompts = load_toy_prompts("test", limit=80)
    result = best_of_n(
        toy_model, toy_tokenizer, prompts, num_samples=16, adaptive_delta=0.1, adaptive_round_size=2, **FAST
    )
    by_terms = {}
    for row in result:
        by_terms.setdefault(row["num_terms"], []).append(row["num_samples"])
        assert 1 <= row["num_samples"] <= 16
    easy = sum(by_terms[2]) / len(by_terms[2])  # the base puts ~0.85 on the careful solution
    hard = sum(by_terms[5]) / len(by_terms[5])  # ~0.30
    assert easy < hard
    assert sum(result["num_samples"]) < 16 * len(result)


class FailingOnSecondShard:
    """A logprob reward that dies on a chosen call, to simulate a run killed mid-way."""

    __name__ = "interruptible_logprob"

    def __init__(self, fail_on_call=None):
        self.calls, self.fail_on_call = 0, fail_on_call

    def __call__(self, prompts, completions, completion_ids, base_logprobs, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt("killed")
        return base_logprobs


def test_interrupted_run_resumes_without_losing_or_duplicating_rows(toy_model, toy_tokenizer, prompts, tmp_path):
    kwargs = dict(num_samples=4, shard_size=8, output_dir=tmp_path / "bon", seed=3, **FAST)
    with pytest.raises(KeyboardInterrupt):
        best_of_n(toy_model, toy_tokenizer, prompts, self_reward=FailingOnSecondShard(fail_on_call=2), **kwargs)
    shards = sorted(p.name for p in (tmp_path / "bon" / "shards").iterdir())
    assert shards == ["shard-00000"]  # the first shard was saved as soon as it was produced
    first_shard = load_from_disk(str(tmp_path / "bon" / "shards" / "shard-00000"))

    resumed_reward = FailingOnSecondShard()
    resumed = best_of_n(toy_model, toy_tokenizer, prompts, self_reward=resumed_reward, **kwargs)
    assert resumed_reward.calls == 2  # only the two missing shards were generated
    assert resumed["prompt_index"] == list(range(len(prompts)))
    assert resumed.select(range(8))["completion_ids"] == first_shard["completion_ids"]

    # same seed, uninterrupted: identical rows (each shard is seeded on its own)
    fresh = best_of_n(
        toy_model,
        toy_tokenizer,
        prompts,
        self_reward=FailingOnSecondShard(),
        **{**kwargs, "output_dir": tmp_path / "fresh"},
    )
    assert fresh["completion_ids"] == resumed["completion_ids"]
    assert load_from_disk(str(tmp_path / "bon"))["completion_ids"] == resumed["completion_ids"]
    run = json.loads((tmp_path / "bon" / "bon_run.json").read_text())
    assert run["num_samples"] == 4 and run["self_reward"] == "interruptible_logprob"


def test_resuming_with_other_arguments_is_refused(toy_model, toy_tokenizer, prompts, tmp_path):
    best_of_n(toy_model, toy_tokenizer, prompts, num_samples=2, output_dir=tmp_path, **FAST)
    with pytest.raises(ValueError, match="num_samples: 2 -> 3"):
        best_of_n(toy_model, toy_tokenizer, prompts, num_samples=3, output_dir=tmp_path, **FAST)
    again = best_of_n(toy_model, toy_tokenizer, prompts, num_samples=3, output_dir=tmp_path, overwrite=True, **FAST)
    assert set(again["num_samples"]) == {3}


def test_chat_prompts_use_the_chat_template(toy_model, toy_tokenizer):
    prompts = load_toy_prompts("test", conversational=True, limit=8)
    result = best_of_n(toy_model, toy_tokenizer, prompts, num_samples=8, **FAST)
    template = toy_tokenizer.apply_chat_template(prompts[0]["prompt"], add_generation_prompt=True, return_dict=True)
    assert result[0]["prompt_ids"] == list(template["input_ids"])
    assert sum(check_answer(r["selected_completion"], r["answer"]) for r in result) >= 7


def test_plain_list_of_prompts(toy_model, toy_tokenizer):
    result = best_of_n(toy_model, toy_tokenizer, ["Q : 1 + 1 = ?", "Q : 2 + 2 = ?"], num_samples=2, **FAST)
    assert result.column_names[0] == "prompt" and len(result) == 2


def test_majority_self_reward(toy_model, toy_tokenizer, prompts):
    result = best_of_n(toy_model, toy_tokenizer, prompts, num_samples=8, self_reward="majority", **FAST)
    for row in result:
        assert all(0.0 <= r <= 1.0 for r in row["rewards"])
    assert sum(check_answer(r["selected_completion"], r["answer"]) for r in result) / len(result) >= 0.8


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        (Dataset.from_dict({"question": ["1 + 1"]}), {}, "no `prompt` column; its columns are \\['question'\\]"),
        (Dataset.from_dict({"prompt": []}), {}, "empty"),
        ([], {}, "empty"),
        (["Q : 1 + 1 = ?"], {"num_samples": 0}, "num_samples must be an integer >= 1, got 0"),
        (["Q : 1 + 1 = ?"], {"self_reward": "likelihood"}, "Unknown self-reward 'likelihood'. Valid names"),
        (["Q : 1 + 1 = ?"], {"truncated_completions": "ignore"}, "truncated_completions must be one of"),
        (["Q : 1 + 1 = ?"], {"adaptive_delta": 1.5}, "adaptive_delta must be in \\(0, 1\\)"),
        (
            ["Q : " + " + ".join(["1"] * 60) + " = ?"],
            {"max_new_tokens": 40},
            r"Prompt 1 \(counting from 1\) is 123 tokens long; with max_completion_length=40 .*maximum length of 128",
        ),
        (
            Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]}),
            {},
            "Got a preference dataset",
        ),
        (Dataset.from_dict({"prompt": ["a"], "completion": ["b"]}), {}, "Got a prompt-completion dataset"),
    ],
)
def test_bad_input_is_named(toy_model, toy_tokenizer, prompts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        best_of_n(toy_model, toy_tokenizer, prompts, **{"num_samples": 2, **FAST, **kwargs})


def test_chat_prompts_without_chat_template_are_refused(toy_model, toy_tokenizer):
    toy_tokenizer = type(toy_tokenizer).from_pretrained(toy_tokenizer.name_or_path)
    toy_tokenizer.chat_template = None
    with pytest.raises(ValueError, match="tokenizer has no chat template"):
        best_of_n(toy_model, toy_tokenizer, [[{"role": "user", "content": "1 + 1 = ?"}]], num_samples=2, **FAST)


def test_missing_pad_token_falls_back_to_eos_with_a_warning(toy_model, toy_tokenizer, caplog):
    tokenizer = type(toy_tokenizer).from_pretrained(toy_tokenizer.name_or_path)
    tokenizer.pad_token = None
    with caplog.at_level(logging.WARNING):
        result = best_of_n(toy_model, tokenizer, ["Q : 1 + 2 = ?", "Q : 3 + 4 + 5 = ?"], num_samples=4, **FAST)
    assert "no pad token" in caplog.text and tokenizer.pad_token == tokenizer.eos_token
    for row in result:  # completions still end at their (single) EOS
        for ids, cut in zip(row["completion_ids"], row["truncated"]):
            assert cut or ids.count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id


def careful_steps_are_no_answer(text: str) -> str | None:
    """A test extractor that finds no answer in the toy's careful solutions (they have `=` steps), only in the
    shortcuts ("answer N"): the base's most likely samples then have no answer, so gating must change the choice."""
    return None if "=" in text else text.split()[-1]


def test_answer_gating_never_selects_a_completion_without_an_answer(toy_model, toy_tokenizer, prompts):
    extractor = "tests.test_best_of_n:careful_steps_are_no_answer"
    ungated = best_of_n(toy_model, toy_tokenizer, prompts, num_samples=8, **FAST)
    gated = best_of_n(toy_model, toy_tokenizer, prompts, num_samples=8, answer_extractor=extractor, **FAST)
    off = best_of_n(
        toy_model, toy_tokenizer, prompts, num_samples=8, answer_extractor=extractor, require_answer=False, **FAST
    )
    assert off["selected_index"] == ungated["selected_index"]  # require_answer=False: by reward, as before
    changed = 0
    for row, before in zip(gated, ungated):
        assert row["completions"] == before["completions"]  # same samples, only the choice differs
        answered = [
            careful_steps_are_no_answer(t) is not None and not cut
            for t, cut in zip(row["completions"], row["truncated"])
        ]
        if any(answered):
            assert answered[row["selected_index"]]
            best_answered = max((i for i in range(8) if answered[i]), key=lambda i: row["rewards"][i])
            assert row["selected_index"] == best_answered
        else:
            assert row["selected_index"] == before["selected_index"]
        changed += row["selected_index"] != before["selected_index"]
    assert changed > 0  # the careful solutions win without gating: the test reaches the gated case
