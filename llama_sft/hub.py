"""Whether the Hugging Face hub can be reached, checked before a download would spend ~30 s in
retries (models in modeling/load.py, datasets in data/sources.py)."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_offline(*env_vars: str) -> bool:
    """HF_HUB_OFFLINE=1 (or one of `env_vars`) set, or the hub out of reach."""
    if any(os.environ.get(v) == "1" for v in ("HF_HUB_OFFLINE", *env_vars)):
        return True
    return not hub_reachable()
