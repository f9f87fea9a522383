"""Bad input gets one clear line, before any expensive work (issue 11: items 8, 10, 11 and the class-B list).

Each case runs the real entry point: `trl-sharpen` in-process through `trl_sharpen.cli.main` (the console script's
function), the configs as the recipes build them, `best_of_n` / `evaluate_sharpening` from Python. At the command line
a case must exit 1 with `trl-sharpen: error: <message>` as the last line of stderr and no traceback; `load_model` is
replaced by a guard, so a case that would load a model before refusing fails. tests/BAD_INPUTS.md lists the messages.
"""

import json
import os
import subprocess
import sys

import pytest
from datasets import Dataset

from tests.trainer_args import cpu_test_args
from trl_sharpen import cli
from trl_sharpen.toy import TOY_DATA_DIR, TOY_MODEL_PATH


TEST_JSONL = f"{TOY_DATA_DIR}/test.jsonl"
BON = ["bon", "--model_name_or_path", TOY_MODEL_PATH, "--dataset_name", TEST_JSONL, "--num_prompts", "2"]
EVAL = ["eval", "--model_name_or_path", TOY_MODEL_PATH, "--dataset_name", TEST_JSONL, "--num_prompts", "2"]


@pytest.fixture
def cli_error(capsys, monkeypatch, tmp_path):
    """Run `trl-sharpen ARGS`; return the last line of stderr after checking the exit code and that no traceback and
    no model load happened."""
    monkeypatch.delenv("TRL_SHARPEN_DEBUG", raising=False)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(cli, "load_model", no_model)

    def run(argv, exit_code=1):
        if argv[0] == "bon" and "--output_dir" not in argv:
            argv = [*argv, "--output_dir", str(tmp_path / "out")]
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == exit_code
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        return err.strip().splitlines()[-1]

    return run


def write(path, text):
    path.write_text(text)
    return str(path)


def yaml_config(tmp_path, **settings):
    return write(tmp_path / "config.yaml", "".join(f"{key}: {json.dumps(value)}\n" for key, value in settings.items()))


# One line per bad input at the command line -------------------------------------------------------------------------

MISSING = "/nonexistent/prompts.jsonl"
CLI_CASES = {
    "missing dataset file": (
        ["bon", "--model_name_or_path", TOY_MODEL_PATH, "--dataset_name", MISSING],
        f"The dataset file {MISSING} does not exist: check the path (a Hub dataset is named like `org/name`).",
    ),
    "non-model directory": (
        ["bon", "--model_name_or_path", TOY_DATA_DIR, "--dataset_name", TEST_JSONL],
        f"--model_name_or_path {TOY_DATA_DIR} is a folder without a model (no config.json or adapter_config.json)",
    ),
    "missing model folder": (
        ["bon", "--model_name_or_path", "/nonexistent/model", "--dataset_name", TEST_JSONL],
        "--model_name_or_path /nonexistent/model does not exist: pass an existing model folder, or a Hub id.",
    ),
    "--shard_size 0": ([*BON, "--shard_size", "0"], "shard_size must be an integer >= 1, got 0."),
    "--sampling_batch_size 0": (
        [*BON, "--sampling_batch_size", "0"],
        "sampling_batch_size must be an integer >= 1, got 0.",
    ),
    "--generation_batch_size 0 (old name)": (
        [*BON, "--generation_batch_size", "0"],
        "sampling_batch_size must be an integer >= 1, got 0.",
    ),
    "bon --top_p 0": ([*BON, "--top_p", "0"], "top_p must be in (0, 1], got 0.0. top_p = 0 would make every sample"),
    "eval --top_p 0": ([*EVAL, "--top_p", "0"], "top_p must be in (0, 1], got 0.0."),
    "bon --temperature 0": ([*BON, "--temperature", "0"], "temperature must be > 0, got 0.0."),
    "--answer_column missing in bon": (
        [*BON, "--answer_column", "solution"],
        "--answer_column 'solution' is not a column of",
    ),
    "--use_peft in bon": ([*BON, "--use_peft"], "--use_peft adds a new adapter for training"),
    "missing --config file": (
        ["bon", "--config", "/nonexistent/bon.yaml"],
        "/nonexistent/bon.yaml does not exist (relative paths start at",
    ),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_refuses_with_one_line(cli_error, case):
    argv, message = CLI_CASES[case]
    assert cli_error(argv).startswith(f"trl-sharpen: error: {message}")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_samples": True}, "num_samples must be an integer >= 1, got True."),
        ({"num_samples": 2.5}, "num_samples must be an integer >= 1, got 2.5."),
        ({"top_k": False}, "top_k must be an integer >= 0, got False."),
        ({"dtype": "fp16"}, "dtype must be one of ['auto', 'bfloat16', 'float16', 'float32'], got 'fp16'"),
        ({"adaptive_delta": 1.5}, "adaptive_delta must be in (0, 1), got 1.5."),
        ({"truncated_completions": "skip"}, "truncated_completions must be one of ['keep', 'penalize', 'drop']"),
    ],
    ids=lambda value: str(value),
)
def test_yaml_values_that_argparse_never_sees_are_refused(cli_error, tmp_path, settings, message):
    # A YAML config sets defaults: its values skip argparse's type and choices checks
    line = cli_error([*BON, "--config", yaml_config(tmp_path, **settings)])
    assert line.startswith(f"trl-sharpen: error: {message}")


