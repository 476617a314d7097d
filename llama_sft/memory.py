"""GPU memory estimates per model size and method (full, LoRA, QLoRA 8/4-bit), and what
`llama_config.py` prints: the resolved config with the source of each value."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any, Sequence

from llama_sft.config import (
    ModelSpec,
    TrainArgs,
    config_to_dict,
    get_spec,
    resolve_config,
    validate,
)
from llama_sft.errors import ConfigError

GIB = 1024**3


@dataclass
class MemoryEstimate:
    method: str
    weights_gb: float
    trainable_params: int
    gradients_gb: float
    optimizer_gb: float
    activations_gb: float
    overhead_gb: float

    @property
    def total_gb(self) -> float:
        return (self.weights_gb + self.gradients_gb + self.optimizer_gb + self.activations_gb
                + self.overhead_gb)


def estimate_memory(spec: ModelSpec, method: str, *, batch_size: int, seq_len: int,
                    lora_r: int | None = None, gradient_checkpointing: bool = True) -> MemoryEstimate:
    """GPU memory for one training process, in GiB.

    Formula (mixed-precision AdamW):
    - weights: full and LoRA keep bf16 weights (2 B/param); QLoRA keeps NF4 (0.5 B/param) plus
      double-quantized constants (~0.127 bit/param, QLoRA paper sec. 3) and bf16 norms/embeddings
      are counted as 4-bit too for simplicity; 8-bit keeps 1 B/param.
    - full fine-tune: bf16 gradients (2 B) + fp32 master weights (4 B) + Adam m, v (8 B):
      16 B/param in all (ZeRO paper's 16 bytes per parameter).
    - LoRA/QLoRA: r*(in+out) trainable params on every linear layer; each costs fp32 weight +
      grad + Adam m, v = 16 B.
    - GQA enters through the shapes: k_proj and v_proj are hidden x (KV heads * head dim), in
      the parameter count (weights, full fine-tune states) and in LoRA's trainable params.
    - activations: bf16, per layer per token ~34*h bytes without recomputation (Korthikanti et
      al. 2022, flash attention so no s^2 term); with gradient checkpointing only the layer input
      (2*h bytes) per layer plus one layer's full activations; plus fp32 logits (4*V bytes per
      token, twice for the softmax gradient). The logits scale with the vocabulary: ~1 MB a
      token at Llama 3's 128,256, 4x Llama 2's 32,000, the largest activation term for the
      small models.
    - overhead: CUDA context and allocator fragmentation, ~1 GiB + 5% of the rest.
    """
    n = spec.n_params
    r = lora_r or spec.lora_r
    tokens = batch_size * seq_len
    h = spec.hidden_size
    if method == "full":
        weights = 2.0 * n
        trainable = n
        grads = 2.0 * n
        optim = 12.0 * n
    elif method in ("lora", "qlora", "qlora-8bit"):
        trainable = spec.lora_params(r)
        bytes_per = {"lora": 2.0, "qlora": 0.5 + 0.127 / 8, "qlora-8bit": 1.0}[method]
        weights = bytes_per * n + 4.0 * trainable
        grads = 4.0 * trainable
        optim = 8.0 * trainable
    else:
        raise ConfigError(f"unknown method {method!r}; use full, lora, qlora or qlora-8bit")
    if gradient_checkpointing:
        act = tokens * (2 * h * spec.n_layers + 34 * h)
    else:
        act = tokens * 34 * h * spec.n_layers
    act += tokens * spec.vocab_size * 4 * 2
    sub = weights + grads + optim + act
    overhead = 1.0 * GIB + 0.05 * sub
    return MemoryEstimate(method, weights / GIB, trainable, grads / GIB, optim / GIB, act / GIB,
                          overhead / GIB)


def detect_gpus() -> list[tuple[str, float]]:
    """(name, total GiB) for each visible CUDA device; empty without torch or CUDA."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append((p.name, p.total_memory / GIB))
    return out


