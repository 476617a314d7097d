"""Fault suite for RELIABILITY.md items 1-7 (training state) and the training side of 16-18 (a
killed run's lock taken over, a full disk during a save, torn logs), on the tiny random LLaMA.

Every kill is real: llama_train.py runs in a child process and gets SIGKILL / SIGTERM / SIGINT
from here; the runs that need no kill (the reference, the resumes, the non-finite and
out-of-memory runs) go through llama_train.main in this process, which is faster. Faults that
cannot be caused from outside (a slow save, a non-finite loss, running out of memory) come from
the test-only environment hooks documented in llama_sft.training.faults.FaultInjection.

All runs share one configuration (8 optimizer steps of 2 micro-batches of 4 rows, LoRA dropout
0.1, a checkpoint every 2 steps, at most 1 kept; 37 training rows, so step 8 is mid-epoch 2) and
are compared with one uninterrupted run of it. Tolerances: a stopped-and-resumed run does the same
arithmetic in the same order as the uninterrupted one, so losses, adapter and optimizer tensors
are compared exactly (see _assert_same_training); the out-of-memory back-off is compared within
a stated bound (see its test)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import adapter_tensors, tiny_args

import llama_train
from llama_sft.errors import NonFiniteWeightsError
from llama_sft.files import format_bytes, tree_bytes, verify_manifest
from llama_sft.layout import CONSUMED_IDS, MANIFEST, METRICS, RUN_LOCK
from llama_sft.training.checkpoints import latest_good_checkpoint, list_checkpoints
from llama_sft.training.lock import LockHolder
from llama_sft.training.train import run_train
from llama_sft.training.trainer import is_out_of_memory

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "llama_train.py"
MAX_STEPS = 8
COMMON = ["--max-steps", str(MAX_STEPS), "--eval-steps", "100", "--save-steps", "2",
          "--save-total-limit", "1", "--gradient-accumulation-steps", "2", "--lora-dropout", "0.1"]
# Seeded, so a failure reproduces: an odd step, so the kill lands between two checkpoints with
# steps logged after the newest one (the case where logs must be cut back on resume).
KILL_STEP = random.Random(20261127).choice([3, 5, 7])
STEP_DELAY = "0.4"  # seconds after each optimizer step: room to signal a chosen step
TIMEOUT = 600


# ---------------------------------------------------------------------------------------------
# Child processes and what they leave on disk
# ---------------------------------------------------------------------------------------------


@dataclass
class Child:
    proc: subprocess.Popen
    log: Path
    out: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.out.name}: still running after {timeout} s\n"
                                 + self.text()[-3000:]) from None

    def wait_until(self, predicate, what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.out.name} exited with {self.proc.returncode} before "
                                     f"{what}\n" + self.text()[-3000:])
            time.sleep(0.02)
        self.proc.kill()
        self.proc.wait()
        raise AssertionError(f"{self.out.name}: timed out waiting for {what}")


def start(workdir: Path, argv: list[str], **hooks: str) -> Child:
    """llama_train.py in a child process; `hooks` are LLAMA_SFT_TEST_* variables (test-only)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_SFT_TEST_")}
    env.update({"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.update({f"LLAMA_SFT_TEST_{k.upper()}": v for k, v in hooks.items()})
    out = Path(argv[argv.index("--output-dir") + 1])
    log = out.with_name(out.name + f".{int(time.monotonic() * 1000)}.log")
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *argv], cwd=workdir, env=env,
                                stdout=fh, stderr=subprocess.STDOUT)
    return Child(proc, log, out)


def records(path: Path) -> list[dict]:
    """JSON lines; a torn last line (a killed writer) is skipped."""
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def loss_steps(run: Path) -> list[tuple[int, float]]:
    """(step, loss) in file order, duplicates kept: a step logged twice shows."""
    return [(r["step"], r["loss"]) for r in records(run / "metrics.jsonl") if "loss" in r]