def test_argparse_catches_command_line_types_and_choices(cli_error, capsys):
    for argv in ([*BON, "--dtype", "fp16"], [*BON, "--num_samples", "2.5"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
    assert "invalid int value: '2.5'" in capsys.readouterr().err


def test_empty_jsonl(cli_error, tmp_path):
    empty = write(tmp_path / "empty.jsonl", "")
    line = cli_error(["bon", "--model_name_or_path", TOY_MODEL_PATH, "--dataset_name", empty])
    assert line == f"trl-sharpen: error: The dataset file {empty} is empty: it holds no prompts."


def test_chat_form_data_with_chat_prompts(cli_error, tmp_path):
    chat = tmp_path / "chat.jsonl"
    Dataset.from_dict({"prompt": [[{"role": "user", "content": "1 + 2 = ?"}]], "answer": ["3"]}).to_json(chat)
    line = cli_error(["bon", "--model_name_or_path", TOY_MODEL_PATH, "--dataset_name", str(chat), "--chat_prompts"])
    assert line.startswith("trl-sharpen: error: --chat_prompts wraps plain-text prompts as one user message, but")


@pytest.mark.parametrize("command", ["bon", "eval"])
def test_output_dir_that_is_a_file_or_not_writable(cli_error, tmp_path, command):
    argv = BON if command == "bon" else EVAL
    a_file = write(tmp_path / "a_file", "x")
    line = cli_error([*argv, "--output_dir", a_file])
    assert (
        line
        == f"trl-sharpen: error: output_dir {a_file} is a file, not a directory: pass a folder path (it is "
        + ("created if missing).")
    )
    # /proc refuses new files even to root (permission bits would not, so the check creates a file to find out)
    line = cli_error([*argv, "--output_dir", "/proc/trl_sharpen_test/out"])
    assert line.startswith("trl-sharpen: error: output_dir /proc/trl_sharpen_test/out is not writable")


def test_debug_flag_and_environment_bring_the_traceback_back(monkeypatch):
    with pytest.raises(ValueError, match="shard_size must be an integer >= 1"):
        cli.main([*BON, "--output_dir", "unused", "--shard_size", "0", "--debug"])
    monkeypatch.setenv("TRL_SHARPEN_DEBUG", "1")
    with pytest.raises(ValueError, match="shard_size must be an integer >= 1"):
        cli.main([*BON, "--output_dir", "unused", "--shard_size", "0"])


# Configs: refused when built, before any model or sampling -----------------------------------------------------------


def dpo_config(tmp_path, cls_name="SelfRewardDPOConfig", **overrides):
    from trl_sharpen.self_reward_dpo_config import SelfRewardDPOConfig
    from trl_sharpen.xpo_config import XPOConfig

    cls = {"SelfRewardDPOConfig": SelfRewardDPOConfig, "XPOConfig": XPOConfig}[cls_name]
    return cpu_test_args(cls, tmp_path / "out", **overrides)


BETA = "beta must be > 0, got {}. beta weighs the KL to pi_base"


@pytest.mark.parametrize(
    ("cls_name", "overrides", "message"),
    [
        ("SelfRewardDPOConfig", {"beta": 0.0}, BETA.format("0.0")),
        ("SelfRewardDPOConfig", {"beta": -0.5}, BETA.format("-0.5")),
        ("XPOConfig", {"beta": 0.0}, BETA.format("0.0")),
        ("SelfRewardDPOConfig", {"top_p": 0.0}, "top_p must be in (0, 1], got 0.0."),
        ("XPOConfig", {"top_p": 0.0}, "top_p must be in (0, 1], got 0.0."),
        ("SelfRewardDPOConfig", {"top_k": True}, "top_k must be an integer >= 0, got True."),
        ("SelfRewardDPOConfig", {"loss_type": "sharpn"}, "loss_type 'sharpn' is unknown; use one of ['sigmoid'"),
        ("SelfRewardDPOConfig", {"resume_from_checkpoint": "/nonexistent/checkpoint-5"}, "resume_from_checkpoint"),
        ("XPOConfig", {"stop_strings": ["Q:"]}, "stop_strings=['Q:'] is not supported by the DPO and XPO trainers"),
    ],
)
def test_dpo_and_xpo_configs_refuse(tmp_path, cls_name, overrides, message):
    with pytest.raises(ValueError) as error:
        dpo_config(tmp_path, cls_name, **overrides)
    assert str(error.value).startswith(message), str(error.value)


def test_unknown_loss_type_message_lists_sharpen_and_every_trl_loss(tmp_path):
    from trl import DPOConfig

    from trl_sharpen.self_reward_dpo_config import DPO_LOSS_TYPES

    with pytest.raises(ValueError) as error:
        dpo_config(tmp_path, loss_type=["sigmoid", "nope"])
    assert "'nope' is unknown" in str(error.value) and "'sharpen'" in str(error.value)
    trl_help = next(f for f in DPOConfig.__dataclass_fields__.values() if f.name == "loss_type").metadata["help"]
    assert {t for t in DPO_LOSS_TYPES if t != "sharpen"} == {t for t in DPO_LOSS_TYPES if f"'{t}'" in trl_help}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_samples": True}, "num_samples must be an integer >= 1, got True."),
        ({"num_samples": 2.5}, "num_samples must be an integer >= 1, got 2.5."),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0."),
        ({"shard_size": 0}, "shard_size must be an integer >= 1, got 0."),
        ({"resume_from_checkpoint": "/nonexistent/checkpoint-5"}, "resume_from_checkpoint /nonexistent/checkpoint-5 "),
    ],
)
def test_bon_sft_config_refuses(tmp_path, overrides, message):
    from trl_sharpen import BoNSFTConfig

    with pytest.raises(ValueError) as error:
        cpu_test_args(BoNSFTConfig, tmp_path / "out", **overrides)
    assert str(error.value).startswith(message), str(error.value)


