"""What a package says about itself: metadata.json from an allow-list of fields, the pinned
requirements.txt, and the guards that keep home paths and credentials out of every packaged file."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from llama_sft.layout import TRAINING_KEYS, RunConfig
from llama_sft.packaging.archive import HEX64
from llama_sft.versions import library_versions

logger = logging.getLogger("llama_sft")


PINNED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors")

LIBRARY_KEYS = PINNED_PACKAGES + ("python", "datasets", "rouge-score", "sacrebleu")

METRIC_KEYS = ("n", "exact_match", "token_f1", "rouge_l", "bleu", "corpus_bleu",
               "answer_exact_match", "json_field_accuracy", "json_valid", "avg_new_tokens",
               "eos_rate", "response_loss", "perplexity")


# Environment variables whose values must never leave the process (checked on every file).
SECRET_ENV_PATTERN = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.I)


def versions_of(names: Iterable[str]) -> dict[str, str]:
    """Installed versions of exactly `names`, in that order (missing ones left out): a package
    records these keys, and --verify compares them, so Python is only there when asked for."""
    names = tuple(names)
    found = library_versions(names)
    return {name: found[name] for name in names if name in found}


def _home() -> str | None:
    home = os.path.expanduser("~")
    return home.rstrip("/") if home and home not in ("/", "~") else None


def scrub_paths(value: Any) -> Any:
    """Replace absolute paths under $HOME (and ~/...) with their basenames, recursively."""
    home = _home()
    if isinstance(value, dict):
        return {k: scrub_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_paths(v) for v in value]
    if not isinstance(value, str):
        return value
    text = value
    if home:
        # $HOME itself or below it ("/root/x", not "/rootfs/x"), wherever it appears in the text
        text = re.sub(r"(?<![\w./-])" + re.escape(home) + r"(?=/|$|[\s'\"])(/[^\s'\"]*)?",
                      lambda m: PurePosixPath(m.group(0)).name or "~", text)
    text = re.sub(r"(?<![\w/])~/[^\s'\"]*", lambda m: PurePosixPath(m.group(0)).name, text)
    return text


def secret_values() -> dict[str, bytes]:
    """Values of environment variables that look like credentials (8+ characters)."""
    return {k: v.encode() for k, v in os.environ.items()
            if SECRET_ENV_PATTERN.search(k) and len(v) >= 8}


def find_secret(paths: Iterable[Path]) -> tuple[Path, str] | None:
    """(file, variable name) of the first file holding a credential's value, else None."""
    secrets = secret_values()
    if not secrets:
        return None
    overlap = max(len(v) for v in secrets.values())
    for path in paths:
        with open(path, "rb") as fh:
            tail = b""
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                window = tail + chunk
                for name, value in secrets.items():
                    if value in window:
                        return path, name
                tail = window[-overlap:]
    return None


def slug(text: str) -> str:
    base = PurePosixPath(str(text).rstrip("/")).name or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "model"


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float)) or (
        isinstance(value, str) and len(value) <= 64 and "/" not in value and "\\" not in value)


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n"


def _metrics_summary(results: dict[str, Any]) -> dict[str, Any]:
    def pick(summary: Any) -> dict[str, Any]:
        if not isinstance(summary, dict):
            return {}
        return {k: summary[k] for k in METRIC_KEYS if isinstance(summary.get(k), (int, float))
                and not isinstance(summary.get(k), bool)}

    out: dict[str, Any] = {}
    for key in ("metrics", "base_metrics"):
        block = results.get(key)
        if isinstance(block, dict):
            out[key] = {"overall": pick(block.get("overall")),
                        "by_category": {str(c)[:64]: pick(s) for c, s in
                                        (block.get("by_category") or {}).items()}}
    deltas = results.get("deltas")
    if isinstance(deltas, dict):
        out["deltas"] = {"overall": pick(deltas.get("overall"))}
    ds = results.get("dataset") or {}
    out["dataset"] = {"name": PurePosixPath(str(ds.get("path", ""))).name or None,
                      "file_sha256": ds.get("file_sha256") if HEX64.match(str(ds.get("file_sha256"))) else None,
                      "examples_evaluated": ds.get("examples_evaluated")
                      if isinstance(ds.get("examples_evaluated"), int) else None}
    out["prompt_format"] = results.get("prompt_format") if _scalar(results.get("prompt_format")) else None
    return out


