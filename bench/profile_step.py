"""torch.profiler over one steady-state optimizer step of the toolkit's training path.

    python3 bench/profile_step.py                    # batch of the 135m config (4)
    python3 bench/profile_step.py --batch-size 8 --trace /tmp/step.json

Trains through llama_sft.training.recipe.run_sft (the real path, same config as bench_train.py's "ours") on
GSM8K + sample rows, skips --warmup-steps steps, profiles the next one, and prints the top ops by
self CPU time, grouped into buckets (matmuls, attention, casts, elementwise, optimizer, ...), with
the tokens of that step.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GSM8K, bench_examples, quiet_environment  # noqa: E402

BUCKETS = (
    ("attention (SDPA fwd+bwd)", ("scaled_dot_product", "flash_attention", "_efficient_attention",
                                  "attention")),
    ("matmul (linear/mm/addmm/bmm)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear",
                                      "aten::matmul", "mkldnn", "onednn")),
    ("dtype casts (to/copy_)", ("aten::to", "aten::_to_copy", "aten::copy_")),
    ("dropout", ("dropout", "bernoulli")),
    ("optimizer", ("optimizer", "adam", "_foreach")),
    ("loss/softmax", ("cross_entropy", "log_softmax", "nll_loss", "softmax")),
)


def bucket_of(name: str) -> str:
    low = name.lower()
    for bucket, keys in BUCKETS:
        if any(k.lower() in low for k in keys):
            return bucket
    return "other (elementwise, norms, rope, indexing, autograd)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="profile_step.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, help="Default: the 135m config's.")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--lora-dropout", type=float, help="Default: the 135m config's.")
    p.add_argument("--trace", help="Also write a Chrome trace here.")
    p.add_argument("--gsm8k", default=str(GSM8K))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_environment()
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from llama_sft.data.tokenize import tokenize_examples
    from llama_sft.layout import RunConfig, config_hash
    from llama_sft.modeling.embedded import ensure_embedded_model
    from llama_sft.modeling.load import load_tokenizer
    from llama_sft.training.recipe import run_sft
    from llama_train import resolve_train_config

    out = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    steps = args.warmup_steps + 1
    argv_cfg = ["--model-size", "135m", "--base-model", str(ensure_embedded_model()),
                "--max-steps", str(steps), "--logging-steps", "1", "--save-steps", "1000000",
                "--output-dir", str(out / "run")]
    if args.batch_size:
        argv_cfg += ["--batch-size", str(args.batch_size)]
    if args.lora_dropout is not None:
        argv_cfg += ["--lora-dropout", str(args.lora_dropout)]
    cfg = resolve_train_config(argv_cfg)
    tok = load_tokenizer("smollm2-135m")
    train, _ = bench_examples(n_train=512, n_heldout=1, gsm8k=Path(args.gsm8k))
    rows = tokenize_examples(train, tok, max_length=cfg.max_length)
    state: dict = {}

    class ProfileOneStep(TrainerCallback):
        def on_step_begin(self, a, st, control, **kw):
            if st.global_step == args.warmup_steps:
                state["tokens0"] = (state["trainer"].tokens_seen,
                                    state["trainer"].supervised_tokens_seen)
                state["prof"] = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
                state["prof"].__enter__()
                state["t0"] = time.perf_counter()

        def on_step_end(self, a, st, control, **kw):
            if "prof" in state and "dt" not in state:
                state["dt"] = time.perf_counter() - state["t0"]
                state["prof"].__exit__(None, None, None)
                tr = state["trainer"]
                state["tokens"] = (tr.tokens_seen - state["tokens0"][0],
                                   tr.supervised_tokens_seen - state["tokens0"][1])

    def on_trainer(tr):
        state["trainer"] = tr
        tr.add_callback(ProfileOneStep())

    run_sft(cfg, output_dir=out / "run", train_rows=rows, eval_rows=[], sample_prompts=[],
            run_config=RunConfig(base_model=cfg.base_model, config_hash=config_hash(cfg),
                                 dataset={"dataset_hash": "bench"}),
            tokenizer=tok, on_trainer=on_trainer)
    prof = state["prof"]
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nprofiled step {args.warmup_steps + 1}: batch {cfg.batch_size}, "
          f"{state['tokens'][0]} processed / {state['tokens'][1]} supervised tokens, "
          f"{state['dt']:.2f} s wall (profiler on), {torch.get_num_threads()} threads, "
          f"lora dropout {cfg.lora_dropout}\n")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48))
    buckets: dict[str, float] = defaultdict(float)
    for e in events:
        buckets[bucket_of(e.key)] += e.self_cpu_time_total
    print("Self CPU time by bucket:")
    for b, v in sorted(buckets.items(), key=lambda kv: -kv[1]):
        print(f"  {b:55s} {v / 1e6:7.2f} s  {100 * v / total:5.1f}%")
    # Forward vs backward: autograd nodes run in the backward pass.
    bwd = sum(e.self_cpu_time_total for e in events if "Backward" in e.key or "backward" in e.key)
    print(f"  (autograd *Backward* nodes' own time: {bwd / 1e6:.2f} s; their matmuls are counted "
          "under matmul)")
    by_shape = prof.key_averages(group_by_input_shape=True)
    print("\nTop ops by input shape:")
    print(by_shape.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40,
                         max_shapes_column_width=60))
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"trace written to {args.trace}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