# The Python API agrees with the command line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0."),
        ({"num_samples": True}, "num_samples must be an integer >= 1, got True."),
        ({"max_new_tokens": 0}, "max_completion_length must be an integer >= 1, got 0."),
    ],
)
def test_best_of_n_and_evaluate_sharpening_refuse_like_the_cli(toy_model, toy_tokenizer, kwargs, message):
    from trl_sharpen import best_of_n, evaluate_sharpening

    with pytest.raises(ValueError) as error:
        best_of_n(toy_model, toy_tokenizer, ["Q : 1 + 2 = ?"], **{"num_samples": 2, **kwargs})
    assert str(error.value).startswith(message)
    with pytest.raises(ValueError) as error:
        evaluate_sharpening(toy_model, toy_tokenizer, ["Q : 1 + 2 = ?"], ["3"], **{"num_samples": 2, **kwargs})
    assert str(error.value).startswith(message)


def test_changed_arguments_message_names_a_fix_every_entry_point_has(toy_model, toy_tokenizer, tmp_path):
    """The SFT recipe has no --overwrite: the message names deleting the folder, and the bon command's flag."""
    from trl_sharpen import best_of_n

    fast = {"max_completion_length": 8, "progress": False}
    best_of_n(toy_model, toy_tokenizer, ["Q : 1 + 2 = ?"], num_samples=2, output_dir=tmp_path, **fast)
    with pytest.raises(ValueError) as error:
        best_of_n(toy_model, toy_tokenizer, ["Q : 1 + 2 = ?"], num_samples=3, output_dir=tmp_path, **fast)
    assert f"delete {tmp_path}, or pass overwrite=True (`trl-sharpen bon --overwrite`)" in str(error.value)


