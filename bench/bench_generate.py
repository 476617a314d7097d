"""Evaluation generation: llama_sft.evaluation.generate.generate batched against one prompt at a time.

    python3 bench/bench_generate.py --quick      # 16 prompts, 48 new tokens, 1 round
    python3 bench/bench_generate.py              # 32 prompts, 128 new tokens, 2 rounds

Same prompts (GSM8K questions rendered in the toolkit's chat format), greedy decoding, the
embedded SmolLM2-135M on the CPU. The identity check runs in fp32 and asserts that the batched
(left-padded, --batch-size) and the one-at-a-time outputs are token-identical: in bf16 a CPU's
matmul kernels block and accumulate differently for different batch shapes, so bf16 greedy
outputs are not batch-invariant and a near-tie can flip a token. --also-bf16 adds a bf16 timing
(the dtype load_model picks for inference on a CPU with bf16), reporting how many outputs differ
instead of asserting.

Reports generated tokens/s of each mode (tokens up to and including EOS), per round (batched and
single alternated), and the ratio batched/single. The last line:

    RESULT batched/single=X tok_s_batched=Y tok_s_single=Z identical=N/N
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GSM8K, ROOT, bench_examples, cpu_model_name, fmt_table, quiet_environment  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_generate.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16 prompts, 48 new tokens, 1 round.")
    p.add_argument("--prompts", type=int, help="Number of prompts (default 32; quick 16).")
    p.add_argument("--max-new-tokens", type=int, help="Default 128; quick 48.")
    p.add_argument("--rounds", type=int, help="Rounds of batched+single (default 2; quick 1).")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--also-bf16", action="store_true", help="Also time bf16 (no identity check).")
    p.add_argument("--threads", type=int, help="torch threads (default: one per core).")
    p.add_argument("--gsm8k", default=str(GSM8K))
    p.add_argument("--decoders", default="hf",
                   help="Comma-separated generate(decoder=...) values to compare, each batched "
                        "and single: continuous (llama_sft.evaluation.greedy) and/or hf "
                        "(transformers' generate, the default).")
    p.add_argument("--tuned", action="store_true",
                   help="Instead: the pilot's tuned QLoRA model against its base, each way it can "
                        "generate (TUNED_VARIANTS), on the pilot's held-out golden prompts.")
    p.add_argument("--adapter", help="--tuned: a trained adapter folder (default: random LoRA "
                   "weights, B non-zero).")
    p.add_argument("--variants", help="--tuned: comma-separated subset of the variants.")
    p.add_argument("--golden-set", default=str(ROOT / "sft_output" / "golden_set.jsonl"))
    return p


def run_mode(model, tok, prompts, *, batch_size: int, max_new_tokens: int,
             decoder: str = "hf"):
    from llama_sft.evaluation.generate import generate

    stats: dict = {}
    t0 = time.perf_counter()
    gens = generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    stats=stats, decoder=decoder)
    stats["wall_s"] = time.perf_counter() - t0
    return gens, stats


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_environment()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars, one per model loaded
    if args.tuned:
        return tuned_main(args)
    n_prompts = args.prompts or (16 if args.quick else 32)
    max_new = args.max_new_tokens or (48 if args.quick else 128)
    rounds = args.rounds or (1 if args.quick else 2)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from llama_sft.data.prompts import render_prompt, resolve_prompt_format
    from llama_sft.modeling.load import load_model, load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    fmt = resolve_prompt_format(tok, "auto")
    _, examples = bench_examples(n_train=0, n_heldout=n_prompts, gsm8k=Path(args.gsm8k))
    prompts = [render_prompt(tok, fmt, ex.instruction, ex.context) for ex in examples]
    print(f"[bench] {cpu_model_name()}, {torch.get_num_threads()} threads; {n_prompts} prompts "
          f"({fmt} format), {max_new} new tokens max, greedy, batch {args.batch_size} vs 1, "
          f"{rounds} round(s)", flush=True)
    dtypes = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if args.also_bf16 else [])
    rows, results = [], {}
    identical_fp32 = identical_ref = None
    for name, dtype in dtypes:
        model = load_model("smollm2-135m", dtype=dtype)
        model.eval()
        # One short warm-up per mode so the first timed call does not pay for lazy init.
        run_mode(model, tok, prompts[:2], batch_size=2, max_new_tokens=4)
        decoders = args.decoders.split(",")
        modes = [(d, m) for d in decoders for m in ("batched", "single")]
        per = {dm: [] for dm in modes}
        outs = {}
        for r in range(rounds):
            for dec, mode in (modes if r % 2 == 0 else modes[::-1]):
                gens, st = run_mode(model, tok, prompts, max_new_tokens=max_new, decoder=dec,
                                    batch_size=args.batch_size if mode == "batched" else 1)
                per[(dec, mode)].append(st)
                outs[(dec, mode)] = gens
                print(f"[bench] {name} round {r + 1} {dec:4s} {mode:7s} {st['generated_tokens']} "
                      f"tokens in {st['seconds']:.1f} s = {st['tokens_per_second']:.1f} tok/s",
                      flush=True)
        ref = outs[(decoders[-1], "batched")]  # hf when compared: today's path
        for dec in decoders:
            b_out, s_out = outs[(dec, "batched")], outs[(dec, "single")]
            same = sum(a.text == b.text and a.new_tokens == b.new_tokens
                       for a, b in zip(b_out, s_out))
            same_ref = sum(a.text == b.text for a, b in zip(b_out, ref))
            diffs = [i for i, (a, b) in enumerate(zip(b_out, s_out)) if a.text != b.text]
            key = name if dec == decoders[0] else f"{name}/{dec}"
            if name == "fp32" and dec == decoders[0]:
                identical_fp32 = same
                identical_ref = same_ref
            pb, ps = per[(dec, "batched")], per[(dec, "single")]
            tb = statistics.median(x["tokens_per_second"] for x in pb)
            ts = statistics.median(x["tokens_per_second"] for x in ps)
            pair = [x["tokens_per_second"] / y["tokens_per_second"] for x, y in zip(pb, ps)]
            results[key] = {"batched": tb, "single": ts, "ratio": statistics.median(pair),
                            "pair": pair, "identical": same, "diff_prompts": diffs,
                            "tokens": pb[0]["generated_tokens"]}
            rows.append([key, tb, ts, f"{statistics.median(pair):.2f}",
                         ", ".join(f"{x:.2f}" for x in pair), f"{same}/{n_prompts}",
                         f"{same_ref}/{n_prompts}", pb[0]["generated_tokens"],
                         ps[0]["generated_tokens"]])
        del model
    print()
    print(fmt_table(["dtype", "batched tok/s", "single tok/s", "ratio (median)",
                     "ratio per round", "identical outputs", f"= {args.decoders.split(',')[-1]} batched",
                     "tokens batched", "tokens single"],
                    rows))
    for name, r in results.items():
        if r["diff_prompts"]:
            print(f"{name}: outputs differ for prompts {r['diff_prompts']}")
    fp = results["fp32"]
    ok = identical_fp32 == n_prompts and identical_ref == n_prompts
    print(f"fp32 identity check: {'PASSED' if ok else 'FAILED'} ({identical_fp32}/{n_prompts} "
          f"identical greedy outputs batched vs single; {identical_ref}/{n_prompts} batched "
          f"{args.decoders.split(',')[0]} vs batched {args.decoders.split(',')[-1]})")
    print(f"RESULT batched/single={fp['ratio']:.2f} tok_s_batched={fp['batched']:.1f} "
          f"tok_s_single={fp['single']:.1f} identical={identical_fp32}/{n_prompts}")
    return 0 if ok else 1


# -- --tuned: the tuned model against its base, as the pilot generates them -------------------

TUNED_VARIANTS = ("base_4bit_packed", "base_4bit", "base_copy", "tuned_4bit_packed",
                  "tuned_4bit", "tuned_lora_bf16", "tuned_merged")


def _pilot_models(adapter: str | None, seed: int = 0):
    """{variant: model} for the pilot's QLoRA setup: the 4-bit base as llama_pilot.py loads it,
    LoRA r=16 alpha=32 on all linear layers (the adapter's weights when given, else random A and
    B, so B is not zero), with and without bitsandbytes' CPU repacking, and the two plain
    copies."""
    import torch

    from llama_sft.modeling.load import add_lora, load_model
    from llama_sft.modeling.merge import plain_copy

    def base(packed: bool):
        m = load_model("smollm2-135m", use_4bit=True, for_training=True)
        for mod in m.modules():  # packed: the pilot's layout before load.py kept it for training
            if hasattr(mod, "support_avx512bf16_for_cpu"):
                mod.support_avx512bf16_for_cpu = packed
        return m

    def tuned(packed: bool):
        m = add_lora(base(packed), r=16, alpha=32, dropout=0.0)
        _adapter_weights(m, adapter, seed)
        return m

    models = {"base_4bit_packed": base(True), "base_4bit": base(False)}
    models["base_copy"] = plain_copy(models["base_4bit"])
    models["tuned_4bit_packed"] = tuned(True)
    models["tuned_4bit"] = tuned(False)
    models["tuned_merged"] = plain_copy(models["tuned_4bit"])
    lora_bf16 = add_lora(plain_copy(models["base_4bit"]), r=16, alpha=32, dropout=0.0)
    _adapter_weights(lora_bf16, adapter, seed)
    models["tuned_lora_bf16"] = lora_bf16
    for m in models.values():
        m.eval()
        m.config.use_cache = True
    torch.manual_seed(seed)
    return models


def _adapter_weights(model, adapter: str | None, seed: int) -> None:
    import torch
    from peft import set_peft_model_state_dict

    if adapter:
        from safetensors.torch import load_file

        state = load_file(str(Path(adapter) / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, state)
        if getattr(result, "unexpected_keys", None):
            raise SystemExit(f"error: {adapter} does not fit this model")
        return
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.02


def _held_out_prompts(golden: str, n: int | None):
    from llama_sft.config import PilotArgs
    from llama_sft.data.prompts import generation_prompt, resolve_prompt_format
    from llama_sft.modeling.load import load_tokenizer
    from llama_sft.training.pilot import split_golden

    tok = load_tokenizer("smollm2-135m")
    _, _, held_out, _ = split_golden(PilotArgs(golden_set=golden))
    fmt = resolve_prompt_format(tok, "auto")
    prompts = [generation_prompt(tok, fmt, ex) for ex in held_out]
    return tok, prompts[:n] if n else prompts


def tuned_main(args) -> int:
    """Each variant generates the pilot's held-out prompts (batch, max new tokens as the
    pilot), variants alternated per round; tok/s and greedy identity against today's path."""
    tok, prompts = _held_out_prompts(args.golden_set, args.prompts)
    max_new = args.max_new_tokens or 96
    rounds = args.rounds or 2
    models = _pilot_models(args.adapter)
    names = [v for v in TUNED_VARIANTS if not args.variants or v in args.variants.split(",")]
    print(f"[bench] {cpu_model_name()}; {len(prompts)} held-out golden prompts, {max_new} new "
          f"tokens max, batch {args.batch_size}, greedy, {rounds} round(s); adapter: "
          f"{args.adapter or 'random A and B (std 0.02)'}", flush=True)
    for name in names:  # warm-up (and the in-place CPU repacking of the packed variants)
        run_mode(models[name], tok, prompts[:2], batch_size=2, max_new_tokens=4)
    speed: dict[str, list[float]] = {n: [] for n in names}
    outs: dict[str, list] = {}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            gens, st = run_mode(models[name], tok, prompts, batch_size=args.batch_size,
                                max_new_tokens=max_new)
            speed[name].append(st["tokens_per_second"])
            outs[name] = gens
            print(f"[bench] round {r + 1} {name:18s} {st['generated_tokens']} tokens "
                  f"{st['seconds']:.1f} s = {st['tokens_per_second']:.1f} tok/s, "
                  f"{st.get('ms_per_decode_step', float('nan')):.1f} ms a decode step, "
                  f"prefill {st.get('prefill_seconds', float('nan')):.2f} s", flush=True)
    _tuned_report(names, speed, outs)
    return 0


