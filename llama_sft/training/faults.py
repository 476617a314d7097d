"""Test-only fault injection, attached to a trainer from outside (`FaultInjection.attach`), so
the production classes carry no test hooks. Read from LLAMA_SFT_TEST_* environment variables,
which tests/test_faults.py sets on real llama_train.py child processes; never set them in a real
run. Imports transformers: import it where a trainer is built."""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

logger = logging.getLogger("llama_sft")


@dataclass(frozen=True)
class FaultInjection:
    """Test-only fault injection for tests/test_faults.py, read from the environment. Never set
    these in a real run: each one slows training down or breaks it on purpose.

    LLAMA_SFT_TEST_SAVE_DELAY=SECONDS[@STEP]  sleep half-way through writing a checkpoint (every
                                              one, or the one of step STEP), so that a test can
                                              kill -9 the process in the middle of a save
    LLAMA_SFT_TEST_STEP_DELAY=SECONDS         sleep after each optimizer step, so that a test can
                                              signal or kill the process at a chosen step
    LLAMA_SFT_TEST_NONFINITE=nan@K | inf@K    make the training loss of step K NaN or inf
    LLAMA_SFT_TEST_OOM=ROWS@K                 from step K on, a micro-batch of more than ROWS rows
                                              raises torch.OutOfMemoryError half-way through its
                                              backward pass (after some gradients have been
                                              accumulated, the hardest case for a retry)
    LLAMA_SFT_TEST_DISK_FULL=ERRNO@checkpoint-K | ERRNO@final_model
                                              ERRNO (ENOSPC or EDQUOT) while writing checkpoint-K
                                              (after its optimizer file is half-written, raised
                                              as torch.save into a file object raises it) or
                                              final_model/ (after the adapter, raised as
                                              safetensors raises it: its own error, errno in the
                                              message only)
    """

    save_delay: float = 0.0
    save_delay_step: int | None = None
    step_delay: float = 0.0
    nonfinite: tuple[str, int] | None = None
    oom: tuple[int, int] | None = None
    disk_full: tuple[int, str] | None = None  # (errno, "checkpoint-K" or "final_model")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "FaultInjection":
        env = dict(os.environ if env is None else env)

        def parse(name: str, value_type: type, step_required: bool):
            raw = env.get(name, "").strip()
            if not raw:
                return None
            value, _, step = raw.partition("@")
            try:
                parsed = value_type(value)
                at = int(step) if step else None
            except ValueError:
                raise ValueError(f"{name}={raw!r}: expected VALUE@STEP") from None
            if step_required and at is None:
                raise ValueError(f"{name}={raw!r}: expected VALUE@STEP")
            return parsed, at

        save = parse("LLAMA_SFT_TEST_SAVE_DELAY", float, False)
        step = parse("LLAMA_SFT_TEST_STEP_DELAY", float, False)
        nonfinite = parse("LLAMA_SFT_TEST_NONFINITE", str, True)
        if nonfinite is not None and nonfinite[0] not in ("nan", "inf"):
            raise ValueError("LLAMA_SFT_TEST_NONFINITE must be nan@STEP or inf@STEP")
        oom = parse("LLAMA_SFT_TEST_OOM", int, True)
        return cls(save_delay=save[0] if save else 0.0, save_delay_step=save[1] if save else None,
                   step_delay=step[0] if step else 0.0, nonfinite=nonfinite, oom=oom,
                   disk_full=_parse_disk_full(env.get("LLAMA_SFT_TEST_DISK_FULL", "")))

    @property
    def active(self) -> bool:
        return bool(self.save_delay or self.step_delay or self.nonfinite or self.oom
                    or self.disk_full)

    def attach(self, trainer) -> None:
        """Wrap the trainer's methods with the faults asked for (instance attributes: the class
        and every other trainer stay as they are)."""
        if self.nonfinite is not None:
            trainer.compute_loss = self._nonfinite_loss(trainer, trainer.compute_loss)
        if self.save_delay:
            trainer._save_optimizer_and_scheduler = self._paused_save(
                trainer, trainer._save_optimizer_and_scheduler)
        if self.oom is not None:
            trainer._micro_step = self._simulated_oom(trainer, trainer._micro_step)
        if self.step_delay:
            trainer.add_callback(_StepDelay(self.step_delay))
        if self.disk_full is not None and self.disk_full[1] == "final_model":
            trainer.model.save_pretrained = self._full_final_model(trainer.model.save_pretrained)
        elif self.disk_full is not None:
            trainer._save_optimizer_and_scheduler = self._full_checkpoint(
                trainer._save_optimizer_and_scheduler)

    def _nonfinite_loss(self, trainer, compute_loss):
        kind, bad_step = self.nonfinite
        factor = float(kind)

        def wrapped(model, inputs, *args, **kwargs):
            loss = compute_loss(model, inputs, *args, **kwargs)
            if model.training and trainer.state.global_step + 1 == bad_step:
                loss = (loss[0] * factor, *loss[1:]) if isinstance(loss, tuple) else loss * factor
            return loss

        return wrapped

    def _paused_save(self, trainer, save):
        """Sleep before the optimizer is written: the adapter is on disk, the rest is not."""

        def wrapped(folder):
            delay = self.save_delay_at(trainer.state.global_step)
            if delay and trainer.args.should_save:
                logger.warning("test hook LLAMA_SFT_TEST_SAVE_DELAY: pausing %g s in the middle "
                               "of writing %s", delay, folder)
                time.sleep(delay)
            return save(folder)

        return wrapped

    def _simulated_oom(self, trainer, micro_step):
        def wrapped(model, inputs, num_items_in_batch):
            limit = self.oom_rows_limit(trainer.state.global_step + 1)
            handle = None
            if limit is not None and inputs["input_ids"].shape[0] > limit:
                handle = _arm_simulated_oom(model)
            try:
                return micro_step(model, inputs, num_items_in_batch)
            finally:
                if handle is not None:
                    handle.remove()

        return wrapped

    def _full_checkpoint(self, save):
        """The optimizer file of the target checkpoint is cut off half-way, then the error."""
        code, target = self.disk_full

        def wrapped(folder):
            result = save(folder)
            if Path(folder).name in (target, f".{target}.tmp"):
                optimizer = Path(folder) / "optimizer.pt"
                if optimizer.is_file():
                    os.truncate(optimizer, optimizer.stat().st_size // 2)
                try:
                    raise OSError(code, os.strerror(code), str(optimizer))
                except OSError:
                    # What torch.save into a file object raises, with the OSError as context.
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected "
                                       "pos 704 vs 598 (simulated: LLAMA_SFT_TEST_DISK_FULL)")
            return result

        return wrapped

    def _full_final_model(self, save_pretrained):
        """final_model's adapter is written, then the error safetensors raises (no errno)."""
        code, _ = self.disk_full

        def wrapped(save_directory, *args, **kwargs):
            result = save_pretrained(save_directory, *args, **kwargs)
            if Path(save_directory).name in ("final_model", ".final_model.tmp"):
                raise RuntimeError(f"Error while serializing: I/O error: {os.strerror(code)} "
                                   f"(os error {code}) (simulated: LLAMA_SFT_TEST_DISK_FULL)")
            return result

        return wrapped

    def save_delay_at(self, step: int) -> float:
        if self.save_delay_step is None or self.save_delay_step == step:
            return self.save_delay
        return 0.0

    def oom_rows_limit(self, step: int) -> int | None:
        """Micro-batches of more rows than this run out of memory at `step` (None: no limit)."""
        if self.oom is None or step < self.oom[1]:
            return None
        return self.oom[0]


