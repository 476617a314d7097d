"""Load, validate, format and tokenize SFT JSONL for LLaMA, with response-only labels.

Input: one JSON object per line with `instruction`, `context` (optional, may be empty) and
`response`, plus optional `category` and `id`. Also accepted: Alpaca (`instruction`/`input`/
`output`), `prompt`/`completion`, chat `messages` (a list of {role, content}), and anything else
through `--field-map 'question=instruction,answer=response'`.

Report on a dataset (counts, categories, token lengths, truncation, duplicates, splits):

    python3 llama_dataset.py --dataset sft_output/sft_dataset.jsonl --report
    python3 llama_dataset.py --dataset sft_output/sft_dataset.jsonl --golden-set \
        sft_output/golden_set.jsonl --model-size 135m --max-length 512 --report --output report.json

Labels: every prompt token is -100; every response ends with EOS and the EOS is supervised,
also when pad == eos (padding is masked by the attention mask, never by token id). Truncation
cuts the context first; an example left with no supervised token is dropped and counted.

Splits are decided by a hash of each example's content, so appending rows never moves an
existing row to another split, and golden-set examples are removed from training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
from array import array
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

logger = logging.getLogger("llama_sft")

MAX_LINE_BYTES = 1 << 20  # 1 MiB: a longer line is almost surely not one SFT example
CANONICAL_FIELDS = ("instruction", "context", "response")
OPTIONAL_FIELDS = ("category", "id")
IGNORE_TOKEN_ID = -100

# Template for base models without a chat template (Llama-2 -hf). Documented in the README.
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_TEMPLATE_WITH_CONTEXT = ("### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n"
                                     "### Response:\n")


class DatasetError(ValueError):
    """Bad input data; the message names the file, the line and what to do."""


@dataclass
class Example:
    instruction: str
    context: str
    response: str
    category: str = "uncategorized"
    id: str | None = None
    line: int = 0

    @property
    def content_hash(self) -> str:
        """Stable identity of the example's content (not its id or position)."""
        h = hashlib.sha256()
        for part in (self.instruction, self.context, self.response):
            h.update(part.strip().encode("utf-8"))
            h.update(b"\x00")
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        d = {"instruction": self.instruction, "context": self.context, "response": self.response,
             "category": self.category}
        if self.id is not None:
            d["id"] = self.id
        return d


@dataclass
class LoadStats:
    rows: int = 0
    skipped_invalid: int = 0
    skipped_reasons: Counter = field(default_factory=Counter)


# --------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------


def parse_field_map(spec: str | None) -> dict[str, str | None]:
    """'question=instruction,answer=response,notes=' -> {question: instruction, ..., notes: None}"""
    if not spec:
        return {}
    out: dict[str, str | None] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise DatasetError(f"--field-map {spec!r}: {part!r} is not SOURCE=TARGET "
                               f"(e.g. question=instruction,answer=response)")
        src, dst = (s.strip() for s in part.split("=", 1))
        if dst and dst not in CANONICAL_FIELDS + OPTIONAL_FIELDS:
            raise DatasetError(f"--field-map {spec!r}: target {dst!r} must be one of "
                               f"{', '.join(CANONICAL_FIELDS + OPTIONAL_FIELDS)} (or empty to ignore)")
        out[src] = dst or None
    return out


def _type_name(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _messages_to_fields(messages: Any) -> dict[str, Any]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty array of {role, content} objects")
    system, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                m.get("content"), str):
            raise ValueError(f"'messages'[{i}] must be an object with string 'role' and 'content'")
        if m["role"] == "system":
            system.append(m["content"])
        elif m["role"] in ("user", "assistant"):
            turns.append(m)
        else:
            # The role's value is not echoed: error messages never quote record values.
            raise ValueError(f"'messages'[{i}] has role other than system, user or assistant")
    if len(turns) < 2 or turns[-1]["role"] != "assistant" or turns[-2]["role"] != "user":
        raise ValueError("'messages' must end with a user turn followed by an assistant turn")
    if len(turns) > 2:
        raise ValueError("multi-turn 'messages' are not supported; keep one user and one "
                         "assistant turn per line")
    return {"instruction": turns[-2]["content"], "context": "\n".join(system),
            "response": turns[-1]["content"]}