def format_estimate(spec: ModelSpec, *, batch_size: int, seq_len: int, lora_r: int,
                    gradient_checkpointing: bool, gpus: Sequence[tuple[str, float]]) -> str:
    lines = [f"Memory estimate for {spec.size} ({spec.n_params / 1e9:.2f}B params), batch "
             f"{batch_size} x {seq_len} tokens, LoRA r={lora_r}, gradient checkpointing "
             f"{'on' if gradient_checkpointing else 'off'} (GiB per GPU):",
             f"{'method':<11}{'weights':>9}{'grads':>8}{'optim':>8}{'activ':>8}{'other':>8}"
             f"{'total':>9}  trainable"]
    ests = [estimate_memory(spec, m, batch_size=batch_size, seq_len=seq_len, lora_r=lora_r,
                            gradient_checkpointing=gradient_checkpointing)
            for m in ("full", "lora", "qlora-8bit", "qlora")]
    for e in ests:
        lines.append(f"{e.method:<11}{e.weights_gb:>9.1f}{e.gradients_gb:>8.1f}{e.optimizer_gb:>8.1f}"
                     f"{e.activations_gb:>8.1f}{e.overhead_gb:>8.1f}{e.total_gb:>9.1f}  "
                     f"{e.trainable_params / 1e6:.1f}M")
    if gpus:
        per_gpu = min(g for _, g in gpus)
        lines.append(f"Detected {len(gpus)} GPU(s): " + ", ".join(f"{n} ({g:.0f} GiB)" for n, g in gpus))
        fitting = [e for e in ests if e.total_gb <= per_gpu * 0.95]
        if fitting:
            best = fitting[0]
            flag = {"full": "(full fine-tune)", "lora": "(no quantization flag)",
                    "qlora-8bit": "--use-8bit", "qlora": "--use-4bit"}[best.method]
            lines.append(f"Fits: {', '.join(e.method for e in fitting)}. Recommended: "
                         f"{best.method} {flag}.")
        else:
            lines.append("Nothing fits one GPU: shard with FSDP (configs/accelerate_fsdp_qlora.yaml), "
                         "or lower --batch-size / --max-length and add --gradient-checkpointing.")
    else:
        lines.append("No CUDA GPU detected: on this machine only --model-size 135m is practical "
                     "(CPU). Recommended on a GPU: " +
                     ("--use-4bit (QLoRA)" if spec.size != "135m" else "LoRA without quantization"))
    return "\n".join(lines)


def format_resolved(cfg: Any, spec: ModelSpec) -> str:
    lines = [f"Model size {spec.size}: base model {cfg.base_model or spec.hub_id}",
             f"  parameters: {spec.n_params / 1e9:.2f}B",
             f"  architecture: {spec.architecture}",
             f"  minimum GPU memory: {spec.min_gpu_memory_gb:g} GB; recommended: {spec.recommended_gpu}",
             "Resolved config (source in brackets):"]
    sources = getattr(cfg, "_sources", {})
    for k, v in config_to_dict(cfg).items():
        lines.append(f"  {k:<28} {v!r:<24} [{sources.get(k, 'built-in default')}]")
    return "\n".join(lines)


def show_config(args: argparse.Namespace, *, estimate: bool, as_json: bool) -> str:
    """What `llama_config.py` prints: the resolved config (as a table with the source of each
    value, or as JSON), and with `estimate` the memory estimate for the GPUs found."""
    cfg = resolve_config(TrainArgs, args)
    validate(cfg)
    spec = get_spec(cfg.model_size)
    text = json.dumps(config_to_dict(cfg), indent=2) if as_json else format_resolved(cfg, spec)
    if estimate:
        text += "\n\n" + format_estimate(
            spec, batch_size=cfg.batch_size, seq_len=cfg.max_length, lora_r=cfg.lora_r,
            gradient_checkpointing=cfg.gradient_checkpointing or spec.size != "135m",
            gpus=detect_gpus())
    return text
