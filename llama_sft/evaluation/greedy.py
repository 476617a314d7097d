"""Greedy decoding with continuous batching: the tokens transformers' `generate` (greedy, KV
cache) picks, at batched speed whatever the answer lengths.

- Every prompt is prefilled on its own (no padding) and joins the running batch, right-aligned
  in a shared KV cache with a left-padding mask and its own position ids.
- A row that reaches a stop token (or max_new_tokens) leaves the batch at once, and the next
  prompt takes its slot: transformers' generate carries finished rows to the end of the batch
  (in the pilot's held-out batches 5-7 of 16 rows were still generating on average) and lets
  the batch's longest answer set its length.
- The KV cache is one buffer per layer written in place (DynamicCache concatenates every
  layer's keys and values at every step); it is rebuilt only in steps where rows leave or join.

Written against transformers 5.24 (the `cache=` forward argument, the cache layer API and
`generate`'s position ids for left padding); tests/test_generate_fast.py compares it with
`model.generate` token for token and fails when upstream changes what either does.
No command of its own: llama_sft.evaluation.generate calls it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

# generation_config fields that make `generate` change the greedy choice; with any of them set
# to something other than this default, generate() uses transformers' own loop.
_NEUTRAL = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
            "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
            "forced_eos_token_id": None, "min_length": 0, "min_new_tokens": None,
            "sequence_bias": None, "exponential_decay_length_penalty": None,
            "encoder_repetition_penalty": 1.0, "renormalize_logits": False,
            "num_beams": 1, "assistant_model": None, "prompt_lookup_num_tokens": None}


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in one buffer per layer, sized for the whole
    generation and written in place; `keys`/`values` are views of the filled part."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h, _, d = key_states.shape
        self._k = key_states.new_zeros((b, h, self.capacity, d))
        self._v = value_states.new_zeros((b, h, self.capacity, d))

    def update(self, key_states, value_states, *args: Any, **kwargs: Any):
        n = key_states.shape[-2]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.length + n > self._k.shape[-2]:
            self.rebuild(capacity=2 * (self.length + n))
        self._k[:, :, self.length:self.length + n] = key_states
        self._v[:, :, self.length:self.length + n] = value_states
        self.length += n
        self._views()
        return self.keys, self.values

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def rebuild(self, *, rows: torch.Tensor | None = None, drop_left: int = 0,
                pad_left: int = 0, append: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
                capacity: int | None = None) -> None:
        """New buffers holding columns [drop_left, length) of `rows` (default all), shifted
        `pad_left` columns right, then one row per (keys, values) [1, H, n, D] of `append`,
        right-aligned; zeros elsewhere, so masked positions hold finite values."""
        length = self.length - drop_left + pad_left
        if any(k.shape[-2] > length for k, _ in append):
            raise ValueError("pad the cache left before appending a longer row")
        capacity = max(capacity or 0, self.capacity, length + 1)
        fresh = []
        for i, buf in enumerate((self._k, self._v)):
            kept = buf if rows is None else buf[rows]
            new = buf.new_zeros((kept.shape[0] + len(append), buf.shape[1], capacity,
                                 buf.shape[3]))
            new[:kept.shape[0], :, pad_left:length] = kept[:, :, drop_left:self.length]
            for j, kv in enumerate(append):
                n = kv[i].shape[-2]
                new[kept.shape[0] + j, :, length - n:length] = kv[i][0]
            fresh.append(new)
        self._k, self._v = fresh
        self.length = length
        self._views()

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.rebuild(rows=indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PreallocatedLayer is for greedy decoding only")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("PreallocatedLayer is for greedy decoding only")

    def reset(self) -> None:
        self.length = 0
        self._k = self._v = None
        super().reset()


class PreallocatedCache(DynamicCache):
    """One PreallocatedLayer per decoder layer."""

    def __init__(self, num_layers: int, capacity: int) -> None:
        Cache.__init__(self, layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])


def supports_greedy_loop(model) -> bool:
    """Whether this loop reproduces `model.generate` for `model`: a decoder-only model with
    full attention in every layer whose generation_config adds nothing to plain greedy
    search."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    text = config.get_text_config(decoder=True)
    if getattr(text, "sliding_window", None) or any(
            t != "full_attention" for t in getattr(text, "layer_types", None) or ()):
        return False
    gen = getattr(model, "generation_config", None)
    return all(getattr(gen, k, None) in (None, v) for k, v in _NEUTRAL.items())


