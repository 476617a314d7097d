"""PEFT/LoRA training of LLaMA models, with 4-bit/8-bit quantization, early stopping,
checkpoints and resume, W&B and local logging.

Full training (after the pilot, see llama_pilot.py):

    python3 llama_train.py \\
      --model-size 7b \\
      --dataset ./sft_output/sft_dataset.jsonl \\
      --golden-set ./sft_output/golden_set.jsonl \\
      --output-dir ./training_output \\
      --config ./sft_output/training_config.json \\
      --use-4bit \\
      --use-wandb

On a CPU with the embedded model: the same with `--model-size 135m` (add `--max-steps 200` for
a short run). Continue an interrupted run with `--resume auto`. Multi-GPU:

    accelerate launch --config_file configs/accelerate_ddp.yaml llama_train.py ...
    accelerate launch --config_file configs/accelerate_fsdp.yaml llama_train.py --model-size 13b ...
    accelerate launch --config_file configs/accelerate_fsdp_qlora.yaml llama_train.py --model-size 70b --use-4bit ...

Two machines: configs/accelerate_multinode.yaml, or torchrun --nnodes 2 --rdzv-backend c10d
--rdzv-endpoint HOST:PORT on each (README, "Multi-GPU and multi-node"). FSDP + 4-bit needs CUDA.

Then evaluate the adapter:

    python3 llama_evaluate.py --adapter-path ./training_output/final_model \\
      --dataset ./sft_output/golden_set.jsonl --output ./evaluation_results.json

Output layout of --output-dir:

    checkpoint-<step>/     adapter, optimizer, scheduler, RNG and trainer state, run_config.json,
                           resume_state.json, checkpoint_manifest.json (sha256 of every file)
    final_model/           adapter_model.safetensors, adapter_config.json, tokenizer files,
                           run_config.json (base model, prompt format, LoRA, quantization,
                           dataset hash: what later stages read), checkpoint_manifest.json
    metrics.jsonl          one JSON record per logging step and per evaluation
    consumed_ids.jsonl     per optimizer step, the ids of the examples it trained on
    samples.jsonl          golden-set generations at each evaluation
    test.jsonl             the test split of --dataset (hash-based), for llama_evaluate.py
    train_results.json     steps, losses, perplexity, throughput, peak memory, status
    loss_curve.png         train and eval loss against step

A live run holds a lock on --output-dir (.run.lock, removed when it ends): a second run into
it, with or without --resume, is refused naming the first (pid, host, start, command); the lock
of a run that was killed is taken over with a notice.

Exit codes: 0 done; 2 bad input (flags, config, data, paths, an --output-dir that already
holds a run or that another live run holds, a resume refused; nothing is written then);
1 training failed (e.g. non-finite loss, out of memory, a full disk: the partial save is
removed, earlier checkpoints are kept, and --resume auto continues);
130/143 stopped by SIGINT/SIGTERM after saving a checkpoint (resume with --resume auto). Every
error is one `error: ...` message on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    from llama_sft.cli import ArgumentParser
    from llama_sft.config import TrainArgs, add_dataclass_args

    p = ArgumentParser(prog="llama_train.py", description=__doc__)
    add_dataclass_args(p, TrainArgs)
    return p


def resolve_train_config(argv: Sequence[str] | None):
    """The TrainArgs of a command line: size defaults < --config < flags, validated."""
    from llama_sft.config import TrainArgs, resolve_config, validate

    cfg = resolve_config(TrainArgs, build_parser().parse_args(argv))
    validate(cfg)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: see the module docstring; errors are one `error: ...` line (run_cli)."""
    from llama_sft.cli import run_cli, setup_logging
    from llama_sft.config import log_overrides

    def body() -> int:
        setup_logging()
        cfg = resolve_train_config(argv)
        log_overrides(cfg)
        from llama_sft.training.outputs import claim_output_dir

        # One run per --output-dir: taken before torch loads, so a refusal comes at once.
        with claim_output_dir(Path(cfg.output_dir), cfg.resume):
            # imported after the flags are checked: --help and bad flags load no torch
            from llama_sft.training.train import format_train_summary, run_train

            result = run_train(cfg)
        print(format_train_summary(result, cfg.output_dir))
        return result.get("exit_code", 0)

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
