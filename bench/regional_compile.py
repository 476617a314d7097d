"""Compiled decoder layers (--torch-compile) against eager, through the toolkit's own training
path (llama_sft.training.train.run_train: what llama_train.py runs). Prints one RESULT line:
seconds from process start to the first optimizer step's end and to the end of training, the
median step after step 5, dynamo's graph count, recompiles, and the per-step losses.

    python3 bench/regional_compile.py off -- --model-size 135m --dataset ... --max-steps 100
    python3 bench/regional_compile.py on  -- (the same flags)

Run each alone (two jobs on two cores spoil both figures). Inductor caches compiled kernels on
disk (/tmp/torchinductor_$USER): the first `on` run after a change of torch or of the model
code compiles from scratch, later ones read the cache; run `on` twice to see both."""

import json
import statistics
import sys
import tempfile
import time

T0 = time.perf_counter()

from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import llama_sft.training.train as train_mod  # noqa: E402
from llama_sft.cli import setup_logging  # noqa: E402
from llama_train import resolve_train_config  # noqa: E402

mode = sys.argv[1] if len(sys.argv) > 1 else ""
if mode not in ("on", "off"):
    raise SystemExit("usage: regional_compile.py on|off -- LLAMA_TRAIN_FLAGS")
if mode == "on":
    torch._logging.set_logs(recompiles=True)  # each recompile's reason goes to the log
argv = [a for a in sys.argv[2:] if a != "--"]
argv += ["--output-dir", tempfile.mkdtemp(prefix=f"compile-{mode}-"), "--torch-compile", mode]
setup_logging()
cfg = resolve_train_config(argv)
marks: dict = {"steps": []}


class Steps(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        marks["begin"] = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        marks["steps"].append(time.perf_counter())


result = train_mod.run_train(cfg, on_trainer=lambda tr: tr.add_callback(Steps()))
end = time.perf_counter()
steps = marks["steps"]
deltas = [b - a for a, b in zip(steps, steps[1:])]
from torch._dynamo.utils import counters  # noqa: E402

out = {"mode": mode, "steps": len(steps),
       "first_step_end_s": round(steps[0] - T0, 1),
       "first_step_s": round(steps[0] - marks["begin"], 1),
       "median_step_s_after_5": round(statistics.median(deltas[5:]), 3),
       "train_s": round(steps[-1] - marks["begin"], 1),
       "wall_s": round(end - T0, 1),
       "kernels": result.get("kernels"),
       "graphs": dict(counters["stats"]), "recompiles": dict(counters.get("recompiles", {})),
       "train_loss": result.get("train_loss"), "eval_loss": result.get("eval_loss")}
records = map(json.loads, open(Path(cfg.output_dir) / "metrics.jsonl"))
out["losses"] = [round(r["loss"], 4) for r in records if "loss" in r]
print("RESULT", json.dumps(out), flush=True)
