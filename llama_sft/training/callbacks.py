"""TODO docstring"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from llama_sft.evaluation.metrics import perplexity
from llama_sft.layout import CONSUMED_IDS, MANIFEST
from llama_sft.training.checkpoints import rotate_checkpoints
from llama_sft.training.faults import FaultInjection

logger = logging.getLogger("llama_sft")


def make_callbacks(*, output_dir: Path, cfg: Any, sample_fn=None, keep: int,
                   stop_flag: dict[str, Any], faults: FaultInjection = FaultInjection()):
    from transformers import TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    metrics_path = output_dir / "metrics.jsonl"
    samples_path = output_dir / "samples.jsonl"
    consumed_path = output_dir / CONSUMED_IDS

    class LineProgress(ProgressCallback):
        """tqdm bar with ETA, plus one greppable line per logging step instead of a dict dump."""

        def __init__(self):
            super().__init__()
            self.t_last = time.perf_counter()
            self.tokens_last = 0
            self.trainer = None

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            now = time.perf_counter()
            tokens = self.trainer.tokens_seen if self.trainer else 0
            sup = self.trainer.supervised_tokens_seen if self.trainer else 0
            rec = {"step": state.global_step, "epoch": round(state.epoch or 0, 4)}
            rec.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
            if "loss" in logs:
                dt = max(now - self.t_last, 1e-9)
                rec["tokens_per_second"] = round((tokens - self.tokens_last) * max(
                    1, int(os.environ.get("WORLD_SIZE", "1"))) / dt, 1)
                rec["tokens_seen"] = tokens
                rec["supervised_tokens_seen"] = sup
                logs["tokens_per_second"] = rec["tokens_per_second"]  # seen by W&B (runs after us)
                self.t_last, self.tokens_last = now, tokens
                line = (f"step {state.global_step}/{state.max_steps} | loss {logs['loss']:.4f} | "
                        f"lr {logs.get('learning_rate', 0):.3g} | {rec['tokens_per_second']:.0f} tok/s")
            elif "eval_loss" in logs:
                ppl = perplexity(logs["eval_loss"])
                rec["eval_perplexity"] = round(ppl, 4)
                logs["eval_perplexity"] = rec["eval_perplexity"]
                line = (f"eval step {state.global_step} | eval_loss {logs['eval_loss']:.4f} | "
                        f"perplexity {ppl:.3f}")
            else:
                line = None
            with open(metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
            if line:
                msg = line
                if self.training_bar is not None:
                    self.training_bar.write(msg)
                else:
                    print(msg, flush=True)

    class CheckpointGuard(TrainerCallback):
        """Retention once a checkpoint is complete (SFTTrainer._save_checkpoint writes it
        atomically, manifest and resume state included), and the stop after a signal."""

        def on_save(self, args, state, control, **kw):
            if not state.is_world_process_zero:
                return
            ckpt = output_dir / f"checkpoint-{state.global_step}"
            if not (ckpt / MANIFEST).is_file():  # renamed into place only once complete
                return
            rotate_checkpoints(output_dir, keep, protect=[state.best_model_checkpoint])
            logger.info("checkpoint saved: %s", ckpt)

        def on_step_end(self, args, state, control, **kw):
            if stop_flag.get("signal") is not None:
                control.should_save = True
                control.should_training_stop = True
                stop_flag["stopped_at"] = state.global_step
            if faults.step_delay:
                time.sleep(faults.step_delay)  # test hook LLAMA_SFT_TEST_STEP_DELAY

    class ConsumedIds(TrainerCallback):
        """consumed_ids.jsonl: one record per optimizer step, {"step", "ids"}, with the ids of
        the examples its micro-batches held, in order (this process's share under multi-process
        training: rank 0 writes its own). Cut back to the checkpoint's step on resume."""

        def __init__(self):
            self.trainer = None

        def on_step_end(self, args, state, control, **kw):
            ids = self.trainer.pop_consumed_ids() if self.trainer is not None else []
            if not state.is_world_process_zero:
                return
            with open(consumed_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": state.global_step, "ids": ids}) + "\n")

    class SampleGenerations(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, **kw):
            if sample_fn is None or not state.is_world_process_zero:
                return
            rows = sample_fn(model)
            with open(samples_path, "a", encoding="utf-8") as fh:
                for r in rows:
                    fh.write(json.dumps({"step": state.global_step, **r}, ensure_ascii=False) + "\n")
            for r in rows:
                logger.info("sample @%d | %s -> %r", state.global_step, r["prompt_preview"],
                            r["generation"][:120])
            if cfg.use_wandb:
                try:
                    import wandb

                    if wandb.run is not None:
                        table = wandb.Table(columns=["step", "prompt", "reference", "generation"])
                        for r in rows:
                            table.add_data(state.global_step, r["prompt_preview"], r["reference"],
                                           r["generation"])
                        wandb.log({"samples": table}, commit=False)
                except Exception as e:  # noqa: BLE001 - a tracker problem must not stop training
                    logger.warning("could not log samples to W&B: %s", e)

    return LineProgress(), CheckpointGuard(), SampleGenerations(), ConsumedIds()
