"""A plain model to generate with after (Q)LoRA training: the base's 4-bit or 8-bit linears
de-quantized into ordinary nn.Linear layers in the compute dtype, the LoRA adapter merged into
them. The model it is built from (the training model) is left as it is.

    with generation_model(model) as gen:      # the plain copy, or `model` where none is built
        generate(gen, tokenizer, prompts)

Why: unmerged LoRA adds two small matmuls, dtype casts and a Python detour to each of the
model's linear layers (210 on the 135M model), and bitsandbytes' 4-bit linears de-quantize
their weight on every call; at decode time both dominate, and the tuned model generated 3x
slower than its base (figures: bench/RESULTS.md). Tensors that need no change (norms, an
embedding already in the compute dtype) are shared with the original, not copied.

Memory: the copy holds every adapted linear layer in the compute dtype: small for the 135M
model, but on a 7B 4-bit base about 13 GB on top of the 4-bit model. It is built only when it
fits in what the device has free (`ROOM_SHARE` of it, the rest left for the KV cache); otherwise
generation goes through the model itself, as before, and the log says so.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
from typing import Any, Callable, Iterator

import torch

logger = logging.getLogger("llama_sft")

ROOM_SHARE = 0.8  # of the free memory the copy may take; the KV cache and activations get the rest


class _Unsupported(Exception):
    """A layer the copy cannot reproduce (DoRA, LoRA bias, other adapter types, CPU-packed
    4-bit weights): generation falls back to the model itself."""


def _bnb_kind(module) -> str | None:
    kind = type(getattr(module, "weight", None)).__name__
    return {"Params4bit": "4bit", "Int8Params": "8bit"}.get(kind)


def _linear_weight(module) -> torch.Tensor:
    """The weight a linear layer computes with, de-quantized, in fp32."""
    kind = _bnb_kind(module)
    if kind is None:
        return module.weight.detach().float()
    state = getattr(module.weight, "quant_state", None)
    if kind == "4bit" and getattr(state, "packing_format_for_cpu", False):
        # Repacked in place by an eval-mode forward on an AVX512-BF16 CPU (load.py prevents it
        # for training models); peft's de-quantizer reads the original layout only.
        raise _Unsupported("4-bit weights repacked for bitsandbytes' CPU inference kernel")
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(module.weight, state=getattr(module, "state", None)).float()


def _lora_weight(layer) -> torch.Tensor:
    """A LoRA layer's base weight plus the scaled B @ A of each active adapter, summed in fp32;
    the base weight alone inside peft's disable_adapter()."""
    if layer.merged_adapters:
        raise _Unsupported("an adapter is already merged into the base weights")
    w = _linear_weight(layer.get_base_layer())
    if layer.disable_adapters:
        return w
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if layer.use_dora.get(name) or getattr(layer, "lora_bias", {}).get(name):
            raise _Unsupported("DoRA or LoRA bias")
        w = w + layer.get_delta_weight(name).float()
    return w


def _is_lora(module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer) and hasattr(module, "get_base_layer")


def _is_other_peft(module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer) or type(module).__name__ in (
        "ModulesToSaveWrapper", "TrainableTokensWrapper")


Entry = tuple[str, int, Callable[[], torch.Tensor], bool]  # name, new bytes, make, is parameter


def _entries(module, prefix: str, dtype, cache: dict) -> Iterator[Entry]:
    """Every tensor of the plain copy: its name, the bytes it adds (0 when shared with the
    original), and how to make it. Parameters shared by two modules (tied embeddings) stay
    shared: `cache` maps the original's id to the converted tensor."""
    size = torch.empty((), dtype=dtype).element_size()
    if _is_lora(module) or _bnb_kind(module):
        base = module.get_base_layer() if _is_lora(module) else module
        n_out, n_in = base.out_features, base.in_features
        make = ((lambda: _lora_weight(module).to(dtype)) if _is_lora(module)
                else (lambda: _linear_weight(module).to(dtype)))
        yield prefix + "weight", n_out * n_in * size, make, True
        if base.bias is not None:
            yield prefix + "bias", n_out * size, lambda: base.bias.detach().to(dtype), True
        return
    if _is_other_peft(module):
        raise _Unsupported(f"{type(module).__name__} layers")
    for name, p in module._parameters.items():
        if p is not None:
            new = 0 if p.dtype == dtype or id(p) in cache else p.numel() * size
            cache.setdefault(id(p), None)
            yield prefix + name, new, lambda p=p: _converted(p, dtype, cache), True
    for name, b in module._buffers.items():
        if b is not None:  # kept in their own dtype (RoPE's inv_freq stays fp32)
            yield prefix + name, 0, lambda b=b: b, False
    for name, child in module._modules.items():
        if child is not None:
            yield from _entries(child, f"{prefix}{name}.", dtype, cache)


