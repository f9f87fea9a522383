"""Issue 11: no silent wrong results. Each test here failed on the code before its fix (truncation, majority with few
samples, chat prompts checked in every row, shard checksums, prompt-content fingerprints, output_dir over the input,
SFT on cut completions, one answer extractor per report, pi_base the same model everywhere, the sharpening error
measured at pi_base's most likely response)."""

import json
import logging
import math
import os
import shutil
import struct

import pytest
import torch
from datasets import Dataset, load_from_disk

from trl_sharpen import BoNSFTConfig, best_of_n
from trl_sharpen.best_of_n_sampling import adaptive_stopping_index, select_best
from trl_sharpen.cli import main as cli_main
from trl_sharpen.data import load_prompts, validate_prompt_dataset
from trl_sharpen.evaluation import evaluate_sharpening
from trl_sharpen.report import GreedyEvaluation, SampleSet, SharpeningReport
from trl_sharpen.self_rewards import MajorityReward, get_self_reward
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
        load_toy_prompts("test", limit=4),
        num_samples=6,
        adaptive_delta=0.5,
        adaptive_round_size=3,
        **{**FAST, "max_new_tokens": 2},
    )
    all_cut = [row for row in result if all(row["truncated"])]
    assert all(row["num_samples"] == 6 for row in all_cut)
    # ...where counting the prefixes would have stopped some of them early
    assert any(adaptive_stopping_index(row["base_logprobs"], math.log(2 / 0.5)) < 6 for row in all_cut)


# 7. Majority: at least 3 samples, and a warning when most samples have no answer ------------------------------------


def test_majority_with_fewer_than_three_samples_is_refused(toy_model, toy_tokenizer, tmp_path, capsys):
    with pytest.raises(ValueError, match="majority.*at least 3 samples"):
        best_of_n(toy_model, toy_tokenizer, ["Q : 1 + 1 = ?"], num_samples=2, self_reward="majority", **FAST)
    # A reward object too (the settings only see names)
    with pytest.raises(ValueError, match="majority.*at least 3 samples"):
        best_of_n(toy_model, toy_tokenizer, ["Q : 1 + 1 = ?"], num_samples=2, self_reward=MajorityReward(), **FAST)
    # In the configs, before any model is loaded
    with pytest.raises(ValueError, match="majority.*at least 3 samples"):
        BoNSFTConfig(output_dir=str(tmp_path), self_reward="majority", num_samples=2)
    # The CLI refuses it in one line before loading the model (a model path that does not exist is not reached)
    argv = ["bon", "--model_name_or_path", str(tmp_path / "no-model"), "--dataset_name", str(tmp_path / "no.jsonl")]
    with pytest.raises(SystemExit):
        cli_main([*argv, "--self_reward", "majority", "--num_samples", "2", "--output_dir", str(tmp_path / "out")])
    assert "at least 3 samples per prompt" in capsys.readouterr().err


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
        with pytest.raises(ValueError, match=r"Row 2 .*message 2 has no `role`"):  # counted from 1
            validate_prompt_dataset(prompts)
        with pytest.raises(ValueError, match=r"Row 2 .*message 2 has no `role`"):
            best_of_n(toy_model, toy_tokenizer, prompts, num_samples=2, **FAST)
    with pytest.raises(ValueError, match=r"Row 3 .*int"):
        validate_prompt_dataset(["a", "b", 3])


def test_the_sft_trainer_checks_every_chat_row(tmp_path):
    from trl_sharpen import BoNSFTConfig, BoNSFTTrainer
    from trl_sharpen.toy import TOY_MODEL_PATH

    args = BoNSFTConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", num_samples=2, max_completion_length=16
    )
    with pytest.raises(ValueError, match=r"Row 2 .*message 2 has no `role`"):
        BoNSFTTrainer(model=TOY_MODEL_PATH, args=args, train_dataset=Dataset.from_dict({"prompt": BAD_CHAT}))


