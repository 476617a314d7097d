"""Microbenchmarks of levers for the toolkit's training step, measured in isolation.

    python3 bench/micro_levers.py                     # all variants, 2 rounds x 3 steps each
    python3 bench/micro_levers.py --variants baseline,no_input_cast --rounds 3 --threads 1

One process holds one copy of the embedded 135M per variant and times full optimizer steps
(forward + backward + fused AdamW) of the toolkit's loss (final-norm hook, logits_to_keep=1, LM
head at supervised positions only, fp32 cross-entropy) on one fixed batch of GSM8K rows padded
by llama_sft.data.batching.PadCollator; variants are alternated step block by step block (A B C ..., then
reversed), so drift on the shared machine falls on all of them alike.

Variants (baseline = what the toolkit's trainer does today on a CPU with bf16):
  baseline        bf16 base weights, fp32 LoRA (peft's autocast_adapter_dtype default), bf16
                  autocast, lora_dropout of the 135m config, SDPA, peft casts each LoRA input
                  to fp32 first (then autocast casts it back to bf16 for the matmul); the
                  model's forward with logits_to_keep=1 and a hook on the final norm
  decoder_only    the same loss, but calling the decoder (LlamaModel, already normed output)
                  instead of LlamaForCausalLM.forward: no hook, and no LM head on the last
                  position (whose [B,1,576] slice makes matmul expand and copy the 49,152 x
                  576 head weight once per row)
  no_input_cast   baseline with peft's input cast off (module.cast_input_dtype_enabled=False,
                  what peft.helpers.disable_input_dtype_casting does): the values are the same,
                  the two copies of every LoRA input per layer are gone
  bf16_adapters   LoRA weights in bf16 too (get_peft_model(autocast_adapter_dtype=False));
                  AdamW then updates bf16 weights (precision risk: see RESULTS.md)
  pure_bf16       bf16 adapters and no autocast at all
  dropout_0.05    baseline with lora_dropout 0.05 (the 7B default) instead of 0
  eager_attention baseline with attn_implementation='eager' instead of SDPA
  one_thread      baseline with torch.set_num_threads(1) for its steps
  combined        decoder_only + no_input_cast + eager_attention
  compiled        baseline with torch.compile(model) (inductor, CPU); compile time reported apart
  regional        baseline with each decoder layer compiled as --torch-compile does
                  (llama_sft.modeling.compile.compile_layers: one graph, dynamic shapes)
It checks that no_input_cast gives the same loss as the baseline on the first step.

Also op-level timings: SDPA forward+backward with the padding mask against is_causal (no
mask), and three LoRA A projections of one input as three matmuls against one concatenated one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GSM8K, bench_examples, cpu_model_name, fmt_table, quiet_environment  # noqa: E402

VARIANTS = ("baseline", "decoder_only", "no_input_cast", "eager_attention", "bf16_adapters",
            "pure_bf16", "dropout_0.05", "one_thread", "combined", "compiled", "regional")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="micro_levers.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(v for v in VARIANTS
                                                  if v not in ("compiled", "regional")),
                   help=f"Comma-separated subset of {', '.join(VARIANTS)} (compiled is off by "
                        "default: minutes of compile time on 2 cores).")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="Timed steps per variant per round.")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--length-quantile", type=float, default=0.75,
                   help="The batch is --batch-size consecutive rows of the length-sorted data "
                        "at this quantile (as group_by_length batches them: similar lengths, "
                        "a little padding).")
    p.add_argument("--threads", type=int, help="torch threads for every variant (default: "
                                               "torch's choice; one_thread always uses 1).")
    p.add_argument("--no-ops", action="store_true", help="Skip the op-level timings.")
    p.add_argument("--gsm8k", default=str(GSM8K))
    return p


def make_variant(name: str, spec) -> dict[str, Any]:
    import torch

    from llama_sft.modeling.load import add_lora, load_model

    dropout = 0.05 if name == "dropout_0.05" else spec.lora_dropout
    model = load_model("smollm2-135m", for_training=True)
    if name in ("eager_attention", "combined"):
        model.set_attn_implementation("eager")
    torch.manual_seed(0)
    model = add_lora(model, r=spec.lora_r, alpha=spec.lora_alpha, dropout=dropout)
    if name in ("bf16_adapters", "pure_bf16"):
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    if name in ("no_input_cast", "combined"):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                m.cast_input_dtype_enabled = False
    model.train()
    base = model.get_base_model()
    v = {"name": name, "model": model, "norm": base.model.norm, "head": base.lm_head,
         "autocast": name != "pure_bf16", "threads": 1 if name == "one_thread" else None,
         "opt": torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                                  fused=True),
         "forward": model, "decoder_only": name in ("decoder_only", "combined")}
    if name == "compiled":
        v["forward"] = torch.compile(model)
    if name == "regional":
        from llama_sft.modeling.compile import compile_layers

        compile_layers(model)
    return v


def train_step(v: dict[str, Any], batch: dict[str, Any], saved: dict | None = None) -> float:
    """One optimizer step with the toolkit's loss (see llama_sft.training.trainer.SFTTrainer).
    With `saved`, also adds up the bytes of the distinct tensors autograd keeps for backward
    (the activation memory of the step) into saved["bytes"]."""
    import contextlib

    import torch
    import torch.nn.functional as F

    hooks = contextlib.nullcontext()
    if saved is not None:
        seen = saved.setdefault("storages", set())
        saved.setdefault("bytes", 0)

        if not seen:  # weights are not activations: their storages never count
            for p in v["model"].parameters():
                seen.add((p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()))

        def pack(t):
            try:
                st = t.untyped_storage()
                key = (st.data_ptr(), st.nbytes())
            except (RuntimeError, NotImplementedError):
                return t
            if key not in seen:
                seen.add(key)
                saved["bytes"] += st.nbytes()
            return t

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    captured = {}
    handle = v["norm"].register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    labels = batch["labels"][:, 1:]
    sup = labels != -100
    try:
        with hooks, torch.autocast("cpu", dtype=torch.bfloat16, enabled=v["autocast"]):
            if v["decoder_only"]:
                decoder = v["model"].get_base_model().model
                hidden = decoder(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state
            else:
                v["forward"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             use_cache=False, logits_to_keep=1)
                hidden = captured["h"]
            logits = v["head"](hidden[:, :-1][sup]).float()
            loss = F.cross_entropy(logits, labels[sup])
    finally:
        handle.remove()
    loss.backward()
    v["opt"].step()
    v["opt"].zero_grad(set_to_none=True)
    return float(loss.detach())


def op_timings(batch_lengths: list[int], reps: int = 5) -> list[list[Any]]:
    """SDPA fwd+bwd with a padding mask vs is_causal; 3 LoRA-A matmuls vs 1 concatenated."""
    import torch
    import torch.nn.functional as F

    rows = []
    b, t, h, d = len(batch_lengths), max(batch_lengths), 9, 64
    q, k, v = (torch.randn(b, h, t, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    pad = torch.zeros(b, t, dtype=torch.bool)
    for i, n in enumerate(batch_lengths):
        pad[i, :n] = True
    mask = (causal[None, None] & pad[:, None, None, :])

    def sdpa(use_mask):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if use_mask else None,
                                             is_causal=not use_mask)
        out.sum().backward()

    def timeit(fn, *a):
        fn(*a)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(*a)
            ts.append(time.perf_counter() - t0)
        return min(ts)

    for _ in range(2):  # alternate
        m = timeit(sdpa, True)
        c = timeit(sdpa, False)
    rows.append([f"SDPA fwd+bwd x1 layer [{b},{h},{t},{d}] bf16", f"mask {m * 1e3:.1f} ms",
                 f"is_causal {c * 1e3:.1f} ms", f"{m / c:.2f}x", f"x30 layers: {30 * (m - c):.2f} s"])
    x = torch.randn(b * t, 576, dtype=torch.bfloat16)
    a3 = [torch.randn(576, 16, dtype=torch.bfloat16) for _ in range(3)]
    a_cat = torch.cat(a3, dim=1)

    def three():
        for a in a3:
            x @ a

    def one():
        x @ a_cat

    for _ in range(2):
        t3 = timeit(three)
        t1 = timeit(one)
    rows.append([f"LoRA A of q,k,v: x[{b * t},576] @ [576,16]", f"3 matmuls {t3 * 1e3:.2f} ms",
                 f"1 concatenated {t1 * 1e3:.2f} ms", f"{t3 / t1:.2f}x", ""])
    head = torch.randn(49152, 576, dtype=torch.bfloat16)
    hidden = torch.randn(b, t, 576, dtype=torch.bfloat16)
    for _ in range(2):
        sl = timeit(lambda: F.linear(hidden[:, -1:, :], head))
        sc = timeit(lambda: F.linear(hidden[:, -1:, :].contiguous(), head))
    rows.append([f"LM head on logits_to_keep=1's slice [{b},1,576] of [{b},{t},576]",
                 f"view {sl * 1e3:.1f} ms", f"contiguous {sc * 1e3:.1f} ms", f"{sl / sc:.0f}x",
                 f"{sl - sc:.2f} s per micro-batch"])
    xf = x.float()

    def cast_pair():
        xf.to(torch.bfloat16)
        x.float()

    tc = timeit(cast_pair)
    rows.append([f"cast bf16->fp32->bf16 of one [{b * t},576] LoRA input", f"{tc * 1e3:.2f} ms",
                 "", "", f"x7 modules x30 layers (fwd only): {210 * tc:.2f} s"])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_environment()
    import torch

    from llama_sft.config import get_spec
    from llama_sft.data.batching import PadCollator
    from llama_sft.data.tokenize import tokenize_examples
    from llama_sft.modeling.load import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    default_threads = torch.get_num_threads()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        raise SystemExit(f"error: unknown variant(s) {bad}; choose from {VARIANTS}")
    spec = get_spec("135m")
    tok = load_tokenizer("smollm2-135m")
    train, _ = bench_examples(n_train=256, n_heldout=1, gsm8k=Path(args.gsm8k))
    rows = tokenize_examples(train, tok, max_length=spec.max_length)
    rows = sorted(rows, key=lambda r: r["length"])
    at = min(int(args.length_quantile * len(rows)), len(rows) - args.batch_size)
    picked = rows[at: at + args.batch_size]
    batch = PadCollator(tok.pad_token_id)(picked)
    lengths = [r["length"] for r in picked]
    n_tokens = sum(lengths)
    print(f"[levers] {cpu_model_name()}; {default_threads} threads by default; batch "
          f"{args.batch_size} rows of lengths {lengths} ({n_tokens} tokens, padded to "
          f"{batch['input_ids'].shape[1]}); lora r={spec.lora_r} alpha={spec.lora_alpha} "
          f"dropout={spec.lora_dropout}", flush=True)
    variants = {}
    first_loss = {}
    for n in names:
        variants[n] = make_variant(n, spec)
        t0 = time.perf_counter()
        torch.set_num_threads(variants[n]["threads"] or default_threads)
        saved: dict = {}
        # warm-up (and compilation); counts the activation memory autograd saves
        train_step(variants[n], batch, saved=None if n in ("compiled", "regional") else saved)
        variants[n]["first_s"] = time.perf_counter() - t0
        variants[n]["saved_mb"] = saved.get("bytes", float("nan")) / 2**20
        # The first step's loss is the base model's (LoRA B starts at 0); the second one shows
        # the first update (LoRA A is seeded alike for every variant).
        first_loss[n] = train_step(variants[n], batch)
        print(f"[levers] {n}: first step {variants[n]['first_s']:.1f} s, second-step loss "
              f"{first_loss[n]:.5f}", flush=True)
    times: dict[str, list[float]] = {n: [] for n in names}
    last_loss: dict[str, float] = {}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else list(reversed(names))
        for n in order:
            torch.set_num_threads(variants[n]["threads"] or default_threads)
            for _ in range(args.steps):
                t0 = time.perf_counter()
                last_loss[n] = train_step(variants[n], batch)
                times[n].append(time.perf_counter() - t0)
        print(f"[levers] round {r + 1}: " + ", ".join(
            f"{n} {statistics.median(times[n][-args.steps:]):.2f} s" for n in names), flush=True)
    torch.set_num_threads(default_threads)
    # Speeds from the fastest step of each variant: on a shared machine other jobs only ever
    # slow a step down, so the minimum is the least disturbed estimate; the median is shown too.
    base = min(times[names[0]])
    table = []
    for n in names:
        med = statistics.median(times[n])
        best = min(times[n])
        table.append([n, best, med, n_tokens / best, f"{base / best:.2f}x",
                      ", ".join(f"{x:.2f}" for x in times[n]), f"{first_loss[n]:.5f}",
                      f"{last_loss[n]:.5f}", f"{variants[n]['saved_mb']:.0f}",
                      f"{variants[n]['first_s']:.1f}"])
    print()
    print(fmt_table(["variant", "s/step (min)", "s/step (median)", "tok/s (min)",
                     f"speed vs {names[0]} (min)",
                     "all step times (s)", "2nd-step loss",
                     f"loss after {2 + args.rounds * args.steps} steps",
                     "saved activations MiB", "first step s"], table))
    for other in ("no_input_cast", "decoder_only"):
        if "baseline" in last_loss and other in last_loss:
            d = abs(last_loss["baseline"] - last_loss[other])
            print(f"{other} vs baseline loss difference after the same steps: {d:.2e} "
                  "(expected 0: the same arithmetic)")
    if not args.no_ops:
        torch.set_num_threads(default_threads)
        print()
        print(fmt_table(["op", "a", "b", "ratio", "per step"], op_timings(lengths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
