"""The bundled toy task and its tiny base model (see `trl_sharpen.toy.task` for the data-generating process).

>>> from transformers import AutoModelForCausalLM, AutoTokenizer
>>> from trl_sharpen.toy import TOY_MODEL_PATH, check_answer, load_toy_prompts
>>> model = AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH)
>>> tokenizer = AutoTokenizer.from_pretrained(TOY_MODEL_PATH)
>>> test_prompts = load_toy_prompts("test")  # 200 held-out prompts with reference answers
"""

from pathlib import Path

from ..answers import answers_match
from .data import DATA_DIR, load_toy_prompts


TOY_MODEL_PATH = str(Path(__file__).parent / "base_model")
TOY_DATA_DIR = str(DATA_DIR)


def check_answer(completion: str, answer: str) -> bool:
    """The toy task's answer checker: the last number of the completion equals the reference sum."""
    return answers_match(completion, answer)


__all__ = ["TOY_DATA_DIR", "TOY_MODEL_PATH", "check_answer", "load_toy_prompts"]