def test_the_dpo_trainer_checks_every_chat_row(toy_model, toy_tokenizer, tmp_path):
    from trl_sharpen import SelfRewardDPOTrainer

    from .trainer_args import online_trainer

    with pytest.raises(ValueError, match=r"Row 2 .*message 2 has no `role`"):
        online_trainer(
            SelfRewardDPOTrainer, tmp_path, toy_model, toy_tokenizer, Dataset.from_dict({"prompt": BAD_CHAT})
        )


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


# 12. Shards are checksummed: a corrupt shard is sampled again, never merged ----------------------------------------


class CountingReward:
    """`logprob` that counts its calls (one per shard sampled) and can run an action on a given call."""

    __name__ = "counting_logprob"

    def __init__(self, on_call=None):
        self.calls, self.on_call = 0, on_call or {}

    def __call__(self, prompts, completions, completion_ids, base_logprobs, **kwargs):
        self.calls += 1
        if self.calls in self.on_call:
            self.on_call[self.calls]()
        return base_logprobs


def corrupt(shard_dir):
    """Overwrite the first sampled token id of the shard with b"AAAA" in its arrow file: the shard still loads, with
    token id 1094795585 in a 113-token vocabulary (the issue's case)."""
    first = load_from_disk(str(shard_dir))[0]["completion_ids"][0]
    arrow = next(shard_dir.glob("data-*.arrow"))
    data = arrow.read_bytes()
    pattern = struct.pack("<2i", *first[:2])
    assert data.count(pattern) >= 1
    arrow.write_bytes(data.replace(pattern, b"AAAA" + pattern[4:], 1))
    assert load_from_disk(str(shard_dir))[0]["completion_ids"][0][0] == 1094795585  # silent: it loads


def test_a_corrupted_shard_is_sampled_again_and_named(toy_model, toy_tokenizer, tmp_path, caplog):
    prompts = load_toy_prompts("test", limit=8)
    kwargs = dict(num_samples=2, shard_size=4, output_dir=tmp_path, **FAST)
    good = best_of_n(toy_model, toy_tokenizer, prompts, self_reward=CountingReward(), **kwargs)
    good_ids = good["completion_ids"]
    corrupt(tmp_path / "shards" / "shard-00001")
    reward = CountingReward()
    with caplog.at_level(logging.WARNING, logger="trl_sharpen"):
        again = best_of_n(toy_model, toy_tokenizer, prompts, self_reward=reward, **kwargs)
    assert reward.calls == 1 and "shard-00001" in caplog.text and "checksum" in caplog.text
    assert again["completion_ids"] == good_ids  # same seed: the re-sampled shard is the one that was lost
    assert load_from_disk(str(tmp_path))["completion_ids"] == good_ids


def test_a_shard_corrupted_before_merging_never_reaches_the_final_dataset(toy_model, toy_tokenizer, tmp_path):
    prompts = load_toy_prompts("test", limit=8)
    kwargs = dict(num_samples=2, shard_size=4, output_dir=tmp_path, **FAST)
    good_ids = best_of_n(toy_model, toy_tokenizer, prompts, self_reward=CountingReward(), **kwargs)["completion_ids"]
    shutil.rmtree(tmp_path / "shards" / "shard-00001")
    # While shard 1 is sampled again, shard 0 goes bad on disk
    reward = CountingReward(on_call={1: lambda: corrupt(tmp_path / "shards" / "shard-00000")})
    with pytest.raises(RuntimeError, match="shard-00000.*checksum"):
        best_of_n(toy_model, toy_tokenizer, prompts, self_reward=reward, **kwargs)
    assert load_from_disk(str(tmp_path))["completion_ids"] == good_ids  # the good final dataset is kept
    assert (
        best_of_n(toy_model, toy_tokenizer, prompts, self_reward=CountingReward(), **kwargs)["completion_ids"]
        == good_ids
    )


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_a_shard_with_a_missing_or_corrupt_state_json_is_sampled_again(toy_model, toy_tokenizer, tmp_path, damage):
    prompts = load_toy_prompts("test", limit=8)
    kwargs = dict(num_samples=2, shard_size=4, output_dir=tmp_path, **FAST)
    good_ids = best_of_n(toy_model, toy_tokenizer, prompts, self_reward=CountingReward(), **kwargs)["completion_ids"]
    state = tmp_path / "shards" / "shard-00000" / "state.json"
    if damage == "missing":
        state.unlink()
    else:
        state.write_text("{not json")
    reward = CountingReward()
    assert best_of_n(toy_model, toy_tokenizer, prompts, self_reward=reward, **kwargs)["completion_ids"] == good_ids
    assert reward.calls == 1


