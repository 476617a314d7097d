"""The toolkit's version and the installed versions of the libraries it records in run
configs, results and package metadata."""

from __future__ import annotations

import sys
from typing import Iterable

CORE_LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets",
                  "safetensors")


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


TOOLKIT_VERSION = "0.1.0"