def _converted(p: torch.Tensor, dtype, cache: dict) -> torch.Tensor:
    t = cache.get(id(p))
    if t is None:
        t = cache[id(p)] = p.detach().to(dtype)
    return t


def _set_tensor(model, name: str, tensor: torch.Tensor, is_param: bool) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if is_param:
        owner._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attr] = tensor


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def needs_plain_copy(model) -> bool:
    """Whether `model` generates through LoRA or bitsandbytes layers (so a plain copy pays)."""
    return any(_is_lora(m) or _bnb_kind(m) for m in _unwrap(model).modules())


def compute_dtype(model) -> torch.dtype:
    """The dtype the base model's linear layers compute in: a 4-bit layer's compute dtype, an
    8-bit model's load dtype, else the (base) weight dtype of its first linear layer."""
    for m in _unwrap(model).modules():
        base = m.get_base_layer() if _is_lora(m) else m
        kind = _bnb_kind(base)
        if kind == "4bit":
            return base.compute_dtype or base.weight.quant_state.dtype
        if kind == "8bit":
            return getattr(_unwrap(model).config, "dtype", None) or torch.float16
        if isinstance(base, torch.nn.Linear):
            return base.weight.dtype
    return torch.float32


def free_memory_bytes(device: torch.device) -> int | None:
    """What the device can still give: the GPU's free memory plus what torch's allocator holds
    unused; on a CPU, MemAvailable. None where it cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _empty_like_config(lm, dtype):
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(lm.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.use_cache = True
    with torch.device("meta"):
        new = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=getattr(config, "_attn_implementation", None))
    new.generation_config = copy.deepcopy(lm.generation_config)
    return new


def plain_copy(model, *, dtype: torch.dtype | None = None):
    """`model` (a PeftModel or a transformers model, quantized or not) as a plain transformers
    model in `dtype` (default: compute_dtype) for generation: LoRA merged (left out inside peft's
    disable_adapter), bitsandbytes weights de-quantized. None (logged) when a layer cannot be reproduced or
    the copy would not fit in ROOM_SHARE of the free memory."""
    lm = _unwrap(model)
    dtype = dtype or compute_dtype(model)
    device = next(lm.parameters()).device
    try:
        entries = list(_entries(lm, "", dtype, {}))
    except _Unsupported as e:
        logger.info("generating through the model as it is (no merged copy: %s)", e)
        return None
    need = sum(n for _, n, _, _ in entries)
    free = free_memory_bytes(device)
    if free is not None and need > ROOM_SHARE * free:
        logger.info("generating through the model as it is: a merged %s copy needs %.0f MB, "
                    "%.0f MB free", str(dtype).replace("torch.", ""), need / 2**20, free / 2**20)
        return None
    new = _empty_like_config(lm, dtype)
    with torch.no_grad():
        for name, _, make, is_param in entries:
            _set_tensor(new, name, make().to(device), is_param)
    left = [n for n, t in list(new.named_parameters()) + list(new.named_buffers())
            if t.is_meta]
    if left:
        raise RuntimeError(f"plain_copy left {len(left)} tensors unset (first: {left[0]})")
    return new.eval()


@contextlib.contextmanager
def generation_model(model) -> Iterator[Any]:
    """The model to generate with: plain_copy(model) where it pays and fits, freed on exit;
    else `model` itself."""
    gen = plain_copy(model) if needs_plain_copy(model) else None
    if gen is None:
        yield model
        return
    try:
        yield gen
    finally:
        del gen
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def generation_route(model, gen_model) -> str:
    """What generated, in words, for the results files."""
    if gen_model is model:
        return "the model as loaded" + (" (LoRA unmerged, quantized layers as they are)"
                                        if needs_plain_copy(model) else "")
    dtype = str(next(gen_model.parameters()).dtype).replace("torch.", "")
    return f"a plain {dtype} copy (adapter merged, quantized weights de-quantized)"
