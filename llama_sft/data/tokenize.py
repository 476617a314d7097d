"""Tokenization with response-only labels: prompt tokens are -100, every response ends with a
supervised EOS (also when pad == eos); the context is cut first; an example left with no
supervised token is dropped and counted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from llama_sft.data.prompts import _prompt_ids, render_prompt, resolve_prompt_format
from llama_sft.data.schemas import Example
from llama_sft.errors import DatasetError

IGNORE_TOKEN_ID = -100


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
