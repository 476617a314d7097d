"""Which phase of a llama_train.py run sets its peak memory: the RSS high-water mark of each
phase (training steps, evaluation batches, sample generations, checkpoint saves, final
outputs), each measured from a reset of the kernel's high-water mark (Linux /proc/self/clear_refs).

    python3 bench/memory_phases.py -- --model-size 135m \
        --dataset ../shared/data/gsm8k_train.jsonl --max-steps 20 --eval-steps 20

Everything after `--` goes to llama_train.py as is (--output-dir defaults to a temporary folder).
Prints one line per phase: calls, the highest peak RSS (MiB) seen during any one call, and the
RSS left after its first and last call, then the run's own peak_memory_mb (which the resets
here lower: it is the kernel's high-water mark too).
"""

from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import current_rss_mb, peak_rss_mb, quiet_environment  # noqa: E402

PEAKS: dict[str, list[float]] = {}
AFTER: dict[str, list[float]] = {}  # RSS when each call returned: what the phase left behind


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def phase(name: str, fn: Callable) -> Callable:
    """fn, with the peak RSS of each call recorded under `name` (the mark is reset on entry and
    on exit, so a phase inside another one ends the outer one's view early: training steps and
    evaluations do not nest here)."""
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any):
        reset_peak()
        try:
            return fn(*args, **kwargs)
        finally:
            PEAKS.setdefault(name, []).append(peak_rss_mb())
            AFTER.setdefault(name, []).append(current_rss_mb())
            reset_peak()
    return wrapped


def instrument(trainer) -> None:
    trainer.training_step = phase("training step", trainer.training_step)
    trainer.prediction_step = phase("evaluation batch", trainer.prediction_step)
    trainer._save_checkpoint = phase("checkpoint save", trainer._save_checkpoint)
    for cb in trainer.callback_handler.callbacks:
        if type(cb).__name__ == "SampleGenerations":
            cb.on_evaluate = phase("sample generations", cb.on_evaluate)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    quiet_environment()
    import llama_sft.training.train as train_mod
    from llama_sft.cli import setup_logging
    from llama_train import resolve_train_config

    if "--output-dir" not in argv:
        argv += ["--output-dir", tempfile.mkdtemp(prefix="memphases-")]
    setup_logging()
    cfg = resolve_train_config(argv)
    train_mod.finish_outputs = phase("final outputs", train_mod.finish_outputs)
    if not reset_peak():
        print("warning: cannot reset the high-water mark (/proc/self/clear_refs): every phase "
              "reports the process peak so far")
    result = train_mod.run_train(cfg, on_trainer=instrument)
    for name, peaks in PEAKS.items():
        after = AFTER[name]
        top = max(range(len(peaks)), key=peaks.__getitem__)
        print(f"{name:20s} calls {len(peaks):4d}  peak RSS {max(peaks):8.0f} MiB (call {top + 1})"
              f"  RSS after: first {after[0]:.0f}, last {after[-1]:.0f} MiB")
    print(f"run's peak_memory_mb (ru_maxrss, whole process): {result.get('peak_memory_mb')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
