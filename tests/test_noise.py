"""Third-party log noise a user cannot act on stays out of a run's output (cli.silence_known_noise),
and only that: other warnings of the same loggers and categories still show. Run in fresh
processes, since bitsandbytes logs its message once, at import."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from helpers import ROOT, tiny_args

NOISE = ("Failed to load CPU gemm_4bit_forward from kernels-community",
         "an autograd kernel was not registered",
         "`is_gradient_checkpointing` is deprecated")

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="needs bitsandbytes")


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONWARNINGS": "default"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@needs_bnb
def test_a_short_4bit_training_run_logs_no_known_noise(tmp_path, tiny_llama_dir):
    """--use-4bit with an evaluation before a training step: the path that printed all three
    (the autograd one because the gradient was really dropped: test_generation_model.py)."""
    argv = tiny_args(tmp_path, tiny_llama_dir, "run", "--use-4bit", "--max-steps", "2",
                     "--eval-steps", "1", "--save-steps", "2")
    out = _run(f"import sys, llama_train; sys.exit(llama_train.main({argv!r}))")
    assert "step 2/2" in out or "final_model" in out, out[-2000:]
    for line in NOISE:
        assert line not in out, f"{line!r} in the run's output"


@needs_bnb
def test_other_warnings_of_the_same_sources_still_show():
    out = _run(
        "import logging, warnings\n"
        "from llama_sft.cli import setup_logging\n"
        "setup_logging()\n"
        "import bitsandbytes\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another bnb warning')\n"
        "import transformers.modeling_utils as mu\n"
        "exec(\"import warnings\\nwarnings.warn('a real FutureWarning', FutureWarning)\", "
        "vars(mu))\n"
        "warnings.warn('`is_gradient_checkpointing` is deprecated, from elsewhere', "
        "FutureWarning)\n")
    assert "another bnb warning" in out
    assert "a real FutureWarning" in out
    assert "from elsewhere" in out
    assert NOISE[0] not in out
