"""Bad input at the command line: one line, `trl-sharpen: error: <what is wrong and how to fix it>`, no traceback.

Used by `trl-sharpen` and by the `__main__` blocks of `recipes/*.py`. `--debug` (a bare flag, first removed from the
arguments) or `TRL_SHARPEN_DEBUG=1` lets the exception through with its traceback. Only the errors that describe the
input are shortened (ValueError, OSError: missing or unreadable files, ImportError: a missing optional package); any
other exception is a bug and keeps its traceback. Standard library only: `trl-sharpen --help` must stay light.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
from pathlib import Path


DEBUG_ENV = "TRL_SHARPEN_DEBUG"
USER_ERRORS = (ValueError, OSError, ImportError)


def pop_debug_flag(argv: list[str]) -> bool:
    """Remove a bare `--debug` from `argv` (in place); `--debug <value>` is left alone (TrainingArguments has a
    `--debug` option of its own that takes a value)."""
    found = False
    for i in reversed(range(len(argv))):
        if argv[i] == "--debug" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            del argv[i]
            found = True
    return found


def debug_requested(argv: list[str] | None = None) -> bool:
    return pop_debug_flag(sys.argv if argv is None else argv) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


@contextlib.contextmanager
def clear_errors(prog: str = "trl-sharpen", argv: list[str] | None = None):
    """Print a user error as one line and exit 1; with `--debug` / `TRL_SHARPEN_DEBUG=1`, re-raise it."""
    debug = debug_requested(argv)
    try:
        yield
    except Exception as error:
        yaml_error = type(error).__module__.startswith("yaml")  # a --config file that is not valid YAML
        if debug or not (isinstance(error, USER_ERRORS) or yaml_error):
            raise
        message = " ".join(str(error).split()) if yaml_error else str(error).strip()
        if yaml_error:
            message = f"the --config file is not valid YAML: {message}. Fix that line (YAML: `key: value` per line)."
        elif isinstance(error, FileNotFoundError) and error.filename and str(error).startswith("[Errno"):
            # the OS's bare "[Errno 2] No such file or directory: 'x'" names no fix (a mistyped --config, say)
            message = (
                f"{error.filename} does not exist (relative paths start at {os.getcwd()}). Check the path, or the "
                "option that gave it."
            )
        print(f"{prog}: error: {message or type(error).__name__}", file=sys.stderr, flush=True)
        sys.exit(1)


def check_output_dir(path: str | os.PathLike | None, option: str = "output_dir") -> None:
    """Refuse, before any work, an output directory that is the current directory (or above it, home, /), a file, or
    cannot be written (probed by creating a file: permission bits do not tell for root or read-only mounts)."""
    if path is None:
        return
    from .output_dir import check_safe_output_dir

    check_safe_output_dir(path, option)  # not '', '.', a folder above it, home or /
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, not a directory: pass a folder path (it is created if missing).")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {path} cannot be created: {existing} is a file. Pass a folder path.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(
            f"{option} {path} is not writable (creating a file in {existing} failed: {error.strerror or error}). Pass a "
            "folder you can write to."
        ) from error


LORA_OPTIONS = (
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_target_parameters",
    "lora_modules_to_save",
    "lora_task_type",
    "use_rslora",
    "use_dora",
)


def check_lora_options(model_args) -> None:
    """TRL's `ModelConfig` reads the LoRA options only with `use_peft`: without it they are silently ignored and the
    whole model is trained. Refuse any of them set to a value other than its default."""
    if getattr(model_args, "use_peft", True) or not dataclasses.is_dataclass(model_args):
        return
    defaults = {f.name: f.default for f in dataclasses.fields(model_args)}
    given = [name for name in LORA_OPTIONS if name in defaults and getattr(model_args, name) != defaults[name]]
    if given:
        shown = ", ".join(f"--{name} {getattr(model_args, name)!r}" for name in given)
        raise ValueError(
            f"{shown} {'is' if len(given) == 1 else 'are'} set but --use_peft is not: LoRA options only configure an "
            "adapter trained with --use_peft, so the whole model would be trained instead. Add --use_peft, or drop "
            "the LoRA options."
        )


def check_model_path(name_or_path: str, resolved: str, option: str = "--model_name_or_path") -> None:
    """A local model argument must be a model folder (checked before transformers fails on it with a message about
    tokenizer packages); a name that is not a local path is left to `from_pretrained` (a Hub id)."""
    path = Path(resolved).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
            raise ValueError(
                f"{option} {name_or_path} is a folder without a model (no config.json or adapter_config.json): pass "
                "a folder written by save_pretrained, a .gguf file, an installed model package or a Hub id."
            )
        from .checkpoints import check_model_files

        check_model_files(path)  # a damaged config or weights file is named, not a bare SafetensorError / JSON error
        check_adapter_base(path, name_or_path, option)
    elif path.exists():
        raise ValueError(f"{option} {name_or_path} is a file but not a .gguf model: pass a model folder or a Hub id.")
    elif name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1:
        raise ValueError(f"{option} {name_or_path} does not exist: pass an existing model folder, or a Hub id.")


def check_adapter_base(path: Path, name_or_path: str, option: str) -> None:
    """A PEFT adapter folder names its base model; a local base that is gone gave the Hub's "Repo id must be in the
    form 'repo_name'" error, which names neither the adapter nor the setting."""
    import json

    if (path / "config.json").is_file() or not (path / "adapter_config.json").is_file():
        return
    base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if isinstance(base, str) and base.startswith(("/", "./", "../", "~")) and not Path(base).expanduser().exists():
        raise ValueError(
            f"{option} {name_or_path} is a PEFT adapter whose base model {base} (base_model_name_or_path in its "
            "adapter_config.json) does not exist: restore that folder, or edit the path in adapter_config.json."
        )


