"""Checkpoint and model folders checked before they are loaded, so that a damaged or incomplete one is refused with a
message naming the file, instead of a `SafetensorError` or a JSON error without a path, or a resume that silently
restarts a state it could not find.

- `check_model_files`: every JSON file and every safetensors header of a model folder parses, and each safetensors
  file is as long as its header says (a truncated download or copy).
- `check_resume_checkpoint`: the checkpoint a run resumes from holds everything the README's bit-identical resume
  needs: trainer state, weights, optimizer and scheduler (unless `save_only_model`), this process's RNG state, and
  what the trainer itself adds (XPO's replay buffer): `trainer.extra_checkpoint_files(folder)`. Transformers skips a
  missing optimizer or RNG file without a word, and the run then ends with other weights.

Standard library only (the command line checks model folders before torch is imported).
"""

from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from pathlib import Path


JSON_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "adapter_config.json",
    "model.safetensors.index.json",
    "trainer_state.json",
)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _check_json(path: Path) -> None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is damaged: it is not valid JSON ({error}). Restore or re-create that file."
        ) from None


def check_safetensors(path: Path) -> None:
    """The file's header (8-byte length, then JSON) parses and the file holds every byte the header lists."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        problem = None
        if len(head) < 8:
            problem = f"{size} bytes, too short for a header"
        else:
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                problem = f"its header claims {length} bytes, the file has {size}"
            else:
                try:
                    header = json.loads(handle.read(length))
                    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as error:
                    problem = f"its header is not valid ({error})"
                else:
                    if 8 + length + end > size:
                        problem = f"truncated: {size} bytes of the {8 + length + end} its header lists"
    if problem is not None:
        raise ValueError(f"{path} is damaged ({problem}). Restore or re-create that file (e.g. download it again).")


def check_model_files(folder: str | os.PathLike) -> None:
    """Refuse a model or checkpoint folder whose JSON files or safetensors files are damaged, naming the file."""
    folder = Path(folder)
    for name in JSON_FILES:
        if (folder / name).is_file():
            _check_json(folder / name)
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path)


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """`<output_dir>/checkpoint-<largest step>` (transformers' `get_last_checkpoint`), or None."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


def resolve_resume_value(value, output_dir) -> str | None:
    """What `resume_from_checkpoint` names: a folder, or for `true` (TrainingArguments reads it as the string 'true')
    the last checkpoint of `output_dir`; `false` / unset: None."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "false")):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() == "true"):
        found = last_checkpoint(output_dir) if output_dir is not None else None
        if found is None:
            raise ValueError(
                f"resume_from_checkpoint=true, but output_dir {output_dir} holds no checkpoint-<step> folder to resume "
                "from. Start without resume_from_checkpoint, or pass the checkpoint folder itself."
            )
        return str(found)
    return os.fspath(value)


def _zip_ok(path: Path) -> bool:  # torch.save writes a zip archive: a truncated one has no central directory
    try:
        with zipfile.ZipFile(path):
            return True
    except (zipfile.BadZipFile, OSError):
        return False


_SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
)


def check_same_model(folder: Path, model) -> None:
    """A checkpoint written by a run of another model (its config.json disagrees on the shape) is refused by name:
    loading it fails deep in `load_state_dict` with a size-mismatch RuntimeError."""
    config = getattr(getattr(model, "base_model", model), "config", None)
    config = getattr(model, "config", config)
    if config is None or not (folder / "config.json").is_file():
        return
    saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    differ = [
        f"{key} {saved[key]!r} there, {getattr(config, key)!r} here"
        for key in _SHAPE_KEYS
        if key in saved and hasattr(config, key) and saved[key] != getattr(config, key)
    ]
    if differ:
        raise ValueError(
            f"Checkpoint {folder} is of another model ({'; '.join(differ[:3])}): resume it with the model it was "
            "trained from (--model_name_or_path), or start again without resume_from_checkpoint."
        )


def check_resume_checkpoint(trainer, resume_from_checkpoint) -> str | None:
    """Refuse to resume from a checkpoint that lacks, or holds a damaged copy of, a file the resumed run needs;
    return the checkpoint folder (None when not resuming)."""
    args = trainer.args
    folder = resolve_resume_value(resume_from_checkpoint, args.output_dir)
    if folder is None:
        return None
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"resume_from_checkpoint {folder} does not exist or is not a folder.")
    deepspeed = getattr(trainer, "is_deepspeed_enabled", False)
    needed = ["trainer_state.json"]
    if not deepspeed:  # DeepSpeed keeps weights and optimizer in its own global_step* folder
        weights = (
            "model.safetensors",
            "model.safetensors.index.json",
            "adapter_model.safetensors",
            "pytorch_model.bin",
        )
        if not any((path / name).is_file() for name in weights):
            needed.append("model.safetensors")
        if not getattr(args, "save_only_model", False):
            needed += ["optimizer.pt", "scheduler.pt"]
    if not getattr(args, "save_only_model", False):
        world_size = getattr(args, "world_size", 1)
        needed.append(f"rng_state_{args.process_index}.pth" if world_size > 1 else "rng_state.pth")
    extra = getattr(trainer, "extra_checkpoint_files", None)
    if callable(extra):
        needed += list(extra(path))
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise ValueError(
            f"Checkpoint {folder} is incomplete: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing. "
            "Resuming would restart that state silently and end with other weights than the uninterrupted run. "
            "Resume from an earlier complete checkpoint, or start again without resume_from_checkpoint."
        )
    check_model_files(path)
    check_same_model(path, getattr(trainer, "model", None))
    for name in needed:
        if name.endswith((".pt", ".pth")) and not _zip_ok(path / name):
            raise ValueError(
                f"{path / name} is damaged (not a readable torch file). Resume from an earlier checkpoint."
            )
    return folder
