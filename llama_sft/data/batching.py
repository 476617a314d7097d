"""Batches for training: the padding collator (padding masked by the attention mask, never by
token id), the padding-free collator (rows concatenated, position_ids restarting per row), the
tokenized-rows dataset, example ids for the consumed-ids log, and the length-grouped sampler
(transformers' order, with megabatches that also group small sets). Imports torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch


def grouped_length_indices(lengths: Sequence[int], batch_size: int, *,
                           generator: torch.Generator | None = None,
                           max_megabatch_batches: int = 50) -> list[int]:
    """Indices in batches of similar length.

    Shuffle; cut into megabatches of up to `max_megabatch_batches` batches (fewer on a small
    set, down to the whole set); sort each megabatch by length; cut it into batches and shuffle
    the batches, keeping the batch with the longest row first (an out-of-memory error shows at
    step 1, not hours in)."""
    n = len(lengths)
    if n == 0:
        return []
    perm = torch.randperm(n, generator=generator).tolist()
    mult = max(1, min(max_megabatch_batches, n // batch_size))
    size = mult * batch_size
    batches: list[list[int]] = []
    for start in range(0, n, size):
        mega = sorted(perm[start:start + size], key=lambda i: lengths[i], reverse=True)
        chunks = [mega[i:i + batch_size] for i in range(0, len(mega), batch_size)]
        order = torch.randperm(len(chunks), generator=generator).tolist()
        batches.extend(chunks[j] for j in order)
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches[0], batches[longest] = batches[longest], batches[0]
    return [i for b in batches for i in b]


class GroupedLengthSampler(torch.utils.data.Sampler):
    """Drop-in for transformers' LengthGroupedSampler (same RNG use: the generator, else the
    global torch RNG, which the Trainer seeds and restores on resume)."""

    def __init__(self, lengths: Sequence[int], batch_size: int,
                 generator: torch.Generator | None = None):
        self.lengths = lengths.tolist() if hasattr(lengths, "tolist") else list(lengths)
        self.batch_size = batch_size
        self.generator = generator

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(grouped_length_indices(self.lengths, self.batch_size,
                                           generator=self.generator))


class TokenizedDataset:
    """A list of tokenized rows (from data/tokenize.py tokenize_examples)."""

    def __init__(self, rows: Sequence[dict[str, Any]]):
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    @property
    def lengths(self) -> list[int]:
        return [len(r["input_ids"]) for r in self.rows]


class ArrowRows(TokenizedDataset):
    """Rows of the tokenized cache (data/cache.py), memory-mapped: `indices` into an Arrow
    dataset, lengths from its column; rows are read when a batch asks for them, so no row is
    held as Python objects between batches."""

    def __init__(self, ds, indices, lengths):
        self.ds, self.indices, self._lengths = ds, indices, lengths

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.ds[int(self.indices[i])]

    def __getitems__(self, keys: Sequence[int]) -> list[dict[str, Any]]:
        """A batch in one read (torch's DataLoader calls this when it exists)."""
        cols = self.ds[[int(self.indices[k]) for k in keys]]
        return [dict(zip(cols, values)) for values in zip(*cols.values())]

    @property
    def rows(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """Every row as Python objects: for tests and small sets only."""
        return self.__getitems__(range(len(self)))

    @property
    def lengths(self):
        return self._lengths


@dataclass
class PadCollator:
    """Right-pads a batch to its longest row. Padding is masked by attention_mask = 0 and
    labels = -100, never by token id, so EOS is learned even when pad == eos.

    `example_ids`: also pass each row's id (its `id` field, else the first 16 hex digits of its
    content hash) as a list under "example_ids", for the consumed-examples log; SFTTrainer
    takes it out before the model sees the batch."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    example_ids: bool = False

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        batch: dict[str, Any] = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if self.example_ids:
            batch["example_ids"] = [example_id(r) for r in rows]
        return batch


@dataclass
class PaddingFreeCollator:
    """A micro-batch's rows concatenated into one row [1, total tokens], with no padding and no
    attention_mask: position_ids restart at 0 at each row, which transformers turns into varlen
    attention (flash) or a block-diagonal mask (sdpa, eager, flex) when the model runs without
    a cache; labels are -100 at each row's first position, so no token is trained to predict
    the next row. transformers' DataCollatorWithFlattening does exactly that; this adds
    `example_ids` as PadCollator has them. The supervised positions, and so the loss, are those
    of the padded batch."""

    example_ids: bool = False

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        from transformers import DataCollatorWithFlattening

        batch = DataCollatorWithFlattening(return_tensors="pt")(
            [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
        if self.example_ids:
            batch["example_ids"] = [example_id(r) for r in rows]
        return batch


def packed_row_starts(batch: dict[str, Any]) -> list[int] | None:
    """Where each row begins in a padding-free batch (position_ids 0), or None for a padded
    one."""
    pos = batch.get("position_ids")
    if pos is None or batch.get("attention_mask") is not None or pos.shape[0] != 1:
        return None
    return (pos[0] == 0).nonzero().flatten().tolist()


def example_id(row: dict[str, Any]) -> str:
    """A tokenized row's id for logs: its `id` field, else a prefix of its content hash."""
    if row.get("id") is not None:
        return str(row["id"])
    return str(row.get("content_hash", ""))[:16]