def test_a_failed_first_run_does_not_lock_the_output_dir(toy_model, toy_tokenizer, tmp_path):
    prompts = load_toy_prompts("test", limit=4)

    def fail():
        raise KeyboardInterrupt("killed before any shard was written")

    with pytest.raises(KeyboardInterrupt):
        best_of_n(toy_model, toy_tokenizer, prompts, 2, CountingReward({1: fail}), output_dir=tmp_path, **FAST)
    result = best_of_n(toy_model, toy_tokenizer, prompts, num_samples=3, output_dir=tmp_path, **FAST)
    assert set(result["num_samples"]) == {3}


def test_an_unreadable_run_file_beside_shards_is_refused(toy_model, toy_tokenizer, tmp_path):
    prompts = load_toy_prompts("test", limit=4)
    best_of_n(toy_model, toy_tokenizer, prompts, num_samples=2, output_dir=tmp_path, **FAST)
    (tmp_path / "bon_run.json").write_text("{half written")
    with pytest.raises(ValueError, match="arguments cannot be read from .*bon_run.json"):
        best_of_n(toy_model, toy_tokenizer, prompts, num_samples=2, output_dir=tmp_path, **FAST)


# 6. SFT never trains on a Best-of-N completion cut by max_length ---------------------------------------------------


def test_sft_rows_longer_than_max_length_are_dropped_with_a_count(caplog):
    from trl_sharpen.bon_sft_trainer import selected_sequences

    bon = Dataset.from_dict(
        {
            "prompt_ids": [[1, 2], [1, 2, 3]],
            "selected_completion_ids": [[4, 5], [4, 5, 6, 7]],
            "selected_index": [0, 1],
        }
    )
    with caplog.at_level(logging.WARNING, logger="trl_sharpen"):
        assert selected_sequences(bon, max_length=5)["input_ids"] == [[1, 2, 4, 5]]
    assert "Dropped 1 of 2 Best-of-N rows" in caplog.text and "max_length=5" in caplog.text
    with pytest.raises(ValueError, match="Every Best-of-N row is longer than max_length=3"):
        selected_sequences(bon, max_length=3)


def test_the_sft_trainer_trains_only_on_whole_completions(toy_model, toy_tokenizer, tmp_path):
    from trl_sharpen import BoNSFTConfig, BoNSFTTrainer

    from .trainer_args import cpu_test_args

    bon = best_of_n(toy_model, toy_tokenizer, load_toy_prompts("test", limit=16), num_samples=2, **FAST)
    lengths = sorted(len(p) + len(c) for p, c in zip(bon["prompt_ids"], bon["selected_completion_ids"]))
    max_length = lengths[len(lengths) // 2]
    args = cpu_test_args(BoNSFTConfig, tmp_path, max_length=max_length, num_samples=2)
    trainer = BoNSFTTrainer(model=toy_model, args=args, train_dataset=bon, processing_class=toy_tokenizer)
    rows = trainer.train_dataset["input_ids"]
    assert len(rows) == sum(length <= max_length for length in lengths) < len(bon)
    assert all(row[-1] == toy_tokenizer.eos_token_id for row in rows)  # no answer without its end


# 15. One answer extractor for greedy and Best-of-N in the same report ---------------------------------------------


def constant_answer(text):
    """A custom extractor (`--answer_extractor tests.test_fidelity:constant_answer`): every completion answers 42."""
    return "42"


def test_bon_command_applies_the_answer_extractor_to_greedy_too(tmp_path, capsys):
    from trl_sharpen.cli import main
    from trl_sharpen.toy import TOY_MODEL_PATH

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q : {a} + 2 = ?", "answer": "42"}) + "\n" for a in (1, 2, 3)))
    main(["bon", "--model_name_or_path", TOY_MODEL_PATH, "--dataset_name", str(data), "--num_samples", "2",
          "--max_completion_length", "40", "--output_dir", str(tmp_path / "bon"), "--answer_column", "answer",
          "--answer_extractor", "tests.test_fidelity:constant_answer"])  # fmt: skip
    out = capsys.readouterr().out
    assert "greedy accuracy:            1.000" in out and "BoN@2 accuracy (logprob): 1.000" in out


# 2. pi_base is one model in a report, 1. the sharpening error is measured at pi_base's most likely response ---------


def lora_policy(model):
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    torch.manual_seed(1)
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0.0, 1.0)  # make the policy differ from its base
    return policy