# Recipes: the same one line -----------------------------------------------------------------------------------------


def test_recipe_prints_one_line_without_traceback(tmp_path):
    argv = [sys.executable, "recipes/dpo_sharpen.py", "--config", "recipes/dpo_sharpen/toy_cpu.yaml", "--beta", "0",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRL_SHARPEN_DEBUG"}
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(f"trl-sharpen: error: {BETA.format('0.0')}")
    assert "Traceback" not in out.stderr


def test_recipe_loaders_refuse_a_non_model_folder_and_a_missing_dataset_file():
    from trl import ModelConfig

    from trl_sharpen.script_utils import SharpenScriptArguments, load_model_name_and_tokenizer, load_prompt_datasets

    with pytest.raises(ValueError, match=f"--model_name_or_path {TOY_DATA_DIR} is a folder without a model"):
        load_model_name_and_tokenizer(ModelConfig(model_name_or_path=TOY_DATA_DIR), training_args=None)
    with pytest.raises(FileNotFoundError, match=f"The dataset file {MISSING} does not exist"):
        load_prompt_datasets(SharpenScriptArguments(dataset_name=MISSING))


# Issue 19: silent wrong results (C) and unclear errors (B), outside samples files ----------------------------------


def test_bon_refuses_rows_without_a_reference_answer_like_eval(cli_error, tmp_path):
    data = tmp_path / "nulls.jsonl"
    data.write_text('{"prompt": "Q : 1 + 2 = ?", "answer": "3"}\n{"prompt": "Q : 2 + 2 = ?", "answer": null}\n')
    for command in ("bon", "eval"):
        argv = [command, "--model_name_or_path", TOY_MODEL_PATH, "--dataset_name", str(data), "--answer_column"]
        line = cli_error([*argv, "answer"])
        assert line.startswith("trl-sharpen: error: 1 rows have no reference answer in `answer` (first: row 2"), line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num_test", "-5"], "--num_test must be a whole number from 1 to 100,000, got -5."),
        (["--num_train", "0"], "--num_train must be a whole number from 1 to 100,000, got 0."),
        (["--num_train", "1000000000"], "--num_train must be a whole number from 1 to 100,000, got 1e+09."),
        (["--num_shots", "-1"], "--num_shots must be a whole number from 0 to 64, got -1."),
    ],
)
def test_task_sizes_outside_their_range_are_refused_before_writing(tmp_path, capsys, argv, message):
    from trl_sharpen.tasks.__main__ import main as tasks_main

    for task in ("arithmetic", "prontoqa"):
        with pytest.raises(SystemExit) as exit_info:
            tasks_main([task, "--output_dir", str(tmp_path / "out"), *argv])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {message}")
    assert not (tmp_path / "out").exists()


FINITE = "must be a finite number, got {}."


