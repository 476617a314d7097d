"""Load, validate, format and tokenize SFT JSONL for LLaMA, with response-only labels.

Input: one JSON object per line with `instruction`, `context` (optional, may be empty) and
`response`, plus optional `category` and `id`. Also accepted: Alpaca (`instruction`/`input`/
`output`), `prompt`/`completion`, chat `messages` (a list of {role, content}), and anything else
through `--field-map 'question=instruction,answer=response'`.

Tokenize once, ahead of training (llama_train.py then reads the cache: no tokenization):

    python3 llama_dataset.py --dataset sft_output/sft_dataset.jsonl --model-size 135m \
        --max-length 512 --prepare

Inputs: .jsonl, a .json array, .parquet, .csv, a folder written by datasets' save_to_disk, or a
hub dataset id (when the hub can be reached).

Report on a dataset (counts, categories, token lengths, truncation, duplicates, splits):

    python3 llama_dataset.py --dataset sft_output/sft_dataset.jsonl --report
    python3 llama_dataset.py --dataset sft_output/sft_dataset.jsonl --golden-set \
        sft_output/golden_set.jsonl --model-size 135m --max-length 512 --report --output report.json

Labels: every prompt token is -100; every response ends with EOS and the EOS is supervised,
also when pad == eos (padding is masked by the attention mask, never by token id). Truncation
cuts the context first; an example left with no supervised token is dropped and counted.

Splits are decided by a hash of each example's content, so appending rows never moves an
existing row to another split, and golden-set examples are removed from training.
"""

from __future__ import annotations

import argparse
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    from llama_sft.cli import ArgumentParser
    from llama_sft.config import CacheArgs, DataArgs, ModelArgs, add_dataclass_args

    p = ArgumentParser(prog="llama_dataset.py", description=__doc__)
    add_dataclass_args(p, DataArgs)
    add_dataclass_args(p, ModelArgs, only=("model_size", "base_model", "prompt_format",
                                           "max_length", "trust_remote_code"))
    add_dataclass_args(p, CacheArgs)
    p.add_argument("--report", action="store_true", help="Print the dataset report.")
    p.add_argument("--prepare", action="store_true", help="Validate and tokenize --dataset into "
                   "the tokenized cache now (what llama_train.py would do before its first "
                   "step) and print its key, size and path; with --report or --output, the "
                   "report is read from the cache (one pass for both).")
    p.add_argument("--output", help="Write the report as JSON to this file (an earlier report "
                   "there is replaced; any other file is refused).")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 reported, 2 bad flags, data or paths (one `error: ...` line)."""
    from llama_sft.cli import run_cli, setup_logging
    from llama_sft.config import ReportArgs, resolve_config, validate

    def body() -> int:
        setup_logging()
        args = build_parser().parse_args(argv)
        show, output = args.__dict__.pop("report"), args.__dict__.pop("output")
        prepare = args.__dict__.pop("prepare")
        if "model_size" not in vars(args) and "base_model" not in vars(args):
            args.model_size = "135m"  # the report needs a tokenizer; the embedded one works offline
        cfg = resolve_config(ReportArgs, args)
        validate(cfg)
        # imported after the flags are checked: --help and bad flags load no torch
        from llama_sft.data.report import format_prepare, format_report, run_prepare, run_report

        if prepare:
            # --report / --output with --prepare: the report comes from the cache's columns.
            prepared, report = run_prepare(cfg, report=bool(show or output), output=output)
            print(format_prepare(prepared))
            if report is None:
                return 0
        else:
            report = run_report(cfg, output)
        if show or not output:
            print(format_report(report))
        if output:
            print(f"report written to {output}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
