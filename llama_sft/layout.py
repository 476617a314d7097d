"""TODO docstring"""

from __future__ import annotations

import hashlib
import json
from typing import Any

RUN_CONFIG = "run_config.json"


MANIFEST = "checkpoint_manifest.json"


RESUME_STATE = "resume_state.json"


CONSUMED_IDS = "consumed_ids.jsonl"


# Logs with one JSON record per line and a "step": cut back to the checkpoint's step on resume.
STEP_LOGS = ("metrics.jsonl", "samples.jsonl", CONSUMED_IDS)


# Fields that change what is trained: a resume with any of them changed is refused unless forced.
CONFIG_HASH_FIELDS = (
    "base_model", "model_size", "use_4bit", "use_8bit", "prompt_format", "max_length", "lora_r",
    "lora_alpha", "lora_dropout", "lora_target_modules", "batch_size",
    "gradient_accumulation_steps", "learning_rate", "num_epochs", "max_steps", "warmup_ratio",
    "weight_decay", "lr_scheduler", "seed", "val_ratio", "test_ratio",
)


def config_hash(cfg: Any) -> str:
    d = {k: getattr(cfg, k, None) for k in CONFIG_HASH_FIELDS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Files a run writes at the top of --output-dir besides checkpoint-*/, final_model/ and
# metrics.jsonl: one of these alone still means the folder holds an earlier run, which a new run
# would partly overwrite.
RUN_OUTPUTS = ("train_results.json", "test.jsonl", "samples.jsonl", CONSUMED_IDS,
               "loss_curve.png")


ADAPTER_WEIGHTS = "adapter_model.safetensors"


ADAPTER_CONFIG = "adapter_config.json"


EVAL_RESULTS = "evaluation_results.json"


EVAL_RESULTS_NAMES = ("evaluation_results.json", "eval_results.json")


TRAINER_MANIFEST = "checkpoint_manifest.json"  # written by llama_trainer.save_final_model


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
