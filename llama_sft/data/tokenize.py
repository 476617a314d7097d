"""Tokenization with response-only labels.

Every example is rendered whole (the chat template, or the instruction template) and labelled
from the render itself: exactly each assistant turn's content and the template's own
end-of-turn token are supervised (`<|im_end|>`, `<|eot_id|>`, `</s>`; EOS for the instruction
template, also when pad == eos), everything else is -100. The supervised spans are found by
rendering the conversation up to each assistant turn; the tokens of those prefixes must equal
the start of the whole render's tokens, else the template cannot give response-only labels and
the run is refused rather than trained on a shifted mask.

Over --max-length: whole earliest exchanges go first (the system turn stays), then a
single-turn example's context is cut, then the response's tail (then without its turn end);
an example left with no supervised token is dropped. Each is counted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from llama_sft.data.prompts import (
    render_conversation,
    render_prompt,
    resolve_prompt_format,
    turn_end_ids,
)
from llama_sft.data.schemas import Example
from llama_sft.errors import DatasetError

IGNORE_TOKEN_ID = -100
LABEL_MODES = ("all", "last")  # supervise every assistant turn, or the last one only


@dataclass
class TokenizeStats:
    examples_in: int = 0
    examples_out: int = 0
    context_truncated: int = 0
    response_truncated: int = 0
    dropped_no_supervised_tokens: int = 0
    supervised_tokens: int = 0
    total_tokens: int = 0
    conversations_shortened: int = 0  # examples that lost earliest exchanges to --max-length
    exchanges_dropped: int = 0  # user/assistant exchanges dropped in all

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    def add(self, fitted: Sequence["Fitted"]) -> None:
        for f in fitted:
            self.examples_in += 1
            self.context_truncated += f.context_truncated
            self.exchanges_dropped += f.exchanges_dropped
            self.conversations_shortened += f.exchanges_dropped > 0
            if f.enc is None:
                self.dropped_no_supervised_tokens += 1
                continue
            self.examples_out += 1
            self.response_truncated += f.response_truncated
            self.supervised_tokens += f.enc.supervised
            self.total_tokens += len(f.enc.ids)


@dataclass
class Encoded:
    """One example's whole render as token ids, and its supervised [start, end) spans."""

    ids: list[int]
    spans: list[tuple[int, int]]

    @property
    def supervised(self) -> int:
        return sum(end - start for start, end in self.spans)


class Encoder:
    """Renders and tokenizes examples in one prompt format, with its turn-end tokens."""

    def __init__(self, tokenizer, prompt_format: str = "auto", label_mode: str = "all"):
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, not {label_mode!r}")
        if tokenizer.eos_token_id is None:
            # Padding and generation fall back to EOS; a tokenizer without one is broken.
            raise DatasetError("the tokenizer has no EOS token; the model could never learn to "
                               "stop")
        self.tokenizer = tokenizer
        self.format = resolve_prompt_format(tokenizer, prompt_format)
        self.turn_end = set(turn_end_ids(tokenizer, self.format))
        self.label_mode = label_mode

    def encode(self, examples: Sequence[Example]) -> list[Encoded]:
        """Every example untruncated, tokenized in one batch."""
        texts: list[str] = []
        plans = []
        for ex in examples:
            start = len(texts)
            texts.extend(self._texts(ex))
            plans.append((ex, start, len(texts)))
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return [self._single_turn(ids[start:end]) if self._is_single_turn(ex)
                else self._spans(ex, ids[start:end]) for ex, start, end in plans]

    def _is_single_turn(self, ex: Example) -> bool:
        return self.format != "chat" and ex.messages is None

    def _single_turn(self, ids: list[list[int]]) -> Encoded:
        """The instruction template's single-turn form (with its Input block): prompt and
        response tokenized apart, then EOS, as the toolkit has always trained it."""
        prompt, response = ids
        whole = prompt + response + [self.tokenizer.eos_token_id]
        return Encoded(ids=whole, spans=[(len(prompt), len(whole))])

    def _texts(self, ex: Example) -> list[str]:
        """(prompt, prompt + turn) for each assistant turn: a conversation ends with one, so
        the last pair's second text is the whole render; for a single-turn example in the
        instruction format, [prompt, response]."""
        if self._is_single_turn(ex):
            return [render_prompt(self.tokenizer, self.format, ex.instruction, ex.context),
                    ex.response]
        messages = ex.conversation()
        texts = []
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                texts.append(render_conversation(self.tokenizer, self.format, messages[:k],
                                                 add_generation_prompt=True))
                texts.append(render_conversation(self.tokenizer, self.format, messages[:k + 1]))
        return texts

    def _spans(self, ex: Example, ids: list[list[int]]) -> Encoded:
        whole, spans = ids[-1], []
        for turn, (prompt, through) in enumerate(zip(ids[0::2], ids[1::2]), start=1):
            if whole[:len(prompt)] != prompt or whole[:len(through)] != through:
                raise DatasetError(self._mismatch(ex, turn))
            ends = [i for i, t in enumerate(through[len(prompt):]) if t in self.turn_end]
            if not ends:
                raise DatasetError(f"line {ex.line}: assistant turn {turn} renders without the "
                                   "template's end-of-turn token, so it cannot be supervised")
            spans.append((len(prompt), len(prompt) + ends[-1] + 1))
        if self.label_mode == "last":
            spans = spans[-1:]
        # Nothing after the last turn's end is trained on (e.g. ChatML's trailing newline).
        return Encoded(ids=whole[:spans[-1][1]], spans=spans)

    def _mismatch(self, ex: Example, turn: int) -> str:
        return (f"line {ex.line}: the {self.format} prompt format cannot give response-only "
                f"labels here: the conversation up to assistant turn {turn} does not tokenize "
                "to the start of the whole conversation's tokens (the template renders that "
                "part differently inside the whole, or tokens merge across the turn boundary), "
                "so the labels would be shifted; use --prompt-format instruction, or a "
                "tokenizer whose template renders each turn the same way")