def normalize_record(obj: Any, field_map: dict[str, str | None]) -> Example:
    """Map one parsed JSON value to an Example, or raise ValueError with a reason that never
    includes field values (records may hold secrets)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {_type_name(obj)}")
    rec: dict[str, Any] = {}
    for k, v in obj.items():
        if k in field_map:
            if field_map[k] is not None:
                rec[field_map[k]] = v
        else:
            rec[k] = v
    keys = set(rec)
    if "messages" in keys:
        extra = keys - {"messages", "category", "id"}
        if extra:
            raise ValueError(f"unknown field(s) {sorted(extra)} beside 'messages'")
        mapped = _messages_to_fields(rec["messages"])
        mapped.update({k: rec[k] for k in ("category", "id") if k in rec})
        rec = mapped
    elif "prompt" in keys or "completion" in keys:
        rec = dict(rec)
        if "prompt" in rec:
            rec["instruction"] = rec.pop("prompt")
        if "completion" in rec:
            rec["response"] = rec.pop("completion")
    elif "output" in keys and "response" not in keys:  # Alpaca
        rec = dict(rec)
        rec["response"] = rec.pop("output")
        if "input" in rec:
            rec["context"] = rec.pop("input")
    allowed = set(CANONICAL_FIELDS + OPTIONAL_FIELDS)
    unknown = sorted(set(rec) - allowed)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; map them with --field-map "
                         f"'{unknown[0]}=context' or ignore them with --field-map '{unknown[0]}='")
    for name in ("instruction", "response"):
        if name not in rec:
            raise ValueError(f"missing field {name!r} (fields present: {sorted(obj)})")
    for name in ("context", "category", "id"):
        if name in rec and rec[name] is None:  # common in public datasets: null = absent
            del rec[name]
    for name in ("instruction", "context", "response", "category"):
        if name in rec and not isinstance(rec[name], str):
            raise ValueError(f"field {name!r} must be a string, got {_type_name(rec[name])}")
    if "id" in rec and not isinstance(rec["id"], (str, int)) or isinstance(rec.get("id"), bool):
        raise ValueError(f"field 'id' must be a string or an integer, got {_type_name(rec['id'])}")
    for name in ("instruction", "context", "response", "category", "id"):
        if isinstance(rec.get(name), str):
            try:
                rec[name].encode("utf-8")
            except UnicodeEncodeError:
                # A lone surrogate escape (e.g. "\ud800") is valid JSON but not text: hashing,
                # tokenizing or writing it would crash later, far from this line.
                raise ValueError(f"field {name!r} is not valid Unicode (lone surrogate "
                                 "escape)") from None
    if not rec["instruction"].strip():
        raise ValueError("field 'instruction' is empty")
    if not rec["response"].strip():
        raise ValueError("field 'response' is empty: there is nothing to learn from this line")
    return Example(instruction=rec["instruction"], context=rec.get("context") or "",
                   response=rec["response"], category=rec.get("category") or "uncategorized",
                   id=None if rec.get("id") is None else str(rec["id"]))


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
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{path}: file not found (the sample data is in ./sft_output/; "
                           f"regenerate it with `python3 sft_output/make_sample_data.py`)")
    if p.is_dir():
        raise DatasetError(f"{path}: is a folder; pass a .jsonl file")
    fmap = parse_field_map(field_map) if isinstance(field_map, (str, type(None))) else field_map
    stats = stats if stats is not None else LoadStats()

    def bad(lineno: int, reason: str) -> None:
        if not skip_invalid:
            raise DatasetError(f"{path}:{lineno}: {reason}. Fix the line, or pass --skip-invalid "
                               "to skip and count bad lines")
        stats.skipped_invalid += 1
        stats.skipped_reasons[reason.split(":")[0].split(" (")[0]] += 1

    with open(p, "rb") as fh:
        lineno = 0
        while True:
            raw = fh.readline(max_line_bytes + 1)
            if not raw:
                break
            lineno += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                # Skip the rest of the over-long line without holding it in memory.
                while True:
                    chunk = fh.readline(1 << 20)
                    if not chunk or chunk.endswith(b"\n"):
                        break
                bad(lineno, f"line longer than {max_line_bytes} bytes")
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                if not skip_invalid:
                    raise DatasetError(f"{path}:1: file starts with a UTF-8 byte-order mark (BOM); "
                                       "re-save it as UTF-8 without BOM")
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                bad(lineno, f"not valid UTF-8 (byte {e.start})")
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                what = "truncated JSON" if "Unterminated" in e.msg or "Expecting" in e.msg and \
                    e.pos >= len(text.rstrip()) - 1 else "invalid JSON"
                bad(lineno, f"{what} ({e.msg} at column {e.colno})")
                continue
            except RecursionError:
                bad(lineno, "JSON nested too deeply")
                continue
            except ValueError:
                # Not a JSONDecodeError: an integer longer than sys.get_int_max_str_digits().
                bad(lineno, "invalid JSON (a number has too many digits)")
                continue
            try:
                ex = normalize_record(obj, fmap)
            except ValueError as e:
                bad(lineno, str(e))
                continue
            ex.line = lineno
            stats.rows += 1
            yield ex


# --------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------


def _bucket(content_hash: str) -> float:
    return int(content_hash[:12], 16) / float(16**12)


class SplitAssigner:
    """The split of each example in turn, by a hash of its content: None for a golden-set
    example or a duplicate (counted in `removed`). split_examples and the streaming report
    both use it, so they cannot disagree."""

    def __init__(self, *, val_ratio: float, test_ratio: float, golden: Iterable[Example] = ()):
        self.val_ratio, self.test_ratio = val_ratio, test_ratio
        self.golden_hashes = {g.content_hash for g in golden}
        self.seen: set[str] = set()
        self.removed: Counter = Counter()

    def assign(self, content_hash: str) -> str | None:
        if content_hash in self.golden_hashes:
            self.removed["golden_overlap"] += 1
            return None
        if content_hash in self.seen:
            self.removed["duplicates"] += 1
            return None
        self.seen.add(content_hash)
        b = _bucket(content_hash)
        if b < self.val_ratio:
            return "val"
        if b < self.val_ratio + self.test_ratio:
            return "test"
        return "train"

    def finish(self) -> dict[str, int]:
        if self.removed["golden_overlap"]:
            logger.warning("%d dataset example(s) also appear in the golden set; they were "
                           "removed from training so the golden set stays a fair test",
                           self.removed["golden_overlap"])
        return dict(self.removed)


def split_examples(examples: Sequence[Example], *, val_ratio: float, test_ratio: float,
                   golden: Sequence[Example] = ()) -> tuple[dict[str, list[Example]], dict[str, int]]:
    """Hash-based train/val/test split; golden-set examples are removed from all splits.

    Returns the splits and counts of what was removed (golden overlap, duplicates)."""
    assigner = SplitAssigner(val_ratio=val_ratio, test_ratio=test_ratio, golden=golden)
    splits: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    for ex in examples:
        name = assigner.assign(ex.content_hash)
        if name is not None:
            splits[name].append(ex)
    return splits, assigner.finish()


def dataset_hash(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(ex.content_hash.encode())
    return h.hexdigest()[:16]


def file_sha256(path: str | os.PathLike) -> str:
    from llama_io import sha256_file

    return sha256_file(path)


# --------------------------------------------------------------------------------------
# Prompt formatting
# --------------------------------------------------------------------------------------


def resolve_prompt_format(tokenizer, prompt_format: str = "auto") -> str:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "auto":
        return "chat" if has_template else "instruction"
    if prompt_format == "chat" and not has_template:
        raise DatasetError("--prompt-format chat: this tokenizer has no chat template; use "
                           "--prompt-format instruction (or auto)")
    return prompt_format


def user_message(instruction: str, context: str) -> str:
    return f"{instruction.strip()}\n\n{context.strip()}" if context.strip() else instruction.strip()


def render_prompt(tokenizer, prompt_format: str, instruction: str, context: str) -> str:
    """The text the model sees before its response; used for training and for generation."""
    if prompt_format == "chat":
        msgs = [{"role": "user", "content": user_message(instruction, context)}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token or ""
    if context.strip():
        return bos + INSTRUCTION_TEMPLATE_WITH_CONTEXT.format(instruction=instruction.strip(),
                                                               context=context.strip())
    return bos + INSTRUCTION_TEMPLATE.format(instruction=instruction.strip())


def _prompt_ids(tokenizer, prompt_format: str, texts: list[str]) -> list[list[int]]:
    # The rendered prompt already holds BOS/special tokens as text (chat template or our bos).
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------
# Tokenization with response-only labels
# --------------------------------------------------------------------------------------


@dataclass
class TokenizeStats:
    examples_in: int = 0
    examples_out: int = 0
    context_truncated: int = 0
    response_truncated: int = 0
    dropped_no_supervised_tokens: int = 0
    supervised_tokens: int = 0
    total_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def tokenize_examples(examples: Sequence[Example], tokenizer, *, max_length: int,
                      prompt_format: str = "auto",
                      stats: TokenizeStats | None = None) -> list[dict[str, Any]]:
    """Tokenize to {input_ids, labels, length, prompt_length, id, category}.

    prompt tokens -> label -100; response tokens + EOS -> supervised. Batched through the fast
    tokenizer. When prompt + response + EOS exceed max_length the context is cut first (keeping
    its beginning), then the response's tail (then no EOS: the cut answer did not end)."""
    fmt = resolve_prompt_format(tokenizer, prompt_format)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DatasetError("the tokenizer has no EOS token; the model could never learn to stop")
    stats = stats if stats is not None else TokenizeStats()
    if not examples:  # e.g. an empty val split; the fast tokenizer fails on an empty batch
        return []
    stats.examples_in += len(examples)
    prompts = [render_prompt(tokenizer, fmt, ex.instruction, ex.context) for ex in examples]
    prompt_ids = _prompt_ids(tokenizer, fmt, prompts)
    response_ids = tokenizer([ex.response for ex in examples], add_special_tokens=False)["input_ids"]
    out: list[dict[str, Any]] = []
    for i, ex in enumerate(examples):
        p_ids, r_ids = prompt_ids[i], list(response_ids[i]) + [eos]
        if len(p_ids) + len(r_ids) > max_length and ex.context.strip():
            p_ids = _truncate_context(tokenizer, fmt, ex, max_length - len(r_ids))
            stats.context_truncated += 1
        if len(p_ids) >= max_length:
            stats.dropped_no_supervised_tokens += 1
            continue
        if len(p_ids) + len(r_ids) > max_length:
            r_ids = r_ids[: max_length - len(p_ids)]
            stats.response_truncated += 1
        input_ids = p_ids + r_ids
        labels = [IGNORE_TOKEN_ID] * len(p_ids) + r_ids
        out.append({"input_ids": input_ids, "labels": labels, "length": len(input_ids),
                    "prompt_length": len(p_ids), "id": ex.id, "category": ex.category,
                    "content_hash": ex.content_hash})
        stats.supervised_tokens += len(r_ids)
        stats.total_tokens += len(input_ids)
    stats.examples_out += len(out)
    return out


