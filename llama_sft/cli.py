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


class _DropMessage(logging.Filter):
    """Drops a third-party logger's records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# bitsandbytes 0.50 tries, at import on an AVX512-BF16 CPU, to fetch an optional hub kernel
# (`kernels` package, network) and logs a warning when it cannot; it then uses its own
# compiled CPU kernel for the same operation, so nothing is lost and nothing can be done.
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_HUB_KERNEL = "Failed to load CPU gemm_4bit_forward from kernels-community"


def silence_known_noise() -> None:
    """Filter the third-party messages a user cannot act on, each matched by its logger or
    module and the start of its text (anything else still shows). Idempotent.

    Not filtered: bitsandbytes' "an autograd kernel was not registered" UserWarning. It meant a
    real fault (the gradient through 4-bit layers was dropped after an evaluation), fixed in
    modeling/load.py keep_4bit_training_layout; if it shows again, it matters."""
    import warnings

    bnb_logger = logging.getLogger(_BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropMessage) for f in bnb_logger.filters):
        bnb_logger.addFilter(_DropMessage(_BNB_HUB_KERNEL))
    # peft 0.21's PeftModel.__init__ reads transformers' deprecated alias
    # `is_gradient_checkpointing` (same value as `is_activation_checkpointing`): peft's to fix.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                            category=FutureWarning, module=r"transformers\.modeling_utils")


def setup_logging(verbose: bool = False) -> None:
    """One module logger; only rank 0 prints at INFO (every rank, each line tagged with its
    rank, when LLAMA_SFT_LOG_ALL_RANKS=1: for debugging a distributed run). Known third-party
    noise is filtered (silence_known_noise)."""
    silence_known_noise()
    rank = int(os.environ.get("RANK", "0"))
    all_ranks = os.environ.get("LLAMA_SFT_LOG_ALL_RANKS") == "1"
    level = logging.INFO if rank == 0 or all_ranks else logging.WARNING
    if verbose:
        level = logging.DEBUG
    fmt = "%(asctime)s %(levelname)s %(message)s"
    if all_ranks and "WORLD_SIZE" in os.environ:
        fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (and the only process otherwise)."""
    return int(os.environ.get("RANK", "0")) == 0