def last_logged_step(run: Path) -> int:
    steps = [s for s, _ in loss_steps(run)]
    return max(steps) if steps else 0


def consumed(run: Path) -> list[tuple[int, list[str]]]:
    return [(r["step"], r["ids"]) for r in records(run / CONSUMED_IDS)]


def optimizer_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
    return {f"{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()
            if torch.is_tensor(v)}


def _assert_same_training(run: Path, ref: Path) -> None:
    """RELIABILITY 1 and 2: the same steps once each with the same losses, the same examples in
    the same order, the same final adapter and the same optimizer state at the last checkpoint.

    Exact comparison: the resumed run restores the adapter, optimizer, scheduler and RNG states
    bit for bit and replays the same batches through the same kernels on the same thread count,
    so nothing but a real difference can move a bit."""
    a, b = loss_steps(ref), loss_steps(run)
    assert [s for s, _ in b] == list(range(1, MAX_STEPS + 1)), "a step missing or logged twice"
    assert b == a
    assert consumed(run) == consumed(ref)
    ta, tb = adapter_tensors(ref / "final_model"), adapter_tensors(run / "final_model")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    oa = optimizer_tensors(ref / f"checkpoint-{MAX_STEPS}")
    ob = optimizer_tensors(run / f"checkpoint-{MAX_STEPS}")
    assert oa.keys() == ob.keys() and oa
    for k in oa:
        assert torch.equal(oa[k], ob[k]), k


def _assert_all_finite(ckpt: Path) -> None:
    for name, t in {**adapter_tensors(ckpt), **optimizer_tensors(ckpt)}.items():
        if t.is_floating_point():
            assert torch.isfinite(t).all(), (ckpt.name, name)


# ---------------------------------------------------------------------------------------------
# The uninterrupted reference run
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


def argv_for(work: Path, tiny_llama_dir: Path, out: str, *extra: str) -> list[str]:
    return tiny_args(work, tiny_llama_dir, out, *COMMON, *extra)


