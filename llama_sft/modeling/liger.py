"""Liger kernels (the `liger-kernel` package) for training on a CUDA GPU: fused RMSNorm, RoPE and
SwiGLU as Triton kernels, patched into a loaded LLaMA before LoRA is added (`--liger`).

Liger's cross-entropy and fused linear cross-entropy stay off: the trainer never asks the
model for a loss or for logits beyond one position; its own head (modeling/loss.py) already
runs fused and chunked at the supervised positions only, with the step-wide normalisation of
trainer.compute_loss.

Liger patches transformers' modeling_llama module as well as the model (RoPE is a module-level
function there), so the patch holds for every LLaMA the process builds afterwards: meant for a
training process. Imports liger_kernel (and so triton) only when asked to apply it."""

from __future__ import annotations

import logging

from llama_sft.errors import ConfigError

logger = logging.getLogger("llama_sft")

# Model types apply_liger_kernel_to_llama patches correctly (SmolLM2 and every Llama 2/3 here).
LIGER_MODEL_TYPES = ("llama",)


def liger_import_problem() -> str | None:
    """None when liger_kernel's transformers patches import (it needs triton), else why not."""
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or triton failing on import
        return f"{type(e).__name__}: {e}"
    return None


def apply_liger(model, choice: str) -> bool:
    """Liger's RMSNorm, RoPE and SwiGLU on `model` (unwrapped, before LoRA); True when applied.
    A model type Liger's LLaMA patch does not cover: off under 'auto' (logged), a ConfigError
    under 'on'."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in LIGER_MODEL_TYPES:
        why = (f"Liger's patch here covers {', '.join(LIGER_MODEL_TYPES)} models; this one is "
               f"{model_type!r}")
        if choice == "on":
            raise ConfigError(f"--liger on: {why}; use --liger auto or off")
        logger.info("liger: off (%s)", why)
        return False
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model)
    return True
