"""The checkpoint protocol, in one place: how a checkpoint is written, found, verified, rotated
and resumed from.

- Each checkpoint is written into `.checkpoint-N.tmp/`, every file fsynced, the sha256 manifest
  written last, then the folder renamed to `checkpoint-N/`: a folder with a checkpoint's name is
  always complete (a kill -9 mid-save leaves only the temporary folder, removed at the next
  start).
- A folder without a valid manifest is never resumed from; retention deletes old checkpoints
  only after the new one is complete, and never the best.
- resume_state.json holds hashes of the config and the data, so a changed run is not resumed
  unless forced; on resume the step logs are cut back to the checkpoint's step, and a last line
  half-written by a killed run is cut off (every complete record is kept).
- A save that runs out of disk space or quota removes its temporary folder and stops the run
  with DiskFullError, saying how much space a checkpoint takes and what to change; the earlier
  checkpoints are untouched, so --resume auto continues from the newest.

The files inside a checkpoint are transformers' own (adapter, optimizer, scheduler, RNG and
trainer state): `write_trainer_files` is the one function coupled to transformers' private
checkpoint code, and names the version it was written against.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

from llama_sft.errors import DiskFullError, RunSetupError
from llama_sft.files import (
    _fsync_dir,
    disk_full_message,
    out_of_space,
    tree_bytes,
    verify_manifest,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)
from llama_sft.layout import MANIFEST, RESUME_STATE, STEP_LOGS, ResumeState, RunConfig

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
    """On a resume from checkpoint-`step`: cut a torn last line (repair_torn_tail), then drop the
    records of later steps (the stopped run trained them after its last checkpoint; they are
    about to be trained again), so each step appears once in metrics.jsonl, samples.jsonl and
    consumed_ids.jsonl."""
    for name in names:
        path = output_dir / name
        if not path.is_file():
            continue
        repair_torn_tail(path)
        kept, later, unreadable = [], 0, 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                unreadable += 1  # not a record: a line torn by an older toolkit's resume
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
                later += 1
                continue
            kept.append(line)
        if later or unreadable:
            write_text_atomic(path, "".join(line + "\n" for line in kept))
            logger.info("%s: dropped %d record(s) after step %d (redone from the checkpoint)%s",
                        name, later, step,
                        f" and {unreadable} unreadable line(s)" if unreadable else "")


def repair_torn_tail(path: Path) -> int:
    """Cut a JSONL log back to the end of its last complete record: a run killed (kill -9, power
    loss, a full disk) while appending a line leaves it half-written, and the next record
    appended would be glued to it. Truncated in place: no complete record is rewritten, and it
    needs no free space. Returns the bytes cut."""
    with open(path, "rb+") as fh:
        data = fh.read()
        end = len(data)
        while end:
            start = data.rfind(b"\n", 0, end - 1) + 1
            line = data[start:end]
            if line.endswith(b"\n") and _is_json(line):
                break
            end = start  # no newline yet, or not JSON: the torn tail
        if end == len(data):
            return 0
        fh.truncate(end)
        fh.flush()
        os.fsync(fh.fileno())
    logger.warning("%s: cut a half-written last line (%d bytes) left by a run that was stopped "
                   "while writing it; every complete record is kept", path.name,
                   len(data) - end)
    return len(data) - end


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def list_checkpoints(output_dir: Path) -> list[Path]:
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def newest_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint with a manifest (not re-hashed: for messages and estimates)."""
    good = [c for c in list_checkpoints(output_dir) if (c / MANIFEST).is_file()]
    return good[-1] if good else None


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


