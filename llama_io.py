"""Small file helpers shared by every stage: hashing, atomic writes, library versions."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable

CORE_LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets",
                  "safetensors")


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


def library_versions(names: Iterable[str] = CORE_LIBRARIES) -> dict[str, str]:
    """Installed versions of `names` (missing ones left out), plus Python's."""
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out
