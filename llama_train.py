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
    accelerate launch --config_file configs/accelerate_fsdp_qlora.yaml llama_train.py --model-size 70b --use-4bit ...

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

Exit codes: 0 done; 2 bad input (flags, config, data, paths, an --output-dir that already
holds a run, a resume refused; nothing is written then); 1 training failed (e.g. non-finite
loss, out of memory);
130/143 stopped by SIGINT/SIGTERM after saving a checkpoint (resume with --resume auto). Every
error is one `error: ...` message on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from llama_config import (ConfigError, TrainArgs, add_dataclass_args, log_overrides,
                          resolve_config, setup_logging, validate)
from llama_io import ArgumentParser, run_cli

logger = logging.getLogger("llama_sft")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="llama_train.py", description=__doc__)
    add_dataclass_args(p, TrainArgs)
    return p


def make_run_config(cfg: Any, *, stage: str, base_model: str, prompt_format: str,
                    dataset_info: dict[str, Any]) -> dict[str, Any]:
    """The resolved config later stages read (allow-listed fields only: no paths to secrets,
    no environment)."""
    from llama_trainer import TOOLKIT_VERSION, config_hash, library_versions

    return {
        "toolkit_version": TOOLKIT_VERSION,
        "stage": stage,
        "base_model": base_model,
        "model_size": cfg.model_size,
        "prompt_format": prompt_format,
        "max_length": cfg.max_length,
        "quantization": "4bit" if cfg.use_4bit else "8bit" if cfg.use_8bit else None,
        "trust_remote_code": bool(cfg.trust_remote_code),
        "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                 "target_modules": cfg.lora_target_modules},
        "training": {k: getattr(cfg, k) for k in (
            "batch_size", "gradient_accumulation_steps", "learning_rate", "num_epochs",
            "max_steps", "warmup_ratio", "weight_decay", "lr_scheduler", "eval_steps",
            "early_stopping_patience", "gradient_checkpointing", "seed")},
        "dataset": dataset_info,
        "config_hash": config_hash(cfg),
        "library_versions": library_versions(),
    }


def sample_prompts_from(examples, tokenizer, prompt_format: str, n: int) -> list[dict[str, Any]]:
    from llama_dataset import render_prompt

    out = []
    for ex in examples[:n]:
        out.append({"prompt": render_prompt(tokenizer, prompt_format, ex.instruction, ex.context),
                    "prompt_preview": (ex.instruction[:60] + ("..." if len(ex.instruction) > 60 else "")),
                    "reference": ex.response})
    return out


def finish_outputs(result: dict[str, Any], *, tokenizer, output_dir: Path,
                   run_config: dict[str, Any]) -> dict[str, Any]:
    """final_model/, train_results.json and loss_curve.png after a run."""
    from llama_trainer import is_main_process, plot_loss_curve, save_final_model, write_json_atomic

    model = result.pop("model")
    if not is_main_process():
        return result
    if result.get("exit_code") is None:
        final = save_final_model(model, tokenizer, output_dir, run_config)
        result["final_model"] = str(final)
    if plot_loss_curve(output_dir / "metrics.jsonl", output_dir / "loss_curve.png",
                       title=f"{run_config['stage']}: {run_config['base_model']}"):
        result["loss_curve"] = str(output_dir / "loss_curve.png")
    write_json_atomic(output_dir / "train_results.json", result)
    return result


