"""`trl-sharpen bon` / `eval` with `--load_in_4bit` / `--load_in_8bit` (issue 18's class "samples from a dtype we
cannot guarantee"): without bitsandbytes, refused in one line before any data or model loads (transformers said so
only after the data loaded); with the CLI's default `--dtype auto`, 4-bit loading crashed with a traceback in TRL's
`get_quantization_config` (`torch.auto`)."""

import importlib.util

import pytest
from trl import ModelConfig

from trl_sharpen.cli import check_model_config, quantization_config_of


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed here")
@pytest.mark.parametrize("option", ["load_in_4bit", "load_in_8bit"])
def test_quantized_loading_without_bitsandbytes_is_refused_in_one_line(option):
    with pytest.raises(ImportError, match=r"^--load_in_4bit / --load_in_8bit need bitsandbytes[^\n]*$"):
        check_model_config(ModelConfig(model_name_or_path="m", dtype="auto", **{option: True}))


def test_4bit_loading_with_the_clis_auto_dtype_builds_its_config():
    config = quantization_config_of(ModelConfig(model_name_or_path="m", dtype="auto", load_in_4bit=True))
    assert config.load_in_4bit
    explicit = quantization_config_of(ModelConfig(model_name_or_path="m", dtype="bfloat16", load_in_4bit=True))
    assert str(explicit.bnb_4bit_compute_dtype) == "torch.bfloat16"
    assert quantization_config_of(ModelConfig(model_name_or_path="m", dtype="auto")) is None
