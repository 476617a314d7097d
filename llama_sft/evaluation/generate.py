"""Batched generation shared by the pilot, the training-time sample prompts, evaluation and
package verification.

Prompts come rendered as in training (llama_sft.data.prompts.render_prompt); they are sorted by
length and generated with the KV cache in left-padded batches with transformers' generate,
greedy by default (continuous batching, llama_sft/evaluation/greedy.py, on request).
Output order matches input order. No command of its own: llama_evaluate.py and llama_pilot.py call it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

from llama_sft.data.prompts import stop_token_ids

logger = logging.getLogger("llama_sft")


@dataclass
class Generation:
    text: str
    new_tokens: int
    ended_with_eos: bool  # stopped at one of the model's stop tokens (turn end or EOS)


def generation_kwargs(*, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float,
                       pad: int, stop_ids: list[int]) -> dict[str, Any]:
    # eos_token_id as the whole list: one id would override the model's own list (Llama 3's
    # generation_config stops at <|end_of_text|>, <|eom_id|> and <|eot_id|>).
    gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                      pad_token_id=pad, eos_token_id=stop_ids, use_cache=True)
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p)
    else:
        # Greedy: no sampling knobs, so generation_config defaults (e.g. temperature) don't warn.
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    return gen_kwargs


def _decode(tokenizer, toks: list[int], stops: set[int], pad: int) -> Generation:
    """A row of generated ids, cut at its first stop token (or its trailing padding)."""
    end = next((i for i, t in enumerate(toks) if t in stops), None)
    ended = end is not None
    if ended:
        toks = toks[:end]
    else:
        while toks and toks[-1] == pad:
            toks = toks[:-1]
    return Generation(text=tokenizer.decode(toks, skip_special_tokens=True).strip(),
                      new_tokens=len(toks) + int(ended), ended_with_eos=ended)


class _StepClock:
    """A logits processor that only reads the clock: generate calls it once per new token,
    right after that token's forward pass, so its first call marks the end of the prefill and
    the calls after it count the decode steps."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.calls = 0

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = time.perf_counter()
        self.calls += 1
        return scores


def _add_timing(timing: dict[str, float], *, start: float, clock: _StepClock) -> None:
    """Adds one batch's prefill seconds, decode seconds and decode steps to `timing`."""
    if clock.first is None:  # nothing generated
        return
    end = time.perf_counter()
    timing["prefill_seconds"] = timing.get("prefill_seconds", 0.0) + clock.first - start
    timing["decode_seconds"] = timing.get("decode_seconds", 0.0) + end - clock.first
    timing["decode_steps"] = timing.get("decode_steps", 0) + clock.calls - 1


def _generate_batch(model, tokenizer, batch: list[list[int]], *, pad: int, stop_ids: list[int],
                    device, gen_kwargs: dict[str, Any],
                    timing: dict[str, float]) -> list[Generation]:
    """Left-pad one batch of prompt token ids, generate with transformers' generate, and decode
    each row up to its first stop token; adds the batch's prefill and decode seconds and its
    decode steps to `timing`."""
    import torch
    from transformers import LogitsProcessorList

    width = max(len(ids) for ids in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, prompt_ids in enumerate(batch):
        n = len(prompt_ids)
        ids[row, width - n:] = torch.tensor(prompt_ids)
        mask[row, width - n:] = 1
    clock = _StepClock()
    start = time.perf_counter()
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                         logits_processor=LogitsProcessorList([clock]), **gen_kwargs)
    _add_timing(timing, start=start, clock=clock)
    stops = set(stop_ids)
    return [_decode(tokenizer, toks, stops, pad) for toks in out[:, width:].tolist()]


def _run_batches(model, tokenizer, enc, order, *, batch_size: int, pad: int, stop_ids,
                 device, gen_kwargs, use_loop: bool, done, timing: dict[str, float]) -> None:
    """Generate every prompt of `enc` (in `order`), calling done(index, Generation) for each:
    greedy.greedy_generate with `batch_size` slots (use_loop), else transformers' generate on
    batches of `batch_size`."""
    stops = set(stop_ids)
    if use_loop:
        from llama_sft.evaluation.greedy import greedy_generate

        greedy_generate(model, [enc[i] for i in order], slots=batch_size,
                        max_new_tokens=gen_kwargs["max_new_tokens"], stop_ids=stop_ids,
                        device=device,
                        on_done=lambda k, toks: done(order[k], _decode(tokenizer, toks, stops,
                                                                       pad)))
        return
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = _generate_batch(model, tokenizer, [enc[i] for i in idx], pad=pad,
                                stop_ids=stop_ids, device=device, gen_kwargs=gen_kwargs,
                                timing=timing)
        for i, gen in zip(idx, batch):
            done(i, gen)


