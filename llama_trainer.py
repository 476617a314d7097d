"""Training machinery shared by llama_train.py and llama_pilot.py.

Built on transformers' Trainer (accelerate underneath), so `accelerate launch` / `torchrun`
give DDP, FSDP and DeepSpeed without code here. What this module adds:

- a collator that pads each batch to its longest row (never to --max-length), and length-grouped
  batches, so little compute goes to padding;
- a loss that runs the LM head only at supervised positions (response tokens + EOS), in fp32;
- atomic checkpoints: each is written into `.checkpoint-N.tmp/`, fsynced, given a sha256
  manifest last, then renamed to `checkpoint-N/`, so a folder with a checkpoint's name is always
  complete (a kill -9 mid-save leaves only the temporary folder, removed at the next start); a
  folder without a valid manifest is never resumed from; retention deletes old checkpoints only
  after the new one is complete; resume_state.json holds hashes of the config and data so a
  changed run is not resumed;
- one greppable log line per logging step, metrics.jsonl, the ids of the examples each optimizer
  step consumed (consumed_ids.jsonl), sample generations at each evaluation, a loss-curve PNG,
  and train_results.json; on resume these logs are cut back to the checkpoint's step;
- a stop on a non-finite loss naming the step, and no checkpoint of non-finite weights;
  SIGTERM/SIGINT save a checkpoint and exit; out of memory: a message saying what to change, or
  with --auto-batch-backoff, micro-batches split in halves as extra accumulation.

Test-only fault injection (environment variables read by `FaultInjection`; never set them in a
real run) lets tests/test_faults.py kill a run mid-save, break its loss, or run it out of memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from llama_io import (library_versions, sha256_file, write_json_atomic,  # noqa: F401 (re-exported)
                      write_text_atomic)

logger = logging.getLogger("llama_sft")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STAGING_RE = re.compile(r"^\.checkpoint-(\d+)\.tmp$")  # a checkpoint being written
MANIFEST = "checkpoint_manifest.json"
RESUME_STATE = "resume_state.json"
CONSUMED_IDS = "consumed_ids.jsonl"
# Logs with one JSON record per line and a "step": cut back to the checkpoint's step on resume.
STEP_LOGS = ("metrics.jsonl", "samples.jsonl", CONSUMED_IDS)
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


class RunSetupError(TrainingError):
    """The command cannot start this run as given (the output folder holds another run, the
    resume checkpoint is broken or from another config, flags that do not fit together):
    bad input, exit status 2, nothing written."""


class NonFiniteLossError(TrainingError):
    pass


class NonFiniteWeightsError(TrainingError):
    """A trainable tensor is NaN or inf at a checkpoint: the checkpoint is not written."""


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
    labels = -100, never by token id, so EOS is learned even when pad == eos.

    `example_ids`: also pass each row's id (its `id` field, else the first 16 hex digits of its
    content hash) as a list under "example_ids", for the consumed-examples log; SFTTrainer
    takes it out before the model sees the batch."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    example_ids: bool = False

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
        batch: dict[str, Any] = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if self.example_ids:
            batch["example_ids"] = [example_id(r) for r in rows]
        return batch


def example_id(row: dict[str, Any]) -> str:
    """A tokenized row's id for logs: its `id` field, else a prefix of its content hash."""
    if row.get("id") is not None:
        return str(row["id"])
    return str(row.get("content_hash", ""))[:16]


# --------------------------------------------------------------------------------------
# Hashes and run config
# --------------------------------------------------------------------------------------


