"""The sampling settings, declared once (`trl_sharpen.sampling_arguments`): validation, old names, the fingerprint,
and that every entry point uses the same fields."""

import dataclasses
import subprocess
import sys
import warnings

import pytest

from trl_sharpen.sampling_arguments import (
    DEPRECATED_NAMES,
    BestOfNSamplingArguments,
    GenerationArguments,
    SamplingArguments,
    sampling_arguments,
)


INT_FIELDS = {"num_samples": 1, "top_k": 0, "max_completion_length": 1, "sampling_batch_size": 1, "shard_size": 1}


@pytest.mark.parametrize("name", INT_FIELDS)
@pytest.mark.parametrize("value", [True, False, 2.5, "3", -1])
def test_integer_settings_refuse_booleans_floats_strings_and_small_values(name, value):
    if isinstance(value, int) and not isinstance(value, bool) and value >= INT_FIELDS[name]:
        pytest.skip("a valid value")
    with pytest.raises(ValueError, match=rf"^{name} must be an integer >= {INT_FIELDS[name]}, got {value!r}\. "):
        BestOfNSamplingArguments(**{name: value})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"temperature": 0}, "temperature must be > 0, got 0."),
        ({"temperature": True}, "temperature must be > 0, got True."),
        ({"top_p": 0}, "top_p must be in (0, 1], got 0."),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5."),
        ({"adaptive_delta": 0.0}, "adaptive_delta must be in (0, 1), got 0.0."),
        ({"adaptive_delta": 1}, "adaptive_delta must be in (0, 1), got 1."),
        ({"truncation_penalty": -1.0}, "truncation_penalty must be >= 0, got -1.0."),
        ({"truncated_completions": "ignore"}, "truncated_completions must be one of ['keep', 'penalize', 'drop']"),
        ({"stop_strings": [""]}, "stop_strings must be a list of non-empty strings, got ['']."),
        ({"seed": True}, "seed must be an integer, got True."),
        ({"self_reward": 3}, "self_reward must be a name"),
    ],
)
def test_each_error_is_one_line_naming_setting_value_and_fix(settings, message):
    with pytest.raises(ValueError) as error:
        BestOfNSamplingArguments(**settings)
    text = str(error.value)
    assert text.startswith(message) and "\n" not in text


def test_valid_settings_and_defaults():
    args = BestOfNSamplingArguments(stop_strings="\n\nQ:", adaptive_delta=0.1, self_reward=len)
    assert args.stop_strings == ["\n\nQ:"]  # one string from the command line or YAML becomes a list
    assert (args.num_samples, args.max_completion_length, args.sampling_batch_size, args.shard_size) == (
        16,
        256,
        64,
        64,
    )
    assert args.sampling_config_kwargs() == {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "max_new_tokens": 256,
        "stop_strings": ["\n\nQ:"],
    }


@pytest.mark.parametrize(("old", "new"), list(DEPRECATED_NAMES.items()))
def test_old_field_names_still_work_with_a_future_warning(old, new):
    with pytest.warns(FutureWarning, match=f"`{old}` is deprecated.*use `{new}`"):
        args = BestOfNSamplingArguments(**{old: 7})
    assert getattr(args, new) == 7 and getattr(args, old) is None
    with pytest.raises(ValueError, match=f"Got both {old}=7 \\(deprecated\\) and {new}=5"):
        BestOfNSamplingArguments(**{old: 7, new: 5})


def test_python_keywords_build_validated_arguments_and_override_an_object():
    with pytest.warns(FutureWarning, match="`batch_size` is deprecated"):
        args = sampling_arguments(SamplingArguments, None, batch_size=4, max_new_tokens=None, top_p=0.5)
    assert (args.sampling_batch_size, args.top_p, args.max_completion_length) == (4, 0.5, 256)
    base = BestOfNSamplingArguments(num_samples=5, temperature=0.7)
    merged = sampling_arguments(BestOfNSamplingArguments, base, temperature=0.9)
    assert (merged.num_samples, merged.temperature) == (5, 0.9)
    with pytest.raises(TypeError, match="Unknown sampling argument"):
        sampling_arguments(SamplingArguments, None, num_sample=3)
    with pytest.raises(ValueError, match="top_p must be in"):
        sampling_arguments(SamplingArguments, base, top_p=0)


def test_fingerprint_keeps_the_keys_of_runs_written_before_the_rename():
    fingerprint = BestOfNSamplingArguments(max_completion_length=40, seed=3).fingerprint("logprob")
    assert fingerprint["max_new_tokens"] == 40 and fingerprint["self_reward"] == "logprob"
    assert fingerprint["adaptive_round_size"] is None  # only meaningful with adaptive sampling
    assert set(fingerprint) == {
        "num_samples", "self_reward", "temperature", "top_p", "top_k", "max_new_tokens", "stop_strings",
        "truncated_completions", "truncation_penalty", "adaptive_delta", "adaptive_round_size", "shard_size", "seed",
        "answer_gating",
    }  # fmt: skip
    # None without gating, so a run file written before `require_answer` existed (no such key) still resumes
    assert fingerprint["answer_gating"] is None
    gated = BestOfNSamplingArguments(answer_extractor="default").fingerprint("logprob")
    assert gated["answer_gating"] == "default"


