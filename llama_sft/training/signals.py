"""SIGINT/SIGTERM during training: the first finishes the step, saves a checkpoint and exits
130/143; a second one stops at once."""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("llama_sft")

EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass
class SignalCatcher:
    """First SIGINT/SIGTERM: finish the step, save a checkpoint, exit. Second: default action."""

    flag: dict[str, Any] = field(default_factory=dict)
    previous: dict[int, Any] = field(default_factory=dict)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.flag.get("signal") is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.flag["signal"] = signum
        logger.warning("received %s: finishing this step and saving a checkpoint (send it again "
                       "to stop at once)", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, prev in self.previous.items():
            signal.signal(sig, prev)
        return False