@pytest.mark.parametrize(
    ("cls_name", "overrides", "message"),
    [
        ("SelfRewardDPOConfig", {"eval_beta": float("nan")}, "eval_beta " + FINITE.format("nan")),
        ("SelfRewardDPOConfig", {"beta": float("inf")}, "beta " + FINITE.format("inf")),
        ("XPOConfig", {"alpha": float("nan")}, "alpha " + FINITE.format("nan")),
        ("XPOConfig", {"alpha": [0.1, float("inf")]}, "alpha " + FINITE.format("inf")),
        ("SelfRewardDPOConfig", {"temperature": 1e-300}, "temperature must be >= 0.001, got 1e-300."),
        ("SelfRewardGRPOConfig", {"temperature": 1e-300}, "temperature must be >= 0.001, got 1e-300."),
        ("SelfRewardRLOOConfig", {"temperature": 0.0}, "temperature must be > 0, got 0.0."),
        ("SelfRewardGRPOConfig", {"eval_beta": float("nan")}, "eval_beta " + FINITE.format("nan")),
        ("SelfRewardDPOConfig", {"tie_tolerance": float("nan")}, "tie_tolerance " + FINITE.format("nan")),
        # fields inherited from TrainingArguments / TRL are covered by the same helper
        ("SelfRewardDPOConfig", {"learning_rate": float("nan")}, "learning_rate " + FINITE.format("nan")),
        ("SelfRewardDPOConfig", {"max_grad_norm": float("inf")}, "max_grad_norm " + FINITE.format("inf")),
        ("BoNSFTConfig", {"truncation_penalty": float("inf")}, "truncation_penalty " + FINITE.format("inf")),
        ("BoNSFTConfig", {"collapse_length_drop": float("nan")}, "collapse_length_drop " + FINITE.format("nan")),
        ("BoNSFTConfig", {"adam_beta1": float("nan")}, "adam_beta1 " + FINITE.format("nan")),
        (
            "XPOConfig",
            {"replay_buffer_size": 10**300},
            "replay_buffer_size is out of range (beyond 64-bit integers): got 1e+300.",
        ),
        (
            "SelfRewardDPOConfig",
            {"seed": -(10**400)},
            "seed is out of range (beyond 64-bit integers): got an integer of 401 digits.",
        ),
        # ...and their ranges, which transformers does not check (a negative learning rate trains uphill)
        ("SelfRewardDPOConfig", {"learning_rate": -1e-5}, "learning_rate must be >= 0, got -1e-05."),
        ("BoNSFTConfig", {"adam_beta2": 1.0}, "adam_beta2 must be in [0, 1), got 1.0."),
        ("XPOConfig", {"weight_decay": -0.1}, "weight_decay must be >= 0, got -0.1."),
        # transformers reads 0 as unset: no checkpoint was ever saved, or evaluation ran every logging_steps
        ("BoNSFTConfig", {"save_steps": 0}, "save_steps must be > 0, got 0."),
        ("SelfRewardDPOConfig", {"eval_steps": 0}, "eval_steps must be > 0, got 0."),
    ],
)
def test_every_float_setting_must_be_finite(tmp_path, cls_name, overrides, message):
    from trl_sharpen import BoNSFTConfig, SelfRewardDPOConfig, XPOConfig
    from trl_sharpen.self_reward_rl_config import SelfRewardGRPOConfig, SelfRewardRLOOConfig

    cls = {
        "SelfRewardDPOConfig": SelfRewardDPOConfig,
        "XPOConfig": XPOConfig,
        "BoNSFTConfig": BoNSFTConfig,
        "SelfRewardGRPOConfig": SelfRewardGRPOConfig,
        "SelfRewardRLOOConfig": SelfRewardRLOOConfig,
    }[cls_name]
    with pytest.raises(ValueError) as error:
        cpu_test_args(cls, tmp_path / "out", **overrides)
    assert str(error.value).startswith(message), str(error.value)


def test_every_float_field_of_our_configs_is_checked(tmp_path):
    """Generic, so held-out float settings are covered: NaN in any float field of any config is refused."""
    import dataclasses

    from trl_sharpen import BoNSFTConfig, SelfRewardDPOConfig, XPOConfig
    from trl_sharpen.self_reward_rl_config import SelfRewardGRPOConfig, SelfRewardRLOOConfig

    for cls in (BoNSFTConfig, SelfRewardDPOConfig, XPOConfig, SelfRewardGRPOConfig, SelfRewardRLOOConfig):
        config = cpu_test_args(cls, tmp_path / "out")
        floats = [f.name for f in dataclasses.fields(cls) if isinstance(getattr(config, f.name), float)]
        assert len(floats) > 10, floats
        for name in floats:
            with pytest.raises(ValueError, match=f"{name} must be|{name}="):
                cpu_test_args(cls, tmp_path / "out", **{name: float("nan")})