def config_hash(cfg: Any) -> str:
    d = {k: getattr(cfg, k, None) for k in CONFIG_HASH_FIELDS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (and the only process otherwise)."""
    return int(os.environ.get("RANK", "0")) == 0


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
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    """Make a folder's entries (new files, a rename) durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA and others), or the CPU allocator's failure, which torch
    raises as a plain RuntimeError."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def split_micro_batch(inputs: dict[str, Any], rows: int,
                      pad_to_multiple_of: int | None = None) -> list[dict[str, Any]]:
    """A collated batch cut into parts of at most `rows` rows, each cut to its own longest row
    (right padding: the columns dropped are padding only)."""
    n = int(inputs["input_ids"].shape[0])
    if rows >= n:
        return [inputs]
    parts = []
    for start in range(0, n, rows):
        part = {k: v[start:start + rows] for k, v in inputs.items()}
        mask = part.get("attention_mask")
        if mask is not None:
            width = int(mask.sum(dim=1).max())
            if pad_to_multiple_of:
                m = pad_to_multiple_of
                width = min((width + m - 1) // m * m, int(mask.shape[1]))
            part = {k: v[:, :width] if getattr(v, "dim", lambda: 0)() == 2 else v
                    for k, v in part.items()}
        parts.append(part)
    return parts


@contextlib.contextmanager
def _input_cast_off(layers):
    saved = [m.cast_input_dtype_enabled for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m, v in zip(layers, saved):
            m.cast_input_dtype_enabled = v


def make_trainer_class():
    """Our Trainer subclass, built lazily so importing this module stays cheap."""
    import torch
    import torch.nn.functional as F
    from transformers import Trainer

    from llama_loss import GroupedLengthSampler, fusable_head, supervised_cross_entropy

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

        def _keep_index(self, device):
            if getattr(self, "_keep", None) is None or self._keep.device != device:
                self._keep = torch.tensor([0], device=device)
            return self._keep

        def _no_lora_input_cast(self, model):
            """peft casts every LoRA input to the adapter's dtype (fp32) and autocast casts it
            back to bf16 for the matmul: under autocast the cast changes nothing but costs a
            copy per layer that autograd keeps. Off only while autocast is on. (peft's own
            helpers.disable_input_dtype_casting walks every module twice per call: 7.8 ms per
            micro-batch on the 135M model; the layer list here is found once.)"""
            if not torch.is_autocast_enabled(self.args.device.type):
                return contextlib.nullcontext()
            if getattr(self, "_tuner_layers", None) is None:
                from peft.tuners.tuners_utils import BaseTunerLayer

                self._tuner_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)
                                      and hasattr(m, "cast_input_dtype_enabled")]
            return _input_cast_off(self._tuner_layers)

        def _get_train_sampler(self, train_dataset=None):
            ds = train_dataset if train_dataset is not None else self.train_dataset
            if (self.args.train_sampling_strategy != "group_by_length"
                    or not isinstance(ds, TokenizedDataset)):
                return super()._get_train_sampler(train_dataset)
            # Grouped by the global batch (all processes, all micro-batches of a step), so
            # every process count draws the same rows for each optimizer step: accelerate hands
            # consecutive per-process batches to consecutive processes.
            return GroupedLengthSampler(
                [len(r["input_ids"]) for r in ds.rows],
                self.args.train_batch_size * self.args.gradient_accumulation_steps
                * max(1, self.args.world_size))

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
                    with self._no_lora_input_cast(model):
                        # The model's own head runs on one position only (a tensor index, so
                        # the slice is a contiguous copy: a 1-long view of [B, T, H] makes the
                        # head copy its whole weight per row); ours runs on the supervised
                        # positions below.
                        model(input_ids=inputs["input_ids"], attention_mask=mask, use_cache=False,
                              logits_to_keep=self._keep_index(labels.device))
                finally:
                    handle.remove()
                hidden = captured["h"][:, :-1][supervised]
                denom = num_items_in_batch if num_items_in_batch is not None else max(n_sup, 1)
                scale = 1.0 / float(denom)
                if (self.args.average_tokens_across_devices and num_items_in_batch is not None
                        and self.accelerator.num_processes > 1):
                    scale *= self.accelerator.num_processes
                if fusable_head(head):
                    loss = supervised_cross_entropy(hidden, head.weight, shift_labels[supervised],
                                                    scale=scale)
                else:
                    logits = head(hidden).float()
                    loss = F.cross_entropy(logits, shift_labels[supervised],
                                           reduction="sum") * scale
            if self.loss_hook is not None and model.training:
                loss = self.loss_hook(loss, self.state.global_step + 1)
            if model.training and not torch.isfinite(loss.detach()).all():
                raise NonFiniteLossError(
                    f"the loss became {float(loss.detach())} at step {self.state.global_step + 1}; "
                    "the run stopped before that step's update, so no checkpoint holds a "
                    "non-finite tensor. Lower --learning-rate, check the data, or avoid fp16.")
            return (loss, {"loss": loss}) if return_outputs else loss

        # -- Fault tolerance: consumed ids, out-of-memory back-off, atomic checkpoints ----------
        # run_sft sets these; the class defaults leave a bare SFTTrainer (tests, benchmarks) as is.
        auto_batch_backoff: bool = False
        micro_batch_limit: int | None = None  # rows per micro-batch after an out-of-memory back-off
        checkpoint_extras: Callable[[Any], dict[str, Any]] | None = None  # state -> {file: JSON}
        faults: FaultInjection = FaultInjection()

        def pop_consumed_ids(self) -> list[str]:
            """The ids of the examples consumed since the last call (one optimizer step)."""
            ids, self._consumed = getattr(self, "_consumed", []), []
            return ids

        def training_step(self, model, inputs, num_items_in_batch=None):
            """One micro-batch; records its example ids. With auto_batch_backoff, an out-of-memory
            error rolls the micro-batch back and splits it into halves run as extra accumulation,
            down to one row; the smaller size is kept for the rest of the run. The update is the
            same: the loss is normalised by num_items_in_batch (the supervised tokens of the whole
            optimizer step), so the halves' gradients sum to the whole micro-batch's."""
            ids = inputs.pop("example_ids", None)
            if ids is not None:
                self._consumed = getattr(self, "_consumed", []) + list(ids)
            if not self.auto_batch_backoff:
                return self._micro_step(model, inputs, num_items_in_batch)
            rows = int(inputs["input_ids"].shape[0])
            if num_items_in_batch is None:
                # Pin the normaliser to the whole micro-batch's (mean over its supervised tokens,
                # divided by the accumulation steps) so that the parts add up to it.
                n_sup = int((inputs["labels"][..., 1:] != -100).sum())
                num_items_in_batch = max(n_sup, 1) * self.current_gradient_accumulation_steps
            while True:
                size = min(self.micro_batch_limit or rows, rows)
                saved = self._detach_grads(model)
                counters = (self.tokens_seen, self.supervised_tokens_seen)
                try:
                    total = None
                    for part in split_micro_batch(
                            inputs, size, getattr(self.data_collator, "pad_to_multiple_of", None)):
                        loss = self._micro_step(model, part, num_items_in_batch)
                        total = loss if total is None else total + loss
                    out_of_memory = False
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    if not is_out_of_memory(e):
                        raise
                    out_of_memory = True
                # Outside the except block, so the failed attempt's tensors are freed first.
                self._reattach_grads(saved, keep_new=not out_of_memory)
                if not out_of_memory:
                    return total
                self.tokens_seen, self.supervised_tokens_seen = counters
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if size <= 1:
                    raise torch.OutOfMemoryError(
                        f"out of memory at step {self.state.global_step + 1} even with "
                        "micro-batches of one row")
                self.micro_batch_limit = (size + 1) // 2
                logger.warning(
                    "out of memory at step %d on a micro-batch of %d rows: retrying it as "
                    "micro-batches of %d rows (extra gradient accumulation, same effective batch)"
                    " and keeping that size for the rest of the run", self.state.global_step + 1,
                    size, self.micro_batch_limit)

        def _micro_step(self, model, inputs, num_items_in_batch):
            handle = None
            limit = self.faults.oom_rows_limit(self.state.global_step + 1)
            if limit is not None and inputs["input_ids"].shape[0] > limit:
                handle = self._arm_simulated_oom(model)
            try:
                return super().training_step(model, inputs, num_items_in_batch)
            finally:
                if handle is not None:
                    handle.remove()

        @staticmethod
        def _arm_simulated_oom(model):
            """Test hook (LLAMA_SFT_TEST_OOM): fail when the backward pass reaches the first
            trainable tensor, the last gradient it computes, so the later layers' gradients have
            already been accumulated: what a real out-of-memory error in backward leaves."""
            first = next(p for p in model.parameters() if p.requires_grad)

            def fail(_grad):
                raise torch.OutOfMemoryError("simulated out of memory (LLAMA_SFT_TEST_OOM)")

            return first.register_hook(fail)

        @staticmethod
        def _detach_grads(model) -> list[tuple[Any, Any]]:
            """Set the accumulated gradients aside, so a failed micro-batch can be dropped."""
            saved = []
            for p in model.parameters():
                if p.requires_grad:
                    saved.append((p, p.grad))
                    p.grad = None
            return saved

        @staticmethod
        def _reattach_grads(saved: list[tuple[Any, Any]], *, keep_new: bool) -> None:
            """Add the micro-batch's gradients to the ones set aside (the same sum autograd's
            accumulation makes), or drop them (keep_new=False)."""
            for p, before in saved:
                if not keep_new or p.grad is None:
                    p.grad = before
                elif before is not None:
                    before.add_(p.grad)
                    p.grad = before

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = {k: v for k, v in inputs.items() if k != "example_ids"}
            return super().prediction_step(model, inputs, prediction_loss_only,
                                           ignore_keys=ignore_keys)

        def _check_finite_weights(self, model, step: int) -> None:
            bad = [n for n, p in model.named_parameters()
                   if p.requires_grad and not bool(torch.isfinite(p.detach()).all())]
            count = len(bad)
            if self.accelerator.num_processes > 1:  # sharded weights: every process must agree
                count = int(self.accelerator.reduce(
                    torch.tensor(count, device=self.args.device), reduction="sum"))
            if count:
                first = f" (first: {bad[0]})" if bad else ""
                raise NonFiniteWeightsError(
                    f"trainable weights became NaN or inf by step {step}{first}; the checkpoint "
                    f"of step {step} was not written and the earlier ones are untouched. Lower "
                    "--learning-rate, check the data, or avoid fp16.")

        def _save_checkpoint(self, model, trial):
            """transformers' checkpoint (same files, same trainer state), written atomically:
            into .checkpoint-N.tmp/, then run_config.json and resume_state.json, every file
            fsynced, the sha256 manifest last, then renamed to checkpoint-N/. A kill at any
            moment leaves either the complete checkpoint or no folder of that name."""
            from transformers.trainer import TRAINER_STATE_NAME
            from transformers.trainer_callback import ExportableState
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy

            step = self.state.global_step
            self._check_finite_weights(model, step)
            run_dir = Path(self._get_output_dir(trial=trial))
            final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            staging = staging_dir(final)
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            if self.hp_search_backend is None and trial is None:
                self.store_flos()
            self.save_model(str(staging), _internal_call=True)
            delay = self.faults.save_delay_at(step)
            if delay and self.args.should_save:
                logger.warning("test hook LLAMA_SFT_TEST_SAVE_DELAY: pausing %g s in the middle "
                               "of writing %s", delay, staging)
                time.sleep(delay)
            if (self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH,
                                            SaveStrategy.BEST) and self.state.best_global_step):
                # Recorded under its final name (the trainer state is written before the rename).
                best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}"
                if self.state.best_global_step == step or best.is_dir():
                    self.state.best_model_checkpoint = str(best)
            if not self.args.save_only_model:
                self._save_optimizer_and_scheduler(str(staging))
                self._save_scaler(str(staging))
                self._save_rng_state(str(staging))
            if self.args.should_save:
                for cb in [c for c in self.callback_handler.callbacks + [self.control]
                           if isinstance(c, ExportableState)]:
                    name, cb_state = cb.__class__.__name__, cb.state()
                    if isinstance(self.state.stateful_callbacks[name], list):
                        self.state.stateful_callbacks[name].append(cb_state)
                    else:
                        self.state.stateful_callbacks[name] = cb_state
                self.state.save_to_json(str(staging / TRAINER_STATE_NAME))
                extras = self.checkpoint_extras(self.state) if self.checkpoint_extras else {}
                for name, obj in extras.items():
                    write_json_atomic(staging / name, obj)
            self.accelerator.wait_for_everyone()  # every process's files are in the folder
            if self.args.should_save:
                finalize_checkpoint(staging, final)
            self.accelerator.wait_for_everyone()
            if self.args.push_to_hub:
                self._push_from_checkpoint(str(final))

    SFTTrainer.model_accepts_loss_kwargs = True
    return SFTTrainer


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
                ppl = math.exp(min(logs["eval_loss"], 50))
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


