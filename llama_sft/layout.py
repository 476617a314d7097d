"""Every file name a stage writes and another reads, and one schema object per such file.

Output layout of a training run (llama_train.py / llama_pilot.py --output-dir):

    checkpoint-<step>/   transformers' checkpoint + run_config.json, resume_state.json, manifest
    final_model/         adapter, tokenizer, run_config.json, manifest
    metrics.jsonl, samples.jsonl, consumed_ids.jsonl, test.jsonl, train_results.json,
    loss_curve.png (and pilot_evaluation.json for the pilot)
    .run.lock            while a run is live: its lock (training/lock.py), removed when it ends

`RunConfig` (run_config.json) and `ResumeState` (resume_state.json) each have one writer
(`to_json`) and one reader (`from_json`), and carry a format version; a file written before
versions existed reads as version 1. The manifest format is in files.py (write_manifest /
verify_manifest).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_sft.files import MANIFEST, write_json_atomic  # noqa: F401 (MANIFEST: one name for every stage)

FORMAT_VERSION = 1

RUN_CONFIG = "run_config.json"




RESUME_STATE = "resume_state.json"


CONSUMED_IDS = "consumed_ids.jsonl"


# Logs with one JSON record per line and a "step": cut back to the checkpoint's step on resume.
STEP_LOGS = ("metrics.jsonl", "samples.jsonl", "consumed_ids.jsonl")


# Fields that change what is trained: a resume with any of them changed is refused unless forced.
CONFIG_HASH_FIELDS = (
    "base_model", "model_size", "use_4bit", "use_8bit", "prompt_format", "max_length", "lora_r",
    "lora_alpha", "lora_dropout", "lora_target_modules", "batch_size",
    "gradient_accumulation_steps", "learning_rate", "num_epochs", "max_steps", "warmup_ratio",
    "weight_decay", "lr_scheduler", "seed", "val_ratio", "test_ratio",
)


FINAL_MODEL = "final_model"
METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
TEST_SPLIT = "test.jsonl"
TRAIN_RESULTS = "train_results.json"
LOSS_CURVE = "loss_curve.png"
PILOT_EVALUATION = "pilot_evaluation.json"


# Fields added after runs were made: hashed only when set away from their default, so an older
# run's checkpoints still match their own config.
LATER_HASH_FIELDS = {"last_turn_only": False}


def config_hash(cfg: Any) -> str:
    d = {k: getattr(cfg, k, None) for k in CONFIG_HASH_FIELDS}
    d.update({k: getattr(cfg, k) for k, default in LATER_HASH_FIELDS.items()
              if getattr(cfg, k, default) != default})
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Files a run writes at the top of --output-dir besides checkpoint-*/, final_model/ and
# metrics.jsonl: one of these alone still means the folder holds an earlier run, which a new run
# would partly overwrite.
RUN_OUTPUTS = ("train_results.json", "test.jsonl", "samples.jsonl", "consumed_ids.jsonl",
               "loss_curve.png")


# The lock a live run holds on its --output-dir (training/lock.py): a JSON body naming the run.
RUN_LOCK = ".run.lock"


ADAPTER_WEIGHTS = "adapter_model.safetensors"


ADAPTER_CONFIG = "adapter_config.json"


EVAL_RESULTS = "evaluation_results.json"


EVAL_RESULTS_NAMES = ("evaluation_results.json", "eval_results.json")


SUMS = "SHA256SUMS"


METADATA = "metadata.json"


# Tokenizer files a tokenizer.save_pretrained may write; anything else in the adapter folder
# (peft's README, trainer state, optimizer files) stays out of the archive.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json")


REQUIRED_MEMBERS = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, RUN_CONFIG, "README.md", "requirements.txt",
                    METADATA, SUMS)


TRAINING_KEYS = ("batch_size", "gradient_accumulation_steps", "learning_rate", "num_epochs",
                 "max_steps", "warmup_ratio", "weight_decay", "lr_scheduler", "eval_steps",
                 "early_stopping_patience", "gradient_checkpointing", "seed")


class SchemaError(ValueError):
    """A file of ours that does not hold what its schema says (callers name the file)."""


def _read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SchemaError(f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SchemaError("not a JSON object")
    version = data.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SchemaError(f"format_version {version!r}: written by a newer toolkit (this one "
                          f"reads up to {FORMAT_VERSION}); upgrade the toolkit")
    return data


@dataclass
class RunConfig:
    """run_config.json: the resolved config of a training run, written into every checkpoint
    and final_model/ by training and read by evaluation and packaging (allow-listed fields
    only: no paths to secrets, no environment)."""

    base_model: str | None = None
    model_size: str | None = None
    prompt_format: str | None = None
    max_length: int | None = None
    quantization: str | None = None  # "4bit", "8bit" or None
    trust_remote_code: bool = False
    stage: str | None = None  # "train" or "pilot"
    lora: dict[str, Any] = field(default_factory=dict)  # r, alpha, dropout, target_modules
    training: dict[str, Any] = field(default_factory=dict)  # TRAINING_KEYS
    dataset: dict[str, Any] = field(default_factory=dict)  # path, hashes, splits, tokenization
    config_hash: str | None = None
    # Every token id generation stops at (turn end, EOS, generation_config's list): later
    # stages and packaging stop where training taught the model to.
    stop_token_ids: list[int] = field(default_factory=list)
    label_mode: str = "all"  # "all" assistant turns supervised, or the "last" one
    library_versions: dict[str, str] = field(default_factory=dict)
    toolkit_version: str | None = None
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_train_args(cls, cfg: Any, *, stage: str, base_model: str, prompt_format: str,
                        dataset_info: dict[str, Any], toolkit_version: str,
                        library_versions: dict[str, str],
                        stop_token_ids: list[int] | None = None) -> "RunConfig":
        return cls(
            toolkit_version=toolkit_version, stage=stage, base_model=base_model,
            model_size=cfg.model_size, prompt_format=prompt_format, max_length=cfg.max_length,
            quantization="4bit" if cfg.use_4bit else "8bit" if cfg.use_8bit else None,
            trust_remote_code=bool(cfg.trust_remote_code),
            lora={"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                  "target_modules": cfg.lora_target_modules},
            training={k: getattr(cfg, k) for k in TRAINING_KEYS}, dataset=dataset_info,
            config_hash=config_hash(cfg), library_versions=library_versions,
            stop_token_ids=list(stop_token_ids or []),
            label_mode=getattr(cfg, "label_mode", "all"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "RunConfig":
        """Read run_config.json (SchemaError when it is not one); unknown keys are ignored, so
        a newer toolkit's extra fields do not break an older reader."""
        return cls.from_dict(_read_json_object(path))


@dataclass
class ResumeState:
    """resume_state.json, inside each checkpoint: what a resume must match."""

    config_hash: str | None
    dataset_hash: str | None
    global_step: int
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ResumeState":
        data = _read_json_object(path)
        return cls(config_hash=data.get("config_hash"), dataset_hash=data.get("dataset_hash"),
                   global_step=int(data.get("global_step", 0)))
