"""RELIABILITY 18, half-written logs are repaired, never fatal: a JSONL log (metrics.jsonl,
consumed_ids.jsonl, samples.jsonl) whose last line a kill cut short is cut back to its last
complete record on resume, with a notice; no complete record is lost or rewritten. The end to
end case (a training child killed with kill -9, its logs torn, --resume auto matching an
uninterrupted run) is in tests/test_faults.py."""

from __future__ import annotations

import json
import logging

import pytest

from llama_sft.layout import CONSUMED_IDS, METRICS, STEP_LOGS
from llama_sft.training.checkpoints import repair_torn_tail, truncate_step_logs

RECORDS = [{"step": s, "loss": 10.0 - s, "ids": [f"ex-{s}-a", f"ex-{s}-b"]} for s in (1, 2, 3)]
WHOLE = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()


@pytest.fixture
def log(caplog, monkeypatch):
    """caplog on the toolkit's logger, which a stage script's main() run by an earlier module's
    fixture may have left not propagating (conftest restores it per test, after such fixtures)."""
    monkeypatch.setattr(logging.getLogger("llama_sft"), "propagate", True)
    caplog.set_level(logging.INFO, logger="llama_sft")
    return caplog


@pytest.mark.parametrize("tail", [
    b'{"step": 4, "loss": 6.',                  # cut in the middle of a record
    b'{"step": 4, "ids": ["caf\xc3',            # ...and of a UTF-8 character
    b"\x00" * 37,                               # what a crash can leave: zeros, no newline
    b'{"step": 4}\n{"st',                       # a whole record, then a torn one
    b"{\"step\": 4, \"loss\"\n",                # a newline, but not a record
], ids=["mid-record", "mid-character", "zeros", "whole-then-torn", "not-json"])
def test_a_torn_tail_is_cut_and_every_complete_record_kept(tmp_path, log, tail):
    path = tmp_path / METRICS
    path.write_bytes(WHOLE + tail)
    cut = repair_torn_tail(path)
    kept = WHOLE + (b'{"step": 4}\n' if tail.startswith(b'{"step": 4}\n') else b"")
    assert path.read_bytes() == kept  # byte for byte: nothing before the tear is rewritten
    assert cut == len(WHOLE) + len(tail) - len(kept)
    assert f"{METRICS}: cut a half-written last line ({cut} bytes)" in log.text
    assert "every complete record is kept" in log.text


def test_a_whole_log_is_left_alone(tmp_path, log):
    path = tmp_path / CONSUMED_IDS
    path.write_bytes(WHOLE)
    before = path.stat().st_mtime_ns
    assert repair_torn_tail(path) == 0
    assert path.read_bytes() == WHOLE and path.stat().st_mtime_ns == before
    assert log.text == ""
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert repair_torn_tail(empty) == 0


def test_a_log_holding_only_a_torn_line_is_emptied(tmp_path):
    path = tmp_path / METRICS
    path.write_bytes(b'{"step": 1, "lo')
    assert repair_torn_tail(path) == 15
    assert path.read_bytes() == b""


def test_resume_repairs_every_step_log_then_cuts_later_steps(tmp_path, log):
    """truncate_step_logs (run on resume): the torn tail goes with a notice of its own, the
    records after the checkpoint's step go, and what stays is whole; the next record appended
    (the resumed run's) is a line of its own, not glued to the torn one."""
    for name in STEP_LOGS:
        (tmp_path / name).write_bytes(WHOLE + b'{"step": 4, "ids": ["ex-4')
    truncate_step_logs(tmp_path, 2)
    for name in STEP_LOGS:
        assert f"{name}: cut a half-written last line (" in log.text
        assert f"{name}: dropped 1 record(s) after step 2" in log.text
        path = tmp_path / name
        assert [json.loads(line) for line in path.read_text().splitlines()] == RECORDS[:2]
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(RECORDS[2]) + "\n")
        assert [json.loads(line) for line in path.read_text().splitlines()] == RECORDS


def test_resume_at_the_newest_step_keeps_everything_but_the_tear(tmp_path, log):
    path = tmp_path / METRICS
    path.write_bytes(WHOLE + b'{"step": 3, "eval_lo')
    truncate_step_logs(tmp_path, 3)
    assert path.read_bytes() == WHOLE
    assert "dropped" not in log.text and "cut a half-written last line" in log.text