# --------------------------------------------------------------------------------------
# The training run shared by llama_train.py and llama_pilot.py
# --------------------------------------------------------------------------------------


# Files a run writes at the top of --output-dir besides checkpoint-*/, final_model/ and
# metrics.jsonl: one of these alone still means the folder holds an earlier run, which a new run
# would partly overwrite.
RUN_OUTPUTS = ("train_results.json", "test.jsonl", "samples.jsonl", CONSUMED_IDS,
               "loss_curve.png")


def check_output_dir(output_dir: Path, resume: str | None,
                     outputs: Sequence[str] = RUN_OUTPUTS) -> None:
    """Refuse to write into a folder that already holds a run (its checkpoints, final model or
    logs, or any of `outputs`) unless resuming: RunSetupError, before anything is written."""
    if resume or not output_dir.is_dir():
        return
    if (list_checkpoints(output_dir) or (output_dir / "final_model").exists()
            or (output_dir / "metrics.jsonl").exists() or (output_dir / CONSUMED_IDS).exists()):
        raise RunSetupError(f"--output-dir {output_dir} already holds a training run. Continue it "
                            "with --resume auto, or choose another --output-dir (nothing was "
                            "overwritten)")
    found = [n for n in outputs if (output_dir / n).exists()]
    if found:
        raise RunSetupError(f"--output-dir {output_dir} already holds {', '.join(found)} from an "
                            "earlier run. Continue that run with --resume auto, or choose another "
                            "--output-dir (nothing was overwritten)")


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
        problem = verify_checkpoint(ckpt)
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


