"""The training fast path: fused head + cross-entropy, no LoRA input cast, grouped batches."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

from llama_sft.data.batching import GroupedLengthSampler, grouped_length_indices
from llama_sft.modeling.loss import supervised_cross_entropy


def reference(hidden, weight, labels, scale):
    return F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum") * scale


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, True),
                                            (torch.bfloat16, False)])
@pytest.mark.parametrize("chunk_rows", [7, 1024])
def test_fused_loss_and_input_gradient_match_plain_cross_entropy(dtype, autocast, chunk_rows):
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(500, 32, generator=g) * 0.3).to(dtype)
    h0 = torch.randn(40, 32, generator=g).to(dtype)
    labels = torch.randint(0, 500, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        h_ref = h0.clone().requires_grad_()
        ref = reference(h_ref, weight, labels, 1 / 37)
        ref.backward()
        h = h0.clone().requires_grad_()
        ours = supervised_cross_entropy(h, weight, labels, scale=1 / 37, chunk_rows=chunk_rows)
        ours.backward()
    assert ours.dtype == torch.float32
    assert torch.allclose(ours.detach(), ref.detach(), rtol=1e-6, atol=0), (ours, ref)
    assert h.grad.dtype == h0.dtype
    # fp32: summation order only; bf16: at most one bf16 rounding step of the largest gradient
    tol = 1e-6 if dtype == torch.float32 else 2 ** -8
    scale = h_ref.grad.float().abs().max()
    assert (h.grad.float() - h_ref.grad.float()).abs().max() <= tol * scale


def test_fused_loss_scales_its_gradient_by_the_upstream_gradient():
    g = torch.Generator().manual_seed(1)
    weight, h0 = torch.randn(50, 8, generator=g), torch.randn(6, 8, generator=g)
    labels = torch.randint(0, 50, (6,), generator=g)
    a = h0.clone().requires_grad_()
    (supervised_cross_entropy(a, weight, labels) * 3.0).backward()
    b = h0.clone().requires_grad_()
    (reference(b, weight, labels, 1.0) * 3.0).backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_a_trainable_head_takes_the_plain_path_and_gets_its_gradient():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(50, 8, generator=g).requires_grad_()
    h = torch.randn(6, 8, generator=g).requires_grad_()
    labels = torch.randint(0, 50, (6,), generator=g)
    supervised_cross_entropy(h, weight, labels).backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_no_grad_loss_is_chunked_and_equal():
    g = torch.Generator().manual_seed(3)
    weight, h = torch.randn(50, 8, generator=g), torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 50, (30,), generator=g)
    with torch.no_grad():
        ours = supervised_cross_entropy(h, weight, labels, chunk_rows=4)
    assert torch.allclose(ours, reference(h, weight, labels, 1.0), rtol=1e-6)


# --------------------------------------------------------------------------------------
# The trainer's loss on a LoRA model: frozen head, so the fused path runs
# --------------------------------------------------------------------------------------


def _lora_trainer(tiny_llama_dir, tmp_path, bf16: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from llama_sft.training.trainer import SFTTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                             init_lora_weights=False))
    args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none",
                             bf16=bf16)
    return model, SFTTrainer(model=model, args=args)


def _batch(tokenizer, tmp_path):
    from helpers import small_dataset

    from llama_sft.data.batching import PadCollator
    from llama_sft.data.loader import load_examples
    from llama_sft.data.tokenize import tokenize_examples

    rows = tokenize_examples(load_examples(small_dataset(tmp_path, 6)), tokenizer, max_length=256)
    return PadCollator(tokenizer.pad_token_id)(rows)


def test_trainer_loss_and_lora_gradients_match_the_models_own_loss(tiny_llama_dir, tokenizer,
                                                                   tmp_path):
    model, trainer = _lora_trainer(tiny_llama_dir, tmp_path, bf16=False)
    from llama_sft.modeling.loss import fusable_head

    assert fusable_head(model.get_base_model().lm_head)
    batch = _batch(tokenizer, tmp_path)
    model.train()
    expected = model(**batch, use_cache=False).loss
    expected.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ours = trainer.compute_loss(model, batch)
    ours.backward()
    assert torch.allclose(ours, expected, rtol=1e-5), (ours, expected)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, want[n], rtol=1e-4, atol=1e-7), n


def test_lora_input_cast_is_off_only_under_autocast_and_changes_nothing(tiny_llama_dir, tokenizer,
                                                                        tmp_path, monkeypatch):
    import contextlib

    from peft.tuners.tuners_utils import BaseTunerLayer

    model, trainer = _lora_trainer(tiny_llama_dir, tmp_path, bf16=True)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    seen = []
    layers[0].register_forward_pre_hook(lambda m, a: seen.append(m.cast_input_dtype_enabled))
    batch = _batch(tokenizer, tmp_path)
    model.train()

    def run(autocast):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = trainer.compute_loss(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.requires_grad}

    run(False)
    fast = run(True)
    assert seen == [True, False]  # the cast stays on without autocast, off under it
    assert all(m.cast_input_dtype_enabled for m in layers)  # and is restored afterwards
    monkeypatch.setattr(trainer, "_no_lora_input_cast", lambda m: contextlib.nullcontext())
    with_cast = run(True)
    assert seen[-1] is True
    assert torch.equal(fast[0], with_cast[0])
    for n in fast[1]:
        assert torch.equal(fast[1][n], with_cast[1][n]), n


# --------------------------------------------------------------------------------------
# Grouped batches
# --------------------------------------------------------------------------------------


def padding_share(order, lengths, batch):
    padded = real = 0
    for s in range(0, len(order), batch):
        b = [lengths[i] for i in order[s:s + batch]]
        padded += max(b) * len(b)
        real += sum(b)
    return 1 - real / padded


@pytest.mark.parametrize("n,batch", [(24, 4), (25, 4), (1000, 8), (3, 4)])
def test_grouped_order_is_a_permutation_with_the_longest_batch_first(n, batch):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 500, (n,), generator=g).tolist()
    order = grouped_length_indices(lengths, batch, generator=torch.Generator().manual_seed(5))
    assert sorted(order) == list(range(n))
    assert max(lengths[i] for i in order[:batch]) == max(lengths)


def test_grouped_batches_pad_less_than_transformers_on_a_small_set():
    from transformers.trainer_pt_utils import get_length_grouped_indices

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(60, 500, (24,), generator=g).tolist()
    ours, theirs = [], []
    for seed in range(20):
        ours.append(padding_share(grouped_length_indices(
            lengths, 4, generator=torch.Generator().manual_seed(seed)), lengths, 4))
        theirs.append(padding_share(get_length_grouped_indices(
            lengths, 4, generator=torch.Generator().manual_seed(seed)), lengths, 4))
    assert statistics.mean(ours) < 0.1 < statistics.mean(theirs)


def test_grouped_order_is_seeded_and_batches_are_shuffled():
    lengths = list(range(100, 148))
    a = grouped_length_indices(lengths, 4, generator=torch.Generator().manual_seed(1))
    b = grouped_length_indices(lengths, 4, generator=torch.Generator().manual_seed(1))
    c = grouped_length_indices(lengths, 4, generator=torch.Generator().manual_seed(2))
    assert a == b and a != c
    firsts = [lengths[a[i]] for i in range(0, len(a), 4)]
    # not longest-to-shortest after the first batch
    assert firsts[1:] != sorted(firsts[1:], reverse=True)


def test_sampler_uses_the_global_rng_like_transformers():
    s = GroupedLengthSampler(list(range(10, 50)), 4)
    torch.manual_seed(3)
    a = list(s)
    torch.manual_seed(3)
    assert list(s) == a and len(s) == 40
