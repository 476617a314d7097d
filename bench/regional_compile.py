"""Regional compilation lever (issue 14): torch.compile on each decoder layer (all layers run
one code object, so dynamo compiles it once and reuses it) against eager, through the
toolkit's own training path (llama_sft.training.train.run_train). Prints one RESULT line: time
to the first step, median step time after step 5, total training time, dynamo's graph
counts and the per-step losses.

    python3 bench/regional_compile.py eager    -- --model-size 135m --dataset ... --max-steps 25
    python3 bench/regional_compile.py regional -- (the same flags)

Run each alone (two jobs on two cores spoil both figures)."""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import TrainerCallback  # noqa: E402

import llama_sft.training.train as train_mod  # noqa: E402
from llama_sft.cli import setup_logging  # noqa: E402
from llama_train import resolve_train_config  # noqa: E402

mode = sys.argv[1]
if mode not in ("eager", "regional"):
    raise SystemExit("usage: regional_compile.py eager|regional -- LLAMA_TRAIN_FLAGS")
argv = [a for a in sys.argv[2:] if a != "--"]
argv += ["--output-dir", tempfile.mkdtemp(prefix=f"regional-{mode}-")]
setup_logging()
cfg = resolve_train_config(argv)
marks = {}

class Steps(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        marks["begin"] = time.perf_counter()
        marks["steps"] = []

    def on_step_end(self, args, state, control, **kw):
        marks["steps"].append(time.perf_counter())



def hook(trainer):
    trainer.add_callback(Steps())
    if mode == "regional":
        layers = trainer.model.get_base_model().model.layers
        for layer in layers:
            layer.compile()
        print(f"compiled {len(layers)} decoder layers", flush=True)


result = train_mod.run_train(cfg, on_trainer=hook)
steps = marks["steps"]
deltas = [b - a for a, b in zip(steps, steps[1:])]
from torch._dynamo.utils import counters  # noqa: E402

out = {"mode": mode, "first_step_s": round(steps[0] - marks["begin"], 1),
       "median_step_s_after_5": round(statistics.median(deltas[5:]), 3),
       "total_train_s": round(steps[-1] - marks["begin"], 1),
       "tokens_per_second": result.get("tokens_per_second"),
       "frames": dict(counters["stats"]), "recompiles": dict(counters.get("recompiles", {})),
       "train_loss": result.get("train_loss")}
records = map(json.loads, open(Path(cfg.output_dir) / "metrics.jsonl"))
out["losses"] = [r["loss"] for r in records if "loss" in r]
print("RESULT", json.dumps(out), flush=True)