class _Running:
    """The rows being generated: their prompt index, tokens so far, the next token to feed and
    its position, the shared attention mask and KV cache."""

    def __init__(self, num_layers: int, capacity: int, device) -> None:
        self.cache = PreallocatedCache(num_layers, capacity)
        self.device = device
        self.owner: list[int] = []
        self.tokens: list[list[int]] = []
        self.next_ids = torch.zeros(0, dtype=torch.long, device=device)
        self.position = torch.zeros((0, 1), dtype=torch.long, device=device)
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=device)

    def step(self, model) -> torch.Tensor:
        """Feed every row its next token; returns the tokens picked."""
        logits = model(input_ids=self.next_ids[:, None], attention_mask=self.mask,
                       position_ids=self.position, cache=self.cache, use_cache=True,
                       logits_to_keep=1).logits
        return logits[:, -1, :].float().argmax(dim=-1)

    def regroup(self, keep: list[int], joining: list[tuple[int, list[int], Any]]) -> None:
        """Keep rows `keep` (indices), add `joining` (prompt index, tokens so far, per-layer
        (keys, values) of its prompt) right-aligned, and drop the cache columns no row attends
        any more. The mask keeps one column more than the cache: the token fed next."""
        rows = torch.tensor(keep, dtype=torch.long, device=self.device)
        first = self.cache.layers[0]
        cached = first.length if first.is_initialized else 0
        mask = self.mask[rows][:, :cached]
        live = mask.any(dim=0).nonzero()
        drop = int(live[0]) if len(live) else cached
        lengths = [kv[0][0].shape[-2] for _, _, kv in joining]
        pad = max(0, max(lengths, default=0) - (cached - drop))
        width = cached - drop + pad
        mask = torch.cat([mask.new_zeros((len(keep), pad)), mask[:, drop:]], dim=1)
        new_rows = [torch.cat([mask.new_zeros(width - n), mask.new_ones(n)])[None]
                    for n in lengths]
        mask = torch.cat([mask, *new_rows], dim=0)
        self.mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        for i, layer in enumerate(self.cache.layers):
            append = [kv[i] for _, _, kv in joining]
            if not layer.is_initialized:  # the first rows start the cache
                layer.lazy_initialization(*append[0])
            layer.rebuild(rows=rows, drop_left=drop, pad_left=pad, append=append)
        self._regroup_rows(keep, joining)

    def _regroup_rows(self, keep: list[int], joining) -> None:
        self.owner = [self.owner[i] for i in keep] + [p for p, _, _ in joining]
        self.tokens = [self.tokens[i] for i in keep] + [t for _, t, _ in joining]
        ids = [t[-1] for t in self.tokens]
        self.next_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        self.position = (self.mask.sum(dim=1, keepdim=True) - 1).to(torch.long)


def _prefill(model, prompt: list[int], capacity: int, device):
    """One prompt alone: (first generated token, per-layer (keys, values) of the prompt)."""
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    cache = PreallocatedCache(layers, capacity)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                   position_ids=torch.arange(len(prompt), device=device)[None], cache=cache,
                   use_cache=True, logits_to_keep=1).logits
    token = int(logits[0, -1, :].float().argmax())
    return token, [(layer.keys, layer.values) for layer in cache.layers]


def greedy_generate(model, prompts: Sequence[list[int]], *, slots: int, max_new_tokens: int,
                    stop_ids: Sequence[int], device,
                    on_done: Callable[[int, list[int]], None] | None = None) -> list[list[int]]:
    """The greedy tokens of each prompt (token ids), in prompt order, the stop token included
    when one was reached; at most `slots` prompts are generated at once, in the order given.
    `on_done(index, tokens)` is called as each prompt finishes."""
    stops = set(int(t) for t in stop_ids)
    capacity = max(len(p) for p in prompts) + max_new_tokens + 1
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    running = _Running(layers, capacity, device)
    results: list[list[int]] = [[] for _ in prompts]
    queue = list(range(len(prompts)))[::-1]

    def finished(tokens: list[int]) -> bool:
        return tokens[-1] in stops or len(tokens) >= max_new_tokens

    def finish(index: int, tokens: list[int]) -> None:
        results[index] = tokens
        if on_done is not None:
            on_done(index, tokens)

    keep = []
    while True:
        joining = []
        while queue and len(keep) + len(joining) < slots:
            index = queue.pop()
            token, kv = _prefill(model, list(prompts[index]), capacity, device)
            if finished([token]):
                finish(index, [token])
            else:
                joining.append((index, [token], kv))
        if len(keep) != len(running.owner) or joining:
            running.regroup(keep, joining)
        if not running.owner:
            return results
        picked = running.step(model).tolist()
        keep = []
        for row, token in enumerate(picked):
            running.tokens[row].append(token)
            if finished(running.tokens[row]):
                finish(running.owner[row], running.tokens[row])
            else:
                keep.append(row)
        running.mask = torch.cat([running.mask, running.mask.new_ones((len(picked), 1))], dim=1)
        running.next_ids = torch.tensor(picked, dtype=torch.long, device=device)
        running.position = running.position + 1
