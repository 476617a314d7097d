"""Package a trained LoRA adapter: check the adapter folder, stage its files with a model card,
metadata and SHA256SUMS, refuse any credential, and write NAME.tar.gz with its side files.

    python3 llama_package.py --adapter-path ./training_output/final_model --output-dir ./packages
    python3 llama_package.py --verify ./packages/NAME.tar.gz

`run_package` is the stage; verify.py checks a package.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llama_sft.config import PackageArgs, get_spec
from llama_sft.data.prompts import resolve_prompt_format
from llama_sft.errors import ModelLoadError, PackageError
from llama_sft.files import (
    MANIFEST,
    output_dir_problem,
    safetensors_problem,
    sha256_file,
    verify_manifest,
)
from llama_sft.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EVAL_RESULTS,
    EVAL_RESULTS_NAMES,
    METADATA,
    RUN_CONFIG,
    SUMS,
    TOKENIZER_FILES,
    RunConfig,
)
from llama_sft.modeling.load import (
    ensure_pad_token,
    inference_dtype,
    load_model,
    load_tokenizer,
    read_run_config,
    resolve_base_model,
    same_base,
)
from llama_sft.packaging.archive import create_archive, write_sums
from llama_sft.packaging.card import build_model_card
from llama_sft.packaging.metadata import (
    build_metadata,
    find_secret,
    json_text,
    requirements_text,
    scrub_paths,
    slug,
)
from llama_sft.packaging.modelfile import write_modelfile
from llama_sft.packaging.verify import reference_generation
from llama_sft.packaging.vllm_check import check_vllm_adapter, vllm_summary

logger = logging.getLogger("llama_sft")

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"


@dataclass
class PackageInputs:
    """Everything `check_inputs` established before anything is written."""

    adapter: Path
    run_config: dict[str, Any]  # run_config.json as training wrote it ({} when absent)
    run: RunConfig
    base_model: str
    model_size: str | None
    adapter_sha: str
    adapter_cfg: dict[str, Any]
    eval_path: Path | None
    eval_results: dict[str, Any] | None  # home paths scrubbed
    name: str
    outputs: dict[str, Path]  # what goes into --output-dir, by result key


def _local_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return ensure_pad_token(AutoTokenizer.from_pretrained(str(folder)))


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
    # Training writes the manifest; an adapter saved by hand has none and is still packaged.
    if (adapter / MANIFEST).is_file():
        reason = verify_manifest(adapter)
        if reason:
            raise PackageError(f"--adapter-path {adapter}: {reason}, per the {MANIFEST} written "
                               "at training (modified or truncated since training)")
    if not run_cfg:
        logger.warning("%s has no %s: the package will lack training details", adapter, RUN_CONFIG)
    return run_cfg


def resolve_identity(cfg: PackageArgs, run: RunConfig) -> tuple[str, str | None]:
    """(base model, model size): flags must agree with what the adapter was trained on."""

    trained_base, trained_size = run.base_model, run.model_size
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


def merge_adapter(adapter: Path, base_model: str, dest: Path, *, dtype_name: str,
                  trust_remote_code: bool, tokenizer) -> dict[str, Any]:
    """Load the base unquantized, apply the adapter, merge_and_unload, save safetensors."""
    from peft import PeftModel

    dtype = inference_dtype(dtype_name)
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


def package_name(cfg: PackageArgs, base_model: str, adapter_sha: str) -> str:
    name = cfg.name or f"{slug(base_model)}-lora-{adapter_sha[:8]}"
    if not re.fullmatch(NAME_PATTERN, name):
        raise PackageError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only")
    return name


def plan_outputs(cfg: PackageArgs, name: str) -> dict[str, Path]:
    """The files the package will be, refused if any exists and --overwrite is not given."""
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
    return outputs


def check_inputs(cfg: PackageArgs) -> PackageInputs:
    """Every check that needs no model: the adapter, its identity, evaluation results, names."""
    if not cfg.adapter_path:
        raise PackageError("--adapter-path is required (e.g. --adapter-path "
                           "./training_output/final_model), or use --verify ARCHIVE")
    adapter = Path(cfg.adapter_path)
    run_config = check_adapter_folder(adapter)
    run = RunConfig.from_dict(run_config)
    base_model, model_size = resolve_identity(cfg, run)
    adapter_sha = sha256_file(adapter / ADAPTER_WEIGHTS)
    adapter_cfg = json.loads((adapter / ADAPTER_CONFIG).read_text())
    found = find_eval_results(cfg, adapter, adapter_sha)
    name = package_name(cfg, base_model, adapter_sha)
    return PackageInputs(
        adapter=adapter, run_config=run_config, run=run, base_model=base_model,
        model_size=model_size, adapter_sha=adapter_sha, adapter_cfg=adapter_cfg,
        eval_path=found[0] if found else None,
        eval_results=scrub_paths(found[1]) if found else None,
        name=name, outputs=plan_outputs(cfg, name))


def _stage_tokenizer(cfg: PackageArgs, inputs: PackageInputs, stage: Path):
    """The adapter's own tokenizer files, else the base model's tokenizer saved into `stage`."""
    adapter = inputs.adapter
    if (adapter / "tokenizer_config.json").is_file():
        for fname in TOKENIZER_FILES:
            if (adapter / fname).is_file():
                shutil.copyfile(adapter / fname, stage / fname)
        return _local_tokenizer(stage)
    logger.info("%s has no tokenizer files: saving %s's tokenizer", adapter, inputs.base_model)
    tokenizer = load_tokenizer(inputs.base_model, trust_remote_code=cfg.trust_remote_code)
    tokenizer.save_pretrained(stage)
    for extra in set(p.name for p in stage.iterdir()) - set(TOKENIZER_FILES) - {
            ADAPTER_WEIGHTS, ADAPTER_CONFIG}:
        (stage / extra).unlink()
    return tokenizer


def stage_files(cfg: PackageArgs, inputs: PackageInputs, stage: Path):
    """Copy the adapter, tokenizer, run config and evaluation results into `stage`; returns
    the tokenizer."""
    stage.mkdir()
    for fname in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        shutil.copyfile(inputs.adapter / fname, stage / fname)
    tokenizer = _stage_tokenizer(cfg, inputs, stage)
    # The file as training wrote it (home paths scrubbed), unknown keys included: the secret
    # scan must see everything the run config holds, and a newer toolkit's fields survive.
    packaged_run_cfg = scrub_paths(inputs.run_config) if inputs.run_config else {
        "base_model": inputs.base_model, "model_size": inputs.model_size}
    (stage / RUN_CONFIG).write_text(json_text(packaged_run_cfg), encoding="utf-8")
    if inputs.eval_results is not None:
        (stage / EVAL_RESULTS).write_text(json_text(inputs.eval_results), encoding="utf-8")
    return tokenizer


def record_reference(cfg: PackageArgs, inputs: PackageInputs,
                     prompt_format: str) -> dict[str, Any] | None:
    """The greedy text --verify compares against; None (with a warning) when the base model
    cannot be loaded here. An adapter that does not fit its base stops packaging."""
    from safetensors import SafetensorError

    try:
        reference = reference_generation(
            inputs.adapter, inputs.base_model if cfg.base_model else None,
            trust_remote_code=cfg.trust_remote_code, prompt_format=prompt_format)
    except ModelLoadError as e:
        logger.warning("no reference generation recorded (--verify will only check "
                       "that the adapter loads and generates): %s", e)
        return None
    except (RuntimeError, ValueError, KeyError, OSError, SafetensorError) as e:
        # e.g. peft's "size mismatch": an adapter for another architecture
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise PackageError(f"--adapter-path {inputs.adapter} does not load on "
                           f"{inputs.base_model!r}: {first}; nothing was written") from None
    logger.info("reference generation: %r", reference["text"])
    return reference


def stage_merged(cfg: PackageArgs, inputs: PackageInputs, staging: Path,
                 tokenizer) -> dict[str, Any]:
    """--merge: the merged model folder in `staging`; returns its metadata entry."""
    merged_stage = staging / inputs.outputs["merged"].name
    merged_stage.mkdir()
    info = merge_adapter(inputs.adapter, inputs.base_model, merged_stage,
                         dtype_name=cfg.merge_dtype, trust_remote_code=cfg.trust_remote_code,
                         tokenizer=tokenizer)
    return {
        "folder": merged_stage.name, "base_model": scrub_paths(inputs.base_model),
        "dtype": info["dtype"], "base_quantization": None,
        **qlora_record(inputs.run.quantization, info["dtype"]),
        "files": {p.name: sha256_file(p) for p in sorted(merged_stage.iterdir()) if p.is_file()},
    }


def qlora_record(quantization: str | None, merge_dtype: str, then: str = "") -> dict[str, Any]:
    """What a merge's metadata says of the base the adapter was trained on: a QLoRA adapter
    (4-bit or 8-bit base) is merged into the unquantized base, and the note says so."""
    trained = quantization if quantization in ("4bit", "8bit") else None
    record: dict[str, Any] = {"trained_quantization": trained}
    if trained:
        record["note"] = (f"trained on a {trained} base (QLoRA); merged into the unquantized "
                          f"{merge_dtype} base{then}")
    return record


def stage_gguf(cfg: PackageArgs, inputs: PackageInputs, stage: Path, tokenizer,
               prompt_format: str) -> dict[str, Any]:
    """--gguf TYPE: NAME-TYPE.gguf in the package folder, the adapter merged into the
    unquantized base as --merge does; returns metadata.json's "gguf" entry."""
    from llama_sft.packaging.gguf import export_adapter_gguf

    info = export_adapter_gguf(
        inputs.adapter, inputs.base_model, stage / f"{inputs.name}-{cfg.gguf}.gguf",
        gguf_type=cfg.gguf, dtype=inference_dtype(cfg.merge_dtype),
        trust_remote_code=cfg.trust_remote_code, tokenizer=tokenizer,
        prompt_format=prompt_format, name=inputs.name)
    info["base_model"] = scrub_paths(inputs.base_model)
    info.update(qlora_record(inputs.run.quantization, info["merge_dtype"],
                             then=f", then written as {cfg.gguf}"))
    logger.info("GGUF %s: %.1f MB in %.1f s", info["file"], info["size_bytes"] / 1e6,
                info["seconds"])
    return info


