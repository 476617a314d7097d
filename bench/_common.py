"""Shared pieces of the benchmarks in bench/: the data, the matmul peak, FLOP counts, memory.

Not a toolkit module: only the scripts in bench/ import it. They run from the repository root
(`python3 bench/bench_train.py`), so the toolkit's modules are imported from there.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The GSM8K training set beside the project (see ../shared/data/README.md), and the toolkit's
# own sample data.
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl"
SAMPLE_DATA = ROOT / "sft_output" / "sft_dataset.jsonl"
GSM8K_FIELD_MAP = "question=instruction,answer=response"


def quiet_environment() -> None:
    """No hub, no W&B, no tokenizer threads fighting the benchmark for the two cores."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def bench_examples(*, n_train: int, n_heldout: int, seed: int = 0,
                   gsm8k: Path = GSM8K, sample: Path = SAMPLE_DATA):
    """(train, heldout) lists of llama_dataset.Example: GSM8K rows (question -> instruction,
    answer -> response) plus the toolkit's sample data, shuffled with `seed`; the held-out rows
    come from the end of the shuffled list and never overlap the training rows."""
    from llama_sft.data.loader import load_examples

    if not gsm8k.is_file():
        raise SystemExit(f"error: {gsm8k} not found (the GSM8K rows live in ../shared/data/ "
                         "beside the project)")
    rows = load_examples(gsm8k, field_map=GSM8K_FIELD_MAP) + load_examples(sample)
    random.Random(seed).shuffle(rows)
    if n_train + n_heldout > len(rows):
        raise SystemExit(f"error: asked for {n_train}+{n_heldout} rows, only {len(rows)} exist")
    return rows[:n_train], rows[len(rows) - n_heldout:]


def matmul_peak_flops(dtype_name: str, *, n: int = 2048, iters: int = 10, repeats: int = 3,
                      device: str = "cpu") -> float:
    """Best FLOP/s of an n x n x n matmul loop (the protocol's 2048 x 2048 measure of the peak)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        torch.matmul(a, b, out=out)
    sync()
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        sync()
        dt = time.perf_counter() - t0
        best = max(best, 2 * n**3 * iters / dt)
    return best


def _proc_status_mb(key: str) -> float | None:
    """A kB field of /proc/self/status (VmHWM, VmRSS) in MiB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM), in MiB."""
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    """This process's resident set size now (VmRSS), in MiB; NaN where there is no /proc."""
    rss = _proc_status_mb("VmRSS")
    return float("nan") if rss is None else rss


def model_shape(model) -> dict[str, Any]:
    """What the FLOP count needs: frozen matmul parameters of the decoder (N_body), of the LM
    head (N_head), trainable LoRA parameters, layers and the attention width."""
    import torch

    body = head = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or "lora_" in name:
            continue
        n = int(mod.in_features) * int(mod.out_features)
        if name.endswith("lm_head"):
            head += n
        else:
            body += n
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {"n_body": body, "n_head": head, "n_lora": int(lora),
            "n_layers": cfg.num_hidden_layers, "d_attn": heads * head_dim,
            "hidden_size": cfg.hidden_size}


def training_flops(shape: dict[str, Any], *, processed: int, supervised: int,
                   causal_pairs: int) -> float:
    """Model FLOPs of LoRA training (PERFORMANCE.md): 4 per frozen decoder matmul parameter and
    processed token (forward + input gradient), 6 per LoRA parameter and processed token, 4 per
    LM-head parameter and supervised token (the only positions the loss needs), and causal
    attention: forward 2*d*L*(L+1) per layer per sequence (QK^T and AV over the L*(L+1)/2
    visible pairs), times 3 for forward + backward. `causal_pairs` = sum over sequences of
    L*(L+1)/2. Padding and logits at unsupervised positions are never counted."""
    attn = 3 * 4 * shape["d_attn"] * shape["n_layers"] * causal_pairs
    return (4.0 * shape["n_body"] * processed + 6.0 * shape["n_lora"] * processed
            + 4.0 * shape["n_head"] * supervised + attn)


def sequence_lengths(kwargs: dict[str, Any], args: Sequence[Any]) -> list[int]:
    """Lengths of the real (non-pad) sequences in one call of the decoder: from the attention
    mask, or, padding-free, from where position_ids restart at 0."""
    mask = kwargs.get("attention_mask")
    ids = kwargs.get("input_ids", args[0] if args else None)
    pos = kwargs.get("position_ids")
    if mask is not None and mask.dim() == 2:
        return [int(x) for x in mask.sum(dim=1).tolist()]
    if pos is not None and ids is not None and ids.shape[0] == 1:
        p = pos.reshape(-1).tolist()
        starts = [i for i, v in enumerate(p) if v == 0] + [len(p)]
        return [b - a for a, b in zip(starts, starts[1:]) if b > a]
    if ids is not None:
        return [int(ids.shape[1])] * int(ids.shape[0])
    return []


def fmt_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