def test_cli_floats_and_huge_numbers(cli_error):
    assert cli_error([*BON, "--temperature", "nan"]).startswith("trl-sharpen: error: temperature must be")
    assert cli_error([*EVAL, "--temperature", "1e-300"]).startswith(
        "trl-sharpen: error: temperature must be >= 0.001, got 1e-300."
    )
    line = cli_error([*BON, "--shard_size", "-" + "9" * 300])
    assert line == "trl-sharpen: error: shard_size is out of range (beyond 64-bit integers): got -1e+300."
    line = cli_error([*BON, "--shard_size", "-" + "9" * 400])
    assert line.endswith("shard_size is out of range (beyond 64-bit integers): got an integer of 400 digits.")
    line = cli_error([*BON, "--shard_size", "-" + "9" * 15])
    assert line.startswith("trl-sharpen: error: shard_size must be an integer >= 1, got -1e+15.")


@pytest.mark.parametrize(
    ("metric", "expected"),
    [("kl", False), ("eval_kl", False), ("entropy", False), ("objective", True), ("loss", False), ("kll", None)],
)
def test_metric_for_best_model_has_a_direction_or_is_refused(tmp_path, metric, expected):
    from trl_sharpen import SelfRewardDPOConfig

    kwargs = {"metric_for_best_model": metric, "eval_strategy": "steps", "save_strategy": "steps"}
    if expected is None:
        with pytest.raises(
            ValueError, match=f"metric_for_best_model='{metric}' is not a metric with a known direction"
        ):
            cpu_test_args(SelfRewardDPOConfig, tmp_path / "out", **kwargs)
        # a metric of the user's own, with its direction given
        assert cpu_test_args(SelfRewardDPOConfig, tmp_path / "out", greater_is_better=True, **kwargs)
    else:
        assert cpu_test_args(SelfRewardDPOConfig, tmp_path / "out", **kwargs).greater_is_better is expected


def test_every_logged_monitoring_metric_has_a_direction(toy_model, toy_tokenizer, tmp_path):
    """The metrics an evaluation actually logs, not a list kept by hand."""
    from trl_sharpen import SelfRewardDPOTrainer
    from trl_sharpen.monitoring import HIGHER_IS_BETTER
    from trl_sharpen.toy import load_toy_prompts

    args = cpu_test_args(
        SelfRewardDPOTrainer._config_class, tmp_path, eval_num_prompts=2, eval_num_samples=2, max_completion_length=8
    )
    trainer = SelfRewardDPOTrainer(
        model=toy_model,
        args=args,
        train_dataset=load_toy_prompts("train").select(range(4)),
        eval_dataset=load_toy_prompts("test").select(range(2)),
        processing_class=toy_tokenizer,
    )
    logged = trainer.sharpening_metrics(trainer.eval_dataset)
    names = {key.removeprefix("eval_") for key in logged if not key.startswith("eval_cost")}
    assert {"kl", "entropy", "objective"} <= names
    assert names <= set(HIGHER_IS_BETTER) | {"epoch", "runtime", "samples_per_second", "steps_per_second"}, (
        names - set(HIGHER_IS_BETTER)
    )


def test_eval_reference_column_missing_from_the_eval_data_is_refused(toy_model, toy_tokenizer, tmp_path):
    from trl_sharpen import SelfRewardDPOTrainer
    from trl_sharpen.toy import load_toy_prompts

    args = cpu_test_args(SelfRewardDPOTrainer._config_class, tmp_path, eval_reference_column="solution")
    with pytest.raises(ValueError, match=r"eval_reference_column='solution' is not a column of eval_dataset"):
        SelfRewardDPOTrainer(
            model=toy_model,
            args=args,
            train_dataset=load_toy_prompts("train").select(range(4)),
            eval_dataset=load_toy_prompts("test").select(range(2)),
            processing_class=toy_tokenizer,
        )