def build_metadata(*, name: str, created: str, base_model: str, model_size: str | None,
                   run_cfg: RunConfig | dict[str, Any], adapter_cfg: dict[str, Any],
                   eval_results: dict[str, Any] | None, trust_remote_code: bool,
                   files: dict[str, str], merge: dict[str, Any] | None,
                   reference: dict[str, Any] | None,
                   base_model_revision: Any = None) -> dict[str, Any]:
    """Metadata from an allow-list of fields only: nothing from the environment, no paths
    under $HOME, no free-form values from the run config."""
    run = run_cfg if isinstance(run_cfg, RunConfig) else RunConfig.from_dict(run_cfg)
    training = run.training or {}
    trained_libs = run.library_versions or {}
    version_ok = re.compile(r"^[0-9A-Za-z.+-]{1,40}$")
    meta: dict[str, Any] = {
        "format_version": 1,
        "name": name,
        "created": created,
        "base_model": scrub_paths(base_model),
        "base_model_revision": base_model_revision if _scalar(base_model_revision) else None,
        "model_size": model_size,
        "prompt_format": run.prompt_format if _scalar(run.prompt_format) else None,
        "max_length": run.max_length if isinstance(run.max_length, int) else None,
        "quantization": run.quantization if run.quantization in ("4bit", "8bit") else None,
        "trust_remote_code": bool(trust_remote_code or run.trust_remote_code),
        "lora": _lora_summary(adapter_cfg),
        "training": {k: training[k] for k in TRAINING_KEYS if k in training and _scalar(training[k])},
        "dataset": _dataset_summary(run.dataset or {}),
        "evaluation": _metrics_summary(eval_results) if eval_results else None,
        "library_versions": {
            "packaged_with": versions_of(LIBRARY_KEYS),
            "trained_with": {k: str(v) for k, v in trained_libs.items()
                             if k in LIBRARY_KEYS and version_ok.match(str(v))},
        },
        "files": files,
        "merge": merge,
        "reference_generation": reference,
    }
    return meta


def _lora_summary(adapter_cfg: dict[str, Any]) -> dict[str, Any]:
    """From adapter_config.json (what peft will load), not from the run config."""
    targets = adapter_cfg.get("target_modules")
    if isinstance(targets, list):
        targets = sorted(str(t) for t in targets)
    elif targets is not None:
        targets = str(targets)
    return {"peft_type": adapter_cfg.get("peft_type"), "r": adapter_cfg.get("r"),
            "alpha": adapter_cfg.get("lora_alpha"), "dropout": adapter_cfg.get("lora_dropout"),
            "target_modules": targets, "bias": adapter_cfg.get("bias")}


def _dataset_summary(dataset: dict[str, Any]) -> dict[str, Any]:
    """The dataset's file name and hashes: its path may sit under $HOME, so only the name leaves."""
    return {
        "name": PurePosixPath(str(dataset["path"])).name if dataset.get("path") else None,
        "file_sha256": dataset.get("file_sha256") if HEX64.match(str(dataset.get("file_sha256"))) else None,
        "dataset_hash": dataset.get("dataset_hash")
        if re.match(r"^[0-9a-f]{8,64}$", str(dataset.get("dataset_hash"))) else None,
    }


def requirements_text() -> str:
    versions = versions_of(PINNED_PACKAGES)
    lines = ["# Library versions this adapter was packaged with (pip install -r requirements.txt).",
             "# torch: install the build for your hardware first (CUDA or CPU) from pytorch.org;",
             "# the local version label (+cpu, +cu124) is dropped here."]
    for name in PINNED_PACKAGES:
        if name in versions:
            lines.append(f"{name}=={versions[name].split('+')[0]}")
        else:
            lines.append(f"# {name}: not installed when packaging")
    return "\n".join(lines) + "\n"
