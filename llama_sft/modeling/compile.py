"""Regional compilation for training (--torch-compile): torch.compile on each decoder layer.

Every decoder layer runs the same code, so dynamo compiles it once (a handful of graphs: the
first layer's input needs no gradient, a batch without padding has no mask) and reuses it for
all layers, instead of compiling the whole model; `dynamic=True` keeps one graph for every
padded width. Inductor fuses the memory-bound work between the matmuls (RMSNorm, RoPE, SiLU,
residual adds, casts) and keeps the fused intermediates in fp32, so a compiled bf16 run's
losses follow an fp32-weight run's, not an eager bf16 run's (bench/compile_numerics.py:
within 0.4% per step of fp32 over 12 steps; eager bf16 is 1.7% higher on average).

Compiled graphs are for training only: evaluation and generation run eager (SFTTrainer
.evaluate under `eager()`, and `uncompile` after training), so their no-grad and KV-cache
shapes never compile.

What it costs and pays on this CPU is in bench/RESULTS.md; `auto` compiles only where that
measurement says it pays (recipe.resolve_compile)."""

from __future__ import annotations

import contextlib
from typing import Iterator

# Optimizer steps from which --torch-compile auto compiles on a CPU: the compile time (once)
# against the time each step saves, measured in bench/RESULTS.md ("Compiled decoder layers").
AUTO_MIN_STEPS = 250


def decoder_layers(model) -> list:
    """The decoder layers of a (peft-wrapped) causal LM, or [] if it has none we know of."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    return list(layers) if layers is not None else []


def compile_layers(model) -> int:
    """torch.compile each decoder layer in place (dynamic shapes); returns how many."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def uncompile(model) -> None:
    """Back to eager for every decoder layer (nn.Module.compile keeps the compiled call apart
    from the module's own, so nothing else changes)."""
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run compiled modules eagerly inside this block (no compile, no recompile)."""
    import torch

    with torch.compiler.set_stance("force_eager"):
        yield
