"""Final-answer extraction, used by the `majority` self-reward and by evaluation.

The default extractor returns the content of the last `\\boxed{...}` if there is one (MATH-style answers), otherwise
the last number in the text (GSM8K-style and the toy task). Any `str -> str | None` callable can replace it; from YAML
or the command line, name it as `"package.module:function"`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable


AnswerExtractor = Callable[[str], "str | None"]

_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None  # unbalanced braces: the box was cut off


def normalize_number(text: str) -> str:
    """`"1,234.0"` -> `"1234"`, `"+7"` -> `"7"`; non-numbers are returned stripped."""
    text = text.strip().rstrip(".")
    candidate = text.replace(",", "").lstrip("+")
    try:
        value = float(candidate)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else repr(value)


def extract_answer(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, else the last number in `text`, else None."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return normalize_number(boxed)
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def answers_match(completion: str, reference: str, extractor: AnswerExtractor = extract_answer) -> bool:
    """Whether the answer extracted from `completion` equals the (normalized) reference answer."""
    predicted = extractor(completion)
    return predicted is not None and predicted == normalize_number(str(reference))


def load_callable(spec: str) -> Callable:
    """Import `"package.module:function"` (or `"package.module.function"`)."""
    module_name, _, attribute = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"Cannot import {spec!r}: expected 'package.module:function'.")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"Cannot import {spec!r}: {error}") from error


def get_answer_extractor(extractor: str | AnswerExtractor | None) -> AnswerExtractor:
    if extractor is None or extractor == "default":
        return extract_answer
    if isinstance(extractor, str):
        extractor = load_callable(extractor)
    if not callable(extractor):
        raise ValueError(f"The answer extractor must be callable, got {type(extractor).__name__}.")
    return extractor
