"""The tokenized dataset cache: a data file is validated and tokenized once, into Arrow files
that every later run, `--resume` and rank memory-maps instead of tokenizing again.

    <cache dir>/tokenized/<key>/data/     datasets' save_to_disk: one row per valid example
    <cache dir>/tokenized/<key>/meta.json the key's parts, counts, the dataset hash

The key hashes everything that changes the rows (KEY_FIELDS: the data's sha256, the field map,
--skip-invalid, the tokenizer's vocabulary, special tokens and chat template, the prompt format,
--max-length, the label mode, CACHE_FORMAT). A build runs in a temporary folder beside the final
one and is renamed into place when complete, so a killed build is never found; a folder that
does not open, or whose row count differs from its meta.json, is rebuilt with a warning. Two
builders of one key (two nodes on a shared disk) both finish; the first rename wins.

Every valid example is a row, also one that tokenization drops (`dropped`): the hash-based
splits, golden-set removal and duplicate removal are decided on columns when the cache is
opened (`bucket`, `first`, `content_hash`), so they can change without a rebuild and give
exactly what data/splits.py gives on the examples. `record` keeps each example as JSON for the
few that are read back as examples (the test split file, sample prompts)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from llama_sft.data.loader import LoadStats, file_sha256, iter_examples, no_examples_error
from llama_sft.data.schemas import Example, normalize_record
from llama_sft.data.splits import bucket, warn_golden_overlap
from llama_sft.data.tokenize import Encoder, Fitted, TokenizeStats, fit_examples
from llama_sft.errors import DatasetError, DiskFullError, ToolkitError
from llama_sft.files import disk_full_message, out_of_space, tree_bytes

if TYPE_CHECKING:
    from llama_sft.data.batching import ArrowRows

logger = logging.getLogger("llama_sft")

CACHE_FORMAT = 1
META = "meta.json"
DATA = "data"
MAP_BATCH = 1000
KEY_FIELDS = ("format", "data_sha256", "field_map", "skip_invalid", "tokenizer", "prompt_format",
              "max_length", "label_mode")
# What a training row is made of (the rest are for splits, statistics and read-back).
ROW_COLUMNS = ["input_ids", "labels", "length", "prompt_length", "id", "category",
               "content_hash"]


def default_cache_dir() -> Path:
    """$LLAMA_SFT_CACHE (default ~/.cache/llama_sft), where the embedded model is kept too."""
    return Path(os.environ.get("LLAMA_SFT_CACHE") or Path.home() / ".cache" / "llama_sft")


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides token ids and labels: the vocabulary and merges (the fast
    tokenizer's serialization), added and special tokens, and the chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(json.dumps({"class": type(tokenizer).__name__,
                         "special": {k: str(v) for k, v in
                                     sorted(tokenizer.special_tokens_map.items())},
                         "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id,
                         "added": sorted(tokenizer.get_added_vocab().items()),
                         "template": getattr(tokenizer, "chat_template", None)},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


@dataclass
class CacheSpec:
    """What a cache is built from and for."""

    dataset: str
    tokenizer: Any
    prompt_format: str  # resolved: "chat" or "instruction"
    max_length: int
    label_mode: str = "all"
    field_map: str | None = None
    skip_invalid: bool = False
    cache_dir: str | os.PathLike | None = None
    num_proc: int | None = None

    @classmethod
    def for_args(cls, cfg: Any, dataset: str, tokenizer, prompt_format: str) -> "CacheSpec":
        """The spec a stage's flags give (--max-length, --last-turn-only, --field-map,
        --skip-invalid, --cache-dir, --num-proc): training, the pilot's projection and
        `llama_dataset.py --prepare` must agree on it to share a cache."""
        return cls(dataset=dataset, tokenizer=tokenizer, prompt_format=prompt_format,
                   max_length=cfg.max_length, label_mode=cfg.label_mode,
                   field_map=cfg.field_map, skip_invalid=cfg.skip_invalid,
                   cache_dir=cfg.cache_dir, num_proc=cfg.num_proc)

    def key_parts(self, data_sha256: str) -> dict[str, Any]:
        return {"format": CACHE_FORMAT, "data_sha256": data_sha256,
                "field_map": self.field_map or "", "skip_invalid": self.skip_invalid,
                "tokenizer": tokenizer_fingerprint(self.tokenizer),
                "prompt_format": self.prompt_format, "max_length": self.max_length,
                "label_mode": self.label_mode}

    def root(self) -> Path:
        return Path(self.cache_dir or default_cache_dir()) / "tokenized"


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


class TokenizedCache:
    """An opened cache: the rows memory-mapped (`ds`), their meta, and the split decision."""

    def __init__(self, path: Path, meta: dict[str, Any], ds, *, hit: bool):
        self.path, self.meta, self.ds, self.hit = path, meta, ds, hit

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def rows(self) -> int:
        return self.meta["rows"]

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def column(self, name: str):
        """A whole column as a numpy array (numbers are zero-copy from the mapped file)."""
        return self.ds.data.column(name).to_numpy()

    def examples(self, indices: Sequence[int]) -> Iterator[Example]:
        """The examples at `indices`, read back from their JSON record."""
        for start in range(0, len(indices), MAP_BATCH):
            part = self.ds.select(indices[start:start + MAP_BATCH]) \
                .select_columns(["record", "line"])
            for rec, line in zip(part["record"], part["line"]):
                ex = normalize_record(json.loads(rec), {})
                ex.line = line
                yield ex

    def stats(self, indices) -> TokenizeStats:
        """What tokenize_examples counts in its stats for the examples at `indices`."""
        import numpy as np

        col = {name: self.column(name)[indices] for name in
               ("dropped", "context_truncated", "response_truncated", "exchanges_dropped",
                "supervised", "length")}
        kept = ~col["dropped"]
        return TokenizeStats(
            examples_in=len(indices), examples_out=int(kept.sum()),
            context_truncated=int(col["context_truncated"].sum()),
            response_truncated=int(col["response_truncated"][kept].sum()),
            dropped_no_supervised_tokens=int(col["dropped"].sum()),
            supervised_tokens=int(col["supervised"][kept].sum(dtype=np.int64)),
            total_tokens=int(col["length"][kept].sum(dtype=np.int64)),
            conversations_shortened=int((col["exchanges_dropped"] > 0).sum()),
            exchanges_dropped=int(col["exchanges_dropped"].sum(dtype=np.int64)))

    def split(self, *, val_ratio: float, test_ratio: float,
              golden: Sequence[Example] = ()) -> tuple[dict[str, Any], dict[str, int]]:
        """Example indices of each split, in file order, and what was removed: the same as
        split_examples on the examples (golden-set rows first, then repeats of a row)."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        b, first = self.column("bucket"), self.column("first")
        in_golden = np.zeros(len(b), dtype=bool)
        if golden:
            hashes = pa.array(sorted({g.content_hash for g in golden}))
            in_golden = pc.is_in(self.ds.data.column("content_hash"),
                                 value_set=hashes).to_numpy(zero_copy_only=False)
        kept = first & ~in_golden
        splits = {"val": np.flatnonzero(kept & (b < val_ratio)),
                  "test": np.flatnonzero(kept & (b >= val_ratio) & (b < val_ratio + test_ratio)),
                  "train": np.flatnonzero(kept & (b >= val_ratio + test_ratio))}
        counts = {"golden_overlap": int(in_golden.sum()),
                  "duplicates": int((~first & ~in_golden).sum())}
        removed = {k: v for k, v in counts.items() if v}
        warn_golden_overlap(counts["golden_overlap"])
        return splits, removed

    def training_rows(self, indices) -> "ArrowRows":
        """The rows at `indices` that tokenization kept, as a torch-style dataset."""
        from llama_sft.data.batching import ArrowRows

        keep = indices[~self.column("dropped")[indices]]
        return ArrowRows(self.ds.select_columns(ROW_COLUMNS), keep, self.column("length")[keep])


