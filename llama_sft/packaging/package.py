"""TODO docstring"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llama_sft.config import PackageArgs, get_spec
from llama_sft.data.prompts import resolve_prompt_format
from llama_sft.errors import ModelLoadError, PackageError
from llama_sft.files import output_dir_problem, safetensors_problem, sha256_file
from llama_sft.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EVAL_RESULTS,
    EVAL_RESULTS_NAMES,
    METADATA,
    RUN_CONFIG,
    SUMS,
    TOKENIZER_FILES,
    TRAINER_MANIFEST,
)
from llama_sft.modeling.load import (
    load_model,
    load_tokenizer,
    read_run_config,
    resolve_base_model,
    same_base,
)
from llama_sft.packaging.archive import create_archive, write_sums
from llama_sft.packaging.card import build_model_card
from llama_sft.packaging.metadata import (
    _json,
    _slug,
    build_metadata,
    find_secret,
    requirements_text,
    scrub_paths,
)
from llama_sft.packaging.verify import reference_generation

logger = logging.getLogger("llama_sft")


def _local_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def check_adapter_folder(adapter: Path) -> dict[str, Any]:
    """The run config of a complete, intact adapter folder; raises ModelLoadError/PackageError."""

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


def run_package(cfg: PackageArgs) -> dict[str, Any]:
    """Build the archive and side files; returns what was written and checked."""
    from safetensors import SafetensorError


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


def format_package_summary(result: dict[str, Any]) -> str:
    """What llama_package.py prints after packaging: every file written, and how to verify."""
    members = ", ".join(m.split("/", 1)[1] for m in result["members"]
                        if "/" in m and m.split("/", 1)[1])
    lines = [f"archive:      {result['archive']}  (sha256 {result['archive_sha256']})",
             f"metadata:     {result['metadata']}",
             f"model card:   {result['readme']}",
             f"requirements: {result['requirements']}"]
    if result.get("merged"):
        lines.append(f"merged model: {result['merged']}")
    lines += [f"members:      {members}",
              f"verify with:  python3 llama_package.py --verify {result['archive']}"]
    return "\n".join(lines)