def test_a_peft_policy_without_base_model_is_scored_under_its_base_everywhere(toy_model, toy_tokenizer):
    from transformers import AutoModelForCausalLM

    from trl_sharpen import sequence_logprobs
    from trl_sharpen.toy import TOY_MODEL_PATH

    base = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH).eval()
    test = load_toy_prompts("test", limit=6)
    report = evaluate_sharpening(
        lora_policy(toy_model), toy_tokenizer, test, num_samples=4, max_completion_length=40, self_rewards=("logprob",)
    )
    prompt_ids = [toy_tokenizer(p)["input_ids"] for p in test["prompt"]]
    s = report.samples
    flat_ids = [ids for row in s.completion_ids for ids in row]
    under_base = sequence_logprobs(base, [ids for ids in prompt_ids for _ in range(4)], flat_ids)
    flat = lambda rows: torch.tensor([value for row in rows for value in row])  # noqa: E731
    assert torch.allclose(flat(s.base_logprobs), under_base, atol=1e-3)  # the samples' pi_base: adapters off
    assert (flat(s.logprobs) - under_base).abs().max() > 0.1  # ...not the policy
    assert s.rewards["logprob"] == s.base_logprobs  # BoN by logprob ranks by that same pi_base
    greedy_under_base = sequence_logprobs(base, prompt_ids, report.greedy.completion_ids)
    assert report.greedy.mean_base_logprob == pytest.approx(greedy_under_base.mean().item(), abs=1e-3)
    assert not report.settings["base_is_model"]


def test_the_sharpening_error_is_measured_at_the_base_models_most_likely_response():
    """A policy collapsed onto a sample that pi_base rates low: delta = 1 - pi(y*) with y* = argmax pi_base is ~1,
    while 1 - max_i pi(y_i) (the policy's own mode) would be ~0."""
    base_logprobs, policy_logprobs = [[-1.0, -6.0, -7.0]], [[-9.0, -0.01, -8.0]]
    samples = SampleSet(
        [["a", "b", "c"]], [["1", "2", "3"]], [[True, False, False]], base_logprobs, policy_logprobs, [[False] * 3]
    )
    report = SharpeningReport.from_samples(samples, GreedyEvaluation(0.0, None, ["b"], [False]))
    assert report.sharpening_error == pytest.approx(1 - math.exp(-9.0)) and report.sharpened_fraction == 0.0
    # A truncated sample is a prefix, not a response: it is not y* while a complete sample exists
    samples.truncated = [[True, False, False]]
    report = SharpeningReport.from_samples(samples, GreedyEvaluation(0.0, None, ["b"], [False]))
    assert report.sharpening_error == pytest.approx(1 - math.exp(-0.01))
    # A greedy output that pi_base rates above every sample is y*
    samples.truncated, samples.mode_candidates = [[False] * 3], [[(-0.5, -12.0)]]
    report = SharpeningReport.from_samples(samples, GreedyEvaluation(0.0, None, ["b"], [False]))
    assert report.sharpening_error == pytest.approx(1 - math.exp(-12.0))