# --------------------------------------------------------------------------------------------
# Open or build
# --------------------------------------------------------------------------------------------


def open_or_build(spec: CacheSpec) -> TokenizedCache:
    """The cache for `spec`: opened memory-mapped when a complete one exists (nothing is
    tokenized), else built. Under torchrun / accelerate, the first process of each machine
    builds while the others wait, then all open the same files."""
    data_sha = file_sha256(spec.dataset)
    parts = spec.key_parts(data_sha)
    key = cache_key(parts)
    final = spec.root() / key
    with _local_main_process_first():
        cache = _open(final, key)
        if cache is None:
            _build(spec, parts, key, final)
            cache = _open(final, key, hit=False)
            if cache is None:
                raise DatasetError(f"the tokenized cache {final} could not be opened right after "
                                   "it was built; check the disk, or pass another --cache-dir")
    logger.info("tokenized cache %s: %d rows, %s", "hit" if cache.hit else "built",
                cache.rows, final)
    return cache


def _open(final: Path, key: str, hit: bool = True) -> TokenizedCache | None:
    """The complete cache at `final`, or None (absent; corrupt ones are removed, with a
    warning, for a rebuild)."""
    if not final.is_dir():
        return None
    import datasets

    try:
        meta = json.loads((final / META).read_text(encoding="utf-8"))
        ds = datasets.load_from_disk(str(final / DATA))
        if meta.get("key") != key or len(ds) != meta.get("rows"):
            raise ValueError(f"{len(ds)} rows where meta.json says {meta.get('rows')}")
        ds.data.column("length")  # reads the schema of every Arrow file
    except Exception as e:  # noqa: BLE001 - any damage means: rebuild
        logger.warning("tokenized cache %s is damaged (%s); rebuilding it", final,
                       str(e).splitlines()[0] if str(e) else type(e).__name__)
        shutil.rmtree(final, ignore_errors=True)
        return None
    return TokenizedCache(final, meta, ds, hit=hit)


