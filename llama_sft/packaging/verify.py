"""Verify a package (`python3 llama_package.py --verify ./packages/NAME.tar.gz`): refuse unsafe
members before extracting, check SHA256SUMS and metadata.json, then reload the adapter on its base
and compare a greedy generation with the one recorded at packaging time (`reference_generation`)."""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from llama_sft.config import PackageArgs
from llama_sft.data.prompts import render_prompt, resolve_prompt_format
from llama_sft.errors import ModelLoadError, PackageError, VerifyError
from llama_sft.evaluation.generate import generate
from llama_sft.files import output_dir_problem, sha256_file
from llama_sft.layout import METADATA, REQUIRED_MEMBERS, SUMS, RunConfig
from llama_sft.modeling.load import load_for_inference
from llama_sft.packaging.archive import check_member, read_sums
from llama_sft.packaging.metadata import versions_of
from llama_sft.packaging.modelfile import MODELFILE
from llama_sft.packaging.vllm_check import check_vllm_adapter, format_vllm_results

logger = logging.getLogger("llama_sft")

VERIFY_INSTRUCTION = "List three primary colors, separated by commas."

VERIFY_MAX_NEW_TOKENS = 24


# Greedy text must be reproduced exactly only when these, the dtype and the device are the same.
GENERATION_LIBRARIES = ("torch", "transformers", "peft")


def reference_generation(adapter: Path, base_model: str | None, *, trust_remote_code: bool,
                         prompt_format: str | None) -> dict[str, Any]:
    """Greedy generation of the adapter on its base for the fixed verification prompt."""
    model, tok, run_cfg = load_for_inference(adapter_path=str(adapter), base_model=base_model,
                                             trust_remote_code=trust_remote_code)
    run = RunConfig.from_dict(run_cfg)
    fmt = resolve_prompt_format(tok, prompt_format or run.prompt_format or "auto")
    prompt = render_prompt(tok, fmt, VERIFY_INSTRUCTION, "")
    gen = generate(model, tok, [prompt], max_new_tokens=VERIFY_MAX_NEW_TOKENS, batch_size=1)[0]
    param = next(model.parameters())
    return {"instruction": VERIFY_INSTRUCTION, "prompt": prompt, "max_new_tokens":
            VERIFY_MAX_NEW_TOKENS, "text": gen.text, "new_tokens": gen.new_tokens,
            "dtype": str(param.dtype).replace("torch.", ""), "device": param.device.type,
            "libraries": versions_of(GENERATION_LIBRARIES)}


def check_archive_file(archive: Path) -> str:
    """The archive's sha256, checked against NAME.tar.gz.sha256 when that sits beside it."""
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
    return archive_sha


def safe_top_folder(archive: Path, members: list[tarfile.TarInfo]) -> str:
    """The one top-level folder, after refusing any unsafe or duplicate member."""
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
    return tops.pop()


