"""Why do compiled and eager training losses differ? (issue 14)

One variant per process (dynamo's caches and inductor's config are global):

    python3 bench/compile_numerics.py run VARIANT --out /tmp/cn    # writes /tmp/cn/VARIANT.pt
    python3 bench/compile_numerics.py compare --out /tmp/cn        # the table

Each run builds the toolkit's training model the way llama_train.py does on this CPU (embedded
135M, bf16 base, fp32 LoRA r=16 on all linear layers, attention sdpa_recompute, bf16 autocast,
peft's input cast off, the loss of llama_sft.training.trainer: final-norm hook, head at the
supervised positions through supervised_cross_entropy), seeds LoRA A alike and sets LoRA B to
small seeded values (so both A and B get gradients, as after a few steps), then
1. one fixed batch (4 GSM8K rows): loss and every LoRA gradient;
2. 12 AdamW steps (lr 2e-4, the 135m config's) on 12 fixed batches of 4: the loss of each step.

Variants:
  eager            the toolkit's path today (the reference)
  eager_sdpa       the same with PyTorch's SDPA: another valid eager kernel, so its distance
                   from `eager` is what bf16 rounding alone does
  eager_fp32       fp32 base, no autocast: the arithmetic without bf16 rounding
  regional         every decoder layer torch.compile'd (inductor), bf16 autocast
  regional_emulate the same with inductor's emulate_precision_casts (round every bf16
                   intermediate as eager does, instead of keeping fused intermediates in fp32)
  regional_fp32    compiled decoder layers on the fp32 base, no autocast
  eager_fp32_residual  eager, bf16 weights and autocast, but the embedding's output cast to fp32,
                   so the residual stream (the adds between layers, the RMSNorm inputs) stays
                   fp32 while every matmul still runs in bf16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("eager", "eager_sdpa", "eager_fp32", "regional", "regional_emulate", "regional_fp32",
            "eager_fp32_residual")


def batches(n_batches: int, batch_size: int = 4):
    from _common import bench_examples

    from llama_sft.data.batching import PadCollator
    from llama_sft.data.tokenize import tokenize_examples
    from llama_sft.modeling.load import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    train, _ = bench_examples(n_train=batch_size * n_batches, n_heldout=1)
    rows = tokenize_examples(train, tok, max_length=512)
    collate = PadCollator(tok.pad_token_id)
    return [collate(rows[i * batch_size:(i + 1) * batch_size]) for i in range(n_batches)]


def build(variant: str):
    import torch

    from llama_sft.modeling import attention
    from llama_sft.modeling.load import add_lora, load_model

    fp32 = variant.endswith("fp32")
    model = load_model("smollm2-135m", for_training=True,
                       dtype=torch.float32 if fp32 else torch.bfloat16)
    model.set_attn_implementation("sdpa" if variant == "eager_sdpa" else attention.register())
    torch.manual_seed(0)
    model = add_lora(model, r=16, alpha=32, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=g) * 1e-3)
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in model.modules():
        if isinstance(m, BaseTunerLayer) and not fp32:
            m.cast_input_dtype_enabled = False
    if variant == "eager_fp32_residual":
        model.get_base_model().model.embed_tokens.register_forward_hook(
            lambda m, i, o: o.float())
    if variant == "regional_emulate":
        import torch._inductor.config as ic

        ic.emulate_precision_casts = True
    if variant.startswith("regional"):
        for layer in model.get_base_model().model.layers:
            layer.compile()
    model.train()
    return model


def loss_of(model, batch, autocast: bool):
    import torch

    from llama_sft.modeling.loss import supervised_cross_entropy

    base = model.get_base_model()
    captured = {}
    h = base.model.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    labels = batch["labels"][:, 1:]
    sup = labels != -100
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  use_cache=False, logits_to_keep=torch.tensor([0]))
            hidden = captured["h"][:, :-1][sup]
            n = int(sup.sum())
            return supervised_cross_entropy(hidden, base.lm_head.weight, labels[sup],
                                            scale=1.0 / n)
    finally:
        h.remove()


def run(variant: str, out: Path) -> None:
    import torch

    from _common import quiet_environment

    quiet_environment()
    data = batches(13)
    model = build(variant)
    autocast = not variant.endswith("fp32")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    t0 = time.perf_counter()
    loss = loss_of(model, data[0], autocast)
    loss.backward()
    first_s = time.perf_counter() - t0
    grads = {n: p.grad.detach().float().clone() for n, p in params.items()}
    fixed_loss = float(loss)
    model.zero_grad(set_to_none=True)
    opt = torch.optim.AdamW(list(params.values()), lr=2e-4, weight_decay=0.0)
    losses, times = [], []
    for b in data[1:]:
        t0 = time.perf_counter()
        loss = loss_of(model, b, autocast)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
    from torch._dynamo.utils import counters

    out.mkdir(parents=True, exist_ok=True)
    torch.save({"fixed_loss": fixed_loss, "grads": grads, "losses": losses, "times": times,
                "first_s": first_s, "graphs": dict(counters["stats"])}, out / f"{variant}.pt")
    print(f"{variant}: fixed-batch loss {fixed_loss:.6f}, first fwd+bwd {first_s:.1f} s, "
          f"losses {[round(x, 4) for x in losses]}", flush=True)


def compare(out: Path) -> None:
    import torch

    res = {v: torch.load(out / f"{v}.pt") for v in VARIANTS if (out / f"{v}.pt").exists()}
    pairs = [("eager_sdpa", "eager"), ("eager", "eager_fp32"), ("regional", "eager"),
             ("regional_emulate", "eager"), ("regional", "eager_fp32"),
             ("regional_fp32", "eager_fp32"), ("eager_fp32_residual", "eager_fp32"),
             ("eager_fp32_residual", "eager")]
    print("| a | b | fixed-batch loss a / b | gradient rel. error | gradient cosine | "
          "step losses, max rel. diff | mean rel. diff (a - b) / b |")
    print("|---|---|---|---|---|---|---|")
    for a, b in pairs:
        if a not in res or b not in res:
            continue
        ga, gb = res[a]["grads"], res[b]["grads"]
        va = torch.cat([ga[k].flatten() for k in sorted(ga)]).double()
        vb = torch.cat([gb[k].flatten() for k in sorted(gb)]).double()
        rel = float((va - vb).norm() / vb.norm())
        cos = float(torch.nn.functional.cosine_similarity(va, vb, dim=0))
        la, lb = torch.tensor(res[a]["losses"]), torch.tensor(res[b]["losses"])
        d = (la - lb) / lb
        print(f"| {a} | {b} | {res[a]['fixed_loss']:.5f} / {res[b]['fixed_loss']:.5f} | "
              f"{rel:.4f} | {cos:.5f} | {float(d.abs().max()):.4f} | {float(d.mean()):+.4f} |")
    for v, r in res.items():
        print(f"{v}: losses {' '.join(f'{x:.4f}' for x in r['losses'])}; graphs {r['graphs']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("run", "compare"))
    p.add_argument("variant", nargs="?", choices=VARIANTS)
    p.add_argument("--out", type=Path, default=Path("/tmp/compile_numerics"))
    a = p.parse_args()
    if a.mode == "run":
        if not a.variant:
            p.error("run needs a VARIANT")
        run(a.variant, a.out)
    else:
        compare(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
