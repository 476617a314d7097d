"""A quick pilot on the golden set: proves the pipeline end to end and says whether full
training is worth it.

    python3 llama_pilot.py \\
      --golden-set ./sft_output/golden_set.jsonl \\
      --output-dir ./pilot_output \\
      --max-steps 100 \\
      --use-wandb

    cat ./pilot_output/pilot_evaluation.json

With no --model-size/--base-model and no CUDA GPU it uses the embedded 135M model (CPU) and
says so. The golden set is split by a hash of each example: ~80% is trained on (4-bit QLoRA by
default, --max-steps steps), ~20% is held out. On the held-out part it measures, before and
after training: eval loss and perplexity, and the task metrics of greedy generations (exact
match; answer exact match for '#### N' answers; JSON field accuracy for JSON answers).

pilot_evaluation.json holds: the model and why, steps, time, throughput, peak memory, loss at
start and end, eval loss/perplexity before and after, task metrics before and after (overall and
per category), sample generations (prompt, reference, base output, tuned output), a projection of
full training time on --dataset with the measured throughput, and go/no-go checks with reasons.
The adapter is in OUTPUT_DIR/final_model (same layout as llama_train.py).

Next step, full training:

    python3 llama_train.py --model-size 7b --dataset ./sft_output/sft_dataset.jsonl \\
      --golden-set ./sft_output/golden_set.jsonl --output-dir ./training_output \\
      --config ./sft_output/training_config.json --use-4bit --use-wandb
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    from llama_sft.cli import ArgumentParser
    from llama_sft.config import PilotArgs, add_dataclass_args

    p = ArgumentParser(prog="llama_pilot.py", description=__doc__)
    add_dataclass_args(p, PilotArgs)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status as llama_train.py's: 0 done, 2 bad input (also an --output-dir that already
    holds a run, or that another live run holds), 1 training failed (a full disk included),
    130/143 stopped by a signal; errors are one `error: ...` line."""
    from llama_sft.cli import run_cli, setup_logging
    from llama_sft.config import resolve_pilot_config

    def body() -> int:
        setup_logging()
        cfg, why = resolve_pilot_config(build_parser().parse_args(argv))
        from llama_sft.layout import PILOT_EVALUATION, RUN_OUTPUTS
        from llama_sft.training.outputs import claim_output_dir

        # One run per --output-dir (as llama_train.py): taken before torch loads.
        with claim_output_dir(Path(cfg.output_dir), cfg.resume,
                              RUN_OUTPUTS + (PILOT_EVALUATION,)):
            # imported after the flags are checked: --help and bad flags load no torch
            from llama_sft.training.pilot import format_summary, run_pilot

            report = run_pilot(cfg, model_choice=why)
        if report.get("interrupted"):
            print(f"{report['status']} at step {report['global_step']}; a checkpoint is saved. "
                  f"Continue with: python3 llama_pilot.py ... --output-dir {cfg.output_dir} "
                  "--resume auto", file=sys.stderr)
            return report["exit_code"]
        print(format_summary(report))
        print(f"results: {Path(cfg.output_dir) / 'pilot_evaluation.json'}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