def run_here(argv: list[str], expect: int = 0) -> tuple[Path, str]:
    """llama_train.main in this process (no kill involved): the output folder and its stderr
    (log lines and `error: ...`)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = llama_train.main(argv)
    assert rc == expect, f"exit {rc}, expected {expect}\n" + err.getvalue()[-4000:]
    return Path(argv[argv.index("--output-dir") + 1]), err.getvalue()


@pytest.fixture(scope="module")
def reference(work, tiny_llama_dir) -> Path:
    out, _ = run_here(argv_for(work, tiny_llama_dir, "reference"))
    assert [s for s, _ in loss_steps(out)] == list(range(1, MAX_STEPS + 1))
    assert len(consumed(out)) == MAX_STEPS
    return out


# ---------------------------------------------------------------------------------------------
# 1, 2: kill -9 at a random step, then --resume auto
# ---------------------------------------------------------------------------------------------


@dataclass
class Killed:
    out: Path
    rc: int
    logged_before_kill: int           # newest step in metrics.jsonl when the kill landed
    latest_good_after_kill: str | None
    resumed_from: str | None
    consumed_before_resume: list[tuple[int, list[str]]]
    pid: int
    lock_after_kill: LockHolder | None  # the body of the lock file the kill left
    torn: dict[str, bytes]            # the half-written last line added to each log
    resume_log: str


def tear_last_line(path: Path, step: int) -> bytes:
    """Append the first half of a record for `step`, as a kill in the middle of its write
    leaves it (no newline)."""
    line = json.dumps({"step": step, "epoch": 1.0, "loss": 2.5, "ids": ["torn-a", "torn-b"]})
    torn = line[: len(line) // 2].encode()
    with open(path, "ab") as fh:
        fh.write(torn)
    return torn


@pytest.fixture(scope="module")
def killed_at_random_step(work, tiny_llama_dir, reference) -> Killed:
    argv = argv_for(work, tiny_llama_dir, "kill9")
    child = start(work, argv, step_delay=STEP_DELAY)
    child.wait_until(lambda: last_logged_step(child.out) >= KILL_STEP, f"step {KILL_STEP}")
    child.proc.send_signal(signal.SIGKILL)
    rc = child.wait()
    logged = last_logged_step(child.out)
    latest = latest_good_checkpoint(child.out)
    before = consumed(child.out)
    lock = LockHolder.from_json((child.out / RUN_LOCK).read_text())
    # RELIABILITY 18: the kill landed in the middle of writing both logs' next line.
    torn = {name: tear_last_line(child.out / name, logged + 1) for name in (METRICS, CONSUMED_IDS)}
    _, log = run_here(argv + ["--resume", "auto"])
    res = json.loads((child.out / "train_results.json").read_text())
    return Killed(child.out, rc, logged, latest.name if latest else None, res["resumed_from"],
                  before, child.proc.pid, lock, torn, log)


def test_guarantee_01_kill9_at_a_random_step_then_resume_matches_an_uninterrupted_run(
        killed_at_random_step, reference):
    k = killed_at_random_step
    assert k.rc == -signal.SIGKILL
    assert k.logged_before_kill >= KILL_STEP
    # It resumed from the newest complete checkpoint the kill left, not from scratch.
    assert k.latest_good_after_kill is not None and k.resumed_from is not None
    assert Path(k.resumed_from).name == k.latest_good_after_kill
    _assert_same_training(k.out, reference)


def test_guarantee_01_resumed_logs_hold_each_step_once(killed_at_random_step):
    """The killed run logged steps after its newest checkpoint; the resume redoes them, and
    metrics.jsonl / consumed_ids.jsonl are cut back so each step appears once."""
    k = killed_at_random_step
    ckpt_step = int(Path(k.resumed_from).name.split("-")[1])
    assert max(s for s, _ in k.consumed_before_resume) > ckpt_step  # the case that needs the cut
    steps = [s for s, _ in loss_steps(k.out)]
    assert steps == sorted(set(steps)) == list(range(1, MAX_STEPS + 1))
    assert [s for s, _ in consumed(k.out)] == list(range(1, MAX_STEPS + 1))


def test_guarantee_02_no_example_seen_twice_or_skipped_across_a_kill9_resume(
        killed_at_random_step, reference):
    ids_ref = [i for _, ids in consumed(reference) for i in ids]
    ids_run = [i for _, ids in consumed(killed_at_random_step.out) for i in ids]
    assert len(ids_ref) == MAX_STEPS * 2 * 4 - 3  # epoch 1 ends on a 1-row micro-batch
    assert ids_run == ids_ref
    # Within each epoch (37 rows) every example once: nothing repeated, nothing skipped.
    train_ids = sorted(ids_ref[:37])
    assert len(set(train_ids)) == 37
    assert sorted(ids_run[:37]) == train_ids


def test_guarantee_16_a_kill9_runs_lock_is_taken_over_by_the_resume_with_a_notice(
        killed_at_random_step):
    k = killed_at_random_step
    # The killed run held the lock: its file names it and stays behind (the kernel dropped the
    # lock itself); the resume takes it over, says so, and removes it when it ends.
    assert k.lock_after_kill is not None and k.lock_after_kill.pid == k.pid
    assert "llama_train.py" in k.lock_after_kill.command
    assert f"took over the lock on --output-dir {k.out} from a run that ended without " \
           f"releasing it (pid {k.pid} on " in k.resume_log
    assert not (k.out / RUN_LOCK).exists()


def test_guarantee_18_torn_last_lines_are_cut_on_resume_and_no_complete_record_is_lost(
        killed_at_random_step, reference):
    k = killed_at_random_step
    for name, torn in k.torn.items():
        # Cut with a notice (a kill may have torn the line itself: then more bytes go).
        notice = f"{name}: cut a half-written last line ("
        assert notice in k.resume_log, name
        cut = int(k.resume_log.split(notice, 1)[1].split(" ", 1)[0])
        assert cut >= len(torn)
        lines = (k.out / name).read_text().splitlines()
        assert all(json.loads(line) for line in lines)  # every line a whole record again
    # Nothing complete was lost or glued to the torn line: each step once, as the reference.
    assert loss_steps(k.out) == loss_steps(reference)
    assert consumed(k.out) == consumed(reference)


# ---------------------------------------------------------------------------------------------
# 3, 4: kill -9 in the middle of a checkpoint save
# ---------------------------------------------------------------------------------------------


@dataclass
class KilledMidSave:
    out: Path
    rc: int
    names_after_kill: set[str]
    staging_files: set[str]
    previous_problem: str | None      # verify_manifest(checkpoint-2) right after the kill
    latest_good_after_kill: str | None
    resumed_from: str | None
    resume_log: str


@pytest.fixture(scope="module")
def killed_mid_save(work, tiny_llama_dir, reference) -> KilledMidSave:
    argv = argv_for(work, tiny_llama_dir, "midsave")
    # The save of step 4 pauses for a minute after the adapter is written (test hook).
    child = start(work, argv, save_delay="60@4")
    staging, final = child.out / ".checkpoint-4.tmp", child.out / "checkpoint-4"

    def save_started() -> bool:  # wherever the save writes, the adapter comes first
        return any((d / "adapter_model.safetensors").is_file() for d in (staging, final))

    child.wait_until(save_started, "the save of checkpoint-4 to start")
    child.proc.send_signal(signal.SIGKILL)
    rc = child.wait()
    names = {p.name for p in child.out.iterdir()}
    staging_files = {p.name for p in staging.iterdir()} if staging.is_dir() else set()
    problem = verify_manifest(child.out / "checkpoint-2")
    latest = latest_good_checkpoint(child.out)
    _, log = run_here(argv + ["--resume", "auto"])
    res = json.loads((child.out / "train_results.json").read_text())
    return KilledMidSave(child.out, rc, names, staging_files, problem,
                         latest.name if latest else None, res["resumed_from"], log)


def test_guarantee_03_kill9_during_checkpoint_save_leaves_no_partial_checkpoint(killed_mid_save):
    k = killed_mid_save
    assert k.rc == -signal.SIGKILL
    # The half-written save exists only under its temporary name...
    assert ".checkpoint-4.tmp" in k.names_after_kill
    assert "adapter_model.safetensors" in k.staging_files
    assert MANIFEST not in k.staging_files and "optimizer.pt" not in k.staging_files
    # ...so no folder with a checkpoint's name is incomplete, and resume picks the previous one.
    assert "checkpoint-4" not in k.names_after_kill
    assert k.latest_good_after_kill == "checkpoint-2"


def test_guarantee_03_resume_after_kill9_mid_save_ignores_it_and_matches(killed_mid_save,
                                                                           reference):
    k = killed_mid_save
    assert Path(k.resumed_from).name == "checkpoint-2"
    # The stale temporary folder is removed when the next run starts, before anything else.
    assert f"removed {k.out / '.checkpoint-4.tmp'}: an unfinished checkpoint save" in k.resume_log
    assert not any(p.name.endswith(".tmp") for p in k.out.iterdir())
    _assert_same_training(k.out, reference)


def test_guarantee_04_kill9_mid_save_keeps_the_previous_good_checkpoint(killed_mid_save):
    """--save-total-limit 1: the only complete checkpoint survives a save that never finished,
    and retention after the resumed run keeps exactly the newest."""
    k = killed_mid_save
    assert "checkpoint-2" in k.names_after_kill and k.previous_problem is None
    assert [c.name for c in list_checkpoints(k.out)] == [f"checkpoint-{MAX_STEPS}"]
    assert verify_manifest(k.out / f"checkpoint-{MAX_STEPS}") is None


def test_guarantee_03_truncated_file_in_an_explicit_resume_is_a_clear_error(
        work, tiny_llama_dir, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    ckpt = run / f"checkpoint-{MAX_STEPS}"
    opt = ckpt / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])
    before = {p: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    argv = tiny_args(work, tiny_llama_dir, "unused", *COMMON)
    argv[argv.index("--output-dir") + 1] = str(run)
    assert llama_train.main(argv + ["--resume", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert f"--resume {ckpt}: optimizer.pt does not match its sha256 (truncated" in err
    assert "--resume auto" in err
    assert {p: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before


# ---------------------------------------------------------------------------------------------
# 5: SIGTERM / SIGINT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig, code", [
    (signal.SIGTERM, 143),
    # In a process of its own here; tests/test_train.py stops a run with SIGINT in-process.
    pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow),
], ids=["SIGTERM", "SIGINT"])
def test_guarantee_05_signal_saves_a_complete_checkpoint_exits_with_its_code_and_resume_matches(
        work, tiny_llama_dir, reference, sig, code):
    argv = argv_for(work, tiny_llama_dir, f"signal-{sig.name}")
    child = start(work, argv, step_delay=STEP_DELAY)
    # After step 4 is logged: the signal lands in step 5 (or later, on a slow machine), which is
    # not a --save-steps step, so the checkpoint below is the signal's doing.
    child.wait_until(lambda: last_logged_step(child.out) >= 4, "step 4")
    child.proc.send_signal(sig)
    assert child.wait() == code, child.text()[-3000:]
    res = json.loads((child.out / "train_results.json").read_text())
    stopped = res["global_step"]
    assert res["status"] == f"interrupted by {sig.name}" and res["exit_code"] == code
    assert 5 <= stopped < MAX_STEPS
    # The step in flight was finished and saved completely.
    assert verify_manifest(child.out / f"checkpoint-{stopped}") is None
    assert latest_good_checkpoint(child.out).name == f"checkpoint-{stopped}"
    assert not (child.out / "final_model").exists()
    assert "--resume auto" in child.text()
    assert not (child.out / RUN_LOCK).exists()  # RELIABILITY 16: released on this exit path
    run_here(argv + ["--resume", "auto"])
    res = json.loads((child.out / "train_results.json").read_text())
    assert Path(res["resumed_from"]).name == f"checkpoint-{stopped}"
    _assert_same_training(child.out, reference)


# ---------------------------------------------------------------------------------------------
# 6: non-finite loss, non-finite weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_guarantee_06_non_finite_loss_stops_naming_the_step_and_no_checkpoint_holds_one(
        work, tiny_llama_dir, kind, monkeypatch):
    monkeypatch.setenv("LLAMA_SFT_TEST_NONFINITE", f"{kind}@3")
    out, err = run_here(argv_for(work, tiny_llama_dir, f"nonfinite-{kind}"), expect=1)
    assert f"error: the loss became {kind} at step 3" in err
    assert [s for s, _ in loss_steps(out)] == [1, 2]  # stopped before step 3's update
    ckpts = list_checkpoints(out)
    assert [c.name for c in ckpts] == ["checkpoint-2"]
    for c in ckpts:
        assert verify_manifest(c) is None
        _assert_all_finite(c)
    assert not (out / "final_model").exists()
    assert not (out / RUN_LOCK).exists()  # RELIABILITY 16: released after a failed run


def test_guarantee_06_non_finite_weights_are_never_checkpointed(tmp_path, tiny_llama_dir):
    """A finite loss with an update that overflowed (possible under fp16): the checkpoint of that
    step is refused, naming it, and nothing is written under any checkpoint name."""
    from transformers import TrainerCallback

    class Overflow(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 2:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_B" in n)[0, 0] = math.inf

    argv = tiny_args(tmp_path, tiny_llama_dir, "run", "--max-steps", "4", "--eval-steps", "100",
                     "--save-steps", "2")
    with pytest.raises(NonFiniteWeightsError, match="by step 2"):
        run_train(llama_train.resolve_train_config(argv),
                              on_trainer=lambda t: t.add_callback(Overflow()))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()
                  if "checkpoint" in p.name) == []


# ---------------------------------------------------------------------------------------------
# 7: out of memory
# ---------------------------------------------------------------------------------------------


def test_guarantee_07_out_of_memory_says_what_to_change_and_keeps_what_was_written(
        work, tiny_llama_dir, reference, monkeypatch):
    # From step 3, a micro-batch of more than 2 rows fails half-way through its backward pass.
    monkeypatch.setenv("LLAMA_SFT_TEST_OOM", "2@3")
    out, text = run_here(argv_for(work, tiny_llama_dir, "oom"), expect=1)
    assert "error: out of memory at step 3 (micro-batch of 4 rows" in text
    for flag in ("--batch-size", "--gradient-accumulation-steps", "--use-4bit",
                 "--gradient-checkpointing", "--max-length", "--auto-batch-backoff"):
        assert flag in text, flag
    assert "newest complete checkpoint: checkpoint-2" in text
    # Nothing already written is lost: the checkpoint and the logged steps are those of the
    # reference run.
    assert verify_manifest(out / "checkpoint-2") is None
    assert loss_steps(out) == loss_steps(reference)[:2]
    assert consumed(out) == consumed(reference)[:2]
    assert not (out / "final_model").exists()


def test_guarantee_07_auto_batch_backoff_keeps_the_effective_batch_and_the_update(
        work, tiny_llama_dir, monkeypatch):
    """From step 3 every micro-batch of more than 1 row runs out of memory in its backward pass:
    the back-off drops the partial gradients, halves 4 -> 2 -> 1 and finishes the run.

    LoRA dropout 0 here: with dropout, smaller micro-batches draw other dropout masks, which no
    split can reproduce. Tolerance: the parts sum the same per-token gradients in another order
    and run the matmuls at other shapes under bf16 autocast (this CPU has bf16), so the runs agree
    to rounding, not bitwise, and Adam's division by sqrt(v) magnifies rounding on near-zero
    gradients. Measured: losses within 1.4e-5 (relative), adapter tensors within 2.6e-3
    (relative L2). Bounds: 1e-4 and 1e-2. Keeping the partial gradients of the failed attempt
    moved losses by up to 1.1e-3 and tensors by 1.2e-2 to 2.8e-1; normalising each part by its
    own tokens, tensors by 2.7e-2 to 3.3e-1."""
    # 5 steps: steps 3-5 run as micro-batches of one row, the slowest part of this file.
    no_dropout, steps = ["--lora-dropout", "0", "--max-steps", "5"], list(range(1, 6))
    ref, _ = run_here(argv_for(work, tiny_llama_dir, "oom-ref", *no_dropout))
    monkeypatch.setenv("LLAMA_SFT_TEST_OOM", "1@3")
    run, text = run_here(argv_for(work, tiny_llama_dir, "oom-backoff", *no_dropout,
                                  "--auto-batch-backoff"))
    assert "out of memory at step 3 on a micro-batch of 4 rows" in text
    assert "out of memory at step 3 on a micro-batch of 2 rows" in text
    assert "on a micro-batch of 1 rows" not in text
    assert text.count("out of memory at step") == 2  # the smaller size was kept afterwards
    assert consumed(run) == consumed(ref)  # the same examples in every optimizer step
    la, lb = loss_steps(ref), loss_steps(run)
    assert [s for s, _ in lb] == [s for s, _ in la] == steps
    assert lb[:2] == la[:2]  # before the first out-of-memory error: identical
    for (step, a), (_, b) in zip(la, lb):
        assert b == pytest.approx(a, rel=1e-4), step
    ta, tb = adapter_tensors(ref / "final_model"), adapter_tensors(run / "final_model")
    assert ta.keys() == tb.keys()
    for k in ta:
        rel = float((tb[k] - ta[k]).norm() / ta[k].norm().clamp_min(1e-12))
        assert rel < 1e-2, (k, rel)
    assert any("lora_B" in k and ta[k].abs().sum() > 0 for k in ta)  # trained, not zeros


def test_guarantee_07_the_cpu_allocators_failure_counts_as_out_of_memory():
    """On a CPU, torch reports a failed allocation as a plain RuntimeError, not
    torch.OutOfMemoryError: the message and the back-off must still see it as out of memory."""
    with pytest.raises(RuntimeError) as failed:
        torch.empty(2**50, dtype=torch.uint8)  # 1 PiB
    assert not isinstance(failed.value, torch.OutOfMemoryError)
    assert is_out_of_memory(failed.value)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


# ---------------------------------------------------------------------------------------------
# 17: a full disk during a checkpoint or final-model save
# ---------------------------------------------------------------------------------------------


def test_guarantee_17_a_full_disk_in_a_checkpoint_save_keeps_the_earlier_ones_and_resume_matches(
        work, tiny_llama_dir, reference, monkeypatch):
    # The save of checkpoint-4 gets ENOSPC half-way through its optimizer file (test hook).
    monkeypatch.setenv("LLAMA_SFT_TEST_DISK_FULL", "ENOSPC@checkpoint-4")
    argv = argv_for(work, tiny_llama_dir, "disk-full")
    out, text = run_here(argv, expect=1)
    err = text[text.index("error: "):]
    # How much a checkpoint takes (the previous one's size), the free space, and what to change.
    assert err.startswith(f"error: not enough disk space to write checkpoint-4 in {out}: it "
                          f"needs about {format_bytes(tree_bytes(out / 'checkpoint-2'))}, ")
    assert "is free on that filesystem" in err
    assert "every earlier checkpoint is intact (newest: checkpoint-2)" in err
    # --save-total-limit 1 keeps one: only space or another folder helps (the flag is named
    # when more are kept: tests/test_disk_full.py).
    assert "--save-total-limit" not in err
    for what in ("Free some space", "another --output-dir", "--resume auto"):
        assert what in err, what
    # The partial save is gone, the earlier checkpoint intact, the lock released.
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert verify_manifest(out / "checkpoint-2") is None
    assert loss_steps(out) == loss_steps(reference)[:4]
    assert not (out / "final_model").exists() and not (out / RUN_LOCK).exists()
    monkeypatch.delenv("LLAMA_SFT_TEST_DISK_FULL")
    run_here(argv + ["--resume", "auto"])
    res = json.loads((out / "train_results.json").read_text())
    assert Path(res["resumed_from"]).name == "checkpoint-2"
    _assert_same_training(out, reference)


def test_guarantee_17_a_full_quota_in_the_final_model_save_keeps_the_checkpoints_and_resume_matches(
        work, tiny_llama_dir, reference, monkeypatch):
    monkeypatch.setenv("LLAMA_SFT_TEST_DISK_FULL", "EDQUOT@final_model")
    argv = argv_for(work, tiny_llama_dir, "quota-final")
    out, text = run_here(argv, expect=1)
    err = text[text.index("error: "):]
    assert err.startswith(f"error: not enough disk space to write final_model/ in {out}: it "
                          "needs about ")
    # This filesystem has room: the message points at the quota.
    assert "the limit reached is a disk quota" in err
    assert f"--resume auto: it continues from checkpoint-{MAX_STEPS}" in err
    assert not (out / "final_model").exists() and not (out / ".final_model.tmp").exists()
    assert not (out / "train_results.json").exists() and not (out / RUN_LOCK).exists()
    assert verify_manifest(out / f"checkpoint-{MAX_STEPS}") is None
    monkeypatch.delenv("LLAMA_SFT_TEST_DISK_FULL")
    run_here(argv + ["--resume", "auto"])
    res = json.loads((out / "train_results.json").read_text())
    assert Path(res["resumed_from"]).name == f"checkpoint-{MAX_STEPS}"
    _assert_same_training(out, reference)
