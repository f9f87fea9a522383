"""Issue 11: no silent wrong results. Each test here failed on the code before its fix (truncation, majority with few
samples, chat prompts checked in every row, shard checksums, prompt-content fingerprints, output_dir over the input,
SFT on cut completions, one answer extractor per report, pi_base the same model everywhere, the sharpening error
measured at pi_base's most likely response)."""

import json
import logging
import os

import pytest
from datasets import Dataset

from trl_sharpen import best_of_n
from trl_sharpen.best_of_n_sampling import adaptive_stopping_index, select_best
from trl_sharpen.data import load_prompts, validate_prompt_dataset
from trl_sharpen.self_rewards import get_self_reward
from trl_sharpen.toy import load_toy_prompts


FAST = {"max_new_tokens": 40, "generation_batch_size": 128, "progress": False}


# 5. Truncation: a prefix never beats a complete answer ---------------------------------------------------------------


def test_a_truncated_sample_is_never_selected_while_a_complete_one_exists():
    rewards, truncated = [-5.0, -1.0, -3.0], [False, True, False]
    assert select_best(rewards, truncated, "keep", 10.0) == (2, rewards)  # complete first, then by reward
    assert select_best(rewards, truncated, "penalize", 10.0) == (2, [-5.0, -11.0, -3.0])
    assert select_best(rewards, truncated, "drop", 10.0) == (2, rewards)
    # The penalty is not what decides: a complete sample wins however far below the prefix it scores
    assert select_best([-500.0, -1.0], [False, True], "penalize", 100.0)[0] == 0
    # Every sample truncated: keep and penalize select the best prefix (flagged in `truncated`), drop selects none
    assert select_best([-3.0, -2.0], [True, True], "keep", 10.0)[0] == 1
    assert select_best([-3.0, -2.0], [True, True], "penalize", 10.0)[0] == 1
    assert select_best([-3.0, -2.0], [True, True], "drop", 10.0)[0] == -1


def test_adaptive_stopping_does_not_count_truncated_prefixes():
    mu = 3.0
    certain_prefix = [0.0, -10.0, -10.0, -10.0]  # a prefix of probability 1 would stop at k = 3
    assert adaptive_stopping_index(certain_prefix, mu) == 3
    assert adaptive_stopping_index(certain_prefix, mu, truncated=[True, False, False, False]) is None
    assert adaptive_stopping_index([0.0, 0.0, 0.0], mu, truncated=[True, False, False]) == 3


def test_adaptive_sampling_keeps_sampling_prompts_whose_samples_are_all_cut(toy_model, toy_tokenizer):
    # Two new tokens cut every completion: the likely prefixes must not stop sampling
    result = best_of_n(
        toy_model,
        toy_tokenizer,
        load_toy_prompts("test", limit=6),
        num_samples=8,
        adaptive_delta=0.5,
        adaptive_round_size=2,
        **{**FAST, "max_new_tokens": 2},
    )
    for row in result:
        if all(row["truncated"]):
            assert row["num_samples"] == 8


# 7. Majority: at least 3 samples, and a warning when most samples have no answer ------------------------------------


def test_majority_with_fewer_than_three_samples_is_refused(toy_model, toy_tokenizer):
    with pytest.raises(ValueError, match="majority.*at least 3 samples"):
        best_of_n(toy_model, toy_tokenizer, ["Q : 1 + 1 = ?"], num_samples=2, self_reward="majority", **FAST)


def test_majority_warns_when_most_samples_have_no_answer(caplog):
    reward = get_self_reward("majority")
    with caplog.at_level(logging.WARNING, logger="trl_sharpen"):
        assert reward(["q"] * 4, ["True", "False", "True", "so 7"], [[1]] * 4) == [0.0, 0.0, 0.0, 0.25]
    assert "3 of 4 completions (75%) have no answer" in caplog.text


# 9. Every row of chat prompts is checked ---------------------------------------------------------------------------