def setup_wandb(cfg: Any) -> None:
    """W&B via the Trainer's integration; offline when no API key is configured."""
    os.environ.setdefault("WANDB_PROJECT", cfg.wandb_project)
    os.environ.setdefault("WANDB_LOG_MODEL", "false")
    if not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") is None:
        netrc = Path.home() / ".netrc"
        if not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")):
            os.environ["WANDB_MODE"] = "offline"
            logger.info("W&B: no API key found, logging offline (sync later with `wandb sync`)")


def finish_wandb() -> None:
    """Close this run's W&B run, so a later run in the same process starts its own."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
        # wandb.setup() caches settings (WANDB_DIR, mode) for the whole process; tear it down so
        # a later run in this process reads its own environment.
        if hasattr(wandb, "teardown"):
            wandb.teardown()
    except Exception as e:  # noqa: BLE001 - a tracker problem must not fail a finished run
        logger.warning("could not close the W&B run: %s", e)


def build_training_args(cfg: Any, output_dir: Path, *, has_eval: bool, bf16: bool, fp16: bool):
    from transformers import TrainingArguments

    save_steps = cfg.save_steps or cfg.eval_steps
    early = has_eval and cfg.early_stopping_patience is not None
    if early and save_steps % cfg.eval_steps:
        raise RunSetupError(f"--save-steps {save_steps} must be a multiple of --eval-steps "
                            f"{cfg.eval_steps} for early stopping to keep the best checkpoint")
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=max(cfg.batch_size, 8),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps if cfg.max_steps and cfg.max_steps > 0 else -1,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps if has_eval else None,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=None,  # retention is ours: only after the new checkpoint is complete
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        bf16=bf16,
        fp16=fp16,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=["wandb"] if cfg.use_wandb else "none",
        run_name=output_dir.name,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length",
        dataloader_num_workers=0,
        prediction_loss_only=True,
        use_cpu=not _cuda_available(),
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
        save_only_model=False,
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def precision_flags(device: str) -> tuple[bool, bool]:
    """(bf16, fp16) for mixed precision. fp16 only where bf16 is missing, with a warning."""
    import torch

    from llama_model import cpu_has_bf16

    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return True, False
        logger.warning("this GPU has no bf16: training in fp16, which LLaMA can overflow in; watch "
                       "for a non-finite loss")
        return False, True
    return cpu_has_bf16(), False


def resolve_attn_implementation(name: str | None, device: str) -> str:
    """--attn-implementation auto: on a CPU, llama_attention's "sdpa_recompute" (SDPA's memory,
    eager's speed: bench/RESULTS.md); sdpa elsewhere. Registers it with transformers when used."""
    if not name or name == "auto":
        name = "sdpa_recompute" if device == "cpu" else "sdpa"
    if name == "sdpa_recompute":
        import llama_attention

        llama_attention.register()
    return name