def check_resume_from_checkpoint(value) -> None:
    """A checkpoint folder given to `resume_from_checkpoint` must exist, checked before Best-of-N sampling or model
    loading rather than when training starts."""
    if not isinstance(value, (str, os.PathLike)) or str(value).lower() in ("true", "false", ""):
        return  # unset, or True: the trainer looks for the last checkpoint in output_dir
    if not Path(value).is_dir():
        raise ValueError(
            f"resume_from_checkpoint {value} does not exist or is not a folder: pass a checkpoint folder "
            "(<output_dir>/checkpoint-<step>), or true to resume from the last checkpoint in output_dir."
        )


def check_text_fields(*parsed) -> None:
    """Text and list-of-text settings of parsed dataclasses hold what their type says. A YAML config bypasses
    argparse for values that are not strings (`dataset_name: 5`, `output_dir: null` crashed later with a TypeError),
    and a YAML string given to a list setting (`stop_strings: "\\n\\n"`, `self_rewards: logprob`) reached the code as
    a string, read one character at a time. Only fields typed exactly `str`, `str | None`, `list[str]` or
    `list[str] | None` are checked (TrainingArguments' union-typed fields are converted by transformers itself)."""
    import typing

    for value in parsed:
        if not dataclasses.is_dataclass(value):
            continue
        try:
            hints = typing.get_type_hints(type(value))
        except Exception:  # noqa: BLE001 (a class whose annotations cannot be resolved here: nothing to check)
            continue
        # list fields declared by trl_sharpen's classes only: TRL's own may be turned into a string on purpose
        # (ModelConfig makes a one-element `lora_target_modules` its string)
        ours = {
            name
            for cls in type(value).__mro__
            if cls.__module__.startswith("trl_sharpen")
            for name in vars(cls).get("__annotations__", {})
        }
        for item in dataclasses.fields(value):
            if not item.init or item.name.startswith("_") or item.name not in hints:
                continue
            hint, current = hints[item.name], getattr(value, item.name, None)
            optional = hint in (str | None, list[str] | None)  # typing.Optional[str] compares equal to these
            kind = "text" if hint in (str, str | None) else None
            if hint in (list[str], list[str] | None) and item.name in ours:
                kind = "list"
            if kind is None:
                continue
            if current is None:
                if not optional:
                    raise ValueError(f"{item.name} is null (None), but it needs a value: set it, or remove the line.")
            elif kind == "text" and not isinstance(current, str):
                raise ValueError(
                    f"{item.name} must be text, got {current!r} ({type(current).__name__}): quote it in the YAML "
                    f"file, e.g. {item.name}: '{current}'."
                )
            elif kind == "list" and isinstance(current, str):
                raise ValueError(
                    f"{item.name} must be a list, got the string {current!r}, which would be read one character at a "
                    f"time: write it as a list in the YAML file, e.g. {item.name}: [{json_repr(current)}]."
                )


def json_repr(text: str) -> str:
    import json

    return json.dumps(text)