def stage_modelfile(stage: Path, tokenizer, run: RunConfig) -> str | None:
    """A Modelfile beside the GGUF file in the package folder, when there is one; returns the
    GGUF's name (None without one)."""
    ggufs = sorted(p.name for p in stage.glob("*.gguf"))
    if not ggufs:
        return None
    if len(ggufs) > 1:
        logger.warning("%d GGUF files in the package: the Modelfile uses %s", len(ggufs), ggufs[0])
    write_modelfile(stage, ggufs[0], tokenizer, run)
    return ggufs[0]


def vllm_report(stage: Path, adapter_cfg: dict[str, Any]) -> dict[str, Any]:
    """metadata.json's lora.vllm: whether vLLM loads the staged adapter, rule by rule. A failing
    rule is a warning: the adapter is still a valid peft adapter."""
    results = check_vllm_adapter(stage)
    for result in results:
        if not result.passed:
            logger.warning("vLLM would not load this adapter as is: %s: %s", result.rule,
                           result.detail)
    summary = vllm_summary(results, adapter_cfg)
    if summary["compatible"]:
        logger.info("vLLM: loads with --enable-lora --max-lora-rank %s", summary["max_lora_rank"])
    return summary


def write_card_and_metadata(cfg: PackageArgs, inputs: PackageInputs, stage: Path, *, tokenizer,
                            prompt_format: str, merge_info: dict[str, Any] | None,
                            reference: dict[str, Any] | None, created_ts: int,
                            gguf_info: dict[str, Any] | None = None) -> dict[str, str]:
    """requirements.txt, README.md, metadata.json and SHA256SUMS; returns the sums."""
    created = datetime.fromtimestamp(created_ts, timezone.utc).isoformat(timespec="seconds")
    (stage / "requirements.txt").write_text(requirements_text(), encoding="utf-8")
    gguf_name = stage_modelfile(stage, tokenizer, inputs.run)
    # README first (its text is hashed into metadata), metadata next, SHA256SUMS last.
    content_files = {p.name: sha256_file(p) for p in sorted(stage.iterdir()) if p.is_file()}
    meta = build_metadata(name=inputs.name, created=created, base_model=inputs.base_model,
                          model_size=inputs.model_size, run_cfg=inputs.run,
                          adapter_cfg=inputs.adapter_cfg, eval_results=inputs.eval_results,
                          trust_remote_code=cfg.trust_remote_code, files=content_files,
                          merge=merge_info, reference=reference,
                          base_model_revision=inputs.run_config.get("base_model_revision"))
    meta["lora"]["vllm"] = vllm_report(stage, inputs.adapter_cfg)
    if gguf_info:
        meta["gguf"] = gguf_info
    members = sorted(content_files) + ["README.md", METADATA, SUMS]
    card = build_model_card(name=inputs.name, meta=meta, tokenizer=tokenizer,
                            prompt_format=prompt_format, members=members,
                            eval_results=inputs.eval_results, gguf_name=gguf_name)
    (stage / "README.md").write_text(card, encoding="utf-8")
    meta["files"]["README.md"] = sha256_file(stage / "README.md")
    (stage / METADATA).write_text(json_text(meta), encoding="utf-8")
    return write_sums(stage)


