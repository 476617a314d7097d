"""Hash-based train/val/test splits (appending rows never moves a row to another split), with
the golden set and duplicates removed, and the dataset hash recorded by runs."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from typing import Iterable, Sequence

from llama_sft.data.schemas import Example

logger = logging.getLogger("llama_sft")


def bucket(content_hash: str) -> float:
    """Where an example falls in [0, 1): below val_ratio is val, then test, then train."""
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
        b = bucket(content_hash)
        if b < self.val_ratio:
            return "val"
        if b < self.val_ratio + self.test_ratio:
            return "test"
        return "train"

    def finish(self) -> dict[str, int]:
        warn_golden_overlap(self.removed["golden_overlap"])
        return dict(self.removed)


def warn_golden_overlap(n: int) -> None:
    if n:
        logger.warning("%d dataset example(s) also appear in the golden set; they were "
                       "removed from training so the golden set stays a fair test", n)


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