def _build(spec: CacheSpec, parts: dict[str, Any], key: str, final: Path) -> None:
    import datasets

    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(final.parent)
    staging = final.parent / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    logger.info("tokenized cache miss: validating and tokenizing %s into %s", spec.dataset, final)
    datasets.disable_progress_bars()  # the toolkit logs each phase; a terminal gets the map's bar
    try:
        raw, load = _validated(spec, staging)
        num_proc = _num_proc(spec.num_proc, len(raw))
        logger.info("validated %d rows in %.1f s; tokenizing with %d process(es)", len(raw),
                    time.perf_counter() - t0, num_proc)
        if sys.stderr.isatty():
            datasets.enable_progress_bars()
        rows = raw.map(_tokenize_batch, batched=True, batch_size=MAP_BATCH,
                       num_proc=num_proc if num_proc > 1 else None,
                       fn_kwargs={"tokenizer": spec.tokenizer, "prompt_format": spec.prompt_format,
                                  "label_mode": spec.label_mode, "max_length": spec.max_length},
                       features=_features(), new_fingerprint=key + "-rows",
                       cache_file_name=str(staging / "work" / "rows.arrow"))
        datasets.disable_progress_bars()
        rows.save_to_disk(str(staging / DATA), num_shards=max(1, num_proc))
        del raw, rows
        shutil.rmtree(staging / "work", ignore_errors=True)
        meta = {"key": key, "parts": parts, "rows": load["rows"],
                "skipped_invalid": load["skipped_invalid"],
                "skipped_reasons": load["skipped_reasons"], "dataset_hash": load["dataset_hash"],
                "source": str(spec.dataset), "built_seconds": round(time.perf_counter() - t0, 2),
                "num_proc": num_proc, "datasets_version": datasets.__version__}
        (staging / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _rename_into_place(staging, final)
    except BaseException as e:
        written = tree_bytes(staging)
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, Exception) and out_of_space(e, final.parent):
            raise _disk_full(spec, final, written) from e
        raise


# A cache takes about this many times its data file (the rows as JSON, token ids and labels as
# int32, the columns; 3.8x on the GSM8K rows of bench/bench_loader.py);
# during a build the tokenize pass's work file sits beside the result.
_CACHE_OVER_FILE = 4


def _disk_full(spec: CacheSpec, final: Path, written: int) -> DiskFullError:
    # tree_bytes: 0 for a hub dataset id (nothing local to size it by).
    needed = max(written, _CACHE_OVER_FILE * 2 * tree_bytes(spec.dataset)) or None
    return DiskFullError(
        disk_full_message("the tokenized dataset cache", final.parent, needed)
        + " The partial cache was removed and no earlier cache was touched. Free some space "
        "there, or pass --cache-dir on a disk with room (or set LLAMA_SFT_CACHE).")


def _rename_into_place(staging: Path, final: Path) -> None:
    try:
        os.rename(staging, final)
    except OSError:
        if not (final / META).is_file():
            raise
        # Another process (another node on a shared disk) finished the same key first.
        shutil.rmtree(staging, ignore_errors=True)


def _remove_stale_builds(root: Path, older_than_s: float = 24 * 3600) -> None:
    """Temporary folders of builds that were killed: removed once a day old (a live build on
    another node may be using a younger one)."""
    now = time.time()
    for p in root.glob(".*.tmp-*"):
        try:
            if now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _num_proc(asked: int | None, rows: int) -> int:
    if asked:
        return max(1, min(asked, rows))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # A process pool costs ~1-2 s to start: small files tokenize in this process.
    return 1 if rows < 20_000 else max(1, min(cores or 1, 8))


# --------------------------------------------------------------------------------------------
# The two passes: validate (this process), tokenize (Dataset.map)
# --------------------------------------------------------------------------------------------


