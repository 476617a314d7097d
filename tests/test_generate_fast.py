"""llama_sft/evaluation/greedy.py against transformers' generate, token for token: left
padding, rows that stop at different steps (and so leave the batch), batch 1, and the
fallback to transformers where a generation_config changes greedy search."""

from __future__ import annotations

import pytest
import torch

from llama_sft.evaluation.generate import generate
from llama_sft.evaluation.greedy import PreallocatedCache, supports_greedy_loop
from llama_sft.modeling.load import load_model

PROMPTS = ["<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nWrite one short sentence about the sea, the sky and the wind "
           "over the hills.<|im_end|>\n<|im_start|>assistant\n",
           "Hi",
           "<|im_start|>user\nCount to five.<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), dtype=torch.float32).eval()


def _stops_mid_generation(model, tokenizer) -> list[int]:
    """Stop tokens that end some rows early and others late: tokens transformers' generate
    produces at different steps of different prompts."""
    picks = set()
    for i, prompt in enumerate(PROMPTS[:3]):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=16, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        picks.add(int(out[0, min(ids.shape[1] + 3 + 4 * i, out.shape[1] - 1)]))
    return [tokenizer.eos_token_id, *sorted(picks)]


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_greedy_loop_matches_transformers_generate(tiny, tokenizer, batch_size):
    stops = _stops_mid_generation(tiny, tokenizer)
    ours = generate(tiny, tokenizer, PROMPTS, max_new_tokens=16, batch_size=batch_size,
                    stop_ids=stops, decoder="continuous")
    theirs = generate(tiny, tokenizer, PROMPTS, max_new_tokens=16, batch_size=batch_size,
                      stop_ids=stops, decoder="hf")
    assert [(g.text, g.new_tokens, g.ended_with_eos) for g in ours] == \
        [(g.text, g.new_tokens, g.ended_with_eos) for g in theirs]
    lengths = {g.new_tokens for g in ours}
    assert len(lengths) > 1 and any(g.ended_with_eos for g in ours)  # rows did leave early


def test_loop_falls_back_where_the_generation_config_changes_greedy(tiny):
    assert supports_greedy_loop(tiny)
    saved = tiny.generation_config.repetition_penalty
    tiny.generation_config.repetition_penalty = 1.3
    try:
        assert not supports_greedy_loop(tiny)
    finally:
        tiny.generation_config.repetition_penalty = saved


def test_preallocated_cache_selects_rows_and_grows():
    cache = PreallocatedCache(num_layers=1, capacity=3)
    k = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).view(2, 1, 2, 2)
    keys, _ = cache.update(k, k.clone(), 0)
    assert torch.equal(keys, k)
    cache.batch_select_indices(torch.tensor([1]))
    step = torch.full((1, 1, 2, 2), -1.0)  # two more positions than the capacity left
    keys, values = cache.update(step, step, 0)
    assert keys.shape == (1, 1, 4, 2) and torch.equal(keys[:, :, :2], k[1:])
    assert torch.equal(values[:, :, 2:], step) and cache.get_seq_length() == 4


def test_rows_joining_a_running_batch_in_any_order(tiny, tokenizer):
    """Prompts shortest first, 2 slots: longer prompts join a batch whose cache is shorter
    (the cache is padded on the left for them) and rows leave at different steps; every row
    gets what transformers' generate gives it alone."""
    from llama_sft.evaluation.greedy import greedy_generate

    stops = _stops_mid_generation(tiny, tokenizer)
    enc = sorted(tokenizer(PROMPTS, add_special_tokens=False)["input_ids"], key=len)
    with torch.inference_mode():
        ours = greedy_generate(tiny, enc, slots=2, max_new_tokens=12, stop_ids=stops,
                               device=torch.device("cpu"))
        for prompt, tokens in zip(enc, ours):
            ids = torch.tensor([prompt])
            out = tiny.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=12, do_sample=False, eos_token_id=stops,
                                pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
            assert tokens == out[:len(tokens)] and len(tokens) == len(out)