def refuse_secrets(paths: list[Path]) -> None:
    leak = find_secret(paths)
    if leak:
        raise PackageError(f"{leak[0].name} contains the value of the environment variable "
                           f"{leak[1]}; nothing was written")


def write_archive(inputs: PackageInputs, stage: Path, staging: Path,
                  created_ts: int) -> tuple[list[str], str]:
    """The archive, its .sha256 and the readable copies, all in `staging`; returns the archive
    members and sha256."""
    outputs = inputs.outputs
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
    return archive_members, archive_sha


def move_into_place(staging: Path, outputs: dict[str, Path]) -> None:
    """Replace each output with its staged version (only --overwrite gets this far with one)."""
    for final in outputs.values():
        src = staging / final.name
        if final.is_dir():
            logger.warning("overwriting %s", final)
            shutil.rmtree(final)
        elif final.exists():
            logger.warning("overwriting %s", final)
            final.unlink()
        os.replace(src, final)


def run_package(cfg: PackageArgs) -> dict[str, Any]:
    """Build the archive and side files; returns what was written and checked."""
    inputs = check_inputs(cfg)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Everything is built in a hidden folder beside the outputs and moved in at the end, so a
    # failure (a leaked credential, a bad merge) leaves no partial package behind.
    staging = Path(tempfile.mkdtemp(prefix=f".{inputs.name}-", dir=out_dir))
    try:
        stage = staging / inputs.name
        tokenizer = stage_files(cfg, inputs, stage)
        prompt_format = resolve_prompt_format(tokenizer, inputs.run.prompt_format or "auto")
        reference = record_reference(cfg, inputs, prompt_format) if cfg.record_generation else None
        merge_info = stage_merged(cfg, inputs, staging, tokenizer) if cfg.merge else None
        gguf_info = (stage_gguf(cfg, inputs, stage, tokenizer, prompt_format) if cfg.gguf
                     else None)
        created_ts = int(time.time())
        sums = write_card_and_metadata(cfg, inputs, stage, tokenizer=tokenizer,
                                       prompt_format=prompt_format, merge_info=merge_info,
                                       reference=reference, created_ts=created_ts,
                                       gguf_info=gguf_info)
        written = [p for p in stage.iterdir() if p.is_file()]
        if cfg.merge:
            written += [p for p in (staging / inputs.outputs["merged"].name).iterdir() if p.is_file()]
        refuse_secrets(written)
        archive_members, archive_sha = write_archive(inputs, stage, staging, created_ts)
        move_into_place(staging, inputs.outputs)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %s (%d members, sha256 %s)", inputs.outputs["archive"],
                len(archive_members), archive_sha[:16])
    return {"name": inputs.name, "base_model": inputs.base_model,
            "model_size": inputs.model_size, "adapter_sha256": inputs.adapter_sha,
            "archive_sha256": archive_sha, "members": archive_members, "sums": sums,
            "eval_results": str(inputs.eval_path) if inputs.eval_path else None,
            "reference_generation": reference, "merge": merge_info, "gguf": gguf_info,
            **{k: str(v) for k, v in inputs.outputs.items()}}


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
    if result.get("gguf"):
        gguf = result["gguf"]
        lines.append(f"gguf:         {gguf['file']} in the archive ({gguf['type']}, "
                     f"{gguf['size_bytes'] / 1e6:.1f} MB, sha256 {gguf['sha256'][:16]}...)")
    lines += [f"members:      {members}",
              f"verify with:  python3 llama_package.py --verify {result['archive']}"]
    return "\n".join(lines)
