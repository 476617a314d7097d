"""What a training run leaves besides checkpoints: the refusal of an occupied --output-dir and its
run lock (claim_output_dir), final_model/ (written then renamed; a full disk removes the partial
one), train_results.json, the loss-curve PNG, and the peak-memory reading."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from llama_sft.cli import is_main_process
from llama_sft.errors import DiskFullError, RunSetupError
from llama_sft.files import (
    disk_full_message,
    out_of_space,
    tree_bytes,
    write_json_atomic,
    write_manifest,
)
from llama_sft.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CONSUMED_IDS,
    RUN_CONFIG,
    RUN_OUTPUTS,
    TOKENIZER_FILES,
    RunConfig,
)
from llama_sft.training.checkpoints import list_checkpoints, newest_complete_checkpoint
from llama_sft.training.lock import output_dir_lock, refuse_if_held


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


@contextmanager
def claim_output_dir(output_dir: Path, resume: str | None,
                     outputs: Sequence[str] = RUN_OUTPUTS) -> Iterator[None]:
    """Hold the run lock on the folder (training/lock.py) for the `with` block. Refused, exit 2
    and before anything is written: a folder a live run holds (naming that run, even when it
    has written its outputs already), then one holding an earlier run (check_output_dir, before
    the lock file touches the folder)."""
    refuse_if_held(output_dir)
    check_output_dir(output_dir, resume, outputs)
    with output_dir_lock(output_dir):
        yield


def save_final_model(model, tokenizer, output_dir: Path, run_config: RunConfig,
                     state_dict: dict[str, Any] | None = None) -> Path:
    """final_model/: adapter (safetensors), tokenizer, run_config.json; written then renamed.
    `state_dict`: the model's tensors when its own are sharded (FSDP). A full disk removes the
    partial folder and raises DiskFullError (exit 1)."""
    final = output_dir / "final_model"
    tmp = output_dir / ".final_model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        run_config.to_json(tmp / RUN_CONFIG)
        write_manifest(tmp)
    except Exception as e:
        _final_model_failed(e, tmp, output_dir)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


# What final_model/ holds of a checkpoint's files: their size there is the space it needs.
_FINAL_MODEL_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, RUN_CONFIG, "README.md", *TOKENIZER_FILES)


def _final_model_failed(exc: Exception, tmp: Path, output_dir: Path) -> None:
    """Remove the partial final_model; raise DiskFullError when the disk or quota was full
    (any other error is the caller's to re-raise)."""
    newest = newest_complete_checkpoint(output_dir)
    needed = max(tree_bytes(tmp), sum(tree_bytes(newest / n) for n in _FINAL_MODEL_FILES)
                 if newest else 0)
    full = out_of_space(exc, output_dir, needed)
    shutil.rmtree(tmp, ignore_errors=True)
    if not full:
        return
    then = (f"it continues from {newest.name}, the newest complete checkpoint (training any "
            "steps after it again), and writes final_model/" if newest else
            "no checkpoint was written, so it trains again from the start")
    raise DiskFullError(
        disk_full_message("final_model/", output_dir, needed or None)
        + " The partial final_model/ was removed and every checkpoint is intact. Free some "
        "space (or copy the folder to another --output-dir), then run the same command with "
        f"--resume auto: {then}") from exc


def finish_outputs(result: dict[str, Any], *, tokenizer, output_dir: Path,
                   run_config: RunConfig) -> dict[str, Any]:
    """final_model/, train_results.json and loss_curve.png after a run."""
    model = result.pop("model")
    state_dict = result.pop("adapter_state_dict", None)
    if not is_main_process():
        return result
    if result.get("exit_code") is None:
        final = save_final_model(model, tokenizer, output_dir, run_config, state_dict)
        result["final_model"] = str(final)
    if plot_loss_curve(output_dir / "metrics.jsonl", output_dir / "loss_curve.png",
                       title=f"{run_config.stage}: {run_config.base_model}"):
        result["loss_curve"] = str(output_dir / "loss_curve.png")
    write_json_atomic(output_dir / "train_results.json", result)
    return result
