"""Command-line plumbing shared by every stage script: one argparse class (no abbreviations,
one-line errors with "did you mean"), one error handler that turns a `ToolkitError` into one
`error: ...` line and its exit status, and the rank-0 logging set-up."""

from __future__ import annotations

import argparse
import difflib
import errno
import logging
import os
import sys
from typing import Any, Callable, NoReturn

from llama_sft.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_SIGINT, ToolkitError

logger = logging.getLogger("llama_sft")

EXIT_INTERRUPTED = EXIT_SIGINT  # Ctrl-C outside training (training saves a checkpoint, 130)

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


def describe_os_error(e: OSError) -> str:
    """`PATH: reason` for an OSError (never a traceback), naming both paths of a rename."""
    where = e.filename if e.filename is not None else ""
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    reason = e.strerror or str(e)
    return f"{where}: {reason}" if where else reason


def run_cli(body: Callable[[], int]) -> int:
    """Run a stage script's main body; turn an error into one `error: ...` message on stderr
    and an exit status, never a traceback:

      ToolkitError   its class's exit_code: 2 for BadInput, 1 for RunFailed (llama_sft.errors)
      OSError        2 when it is about a path (missing, a folder, not writable), else 1 (a full
                     disk, an I/O error)
      Ctrl-C         130 before or after training (training handles its own SIGINT)

    argparse's own errors (exit 2) and --help (exit 0) pass through as SystemExit. A bug
    (any other exception) keeps its traceback: hiding it would hide the bug."""
    try:
        return body()
    except SystemExit:
        raise
    except ToolkitError as e:
        return _print_error(f"{e.prefix}{e}", e.exit_code)
    except KeyboardInterrupt:
        return _print_error("interrupted (Ctrl-C)", EXIT_INTERRUPTED)
    except OSError as e:
        code = EXIT_BAD_INPUT if e.errno in _PATH_ERRNOS else EXIT_FAILED
        return _print_error(describe_os_error(e), code)


def _print_error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def setup_logging(verbose: bool = False) -> None:
    """One module logger; only rank 0 prints at INFO."""
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if rank == 0 else logging.WARNING
    if verbose:
        level = logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (and the only process otherwise)."""
    return int(os.environ.get("RANK", "0")) == 0
