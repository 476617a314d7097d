"""One run per output folder (RELIABILITY 16). A live llama_train.py / llama_pilot.py holds an
exclusive lock on `--output-dir/.run.lock`; a second run into that folder, with or without
--resume, is refused at once (OutputDirInUse, exit 2), naming the holder:

    error: --output-dir ./training_output is in use by another run: pid 4242 on gpu-node-3,
    started 2026-12-05 14:05:56 UTC (12 min ago), command: python3 llama_train.py ...

The lock is `flock(2)` on the file, so the kernel drops it when its holder dies, however it dies
(kill -9 included): a lock file whose holder is gone is simply taken over, with a notice naming
the dead run. The JSON body (LockHolder) is written once the lock is held, only to name the
holder. Only rank 0 takes the lock. It is released when the run ends, on every exit path, and the
file is removed then, so a finished run leaves no trace of it.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from llama_sft.cli import is_main_process
from llama_sft.errors import OutputDirInUse, RunSetupError
from llama_sft.layout import RUN_LOCK

logger = logging.getLogger("llama_sft")

# Filesystems where flock(2) is not available (some FUSE and old NFS mounts): run unlocked, with
# a warning, rather than refuse every run there.
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}
_MAX_COMMAND = 400  # characters of the holder's command line quoted in a refusal


@dataclass
class LockHolder:
    """The lock file's body: which run holds the folder."""

    pid: int
    host: str
    started: float  # time.time()
    command: str

    @classmethod
    def this_process(cls) -> "LockHolder":
        return cls(os.getpid(), socket.gethostname(), time.time(), shlex.join(sys.orig_argv))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self)) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "LockHolder | None":
        """None for an empty or unreadable body (a holder that died before writing it)."""
        try:
            d = json.loads(text)
            return cls(int(d["pid"]), str(d["host"]), float(d["started"]), str(d["command"]))
        except (ValueError, TypeError, KeyError):
            return None

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        minutes = max(0, int(time.time() - self.started) // 60)
        command = self.command if len(self.command) <= _MAX_COMMAND \
            else self.command[:_MAX_COMMAND] + " ..."
        return (f"pid {self.pid} on {self.host}, started {started} ({minutes} min ago), "
                f"command: {command}")


@dataclass
class _Held:
    fd: int
    path: Path
    created: list[Path] = field(default_factory=list)  # folders made for the lock, deepest last
    depth: int = 1  # nested holds in this process (the lock is re-entrant)


# Locks this process holds, by resolved folder: a second flock on a new descriptor of the same
# file would refuse this very process, so a nested hold only counts.
_HELD: dict[str, _Held] = {}


@contextmanager
def output_dir_lock(output_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the run lock on `output_dir` (created if missing) for the `with` block; refused with
    OutputDirInUse when another live process holds it. Rank 0 only: elsewhere a no-op."""
    key = acquire(Path(output_dir))
    try:
        yield
    finally:
        release(key)


def refuse_if_held(output_dir: Path) -> None:
    """OutputDirInUse when a live process holds the lock on `output_dir`; changes nothing on
    disk (no file, no folder made), so it can come before the checks that refuse a folder."""
    path = output_dir / RUN_LOCK
    if not is_main_process() or str(output_dir.resolve()) in _HELD or not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # gone meanwhile, or unreadable: acquire() decides
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputDirInUse(_in_use_message(output_dir, LockHolder.from_json(_read(fd)))) \
            from None
    except OSError:
        pass  # no locks on this filesystem: acquire() warns
    finally:
        os.close(fd)  # drops the shared lock, if it was taken


def acquire(output_dir: Path) -> str | None:
    """Take (or re-enter) the lock; returns the key for `release` (None off rank 0)."""
    if not is_main_process():
        return None
    key = str(output_dir.resolve())
    if key in _HELD:
        _HELD[key].depth += 1
        return key
    created = _make_folders(output_dir)
    try:
        fd, previous = _lock_file(output_dir, output_dir / RUN_LOCK)
    except BaseException:
        _remove_if_empty(created)
        raise
    if fd is None:
        _HELD[key] = _Held(-1, output_dir / RUN_LOCK, created)
        return key
    if previous is not None:
        logger.warning("took over the lock on --output-dir %s from a run that ended without "
                       "releasing it (%s): it was killed or crashed", output_dir,
                       previous.describe())
    body = LockHolder.this_process().to_json().encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, body, 0)
    os.fsync(fd)  # readers on other hosts of a shared filesystem see it
    _HELD[key] = _Held(fd, output_dir / RUN_LOCK, created)
    return key


def release(key: str | None) -> None:
    """Leave a hold; the last one removes the lock file, then drops the lock."""
    held = _HELD.get(key) if key is not None else None
    if held is None:
        return
    held.depth -= 1
    if held.depth > 0:
        return
    del _HELD[key]
    # Unlinked while still locked: a run that opened the old file meanwhile finds it gone from
    # the folder once it gets the lock, and locks a new one (see _lock_file).
    try:
        held.path.unlink()
    except OSError:
        pass
    if held.fd >= 0:
        os.close(held.fd)
    _remove_if_empty(held.created)


def _lock_file(output_dir: Path, path: Path) -> tuple[int | None, LockHolder | None]:
    """(descriptor holding the lock, the body a dead holder left); (None, None) where the
    filesystem has no locks."""
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = LockHolder.from_json(_read(fd))
            os.close(fd)
            raise OutputDirInUse(_in_use_message(output_dir, holder)) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_LOCKING:
                raise
            logger.warning("--output-dir %s: this filesystem cannot lock files (%s), so a second "
                           "run into this folder would not be refused; do not start one",
                           output_dir, e.strerror)
            return None, None
        if _is_current(fd, path):
            return fd, LockHolder.from_json(_read(fd))
        os.close(fd)  # the holder removed this file as it finished: lock the new one
    raise RunSetupError(f"--output-dir {output_dir}: could not take the lock {path} (it keeps "
                        "being replaced); is another run starting and stopping there?")


def _in_use_message(output_dir: Path, holder: LockHolder | None) -> str:
    who = holder.describe() if holder else "its details are not written yet (it is starting)"
    return (f"--output-dir {output_dir} is in use by another run: {who}. Two runs in one folder "
            "would overwrite each other's checkpoints and logs. Wait for it to finish, stop it "
            "(a SIGTERM saves a checkpoint; continue it later with --resume auto), or choose "
            "another --output-dir; nothing was written")


def _read(fd: int) -> str:
    return os.pread(fd, 1 << 16, 0).decode("utf-8", errors="replace")


def _is_current(fd: int, path: Path) -> bool:
    """Whether `fd` is still the file at `path` (not one unlinked by its last holder)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _make_folders(output_dir: Path) -> list[Path]:
    """mkdir -p; returns the folders it made, outermost first."""
    missing = []
    for q in (output_dir, *output_dir.parents):
        if q.exists():
            break
        missing.append(q)
    output_dir.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def _remove_if_empty(created: list[Path]) -> None:
    """Remove the folders made for the lock when nothing else was written into them: a run
    refused for bad input leaves no empty --output-dir behind."""
    for q in reversed(created):
        try:
            q.rmdir()
        except OSError:
            return
