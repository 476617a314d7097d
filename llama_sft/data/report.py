"""The dataset report of `llama_dataset.py --report`: counts, categories, token lengths,
truncation, duplicates and splits, computed in a streaming pass."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from array import array
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from llama_sft.data.loader import (
    LoadStats,
    file_sha256,
    golden_set_examples,
    iter_examples,
    no_examples_error,
)
from llama_sft.data.schemas import Example
from llama_sft.data.splits import SplitAssigner
from llama_sft.data.tokenize import Encoder, TokenizeStats, tokenize_examples
from llama_sft.errors import ConfigError, DatasetError
from llama_sft.files import output_file_problem, same_file, write_text_atomic
from llama_sft.modeling.load import load_tokenizer, resolve_base_model

logger = logging.getLogger("llama_sft")


def percentiles(values: Sequence[int], qs: Iterable[int] = (50, 90, 95, 99)) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    out = {}
    for q in qs:
        k = (len(s) - 1) * q / 100
        lo, hi = math.floor(k), math.ceil(k)
        out[f"p{q}"] = float(s[lo] + (s[hi] - s[lo]) * (k - lo))
    out["max"] = float(s[-1])
    out["mean"] = round(sum(s) / len(s), 1)
    return out


REPORT_CHUNK = 1024  # examples rendered and tokenized at a time by the report


@dataclass
class _Tally:
    """What the report keeps across chunks: two arrays of token lengths (4 bytes per example
    each), one content hash per distinct example (in the split assigner) and counters."""

    encoder: Encoder
    max_length: int
    assigner: SplitAssigner
    prompt_lengths: array = field(default_factory=lambda: array("I"))
    response_lengths: array = field(default_factory=lambda: array("I"))
    categories: Counter = field(default_factory=Counter)
    turns: Counter = field(default_factory=Counter)
    splits: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0, "test": 0})
    all_hashes: Any = field(default_factory=hashlib.sha256)  # == dataset_hash(examples)
    over_stats: TokenizeStats = field(default_factory=TokenizeStats)
    would_truncate: int = 0
    examples: int = 0

    def add(self, chunk: list[Example]) -> None:
        encoded = self.encoder.encode(chunk)
        over = []
        for ex, enc in zip(chunk, encoded):
            h = ex.content_hash
            self.all_hashes.update(h.encode())
            self.categories[ex.category] += 1
            self.turns[ex.assistant_turns] += 1
            name = self.assigner.assign(h)
            if name is not None:
                self.splits[name] += 1
            if len(enc.ids) > self.max_length:
                over.append(ex)
            self.response_lengths.append(enc.supervised)
            self.prompt_lengths.append(len(enc.ids) - enc.supervised)
        self.examples += len(chunk)
        self.would_truncate += len(over)
        # Count drops the way training will: the context is cut first, so a long prompt is
        # only dropped when even the instruction leaves no room (tokenize only the long ones).
        tokenize_examples(over, self.encoder.tokenizer, max_length=self.max_length,
                          prompt_format=self.encoder.format, label_mode=self.encoder.label_mode,
                          stats=self.over_stats)


def build_report(examples: Iterable[Example], tokenizer, *, path: str, max_length: int,
                 prompt_format: str, val_ratio: float, test_ratio: float,
                 golden: Sequence[Example] = (), load_stats: LoadStats | None = None,
                 label_mode: str = "all") -> dict[str, Any]:
    """Counts, token-length percentiles, truncation, duplicates and split sizes of `examples`.

    One pass that streams: `examples` may be a generator (iter_examples), and only REPORT_CHUNK
    examples, their renders and token ids are held at a time (see _Tally for what is kept).
    Response tokens are the supervised ones (every assistant turn with its turn end, or the
    last with label_mode "last"); prompt tokens the rest."""
    tally = _Tally(Encoder(tokenizer, prompt_format, label_mode), max_length,
                   SplitAssigner(val_ratio=val_ratio, test_ratio=test_ratio, golden=golden))
    for chunk in _chunks(examples, REPORT_CHUNK):
        tally.add(chunk)
    removed = tally.assigner.finish()
    load_stats = load_stats or LoadStats(rows=tally.examples)
    p_len, r_len = tally.prompt_lengths, tally.response_lengths
    return {
        "dataset": str(path),
        "file_sha256": file_sha256(path),
        "dataset_hash": tally.all_hashes.hexdigest()[:16],
        "examples": tally.examples,
        "skipped_invalid": load_stats.skipped_invalid,
        "skipped_reasons": dict(load_stats.skipped_reasons),
        "categories": dict(sorted(tally.categories.items())),
        "prompt_format": tally.encoder.format,
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "max_length": max_length,
        "prompt_tokens": percentiles(p_len),
        "response_tokens": percentiles(r_len),
        "total_tokens": percentiles([a + b for a, b in zip(p_len, r_len)]),
        "would_truncate": tally.would_truncate,
        "would_drop_no_supervised_tokens": tally.over_stats.dropped_no_supervised_tokens,
        "would_shorten_conversations": tally.over_stats.conversations_shortened,
        "would_drop_exchanges": tally.over_stats.exchanges_dropped,
        "assistant_turns": {str(k): v for k, v in sorted(tally.turns.items())},
        "label_mode": label_mode,
        # As split_examples counts them: a repeated golden-set row is golden overlap (every
        # copy), not a duplicate, so splits == examples - duplicates - golden overlap.
        "duplicate_examples": removed.get("duplicates", 0),
        "golden_overlap": removed.get("golden_overlap", 0),
        "splits": tally.splits,
        "split_ratios": {"val": val_ratio, "test": test_ratio},
    }


def _chunks(items: Iterable[Example], size: int) -> Iterator[list[Example]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def format_report(r: dict[str, Any]) -> str:
    def pct(d: dict[str, float]) -> str:
        return "  ".join(f"{k} {v:g}" for k, v in d.items())

    lines = [
        f"Dataset {r['dataset']}  (hash {r['dataset_hash']})",
        f"  examples: {r['examples']}   skipped invalid: {r['skipped_invalid']}"
        + (f" {r['skipped_reasons']}" if r["skipped_reasons"] else ""),
        "  categories: " + ", ".join(f"{k} {v}" for k, v in r["categories"].items()),
        f"  prompt format: {r['prompt_format']}   tokenizer: {r['tokenizer']}",
        f"  prompt tokens:   {pct(r['prompt_tokens'])}",
        f"  response tokens: {pct(r['response_tokens'])}  (supervised: every "
        f"{'' if r['label_mode'] == 'all' else 'last '}assistant turn with its end token)",
        f"  total tokens:    {pct(r['total_tokens'])}",
        "  assistant turns per example: " + ", ".join(
            f"{k}: {v}" for k, v in r["assistant_turns"].items()),
        f"  over --max-length {r['max_length']}: {r['would_truncate']} would be truncated, "
        f"{r['would_drop_no_supervised_tokens']} would be dropped (no room for the response)"
        + (f"; {r['would_shorten_conversations']} conversations would lose "
           f"{r['would_drop_exchanges']} earliest exchanges in all"
           if r["would_shorten_conversations"] else ""),
        f"  duplicates: {r['duplicate_examples']}   golden-set overlap: {r['golden_overlap']}",
        "  splits: " + ", ".join(f"{k} {v}" for k, v in r["splits"].items()),
    ]
    return "\n".join(lines)


REPORT_KEYS = ("dataset", "dataset_hash", "examples", "splits")


def check_report_output(output: str, cfg: Any) -> dict[str, Any] | None:
    """Refuse an --output that would destroy something that is not a report (the dataset
    itself, a folder, any other file); return the earlier report found there, if any."""

    for flag, given in (("--dataset", cfg.dataset), ("--golden-set", cfg.golden_set)):
        if same_file(output, given):
            raise ConfigError(f"--output {output} is the {flag} file: writing the report there "
                              "would destroy it; choose another --output (e.g. report.json)")
    problem = output_file_problem("--output", output, example="report.json")
    if problem:
        raise ConfigError(problem)
    p = Path(output)
    if not p.exists():
        return None
    earlier = None
    if p.is_file() and p.stat().st_size < (4 << 20):
        try:
            earlier = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            earlier = None
    if not (isinstance(earlier, dict) and all(k in earlier for k in REPORT_KEYS)):
        raise ConfigError(f"--output {output} exists and is not a report written by "
                          "llama_dataset.py; choose another --output (the file was left as it "
                          "was)")
    return earlier


def run_report(cfg: Any, output: str | None = None) -> dict[str, Any]:
    """The report on --dataset, streaming: a first pass validates every line without holding
    the examples (a bad line fails here, before a tokenizer is loaded); the second renders and
    tokenizes REPORT_CHUNK examples at a time. Peak memory does not grow with the file beyond
    two 4-byte lengths and one content hash per example."""

    if not cfg.dataset:
        raise DatasetError("--dataset is required (e.g. --dataset ./sft_output/sft_dataset.jsonl)")
    earlier = check_report_output(output, cfg) if output else None
    stats = LoadStats()
    for _ in iter_examples(cfg.dataset, field_map=cfg.field_map, skip_invalid=cfg.skip_invalid,
                           stats=stats):
        pass
    if stats.skipped_invalid:
        logger.warning("--dataset %s: skipped %d invalid line(s): %s", cfg.dataset,
                       stats.skipped_invalid, dict(stats.skipped_reasons))
    if not stats.rows:
        raise no_examples_error("--dataset", cfg.dataset, stats)
    golden = golden_set_examples(cfg)
    tok = load_tokenizer(resolve_base_model(cfg.model_size, cfg.base_model),
                         trust_remote_code=cfg.trust_remote_code)
    examples = iter_examples(cfg.dataset, field_map=cfg.field_map,
                             skip_invalid=cfg.skip_invalid)
    report = build_report(examples, tok, path=cfg.dataset, max_length=cfg.max_length,
                          prompt_format=cfg.prompt_format, val_ratio=cfg.val_ratio,
                          test_ratio=cfg.test_ratio, golden=golden, load_stats=stats,
                          label_mode=cfg.label_mode)
    if report["examples"] != stats.rows:
        raise DatasetError(f"--dataset {cfg.dataset} changed while the report was being made "
                           f"({stats.rows} then {report['examples']} examples); run it again")
    if output:
        _write_report(output, report, earlier)
    return report


def run_prepare(cfg: Any, *, report: bool = False, output: str | None = None
                ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """`--prepare`: the tokenized cache of --dataset for this tokenizer and these flags, built
    unless it is there; what it is (key, rows, size, path). With `report` (--report or
    --output), the report too, read from the cache's columns: the same streaming pass serves
    both (report_from_cache)."""
    from llama_sft.data.cache import CacheSpec, open_or_build
    from llama_sft.data.prompts import resolve_prompt_format

    if not cfg.dataset:
        raise DatasetError("--dataset is required (e.g. --dataset ./sft_output/sft_dataset.jsonl)")
    earlier = check_report_output(output, cfg) if output else None
    golden = golden_set_examples(cfg) if report else []
    tok = load_tokenizer(resolve_base_model(cfg.model_size, cfg.base_model),
                         trust_remote_code=cfg.trust_remote_code)
    cache = open_or_build(CacheSpec.for_args(cfg, cfg.dataset, tok,
                                             resolve_prompt_format(tok, cfg.prompt_format)))
    prepared = {"key": cache.key, "rows": cache.rows, "size_bytes": cache.size_bytes(),
                "path": str(cache.path), "hit": cache.hit,
                "skipped_invalid": cache.meta["skipped_invalid"]}
    if not report:
        return prepared, None
    result = report_from_cache(cache, tok, path=cfg.dataset, val_ratio=cfg.val_ratio,
                               test_ratio=cfg.test_ratio, golden=golden)
    if output:
        _write_report(output, result, earlier)
    return prepared, result


def report_from_cache(cache, tokenizer, *, path: str, val_ratio: float, test_ratio: float,
                      golden: Sequence[Example] = ()) -> dict[str, Any]:
    """build_report's report, read from a tokenized cache's columns (each row keeps its
    lengths before fitting, what fitting did, its category and turns): nothing is tokenized
    again. tests/test_cache.py compares the two on the sample and multi-turn files."""
    import numpy as np

    meta, parts = cache.meta, cache.meta["parts"]
    full, sup = cache.column("full_length"), cache.column("full_supervised")
    exchanges = cache.column("exchanges_dropped")
    splits, removed = cache.split(val_ratio=val_ratio, test_ratio=test_ratio, golden=golden)
    categories = Counter(cache.ds.data.column("category").to_pylist())
    turns = Counter(cache.column("assistant_turns").tolist())
    prompt = (full - sup).tolist()
    return {
        "dataset": str(path),
        "file_sha256": parts["data_sha256"],
        "dataset_hash": meta["dataset_hash"],
        "examples": cache.rows,
        "skipped_invalid": meta["skipped_invalid"],
        "skipped_reasons": dict(meta["skipped_reasons"]),
        "categories": dict(sorted(categories.items())),
        "prompt_format": parts["prompt_format"],
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "max_length": parts["max_length"],
        "prompt_tokens": percentiles(prompt),
        "response_tokens": percentiles(sup.tolist()),
        "total_tokens": percentiles(full.tolist()),
        "would_truncate": int((full > parts["max_length"]).sum()),
        "would_drop_no_supervised_tokens": int(cache.column("dropped").sum()),
        "would_shorten_conversations": int((exchanges > 0).sum()),
        "would_drop_exchanges": int(exchanges.sum(dtype=np.int64)),
        "assistant_turns": {str(k): v for k, v in sorted(turns.items())},
        "label_mode": parts["label_mode"],
        "duplicate_examples": removed.get("duplicates", 0),
        "golden_overlap": removed.get("golden_overlap", 0),
        "splits": {name: int(len(splits[name])) for name in ("train", "val", "test")},
        "split_ratios": {"val": val_ratio, "test": test_ratio},
    }


def _write_report(output: str, report: dict[str, Any], earlier: dict[str, Any] | None) -> None:
    if earlier is not None:
        logger.info("replacing %s (an earlier report on %s, hash %s)", output,
                    earlier.get("dataset"), earlier.get("dataset_hash"))
    write_text_atomic(output, json.dumps(report, indent=2) + "\n")


def format_prepare(p: dict[str, Any]) -> str:
    return (f"tokenized cache {'already there' if p['hit'] else 'built'}: key {p['key']}, "
            f"{p['rows']:,} rows ({p['skipped_invalid']} invalid skipped), "
            f"{p['size_bytes'] / 2**20:.1f} MiB\n  {p['path']}\n"
            "llama_train.py with the same --dataset, tokenizer, --max-length, --prompt-format, "
            "--field-map, --skip-invalid, --last-turn-only and --cache-dir reads it without "
            "tokenizing")
