"""Per-size model configs, hardware requirements, recommended hyperparameters and LoRA settings.

One precedence chain, used by every stage script:

    built-in defaults for the model size  <  --config FILE.json  <  explicit flags

Print the resolved config and hardware requirements for a size:

    python3 llama_config.py --model-size 70b
    python3 llama_config.py --model-size 7b --config ./sft_output/training_config.json --batch-size 8

Sizes: Llama 2 7b, 13b, 70b; Llama 3.x llama3-1b, llama3-3b (3.2), llama3-8b, llama3-70b (3.1),
each also as <size>-instruct (llama3-70b-instruct is Llama 3.3 70B Instruct); 135m, the
embedded CPU model. The header names the hub id and the architecture (layers, hidden size,
attention and KV heads, vocabulary):

    python3 llama_config.py --model-size llama3-8b-instruct

Estimate GPU memory for full fine-tuning, LoRA and QLoRA, and check it against the GPUs found:

    python3 llama_config.py --model-size 13b --estimate
    python3 llama_config.py --model-size llama3-8b --estimate
"""

from __future__ import annotations

import argparse
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    from llama_sft.cli import ArgumentParser
    from llama_sft.config import TrainArgs, add_dataclass_args

    p = ArgumentParser(prog="llama_config.py", description=__doc__)
    add_dataclass_args(p, TrainArgs)
    p.add_argument("--estimate", action="store_true",
                   help="Print a memory estimate for full fine-tune, LoRA and QLoRA.")
    p.add_argument("--json", action="store_true", help="Print the resolved config as JSON.")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 printed, 2 bad flags or config (one `error: ...` line)."""
    from llama_sft.cli import run_cli
    from llama_sft.memory import show_config

    def body() -> int:
        args = build_parser().parse_args(argv)
        print(show_config(args, estimate=args.__dict__.pop("estimate"),
                          as_json=args.__dict__.pop("json")))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
