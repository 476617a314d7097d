"""The training loss at supervised positions only, and teacher-forced NLL per example.

Kept apart from the Trainer subclass so they can be tested and benchmarked on their own
(the length-grouped sampler is in data/batching.py):

- `supervised_cross_entropy`: the LM head and cross-entropy on the supervised rows of the final
  hidden states, in chunks, with the gradient with respect to the hidden states computed in the
  forward pass (the head is frozen under LoRA, so nothing else needs it). The [tokens, vocab]
  logits never exist whole: a 49k-word vocabulary at 700 supervised tokens is 137 MB of fp32
  logits, plus as much again for the softmax autograd keeps and for its gradient. The
  arithmetic is the same as `F.cross_entropy(head(h).float(), y, reduction="sum") * scale`
  under the same autocast: logits in the head's (autocast) dtype, softmax in fp32, the logit
  gradient scaled and cast back before the input-gradient matmul.
- `GroupedLengthSampler`: transformers' length-grouped order with megabatches that also group
  on small datasets (transformers uses len // (4 * batch) batches per megabatch, one batch on a
  set of fewer than 8 batches, so nothing is grouped), and the batches of each megabatch
  shuffled instead of longest to shortest."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from llama_sft.data.batching import PadCollator

DEFAULT_CHUNK_ROWS = 1024


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    dev = weight.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


class _FusedHeadCrossEntropy(torch.autograd.Function):
    """loss = scale * sum_i CE(hidden_i @ weight.T, labels_i); weight is frozen."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, scale: float, chunk_rows: int):
        dtype = _compute_dtype(weight)
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_rows):
                h = hidden[start:start + chunk_rows].to(dtype)
                y = labels[start:start + chunk_rows]
                logits = F.linear(h, w).float()
                lse = torch.logsumexp(logits, dim=-1)
                rows = torch.arange(y.shape[0], device=y.device)
                total += (lse - logits[rows, y]).sum()
                # softmax - onehot, scaled the way autograd would scale it, in place
                grad = logits.sub_(lse.unsqueeze(1)).exp_()
                grad[rows, y] -= 1.0
                grad.mul_(scale)
                grad_hidden[start:start + chunk_rows] = (grad.to(dtype) @ w).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        (grad_hidden,) = ctx.saved_tensors
        if not (grad_output.numel() == 1 and float(grad_output) == 1.0):
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        return grad_hidden, None, None, None, None


def supervised_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             scale: float = 1.0,
                             chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """scale x the summed cross-entropy of `hidden @ weight.T` against `labels`.

    hidden: [N, H] final hidden states at the supervised positions; weight: [V, H], the LM head
    (frozen); labels: [N]. Only [chunk_rows, V] logits exist at a time. With a head that
    trains, the plain path is used."""
    if weight.requires_grad or not (torch.is_grad_enabled() and hidden.requires_grad):
        if weight.requires_grad:
            logits = F.linear(hidden, weight).float()
            return F.cross_entropy(logits, labels, reduction="sum") * scale
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_rows):
            logits = F.linear(hidden[start:start + chunk_rows], weight).float()
            total = total + F.cross_entropy(logits, labels[start:start + chunk_rows],
                                            reduction="sum")
        return total * scale
    return _FusedHeadCrossEntropy.apply(hidden, weight, labels, float(scale), int(chunk_rows))


def fusable_head(head) -> bool:
    """A plain frozen nn.Linear without bias (not LoRA-wrapped, not quantized)."""
    return (type(head) is torch.nn.Linear and head.bias is None
            and not head.weight.requires_grad)


def per_example_nll(model, rows: Sequence[dict], pad_token_id: int, *,
                    batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed NLL in nats, supervised token count) per tokenized row (input_ids, labels,
    length), teacher-forced on the supervised tokens (labels != -100) only.

    The decoder runs on right-padded, length-sorted batches and the LM head only on the
    supervised positions: full logits for every position would take batch x length x vocab x 4
    bytes (16 x 512 x 49k x 4 = 1.6 GB for the embedded model)."""

    if not rows:
        return []
    collate = PadCollator(pad_token_id)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]), reverse=True)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = collate([rows[i] for i in idx])  # right padding: no position shift
                hidden = decoder(input_ids=batch["input_ids"].to(device),
                                 attention_mask=batch["attention_mask"].to(device)).last_hidden_state
                target = batch["labels"][:, 1:].to(device)  # position t predicts token t + 1
                supervised = target != -100
                h, y = hidden[:, :-1][supervised], target[supervised]
                nll = torch.cat([F.cross_entropy(head(h[s:s + DEFAULT_CHUNK_ROWS]).float(),
                                                 y[s:s + DEFAULT_CHUNK_ROWS], reduction="none")
                                 for s in range(0, h.shape[0], DEFAULT_CHUNK_ROWS)]
                                or [h.new_zeros(0, dtype=torch.float32)])
                sums = torch.zeros(len(idx), dtype=torch.float64, device=device)
                sums.index_add_(0, supervised.nonzero()[:, 0], nll.double())
                counts = supervised.sum(dim=1)
                for row, i in enumerate(idx):
                    out[i] = (float(sums[row]), int(counts[row]))
    finally:
        if was_training:
            model.train()
    return out


def mean_supervised_loss(model, rows: Sequence[dict[str, Any]], pad_token_id: int,
                         batch_size: int = 8) -> float:
    """Mean cross-entropy per supervised token (response + EOS), teacher-forced."""

    sums = per_example_nll(model, rows, pad_token_id, batch_size=batch_size)
    return sum(s for s, _ in sums) / max(sum(n for _, n in sums), 1)
