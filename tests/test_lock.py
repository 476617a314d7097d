"""RELIABILITY 16, one run per output folder (llama_sft/training/lock.py), with real processes:
a small python holds the lock the way a training run does; a second llama_train.py or
llama_pilot.py into that folder is refused with exit 2 naming it; a kill -9 leaves a lock the
next run takes over with a notice; the lock goes on every exit path. The end-to-end cases with a
training child killed or signalled are in tests/test_faults.py (guarantees 16 and 5)."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import small_golden, tiny_args

import llama_pilot
import llama_train
from llama_sft.errors import EXIT_BAD_INPUT, OutputDirInUse
from llama_sft.layout import RUN_LOCK
from llama_sft.training.lock import LockHolder, output_dir_lock

ROOT = Path(__file__).resolve().parents[1]
HOLDER = textwrap.dedent("""\
    import sys, time
    from llama_sft.training.lock import output_dir_lock
    with output_dir_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(float(sys.argv[3]))
        if sys.argv[4] == "raise":
            raise SystemExit(3)
""")
PROBE = textwrap.dedent("""\
    import sys
    from llama_sft.errors import OutputDirInUse
    from llama_sft.training.lock import output_dir_lock
    try:
        with output_dir_lock(sys.argv[1]):
            pass
    except OutputDirInUse:
        raise SystemExit(9)
""")


@pytest.fixture
def log(caplog, monkeypatch):
    """caplog on the toolkit's logger, which a stage script's main() run by an earlier module's
    fixture may have left not propagating (conftest restores it per test, after such fixtures)."""
    monkeypatch.setattr(logging.getLogger("llama_sft"), "propagate", True)
    caplog.set_level(logging.INFO, logger="llama_sft")
    return caplog


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    return {**env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def hold(tmp_path: Path, folder: Path, marker: str, seconds: float = 600,
         then: str = "exit") -> subprocess.Popen:
    """A process that holds the lock on `folder` (as a run does), once it has printed "held"."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(folder), marker, str(seconds), then],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def lock_is_free(folder: Path) -> bool:
    """Whether another process could take the lock now (it exits 9 when refused)."""
    rc = subprocess.run([sys.executable, "-c", PROBE, str(folder)], env=_env(), timeout=120,
                        cwd=ROOT).returncode
    assert rc in (0, 9), rc
    return rc == 0


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in folder.iterdir()}


@pytest.fixture
def holder(tmp_path):
    out = tmp_path / "run"
    proc = hold(tmp_path, out, "holder-marker-3f9a")
    yield proc, out
    proc.kill()
    proc.wait()


def _assert_names_the_holder(err: str, proc, out: Path) -> None:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    line = errors[0]
    assert f"--output-dir {out} is in use by another run" in line
    assert f"pid {proc.pid} on {socket.gethostname()}, started 20" in line
    assert "holder.py" in line and "holder-marker-3f9a" in line  # its command line
    assert "choose another --output-dir" in line and "Traceback" not in err


