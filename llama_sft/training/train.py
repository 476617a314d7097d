"""The training stage behind llama_train.py: load and split the data, tokenize it, train, and
write the output layout (layout.py). Chained from the pilot:

    python3 llama_train.py --model-size 7b --dataset ./sft_output/sft_dataset.jsonl \\
      --golden-set ./sft_output/golden_set.jsonl --output-dir ./training_output \\
      --config ./sft_output/training_config.json --use-4bit --use-wandb
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_sft.cli import is_main_process
from llama_sft.config import TrainArgs
from llama_sft.data.batching import TokenizedDataset
from llama_sft.data.cache import CacheSpec, TokenizedCache, open_or_build
from llama_sft.data.loader import golden_set_examples
from llama_sft.data.prompts import resolve_prompt_format, sample_prompts_from, stop_token_ids
from llama_sft.data.schemas import Example
from llama_sft.data.tokenize import TokenizeStats, tokenize_examples
from llama_sft.errors import ConfigError, DatasetError
from llama_sft.layout import TEST_SPLIT, RunConfig
from llama_sft.modeling.load import load_generation_config, load_tokenizer, resolve_base_model
from llama_sft.training.outputs import check_output_dir, finish_outputs
from llama_sft.training.recipe import resolve_kernels, run_sft, training_device
from llama_sft.versions import TOOLKIT_VERSION, library_versions

logger = logging.getLogger("llama_sft")


def make_run_config(cfg: Any, *, stage: str, base_model: str, tokenizer, prompt_format: str,
                    dataset_info: dict[str, Any]) -> RunConfig:
    """The resolved config later stages read (run_config.json), with the stop tokens of the
    base model in this prompt format."""
    stop_ids = stop_token_ids(tokenizer, prompt_format, load_generation_config(base_model))
    return RunConfig.from_train_args(cfg, stage=stage, base_model=base_model,
                                     prompt_format=prompt_format, dataset_info=dataset_info,
                                     toolkit_version=TOOLKIT_VERSION,
                                     library_versions=library_versions(),
                                     stop_token_ids=stop_ids)


@dataclass
class TrainingData:
    """The validated, tokenized data of a run: the cache (memory-mapped rows), the example
    indices of each split, the golden set and what the split removed."""

    cache: TokenizedCache
    golden: list[Example]
    splits: dict[str, Any]  # split name -> example indices into the cache, in file order
    removed: dict[str, int]


def load_data(cfg: TrainArgs, tokenizer, prompt_format: str) -> TrainingData:
    """--dataset validated (file:line errors) and tokenized through the cache (opened when it
    holds this data and tokenizer, else built), split by content hash with the golden set
    removed from every split."""
    if not cfg.dataset:
        raise ConfigError("--dataset is required (e.g. --dataset ./sft_output/sft_dataset.jsonl)")
    golden = golden_set_examples(cfg)
    cache = open_or_build(CacheSpec.for_args(cfg, cfg.dataset, tokenizer, prompt_format))
    splits, removed = cache.split(val_ratio=cfg.val_ratio, test_ratio=cfg.test_ratio,
                                  golden=golden)
    if not len(splits["train"]):
        raise DatasetError(f"--dataset {cfg.dataset}: no examples left for training after the "
                           f"val/test split ({removed})")
    return TrainingData(cache, golden, splits, removed)


def tokenize_data(cfg: TrainArgs, data: TrainingData, tokenizer, prompt_format: str):
    """(train rows, eval rows, truncation counts of the train split); eval on the val split,
    else the golden set. Rows of the cache are read per batch."""
    stats = data.cache.stats(data.splits["train"])
    train_rows = data.cache.training_rows(data.splits["train"])
    if len(data.splits["val"]):
        eval_rows = data.cache.training_rows(data.splits["val"])
    else:
        eval_rows = TokenizedDataset(tokenize_examples(
            data.golden, tokenizer, max_length=cfg.max_length, prompt_format=prompt_format,
            label_mode=cfg.label_mode)) if data.golden else None
    sizes = {k: len(v) for k, v in data.splits.items()}
    logger.info("data: %d train, %d val, %d test, %d golden | removed %s | truncated: %d context, "
                "%d response; dropped (no supervised token): %d; conversations shortened: %d "
                "(%d earliest exchanges dropped)", sizes["train"], sizes["val"], sizes["test"],
                len(data.golden), data.removed or "nothing", stats.context_truncated,
                stats.response_truncated, stats.dropped_no_supervised_tokens,
                stats.conversations_shortened, stats.exchanges_dropped)
    if not len(train_rows):
        raise DatasetError("every training example was dropped: no room for the response within "
                           f"--max-length {cfg.max_length}; raise it")
    return train_rows, eval_rows, stats


def dataset_info(cfg: TrainArgs, data: TrainingData, stats: TokenizeStats) -> dict[str, Any]:
    """What run_config.json records about the data (names and hashes, never contents)."""
    meta = data.cache.meta
    return {
        "path": Path(cfg.dataset).name, "file_sha256": meta["parts"]["data_sha256"],
        "dataset_hash": meta["dataset_hash"],
        "golden_set": Path(cfg.golden_set).name if cfg.golden_set else None,
        "splits": {k: len(v) for k, v in data.splits.items()}, "removed": data.removed,
        "skipped_invalid": meta["skipped_invalid"], "tokenization": stats.to_dict(),
        "eval_on": "val" if len(data.splits["val"]) else ("golden_set" if data.golden else None),
        "tokenized_cache": {"key": data.cache.key, "path": str(data.cache.path)},
    }


def write_test_split(output_dir: Path, data: TrainingData) -> None:
    """test.jsonl: the hash-based test split, for llama_evaluate.py (rank 0), streamed from the
    cache."""
    if not len(data.splits["test"]) or not is_main_process():
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / TEST_SPLIT, "w", encoding="utf-8") as fh:
        for ex in data.cache.examples(data.splits["test"]):
            fh.write(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n")


def sample_examples(cfg: TrainArgs, data: TrainingData) -> list[Example]:
    """The examples whose generations are logged at each evaluation: the golden set's first,
    else the val split's."""
    if data.golden:
        return data.golden[:cfg.num_sample_prompts]
    return list(data.cache.examples(data.splits["val"][:cfg.num_sample_prompts]))


