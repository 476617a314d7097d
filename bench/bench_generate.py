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
from _common import GSM8K, bench_examples, cpu_model_name, fmt_table, quiet_environment  # noqa: E402


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
    return p


def run_mode(model, tok, prompts, *, batch_size: int, max_new_tokens: int):
    from llama_sft.evaluation.generate import generate

    stats: dict = {}
    t0 = time.perf_counter()
    gens = generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    stats=stats)
    stats["wall_s"] = time.perf_counter() - t0
    return gens, stats


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_environment()
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
    identical_fp32 = None
    for name, dtype in dtypes:
        model = load_model("smollm2-135m", dtype=dtype)
        model.eval()
        # One short warm-up per mode so the first timed call does not pay for lazy init.
        run_mode(model, tok, prompts[:2], batch_size=2, max_new_tokens=4)
        per = {"batched": [], "single": []}
        outs = {}
        for r in range(rounds):
            order = ("batched", "single") if r % 2 == 0 else ("single", "batched")
            for mode in order:
                gens, st = run_mode(model, tok, prompts, max_new_tokens=max_new,
                                    batch_size=args.batch_size if mode == "batched" else 1)
                per[mode].append(st)
                outs[mode] = gens
                print(f"[bench] {name} round {r + 1} {mode:7s} {st['generated_tokens']} tokens in "
                      f"{st['seconds']:.1f} s = {st['tokens_per_second']:.1f} tok/s", flush=True)
        same = sum(a.text == b.text and a.new_tokens == b.new_tokens
                   for a, b in zip(outs["batched"], outs["single"]))
        diffs = [i for i, (a, b) in enumerate(zip(outs["batched"], outs["single"]))
                 if a.text != b.text]
        if name == "fp32":
            identical_fp32 = same
        tb = statistics.median(s["tokens_per_second"] for s in per["batched"])
        ts = statistics.median(s["tokens_per_second"] for s in per["single"])
        pair = [b["tokens_per_second"] / s["tokens_per_second"]
                for b, s in zip(per["batched"], per["single"])]
        results[name] = {"batched": tb, "single": ts, "ratio": statistics.median(pair),
                         "pair": pair, "identical": same, "diff_prompts": diffs,
                         "tokens": per["batched"][0]["generated_tokens"]}
        rows.append([name, tb, ts, f"{statistics.median(pair):.2f}",
                     ", ".join(f"{x:.2f}" for x in pair), f"{same}/{n_prompts}",
                     per["batched"][0]["generated_tokens"], per["single"][0]["generated_tokens"]])
        del model
    print()
    print(fmt_table(["dtype", "batched tok/s", "single tok/s", "ratio (median)",
                     "ratio per round", "identical outputs", "tokens batched", "tokens single"],
                    rows))
    for name, r in results.items():
        if r["diff_prompts"]:
            print(f"{name}: outputs differ for prompts {r['diff_prompts']}")
    fp = results["fp32"]
    ok = identical_fp32 == n_prompts
    print(f"fp32 identity check: {'PASSED' if ok else 'FAILED'} ({identical_fp32}/{n_prompts} "
          "identical greedy outputs)")
    print(f"RESULT batched/single={fp['ratio']:.2f} tok_s_batched={fp['batched']:.1f} "
          f"tok_s_single={fp['single']:.1f} identical={identical_fp32}/{n_prompts}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