def find_resume_checkpoint(output_dir: Path, resume: str | None, run_config: RunConfig,
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
        state = ResumeState.from_json(state_file)
        changed = []
        if state.config_hash != run_config.config_hash:
            changed.append("the training config")
        if state.dataset_hash != run_config.dataset.get("dataset_hash"):
            changed.append("the dataset")
        if changed:
            msg = (f"{ckpt} was written with a different {' and '.join(changed)} than this run")
            if not force:
                raise RunSetupError(msg + ". Resuming would mix two runs; restore the original "
                                    "settings, start a new --output-dir, or pass --force")
            logger.warning("%s; resuming anyway (--force)", msg)
    logger.info("resuming from %s", ckpt)
    return ckpt


def checkpoint_step(folder: Path) -> int:
    """N of a checkpoint-N folder."""
    return int(CHECKPOINT_RE.match(folder.name).group(1))


# transformers.Trainer._save_checkpoint as of the version below; tests/test_checkpoints.py
# fails when upstream changes it, so write_trainer_files is re-checked on every upgrade.
UPSTREAM_VERSION = "5.24.0"
UPSTREAM_SAVE_CHECKPOINT_SHA256 = "a9111e30faa9933986e022e56b5af81fd990356db64d727b4c320c852283bf3b"


def write_trainer_files(trainer, model, trial, folder: Path, run_dir: Path) -> None:
    """Write into `folder` what transformers' Trainer._save_checkpoint (transformers 5.24.0)
    writes into checkpoint-N/: the model (adapter), optimizer, scheduler, scaler, RNG states and
    trainer state, with the best checkpoint recorded under its final name (the trainer state is
    written before the rename). Upstream's rotation and hub push are left to the caller.
    Private methods used: _get_output_dir is not (run_dir is given), store_flos,
    _save_optimizer_and_scheduler, _save_scaler, _save_rng_state."""
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_callback import ExportableState
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy

    state, args = trainer.state, trainer.args
    if trainer.hp_search_backend is None and trial is None:
        trainer.store_flos()
    trainer.save_model(str(folder), _internal_call=True)
    if (args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
            and state.best_global_step):
        best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}"
        if state.best_global_step == state.global_step or best.is_dir():
            state.best_model_checkpoint = str(best)
    if not args.save_only_model:
        trainer._save_optimizer_and_scheduler(str(folder))
        trainer._save_scaler(str(folder))
        trainer._save_rng_state(str(folder))
    if args.should_save:
        for cb in [c for c in trainer.callback_handler.callbacks + [trainer.control]
                   if isinstance(c, ExportableState)]:
            name, cb_state = cb.__class__.__name__, cb.state()
            if isinstance(state.stateful_callbacks[name], list):
                state.stateful_callbacks[name].append(cb_state)
            else:
                state.stateful_callbacks[name] = cb_state
        state.save_to_json(str(folder / TRAINER_STATE_NAME))


def save_checkpoint_atomically(trainer, model, trial, extras: dict[str, Any]) -> Path:
    """checkpoint-N/ of `trainer`'s current step: transformers' files and `extras` ({file name:
    JSON object}) in a staging folder, then fsync, manifest, rename. Every process writes its
    own share (sharded states); rank 0 renames. A failed save removes the staging folder; out of
    disk space it raises DiskFullError."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    run_dir = Path(trainer._get_output_dir(trial=trial))
    final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    staging = staging_dir(final)
    should_save = trainer.args.should_save
    if should_save:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    try:
        write_trainer_files(trainer, model, trial, staging, run_dir)
        if should_save:
            for name, obj in extras.items():
                write_json_atomic(staging / name, obj)
        trainer.accelerator.wait_for_everyone()  # every process's files are in the folder
        if should_save:
            finalize_checkpoint(staging, final)
    except Exception as e:
        if should_save:
            _save_failed(e, staging, final)
        raise
    trainer.accelerator.wait_for_everyone()
    if trainer.args.push_to_hub:
        trainer._push_from_checkpoint(str(final))
    return final


def _save_failed(exc: Exception, staging: Path, final: Path) -> None:
    """Remove the unfinished checkpoint; raise DiskFullError when the disk or quota was full
    (any other error is the caller's to re-raise). The earlier checkpoints are untouched: a
    folder is renamed into place, and rotated away, only after a complete save."""
    kept = [c for c in list_checkpoints(final.parent) if (c / MANIFEST).is_file()]
    staged = tree_bytes(staging)
    # A checkpoint takes about what the previous one took; without one, at least what got written.
    needed = max(staged, tree_bytes(kept[-1]) if kept else 0)
    full = out_of_space(exc, final.parent, needed)
    shutil.rmtree(staging, ignore_errors=True)
    if not full:
        return
    logger.warning("removed %s: the save of %s ran out of disk space", staging, final.name)
    intact = (f"every earlier checkpoint is intact (newest: {kept[-1].name})" if kept
              else "no earlier checkpoint was written")
    # Retention deletes the oldest only after the new one is complete: a save needs room for
    # one more checkpoint beside those kept.
    fewer = (f"lower --save-total-limit ({len(kept)} complete checkpoints are kept now, and a "
             "save needs room for one more beside them), " if len(kept) > 1 else "")
    raise DiskFullError(
        disk_full_message(final.name, final.parent, needed or None)
        + f" The partial save was removed and {intact}. Free some space, {fewer}or copy the "
        "folder to another --output-dir with more space, then continue with --resume auto"
    ) from exc
