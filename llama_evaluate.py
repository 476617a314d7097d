r"""Evaluate a LoRA adapter on a JSONL set: generation metrics overall and per category,
response perplexity, and (with --compare-base) the base model on the same examples.

Chained from training: the adapter's run_config.json supplies the base model, model size,
prompt format and max length, so only the adapter and the data are needed:

    python3 llama_train.py --model-size 135m --dataset ./sft_output/sft_dataset.jsonl \
        --golden-set ./sft_output/golden_set.jsonl --output-dir ./training_output --max-steps 100
    python3 llama_evaluate.py --adapter-path ./training_output/final_model \
        --dataset ./sft_output/golden_set.jsonl --output ./evaluation_results.json \
        --compare-base --answer-regex '####\s*(-?[\d,.]+)'

The guide's command (a 7B adapter on a GPU; --base-model must match the adapter's):

    python3 llama_evaluate.py \
      --base-model meta-llama/Llama-2-7b-hf \
      --adapter-path ./training_output/final_model \
      --dataset ./sft_output/golden_set.jsonl \
      --output ./evaluation_results.json \
      --num-samples 50 \
      --use-4bit

On the CPU with the embedded model, say it explicitly or leave it to run_config.json:

    python3 llama_evaluate.py --base-model smollm2-135m --adapter-path ./pilot_output/final_model \
        --dataset ./sft_output/golden_set.jsonl --output ./evaluation_results.json --num-samples 30

Writes:
  --output            results JSON: resolved config, model and adapter identity (path, sha256 of
                      adapter_model.safetensors), dataset path and hashes, metrics overall and
                      per category, timing, and with --compare-base the base model's metrics and
                      the tuned-minus-base deltas.
  --samples-output    one JSON line per example: id, category, prompt, reference, generation,
                      per-example metrics, response perplexity (and the base model's, with
                      --compare-base). Default: <output stem>_samples.jsonl beside --output.

Metrics are defined in llama_sft/evaluation/metrics.py (exact match, token F1, ROUGE-L, BLEU,
answer-regex exact match, JSON field accuracy, generated length, EOS rate: the share of
generations that ended at a stop token). Response perplexity is the teacher-forced loss on the
reference response tokens (and the turn end) only, prompt tokens excluded. A conversation is
evaluated on its last assistant turn, generated from the history before it.
--num-samples N takes the first N of a fixed order: round-robin over categories, each category
in content-hash order, so a small N still covers every category and is the same on every run.
An --output (or samples file) holding the results of another evaluation (another adapter, base
model or data file), or a file this script did not write, is refused before anything is loaded
unless --overwrite; re-running the same evaluation replaces its results with a notice.
Exit codes: 0 done, 2 bad input (a one-line `error: ...`).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    from llama_sft.cli import ArgumentParser
    from llama_sft.config import (
        EVAL_DATA_FLAGS,
        EVAL_FLAG_HELP,
        EVAL_MODEL_FLAGS,
        MODEL_SPECS,
        DataArgs,
        EvalArgs,
        ModelArgs,
        add_dataclass_args,
    )

    p = ArgumentParser(prog="llama_evaluate.py", description=__doc__)
    inherited = {f.name for f in dataclasses.fields(ModelArgs) + dataclasses.fields(DataArgs)}
    own = [f.name for f in dataclasses.fields(EvalArgs)
           if f.name not in inherited and f.name not in ("adapter_path", "batch_size")]
    g = p.add_argument_group("what to evaluate")
    add_dataclass_args(g, EvalArgs, only=("adapter_path",))
    add_dataclass_args(g, EvalArgs, only=EVAL_DATA_FLAGS)
    g = p.add_argument_group("model")
    g.add_argument("--base-model", dest="base_model", default=argparse.SUPPRESS,
                   help=EVAL_FLAG_HELP["base_model"])
    g.add_argument("--model-size", dest="model_size", default=argparse.SUPPRESS,
                   choices=tuple(MODEL_SPECS), help=EVAL_FLAG_HELP["model_size"])
    g.add_argument("--prompt-format", dest="prompt_format", default=argparse.SUPPRESS,
                   choices=("auto", "chat", "instruction"), help=EVAL_FLAG_HELP["prompt_format"])
    g.add_argument("--max-length", dest="max_length", type=int, default=argparse.SUPPRESS,
                   help=EVAL_FLAG_HELP["max_length"])
    add_dataclass_args(g, EvalArgs, only=EVAL_MODEL_FLAGS)
    g = p.add_argument_group("generation and output")
    g.add_argument("--batch-size", dest="batch_size", type=int, default=argparse.SUPPRESS,
                   help=EVAL_FLAG_HELP["batch_size"])
    add_dataclass_args(g, EvalArgs, only=own)
    p.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done, 2 bad input (one `error: ...` line, see llama_sft.cli.run_cli)."""
    from llama_sft.cli import run_cli
    from llama_sft.config import EvalArgs, log_overrides, parse_stage_config, validate

    def body() -> int:
        cfg = parse_stage_config(build_parser(), argv, EvalArgs)
        validate(cfg)
        log_overrides(cfg)
        # Imported once the flags are checked, so --help and flag errors answer without torch.
        from llama_sft.evaluation.evaluate import format_table, run_evaluate

        print(format_table(run_evaluate(cfg)))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
