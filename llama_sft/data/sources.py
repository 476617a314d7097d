"""Where SFT records come from, beside JSONL (data/loader.py reads that itself, line by line):
a `.json` array, Parquet, CSV, a folder written by `datasets`' `save_to_disk`, and a hub dataset
id when the hub can be reached. Each yields `Row`s, the record and where it was, so the loader
validates every source the same way and its errors name `file:line` (CSV, JSON lines) or
`file: row N` (Parquet, a `.json` array, a saved folder, a hub dataset).

Rows are read in batches of ROW_BATCH (Parquet, Arrow), so a large file is never held."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from llama_sft.errors import DatasetError
from llama_sft.files import sha256_file
from llama_sft.hub import hub_offline

ROW_BATCH = 1024
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Fields a CSV cell can only give as JSON text.
JSON_TEXT_FIELDS = ("messages", "conversations")
OPTIONAL_CELLS = ("context", "category", "id")
FORMATS = "JSONL (.jsonl), a JSON array (.json), Parquet (.parquet), CSV (.csv), a folder " \
          "written by datasets' save_to_disk, or a hub dataset id"


@dataclass
class Row:
    """One record of a source: its position (`line` is the line number, or the row number
    from 1) and the parsed value, or None and why it could not be read."""

    where: str
    line: int
    value: Any = None
    problem: str | None = None


def source_kind(path: str | os.PathLike) -> str:
    """"jsonl", "json", "parquet", "csv", "disk" (a save_to_disk folder) or "hub"."""
    p = Path(path)
    if p.is_dir():
        return "disk"
    if not p.exists():
        return "hub" if HUB_ID.match(str(path)) and not str(path).startswith(".") else "missing"
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix == ".json" and _first_byte(p) == b"[":
        return "json"
    return "jsonl"  # .jsonl, and a .json file of JSON lines (common on the hub)


def _first_byte(p: Path) -> bytes:
    with open(p, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1]


def iter_rows(path: str | os.PathLike, kind: str) -> Iterator[Row]:
    """The records of a non-JSONL source, in order."""
    readers = {"json": _json_array_rows, "parquet": _parquet_rows, "csv": _csv_rows,
               "disk": _disk_rows, "hub": _hub_rows}
    return readers[kind](str(path))


def source_sha256(path: str | os.PathLike, kind: str) -> str:
    """The content hash a run records and the tokenized cache is keyed on: the file's sha256;
    for a folder, over its files' names and sha256s; for a hub dataset, its fingerprint."""
    if kind == "hub":
        return "hub:" + _load_hub(str(path))._fingerprint
    p = Path(path)
    if not p.is_dir():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(f"{f.relative_to(p).as_posix()}\0{sha256_file(f)}\0".encode())
    return h.hexdigest()


def _json_array_rows(path: str) -> Iterator[Row]:
    try:
        with open(path, encoding="utf-8-sig") as fh:
            data = json.load(fh)
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not valid UTF-8 (byte {e.start}); re-save it as UTF-8") \
            from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); a "
                           ".json file must hold one JSON array of records (or one JSON object "
                           "per line)") from None
    for i, value in enumerate(data, start=1):
        yield Row(f"{path}: row {i}", i, value)


def _parquet_rows(path: str) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None
    n = 0
    for batch in pf.iter_batches(batch_size=ROW_BATCH):
        for value in batch.to_pylist():
            n += 1
            yield Row(f"{path}: row {n}", n, value)


def _csv_rows(path: str) -> Iterator[Row]:
    """Cells are text: an empty optional cell is an absent field, and `messages` /
    `conversations` cells are JSON text. Undecodable bytes reach the record as lone
    surrogates, which the schema check reports for that line only."""
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        try:
            for record in reader:
                yield _csv_row(path, reader.line_num, record)
        except csv.Error as e:
            raise DatasetError(f"{path}:{reader.line_num}: malformed CSV ({e}); fix the quoting "
                               "of that line") from None


def _csv_row(path: str, line: int, record: dict[Any, Any]) -> Row:
    where = f"{path}:{line}"
    if None in record:
        return Row(where, line, problem="the line has more cells than the header has columns")
    out: dict[str, Any] = {}
    for key, cell in record.items():
        if cell is None or (cell == "" and key in OPTIONAL_CELLS):
            continue  # a short line's missing cells, or an empty optional cell
        if key in JSON_TEXT_FIELDS:
            try:
                cell = json.loads(cell)
            except ValueError:
                return Row(where, line, problem=f"field {key!r} must be JSON text (an array of "
                                                "turns)")
        out[key] = cell
    return Row(where, line, out)


def _disk_rows(path: str) -> Iterator[Row]:
    import datasets

    if not any((Path(path) / name).is_file() for name in ("dataset_info.json", "state.json",
                                                          "dataset_dict.json")):
        raise DatasetError(f"{path}: is a folder, but not one written by datasets' save_to_disk; "
                           f"pass a file or such a folder ({FORMATS})")
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds for a damaged folder
        raise DatasetError(f"{path}: could not read the saved dataset ({_first_line(e)})") \
            from None
    yield from _dataset_rows(path, _train_split(path, ds))


def _train_split(name: str, ds: Any) -> Any:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DatasetError(f"{name}: holds the splits {sorted(ds)} and no 'train' split; save "
                               "the split to train on alone")
        return ds["train"]
    return ds


def _dataset_rows(name: str, ds: Any) -> Iterator[Row]:
    n = 0
    for batch in ds.iter(batch_size=ROW_BATCH):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            n += 1
            yield Row(f"{name}: row {n}", n, dict(zip(columns, values)))


def _load_hub(name: str) -> Any:
    if hub_offline("HF_DATASETS_OFFLINE"):
        raise DatasetError(
            f"{name}: no such file, and as a hub dataset id it cannot be fetched: the hub cannot "
            "be reached (offline). Download it where the hub is reachable, e.g. `python3 -c "
            f"\"import datasets; datasets.load_dataset('{name}', split='train')"
            ".to_json('data.jsonl')\"`, and pass the file with --dataset data.jsonl")
    import datasets

    try:
        return _train_split(name, datasets.load_dataset(name, split="train"))
    except Exception as e:  # noqa: BLE001 - hub errors come in many kinds
        raise DatasetError(f"{name}: could not load the hub dataset ({_first_line(e)}); check "
                           "the id, or pass a local file") from None


def _hub_rows(name: str) -> Iterator[Row]:
    yield from _dataset_rows(name, _load_hub(name))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