def test_guarantee_16_a_second_train_process_is_refused_at_once_naming_the_holder(
        holder, tmp_path, tiny_llama_dir):
    proc, out = holder
    before = snapshot(out)
    assert set(before) == {RUN_LOCK}
    argv = tiny_args(tmp_path, tiny_llama_dir, "run", "--max-steps", "2", "--resume", "auto")
    child = subprocess.run([sys.executable, str(ROOT / "llama_train.py"), *argv], cwd=tmp_path,
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert child.returncode == EXIT_BAD_INPUT, child.stderr[-3000:]
    _assert_names_the_holder(child.stderr, proc, out)
    # Refused before anything was written, and the holder's lock is untouched.
    assert snapshot(out) == before
    assert proc.poll() is None and not lock_is_free(out)
    assert LockHolder.from_json((out / RUN_LOCK).read_text()).pid == proc.pid


@pytest.mark.parametrize("resume", [[], ["--resume", "auto"]], ids=["fresh", "resume"])
def test_guarantee_16_train_and_pilot_in_this_process_are_refused_too(
        holder, tmp_path, tiny_llama_dir, capsys, resume):
    proc, out = holder
    # The live run is training: its outputs are there. A fresh run is still told who holds the
    # folder (not to --resume a run that is running).
    (out / "test.jsonl").write_text('{"instruction": "q", "response": "a"}\n')
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    before = snapshot(out)
    argv = tiny_args(tmp_path, tiny_llama_dir, "run", "--max-steps", "2", *resume)
    assert llama_train.main(argv) == EXIT_BAD_INPUT
    _assert_names_the_holder(capsys.readouterr().err, proc, out)
    pilot = ["--base-model", str(tiny_llama_dir), "--model-size", "135m", "--golden-set",
             str(small_golden(tmp_path)), "--output-dir", str(out), *resume]
    assert llama_pilot.main(pilot) == EXIT_BAD_INPUT
    _assert_names_the_holder(capsys.readouterr().err, proc, out)
    assert snapshot(out) == before


def test_guarantee_16_a_kill9_holders_lock_is_taken_over_with_a_notice(holder, log):
    proc, out = holder
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    # The kernel dropped the lock with the process; the file and its body stay behind.
    assert LockHolder.from_json((out / RUN_LOCK).read_text()).pid == proc.pid
    with output_dir_lock(out):
        assert LockHolder.from_json((out / RUN_LOCK).read_text()).pid == os.getpid()
        assert not lock_is_free(out)
    notice = [r.getMessage() for r in log.records if "took over the lock" in r.getMessage()]
    assert len(notice) == 1 and f"pid {proc.pid} on {socket.gethostname()}" in notice[0]
    assert "holder-marker-3f9a" in notice[0] and "killed or crashed" in notice[0]
    assert not (out / RUN_LOCK).exists() and lock_is_free(out)


def test_guarantee_16_released_after_a_normal_end_an_exception_and_an_exit_code(tmp_path):
    out = tmp_path / "run"
    with output_dir_lock(out):
        assert not lock_is_free(out)
    assert not (out / RUN_LOCK).exists() and lock_is_free(out)
    with pytest.raises(ValueError), output_dir_lock(out):
        assert not lock_is_free(out)
        raise ValueError("the run failed")
    assert not (out / RUN_LOCK).exists() and lock_is_free(out)
    # A process that leaves the `with` by SystemExit(3): the file goes with the lock.
    proc = hold(tmp_path, out, "m", seconds=0, then="raise")
    assert proc.wait(timeout=120) == 3
    assert not (out / RUN_LOCK).exists() and lock_is_free(out)


def test_guarantee_16_a_refused_run_and_a_failed_start_leave_no_folder(holder, tmp_path):
    proc, out = holder
    with pytest.raises(OutputDirInUse):
        with output_dir_lock(out):
            pass
    assert (out / RUN_LOCK).is_file() and proc.poll() is None  # the holder's, untouched
    fresh = tmp_path / "new" / "run"
    with pytest.raises(ValueError), output_dir_lock(fresh):
        raise ValueError("bad data")
    assert not (tmp_path / "new").exists()  # made for the lock, removed with it
    with output_dir_lock(fresh):
        (fresh / "metrics.jsonl").write_text("{}\n")
    assert [p.name for p in fresh.iterdir()] == ["metrics.jsonl"]  # what the run wrote stays


def test_guarantee_16_only_rank_0_takes_the_lock(holder, monkeypatch):
    proc, out = holder
    monkeypatch.setenv("RANK", "1")
    with output_dir_lock(out):  # not refused: rank 0 of this run is the one that holds it
        pass
    assert LockHolder.from_json((out / RUN_LOCK).read_text()).pid == proc.pid
    other = out.parent / "rank1"
    with output_dir_lock(other):
        assert not (other / RUN_LOCK).exists()


def test_nested_holds_in_one_process_share_the_lock(tmp_path):
    out = tmp_path / "run"
    with output_dir_lock(out):
        with output_dir_lock(out):  # the stage script and the library both hold it
            pass
        assert (out / RUN_LOCK).is_file() and not lock_is_free(out)
    assert not (out / RUN_LOCK).exists()


def test_a_lock_file_its_holder_removed_is_not_locked_again(tmp_path, monkeypatch):
    """A run that opened the lock file just before its holder finished (and removed it) must
    lock the new file, not the removed one another run may also hold."""
    from llama_sft.training import lock

    out = tmp_path / "run"
    out.mkdir()
    real_open, opened = os.open, []

    def open_then_holder_finishes(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        if not opened:
            opened.append(path)
            os.unlink(path)  # the holder's release, between our open and our flock
        return fd

    monkeypatch.setattr(lock.os, "open", open_then_holder_finishes)
    with output_dir_lock(out):
        assert len(opened) == 1 and (out / RUN_LOCK).is_file()
        st = os.stat(out / RUN_LOCK)
        held = lock._HELD[str(out.resolve())]
        assert (os.fstat(held.fd).st_ino, os.fstat(held.fd).st_dev) == (st.st_ino, st.st_dev)
