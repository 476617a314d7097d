"""Training machinery shared by llama_train.py and llama_pilot.py.

Built on transformers' Trainer (accelerate underneath), so `accelerate launch` / `torchrun`
give DDP, FSDP and DeepSpeed without code here. What this module adds:

- a collator that pads each batch to its longest row (never to --max-length), and length-grouped
  batches, so little compute goes to padding;
- a loss that runs the LM head only at supervised positions (response tokens + EOS), in fp32;
- checkpoints with a sha256 manifest written last (a folder without a valid manifest is never
  resumed from), retention that deletes old checkpoints only after the new one is complete, and
  a resume_state.json with hashes of the config and data so a changed run is not resumed;
- one greppable log line per logging step, metrics.jsonl, sample generations at each
  evaluation, a loss-curve PNG, and train_results.json;
- a stop on a non-finite loss naming the step; SIGTERM/SIGINT save a checkpoint and exit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

logger = logging.getLogger("llama_sft")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "checkpoint_manifest.json"
RESUME_STATE = "resume_state.json"
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}
TOOLKIT_VERSION = "0.1.0"

# Fields that change what is trained: a resume with any of them changed is refused unless forced.
CONFIG_HASH_FIELDS = (
    "base_model", "model_size", "use_4bit", "use_8bit", "prompt_format", "max_length", "lora_r",
    "lora_alpha", "lora_dropout", "lora_target_modules", "batch_size",
    "gradient_accumulation_steps", "learning_rate", "num_epochs", "max_steps", "warmup_ratio",
    "weight_decay", "lr_scheduler", "seed", "val_ratio", "test_ratio",
)


class TrainingError(RuntimeError):
    """A training run cannot go on; the message says why and what to change."""


class NonFiniteLossError(TrainingError):
    pass


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


class TokenizedDataset:
    """A list of tokenized examples (from llama_dataset.tokenize_examples)."""

    def __init__(self, rows: Sequence[dict[str, Any]]):
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


@dataclass
class PadCollator:
    """Right-pads a batch to its longest row. Padding is masked by attention_mask = 0 and
    labels = -100, never by token id, so EOS is learned even when pad == eos."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# --------------------------------------------------------------------------------------
# Hashes and run config
# --------------------------------------------------------------------------------------


