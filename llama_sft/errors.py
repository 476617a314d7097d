"""The toolkit's errors. One base, `ToolkitError`; its subclass decides the exit status that
`cli.run_cli` returns, so a stage script never lists exception classes:

    BadInput     exit 2  the command, config, data or paths must change; nothing was written
    RunFailed    exit 1  the work itself failed (a non-finite loss, a tampered archive)
    Interrupted  130/143 stopped by SIGINT/SIGTERM

Each concrete class keeps the builtin base it had before the restructure (ValueError,
RuntimeError), so code that catches those still does.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class ToolkitError(Exception):
    """Base of every error the toolkit raises on purpose; the message says what to change."""

    exit_code = EXIT_FAILED
    prefix = ""  # put before the message on the `error:` line


class BadInput(ToolkitError):
    """Bad flags, config, data or paths: exit 2, nothing written."""

    exit_code = EXIT_BAD_INPUT


class RunFailed(ToolkitError):
    """The run started and failed: exit 1; what was written before is intact."""

    exit_code = EXIT_FAILED


class Interrupted(ToolkitError):
    """Stopped by a signal outside training (training saves a checkpoint and returns its code)."""

    exit_code = EXIT_SIGINT


class ConfigError(BadInput, ValueError):
    """A problem with flags or a config file; the message says what to change."""


class DatasetError(BadInput, ValueError):
    """Bad input data; the message names the file, the line and what to do."""


class ModelLoadError(BadInput, RuntimeError):
    """The model could not be found or loaded; the message says what to do."""


class RunSetupError(BadInput, RuntimeError):
    """The command cannot start this run as given (the output folder holds another run, the
    resume checkpoint is broken or from another config, flags that do not fit together)."""


class OutputDirInUse(RunSetupError):
    """Another live run holds the lock on --output-dir (training/lock.py); the message names it."""


class PackageError(BadInput, ValueError):
    """Bad packaging input; the message says what to change."""


class TrainingError(RunFailed, RuntimeError):
    """A training run cannot go on; the message says why and what to change."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or inf; the run stopped before that step's update."""


class NonFiniteWeightsError(TrainingError):
    """A trainable tensor is NaN or inf at a checkpoint: the checkpoint is not written."""


class DiskFullError(RunFailed, RuntimeError):
    """A write ran out of disk space or quota: the partial output was removed, what was written
    before is intact, and the message says how much space is needed and what to change."""


class VerifyError(RunFailed, RuntimeError):
    """The archive failed verification (tampered, unsafe or mismatching)."""

    prefix = "verification failed: "