@pytest.mark.parametrize(
    ("name", "delete"),
    [("self_reward_dpo", "optimizer.pt"), ("xpo", "xpo_replay_buffer_0.pt"), ("bon_sft", "scheduler.pt")],
)
def test_resume_from_an_incomplete_checkpoint_is_refused(tmp_path, name, delete):
    from tests.test_resume import make_trainer

    make_trainer(name, tmp_path).train()
    (tmp_path / "checkpoint-2" / delete).unlink()
    resumed = make_trainer(name, tmp_path)
    with pytest.raises(ValueError) as error:
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert str(error.value).startswith(f"Checkpoint {tmp_path}/checkpoint-2 is incomplete: {delete} is missing.")
    assert resumed.state.global_step == 0  # refused before any step


def test_resume_true_and_damaged_checkpoint_files(tmp_path):
    from tests.test_resume import make_trainer

    make_trainer("self_reward_dpo", tmp_path).train()
    # `true` (the string TrainingArguments reads from the command line) is the last checkpoint in output_dir
    resumed = make_trainer("self_reward_dpo", tmp_path)
    resumed.train(resume_from_checkpoint="true")
    assert resumed.state.global_step == 4
    state = tmp_path / "checkpoint-4" / "trainer_state.json"
    state.write_text(state.read_text()[:-10])
    with pytest.raises(ValueError, match=rf"{state} is damaged: it is not valid JSON"):
        make_trainer("self_reward_dpo", tmp_path).train(resume_from_checkpoint="true")
    weights = tmp_path / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{weights} is damaged \(truncated: "):
        make_trainer("self_reward_dpo", tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_a_damaged_model_folder_is_named(cli_error, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(TOY_MODEL_PATH, model)
    (model / "config.json").write_text('{"model_type": ')
    line = cli_error(["bon", "--model_name_or_path", str(model), "--dataset_name", TEST_JSONL])
    assert line.startswith(f"trl-sharpen: error: {model}/config.json is damaged: it is not valid JSON")


@pytest.mark.parametrize("option", [["--lora_r", "8"], ["--lora_target_modules", "q_proj"], ["--use_dora"]])
def test_lora_options_without_use_peft_are_refused(cli_error, tmp_path, option):
    from recipes.dpo_sharpen import make_parser
    from trl_sharpen.distributed import parse_args_and_config

    common = ["--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--bf16", "false"]
    with pytest.raises(ValueError, match=rf"{option[0]} .* set but --use_peft is not"):
        parse_args_and_config(make_parser(), [*common, *option])
    assert parse_args_and_config(make_parser(), [*common, "--use_peft", *option])
    assert "is set but --use_peft is not" in cli_error([*BON, *option])


def test_a_string_instead_of_a_prompt_list_is_refused(toy_model, toy_tokenizer):
    from trl_sharpen import best_of_n, evaluate_sharpening

    with pytest.raises(ValueError, match=r"prompts is a single string \('Q:1\+1=\?'\), not a list"):
        best_of_n(toy_model, toy_tokenizer, "Q:1+1=?", num_samples=2)
    with pytest.raises(ValueError, match="prompts is a single string"):
        evaluate_sharpening(toy_model, toy_tokenizer, "Q:1+1=?", "2", num_samples=2)


def test_a_recipe_reads_one_jsonl_file_like_bon_and_eval():
    from trl_sharpen.script_utils import SharpenScriptArguments, load_prompt_datasets

    dataset = load_prompt_datasets(SharpenScriptArguments(dataset_name=TEST_JSONL))
    assert list(dataset) == ["train"] and len(dataset["train"]) > 0 and "answer" in dataset["train"].column_names


def test_prompt_counts_below_one_are_refused(cli_error):
    from trl_sharpen.script_utils import SharpenScriptArguments

    for command in (BON, EVAL):
        assert cli_error([*command[:-2], "--num_prompts", "-5"]).startswith(
            "trl-sharpen: error: num_prompts must be an integer >= 1, got -5."
        )
    for name in ("num_train_prompts", "num_eval_prompts", "eval_max_completion_length"):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1, got 0."):
            SharpenScriptArguments(**{name: 0})
