"""The plain generation copy (llama_sft/modeling/merge.py) and the 4-bit training layout
(llama_sft/modeling/load.py keep_4bit_training_layout), on a tiny random LLaMA with a LoRA
adapter whose B matrices are not zero."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from llama_sft.evaluation.generate import generate
from llama_sft.modeling import merge
from llama_sft.modeling.load import add_lora, load_model

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="needs bitsandbytes")

PROMPTS = ["<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nWrite one short sentence about the sea and the sky.<|im_end|>\n"
           "<|im_start|>assistant\n"]

# 4-bit base + unmerged fp32 LoRA (fp32 norms after peft's k-bit preparation) against the merged
# bf16 copy: the merged weight is rounded to bf16 once, so logits move by rounding only.
# Measured on this tiny model: 0.0085 at a largest logit of 1.29 (0.7%).
TUNED_4BIT_LOGIT_TOLERANCE = 0.02  # of the largest |logit|


def _with_lora(model, seed: int = 1):
    model = add_lora(model, r=8, alpha=16, dropout=0.0)
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merged_copy_generates_what_the_unmerged_model_does(tiny_llama_dir, tokenizer):
    model = _with_lora(load_model(str(tiny_llama_dir), dtype=torch.float32))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    copy = merge.plain_copy(model)
    assert copy is not None and not merge.needs_plain_copy(copy)
    assert not any("lora" in n for n, _ in copy.named_parameters())
    ids = torch.randint(0, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(copy, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
    merged = generate(copy, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3)
    unmerged = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3)
    assert [g.text for g in merged] == [g.text for g in unmerged]
    # The training model is left as it was, and tensors that need no change are shared.
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    embed = model.get_base_model().get_input_embeddings().weight
    assert copy.get_input_embeddings().weight.data_ptr() == embed.data_ptr()


def test_generate_times_prefill_and_decode_steps(tiny_llama_dir, tokenizer):
    """generate()'s stats split the time at the first new token: a batch of n new tokens ran
    one prefill and n - 1 decode steps (the longest row sets it)."""
    model = load_model(str(tiny_llama_dir), dtype=torch.float32)
    stats: dict = {}
    gens = generate(model, tokenizer, PROMPTS, max_new_tokens=9, batch_size=3, stats=stats)
    assert stats["decode_steps"] == max(g.new_tokens for g in gens) - 1
    one: dict = {}
    gens = generate(model, tokenizer, PROMPTS, max_new_tokens=9, batch_size=1, stats=one)
    assert one["decode_steps"] == sum(g.new_tokens - 1 for g in gens)
    for s in (stats, one):
        assert 0 < s["prefill_seconds"] and 0 < s["decode_seconds"]
        assert s["prefill_seconds"] + s["decode_seconds"] <= s["seconds"] + 1e-3
        assert s["ms_per_decode_step"] == pytest.approx(
            1e3 * s["decode_seconds"] / s["decode_steps"], rel=0.05, abs=0.1)  # rounding


def test_copy_inside_disable_adapter_is_the_base(tiny_llama_dir):
    base = load_model(str(tiny_llama_dir), dtype=torch.float32).eval()
    ids = torch.randint(0, 2000, (2, 10), generator=torch.Generator().manual_seed(1))
    expected = _logits(base, ids)
    model = _with_lora(base)
    with model.disable_adapter():
        copy = merge.plain_copy(model)
    torch.testing.assert_close(_logits(copy, ids), expected, rtol=0, atol=0)


def test_no_copy_without_room(tiny_llama_dir, monkeypatch):
    model = _with_lora(load_model(str(tiny_llama_dir), dtype=torch.float32))
    monkeypatch.setattr(merge, "free_memory_bytes", lambda device: 1024)
    assert merge.plain_copy(model) is None
    with merge.generation_model(model) as gen:
        assert gen is model
        assert "unmerged" in merge.generation_route(model, gen)


@needs_bnb
def test_4bit_copy(tiny_llama_dir, tokenizer):
    """The base: bit-identical logits to the 4-bit model (same de-quantized bf16 weights, same
    matmul). Tuned: within the stated tolerance of the unmerged 4-bit path."""
    model = load_model(str(tiny_llama_dir), use_4bit=True, for_training=True).eval()
    ids = torch.randint(0, 2000, (2, 12), generator=torch.Generator().manual_seed(2))
    base_copy = merge.plain_copy(model)
    assert next(base_copy.parameters()).dtype == merge.compute_dtype(model)
    assert torch.equal(_logits(base_copy, ids), _logits(model, ids))
    tuned = _with_lora(model)
    copy = merge.plain_copy(tuned)
    expected, got = _logits(tuned, ids), _logits(copy, ids)
    assert (got - expected).abs().max() <= TUNED_4BIT_LOGIT_TOLERANCE * expected.abs().max()
    assert len(generate(copy, tokenizer, PROMPTS[:2], max_new_tokens=4)) == 2


def _input_grad_after_eval(layer):
    """The gradient reaching a 4-bit layer's input in training, after one eval-mode forward
    without gradients (what an evaluation or a sample generation does)."""
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    layer.eval()
    with torch.no_grad():
        layer(x)
    layer.train()
    x.requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x).float().sum().backward()
    return x.grad, [str(w.message) for w in caught]


@needs_bnb
def test_4bit_training_model_keeps_its_gradient_after_an_evaluation(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir), use_4bit=True, for_training=True)
    layer = model.model.layers[0].self_attn.q_proj
    assert hasattr(layer, "support_avx512bf16_for_cpu")  # the switch upstream still has
    grad, caught = _input_grad_after_eval(layer)
    assert grad is not None and bool(grad.abs().sum() > 0)
    assert not any("autograd kernel was not registered" in m for m in caught)


@needs_bnb
def test_bitsandbytes_cpu_repacking_still_drops_the_gradient(tiny_llama_dir):
    """Upstream's behaviour that keep_4bit_training_layout works around: when this fails,
    bitsandbytes fixed it and the workaround can go."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
    model = load_model(str(tiny_llama_dir), use_4bit=True)
    layer = model.model.layers[0].self_attn.q_proj
    grad, caught = _input_grad_after_eval(layer)
    assert grad is None
    assert any("autograd kernel was not registered" in m for m in caught)


