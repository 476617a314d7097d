"""The training callbacks, each configured through its constructor: the progress line and
metrics.jsonl, checkpoint retention and the stop after a signal, the consumed-ids log, and
sample generations at each evaluation. Imports transformers: import it where a trainer is
built."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from llama_sft.evaluation.metrics import perplexity
from llama_sft.layout import CONSUMED_IDS, MANIFEST, METRICS, SAMPLES
from llama_sft.training.checkpoints import rotate_checkpoints

logger = logging.getLogger("llama_sft")


class LineProgress(ProgressCallback):
    """tqdm bar with ETA, plus one greppable line per logging step instead of a dict dump, and
    the same numbers appended to metrics.jsonl. `trainer` (an SFTTrainer) supplies the token
    counters; without one they read 0."""

    def __init__(self, output_dir: Path, trainer: Any = None) -> None:
        super().__init__()
        self.metrics_path = Path(output_dir) / METRICS
        self.trainer = trainer
        self.t_last = time.perf_counter()
        self.tokens_last = 0

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        rec = {"step": state.global_step, "epoch": round(state.epoch or 0, 4)}
        rec.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
        if "loss" in logs:
            line = self._train_line(state, logs, rec)
        elif "eval_loss" in logs:
            ppl = perplexity(logs["eval_loss"])
            rec["eval_perplexity"] = logs["eval_perplexity"] = round(ppl, 4)
            line = (f"eval step {state.global_step} | eval_loss {logs['eval_loss']:.4f} | "
                    f"perplexity {ppl:.3f}")
        else:
            line = None
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        if line:
            if self.training_bar is not None:
                self.training_bar.write(line)
            else:
                print(line, flush=True)

    def _train_line(self, state, logs, rec) -> str:
        now = time.perf_counter()
        tokens = self.trainer.tokens_seen if self.trainer else 0
        dt = max(now - self.t_last, 1e-9)
        world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
        rec["tokens_per_second"] = round((tokens - self.tokens_last) * world / dt, 1)
        rec["tokens_seen"] = tokens
        rec["supervised_tokens_seen"] = self.trainer.supervised_tokens_seen if self.trainer else 0
        logs["tokens_per_second"] = rec["tokens_per_second"]  # seen by W&B (runs after us)
        self.t_last, self.tokens_last = now, tokens
        return (f"step {state.global_step}/{state.max_steps} | loss {logs['loss']:.4f} | "
                f"lr {logs.get('learning_rate', 0):.3g} | {rec['tokens_per_second']:.0f} tok/s")


class CheckpointGuard(TrainerCallback):
    """Retention once a checkpoint is complete (it is renamed into place only then), and the
    stop after a signal: `stop_flag["signal"]` set by training/signals.py makes the trainer save
    a checkpoint after this step and stop; the step is recorded as `stop_flag["stopped_at"]`."""

    def __init__(self, output_dir: Path, keep: int, stop_flag: dict[str, Any]) -> None:
        self.output_dir = Path(output_dir)
        self.keep = keep
        self.stop_flag = stop_flag

    def on_save(self, args, state, control, **kw):
        if not state.is_world_process_zero:
            return
        ckpt = self.output_dir / f"checkpoint-{state.global_step}"
        if not (ckpt / MANIFEST).is_file():
            return
        rotate_checkpoints(self.output_dir, self.keep, protect=[state.best_model_checkpoint])
        logger.info("checkpoint saved: %s", ckpt)

    def on_step_end(self, args, state, control, **kw):
        if self.stop_flag.get("signal") is not None:
            control.should_save = True
            control.should_training_stop = True
            self.stop_flag["stopped_at"] = state.global_step


class ConsumedIds(TrainerCallback):
    """consumed_ids.jsonl: one record per optimizer step, {"step", "ids"}, with the ids of the
    examples its micro-batches held, in order. Under multi-process training every process's
    share is gathered to rank 0, which writes them micro-batch by micro-batch in rank order:
    the order one process with the same global batch consumes them in (tests/test_multinode.py).
    Cut back to the checkpoint's step on resume."""

    def __init__(self, output_dir: Path, trainer: Any) -> None:
        self.path = Path(output_dir) / CONSUMED_IDS
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kw):
        batches = self.trainer.pop_consumed_ids()
        if args.world_size > 1:
            from accelerate.utils import gather_object

            # A collective: every process takes part. One entry per process, in rank order.
            per_rank = gather_object([batches])
            batches = [rank[m] for m in range(max(map(len, per_rank)))
                       for rank in per_rank if m < len(rank)]
        if not state.is_world_process_zero:
            return
        ids = [i for micro in batches for i in micro]
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": state.global_step, "ids": ids}) + "\n")


class SampleGenerations(TrainerCallback):
    """At each evaluation: `sample_fn(model)` -> rows of {prompt_preview, reference, generation,
    ...}, appended to samples.jsonl, logged, and sent to W&B as a table when `use_wandb`."""

    def __init__(self, output_dir: Path, sample_fn: Callable[[Any], list[dict]] | None,
                 use_wandb: bool = False) -> None:
        self.path = Path(output_dir) / SAMPLES
        self.sample_fn = sample_fn
        self.use_wandb = use_wandb

    def on_evaluate(self, args, state, control, model=None, **kw):
        if self.sample_fn is None or not state.is_world_process_zero:
            return
        rows = self.sample_fn(model)
        with open(self.path, "a", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps({"step": state.global_step, **r}, ensure_ascii=False) + "\n")
        for r in rows:
            logger.info("sample @%d | %s -> %r", state.global_step, r["prompt_preview"],
                        r["generation"][:120])
        if self.use_wandb:
            _log_samples_to_wandb(state.global_step, rows)


def _log_samples_to_wandb(step: int, rows: list[dict]) -> None:
    try:
        import wandb

        if wandb.run is not None:
            table = wandb.Table(columns=["step", "prompt", "reference", "generation"])
            for r in rows:
                table.add_data(step, r["prompt_preview"], r["reference"], r["generation"])
            wandb.log({"samples": table}, commit=False)
    except Exception as e:  # noqa: BLE001 - a tracker problem must not stop training
        logger.warning("could not log samples to W&B: %s", e)