def config_hash(cfg: Any) -> str:
    d = {k: getattr(cfg, k, None) for k in CONFIG_HASH_FIELDS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets",
                 "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def write_manifest(folder: Path) -> None:
    """Fsync every file, then write the manifest (sha256 of each file) last."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    sums = {}
    for p in files:
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
        sums[str(p.relative_to(folder))] = sha256_file(p)
    write_json_atomic(folder / MANIFEST, {"files": sums})
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def verify_checkpoint(folder: Path) -> str | None:
    """None when the checkpoint is complete and intact, else the reason it is not."""
    m = folder / MANIFEST
    if not m.is_file():
        return "no manifest (the save did not finish)"
    try:
        sums = json.loads(m.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "unreadable manifest"
    for rel, digest in sums.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        if sha256_file(p) != digest:
            return f"{rel} does not match its sha256 (truncated or modified)"
    return None


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
        problem = verify_checkpoint(ckpt)
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


# --------------------------------------------------------------------------------------
# Logging helpers
# --------------------------------------------------------------------------------------


def peak_memory_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def plot_loss_curve(metrics_file: Path, out_png: Path, title: str = "Loss") -> bool:
    """Train and eval loss against step; returns False when there is nothing to plot."""
    train, evals = [], []
    if not metrics_file.is_file():
        return False
    for line in metrics_file.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "loss" in rec and "step" in rec:
            train.append((rec["step"], rec["loss"]))
        if "eval_loss" in rec and "step" in rec:
            evals.append((rec["step"], rec["eval_loss"]))
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per supervised token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------
# Trainer and callbacks
# --------------------------------------------------------------------------------------


def make_trainer_class():
    """Our Trainer subclass, built lazily so importing this module stays cheap."""
    import torch
    import torch.nn.functional as F
    from transformers import Trainer

    class SFTTrainer(Trainer):
        """Loss at supervised positions only; counts processed and supervised tokens."""

        tokens_seen = 0
        supervised_tokens_seen = 0
        nan_check_step_offset = 0
        loss_hook: Callable[[Any, int], Any] | None = None  # test hook: (loss, step) -> loss

        def _final_norm(self, model):
            base = model
            for attr in ("module",):  # DDP wrapper
                base = getattr(base, attr, base)
            if hasattr(base, "get_base_model"):
                base = base.get_base_model()
            inner = getattr(base, "model", None)
            norm = getattr(inner, "norm", None)
            head = getattr(base, "lm_head", None)
            return norm, head

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            mask = inputs.get("attention_mask")
            self.tokens_seen += int(mask.sum()) if mask is not None else labels.numel()
            shift_labels = labels[:, 1:]
            supervised = shift_labels != -100
            n_sup = int(supervised.sum())
            self.supervised_tokens_seen += n_sup
            norm, head = self._final_norm(model)
            if norm is None or head is None or self.is_fsdp_enabled:
                # Generic path (FSDP shards the head outside forward): the model's own loss.
                outputs = model(input_ids=inputs["input_ids"], attention_mask=mask, labels=labels,
                                use_cache=False)
                loss = outputs.loss
            else:
                captured = {}

                def grab(_module, _inp, out):
                    captured["h"] = out

                handle = norm.register_forward_hook(grab)
                try:
                    # logits_to_keep=1: the model's own head runs on one position only; ours
                    # runs on the supervised positions below.
                    model(input_ids=inputs["input_ids"], attention_mask=mask, use_cache=False,
                          logits_to_keep=1)
                finally:
                    handle.remove()
                hidden = captured["h"][:, :-1][supervised]
                logits = head(hidden).float()
                loss_sum = F.cross_entropy(logits, shift_labels[supervised], reduction="sum")
                denom = num_items_in_batch if num_items_in_batch is not None else max(n_sup, 1)
                if torch.is_tensor(denom):
                    denom = denom.to(loss_sum.device)
                loss = loss_sum / denom
                if (self.args.average_tokens_across_devices and num_items_in_batch is not None
                        and self.accelerator.num_processes > 1):
                    loss = loss * self.accelerator.num_processes
            if self.loss_hook is not None and model.training:
                loss = self.loss_hook(loss, self.state.global_step + 1)
            if model.training and not torch.isfinite(loss.detach()).all():
                raise NonFiniteLossError(
                    f"the loss became {float(loss.detach())} at step {self.state.global_step + 1}; "
                    "the run stopped before that step's update, so no checkpoint holds a "
                    "non-finite tensor. Lower --learning-rate, check the data, or avoid fp16.")
            return (loss, None) if return_outputs else loss

    SFTTrainer.model_accepts_loss_kwargs = True
    return SFTTrainer


def make_callbacks(*, output_dir: Path, cfg: Any, run_config: dict[str, Any], sample_fn=None,
                   keep: int, stop_flag: dict[str, Any]):
    from transformers import TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    metrics_path = output_dir / "metrics.jsonl"
    samples_path = output_dir / "samples.jsonl"

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
                self.t_last, self.tokens_last = now, tokens
                line = (f"step {state.global_step}/{state.max_steps} | loss {logs['loss']:.4f} | "
                        f"lr {logs.get('learning_rate', 0):.3g} | {rec['tokens_per_second']:.0f} tok/s")
            elif "eval_loss" in logs:
                ppl = math.exp(min(logs["eval_loss"], 50))
                rec["eval_perplexity"] = round(ppl, 4)
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
        """Manifest + resume state in each checkpoint, retention after completion, signals."""

        def on_save(self, args, state, control, **kw):
            if not state.is_world_process_zero:
                return
            ckpt = output_dir / f"checkpoint-{state.global_step}"
            if not ckpt.is_dir():
                return
            write_json_atomic(ckpt / "run_config.json", run_config)
            write_json_atomic(ckpt / RESUME_STATE, {
                "config_hash": run_config["config_hash"],
                "dataset_hash": run_config["dataset"].get("dataset_hash"),
                "global_step": state.global_step,
            })
            write_manifest(ckpt)
            rotate_checkpoints(output_dir, keep, protect=[state.best_model_checkpoint])
            logger.info("checkpoint saved: %s", ckpt)

        def on_step_end(self, args, state, control, **kw):
            if stop_flag.get("signal") is not None:
                control.should_save = True
                control.should_training_stop = True
                stop_flag["stopped_at"] = state.global_step

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

    return LineProgress(), CheckpointGuard(), SampleGenerations()


@dataclass
class SignalCatcher:
    """First SIGINT/SIGTERM: finish the step, save a checkpoint, exit. Second: default action."""

    flag: dict[str, Any] = field(default_factory=dict)
    previous: dict[int, Any] = field(default_factory=dict)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.flag.get("signal") is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.flag["signal"] = signum
        logger.warning("received %s: finishing this step and saving a checkpoint (send it again "
                       "to stop at once)", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, prev in self.previous.items():
            signal.signal(sig, prev)
        return False
