"""llama_sft.modeling.attention's "sdpa_recompute": the same attention as SDPA, values and
gradients."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from llama_sft.modeling.attention import recompute_attention_forward, register


class Module:
    num_key_value_groups = 3
    is_causal = True
    training = True


def padded_causal_mask(lengths, t):
    """What transformers' sdpa_mask gives for right padding: causal over each row's real keys."""
    mask = torch.zeros(len(lengths), 1, t, t, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, 0, :, :n] = torch.ones(t, n, dtype=torch.bool).tril()
        mask[i, 0, n:, :n] = True
    return mask


def run(fn, q0, k0, v0, mask, w):
    q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
    out, _ = fn(Module(), q, k, v, mask, scaling=q0.shape[-1] ** -0.5)
    (out.float() * w).sum().backward()
    return [x.detach().float() for x in (out, q.grad, k.grad, v.grad)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("masked", [True, False])
def test_values_and_gradients_match_sdpa(dtype, tol, masked):
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, t, d = 3, 6, 2, 40, 16
    q0, k0, v0 = (torch.randn(b, h, t, d, generator=g).to(dtype) for h in (hq, hkv, hkv))
    w = torch.randn(b, t, hq, d, generator=g)
    mask = padded_causal_mask([40, 23, 7], t) if masked else None
    want = run(sdpa_attention_forward, q0, k0, v0, mask, w)
    got = run(recompute_attention_forward, q0, k0, v0, mask, w)
    for name, a, c in zip(("output", "dq", "dk", "dv"), want, got):
        assert ((a - c).norm() / a.norm()) < tol, name
        assert torch.isfinite(c).all(), name


def test_without_gradients_it_is_sdpa_itself():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 5, 8, generator=g) for h in (6, 2, 2))
    with torch.no_grad():
        a, _ = recompute_attention_forward(Module(), q, k, v, None)
        c, _ = sdpa_attention_forward(Module(), q, k, v, None)
    assert torch.equal(a, c)


def test_training_a_model_with_it_gives_sdpas_loss_and_gradients(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    name = register()
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    grads = {}
    for impl in ("sdpa", name):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        model.set_attn_implementation(impl)
        assert model.config._attn_implementation == impl
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        grads[impl] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    (l1, g1), (l2, g2) = grads["sdpa"], grads[name]
    assert torch.allclose(l1, l2, rtol=1e-5)
    for n in g1:
        assert torch.allclose(g1[n], g2[n], rtol=1e-3, atol=1e-6), n
