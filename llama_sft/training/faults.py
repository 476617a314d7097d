"""TODO docstring"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable


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
    """

    save_delay: float = 0.0
    save_delay_step: int | None = None
    step_delay: float = 0.0
    nonfinite: tuple[str, int] | None = None
    oom: tuple[int, int] | None = None

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
                   step_delay=step[0] if step else 0.0, nonfinite=nonfinite, oom=oom)

    def loss_hook(self) -> Callable[[Any, int], Any] | None:
        """An SFTTrainer.loss_hook that makes step K's loss non-finite, or None."""
        if self.nonfinite is None:
            return None
        kind, bad_step = self.nonfinite
        factor = float(kind)

        def hook(loss, step: int):
            return loss * factor if step == bad_step else loss

        return hook

    def save_delay_at(self, step: int) -> float:
        if self.save_delay_step is None or self.save_delay_step == step:
            return self.save_delay
        return 0.0

    def oom_rows_limit(self, step: int) -> int | None:
        """Micro-batches of more rows than this run out of memory at `step` (None: no limit)."""
        if self.oom is None or step < self.oom[1]:
            return None
        return self.oom[0]