def _parse_disk_full(raw: str) -> tuple[int, str] | None:
    """ENOSPC@checkpoint-4 -> (errno.ENOSPC, "checkpoint-4")."""
    raw = raw.strip()
    if not raw:
        return None
    name, _, target = raw.partition("@")
    step = target.removeprefix("checkpoint-")
    if name not in ("ENOSPC", "EDQUOT") or not (
            target == "final_model" or (step != target and step.isdigit())):
        raise ValueError(f"LLAMA_SFT_TEST_DISK_FULL={raw!r}: expected ENOSPC or EDQUOT, then "
                         "@checkpoint-STEP or @final_model")
    return getattr(errno, name), target


def _arm_simulated_oom(model):
    """Fail when the backward pass reaches the first trainable tensor, the last gradient it
    computes, so the later layers' gradients have already been accumulated: what a real
    out-of-memory error in backward leaves."""
    first = next(p for p in model.parameters() if p.requires_grad)

    def fail(_grad):
        raise torch.OutOfMemoryError("simulated out of memory (LLAMA_SFT_TEST_OOM)")

    return first.register_hook(fail)


class _StepDelay(TrainerCallback):
    """LLAMA_SFT_TEST_STEP_DELAY: sleep after each optimizer step, so a test can signal or kill
    the process at a chosen step. Added after the checkpoint guard, which checks for a signal
    first."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kw):
        time.sleep(self.seconds)