def test_every_entry_point_uses_the_same_fields_and_help():
    from trl_sharpen import BoNSFTConfig
    from trl_sharpen.cli import BestOfNArguments, EvalArguments
    from trl_sharpen.self_reward_dpo_config import SelfRewardDPOConfig
    from trl_sharpen.xpo_config import XPOConfig

    def helps(cls):
        return {f.name: f.metadata.get("help") for f in dataclasses.fields(cls)}

    for user, shared in [
        (BoNSFTConfig, BestOfNSamplingArguments),
        (BestOfNArguments, BestOfNSamplingArguments),
        (EvalArguments, SamplingArguments),
        (SelfRewardDPOConfig, GenerationArguments),
        (XPOConfig, GenerationArguments),
    ]:
        assert issubclass(user, shared)
        for name, text in helps(shared).items():
            if name != "seed":  # the trainer configs keep TrainingArguments' seed
                assert helps(user)[name] == text, (user.__name__, name)


def test_bon_sft_config_adaptive_sampling_switch_is_deprecated(tmp_path):
    from tests.trainer_args import cpu_test_args
    from trl_sharpen import BoNSFTConfig

    with pytest.warns(FutureWarning, match="`adaptive_sampling` is deprecated"):
        assert cpu_test_args(BoNSFTConfig, tmp_path, adaptive_sampling=True).adaptive_delta == 0.1
    with pytest.warns(FutureWarning):
        off = cpu_test_args(BoNSFTConfig, tmp_path, adaptive_sampling=False, adaptive_delta=0.2)
    assert off.adaptive_delta is None
    with warnings.catch_warnings():
        # the new spelling warns about nothing of ours (transformers warns about its own renames)
        warnings.filterwarnings("error", message=".*will be removed in a future release", category=FutureWarning)
        config = cpu_test_args(BoNSFTConfig, tmp_path, adaptive_delta=0.2, shard_size=8, sampling_batch_size=16)
    assert (config.adaptive_delta, config.shard_size, config.num_samples, config.max_completion_length) == (
        0.2,
        8,
        50,
        40,
    )


def test_cli_help_lists_new_names_and_parses_old_ones(capsys):
    from trl import ModelConfig, TrlParser

    from trl_sharpen.cli import BestOfNArguments, main

    with pytest.raises(SystemExit):
        main(["bon", "--help"])
    out = capsys.readouterr().out
    assert "--max_completion_length" in out and "--sampling_batch_size" in out and "--stop_strings" in out
    assert "--max_new_tokens" not in out and "--generation_batch_size" not in out
    parser = TrlParser((BestOfNArguments, ModelConfig))
    with pytest.warns(FutureWarning):
        args, _ = parser.parse_args_and_config(["--output_dir", "x", "--max_new_tokens", "9"])
    assert args.max_completion_length == 9


def test_cli_module_imports_no_torch():
    code = (
        "import sys; import trl_sharpen.cli; "
        "heavy = [m for m in ('torch', 'datasets', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    help_out = subprocess.run(
        [sys.executable, "-c", "import sys; from trl_sharpen.cli import main; main(['--help']); "
         "assert 'torch' not in sys.modules"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert help_out.returncode == 0 and "commands: bon, eval" in help_out.stdout, help_out.stderr


def test_recipe_script_arguments_take_the_cli_names_and_the_old_ones():
    from trl_sharpen.script_utils import SharpenScriptArguments

    with pytest.warns(FutureWarning, match="`eval_answer_column` is deprecated"):
        args = SharpenScriptArguments(eval_answer_column="solution", eval_max_new_tokens=9)
    assert (args.answer_column, args.eval_max_completion_length) == ("solution", 9)


def test_recipe_yamls_use_no_deprecated_name():
    from tests.launching import REPO, parse_recipe_yaml

    for path in sorted((REPO / "recipes").glob("*/*.yaml")):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*will be removed in a future release", category=FutureWarning)
            parse_recipe_yaml(path)


def test_require_answer_defaults_to_on_exactly_when_an_extractor_is_set():
    from trl_sharpen.sampling_arguments import answer_gating_on

    assert not answer_gating_on(SamplingArguments().require_answer, None)
    assert answer_gating_on(SamplingArguments(answer_extractor="default").require_answer, "default")
    assert not answer_gating_on(False, "default")
    with pytest.raises(ValueError, match="require_answer=True needs an answer_extractor"):
        SamplingArguments(require_answer=True)
    with pytest.raises(ValueError, match="require_answer must be true, false or unset"):
        SamplingArguments(require_answer="yes", answer_extractor="default")
    with pytest.raises(ValueError, match="require_answer=True needs an answer_extractor"):
        from trl_sharpen import SelfRewardDPOConfig

        SelfRewardDPOConfig(output_dir="unused", use_cpu=True, bf16=False, require_answer=True)