def run_train(cfg: TrainArgs, *, on_trainer=None) -> dict[str, Any]:
    """Load and split the data, train, and write the output layout; returns train_results.

    `on_trainer(trainer)` is called before training starts (tests add callbacks with it)."""
    from llama_dataset import (DatasetError, TokenizeStats, dataset_hash, file_sha256,
                               load_and_validate, resolve_prompt_format, split_examples,
                               tokenize_examples)
    from llama_model import load_tokenizer, resolve_base_model
    from llama_trainer import check_output_dir, is_main_process, run_sft

    if not cfg.dataset:
        raise ConfigError("--dataset is required (e.g. --dataset ./sft_output/sft_dataset.jsonl)")
    output_dir = Path(cfg.output_dir)
    check_output_dir(output_dir, cfg.resume)
    examples, load_stats = load_and_validate(cfg.dataset, field_map=cfg.field_map,
                                             skip_invalid=cfg.skip_invalid)
    golden = []
    if cfg.golden_set:
        golden, _ = load_and_validate(cfg.golden_set, field_map=cfg.field_map,
                                      skip_invalid=cfg.skip_invalid, what="--golden-set")
    splits, removed = split_examples(examples, val_ratio=cfg.val_ratio, test_ratio=cfg.test_ratio,
                                     golden=golden)
    if not splits["train"]:
        raise DatasetError(f"--dataset {cfg.dataset}: no examples left for training after the "
                           f"val/test split ({removed})")
    base_model = resolve_base_model(cfg.model_size, cfg.base_model)
    tokenizer = load_tokenizer(base_model, trust_remote_code=cfg.trust_remote_code)
    prompt_format = resolve_prompt_format(tokenizer, cfg.prompt_format)
    tstats = TokenizeStats()
    train_rows = tokenize_examples(splits["train"], tokenizer, max_length=cfg.max_length,
                                   prompt_format=prompt_format, stats=tstats)
    eval_source = splits["val"] or golden
    eval_rows = tokenize_examples(eval_source, tokenizer, max_length=cfg.max_length,
                                  prompt_format=prompt_format) if eval_source else []
    logger.info("data: %d train, %d val, %d test, %d golden | removed %s | truncated: %d context, "
                "%d response; dropped (no supervised token): %d", len(splits["train"]),
                len(splits["val"]), len(splits["test"]), len(golden), removed or "nothing",
                tstats.context_truncated, tstats.response_truncated,
                tstats.dropped_no_supervised_tokens)
    if not train_rows:
        raise DatasetError("every training example was dropped: no room for the response within "
                           f"--max-length {cfg.max_length}; raise it")
    dataset_info = {
        "path": Path(cfg.dataset).name, "file_sha256": file_sha256(cfg.dataset),
        "dataset_hash": dataset_hash(examples),
        "golden_set": Path(cfg.golden_set).name if cfg.golden_set else None,
        "splits": {k: len(v) for k, v in splits.items()}, "removed": removed,
        "skipped_invalid": load_stats.skipped_invalid, "tokenization": tstats.to_dict(),
        "eval_on": "val" if splits["val"] else ("golden_set" if golden else None),
    }
    run_config = make_run_config(cfg, stage="train", base_model=base_model,
                                 prompt_format=prompt_format, dataset_info=dataset_info)
    output_dir.mkdir(parents=True, exist_ok=True)
    if splits["test"] and is_main_process():
        with open(output_dir / "test.jsonl", "w", encoding="utf-8") as fh:
            for ex in splits["test"]:
                fh.write(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n")
    samples = sample_prompts_from(golden or splits["val"], tokenizer, prompt_format,
                                  cfg.num_sample_prompts)
    result = run_sft(cfg, output_dir=output_dir, train_rows=train_rows, eval_rows=eval_rows,
                     sample_prompts=samples, run_config=run_config, tokenizer=tokenizer,
                     on_trainer=on_trainer)
    result["data"] = dataset_info
    return finish_outputs(result, tokenizer=tokenizer, output_dir=output_dir,
                          run_config=run_config)


def resolve_train_config(argv: Sequence[str] | None) -> TrainArgs:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(TrainArgs, args)
    validate(cfg)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: see the module docstring; errors are one `error: ...` line (run_cli)."""
    from llama_trainer import RunSetupError, TrainingError

    return run_cli(lambda: _main(argv), bad_input=(RunSetupError,), failed=(TrainingError,))


def _main(argv: Sequence[str] | None) -> int:
    setup_logging()
    cfg = resolve_train_config(argv)
    log_overrides(cfg)
    result = run_train(cfg)
    code = result.get("exit_code", 0)
    print(f"{result['status']}: {result['global_step']} steps in "
          f"{result['train_runtime_seconds']:.0f} s, train loss {result['train_loss']:.4f}"
          + (f", eval loss {result['eval_loss']:.4f} (perplexity {result['eval_perplexity']:.2f})"
             if "eval_loss" in result else "")
          + f", {result['tokens_per_second']:.0f} tok/s, peak memory {result['peak_memory_mb']:.0f} MB")
    if code:
        print(f"stopped early; continue with: python3 llama_train.py ... --output-dir "
              f"{cfg.output_dir} --resume auto")
    elif "final_model" in result:
        print(f"adapter: {result['final_model']}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
