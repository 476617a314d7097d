r"""Package a trained LoRA adapter for distribution, and verify a package.

The guide's command (the base model and size must match the adapter's run_config.json):

    python3 llama_package.py \
      --adapter-path ./training_output/final_model \
      --base-model meta-llama/Llama-2-7b-hf \
      --model-size 7b \
      --output-dir ./packages

Chained from training and evaluation on the CPU (base model and size come from the adapter's
run_config.json; an evaluation_results.json beside the adapter or its parent folder is picked
up and shown in the model card):

    python3 llama_evaluate.py --adapter-path ./training_output/final_model \
        --dataset ./sft_output/golden_set.jsonl --output ./training_output/evaluation_results.json
    python3 llama_package.py --adapter-path ./training_output/final_model --output-dir ./packages
    python3 llama_package.py --verify ./packages/smollm2-135m-lora-<sha8>.tar.gz

Also write a merged full model (base weights + adapter, loads without peft):

    python3 llama_package.py --adapter-path ./training_output/final_model --output-dir ./packages --merge

Writes into --output-dir (NAME defaults to <base model>-lora-<first 8 hex of the adapter's sha256>):

    NAME.tar.gz                the archive: one folder NAME/ holding
        adapter_model.safetensors, adapter_config.json   the adapter (peft)
        tokenizer files                                  tokenizer.json, tokenizer_config.json, ...
        run_config.json                                  the training config (home paths removed)
        evaluation_results.json                          when evaluation results were found
        README.md                                        model card: usage and prompt format
        requirements.txt                                 pinned library versions
        metadata.json                                    allow-listed facts and every file's sha256
        SHA256SUMS                                       sha256 of every other member
    NAME.tar.gz.sha256         sha256 of the archive (publish it beside the archive)
    NAME.metadata.json, NAME.README.md, NAME.requirements.txt   copies, readable without unpacking
    NAME-merged/               with --merge: model.safetensors, config.json, tokenizer files

--verify ARCHIVE refuses absolute paths, '..', links and devices before extracting anything,
extracts with tarfile's "data" filter, checks SHA256SUMS (every member listed, every sum equal),
loads the adapter on its base model and greedily generates on a fixed prompt, which must equal
the text recorded at packaging time when the device and dtype are the same.
SHA256SUMS protects against corruption and naive tampering; for authenticity compare the
archive's sha256 with the one you published (NAME.tar.gz.sha256 is checked when present).

Exit codes: 0 done, 1 verification failed (tampered, unsafe or mismatching archive),
2 bad input (a one-line `error: ...`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

from llama_config import add_dataclass_args, get_spec, resolve_config, setup_logging

from llama_io import (ArgumentParser, output_dir_problem, run_cli, safetensors_problem,  # noqa: E402
                      sha256_file)

logger = logging.getLogger("llama_sft")

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "run_config.json"
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
PINNED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors")
LIBRARY_KEYS = PINNED_PACKAGES + ("python", "datasets", "rouge-score", "sacrebleu")
TRAINING_KEYS = ("batch_size", "gradient_accumulation_steps", "learning_rate", "num_epochs",
                 "max_steps", "warmup_ratio", "weight_decay", "lr_scheduler", "eval_steps",
                 "early_stopping_patience", "gradient_checkpointing", "seed")
METRIC_KEYS = ("n", "exact_match", "token_f1", "rouge_l", "bleu", "corpus_bleu",
               "answer_exact_match", "json_field_accuracy", "json_valid", "avg_new_tokens",
               "eos_rate", "response_loss", "perplexity")
# Environment variables whose values must never leave the process (checked on every file).
SECRET_ENV_PATTERN = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.I)
VERIFY_INSTRUCTION = "List three primary colors, separated by commas."
VERIFY_MAX_NEW_TOKENS = 24
# Greedy text must be reproduced exactly only when these, the dtype and the device are the same.
GENERATION_LIBRARIES = ("torch", "transformers", "peft")
HEX64 = re.compile(r"^[0-9a-f]{64}$")


class PackageError(ValueError):
    """Bad packaging input; the message says what to change."""


class VerifyError(RuntimeError):
    """The archive failed verification (tampered, unsafe or mismatching)."""


def _field(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class PackageArgs:
    adapter_path: str | None = _field(None, "Adapter folder written by llama_train.py "
                                      "(final_model/ or checkpoint-*/).")
    base_model: str | None = _field(None, "Hub id, local folder or 'smollm2-135m'. Default: "
                                    "from the adapter's run_config.json; a different one is an "
                                    "error.")
    model_size: str | None = _field(None, "Model size. Default: from the adapter's "
                                    "run_config.json; a different one is an error.",
                                    choices=("7b", "13b", "70b", "135m"))
    output_dir: str = _field("./packages", "Folder for the archive and its side files.")
    name: str | None = _field(None, "Package name (default: <base model>-lora-<adapter sha8>).")
    eval_results: str | None = _field(None, "Evaluation results JSON to include (default: "
                                      "evaluation_results.json or eval_results.json beside the "
                                      "adapter or in its parent folder, when present).")
    merge: bool = _field(False, "Also write NAME-merged/: the adapter merged into the "
                         "unquantized base weights (safetensors; loads without peft).")
    merge_dtype: str = _field("auto", "Weights dtype of the merged model: auto (bfloat16 on a "
                              "GPU, float32 on a CPU), float32, bfloat16 or float16.",
                              choices=("auto", "float32", "bfloat16", "float16"))
    record_generation: bool = _field(True, "Load the adapter on its base and record a greedy "
                                     "generation on a fixed prompt, which --verify must reproduce.")
    overwrite: bool = _field(False, "Replace an existing package of the same name.")
    trust_remote_code: bool = _field(False, "Allow the base model's own Python code to run "
                                     "(recorded in the metadata).")
    verify: str | None = _field(None, "Verify this archive instead of packaging: checksums, "
                                "safe extraction, reload and generate.")
    extract_to: str | None = _field(None, "With --verify: extract into this (new or empty) "
                                    "folder and keep it (default: a temporary folder).")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="llama_package.py", description=__doc__)
    add_dataclass_args(p, PackageArgs)
    p.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    return p


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def installed_versions(names: Iterable[str]) -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in names:
        if name == "python":
            out[name] = sys.version.split()[0]
            continue
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


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


def _local_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def _slug(text: str) -> str:
    base = PurePosixPath(str(text).rstrip("/")).name or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "model"


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float)) or (
        isinstance(value, str) and len(value) <= 64 and "/" not in value and "\\" not in value)


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n"


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def check_adapter_folder(adapter: Path) -> dict[str, Any]:
    """The run config of a complete, intact adapter folder; raises ModelLoadError/PackageError."""
    from llama_model import read_run_config

    run_cfg = read_run_config(adapter)
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise PackageError(f"--adapter-path {adapter}: no {ADAPTER_WEIGHTS} (this toolkit packages "
                           "safetensors adapters only; save with safe_serialization=True)")
    problem = safetensors_problem(adapter / ADAPTER_WEIGHTS)
    try:
        adapter_cfg = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        if not isinstance(adapter_cfg, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        problem = problem or f"{ADAPTER_CONFIG} is not valid JSON ({type(e).__name__})"
    if problem:
        raise PackageError(f"--adapter-path {adapter}: {problem}; point it at an intact "
                           "final_model/ or checkpoint-*/ folder")
    manifest = adapter / TRAINER_MANIFEST
    if manifest.is_file():
        try:
            sums = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            raise PackageError(f"{manifest}: unreadable manifest") from None
        for rel, digest in sums.items():
            p = adapter / rel
            if p.is_file() and sha256_file(p) != digest:
                raise PackageError(f"--adapter-path {adapter}: {rel} does not match "
                                   f"{TRAINER_MANIFEST} (modified or truncated since training)")
    if not run_cfg:
        logger.warning("%s has no %s: the package will lack training details", adapter, RUN_CONFIG)
    return run_cfg


def resolve_identity(cfg: PackageArgs, run_cfg: dict[str, Any]) -> tuple[str, str | None]:
    """(base model, model size): flags must agree with what the adapter was trained on."""
    from llama_model import resolve_base_model, same_base

    trained_base, trained_size = run_cfg.get("base_model"), run_cfg.get("model_size")
    if cfg.base_model and trained_base and not same_base(cfg.base_model, trained_base):
        raise PackageError(f"the adapter in {cfg.adapter_path} was trained on {trained_base!r}, "
                           f"not {cfg.base_model!r}; drop --base-model to use {trained_base!r}")
    if cfg.model_size and trained_size and get_spec(cfg.model_size).size != get_spec(trained_size).size:
        raise PackageError(f"the adapter in {cfg.adapter_path} was trained as --model-size "
                           f"{trained_size}, not {cfg.model_size}; drop --model-size")
    size = cfg.model_size or trained_size
    size = get_spec(size).size if size else None
    base = cfg.base_model or trained_base
    if not base:
        if not size:
            raise PackageError(f"{cfg.adapter_path} has no run_config.json naming its base model: "
                               "pass --base-model (and --model-size)")
        base = resolve_base_model(size, None)
    return resolve_base_model(size, base), size


def find_eval_results(cfg: PackageArgs, adapter: Path, adapter_sha: str) -> tuple[Path, dict] | None:
    """The evaluation results to include: --eval-results, or one found beside the adapter or in
    its parent. Results of a different adapter are refused (explicit) or ignored (found)."""
    if cfg.eval_results:
        candidates, explicit = [Path(cfg.eval_results)], True
        if not candidates[0].is_file():
            raise PackageError(f"--eval-results {cfg.eval_results}: file not found (write one "
                               "with `python3 llama_evaluate.py --adapter-path ... --output FILE`)")
    else:
        explicit = False
        candidates = [folder / name for folder in (adapter, adapter.parent)
                      for name in EVAL_RESULTS_NAMES]
    for path in candidates:
        if not path.is_file():
            continue
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(results, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            if explicit:
                raise PackageError(f"--eval-results {path}: not valid JSON ({e})") from None
            logger.warning("ignoring %s: not valid JSON", path)
            continue
        evaluated = (results.get("model") or {}).get("adapter_sha256")
        if evaluated and evaluated != adapter_sha:
            if explicit:
                raise PackageError(f"--eval-results {path} evaluated another adapter (sha256 "
                                   f"{evaluated[:12]}..., this one is {adapter_sha[:12]}...)")
            logger.warning("ignoring %s: it evaluated another adapter", path)
            continue
        logger.info("including evaluation results %s", path)
        return path, results
    return None


# --------------------------------------------------------------------------------------
# Metadata, model card, requirements
# --------------------------------------------------------------------------------------


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
                   run_cfg: dict[str, Any], adapter_cfg: dict[str, Any],
                   eval_results: dict[str, Any] | None, trust_remote_code: bool,
                   files: dict[str, str], merge: dict[str, Any] | None,
                   reference: dict[str, Any] | None) -> dict[str, Any]:
    """Metadata from an allow-list of fields only: nothing from the environment, no paths
    under $HOME, no free-form values from the run config."""
    training = run_cfg.get("training") or {}
    dataset = run_cfg.get("dataset") or {}
    lora_targets = adapter_cfg.get("target_modules")
    if isinstance(lora_targets, list):
        lora_targets = sorted(str(t) for t in lora_targets)
    elif lora_targets is not None:
        lora_targets = str(lora_targets)
    trained_libs = run_cfg.get("library_versions") or {}
    version_ok = re.compile(r"^[0-9A-Za-z.+-]{1,40}$")
    meta: dict[str, Any] = {
        "format_version": 1,
        "name": name,
        "created": created,
        "base_model": scrub_paths(base_model),
        "base_model_revision": run_cfg.get("base_model_revision")
        if _scalar(run_cfg.get("base_model_revision")) else None,
        "model_size": model_size,
        "prompt_format": run_cfg.get("prompt_format") if _scalar(run_cfg.get("prompt_format")) else None,
        "max_length": run_cfg.get("max_length") if isinstance(run_cfg.get("max_length"), int) else None,
        "quantization": run_cfg.get("quantization") if run_cfg.get("quantization") in ("4bit", "8bit") else None,
        "trust_remote_code": bool(trust_remote_code or run_cfg.get("trust_remote_code")),
        "lora": {"peft_type": adapter_cfg.get("peft_type"), "r": adapter_cfg.get("r"),
                 "alpha": adapter_cfg.get("lora_alpha"), "dropout": adapter_cfg.get("lora_dropout"),
                 "target_modules": lora_targets, "bias": adapter_cfg.get("bias")},
        "training": {k: training[k] for k in TRAINING_KEYS if k in training and _scalar(training[k])},
        "dataset": {
            "name": PurePosixPath(str(dataset["path"])).name if dataset.get("path") else None,
            "file_sha256": dataset.get("file_sha256") if HEX64.match(str(dataset.get("file_sha256"))) else None,
            "dataset_hash": dataset.get("dataset_hash")
            if re.match(r"^[0-9a-f]{8,64}$", str(dataset.get("dataset_hash"))) else None,
        },
        "evaluation": _metrics_summary(eval_results) if eval_results else None,
        "library_versions": {
            "packaged_with": installed_versions(LIBRARY_KEYS),
            "trained_with": {k: str(v) for k, v in trained_libs.items()
                             if k in LIBRARY_KEYS and version_ok.match(str(v))},
        },
        "files": files,
        "merge": merge,
        "reference_generation": reference,
    }
    return meta


def requirements_text() -> str:
    versions = installed_versions(PINNED_PACKAGES)
    lines = ["# Library versions this adapter was packaged with (pip install -r requirements.txt).",
             "# torch: install the build for your hardware first (CUDA or CPU) from pytorch.org;",
             "# the local version label (+cpu, +cu124) is dropped here."]
    for name in PINNED_PACKAGES:
        if name in versions:
            lines.append(f"{name}=={versions[name].split('+')[0]}")
        else:
            lines.append(f"# {name}: not installed when packaging")
    return "\n".join(lines) + "\n"


CARD_EXAMPLE = ("Label the review below as positive, negative or neutral. Respond with one "
                "lowercase word.", "The battery lasts all day and setup took five minutes.")


def _prompt_builder_code(prompt_format: str) -> str:
    if prompt_format == "chat":
        return '''def build_prompt(instruction, context=""):
    """The exact text the adapter was trained to answer (the tokenizer's chat template)."""
    user = f"{instruction.strip()}\\n\\n{context.strip()}" if context.strip() else instruction.strip()
    return tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                         tokenize=False, add_generation_prompt=True)'''
    return '''def build_prompt(instruction, context=""):
    """The exact text the adapter was trained to answer (instruction template)."""
    if context.strip():
        text = (f"### Instruction:\\n{instruction.strip()}\\n\\n### Input:\\n{context.strip()}\\n\\n"
                "### Response:\\n")
    else:
        text = f"### Instruction:\\n{instruction.strip()}\\n\\n### Response:\\n"
    return (tokenizer.bos_token or "") + text'''


def _metric_table(results: dict[str, Any]) -> list[str]:
    cols = (("EM", "exact_match"), ("F1", "token_f1"), ("ROUGE-L", "rouge_l"), ("BLEU", "bleu"),
            ("JSON fields", "json_field_accuracy"), ("Answer", "answer_exact_match"),
            ("Perplexity", "perplexity"), ("EOS rate", "eos_rate"))

    def cell(v: Any, k: str, signed: bool = False) -> str:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return "-"
        fmt = ".2f" if k == "perplexity" else ".3f"
        return format(v, ("+" if signed else "") + fmt)

    metrics = results.get("metrics") or {}
    base = results.get("base_metrics")
    lines = ["| Category | n | " + " | ".join(c for c, _ in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    groups = list((metrics.get("by_category") or {}).items()) + [("**overall**", metrics.get("overall") or {})]
    for group, summary in groups:
        lines.append(f"| {group} | {summary.get('n', '-')} | " +
                     " | ".join(cell(summary.get(k), k) for _, k in cols) + " |")
    if isinstance(base, dict):
        b = base.get("overall") or {}
        d = (results.get("deltas") or {}).get("overall") or {}
        lines.append(f"| base model (no adapter) | {b.get('n', '-')} | " +
                     " | ".join(cell(b.get(k), k) for _, k in cols) + " |")
        lines.append("| adapter - base | | " + " | ".join(cell(d.get(k), k, True) for _, k in cols) + " |")
    return lines


def build_model_card(*, name: str, meta: dict[str, Any], tokenizer, prompt_format: str,
                     members: Sequence[str], eval_results: dict[str, Any] | None) -> str:
    from llama_dataset import render_prompt
    from llama_model import is_embedded

    base = meta["base_model"]
    embedded = is_embedded(base)
    base_line = ('"/path/to/smollm2-135m-instruct"  # the embedded model: `python3 '
                 'llama_model.py` prints its folder' if embedded else json.dumps(base))
    rendered = render_prompt(tokenizer, prompt_format, *CARD_EXAMPLE)
    lora = meta["lora"]
    lines = [
        f"# {name}",
        "",
        f"A LoRA adapter for `{base}`" + (f" ({meta['model_size']})" if meta.get("model_size") else "")
        + ", fine-tuned for instruction following with the llama-sft toolkit.",
        "",
        f"- LoRA: r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
        f"target modules: {_short_targets(lora.get('target_modules'))}",
        f"- Trained on a {meta['quantization']} quantized base (QLoRA)" if meta.get("quantization")
        else "- Trained on the unquantized base",
        f"- Prompt format: `{prompt_format}`; max length {meta.get('max_length')} tokens",
        f"- Dataset: {meta['dataset'].get('name')} (dataset hash {meta['dataset'].get('dataset_hash')})",
        f"- trust_remote_code: {str(meta['trust_remote_code']).lower()}",
        "",
        "## Usage",
        "",
        "Load the base model, put the adapter on top (optionally merge it), and generate. Install "
        "the pinned libraries first: `pip install -r requirements.txt`.",
        "",
        "```python",
        "import torch",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"base_model = {base_line}",
        f'adapter = "./{name}"  # this folder, extracted from {name}.tar.gz',
        "",
        "tokenizer = AutoTokenizer.from_pretrained(adapter)",
        'model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.bfloat16, device_map="auto")',
        "model = PeftModel.from_pretrained(model, adapter)",
        "model = model.merge_and_unload()  # optional: fold the adapter into the weights",
        "model.eval()",
        "",
        _prompt_builder_code(prompt_format),
        "",
        f"prompt = build_prompt({CARD_EXAMPLE[0]!r},",
        f"                      {CARD_EXAMPLE[1]!r})",
        "# The prompt already holds its special tokens: do not let the tokenizer add a second BOS.",
        'inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)',
        "output = model.generate(**inputs, max_new_tokens=128, do_sample=False)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        "## Prompt format",
        "",
        f"The adapter was trained on `{prompt_format}` prompts and answers well only in that exact "
        "format. `build_prompt` above renders the example as:",
        "",
        "```text",
        rendered.rstrip("\n"),
        "```",
        "",
        "Exactly, as a Python string (note the trailing newline: the answer starts right after it):",
        "",
        "```python",
        repr(rendered),
        "```",
        "",
    ]
    if eval_results:
        ds = (meta.get("evaluation") or {}).get("dataset") or {}
        lines += ["## Evaluation", "",
                  f"Greedy decoding on {ds.get('examples_evaluated', '?')} examples of "
                  f"`{ds.get('name')}` (full results in `{EVAL_RESULTS}`). EM: exact match; F1: token "
                  "F1; JSON fields: share of reference JSON keys matched; Answer: exact match of "
                  "the extracted final answer; Perplexity: on the reference responses.", ""]
        lines += _metric_table(eval_results)
        lines.append("")
    if meta.get("merge"):
        m = meta["merge"]
        lines += ["## Merged model", "",
                  f"`{m['folder']}/` (beside the archive) holds the adapter merged into the "
                  f"{m['dtype']} weights of `{m['base_model']}`; load it with "
                  "`AutoModelForCausalLM.from_pretrained` alone, without peft."]
        if m.get("trained_quantization"):
            lines.append(f"The adapter was trained on a {m['trained_quantization']} quantized base "
                         "(QLoRA) but merged into the unquantized base weights, so the merged "
                         "model's outputs can differ slightly from adapter-on-quantized-base.")
        lines.append("")
    lines += ["## Files and verification", "",
              "| File | sha256 |", "|---|---|"]
    lines += [f"| `{m}` | `{meta['files'][m][:16]}...` |" for m in members if m in meta["files"]]
    lines += ["", f"`{SUMS}` lists the sha256 of every file. Check it with "
              f"`cd {name} && sha256sum -c {SUMS}`, or check everything and test-generate with:", "",
              "```bash", f"python3 llama_package.py --verify {name}.tar.gz", "```", ""]
    return "\n".join(lines)


def _short_targets(targets: Any) -> str:
    if isinstance(targets, list):
        names = sorted({str(t).rsplit(".", 1)[-1] for t in targets})
        return ", ".join(names)
    return str(targets)


# --------------------------------------------------------------------------------------
# Generation check and merge
# --------------------------------------------------------------------------------------


def reference_generation(adapter: Path, base_model: str | None, *, trust_remote_code: bool,
                         prompt_format: str | None) -> dict[str, Any]:
    """Greedy generation of the adapter on its base for the fixed verification prompt."""
    from llama_dataset import render_prompt, resolve_prompt_format
    from llama_generate import generate
    from llama_model import load_for_inference

    model, tok, run_cfg = load_for_inference(adapter_path=str(adapter), base_model=base_model,
                                             trust_remote_code=trust_remote_code)
    fmt = resolve_prompt_format(tok, prompt_format or run_cfg.get("prompt_format") or "auto")
    prompt = render_prompt(tok, fmt, VERIFY_INSTRUCTION, "")
    gen = generate(model, tok, [prompt], max_new_tokens=VERIFY_MAX_NEW_TOKENS, batch_size=1)[0]
    param = next(model.parameters())
    return {"instruction": VERIFY_INSTRUCTION, "prompt": prompt, "max_new_tokens":
            VERIFY_MAX_NEW_TOKENS, "text": gen.text, "new_tokens": gen.new_tokens,
            "dtype": str(param.dtype).replace("torch.", ""), "device": param.device.type,
            "libraries": installed_versions(GENERATION_LIBRARIES)}


def _merge_dtype(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def merge_adapter(adapter: Path, base_model: str, dest: Path, *, dtype_name: str,
                  trust_remote_code: bool, tokenizer) -> dict[str, Any]:
    """Load the base unquantized, apply the adapter, merge_and_unload, save safetensors."""
    from peft import PeftModel

    from llama_model import load_model

    dtype = _merge_dtype(dtype_name)
    logger.info("merging the adapter into %s (%s, unquantized)", base_model, dtype)
    model = load_model(base_model, dtype=dtype, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    merged = model.merge_and_unload()
    merged.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    for p in dest.iterdir():
        os.chmod(p, 0o644)  # safetensors writes 0600 files; these are for distribution
    leftovers = [p.name for p in dest.iterdir() if p.name.startswith("adapter_")]
    if leftovers:
        raise PackageError(f"merge left adapter files {leftovers} in {dest}")
    return {"dtype": str(dtype).replace("torch.", "")}


# --------------------------------------------------------------------------------------
# Archive
# --------------------------------------------------------------------------------------


def write_sums(folder: Path) -> dict[str, str]:
    """SHA256SUMS (sha256sum format) over every file in `folder` except itself."""
    sums = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != SUMS}
    (folder / SUMS).write_text("".join(f"{d}  {n}\n" for n, d in sums.items()), encoding="utf-8")
    return sums


def create_archive(folder: Path, archive: Path, *, mtime: int) -> list[str]:
    """A gzipped tar of `folder` as one top-level directory: regular files only, sorted, owner
    0:0, modes 0644/0755, one mtime for all (no user names, umask or file times leak in)."""
    import gzip

    top = folder.name
    names = []
    tmp = archive.with_name(f".{archive.name}.tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=mtime,
                                               filename="") as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(top)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
        tar.addfile(info)
        names.append(top + "/")
        for p in sorted(folder.iterdir()):
            info = tarfile.TarInfo(f"{top}/{p.name}")
            info.size, info.mode, info.mtime = p.stat().st_size, 0o644, mtime
            with open(p, "rb") as fh:
                tar.addfile(info, fh)
            names.append(info.name)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, archive)
    return names


def run_package(cfg: PackageArgs) -> dict[str, Any]:
    """Build the archive and side files; returns what was written and checked."""
    from safetensors import SafetensorError

    from llama_model import ModelLoadError, load_tokenizer

    if not cfg.adapter_path:
        raise PackageError("--adapter-path is required (e.g. --adapter-path "
                           "./training_output/final_model), or use --verify ARCHIVE")
    adapter = Path(cfg.adapter_path)
    run_cfg = check_adapter_folder(adapter)
    base_model, model_size = resolve_identity(cfg, run_cfg)
    adapter_sha = sha256_file(adapter / ADAPTER_WEIGHTS)
    adapter_cfg = json.loads((adapter / ADAPTER_CONFIG).read_text())
    found = find_eval_results(cfg, adapter, adapter_sha)
    eval_results = scrub_paths(found[1]) if found else None
    name = cfg.name or f"{_slug(base_model)}-lora-{adapter_sha[:8]}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise PackageError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only")
    out_dir = Path(cfg.output_dir)
    problem = output_dir_problem("--output-dir", out_dir)
    if problem:
        raise PackageError(problem)
    outputs = {"archive": out_dir / f"{name}.tar.gz",
               "archive_sha256_file": out_dir / f"{name}.tar.gz.sha256",
               "metadata": out_dir / f"{name}.metadata.json",
               "readme": out_dir / f"{name}.README.md",
               "requirements": out_dir / f"{name}.requirements.txt"}
    if cfg.merge:
        outputs["merged"] = out_dir / f"{name}-merged"
    existing = [str(p) for p in outputs.values() if p.exists()]
    if existing and not cfg.overwrite:
        raise PackageError(f"{existing[0]} already exists: pass --overwrite to replace the "
                           "package, or --name for a new one")
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out_dir))
    try:
        stage = staging / name
        stage.mkdir()
        for fname in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            shutil.copyfile(adapter / fname, stage / fname)
        if (adapter / "tokenizer_config.json").is_file():
            for fname in TOKENIZER_FILES:
                if (adapter / fname).is_file():
                    shutil.copyfile(adapter / fname, stage / fname)
            tokenizer = _local_tokenizer(stage)
        else:
            logger.info("%s has no tokenizer files: saving %s's tokenizer", adapter, base_model)
            tokenizer = load_tokenizer(base_model, trust_remote_code=cfg.trust_remote_code)
            tokenizer.save_pretrained(stage)
            for extra in set(p.name for p in stage.iterdir()) - set(TOKENIZER_FILES) - {
                    ADAPTER_WEIGHTS, ADAPTER_CONFIG}:
                (stage / extra).unlink()
        packaged_run_cfg = scrub_paths(run_cfg) if run_cfg else {
            "base_model": base_model, "model_size": model_size}
        (stage / RUN_CONFIG).write_text(_json(packaged_run_cfg), encoding="utf-8")
        if eval_results is not None:
            (stage / EVAL_RESULTS).write_text(_json(eval_results), encoding="utf-8")
        from llama_dataset import resolve_prompt_format

        prompt_format = resolve_prompt_format(tokenizer, run_cfg.get("prompt_format") or "auto")

        reference = None
        if cfg.record_generation:
            try:
                reference = reference_generation(adapter, base_model if cfg.base_model else None,
                                                 trust_remote_code=cfg.trust_remote_code,
                                                 prompt_format=prompt_format)
                logger.info("reference generation: %r", reference["text"])
            except ModelLoadError as e:
                logger.warning("no reference generation recorded (--verify will only check "
                               "that the adapter loads and generates): %s", e)
            except (RuntimeError, ValueError, KeyError, OSError, SafetensorError) as e:
                # e.g. peft's "size mismatch": an adapter for another architecture
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise PackageError(f"--adapter-path {adapter} does not load on {base_model!r}: "
                                   f"{first}; nothing was written") from None

        merge_info = None
        if cfg.merge:
            merged_stage = staging / outputs["merged"].name
            merged_stage.mkdir()
            info = merge_adapter(adapter, base_model, merged_stage, dtype_name=cfg.merge_dtype,
                                 trust_remote_code=cfg.trust_remote_code, tokenizer=tokenizer)
            merge_info = {
                "folder": merged_stage.name, "base_model": scrub_paths(base_model),
                "dtype": info["dtype"], "base_quantization": None,
                "trained_quantization": run_cfg.get("quantization")
                if run_cfg.get("quantization") in ("4bit", "8bit") else None,
                "files": {p.name: sha256_file(p) for p in sorted(merged_stage.iterdir()) if p.is_file()},
            }
            if merge_info["trained_quantization"]:
                merge_info["note"] = (f"trained on a {merge_info['trained_quantization']} base "
                                      f"(QLoRA); merged into the unquantized {info['dtype']} base")

        created_ts = int(time.time())
        created = datetime.fromtimestamp(created_ts, timezone.utc).isoformat(timespec="seconds")
        (stage / "requirements.txt").write_text(requirements_text(), encoding="utf-8")
        # README first (its text is hashed into metadata), metadata next, SHA256SUMS last.
        content_files = {p.name: sha256_file(p) for p in sorted(stage.iterdir()) if p.is_file()}
        meta = build_metadata(name=name, created=created, base_model=base_model,
                              model_size=model_size, run_cfg=run_cfg, adapter_cfg=adapter_cfg,
                              eval_results=eval_results, trust_remote_code=cfg.trust_remote_code,
                              files=content_files, merge=merge_info, reference=reference)
        members = sorted(content_files) + ["README.md", METADATA, SUMS]
        card = build_model_card(name=name, meta=meta, tokenizer=tokenizer,
                                prompt_format=prompt_format, members=members,
                                eval_results=eval_results)
        (stage / "README.md").write_text(card, encoding="utf-8")
        meta["files"]["README.md"] = sha256_file(stage / "README.md")
        (stage / METADATA).write_text(_json(meta), encoding="utf-8")
        sums = write_sums(stage)

        written = [p for p in stage.iterdir() if p.is_file()]
        if cfg.merge:
            written += [p for p in (staging / outputs["merged"].name).iterdir() if p.is_file()]
        leak = find_secret(written)
        if leak:
            raise PackageError(f"{leak[0].name} contains the value of the environment variable "
                               f"{leak[1]}; nothing was written")

        staged_archive = staging / outputs["archive"].name
        archive_members = create_archive(stage, staged_archive, mtime=created_ts)
        leak = find_secret([staged_archive])
        if leak:
            raise PackageError(f"the archive contains the value of {leak[1]}; nothing was written")
        archive_sha = sha256_file(staged_archive)
        (staging / outputs["archive_sha256_file"].name).write_text(
            f"{archive_sha}  {outputs['archive'].name}\n", encoding="utf-8")
        shutil.copyfile(stage / METADATA, staging / outputs["metadata"].name)
        shutil.copyfile(stage / "README.md", staging / outputs["readme"].name)
        shutil.copyfile(stage / "requirements.txt", staging / outputs["requirements"].name)
        for key, final in outputs.items():
            src = staging / final.name
            if final.is_dir():
                logger.warning("overwriting %s", final)
                shutil.rmtree(final)
            elif final.exists():
                logger.warning("overwriting %s", final)
                final.unlink()
            os.replace(src, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %s (%d members, sha256 %s)", outputs["archive"], len(archive_members),
                archive_sha[:16])
    return {"name": name, "base_model": base_model, "model_size": model_size,
            "adapter_sha256": adapter_sha, "archive_sha256": archive_sha,
            "members": archive_members, "sums": sums,
            "eval_results": str(found[0]) if found else None,
            "reference_generation": reference, "merge": merge_info,
            **{k: str(v) for k, v in outputs.items()}}


# --------------------------------------------------------------------------------------
# Verify
# --------------------------------------------------------------------------------------


def check_member(member: tarfile.TarInfo) -> str | None:
    """Why a member is unsafe to extract, or None."""
    name = member.name
    if not name or "\x00" in name:
        return "an empty or NUL-containing name"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        return "a '..' path component"
    if member.issym() or member.islnk():
        return "a link"
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        return "a device or FIFO"
    if not (member.isreg() or member.isdir()):
        return "not a regular file or folder"
    return None


def read_sums(path: Path) -> dict[str, str]:
    sums = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line)
        if not m:
            raise VerifyError(f"{SUMS} line {lineno} is malformed")
        digest, rel = m.groups()
        if check_member(tarfile.TarInfo(rel)) or "/" in rel:
            raise VerifyError(f"{SUMS} line {lineno} names an unsafe path")
        if rel in sums:
            raise VerifyError(f"{SUMS} lists {rel} twice")
        sums[rel] = digest
    return sums


def run_verify(cfg: PackageArgs) -> dict[str, Any]:
    """Check, extract, reload and generate; raise VerifyError on any mismatch."""
    archive = Path(cfg.verify)
    if not archive.is_file():
        raise PackageError(f"--verify {archive}: file not found (build one with "
                           "`python3 llama_package.py --adapter-path ... --output-dir ./packages`)")
    sidecar = archive.with_name(archive.name + ".sha256")
    archive_sha = sha256_file(archive)
    if sidecar.is_file():
        recorded = sidecar.read_text().split()[0] if sidecar.read_text().split() else ""
        if recorded != archive_sha:
            raise VerifyError(f"{archive.name}: sha256 {archive_sha[:16]}... does not match "
                              f"{sidecar.name} ({recorded[:16]}...): the archive was modified")
        print(f"archive sha256 matches {sidecar.name}")
    try:
        tar = tarfile.open(archive, mode="r:gz")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise VerifyError(f"{archive}: not a readable .tar.gz ({e})") from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise VerifyError(f"{archive}: corrupt archive ({e})") from None
        seen, tops = set(), set()
        for member in members:
            problem = check_member(member)
            if problem:
                raise VerifyError(f"{archive.name}: refusing member {member.name!r}: {problem}; "
                                  "nothing was extracted")
            norm = str(PurePosixPath(member.name))
            if norm in seen:
                raise VerifyError(f"{archive.name}: member {member.name!r} appears twice")
            seen.add(norm)
            tops.add(PurePosixPath(norm).parts[0])
        if len(tops) != 1:
            raise VerifyError(f"{archive.name}: expected one top-level folder, found "
                              f"{sorted(tops)[:5]}")
        top = tops.pop()
        if cfg.extract_to:
            dest = Path(cfg.extract_to)
            problem = output_dir_problem("--extract-to", dest)
            if problem:
                raise PackageError(problem)
            if dest.exists() and any(dest.iterdir()):
                raise PackageError(f"--extract-to {dest}: folder is not empty")
            dest.mkdir(parents=True, exist_ok=True)
            keep = True
        else:
            dest = Path(tempfile.mkdtemp(prefix="llama_verify_"))
            keep = False
        try:
            tar.extractall(dest, filter="data")
        except (tarfile.TarError, OSError) as e:
            if not keep:
                shutil.rmtree(dest, ignore_errors=True)
            raise VerifyError(f"{archive.name}: extraction refused ({e})") from None
    try:
        return _verify_extracted(cfg, archive, dest / top, archive_sha)
    finally:
        if not keep:
            shutil.rmtree(dest, ignore_errors=True)


def _verify_extracted(cfg: PackageArgs, archive: Path, folder: Path, archive_sha: str) -> dict[str, Any]:
    from llama_generate import generate
    from llama_model import ModelLoadError, load_for_inference

    if not folder.is_dir():
        raise VerifyError(f"{archive.name}: the top-level entry is not a folder")
    missing = [m for m in REQUIRED_MEMBERS if not (folder / m).is_file()]
    if missing:
        raise VerifyError(f"{archive.name}: missing {', '.join(missing)}")
    sums = read_sums(folder / SUMS)
    files = {p.name for p in folder.iterdir()}
    subdirs = [p.name for p in folder.iterdir() if not p.is_file()]
    if subdirs:
        raise VerifyError(f"{archive.name}: unexpected folder(s) {subdirs}")
    unlisted = sorted(files - set(sums) - {SUMS})
    if unlisted:
        raise VerifyError(f"{archive.name}: {', '.join(unlisted)} not covered by {SUMS}")
    for rel, digest in sums.items():
        if rel not in files:
            raise VerifyError(f"{archive.name}: {rel} is listed in {SUMS} but missing")
        actual = sha256_file(folder / rel)
        if actual != digest:
            raise VerifyError(f"{archive.name}: {rel} does not match {SUMS} (sha256 "
                              f"{actual[:16]}..., expected {digest[:16]}...): the archive was "
                              "modified or corrupted")
    print(f"{SUMS}: {len(sums)} files OK")
    try:
        meta = json.loads((folder / METADATA).read_text(encoding="utf-8"))
    except ValueError as e:
        raise VerifyError(f"{METADATA}: not valid JSON ({e})") from None
    for rel, digest in (meta.get("files") or {}).items():
        if sums.get(rel) != digest:
            raise VerifyError(f"{METADATA} and {SUMS} disagree about {rel}")

    reference = meta.get("reference_generation")
    try:
        model, tok, run_cfg = load_for_inference(adapter_path=str(folder), base_model=cfg.base_model,
                                                 trust_remote_code=cfg.trust_remote_code)
    except ModelLoadError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise VerifyError(f"the packaged adapter does not load on its base model: {first}") from None
    from llama_dataset import render_prompt, resolve_prompt_format

    fmt = resolve_prompt_format(tok, run_cfg.get("prompt_format") or "auto")
    prompt = render_prompt(tok, fmt, VERIFY_INSTRUCTION, "")
    gen = generate(model, tok, [prompt], max_new_tokens=VERIFY_MAX_NEW_TOKENS, batch_size=1)[0]
    param = next(model.parameters())
    dtype, device = str(param.dtype).replace("torch.", ""), param.device.type
    print(f"base model: {run_cfg.get('base_model') if not cfg.base_model else cfg.base_model}")
    print(f"prompt ({fmt} format):\n{prompt}")
    print(f"greedy generation ({VERIFY_MAX_NEW_TOKENS} tokens max):\n{gen.text}")
    matches = None
    if reference and reference.get("prompt") == prompt:
        same_setup = (reference.get("dtype") == dtype and reference.get("device") == device
                      and reference.get("libraries") == installed_versions(GENERATION_LIBRARIES))
        matches = reference.get("text") == gen.text
        if not matches and same_setup:
            raise VerifyError("the packaged adapter generates a different text than it did when "
                              f"packaged ({dtype} on {device}):\n  packaged: "
                              f"{reference.get('text')!r}\n  now:      {gen.text!r}")
        if matches:
            print("generation matches the one recorded at packaging time")
        else:
            logger.warning("generation differs from the one recorded at packaging time (%s on "
                           "%s with %s; now %s on %s with %s): numerics differ across devices, "
                           "dtypes and library versions", reference.get("dtype"),
                           reference.get("device"), reference.get("libraries"), dtype, device,
                           installed_versions(GENERATION_LIBRARIES))
    elif reference:
        logger.warning("the recorded reference used another prompt; not compared")
    else:
        print("no reference generation recorded at packaging time; checked that it loads and "
              "generates")
    return {"archive": str(archive), "archive_sha256": archive_sha, "files_checked": len(sums),
            "prompt": prompt, "generation": gen.text, "matches_reference": matches,
            "base_model": cfg.base_model or run_cfg.get("base_model"),
            "extracted_to": str(folder) if cfg.extract_to else None}


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done, 1 verification failed, 2 bad input; one `error: ...` line."""
    return run_cli(lambda: _main(argv), bad_input=(PackageError,), failed=(VerifyError,),
                   failed_prefix="verification failed: ")


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.__dict__.pop("verbose"))
    cfg = resolve_config(PackageArgs, args)
    if cfg.model_size:
        cfg.model_size = get_spec(cfg.model_size).size
    if cfg.verify:
        result = run_verify(cfg)
        print(f"OK: {result['archive']} verified ({result['files_checked']} files)")
        return 0
    result = run_package(cfg)
    print(f"archive:      {result['archive']}  (sha256 {result['archive_sha256']})")
    print(f"metadata:     {result['metadata']}")
    print(f"model card:   {result['readme']}")
    print(f"requirements: {result['requirements']}")
    if result.get("merged"):
        print(f"merged model: {result['merged']}")
    print(f"members:      {', '.join(m.split('/', 1)[1] for m in result['members'] if '/' in m and m.split('/', 1)[1])}")
    print(f"verify with:  python3 llama_package.py --verify {result['archive']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