def test_a_collapsed_policy_reports_a_large_sharpening_error(toy_model, toy_tokenizer):
    """End to end: a policy that always answers with EOS at once (a response pi_base finds unlikely) is certain of
    its samples, yet far from pi_base's most likely response."""
    from transformers import AutoModelForCausalLM

    from trl_sharpen.toy import TOY_MODEL_PATH

    policy = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH).eval()
    head = policy.lm_head
    policy.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        policy.lm_head.weight.copy_(head.weight)
        policy.lm_head.bias.zero_()
        policy.lm_head.bias[toy_tokenizer.eos_token_id] = 100.0
    test = load_toy_prompts("test", limit=4)
    report = evaluate_sharpening(
        policy, toy_tokenizer, test, base_model=toy_model, num_samples=4, max_completion_length=40, self_rewards=()
    )
    assert all(ids == [toy_tokenizer.eos_token_id] for row in report.samples.completion_ids for ids in row)
    assert max(lp for row in report.samples.logprobs for lp in row) > -1e-3  # certain of its own samples
    assert report.sharpening_error > 0.99 and report.sharpened_fraction == 0.0


def no_answer(text):
    """An extractor that never finds an answer (e.g. True/False answers under a number extractor)."""
    return None


def test_evaluation_warns_when_majority_has_no_answers_to_vote_on(toy_model, toy_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_sharpen"):
        evaluate_sharpening(
            toy_model, toy_tokenizer, load_toy_prompts("test", limit=2), num_samples=4, max_completion_length=40,
            self_rewards=("majority",), answer_extractor=no_answer,
        )  # fmt: skip
    assert "8 of 8 samples (100%) have no answer" in caplog.text


# Issue 18: sampled from pi and scored as pi ---------------------------------------------------------------------------
def _dpo_trainer(tmp_path, model, toy_tokenizer, peft_config=None, **overrides):
    from tests.trainer_args import cpu_test_args
    from trl_sharpen import SelfRewardDPOConfig, SelfRewardDPOTrainer

    args = cpu_test_args(SelfRewardDPOConfig, tmp_path, eval_num_prompts=4, eval_num_samples=2, **overrides)
    return SelfRewardDPOTrainer(
        model=model, args=args, train_dataset=load_toy_prompts("train").select(range(8)),
        eval_dataset=load_toy_prompts("test").select(range(4)), processing_class=toy_tokenizer,
        peft_config=peft_config,
    )  # fmt: skip


def test_monitoring_ends_completions_at_the_runs_stop_strings(toy_model, toy_tokenizer, tmp_path):
    """Issue 18 case 6. Monitoring sampled without the run's stop strings (BoN-SFT's few-shot runs), so length, clipped
    ratio, answers, J_beta and delta measured completions other than the trained ones. Now they end where the run's
    do (at temperature 1: J_beta is defined for pi itself)."""
    from tests.trainer_args import cpu_test_args
    from trl_sharpen import BoNSFTTrainer
    from trl_sharpen.data import tokenize_prompt
    from trl_sharpen.generation import generate_completions, sampling_config, seeded

    stop = ["="]  # every toy completion writes "... = <n> . answer <n>"
    args = cpu_test_args(BoNSFTConfig, tmp_path, num_samples=2, eval_num_prompts=4, eval_num_samples=2,
                         stop_strings=stop)  # fmt: skip
    trainer = BoNSFTTrainer(
        model=toy_model, args=args, train_dataset=load_toy_prompts("train").select(range(4)),
        eval_dataset=load_toy_prompts("test").select(range(4)), processing_class=toy_tokenizer,
    )  # fmt: skip
    metrics = trainer.evaluate()
    # What monitoring must have sampled: the policy's samples that end at the stop string
    prompts = [tokenize_prompt(toy_tokenizer, p) for p in load_toy_prompts("test").select(range(4))["prompt"]]
    config = sampling_config(toy_model, toy_tokenizer, max_new_tokens=trainer.args.max_completion_length)
    with seeded(toy_model, trainer.args.seed):
        expected = generate_completions(toy_model, prompts, config, num_samples=2, tokenizer=toy_tokenizer,
                                        stop_strings=stop)  # fmt: skip
    assert sum(toy_tokenizer.decode(ids).endswith("=") for ids in expected.completion_ids) >= 2  # stopped there
    lengths = [len(ids) for ids in expected.completion_ids]
    assert metrics["eval_mean_length"] == pytest.approx(sum(lengths) / len(lengths))
    assert metrics["eval_clipped_ratio"] == 0.0


def test_pi_base_is_scored_without_dropout_on_the_peft_path(toy_tokenizer, tmp_path):
    """Issue 18 case 9. With PEFT, pi_base is the adapter-disabled policy, which is in train mode mid-step: its
    log-probs were scored with dropout on. Now in eval mode: the same values every time, those of the eval model."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from trl_sharpen.logprobs import sequence_logprobs
    from trl_sharpen.toy import TOY_MODEL_PATH

    model = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH, attention_dropout=0.5)
    trainer = _dpo_trainer(
        tmp_path, model, toy_tokenizer, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    trainer.model.train()
    prompts = [toy_tokenizer("Q : 3 + 5 = ?")["input_ids"]] * 2
    completions = [toy_tokenizer(" 8 . answer 8")["input_ids"], toy_tokenizer(" 9")["input_ids"]]
    first, second = trainer._base_logprobs(prompts, completions), trainer._base_logprobs(prompts, completions)
    assert trainer.model.training  # restored
    trainer.model.eval()
    with trainer.model.disable_adapter():
        expected = sequence_logprobs(trainer.model, prompts, completions)
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(second, expected, atol=1e-5, rtol=0)


def test_bon_sfts_frozen_base_runs_its_own_weights(toy_tokenizer, tmp_path):
    """The frozen pi_base copy of BoN-SFT (full fine-tuning) kept the instance `forward` TRL's fused head installed, a
    closure over the policy's bound forward: its forward (greedy generations in monitoring) ran the policy."""
    from tests.trainer_args import cpu_test_args
    from trl_sharpen import BoNSFTTrainer

    args = cpu_test_args(BoNSFTConfig, tmp_path, num_samples=2, sampling_policy="current", max_completion_length=8)
    trainer = BoNSFTTrainer(model=TOY_PATH(), args=args, train_dataset=load_toy_prompts("train").select(range(4)),
                            processing_class=toy_tokenizer)  # fmt: skip
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        before = trainer._frozen_base(input_ids=ids).logits
        for parameter in trainer.model.parameters():
            parameter.add_(0.1)  # the policy moves
        torch.testing.assert_close(trainer._frozen_base(input_ids=ids).logits, before)
        assert not torch.allclose(trainer.model(input_ids=ids).logits, before)


def TOY_PATH():
    from trl_sharpen.toy import TOY_MODEL_PATH

    return TOY_MODEL_PATH


@pytest.mark.parametrize("trainer_kind", ["dpo", "sft"])
def test_prompt_learning_adapters_are_refused_when_the_trainer_is_built(
    toy_model, toy_tokenizer, tmp_path, trainer_kind
):
    """Issue 18 case 3, at construction: a trainer given a prompt-tuning adapter refuses it in one line before any
    sampling or training (its samples and pi_base scores would be pi_base's, not the policy's)."""
    from peft import PromptTuningConfig

    from tests.trainer_args import cpu_test_args
    from trl_sharpen import BoNSFTTrainer

    peft_config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    with pytest.raises(ValueError, match=r"^PROMPT_TUNING adapters are not supported: .* Use LoRA"):
        if trainer_kind == "dpo":
            _dpo_trainer(tmp_path, toy_model, toy_tokenizer, peft_config=peft_config)
        else:
            BoNSFTTrainer(
                model=toy_model, args=cpu_test_args(BoNSFTConfig, tmp_path, num_samples=2), peft_config=peft_config,
                train_dataset=load_toy_prompts("train").select(range(4)), processing_class=toy_tokenizer,
            )  # fmt: skip
