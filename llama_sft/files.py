"""Files on disk: sha256, atomic writes, the one manifest format (write / verify), and checks on
paths given on the command line (each returns a problem or None)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

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
