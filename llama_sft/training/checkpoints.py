"""TODO docstring"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

from llama_sft.errors import RunSetupError
from llama_sft.files import (
    _fsync_dir,
    verify_manifest,
    write_manifest,
    write_text_atomic,
)
from llama_sft.layout import MANIFEST, RESUME_STATE, STEP_LOGS

logger = logging.getLogger("llama_sft")



CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


STAGING_RE = re.compile(r"^\.checkpoint-(\d+)\.tmp$")  # a checkpoint being written


def staging_dir(final: Path) -> Path:
    """Where checkpoint-N is written before it is complete: .checkpoint-N.tmp beside it (no
    checkpoint name, so neither we nor transformers' get_last_checkpoint ever read it)."""
    return final.with_name(f".{final.name}.tmp")


def finalize_checkpoint(staging: Path, final: Path) -> None:
    """Fsync every file, write the manifest last, then rename the folder into place: a folder
    named checkpoint-N is always complete (rename is atomic on POSIX file systems)."""
    write_manifest(staging)
    if final.exists():
        # The same step written again (a resume from an earlier checkpoint): the new one wins.
        # Until the rename below the previous complete checkpoints are untouched.
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(final.parent)


def remove_stale_staging(output_dir: Path) -> list[Path]:
    """Delete temporary checkpoint folders left by a run that died in the middle of a save."""
    removed = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            if STAGING_RE.match(p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
                logger.warning("removed %s: an unfinished checkpoint save of an earlier run", p)
    return removed


def truncate_step_logs(output_dir: Path, step: int, names: Sequence[str] = STEP_LOGS) -> None:
    """On a resume from checkpoint-`step`: drop the records of later steps (the stopped run
    trained them after its last checkpoint; they are about to be trained again) and a torn last
    line, so each step appears once in metrics.jsonl, samples.jsonl and consumed_ids.jsonl."""
    for name in names:
        path = output_dir / name
        if not path.is_file():
            continue
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
                dropped += 1
                continue
            kept.append(line)
        if dropped:
            write_text_atomic(path, "".join(line + "\n" for line in kept))
            logger.info("%s: dropped %d record(s) after step %d (redone from the checkpoint)",
                        name, dropped, step)


def list_checkpoints(output_dir: Path) -> list[Path]:
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_good_checkpoint(output_dir: Path) -> Path | None:
    for ckpt in reversed(list_checkpoints(output_dir)):
        problem = verify_manifest(ckpt)
        if problem is None:
            return ckpt
        logger.warning("ignoring %s: %s", ckpt, problem)
    return None


def rotate_checkpoints(output_dir: Path, keep: int, protect: Sequence[Path] = ()) -> None:
    """Delete the oldest complete checkpoints beyond `keep`; never the newest complete one,
    never a protected one (the best), and only complete ones count."""
    good = [c for c in list_checkpoints(output_dir) if (c / MANIFEST).is_file()]
    protected = {Path(p).resolve() for p in protect if p}
    excess = len(good) - keep
    for c in good[:-1]:
        if excess <= 0:
            break
        if c.resolve() in protected:
            continue
        shutil.rmtree(c, ignore_errors=True)
        excess -= 1


def find_resume_checkpoint(output_dir: Path, resume: str | None, run_config: dict[str, Any],
                           force: bool) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        ckpt = latest_good_checkpoint(output_dir)
        if ckpt is None:
            logger.info("--resume auto: no complete checkpoint in %s; starting from scratch",
                        output_dir)
            return None
    else:
        ckpt = Path(resume)
        problem = verify_manifest(ckpt)
        if problem:
            raise RunSetupError(f"--resume {resume}: {problem}; use --resume auto to take the "
                                "newest complete checkpoint")
    state_file = ckpt / RESUME_STATE
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        changed = []
        if state.get("config_hash") != run_config["config_hash"]:
            changed.append("the training config")
        if state.get("dataset_hash") != run_config["dataset"].get("dataset_hash"):
            changed.append("the dataset")
        if changed:
            msg = (f"{ckpt} was written with a different {' and '.join(changed)} than this run")
            if not force:
                raise RunSetupError(msg + ". Resuming would mix two runs; restore the original "
                                    "settings, start a new --output-dir, or pass --force")
            logger.warning("%s; resuming anyway (--force)", msg)
    logger.info("resuming from %s", ckpt)
    return ckpt