def _truncate_context(tokenizer, fmt: str, ex: Example, budget: int) -> list[int]:
    """Cut the context so the prompt fits `budget` tokens (keeping at least the instruction)."""
    ctx_ids = tokenizer(ex.context.strip(), add_special_tokens=False)["input_ids"]
    bare = _prompt_ids(tokenizer, fmt, [render_prompt(tokenizer, fmt, ex.instruction, "")])[0]
    keep = max(0, budget - len(bare) - 8)  # separators / template tokens around the context
    while True:
        ctx = tokenizer.decode(ctx_ids[:keep], skip_special_tokens=True) if keep > 0 else ""
        ids = _prompt_ids(tokenizer, fmt, [render_prompt(tokenizer, fmt, ex.instruction, ctx)])[0]
        if len(ids) <= budget or keep == 0:
            return ids
        keep = max(0, keep - max(1, len(ids) - budget))


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


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


def build_report(examples: Iterable[Example], tokenizer, *, path: str, max_length: int,
                 prompt_format: str, val_ratio: float, test_ratio: float,
                 golden: Sequence[Example] = (), load_stats: LoadStats | None = None) -> dict[str, Any]:
    """Counts, token-length percentiles, truncation, duplicates and split sizes of `examples`.

    One pass that streams: `examples` may be a generator (iter_examples), and only REPORT_CHUNK
    examples, their rendered prompts and token ids are held at a time; what is kept for the
    whole file is two arrays of token lengths (4 bytes per example each), one content hash per
    distinct example (for duplicates and splits) and the category counts."""
    fmt = resolve_prompt_format(tokenizer, prompt_format)
    p_len, r_len = array("I"), array("I")
    categories: Counter = Counter()
    splits = {"train": 0, "val": 0, "test": 0}
    assigner = SplitAssigner(val_ratio=val_ratio, test_ratio=test_ratio, golden=golden)
    all_hashes = hashlib.sha256()  # == dataset_hash(examples), without holding them
    over_stats = TokenizeStats()
    would_truncate = n = 0
    for chunk in _chunks(examples, REPORT_CHUNK):
        prompts = [render_prompt(tokenizer, fmt, ex.instruction, ex.context) for ex in chunk]
        chunk_p = [len(x) for x in _prompt_ids(tokenizer, fmt, prompts)]
        chunk_r = [len(x) + 1 for x in tokenizer([ex.response for ex in chunk],
                                                 add_special_tokens=False)["input_ids"]]
        over = []
        for ex, a, b in zip(chunk, chunk_p, chunk_r):
            h = ex.content_hash
            all_hashes.update(h.encode())
            categories[ex.category] += 1
            name = assigner.assign(h)
            if name is not None:
                splits[name] += 1
            if a + b > max_length:
                over.append(ex)
        n += len(chunk)
        p_len.extend(chunk_p)
        r_len.extend(chunk_r)
        would_truncate += len(over)
        # Count drops the way training will: the context is cut first, so a long prompt is
        # only dropped when even the instruction leaves no room (tokenize only the long ones).
        tokenize_examples(over, tokenizer, max_length=max_length, prompt_format=fmt,
                          stats=over_stats)
    removed = assigner.finish()
    load_stats = load_stats or LoadStats(rows=n)
    return {
        "dataset": str(path),
        "file_sha256": file_sha256(path),
        "dataset_hash": all_hashes.hexdigest()[:16],
        "examples": n,
        "skipped_invalid": load_stats.skipped_invalid,
        "skipped_reasons": dict(load_stats.skipped_reasons),
        "categories": dict(sorted(categories.items())),
        "prompt_format": fmt,
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "max_length": max_length,
        "prompt_tokens": percentiles(p_len),
        "response_tokens": percentiles(r_len),
        "total_tokens": percentiles([a + b for a, b in zip(p_len, r_len)]),
        "would_truncate": would_truncate,
        "would_drop_no_supervised_tokens": over_stats.dropped_no_supervised_tokens,
        # As split_examples counts them: a repeated golden-set row is golden overlap (every
        # copy), not a duplicate, so splits == examples - duplicates - golden overlap.
        "duplicate_examples": removed.get("duplicates", 0),
        "golden_overlap": removed.get("golden_overlap", 0),
        "splits": splits,
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
        f"  response tokens: {pct(r['response_tokens'])}  (including EOS)",
        f"  total tokens:    {pct(r['total_tokens'])}",
        f"  over --max-length {r['max_length']}: {r['would_truncate']} would be truncated, "
        f"{r['would_drop_no_supervised_tokens']} would be dropped (no room for the response)",
        f"  duplicates: {r['duplicate_examples']}   golden-set overlap: {r['golden_overlap']}",
        "  splits: " + ", ".join(f"{k} {v}" for k, v in r["splits"].items()),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Shared entry point for stages: load + split + tokenize
# --------------------------------------------------------------------------------------


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


def no_examples_error(what: str, path: str | os.PathLike, stats: LoadStats) -> DatasetError:
    if stats.skipped_invalid:
        return DatasetError(f"{what} {path}: no valid examples: all {stats.skipped_invalid} "
                            f"non-blank line(s) were invalid and skipped "
                            f"({dict(stats.skipped_reasons)}); run without --skip-invalid to "
                            "see the first bad line and why")
    return DatasetError(f"{what} {path}: no valid examples: the file is empty or holds only "
                        "blank lines; it needs one JSON object per line with 'instruction' and "
                        "'response'")


def build_parser() -> argparse.ArgumentParser:
    from llama_config import DataArgs, ModelArgs, add_dataclass_args
    from llama_io import ArgumentParser

    p = ArgumentParser(prog="llama_dataset.py", description=__doc__)
    add_dataclass_args(p, DataArgs)
    add_dataclass_args(p, ModelArgs, only=("model_size", "base_model", "prompt_format",
                                           "max_length", "trust_remote_code"))
    p.add_argument("--report", action="store_true", help="Print the dataset report.")
    p.add_argument("--output", help="Write the report as JSON to this file (an earlier report "
                   "there is replaced; any other file is refused).")
    return p


REPORT_KEYS = ("dataset", "dataset_hash", "examples", "splits")


def check_report_output(output: str, cfg: Any) -> dict[str, Any] | None:
    """Refuse an --output that would destroy something that is not a report (the dataset
    itself, a folder, any other file); return the earlier report found there, if any."""
    from llama_config import ConfigError
    from llama_io import output_file_problem, same_file

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
    from llama_io import write_text_atomic
    from llama_model import load_tokenizer, resolve_base_model

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
    golden: list[Example] = []
    if cfg.golden_set:
        golden, _ = load_and_validate(cfg.golden_set, field_map=cfg.field_map,
                                      skip_invalid=cfg.skip_invalid, what="--golden-set")
    tok = load_tokenizer(resolve_base_model(cfg.model_size, cfg.base_model),
                         trust_remote_code=cfg.trust_remote_code)
    examples = iter_examples(cfg.dataset, field_map=cfg.field_map,
                             skip_invalid=cfg.skip_invalid)
    report = build_report(examples, tok, path=cfg.dataset, max_length=cfg.max_length,
                          prompt_format=cfg.prompt_format, val_ratio=cfg.val_ratio,
                          test_ratio=cfg.test_ratio, golden=golden, load_stats=stats)
    if report["examples"] != stats.rows:
        raise DatasetError(f"--dataset {cfg.dataset} changed while the report was being made "
                           f"({stats.rows} then {report['examples']} examples); run it again")
    if output:
        if earlier is not None:
            logger.info("replacing %s (an earlier report on %s, hash %s)", output,
                        earlier.get("dataset"), earlier.get("dataset_hash"))
        write_text_atomic(output, json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 reported, 2 bad flags, data or paths (one `error: ...` line)."""
    from llama_io import run_cli

    # DatasetError is passed on: run as a script, this module's class is __main__.DatasetError.
    return run_cli(lambda: _main(argv), bad_input=(DatasetError,))


def _main(argv: Sequence[str] | None) -> int:
    from llama_config import DataArgs, ModelArgs, resolve_config, setup_logging, validate

    setup_logging()
    args = build_parser().parse_args(argv)
    report_flag = args.__dict__.pop("report")
    output = args.__dict__.pop("output")

    @dataclass
    class _ReportArgs(ModelArgs, DataArgs):
        pass

    if "model_size" not in vars(args) and "base_model" not in vars(args):
        args.model_size = "135m"  # the report needs a tokenizer; the embedded one works offline
    cfg = resolve_config(_ReportArgs, args)
    validate(cfg)
    report = run_report(cfg, output)
    if report_flag or not output:
        print(format_report(report))
    if output:
        print(f"report written to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