@needs_bnb
def test_pilot_generates_base_and_tuned_through_plain_copies(tmp_path, tiny_llama_dir, capsys):
    """The pilot's default QLoRA: both held-out passes generate through a bf16 copy, and the
    report carries both speeds and their ratio."""
    import json

    from helpers import small_dataset, small_golden

    import llama_pilot

    out = tmp_path / "pilot"
    code = llama_pilot.main([
        "--base-model", str(tiny_llama_dir), "--model-size", "135m",
        "--golden-set", str(small_golden(tmp_path, 12)), "--dataset", str(small_dataset(tmp_path)),
        "--output-dir", str(out), "--max-steps", "2", "--eval-steps", "1", "--batch-size", "2",
        "--max-length", "128", "--max-new-tokens", "8", "--holdout-ratio", "0.34",
        "--num-sample-prompts", "1"])
    assert code == 0
    gen = json.loads((out / "pilot_evaluation.json").read_text())["generation"]
    assert "bfloat16 copy" in gen["through"] and "bfloat16 copy" in gen["base"]["through"]
    assert gen["tokens_per_second"] > 0 and gen["base"]["tokens_per_second"] > 0
    assert gen["tuned_over_base_tokens_per_second"] > 0
    n = gen["answers"]
    assert n == gen["base"]["answers"] and n > 0
    assert gen["seconds_per_answer"] == pytest.approx(gen["seconds"] / n, abs=1e-3)
    assert gen["mean_answer_tokens"] == pytest.approx(gen["generated_tokens"] / n, abs=0.05)
    # The length-fair figure: the base's time per decode step over the tuned model's.
    assert gen["tuned_over_base_decode_step_speed"] == pytest.approx(
        gen["base"]["ms_per_decode_step"] / gen["ms_per_decode_step"], rel=0.02)
    out_text = capsys.readouterr().out
    assert "s an answer" in out_text and "ms a decode step" in out_text
    assert "decode speed per step" in out_text