@dataclass
class Fitted:
    """One example tokenized and fitted to max_length: `enc` is None when no supervised token
    was left (dropped); the counts say what fitting did to it."""

    example: Example
    enc: Encoded | None
    full_length: int  # tokens before fitting
    full_supervised: int
    context_truncated: bool = False
    response_truncated: bool = False
    exchanges_dropped: int = 0

    def row(self) -> dict[str, Any]:
        """The training row: {input_ids, labels, length, prompt_length, id, category,
        content_hash}."""
        enc, ex = self.enc, self.example
        labels = [IGNORE_TOKEN_ID] * len(enc.ids)
        for start, end in enc.spans:
            labels[start:end] = enc.ids[start:end]
        return {"input_ids": enc.ids, "labels": labels, "length": len(enc.ids),
                "prompt_length": enc.spans[-1][0], "id": ex.id, "category": ex.category,
                "content_hash": ex.content_hash}


def fit_examples(encoder: Encoder, examples: Sequence[Example], max_length: int) -> list[Fitted]:
    """Every example encoded, then fitted to max_length (module docstring)."""
    if not examples:  # e.g. an empty val split; the fast tokenizer fails on an empty batch
        return []
    out = []
    for ex, enc in zip(examples, encoder.encode(examples)):
        fitted = Fitted(ex, enc, len(enc.ids), enc.supervised)
        if len(enc.ids) > max_length:
            _fit(encoder, fitted, max_length)
        out.append(fitted)
    return out


def tokenize_examples(examples: Sequence[Example], tokenizer, *, max_length: int,
                      prompt_format: str = "auto", label_mode: str = "all",
                      stats: TokenizeStats | None = None) -> list[dict[str, Any]]:
    """Tokenize to {input_ids, labels, length, prompt_length, id, category, content_hash}
    (module docstring: labels and truncation). Batched through the fast tokenizer."""
    encoder = Encoder(tokenizer, prompt_format, label_mode)
    stats = stats if stats is not None else TokenizeStats()
    fitted = fit_examples(encoder, examples, max_length)
    stats.add(fitted)
    return [f.row() for f in fitted if f.enc is not None]


def _fit(encoder: Encoder, fitted: Fitted, max_length: int) -> None:
    """fitted.enc cut to max_length (module docstring); None when no supervised token is
    left."""
    ex = shortened = fitted.example
    enc = fitted.enc
    while len(enc.ids) > max_length and shortened.assistant_turns > 1:
        shortened = _drop_first_exchange(shortened)
        fitted.exchanges_dropped += 1
        enc = encoder.encode([shortened])[0]
    if len(enc.ids) > max_length and shortened.messages is None and ex.context.strip():
        response = len(enc.ids) - enc.spans[-1][0]
        enc = _truncate_context(encoder, ex, max_length - response)
        fitted.context_truncated = True
    fitted.enc = None
    if enc.spans[-1][0] >= max_length:
        return
    if len(enc.ids) > max_length:
        fitted.response_truncated = True
        enc = Encoded(ids=enc.ids[:max_length],
                      spans=[(s, min(e, max_length)) for s, e in enc.spans if s < max_length])
    fitted.enc = enc


def _drop_first_exchange(ex: Example) -> Example:
    """The conversation without its earliest user/assistant exchange (the system turn stays)."""
    turns = list(ex.messages or ())
    first = 1 if turns and turns[0][0] == "system" else 0
    return dataclasses.replace(ex, messages=tuple(turns[:first] + turns[first + 2:]))


def _truncate_context(encoder: Encoder, ex: Example, budget: int) -> Encoded:
    """The example with its context cut so the prompt fits `budget` tokens (keeping at least
    the instruction)."""
    tokenizer = encoder.tokenizer
    ctx_ids = tokenizer(ex.context.strip(), add_special_tokens=False)["input_ids"]
    bare = encoder.encode([dataclasses.replace(ex, context="")])[0]
    keep = max(0, budget - bare.spans[-1][0] - 8)  # separators / template tokens around it
    while True:
        ctx = tokenizer.decode(ctx_ids[:keep], skip_special_tokens=True) if keep > 0 else ""
        enc = encoder.encode([dataclasses.replace(ex, context=ctx)])[0]
        if enc.spans[-1][0] <= budget or keep == 0:
            return enc
        keep = max(0, keep - max(1, enc.spans[-1][0] - budget))
