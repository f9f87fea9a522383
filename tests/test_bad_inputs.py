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