def _greedy_loop_supported(model) -> bool:
    from llama_sft.evaluation.greedy import supports_greedy_loop

    return supports_greedy_loop(model)


def model_stop_ids(model, tokenizer) -> list[int]:
    """stop_token_ids for a loaded model: its chat template's turn end (when it has one), the
    tokenizer's EOS and the model's generation_config.eos_token_id."""
    fmt = "chat" if getattr(tokenizer, "chat_template", None) else "instruction"
    return stop_token_ids(tokenizer, fmt, getattr(model, "generation_config", None))


def run_stop_ids(run, prompt_format: str, model, tokenizer) -> list[int]:
    """Stop where training taught the model to: the stop tokens its run recorded
    (RunConfig.stop_token_ids) when it is prompted in the run's own format, else the model's."""
    if run.stop_token_ids and prompt_format == run.prompt_format:
        return list(run.stop_token_ids)
    return model_stop_ids(model, tokenizer)


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 128,
             batch_size: int = 16, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, progress: bool = False,
             stats: dict[str, Any] | None = None,
             stop_ids: Sequence[int] | None = None, decoder: str = "auto") -> list[Generation]:
    """Generate a response for each rendered prompt (text already in the model's format),
    stopping at any of `stop_ids` (default: the model's, from stop_token_ids).

    decoder: "auto" (the default) and "hf" generate with transformers' generate on batches of
    `batch_size`; "continuous" decodes greedy with llama_sft.evaluation.greedy (the same tokens,
    `batch_size` prompts in flight, a finished one replaced at once) where it supports the
    model. Measured on this CPU (bench/RESULTS.md): continuous batching did not pay (0.89x of
    transformers' generate in fp32 at batch 16, no measurable difference in bf16), so it is
    not the default; it stays for a GPU measurement (bench/bench_generate.py --decoders)."""
    import torch

    if not prompts:
        return []
    stop_ids = list(stop_ids) if stop_ids else model_stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    enc = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    # Longest first: prompts of similar length share a batch (or run together), so the cache
    # holds little padding.
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]), reverse=True)
    results: list[Generation | None] = [None] * len(enc)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(enc), desc="generating", unit="ex", dynamic_ncols=True)
    t0 = time.perf_counter()
    gen_kwargs = generation_kwargs(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                    temperature=temperature, top_p=top_p, pad=pad,
                                    stop_ids=stop_ids)
    if do_sample:
        torch.manual_seed(seed)
    use_loop = decoder == "continuous" and not do_sample and _greedy_loop_supported(model)

    generated = [0]
    timing: dict[str, float] = {}

    def done(index: int, gen: Generation) -> None:
        results[index] = gen
        generated[0] += gen.new_tokens
        if bar is not None:
            bar.update(1)
            bar.set_postfix(tok_s=f"{generated[0] / (time.perf_counter() - t0):.1f}")

    try:
        with torch.inference_mode():
            _run_batches(model, tokenizer, enc, order, batch_size=batch_size, pad=pad,
                         stop_ids=stop_ids, device=device, gen_kwargs=gen_kwargs,
                         use_loop=use_loop, done=done, timing=timing)
    finally:
        if bar is not None:
            bar.close()
        if was_training:
            model.train()
    if stats is not None:
        stats.update(_speed_stats(generated[0], time.perf_counter() - t0, timing))
    return [r for r in results if r is not None]


def _speed_stats(generated_tokens: int, elapsed: float, timing: dict[str, float]) -> dict:
    """generate()'s stats: tokens, seconds, tokens/s, and (from transformers' generate) the
    prefill and decode split. ms_per_decode_step is the length-fair figure: one decode step is
    a forward over the batch's rows, the same shapes for two models given the same prompts,
    whatever the answers' length."""
    out: dict[str, Any] = dict(generated_tokens=generated_tokens, seconds=round(elapsed, 3),
                               tokens_per_second=round(generated_tokens / max(elapsed, 1e-9), 2))
    if timing.get("decode_steps"):
        out.update(prefill_seconds=round(timing["prefill_seconds"], 3),
                   decode_seconds=round(timing["decode_seconds"], 3),
                   decode_steps=int(timing["decode_steps"]),
                   ms_per_decode_step=round(1e3 * timing["decode_seconds"]
                                            / timing["decode_steps"], 2))
    return out
