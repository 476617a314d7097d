"""W&B through transformers' integration: offline when no API key is configured, closed and
torn down after each run so the next run in the process logs to its own."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger("llama_sft")


def setup_wandb(cfg: Any) -> None:
    """W&B via the Trainer's integration; offline when no API key is configured."""
    os.environ.setdefault("WANDB_PROJECT", cfg.wandb_project)
    os.environ.setdefault("WANDB_LOG_MODEL", "false")
    if not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") is None:
        netrc = Path.home() / ".netrc"
        if not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")):
            os.environ["WANDB_MODE"] = "offline"
            logger.info("W&B: no API key found, logging offline (sync later with `wandb sync`)")


def finish_wandb() -> None:
    """Close this run's W&B run, so a later run in the same process starts its own."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
        # wandb.setup() caches settings (WANDB_DIR, mode) for the whole process; tear it down so
        # a later run in this process reads its own environment.
        if hasattr(wandb, "teardown"):
            wandb.teardown()
    except Exception as e:  # noqa: BLE001 - a tracker problem must not fail a finished run
        logger.warning("could not close the W&B run: %s", e)
