"""The validating loader: every malformed line (or row, for the other formats of
data/sources.py) is an error naming file:line and why (never its content), or skipped and
counted with --skip-invalid."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from llama_sft.data.schemas import Example, normalize_record, parse_field_map
from llama_sft.data.sources import Row, iter_rows, source_kind, source_sha256
from llama_sft.errors import DatasetError

logger = logging.getLogger("llama_sft")



MAX_LINE_BYTES = 1 << 20  # 1 MiB: a longer line is almost surely not one SFT example


@dataclass
class LoadStats:
    rows: int = 0
    skipped_invalid: int = 0
    skipped_reasons: Counter = field(default_factory=Counter)


def load_examples(path: str | os.PathLike, *, field_map: str | dict | None = None,
                  skip_invalid: bool = False, max_line_bytes: int = MAX_LINE_BYTES,
                  stats: LoadStats | None = None) -> list[Example]:
    """Read and validate a JSONL file. Raises DatasetError naming `file:line` and the reason;
    with skip_invalid, bad lines are skipped and counted in `stats` instead."""
    return list(iter_examples(path, field_map=field_map, skip_invalid=skip_invalid,
                              max_line_bytes=max_line_bytes, stats=stats))


def iter_examples(path: str | os.PathLike, *, field_map: str | dict | None = None,
                  skip_invalid: bool = False, max_line_bytes: int = MAX_LINE_BYTES,
                  stats: LoadStats | None = None) -> Iterator[Example]:
    """load_examples one line at a time: the same checks, errors and counts, holding one line
    and one example at a time (the dataset report streams through it)."""
    p = _input_file(path)
    fmap = parse_field_map(field_map) if isinstance(field_map, (str, type(None))) else field_map
    stats = stats if stats is not None else LoadStats()

    def bad(where: str, reason: str) -> None:
        if not skip_invalid:
            raise DatasetError(f"{where}: {reason}. Fix the line, or pass --skip-invalid "
                               "to skip and count bad lines")
        stats.skipped_invalid += 1
        stats.skipped_reasons[reason.split(":")[0].split(" (")[0]] += 1

    kind = source_kind(path)
    rows = _jsonl_rows(p, str(path), max_line_bytes, skip_invalid) if kind == "jsonl" \
        else iter_rows(path, kind)
    for row in rows:
        ex, reason = None, row.problem
        if reason is None:
            try:
                ex = normalize_record(row.value, fmap)
            except ValueError as e:
                reason = str(e)
        if reason is not None:
            bad(row.where, reason)
            continue
        ex.line = row.line
        stats.rows += 1
        yield ex


def _jsonl_rows(p: Path, name: str, max_line_bytes: int, skip_invalid: bool) -> Iterator[Row]:
    """The JSON value of each non-blank line, or why the line is not one."""
    for lineno, raw in _raw_lines(p, max_line_bytes):
        where = f"{name}:{lineno}"
        if raw is None:
            yield Row(where, lineno, problem=f"line longer than {max_line_bytes} bytes")
            continue
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            if not skip_invalid:
                raise DatasetError(f"{name}:1: file starts with a UTF-8 byte-order mark (BOM); "
                                   "re-save it as UTF-8 without BOM")
            raw = raw[3:]
        if not raw.strip():
            continue
        obj, reason = _decode_json(raw)
        yield Row(where, lineno, obj, reason)


def _input_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists() and source_kind(path) != "hub":
        raise DatasetError(f"{path}: file not found (the sample data is in ./sft_output/; "
                           f"regenerate it with `python3 sft_output/make_sample_data.py`)")
    return p


def _raw_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) per line; None for a line over max_line_bytes, whose rest is
    skipped without being held in memory."""
    with open(path, "rb") as fh:
        lineno = 0
        while True:
            raw = fh.readline(max_line_bytes + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                while True:
                    chunk = fh.readline(1 << 20)
                    if not chunk or chunk.endswith(b"\n"):
                        break
                yield lineno, None
            else:
                yield lineno, raw


def _decode_json(raw: bytes) -> tuple[Any, str | None]:
    """The JSON value of one line, or None and the reason it is not valid JSON text."""
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte {e.start})"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        what = "truncated JSON" if "Unterminated" in e.msg or "Expecting" in e.msg and \
            e.pos >= len(text.rstrip()) - 1 else "invalid JSON"
        return None, f"{what} ({e.msg} at column {e.colno})"
    except RecursionError:
        return None, "JSON nested too deeply"
    except ValueError:
        # Not a JSONDecodeError: an integer longer than sys.get_int_max_str_digits().
        return None, "invalid JSON (a number has too many digits)"


def file_sha256(path: str | os.PathLike) -> str:
    """The data's content hash: a file's sha256, or a folder's or hub dataset's
    (data/sources.py)."""
    return source_sha256(path, source_kind(path))


def load_and_validate(path: str, *, field_map: str | None = None, skip_invalid: bool = False,
                      what: str = "--dataset") -> tuple[list[Example], LoadStats]:
    stats = LoadStats()
    examples = load_examples(path, field_map=field_map, skip_invalid=skip_invalid, stats=stats)
    if stats.skipped_invalid:
        logger.warning("%s %s: skipped %d invalid line(s): %s", what, path, stats.skipped_invalid,
                       dict(stats.skipped_reasons))
    if not examples:
        raise no_examples_error(what, path, stats)
    return examples, stats


def golden_set_examples(cfg: Any) -> list[Example]:
    """--golden-set's examples, validated like --dataset (with the stage's --field-map and
    --skip-invalid); none without the flag."""
    if not cfg.golden_set:
        return []
    examples, _ = load_and_validate(cfg.golden_set, field_map=cfg.field_map,
                                    skip_invalid=cfg.skip_invalid, what="--golden-set")
    return examples


def no_examples_error(what: str, path: str | os.PathLike, stats: LoadStats) -> DatasetError:
    if stats.skipped_invalid:
        return DatasetError(f"{what} {path}: no valid examples: all {stats.skipped_invalid} "
                            f"non-blank line(s) were invalid and skipped "
                            f"({dict(stats.skipped_reasons)}); run without --skip-invalid to "
                            "see the first bad line and why")
    return DatasetError(f"{what} {path}: no valid examples: the file is empty or holds only "
                        "blank lines; it needs one JSON object per line with 'instruction' and "
                        "'response'")
