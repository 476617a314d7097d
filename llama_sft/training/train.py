"""TODO docstring"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from llama_sft.cli import is_main_process
from llama_sft.config import TrainArgs
from llama_sft.data.loader import file_sha256, load_and_validate
from llama_sft.data.prompts import resolve_prompt_format, sample_prompts_from
from llama_sft.data.splits import dataset_hash, split_examples
from llama_sft.data.tokenize import TokenizeStats, tokenize_examples
from llama_sft.errors import ConfigError, DatasetError
from llama_sft.layout import config_hash
from llama_sft.modeling.load import load_tokenizer, resolve_base_model
from llama_sft.training.outputs import check_output_dir, finish_outputs
from llama_sft.training.recipe import run_sft
from llama_sft.versions import TOOLKIT_VERSION, library_versions

logger = logging.getLogger("llama_sft")



def make_run_config(cfg: Any, *, stage: str, base_model: str, prompt_format: str,
                    dataset_info: dict[str, Any]) -> dict[str, Any]:
    """The resolved config later stages read (allow-listed fields only: no paths to secrets,
    no environment)."""

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


def run_train(cfg: TrainArgs, *, on_trainer=None) -> dict[str, Any]:
    """Load and split the data, train, and write the output layout; returns train_results.

    `on_trainer(trainer)` is called before training starts (tests add callbacks with it)."""

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


def format_train_summary(result: dict[str, Any], output_dir: str) -> str:
    """What llama_train.py prints at the end: status, steps, losses, speed, where to go next."""
    text = (f"{result['status']}: {result['global_step']} steps in "
            f"{result['train_runtime_seconds']:.0f} s, train loss {result['train_loss']:.4f}"
            + (f", eval loss {result['eval_loss']:.4f} (perplexity "
               f"{result['eval_perplexity']:.2f})" if "eval_loss" in result else "")
            + f", {result['tokens_per_second']:.0f} tok/s, peak memory "
              f"{result['peak_memory_mb']:.0f} MB")
    if result.get("exit_code"):
        text += (f"\nstopped early; continue with: python3 llama_train.py ... --output-dir "
                 f"{output_dir} --resume auto")
    elif "final_model" in result:
        text += f"\nadapter: {result['final_model']}"
    return text