BAD_CHAT = [
    [{"role": "user", "content": "Q : 1 + 1 = ?"}],
    [{"role": "system", "content": "be careful"}, {"content": "Q : 2 + 2 = ?"}],
]


def test_a_later_chat_message_without_role_is_refused_naming_its_row(toy_model, toy_tokenizer):
    for prompts in (BAD_CHAT, Dataset.from_dict({"prompt": BAD_CHAT})):
        with pytest.raises(ValueError, match=r"Row 1 .*message 1 has no `role`"):
            validate_prompt_dataset(prompts)
        with pytest.raises(ValueError, match=r"Row 1 .*message 1 has no `role`"):
            best_of_n(toy_model, toy_tokenizer, prompts, num_samples=2, **FAST)
    with pytest.raises(ValueError, match=r"Row 2 .*int"):
        validate_prompt_dataset(["a", "b", 3])


def test_the_sft_trainer_checks_every_chat_row(tmp_path):
    from trl_sharpen import BoNSFTConfig, BoNSFTTrainer
    from trl_sharpen.toy import TOY_MODEL_PATH

    args = BoNSFTConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", num_samples=2, max_completion_length=16
    )
    with pytest.raises(ValueError, match=r"Row 1 .*message 1 has no `role`"):
        BoNSFTTrainer(model=TOY_MODEL_PATH, args=args, train_dataset=Dataset.from_dict({"prompt": BAD_CHAT}))


# 13. Prompts are fingerprinted by content, 14. output_dir never overwrites the input -------------------------------


def test_an_edited_prompts_file_with_the_same_mtime_is_not_served_stale(toy_model, toy_tokenizer, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q : {a} + 1 = ?"}) + "\n" for a in (1, 2)))
    stamp = path.stat().st_mtime_ns
    first = best_of_n(
        toy_model, toy_tokenizer, load_prompts(str(path)), num_samples=2, output_dir=tmp_path / "o", **FAST
    )
    assert first["prompt"] == ["Q : 1 + 1 = ?", "Q : 2 + 1 = ?"]
    path.write_text("".join(json.dumps({"prompt": f"Q : {a} + 3 = ?"}) + "\n" for a in (1, 2)))
    os.utime(path, ns=(stamp, stamp))
    edited = load_prompts(str(path))
    assert edited["prompt"] == ["Q : 1 + 3 = ?", "Q : 2 + 3 = ?"]  # `datasets`' cache keys on path + mtime
    with pytest.raises(ValueError, match="other arguments.*prompts"):
        best_of_n(toy_model, toy_tokenizer, edited, num_samples=2, output_dir=tmp_path / "o", **FAST)
    # The run's fingerprint is the content, whatever `datasets` takes for the dataset's identity
    one, other = Dataset.from_dict({"prompt": ["Q : 1 + 1 = ?"]}), Dataset.from_dict({"prompt": ["Q : 5 + 1 = ?"]})
    other._fingerprint = one._fingerprint
    best_of_n(toy_model, toy_tokenizer, one, num_samples=2, output_dir=tmp_path / "same", **FAST)
    with pytest.raises(ValueError, match="other arguments.*prompts"):
        best_of_n(toy_model, toy_tokenizer, other, num_samples=2, output_dir=tmp_path / "same", **FAST)


def test_output_dir_equal_to_the_input_dataset_is_refused(toy_model, toy_tokenizer, tmp_path):
    saved = tmp_path / "prompts"
    load_toy_prompts("test", limit=4).save_to_disk(str(saved))
    before = sorted(p.name for p in saved.iterdir())
    prompts = load_prompts(str(saved))
    with pytest.raises(ValueError, match="holds the input prompts"):
        best_of_n(toy_model, toy_tokenizer, prompts, num_samples=2, output_dir=saved, **FAST)
    assert sorted(p.name for p in saved.iterdir()) == before
