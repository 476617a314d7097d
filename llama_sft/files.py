"""Files on disk: sha256, atomic writes, the one manifest format (write / verify), checks on
paths given on the command line (each returns a problem or None), and how a full disk is told
apart from other write errors and explained (is_disk_full, disk_full_message)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

# The manifest: {"format_version": 1, "files": {relative path: sha256}}, written last into a
# folder (checkpoints, final_model/) so that its presence means the folder is complete.
MANIFEST = "checkpoint_manifest.json"
MANIFEST_VERSION = 1


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str, ensure_ascii=False) + "\n")


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing one of `path` and its parents when it is not a folder, else None."""
    for q in (path, *path.parents):
        if q.exists():
            return None if q.is_dir() else q
    return None


def output_dir_problem(flag: str, path: str | os.PathLike) -> str | None:
    """Why `path` cannot be (created as) an output folder: it, or a folder above it, is a file."""
    q = _file_in_the_way(Path(path))
    if q is None:
        return None
    where = "is a file" if q == Path(path) else f"cannot be created: {q} is a file"
    return f"{flag} {path} {where}, not a folder; choose another {flag}"


def output_file_problem(flag: str, path: str | os.PathLike,
                        example: str = "results.json") -> str | None:
    """Why `path` cannot be written as an output file: it is a folder, or above it is a file."""
    p = Path(path)
    if p.is_dir():
        return f"{flag} {path} is a folder; give a file name (e.g. {p / example})"
    q = _file_in_the_way(p.parent)
    if q is not None:
        return f"{flag} {path} cannot be written: {q} is a file, not a folder; choose another {flag}"
    return None


def same_file(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    """Whether two paths name the same file (an existing one, or the same resolved path)."""
    if not a or not b:
        return False
    try:
        if Path(a).exists() and Path(b).exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return Path(a).resolve() == Path(b).resolve()


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a readable safetensors file (checked from its header, without torch
    and without reading the tensors), or None."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{p.name} is empty or truncated ({size} bytes)"
            n = int.from_bytes(head, "little")
            if n < 2 or 8 + n > size:
                return f"{p.name} is truncated or not a safetensors file (header of {n} bytes " \
                       f"in a {size}-byte file)"
            header = json.loads(fh.read(n).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"{p.name} is not a readable safetensors file ({type(e).__name__})"
    if not isinstance(header, dict):
        return f"{p.name} is not a safetensors file (its header is not a JSON object)"
    end = max((int(v.get("data_offsets", [0, 0])[1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict)), default=0)
    if 8 + n + end > size:
        return f"{p.name} is truncated ({size} bytes, its header describes {8 + n + end})"
    return None


def write_manifest(folder: Path) -> None:
    """Fsync every file, then write the manifest (sha256 of each file) last."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    sums = {}
    for p in files:
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
        sums[str(p.relative_to(folder))] = sha256_file(p)
    write_json_atomic(folder / MANIFEST, {"format_version": MANIFEST_VERSION, "files": sums})
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    """Make a folder's entries (new files, a rename) durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def verify_manifest(folder: Path) -> str | None:
    """None when the folder is complete and every file matches its manifest, else the reason."""
    m = folder / MANIFEST
    if not m.is_file():
        return "no manifest (the save did not finish)"
    try:
        sums = json.loads(m.read_text())["files"]
        if not isinstance(sums, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return "unreadable manifest"
    for rel, digest in sums.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        if sha256_file(p) != digest:
            return f"{rel} does not match its sha256 (truncated or modified)"
    return None


# A write that found no room: the disk is full, or the user's quota is.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# How a library that drops the OSError still says it: Rust's io::Error (safetensors raises
# "I/O error: No space left on device (os error 28)") keeps the C library's text and the errno.
_DISK_FULL_TEXTS = tuple(t.lower() for n in sorted(DISK_FULL_ERRNOS)
                         for t in (os.strerror(n), f"(os error {n})"))
# torch.save(path) loses the errno altogether: its C++ writer reports "[enforce fail at
# inline_container.cc:672] . unexpected pos ..." (torch 2.x) or "PytorchStreamWriter failed
# writing file ...", while handling "basic_ios::clear: iostream error".
_ERRNO_LESS_WRITE_FAILURES = ("inline_container.cc", "pytorchstreamwriter", "iostream error",
                              "file write failed")
_ROOM_MARGIN = 1 << 20  # an errno-less write failure with less than this free is a full disk


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception it was raised from or while handling (cycles cut)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an exception in its chain (__cause__ / __context__), says the disk or the
    quota is full: an OSError with errno ENOSPC or EDQUOT, or the system's text for them in a
    wrapping error (safetensors' SafetensorError, torch.save to a file object's RuntimeError)."""
    for e in _exception_chain(exc):
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        text = str(e).lower()
        if any(t in text for t in _DISK_FULL_TEXTS):
            return True
    return False


def out_of_space(exc: BaseException, path: str | os.PathLike,
                 needed_bytes: int | None = None) -> bool:
    """is_disk_full(exc), or a write failure that lost its errno (torch.save to a path) while
    the filesystem of `path` has less than `needed_bytes` (and at least 1 MiB) free."""
    if is_disk_full(exc):
        return True
    if not any(m in str(e).lower() for e in _exception_chain(exc)
               for m in _ERRNO_LESS_WRITE_FAILURES):
        return False
    free = free_bytes(path)
    return free is not None and free < max(needed_bytes or 0, _ROOM_MARGIN)


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes this user may still write on the filesystem of `path` (or of its nearest existing
    parent), or None when it cannot be read."""
    for q in (Path(path), *Path(path).parents):
        if q.exists():
            try:
                return shutil.disk_usage(q).free
            except OSError:
                return None
    return None


def tree_bytes(path: str | os.PathLike) -> int:
    """The size of a file, or the sum over the files under a folder (0 when missing)."""
    p = Path(path)
    try:
        if p.is_file():
            return p.stat().st_size
        return sum(q.stat().st_size for q in p.rglob("*") if q.is_file())
    except OSError:  # a file removed while counting
        return 0


def format_bytes(n: int) -> str:
    """Decimal units, as `df -H` and file managers show them: 3.4 MB, 12.1 GB."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def disk_full_message(what: str, path: str | os.PathLike, needed_bytes: int | None) -> str:
    """`not enough disk space to write WHAT in PATH: it needs about N, M is free on that
    filesystem` (and, when M would be enough, that a quota or the inode count is the limit).
    Callers add what was kept and which flag to change."""
    free = free_bytes(path)
    need = (f"it needs about {format_bytes(needed_bytes)}" if needed_bytes
            else "how much it needs is unknown")
    have = (f"{format_bytes(free)} is free on that filesystem" if free is not None
            else "the free space there could not be read")
    text = f"not enough disk space to write {what} in {path}: {need}, {have}"
    if free is not None and needed_bytes and free >= needed_bytes:
        # The filesystem has room, so the write hit another limit (EDQUOT, or no inodes left).
        text += (" (that would be enough: the limit reached is a disk quota, see `quota -s`, or "
                 "the number of files, see `df -i`)")
    return text + "."