def extraction_folder(cfg: PackageArgs) -> tuple[Path, bool]:
    """(folder, keep): --extract-to (empty or new), else a temporary folder removed afterwards."""
    if not cfg.extract_to:
        return Path(tempfile.mkdtemp(prefix="llama_verify_")), False
    dest = Path(cfg.extract_to)
    problem = output_dir_problem("--extract-to", dest)
    if problem:
        raise PackageError(problem)
    if dest.exists() and any(dest.iterdir()):
        raise PackageError(f"--extract-to {dest}: folder is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    return dest, True


def extract_checked(cfg: PackageArgs, archive: Path) -> tuple[Path, str, bool]:
    """(extraction folder, top-level folder name, keep): every member is checked before any
    is extracted, and tarfile's "data" filter guards the extraction itself."""
    try:
        tar = tarfile.open(archive, mode="r:gz")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise VerifyError(f"{archive}: not a readable .tar.gz ({e})") from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise VerifyError(f"{archive}: corrupt archive ({e})") from None
        top = safe_top_folder(archive, members)
        dest, keep = extraction_folder(cfg)
        try:
            tar.extractall(dest, filter="data")
        except (tarfile.TarError, OSError) as e:
            if not keep:
                shutil.rmtree(dest, ignore_errors=True)
            raise VerifyError(f"{archive.name}: extraction refused ({e})") from None
    return dest, top, keep


def run_verify(cfg: PackageArgs) -> dict[str, Any]:
    """Check, extract, reload and generate; raise VerifyError on any mismatch."""
    archive = Path(cfg.verify)
    archive_sha = check_archive_file(archive)
    dest, top, keep = extract_checked(cfg, archive)
    try:
        return _verify_extracted(cfg, archive, dest / top, archive_sha)
    finally:
        if not keep:
            shutil.rmtree(dest, ignore_errors=True)


def check_sums(archive: Path, folder: Path) -> dict[str, str]:
    """SHA256SUMS of the extracted folder, after checking it lists every file and each matches."""
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
    return sums


def read_metadata(folder: Path, sums: dict[str, str]) -> dict[str, Any]:
    """metadata.json, which must agree with SHA256SUMS on every file it names."""
    try:
        meta = json.loads((folder / METADATA).read_text(encoding="utf-8"))
    except ValueError as e:
        raise VerifyError(f"{METADATA}: not valid JSON ({e})") from None
    for rel, digest in (meta.get("files") or {}).items():
        if sums.get(rel) != digest:
            raise VerifyError(f"{METADATA} and {SUMS} disagree about {rel}")
    return meta


def load_packaged(cfg: PackageArgs, folder: Path):
    """(model, tokenizer, RunConfig) of the extracted package; a load failure is a failed
    verification, except a base model that cannot be found here (bad input)."""
    try:
        model, tok, run_cfg = load_for_inference(adapter_path=str(folder), base_model=cfg.base_model,
                                                 trust_remote_code=cfg.trust_remote_code)
    except ModelLoadError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise VerifyError(f"the packaged adapter does not load on its base model: {first}") from None
    return model, tok, RunConfig.from_dict(run_cfg)


def compare_with_reference(reference: dict[str, Any] | None, prompt: str, text: str, *,
                           dtype: str, device: str) -> bool | None:
    """Whether `text` equals the recorded generation (None: nothing comparable recorded). A
    difference fails only on the same dtype, device and libraries; elsewhere numerics differ."""
    if not reference:
        print("no reference generation recorded at packaging time; checked that it loads and "
              "generates")
        return None
    if reference.get("prompt") != prompt:
        logger.warning("the recorded reference used another prompt; not compared")
        return None
    same_setup = (reference.get("dtype") == dtype and reference.get("device") == device
                  and reference.get("libraries") == versions_of(GENERATION_LIBRARIES))
    matches = reference.get("text") == text
    if not matches and same_setup:
        raise VerifyError("the packaged adapter generates a different text than it did when "
                          f"packaged ({dtype} on {device}):\n  packaged: "
                          f"{reference.get('text')!r}\n  now:      {text!r}")
    if matches:
        print("generation matches the one recorded at packaging time")
    else:
        logger.warning("generation differs from the one recorded at packaging time (%s on "
                       "%s with %s; now %s on %s with %s): numerics differ across devices, "
                       "dtypes and library versions", reference.get("dtype"),
                       reference.get("device"), reference.get("libraries"), dtype, device,
                       versions_of(GENERATION_LIBRARIES))
    return matches


def report_vllm(folder: Path) -> bool:
    """Print each vLLM rule for the extracted adapter; a failing one is a warning line, not a
    failed verification (the package is still a valid peft adapter). Returns the verdict."""
    results = check_vllm_adapter(folder)
    for line in format_vllm_results(results):
        print(line)
    failed = [r.rule for r in results if not r.passed]
    if failed:
        print(f"warning: vLLM would not load this adapter as is ({', '.join(failed)}); "
              "the package itself verified")
    return not failed


def check_modelfile(archive: Path, folder: Path) -> None:
    """A packaged Modelfile must name a GGUF file that is in the package."""
    path = folder / MODELFILE
    if not path.is_file():
        return
    sources = [line.split(None, 1)[1].strip() for line in path.read_text(encoding="utf-8")
               .splitlines() if line.upper().startswith("FROM ") and len(line.split(None, 1)) == 2]
    for source in sources:
        name = source[2:] if source.startswith("./") else source
        if "/" in name or not (folder / name).is_file():
            raise VerifyError(f"{archive.name}: {MODELFILE} says FROM {source}, which is not a "
                              "file of the package")
    print(f"{MODELFILE}: FROM {', '.join(sources)} present")


def _verify_extracted(cfg: PackageArgs, archive: Path, folder: Path, archive_sha: str) -> dict[str, Any]:
    sums = check_sums(archive, folder)
    meta = read_metadata(folder, sums)
    check_modelfile(archive, folder)
    vllm_ready = report_vllm(folder)
    model, tok, run = load_packaged(cfg, folder)
    fmt = resolve_prompt_format(tok, run.prompt_format or "auto")
    prompt = render_prompt(tok, fmt, VERIFY_INSTRUCTION, "")
    gen = generate(model, tok, [prompt], max_new_tokens=VERIFY_MAX_NEW_TOKENS, batch_size=1)[0]
    param = next(model.parameters())
    dtype, device = str(param.dtype).replace("torch.", ""), param.device.type
    print(f"base model: {run.base_model if not cfg.base_model else cfg.base_model}")
    print(f"prompt ({fmt} format):\n{prompt}")
    print(f"greedy generation ({VERIFY_MAX_NEW_TOKENS} tokens max):\n{gen.text}")
    matches = compare_with_reference(meta.get("reference_generation"), prompt, gen.text,
                                     dtype=dtype, device=device)
    return {"archive": str(archive), "archive_sha256": archive_sha, "files_checked": len(sums),
            "prompt": prompt, "generation": gen.text, "matches_reference": matches,
            "base_model": cfg.base_model or run.base_model, "vllm_ready": vllm_ready,
            "extracted_to": str(folder) if cfg.extract_to else None}
