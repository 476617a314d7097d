"""Small helpers shared by every stage: hashing, atomic writes, library versions, and the
command-line plumbing (one argparse class, one error handler, checks on the paths given)."""

from __future__ import annotations

import argparse
import difflib
import errno
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn

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


# --------------------------------------------------------------------------------------
# Command lines: one parser class and one error handler for every stage script
# --------------------------------------------------------------------------------------

EXIT_OK = 0
EXIT_FAILED = 1        # the work itself failed (a non-finite loss, a tampered archive)
EXIT_BAD_INPUT = 2     # flags, config, data or paths: change the command and run it again
EXIT_INTERRUPTED = 130  # Ctrl-C outside training (training saves a checkpoint and exits 130)

# errnos that mean "this path cannot be used as given" (bad input, exit 2); any other OSError
# (a full disk, an I/O error) is a failure of the run (exit 1).
_PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES,
                errno.EPERM, errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP}


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the stage scripts: no abbreviations, and an error is one line on stderr,
    `error: ...`, with a suggestion for a misspelt flag, instead of the whole usage block;
    exit status 2 as argparse's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"error: {message}{self._suggestions(message)}; see "
                                  f"`python3 {self.prog} --help` for every flag\n")

    def _suggestions(self, message: str) -> str:
        if not message.startswith("unrecognized arguments:"):
            return ""
        known = [s for s in self._option_string_actions if s.startswith("--")]
        hints = []
        for token in message.split(":", 1)[1].split():
            if not token.startswith("-"):
                continue
            flag = token.split("=", 1)[0]
            close = difflib.get_close_matches(flag.replace("_", "-"), known, n=1, cutoff=0.6)
            if close:
                hints.append(f"{flag}: did you mean {close[0]}?")
        return f" ({'; '.join(hints)})" if hints else ""


def _stage_errors() -> tuple[type[BaseException], ...]:
    """The toolkit's bad-input errors (imported here, not at the top: llama_io is a leaf)."""
    from llama_config import ConfigError
    from llama_dataset import DatasetError
    from llama_model import ModelLoadError

    return (ConfigError, DatasetError, ModelLoadError)


def describe_os_error(e: OSError) -> str:
    """`PATH: reason` for an OSError (never a traceback), naming both paths of a rename."""
    where = e.filename if e.filename is not None else ""
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    reason = e.strerror or str(e)
    return f"{where}: {reason}" if where else reason


def run_cli(body: Callable[[], int], *, bad_input: tuple[type[BaseException], ...] = (),
            failed: tuple[type[BaseException], ...] = (), failed_prefix: str = "") -> int:
    """Run a stage script's main body; turn an error into one `error: ...` message on stderr
    and an exit status, never a traceback:

      2  bad input: the toolkit's ConfigError, DatasetError, ModelLoadError, `bad_input`, and an
         OSError about a path (missing, a folder, not writable)
      1  `failed` (the work itself failed) and any other OSError (a full disk)
      130 Ctrl-C before or after training (training handles its own SIGINT: checkpoint, 130)

    argparse's own errors (exit 2) and --help (exit 0) pass through as SystemExit. A bug
    (any other exception) keeps its traceback: hiding it would hide the bug."""
    try:
        return body()
    except SystemExit:
        raise
    except _stage_errors() + tuple(bad_input) as e:  # before `failed`: may be a subclass
        return _print_error(str(e), EXIT_BAD_INPUT)
    except failed as e:
        return _print_error(f"{failed_prefix}{e}", EXIT_FAILED)
    except KeyboardInterrupt:
        return _print_error("interrupted (Ctrl-C)", EXIT_INTERRUPTED)
    except OSError as e:
        code = EXIT_BAD_INPUT if e.errno in _PATH_ERRNOS else EXIT_FAILED
        return _print_error(describe_os_error(e), code)


def _print_error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


# --------------------------------------------------------------------------------------
# Checks on paths and files given on the command line (each returns a problem or None)
# --------------------------------------------------------------------------------------


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
