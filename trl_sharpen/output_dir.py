"""Output folders: never write into a folder that cannot be ours, and never let two runs write one folder at once.

- `check_safe_output_dir`: refuse an empty path, the current directory or any folder above it, the home folder and
  `/` (`Path('')` is `.`: a run would write its files into, or replace, the folder the user works in).
- `output_dir_lock`: an exclusive lock on a folder for the length of a run. The lock is `fcntl.flock` on
  `<folder>/_trl_sharpen.lock` (the kernel drops it when its process dies, so a crashed run never leaves a stale
  lock behind); the file records who holds it (pid, host, command, start time) for the refusal line of a second run,
  which names that run. A lock file left by a dead process of this machine is taken over with a log line; one left by
  another machine is refused (its pid cannot be checked from here, and some NFS setups do not share flocks). Re-entrant within a
  process (a command that locks its folder may call code that locks it again). Under `accelerate launch` only the
  main process (RANK 0) locks: the ranks of one launch share their output_dir by design.

The `_` prefix keeps the file out of `Trainer.push_to_hub` uploads (they ignore `_*`). Standard library only: the
command line imports this before torch.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import fnmatch
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path


logger = logging.getLogger(__name__)

LOCK_FILE = "_trl_sharpen.lock"

_held: dict[str, list] = {}  # resolved lock path -> [open handle, depth]: this process's locks (re-entrancy)


def check_safe_output_dir(path: str | os.PathLike | None, option: str = "output_dir") -> None:
    """Refuse an output folder that is empty, the current directory or one of its ancestors, the home folder or `/`:
    results written there mix with the user's own files, and a folder replaced there would take them along."""
    if path is None:
        return
    text = os.fspath(path)
    if not str(text).strip():
        raise ValueError(
            f"{option} is empty (''), which means the current directory: pass a new or dedicated folder, e.g. "
            f"--{option} outputs/run1."
        )
    resolved = Path(text).expanduser().resolve()
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    if resolved == cwd or resolved in cwd.parents:
        where = "the current directory" if resolved == cwd else f"a folder above the current directory ({cwd})"
        raise ValueError(
            f"{option} {text} is {where}: the run would write into the folder you work in. Pass a dedicated "
            f"folder, e.g. --{option} outputs/run1."
        )
    if resolved == home or resolved == Path(resolved.anchor):
        raise ValueError(
            f"{option} {text} is {'your home folder' if resolved == home else 'the root folder'}: pass a dedicated "
            f"folder, e.g. --{option} outputs/run1."
        )


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def read_lock_holder(folder: str | os.PathLike) -> dict | None:
    """Who holds (or last held) the lock of `folder`, as written in its lock file, or None."""
    try:
        holder = json.loads((Path(folder) / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "another process (its lock file names no owner yet)"
    text = f"pid {holder.get('pid')} on {holder.get('hostname')}"
    if holder.get("started"):
        text += f", started {holder['started']}"
    if holder.get("command"):
        text += f": `{holder['command']}`"
    return text


def _open_locked(path: Path, blocking: bool, on_wait: Callable[[dict | None], None] | None):
    """An open handle of `path` holding its flock, or None when another process holds it (non-blocking)."""
    while True:
        handle = open(path, "a+")  # noqa: SIM115 (kept open while the lock is held)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                handle.close()
                raise
            if not blocking:
                handle.close()
                return None
            if on_wait is not None:
                on_wait(read_lock_holder(path.parent) if path.name == LOCK_FILE else _read_json(path))
            fcntl.flock(handle, fcntl.LOCK_EX)
        # The holder before us may have removed the file on release: a lock on a removed file protects nothing
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return handle
        handle.close()


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, wait: bool = True, what: str = "") -> Iterator[None]:
    """An exclusive lock on the file `path` (created if missing) that records its holder, shared by every process on
    the machine. `wait=True` waits for the holder, saying once on stderr who it is and what it does (`what`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def say_waiting(holder):
        print(f"Waiting for {describe_holder(holder)}, which holds {path}{what} ...", file=sys.stderr, flush=True)

    handle = _open_locked(path, blocking=wait, on_wait=say_waiting)
    if handle is None:
        raise BlockingIOError(errno.EWOULDBLOCK, f"{path} is locked by {describe_holder(_read_json(path))}")
    try:
        _write_holder(handle)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        handle.close()


def _write_holder(handle) -> None:
    holder = {
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python",
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(holder) + "\n")
    handle.flush()


def acquire_output_dir(folder: str | os.PathLike, option: str = "output_dir") -> Callable[[], None]:
    """Lock `folder` (created if missing) for this run and return the function that releases it. Refuses with one
    line naming the run that holds it. Re-entrant within a process; a no-op on ranks other than the main one."""
    if not _is_main_process():
        return lambda: None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / LOCK_FILE).resolve()
    key = str(path)
    if key in _held:
        _held[key][1] += 1
        return lambda: _release(key)
    previous = read_lock_holder(folder)
    handle = _open_locked(path, blocking=False, on_wait=None)
    if handle is None:
        raise ValueError(
            f"{option} {folder} is in use by another run ({describe_holder(read_lock_holder(folder))}). Wait for it "
            f"to finish, or pass another {option}: two runs writing one folder would mix their results."
        )
    if previous and previous.get("pid") != os.getpid():
        if previous.get("hostname") not in (None, socket.gethostname()):
            # A lock file is removed when its run ends. One left by another machine is either a live run on a shared
            # filesystem whose flock does not reach this machine (some NFS setups), or a run that died there: this
            # machine cannot tell its pid apart, so it refuses rather than mix results
            handle.close()
            raise ValueError(
                f"{option} {folder} is in use by a run on another machine ({describe_holder(previous)}). Wait for "
                f"it to finish, or pass another {option}; if that run is gone, delete {path}."
            )
        logger.info("%s: taking over the lock left by a run that ended (%s).", folder, describe_holder(previous))
    _write_holder(handle)
    _held[key] = [handle, 1]
    return lambda: _release(key)


def _release(key: str) -> None:
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[key]
    handle = entry[0]
    with contextlib.suppress(OSError):
        os.unlink(key)  # unlinked while still locked: a waiter re-checks the inode (see `_open_locked`)
    handle.close()


@contextlib.contextmanager
def output_dir_lock(folder: str | os.PathLike | None, option: str = "output_dir") -> Iterator[None]:
    """`acquire_output_dir` as a context manager; `folder=None` locks nothing."""
    release = acquire_output_dir(folder, option) if folder is not None else (lambda: None)
    try:
        yield
    finally:
        release()


# What a command wrote into its folder ----------------------------------------------------------------------------------

MANIFEST = "_trl_sharpen_files.json"  # {command: [names it wrote]}: what a later run of that command may replace


def _read_manifest(folder: Path) -> dict[str, list[str]]:
    value = _read_json(folder / MANIFEST)
    if not value:
        return {}
    return {str(k): [str(n) for n in v] for k, v in value.items() if isinstance(v, list)}


def _listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class OutputFiles:
    """The files a command writes directly into its output folder, recorded in `<folder>/_trl_sharpen_files.json`.

    A folder may be written when it is new or empty, or when it holds what an earlier run of the same command wrote
    (its manifest, or `legacy(folder)`: the names a run from before the manifest left, recognized by its own run
    file). Anything else in it is the user's (or another command's): the folder is refused unless `overwrite`, and
    even then only written beside those files: `claim(name)` refuses a name that exists and is not ours. A name is
    recorded before it is written, so a run that dies mid-write still knows the file as its own."""

    def __init__(
        self,
        folder: str | os.PathLike,
        command: str,
        *,
        overwrite: bool = False,
        option: str = "output_dir",
        overwrite_hint: str = "--overwrite",
        legacy: Callable[[Path], set[str]] | None = None,
        planned: tuple[str, ...] = (),
        who: str | None = None,
    ):
        self.folder, self.command, self.option = Path(folder), command, option
        self.who = who or f"trl-sharpen {command}"
        manifest = _read_manifest(self.folder)
        self.ours = set(manifest.get(command, []))
        if legacy is not None and self.folder.is_dir():
            self.ours |= legacy(self.folder)
        others = {n for k, names in manifest.items() if k != command for n in names}
        entries = sorted(p.name for p in self.folder.iterdir()) if self.folder.is_dir() else []
        foreign = [
            n
            for n in entries
            if n not in self.ours and n not in (LOCK_FILE, MANIFEST) and not n.startswith(f".{MANIFEST}.")
        ]
        self.previous_run = bool(self.ours)
        if foreign and not self.ours and not overwrite:
            whose = "another trl-sharpen command" if set(foreign) <= others else self.who
            raise ValueError(
                f"{option} {self.folder} already holds files that {whose} did not write ({_listing(foreign)}): pass a "
                f"new or empty folder, or {overwrite_hint} to write beside them (a file of yours is never replaced)."
            )
        # Names (or glob patterns) the run will write: one held by a file of the user's stops it now, not at the end
        self.claim(*(n for n in foreign if any(fnmatch.fnmatchcase(n, pattern) for pattern in planned)), record=False)

    def is_ours(self, name: str) -> bool:
        return name in self.ours

    def claim(self, *names: str, record: bool = True) -> None:
        """Record `names` as this command's before they are written; refuse one that exists and is not ours."""
        clash = [n for n in names if n not in self.ours and os.path.lexists(self.folder / n)]
        if clash:
            raise ValueError(
                f"{self.option} {self.folder} holds {_listing(clash)}, which {self.who} did not write: "
                f"it is never replaced. Move it away, or pass another {self.option}."
            )
        if not record or (set(names) <= self.ours and (self.folder / MANIFEST).is_file()):
            return
        self.ours |= set(names)
        manifest = _read_manifest(self.folder)
        manifest[self.command] = sorted(self.ours)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{MANIFEST}.{os.getpid()}"
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.folder / MANIFEST)