def _validated(spec: CacheSpec, staging: Path):
    """The validation pass into an Arrow dataset: one row per valid example, with what the
    splits need; and the load counts. Holds one example at a time (and one 16-byte digest per
    distinct example, to mark repeats)."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    load: dict[str, Any] = {}
    try:
        raw = datasets.Dataset.from_generator(
            _records, gen_kwargs={"spec": spec, "out": load}, cache_dir=str(staging / "work"),
            features=_raw_features(), fingerprint=cache_key({"validated": spec.dataset,
                                                              "t": time.time_ns()}))
    except DatasetGenerationError as e:
        # datasets wraps what the generator raised: a bad line is our own error, as is.
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ToolkitError):
            raise cause from None
        raise
    except ValueError:
        if load.get("rows") != 0:
            raise  # datasets refuses a generator that yields nothing: ours is said below
    if not load.get("rows"):
        raise no_examples_error("--dataset", spec.dataset, load.get("stats") or LoadStats())
    return raw, load


def _records(spec: CacheSpec, out: dict[str, Any]):
    stats = LoadStats()
    seen: set[bytes] = set()
    all_hashes = hashlib.sha256()  # == splits.dataset_hash(examples)
    for ex in iter_examples(spec.dataset, field_map=spec.field_map,
                            skip_invalid=spec.skip_invalid, stats=stats):
        h = ex.content_hash
        all_hashes.update(h.encode())
        digest = bytes.fromhex(h[:32])
        first = digest not in seen
        seen.add(digest)
        yield {"record": json.dumps(ex.to_dict(), ensure_ascii=False), "line": ex.line,
               "content_hash": h, "bucket": bucket(h), "first": first}
    if stats.skipped_invalid:
        logger.warning("--dataset %s: skipped %d invalid line(s): %s", spec.dataset,
                       stats.skipped_invalid, dict(stats.skipped_reasons))
    out.update(rows=stats.rows, skipped_invalid=stats.skipped_invalid, stats=stats,
               skipped_reasons=dict(stats.skipped_reasons),
               dataset_hash=all_hashes.hexdigest()[:16])


def _tokenize_batch(batch: dict[str, list], *, tokenizer, prompt_format: str, label_mode: str,
                    max_length: int) -> dict[str, list]:
    examples = []
    for rec, line in zip(batch["record"], batch["line"]):
        ex = normalize_record(json.loads(rec), {})
        ex.line = line
        examples.append(ex)
    fitted = fit_examples(Encoder(tokenizer, prompt_format, label_mode), examples, max_length)
    return _columns(fitted)


def _columns(fitted: list[Fitted]) -> dict[str, list]:
    out: dict[str, list] = {name: [] for name in _features() if name not in _raw_features()}
    for f in fitted:
        row = f.row() if f.enc is not None else {"input_ids": [], "labels": [], "length": 0,
                                                  "prompt_length": 0, "id": f.example.id,
                                                  "category": f.example.category}
        for name in ("input_ids", "labels", "length", "prompt_length", "id", "category"):
            out[name].append(row[name])
        out["supervised"].append(f.enc.supervised if f.enc is not None else 0)
        out["dropped"].append(f.enc is None)
        out["full_length"].append(f.full_length)
        out["full_supervised"].append(f.full_supervised)
        out["context_truncated"].append(f.context_truncated)
        out["response_truncated"].append(f.response_truncated)
        out["exchanges_dropped"].append(f.exchanges_dropped)
        out["assistant_turns"].append(f.example.assistant_turns)
    return out


def _raw_features():
    from datasets import Features, Value

    return Features({"record": Value("string"), "line": Value("int64"),
                     "content_hash": Value("string"), "bucket": Value("float64"),
                     "first": Value("bool")})


def _features():
    from datasets import Features, List, Value

    f = dict(_raw_features())
    f.update({"input_ids": List(Value("int32")), "labels": List(Value("int32")),
              "length": Value("int32"), "prompt_length": Value("int32"), "id": Value("string"),
              "category": Value("string"), "supervised": Value("int32"), "dropped": Value("bool"),
              "full_length": Value("int32"), "full_supervised": Value("int32"),
              "context_truncated": Value("bool"), "response_truncated": Value("bool"),
              "exchanges_dropped": Value("int32"), "assistant_turns": Value("int32")})
    return Features(f)


# --------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------


def _local_main_process_first():
    """accelerate's local_main_process_first under torchrun / accelerate launch (the process
    group is set up here if it is not yet); nothing to wait for in a single process."""
    import contextlib

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return contextlib.nullcontext()
    import torch
    from accelerate import PartialState

    # cpu=True where there is no GPU: without it, accelerate sees no distributed run on a CPU
    # under torchrun (DistributedType.NO) and every rank would build (the training arguments
    # set up the same MULTI_CPU state later).
    return PartialState(cpu=not torch.cuda.is_available()).local_main_process_first()