def run_sft(cfg: Any, *, output_dir: Path, train_rows: list[dict], eval_rows: list[dict],
            sample_prompts: list[dict], run_config: dict[str, Any], tokenizer,
            model=None, stage: str = "train", on_trainer: Callable | None = None) -> dict[str, Any]:
    """Train a LoRA adapter and write the output layout; returns what it measured.

    `sample_prompts`: [{prompt (rendered), prompt_preview, reference}] generated at each eval.
    `model`: a prepared base (unwrapped) model, or None to load cfg.base_model."""
    import torch
    from transformers import EarlyStoppingCallback

    from llama_generate import generate
    from llama_model import add_lora, load_model

    output_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16, fp16 = precision_flags(device)
    faults = FaultInjection.from_env()
    resume_from = find_resume_checkpoint(output_dir, cfg.resume, run_config, cfg.force)
    start_step = int(CHECKPOINT_RE.match(resume_from.name).group(1)) if resume_from else 0
    if is_main_process():
        remove_stale_staging(output_dir)
        if resume_from is not None:
            truncate_step_logs(output_dir, start_step)
        elif cfg.resume:
            # Nothing to resume: a fresh run must not append to an old run's logs.
            for name in STEP_LOGS:
                (output_dir / name).unlink(missing_ok=True)
    if cfg.use_wandb:
        setup_wandb(cfg)
    if model is None:
        model = load_model(run_config["base_model"], use_4bit=cfg.use_4bit, use_8bit=cfg.use_8bit,
                           trust_remote_code=cfg.trust_remote_code, for_training=True)
    attn = resolve_attn_implementation(getattr(cfg, "attn_implementation", "auto"), device)
    if getattr(model.config, "_attn_implementation", None) != attn:
        model.set_attn_implementation(attn)
    # LoRA A is initialised from the global RNG: seed first, or two runs with the same --seed
    # start from different adapters.
    from transformers import set_seed

    set_seed(cfg.seed)
    model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                     target_modules=cfg.lora_target_modules,
                     gradient_checkpointing=cfg.gradient_checkpointing)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA r=%d alpha=%d dropout=%g on %s: %.2fM trainable of %.1fM parameters",
                cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
                trainable / 1e6, total / 1e6)

    def sample_fn(m):
        if not sample_prompts:
            return []
        gens = generate(m, tokenizer, [s["prompt"] for s in sample_prompts],
                        max_new_tokens=cfg.max_new_tokens, batch_size=len(sample_prompts))
        return [{"prompt_preview": s["prompt_preview"], "reference": s["reference"],
                 "generation": g.text, "ended_with_eos": g.ended_with_eos}
                for s, g in zip(sample_prompts, gens)]

    stop_flag: dict[str, Any] = {}
    args = build_training_args(cfg, output_dir, has_eval=bool(eval_rows), bf16=bf16, fp16=fp16)
    backoff = bool(getattr(cfg, "auto_batch_backoff", False))
    if backoff and args.world_size > 1:
        raise RunSetupError("--auto-batch-backoff works in a single process only (each process "
                            "would split its micro-batches differently); leave it out and set "
                            "--batch-size / --gradient-accumulation-steps")
    progress, guard, samples_cb, consumed = make_callbacks(
        output_dir=output_dir, cfg=cfg, sample_fn=sample_fn, keep=cfg.save_total_limit,
        stop_flag=stop_flag, faults=faults)
    trainer_cls = make_trainer_class()
    from transformers.trainer_callback import ProgressCallback, PrinterCallback

    trainer = trainer_cls(
        model=model, args=args, train_dataset=TokenizedDataset(train_rows),
        eval_dataset=TokenizedDataset(eval_rows) if eval_rows else None,
        data_collator=PadCollator(tokenizer.pad_token_id,
                                  pad_to_multiple_of=8 if device == "cuda" else None,
                                  example_ids=True),
        processing_class=tokenizer,
    )
    trainer.auto_batch_backoff = backoff
    trainer.faults = faults
    trainer.loss_hook = faults.loss_hook()
    trainer.checkpoint_extras = lambda state: {
        "run_config.json": run_config,
        RESUME_STATE: {"config_hash": run_config["config_hash"],
                       "dataset_hash": run_config["dataset"].get("dataset_hash"),
                       "global_step": state.global_step},
    }
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    progress.trainer = consumed.trainer = trainer
    # First in line, so the numbers it adds to each log (tokens/s, perplexity) reach W&B too.
    trainer.callback_handler.callbacks.insert(0, progress)
    for cb in (guard, samples_cb, consumed):
        trainer.add_callback(cb)
    if args.load_best_model_at_end:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    if on_trainer is not None:
        on_trainer(trainer)

    t0 = time.perf_counter()
    status = "completed"
    with SignalCatcher(stop_flag):
        try:
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except BaseException as e:
            if cfg.use_wandb:
                finish_wandb()
            if not is_out_of_memory(e):
                raise
            newest = latest_good_checkpoint(output_dir) if is_main_process() else None
            raise TrainingError(
                f"out of memory at step {trainer.state.global_step + 1} (micro-batch of "
                f"{trainer.micro_batch_limit or cfg.batch_size} rows, --max-length "
                f"{cfg.max_length}). What was written is intact (newest complete checkpoint: "
                f"{newest.name if newest else 'none'}). To fit: lower --batch-size and raise "
                "--gradient-accumulation-steps to keep the effective batch (or add "
                "--auto-batch-backoff, which does that on its own and can continue this run with "
                "--resume auto), use --use-4bit, add --gradient-checkpointing, or lower "
                "--max-length") from None
    elapsed = time.perf_counter() - t0
    if stop_flag.get("signal") is not None:
        status = f"interrupted by {signal.Signals(stop_flag['signal']).name}"
    state = trainer.state
    early_stopped = (args.load_best_model_at_end and state.global_step < state.max_steps
                     and stop_flag.get("signal") is None)
    if early_stopped:
        status = "early stopped"

    final_eval = {}
    if eval_rows and stop_flag.get("signal") is None:
        last = [h for h in state.log_history if "eval_loss" in h]
        if last and last[-1].get("step") == state.global_step and not args.load_best_model_at_end:
            final_eval = last[-1]  # already evaluated at the last step
        else:
            final_eval = trainer.evaluate()
    results: dict[str, Any] = {
        "stage": stage,
        "status": status,
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "epochs": round(state.epoch or 0, 4),
        "train_loss": round(result.training_loss, 6),
        "train_runtime_seconds": round(elapsed, 2),
        "tokens_seen": trainer.tokens_seen,
        "supervised_tokens_seen": trainer.supervised_tokens_seen,
        "tokens_per_second": round(trainer.tokens_seen / max(elapsed, 1e-9), 2),
        "supervised_tokens_per_second": round(trainer.supervised_tokens_seen / max(elapsed, 1e-9), 2),
        "seconds_per_step": round(elapsed / max(state.global_step - start_step, 1), 4),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "best_checkpoint": state.best_model_checkpoint,
        "best_eval_loss": state.best_metric,
        "early_stopped": bool(early_stopped),
        "resumed_from": str(resume_from) if resume_from else None,
    }
    if final_eval:
        results["eval_loss"] = round(final_eval["eval_loss"], 6)
        results["eval_perplexity"] = round(math.exp(min(final_eval["eval_loss"], 50)), 4)
    results["model"] = trainer.model
    if cfg.use_wandb:
        finish_wandb()
    if stop_flag.get("signal") is not None:
        results["exit_code"] = EXIT_INTERRUPTED[stop_flag["signal"]]
    return results


def mean_supervised_loss(model, rows: Sequence[dict[str, Any]], pad_token_id: int,
                         batch_size: int = 8) -> float:
    """Mean cross-entropy per supervised token (response + EOS), teacher-forced."""
    from llama_loss import per_example_nll

    sums = per_example_nll(model, rows, pad_token_id, batch_size=batch_size)
    return sum(s for s, _ in sums) / max(sum(n for _, n in sums), 1)


def save_final_model(model, tokenizer, output_dir: Path, run_config: dict[str, Any]) -> Path:
    """final_model/: adapter (safetensors), tokenizer, run_config.json; written then renamed."""
    final = output_dir / "final_model"
    tmp = output_dir / ".final_model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    write_json_atomic(tmp / "run_config.json", run_config)
    write_manifest(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
