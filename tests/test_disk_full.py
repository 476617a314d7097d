"""RELIABILITY 17, a full disk loses nothing: how a full disk or quota is recognised through the
errors torch, safetensors and tokenizers really raise (each recorded from a write into a full
tmpfs), the message, the checkpoint clean-up, the packaging archive, and the test-only hook.
The end-to-end runs (a checkpoint and a final-model save that fail, then --resume auto matching
an uninterrupted run) are in tests/test_faults.py; the package run in tests/test_package.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from helpers import full_disk_open

from llama_sft import files
from llama_sft.errors import DiskFullError, RunFailed
from llama_sft.files import (
    disk_full_message,
    format_bytes,
    is_disk_full,
    out_of_space,
    verify_manifest,
    write_manifest,
)
from llama_sft.packaging import archive
from llama_sft.training.checkpoints import _save_failed


def _raised_while_handling(outer: Exception, inner: BaseException) -> Exception:
    """`outer` raised inside `except inner:` (its __context__), as the libraries do."""
    try:
        try:
            raise inner
        except BaseException:
            raise outer
    except Exception as e:
        return e


def _enospc(path="f") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


# torch.save(obj, path) into a full tmpfs: no errno anywhere.
TORCH_PATH = _raised_while_handling(
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 220736 vs 220624"),
    RuntimeError("basic_ios::clear: iostream error"))


@pytest.mark.parametrize("exc", [
    _enospc(),
    OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "f"),
    # torch.save(obj, file object): RuntimeError while handling the OSError.
    _raised_while_handling(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected "
                                        "pos 704 vs 598"), _enospc()),
    # safetensors.save_file: its own error class, the errno only in the text.
    RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
    # tokenizers' save (tokenizer.json): a plain Exception.
    Exception("No space left on device (os error 28)"),
    RuntimeError(f"I/O error: {os.strerror(errno.EDQUOT)} (os error {errno.EDQUOT})"),
], ids=["ENOSPC", "EDQUOT", "torch-file-object", "safetensors", "tokenizers", "quota-text"])
def test_is_disk_full_sees_each_librarys_error(exc):
    assert is_disk_full(exc)
    wrapped = RuntimeError("saving the checkpoint failed")
    wrapped.__cause__ = exc
    assert is_disk_full(wrapped)  # through `raise ... from`


@pytest.mark.parametrize("exc", [
    OSError(errno.EIO, "Input/output error", "f"), OSError(errno.EACCES, "Permission denied"),
    RuntimeError("shape mismatch"), TORCH_PATH, ValueError("no space for this field"),
], ids=["EIO", "EACCES", "other", "torch-path-without-errno", "unrelated-text"])
def test_is_disk_full_refuses_other_errors(exc):
    assert not is_disk_full(exc)


def test_is_disk_full_survives_a_cycle_in_the_chain():
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert not is_disk_full(a)
    b.__cause__ = _enospc()
    assert is_disk_full(a)


def test_out_of_space_counts_torchs_errno_less_failure_only_when_the_disk_is_nearly_full(
        tmp_path, monkeypatch):
    monkeypatch.setattr(files, "free_bytes", lambda path: 300_000)
    assert out_of_space(TORCH_PATH, tmp_path, needed_bytes=4_000_000)
    assert not out_of_space(RuntimeError("shape mismatch"), tmp_path, 4_000_000)
    monkeypatch.setattr(files, "free_bytes", lambda path: 50_000_000_000)
    assert not out_of_space(TORCH_PATH, tmp_path, needed_bytes=4_000_000)  # a real I/O error
    assert out_of_space(_enospc(), tmp_path, 4_000_000)  # an errno is believed as it is


def test_disk_full_message_says_what_it_needs_and_what_is_free(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "free_bytes", lambda path: 1_250_000)
    assert disk_full_message("checkpoint-8", tmp_path / "run", 4_000_000) == (
        f"not enough disk space to write checkpoint-8 in {tmp_path / 'run'}: it needs about "
        "4.0 MB, 1.2 MB is free on that filesystem.")
    assert "how much it needs is unknown" in disk_full_message("x", tmp_path, None)
    # More free than needed: the disk is not what is full.
    monkeypatch.setattr(files, "free_bytes", lambda path: 9_000_000_000)
    text = disk_full_message("final_model/", tmp_path, 4_000_000)
    assert "9.0 GB is free" in text and "disk quota" in text and "df -i" in text


def test_format_bytes():
    assert [format_bytes(n) for n in (999, 1000, 4_012_345, 12_100_000_000, 7 * 10**15)] == [
        "999 bytes", "1.0 kB", "4.0 MB", "12.1 GB", "7000.0 TB"]


def _checkpoint(folder: Path, size: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "optimizer.pt").write_bytes(b"o" * size)
    write_manifest(folder)
    return folder


def test_a_failed_save_removes_its_staging_and_names_the_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "free_bytes", lambda path: 1000)
    old = [_checkpoint(tmp_path / f"checkpoint-{s}", 5000) for s in (2, 4)]
    staging = tmp_path / ".checkpoint-6.tmp"
    staging.mkdir()
    (staging / "adapter_model.safetensors").write_bytes(b"a" * 300)
    with pytest.raises(DiskFullError) as failed:
        _save_failed(_enospc(), staging, tmp_path / "checkpoint-6")
    assert isinstance(failed.value, RunFailed)  # exit 1
    text = str(failed.value)
    # A checkpoint takes about what the newest one took (more than what got staged).
    size = format_bytes(sum(p.stat().st_size for p in (tmp_path / "checkpoint-4").iterdir()))
    assert text.startswith(f"not enough disk space to write checkpoint-6 in {tmp_path}: it needs "
                           f"about {size}, 1.0 kB is free")
    assert "every earlier checkpoint is intact (newest: checkpoint-4)" in text
    assert "lower --save-total-limit (2 complete checkpoints are kept now" in text
    assert "--resume auto" in text and "another --output-dir" in text
    assert not staging.exists()
    assert all(verify_manifest(c) is None for c in old)


def test_a_save_failing_for_another_reason_is_left_to_raise_and_cleaned_up(tmp_path):
    staging = tmp_path / ".checkpoint-2.tmp"
    staging.mkdir()
    (staging / "optimizer.pt").write_bytes(b"x")
    assert _save_failed(OSError(errno.EIO, "Input/output error"), staging,
                        tmp_path / "checkpoint-2") is None
    assert not staging.exists()


def test_an_archive_on_a_full_disk_is_removed_and_says_what_it_needs(tmp_path, monkeypatch):
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(20_000))
    (folder / "README.md").write_text("card\n")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(archive, "open", full_disk_open, raising=False)
    with pytest.raises(DiskFullError) as failed:
        archive.create_archive(folder, out / "pkg.tar.gz", mtime=0)
    assert str(failed.value).startswith(
        f"not enough disk space to write the archive pkg.tar.gz in {out}: it needs about 20.0 kB")
    assert "The partial archive was removed" in str(failed.value)
    assert "--output-dir" in str(failed.value)
    assert list(out.iterdir()) == []
    monkeypatch.undo()
    # Another failure is re-raised as it is, and leaves no partial archive either.
    monkeypatch.setattr(archive.tarfile.TarFile, "addfile",
                        lambda *a, **k: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        archive.create_archive(folder, out / "pkg.tar.gz", mtime=0)
    assert list(out.iterdir()) == []
    monkeypatch.undo()
    archive.create_archive(folder, out / "pkg.tar.gz", mtime=0)
    assert [p.name for p in out.iterdir()] == ["pkg.tar.gz"]


def test_the_disk_full_hook_is_test_only_and_checked():
    pytest.importorskip("transformers")
    from llama_sft.training.faults import FaultInjection

    assert FaultInjection.from_env({}).disk_full is None
    hook = FaultInjection.from_env({"LLAMA_SFT_TEST_DISK_FULL": "ENOSPC@checkpoint-4"})
    assert hook.disk_full == (errno.ENOSPC, "checkpoint-4") and hook.active
    hook = FaultInjection.from_env({"LLAMA_SFT_TEST_DISK_FULL": "EDQUOT@final_model"})
    assert hook.disk_full == (errno.EDQUOT, "final_model")
    for bad in ("ENOSPC", "EIO@final_model", "ENOSPC@4", "ENOSPC@checkpoint-x"):
        with pytest.raises(ValueError, match="LLAMA_SFT_TEST_DISK_FULL"):
            FaultInjection.from_env({"LLAMA_SFT_TEST_DISK_FULL": bad})