def _tuned_report(names, speed, outs) -> None:
    def same(a: str, b: str) -> str:
        if a not in outs or b not in outs:
            return "-"
        n = sum(x.text == y.text for x, y in zip(outs[a], outs[b]))
        return f"{n}/{len(outs[a])}"

    ref = {n: ("base_4bit_packed" if n.startswith("base") else "tuned_4bit_packed") for n in names}
    base = "base_copy" if "base_copy" in speed else names[0]
    rows = []
    for n in names:
        pair = [t / b for t, b in zip(speed[n], speed[base])]
        rows.append([n, statistics.median(speed[n]), ", ".join(f"{x:.1f}" for x in speed[n]),
                     f"{statistics.median(pair):.2f}", same(n, ref[n]), same(n, "tuned_4bit")])
    print()
    print(fmt_table(["variant", "tok/s (median)", "tok/s per round", f"/ {base} (per round, median)",
                     "outputs = today's path", "outputs = tuned_4bit"], rows))
    if "tuned_merged" in speed and base in speed:
        pair = [t / b for t, b in zip(speed["tuned_merged"], speed[base])]
        print(f"RESULT tuned_merged/{base}={statistics.median(pair):.2f} "
              f"identical_to_tuned_4bit={same('tuned_merged', 'tuned_4bit')}")


if __name__ == "__main__":
    raise SystemExit(main())