def run_train(cfg: TrainArgs, *, on_trainer=None) -> dict[str, Any]:
    """Load and split the data, train, and write the output layout; returns train_results.

    `on_trainer(trainer)` is called before training starts (tests add callbacks with it)."""
    output_dir = Path(cfg.output_dir)
    if cfg.dataset:
        check_output_dir(output_dir, cfg.resume)
    resolve_kernels(cfg, training_device(), log=False)  # refusals before test.jsonl is written
    base_model = resolve_base_model(cfg.model_size, cfg.base_model)
    tokenizer = load_tokenizer(base_model, trust_remote_code=cfg.trust_remote_code)
    prompt_format = resolve_prompt_format(tokenizer, cfg.prompt_format)
    data = load_data(cfg, tokenizer, prompt_format)
    train_rows, eval_rows, stats = tokenize_data(cfg, data, tokenizer, prompt_format)
    info = dataset_info(cfg, data, stats)
    run_config = make_run_config(cfg, stage="train", base_model=base_model, tokenizer=tokenizer,
                                 prompt_format=prompt_format, dataset_info=info)
    write_test_split(output_dir, data)
    samples = sample_prompts_from(sample_examples(cfg, data), tokenizer, prompt_format,
                                  cfg.num_sample_prompts)
    result = run_sft(cfg, output_dir=output_dir, train_rows=train_rows, eval_rows=eval_rows,
                     sample_prompts=samples, run_config=run_config, tokenizer=tokenizer,
                     on_trainer=on_trainer)
    result["data"] = info
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
