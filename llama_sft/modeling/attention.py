"""Attention for CPU training: SDPA's memory with eager attention's speed.

On a CPU, PyTorch's fused SDPA kernel keeps little for backward (q, k, v, the output and a
log-sum-exp per row), but its backward runs at a fraction of the matmul rate (2.6x its forward
in bench/RESULTS.md's profile). Eager attention is faster on the CPU because its backward is a
few large batched matmuls, but it keeps the [batch, heads, T, T] probabilities for backward in
fp32 and bf16: at batch 4 and ~400 tokens, +1.6 GB on the 135M model, growing with T^2.

`recompute_attention_forward` does both: the forward is eager's arithmetic (scores plus the
additive mask, softmax in fp32, probabilities in the input dtype times V) and keeps only q, k, v
and the mask; the backward recomputes the probabilities (one extra QK^T matmul and softmax) and
then runs eager's backward as batched matmuls. Grouped-query attention is handled by folding
the query groups into the rows of each key/value head, so K and V are never repeated.

It is registered with transformers as the attention implementation "sdpa_recompute" (with
SDPA's mask); without gradients (evaluation, generation) or with attention dropout it calls
SDPA itself."""

from __future__ import annotations

import torch

NAME = "sdpa_recompute"


def _probs(qs, k, bias):
    """Eager attention's probabilities, fp32 [B, Hkv, G*T, S]. qs: the scaled queries
    [B, Hkv, G*T, D]; bias: the additive mask [B|1, 1, 1, T, S] (0 or -inf) or None."""
    s = torch.matmul(qs, k.transpose(-1, -2))
    if bias is not None:
        b, hkv, gt, sl = s.shape
        t = bias.shape[-2]
        s = (s.view(b, hkv, gt // t, t, sl) + bias).view(b, hkv, gt, sl)
    return torch.softmax(s, dim=-1, dtype=torch.float32)


class _RecomputeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qs, k, v, bias):
        # qs [B, Hkv, G*T, D] (queries times the softmax scale); k, v [B, Hkv, S, D]
        with torch.autocast(qs.device.type, enabled=False):
            p = _probs(qs, k, bias)
            out = torch.matmul(p.to(v.dtype), v)
        ctx.save_for_backward(qs, k, v, bias)
        return out

    @staticmethod
    def backward(ctx, d_out):
        qs, k, v, bias = ctx.saved_tensors
        with torch.autocast(qs.device.type, enabled=False):
            d_out = d_out.to(v.dtype)
            p = _probs(qs, k, bias)  # recomputed: nothing [T, T]-sized was kept
            d_v = torch.matmul(p.to(v.dtype).transpose(-1, -2), d_out)
            d_p = torch.matmul(d_out, v.transpose(-1, -2))
            d_s = torch._softmax_backward_data(d_p.float(), p, -1, torch.float32).to(qs.dtype)
            d_qs = torch.matmul(d_s, k)
            d_k = torch.matmul(d_s.transpose(-1, -2), qs)
        return d_qs, d_k, d_v, None


def recompute_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                scaling: float | None = None, is_causal: bool | None = None,
                                **kwargs):
    """transformers attention interface: query [B, Hq, T, D], key/value [B, Hkv, S, D];
    returns ([B, T, Hq, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                              or value.requires_grad)
    if (not needs_grad or dropout > 0.0 or kwargs.get("softcap") is not None
            or kwargs.get("position_bias") is not None or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    b, hq, t, d = query.shape
    hkv, sl = key.shape[1], key.shape[2]
    g = hq // hkv
    scale = scaling if scaling is not None else d ** -0.5
    mask = attention_mask
    if mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal and t > 1:
            mask = torch.ones(t, sl, dtype=torch.bool, device=query.device).tril(sl - t)
            mask = mask.view(1, 1, t, sl)
    elif mask.dtype != torch.bool:
        mask = mask == 0  # an additive float mask: 0 where attended
    dtype = query.dtype
    bias = None
    if mask is not None:  # additive, in the compute dtype, with a group axis to broadcast over
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(dtype).min).unsqueeze(2)  # eager's fill: no NaN on empty rows
    qs = (query * scale).reshape(b, hkv, g * t, d)
    out = _RecomputeAttention.apply(qs, key.to(dtype), value.to(dtype), bias)
    return out.view(b, hq, t, d).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register "sdpa_recompute" with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, recompute_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
