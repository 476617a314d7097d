"""Load check for the data path (GitHub issue 6): time and peak memory of loading, splitting and
the `llama_dataset.py --report` command on a 200,000-row SFT JSONL.

    python3 bench/bench_loader.py                       # 200,000 rows, the working tree's code
    python3 bench/bench_loader.py --compare-ref 5fc8a0b # ... and the code of a git revision
    python3 bench/bench_loader.py --rows 20000 --quick  # a smaller file, no tokenizer subset

The file: GSM8K training rows (../shared/data/gsm8k_train.jsonl, 7,473 rows) repeated with
variations until --rows: each copy gets a variant tag in the instruction (so no two rows are
duplicates), every third row a context (another problem, as background), and one of four
categories. Real lengths: ~70 prompt and ~130 response tokens per row.

Every figure comes from a fresh child process, so one measurement cannot inherit another's
memory:
  load      llama_sft.data.loader.load_examples(file): wall time, peak RSS, and the peak above the RSS
            before the call (the parsed records);
  split     split_examples on the loaded records: wall time and the peak above the RSS before
            the split (the peak is reset with /proc/self/clear_refs after loading);
  tokenize  tokenize_examples on the first --tokenize-rows rows (the labels of training), rows
            and tokens per second; measured on a subset because all rows take minutes here;
  report    `python3 llama_dataset.py --dataset FILE --report --output R.json` as a user runs
            it: wall time and peak RSS from wait4(); the same command on a 100-row file gives
            the baseline (interpreter, transformers, tokenizer), and the difference is what the
            data costs.
The bound checked (PASS/FAIL): the report's peak RSS above its 100-row baseline is below
REPORT_BOUND x the file size: it streams, so it must not hold the file (let alone twice).
The tokenizer runs single-threaded (TOKENIZERS_PARALLELISM=false, RAYON_NUM_THREADS=1), like
the other benchmarks here, so it does not fight other work for the two cores.
Results go to stdout and to --out/results.json; bench/RESULTS_loader.md holds the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GSM8K, cpu_model_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPORT_BOUND = 0.5   # report peak RSS above its baseline < 0.5 x file size
CATEGORIES = ("math", "math_word_problem", "arithmetic", "reasoning")

CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
             "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


# --------------------------------------------------------------------------------------
# The data
# --------------------------------------------------------------------------------------


def make_dataset(path: Path, rows: int, seed: int = 0) -> dict:
    src = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines()]
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            base = src[i % len(src)]
            copy = i // len(src)
            row = {"id": f"gsm8k-{i}", "category": CATEGORIES[i % len(CATEGORIES)],
                   "instruction": base["question"] + (f" (variant {copy})" if copy else ""),
                   "context": src[rng.randrange(len(src))]["question"] if i % 3 == 0 else "",
                   "response": base["answer"]}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"rows": rows, "bytes": path.stat().st_size}


# --------------------------------------------------------------------------------------
# Children
# --------------------------------------------------------------------------------------

# Runs in a fresh interpreter with the code under test first on sys.path. Prints one JSON line.
CHILD = r'''
import json, re, sys, time
sys.path.insert(0, sys.argv[1])
what, path, extra = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])

def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")

try:
    from llama_sft.data.loader import load_examples
    from llama_sft.data.splits import split_examples
    from llama_sft.data.tokenize import TokenizeStats, tokenize_examples
    from llama_sft.modeling.load import load_tokenizer
except ImportError:  # a revision from before the llama_sft package (--compare-ref)
    from llama_dataset import TokenizeStats, load_examples, split_examples, tokenize_examples
    from llama_model import load_tokenizer
out = {}
if what in ("load", "split", "tokenize"):
    rss0 = status("VmRSS")
    t0 = time.perf_counter()
    examples = load_examples(path)
    out["load_seconds"] = time.perf_counter() - t0
    out["examples"] = len(examples)
    out["load_peak_mb"] = status("VmHWM")
    out["load_delta_mb"] = status("VmHWM") - rss0
    out["held_mb"] = status("VmRSS") - rss0
if what == "split":
    rss1 = status("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    splits, removed = split_examples(examples, val_ratio=0.05, test_ratio=0.05)
    out["split_seconds"] = time.perf_counter() - t0
    out["split_delta_mb"] = status("VmHWM") - rss1
    out["splits"] = {k: len(v) for k, v in splits.items()}
    out["removed"] = removed
if what == "tokenize":
    tok = load_tokenizer("smollm2-135m")
    subset = examples[: extra["rows"]]
    del examples
    stats = TokenizeStats()
    rss1 = status("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    rows = tokenize_examples(subset, tok, max_length=2048, prompt_format="auto", stats=stats)
    out["tokenize_seconds"] = time.perf_counter() - t0
    out["tokenize_rows"] = len(subset)
    out["tokenize_tokens"] = stats.total_tokens
    out["tokenize_delta_mb"] = status("VmHWM") - rss1
print(json.dumps(out))
'''


def run_child(code_dir: Path, what: str, path: Path, **extra) -> dict:
    env = {**os.environ, **CHILD_ENV}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(code_dir), what, str(path),
                           json.dumps(extra)], capture_output=True, text=True, env=env,
                          cwd=code_dir)
    if proc.returncode:
        raise SystemExit(f"child {what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_report_cli(code_dir: Path, path: Path, out_json: Path) -> dict:
    """`python3 llama_dataset.py --dataset PATH --report --output OUT` in a child; wall time and
    peak RSS (ru_maxrss from wait4, KiB on Linux)."""
    if out_json.exists():
        out_json.unlink()
    env = {**os.environ, **CHILD_ENV}
    cmd = [sys.executable, str(code_dir / "llama_dataset.py"), "--dataset", str(path),
           "--model-size", "135m", "--report", "--output", str(out_json)]
    log = out_json.with_suffix(".log")
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=code_dir, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code:
        raise SystemExit(f"report failed ({code}):\n{log.read_text()[-3000:]}")
    report = json.loads(out_json.read_text())
    return {"seconds": wall, "peak_mb": usage.ru_maxrss / 1024, "examples": report["examples"],
            "report": {k: report[k] for k in ("examples", "splits", "duplicate_examples",
                                              "would_truncate", "prompt_tokens",
                                              "response_tokens", "dataset_hash")}}


# --------------------------------------------------------------------------------------
# The code under test: the working tree, or a git revision's modules
# --------------------------------------------------------------------------------------


def export_revision(ref: str, dest: Path) -> Path:
    """The whole tree at `ref` (flat modules before the llama_sft package, the package after)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def measure(label: str, code_dir: Path, data: Path, small: Path, work: Path,
            tokenize_rows: int, only_report: bool = False) -> dict:
    print(f"\n== {label}: {code_dir}", flush=True)
    res: dict = {"code": str(code_dir)}
    if only_report:
        return _measure_report(res, label, code_dir, data, small, work)
    res["load"] = run_child(code_dir, "load", data)
    print(f"load_examples   {res['load']['load_seconds']:7.1f} s  peak RSS "
          f"{res['load']['load_peak_mb']:7.0f} MB  (+{res['load']['load_delta_mb']:.0f} MB for "
          f"{res['load']['examples']} examples)", flush=True)
    res["split"] = run_child(code_dir, "split", data)
    print(f"split_examples  {res['split']['split_seconds']:7.1f} s  peak above the loaded "
          f"records +{res['split']['split_delta_mb']:.0f} MB  {res['split']['splits']}", flush=True)
    if tokenize_rows:
        res["tokenize"] = t = run_child(code_dir, "tokenize", data, rows=tokenize_rows)
        print(f"tokenize ({t['tokenize_rows']} rows) {t['tokenize_seconds']:6.1f} s  "
              f"{t['tokenize_rows'] / t['tokenize_seconds']:.0f} rows/s, "
              f"{t['tokenize_tokens'] / t['tokenize_seconds']:.0f} tokens/s, "
              f"+{t['tokenize_delta_mb']:.0f} MB", flush=True)
    return _measure_report(res, label, code_dir, data, small, work)


def _measure_report(res: dict, label: str, code_dir: Path, data: Path, small: Path,
                    work: Path) -> dict:
    res["report_baseline"] = run_report_cli(code_dir, small, work / f"{label}_small.json")
    res["report"] = r = run_report_cli(code_dir, data, work / f"{label}_report.json")
    r["delta_mb"] = r["peak_mb"] - res["report_baseline"]["peak_mb"]
    print(f"--report (100 rows)     {res['report_baseline']['seconds']:7.1f} s  peak RSS "
          f"{res['report_baseline']['peak_mb']:7.0f} MB", flush=True)
    print(f"--report ({r['examples']} rows) {r['seconds']:7.1f} s  peak RSS {r['peak_mb']:7.0f} MB"
          f"  (+{r['delta_mb']:.0f} MB above the 100-row run)", flush=True)
    return res


# --------------------------------------------------------------------------------------
# The tokenized cache (issue 12): today's path against the cache, on --rows (1,000,000)
# --------------------------------------------------------------------------------------

# Today's path before the cache, in a fresh child: what llama_train.py did with --dataset
# (load every example, split, tokenize the train split into Python lists).
LEGACY = r"""
import json, re, sys, time
sys.path.insert(0, sys.argv[1])
def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
from llama_sft.data.loader import load_examples
from llama_sft.data.splits import split_examples
from llama_sft.data.tokenize import tokenize_examples
from llama_sft.modeling.load import load_tokenizer
tok = load_tokenizer("smollm2-135m")
rss0 = status("VmRSS")
t0 = time.perf_counter()
examples = load_examples(sys.argv[2])
splits, _ = split_examples(examples, val_ratio=0.05, test_ratio=0.05)
rows = tokenize_examples(splits["train"], tok, max_length=512, prompt_format="auto")
print(json.dumps({"seconds": time.perf_counter() - t0, "rows": len(examples),
                  "train_rows": len(rows), "peak_above_mb": status("VmHWM") - rss0,
                  "held_mb": status("VmRSS") - rss0}))
"""


def _status_mb(pid: int) -> dict[str, float]:
    """RssAnon (the process's own memory), RssFile (mapped files: the Arrow cache, libraries;
    the kernel can drop these pages) and VmRSS, in MB."""
    out = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def run_watched(cmd: list[str], env: dict, marks: dict[str, str], *, stop_at: str | None = None,
                log: Path, cwd: Path = ROOT, timeout: float = 3600) -> dict:
    """Run `cmd` (stdout and stderr into `log`), polling memory every 0.1 s: the process's own
    peak RssAnon and VmRSS, the summed RSS of the whole process tree (tokenizer workers), and,
    at the first output line containing each of `marks`' texts, the time since the start and
    the process's memory. Killed (SIGKILL) once the `stop_at` mark is seen."""
    import psutil
    import threading

    t0 = time.perf_counter()
    seen: dict[str, dict] = {}
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)

    def reader():
        with open(log, "w", encoding="utf-8") as fh:
            for line in proc.stdout:
                fh.write(line)
                lines.append(line)
                for name, text in marks.items():
                    if name not in seen and text in line:
                        seen[name] = {"seconds": time.perf_counter() - t0, **_status_mb(proc.pid)}

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    peak = {"anon_mb": 0.0, "rss_mb": 0.0, "tree_mb": 0.0, "workers": 0}
    names: set[str] = set()
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        st = _status_mb(proc.pid)
        peak["anon_mb"] = max(peak["anon_mb"], st.get("RssAnon", 0.0))
        peak["rss_mb"] = max(peak["rss_mb"], st.get("VmRSS", 0.0))
        try:
            kids = root.children(recursive=True)
            tree = st.get("VmRSS", 0.0) + sum(k.memory_info().rss for k in kids) / 2**20
            peak["tree_mb"] = max(peak["tree_mb"], tree)
            peak["workers"] = max(peak["workers"], len(kids))
            for k in kids:
                names.add(" ".join(k.cmdline()[:3])[:120])
        except psutil.Error:
            pass
        if stop_at and stop_at in seen:
            proc.kill()
            break
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            raise SystemExit(f"{cmd} ran over {timeout} s; log: {log}")
        time.sleep(0.1)
    proc.wait()
    th.join(timeout=10)
    wall = time.perf_counter() - t0
    if proc.returncode and not (stop_at and stop_at in seen):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); log: {log}\n"
                         + "".join(lines[-30:]))
    return {"seconds": wall, "marks": seen, "peak": peak, "children": sorted(names),
            "lines": lines}


def tiny_model() -> Path:
    """bench_train.py's random-tiny LLaMA (2 layers of 64, the embedded model's tokenizer), kept
    in the toolkit's cache: for the two-process case, where the model does not matter."""
    code = ("import argparse, sys; sys.path.insert(0, 'bench'); from bench_train import "
            "ensure_model; print(ensure_model(argparse.Namespace(model='random-tiny', "
            "layers=None, device='cpu'))[0])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **CHILD_ENV}, check=True)
    return Path(proc.stdout.strip().splitlines()[-1])


def cache_case(args, work: Path, data: Path, small: Path) -> dict:
    """The 1M-row comparison: today's path (on --legacy-rows, scaled to --rows when smaller),
    the cache's first build with num_proc 1 and 2 (`llama_dataset.py --prepare`), a second
    `llama_train.py` run up to its first step, and two torchrun processes building one cache."""
    env = {**os.environ, **CHILD_ENV}
    env.pop("RAYON_NUM_THREADS", None)  # each tokenizer process on one thread is set below
    env["TOKENIZERS_PARALLELISM"] = "false"
    py = sys.executable
    res: dict = {"rows": args.rows}
    scale = args.rows / args.legacy_rows

    # 1. Today's path.
    legacy_data = data if args.legacy_rows == args.rows else work / f"sft_{args.legacy_rows}.jsonl"
    if legacy_data != data:
        make_dataset(legacy_data, args.legacy_rows)
    proc = subprocess.run([py, "-c", LEGACY, str(ROOT), str(legacy_data)], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"legacy child failed:\n{proc.stderr[-3000:]}")
    leg = json.loads(proc.stdout.strip().splitlines()[-1])
    leg["scaled_to_rows"] = {"seconds": leg["seconds"] * scale,
                             "peak_above_mb": leg["peak_above_mb"] * scale}
    res["legacy"] = leg
    print(f"today's path (load + split + tokenize the train split), {leg['rows']} rows: "
          f"{leg['seconds']:.1f} s, +{leg['peak_above_mb']:.0f} MB peak, "
          f"+{leg['held_mb']:.0f} MB held"
          + (f"; x{scale:g} for {args.rows} rows: ~{leg['scaled_to_rows']['seconds']:.0f} s, "
             f"~+{leg['scaled_to_rows']['peak_above_mb'] / 1024:.1f} GB" if scale != 1 else ""),
          flush=True)

    # 2. First builds: llama_dataset.py --prepare, num_proc 1 and 2, and its 100-row baseline.
    def prepare(path: Path, cache: Path, num_proc: int, name: str) -> dict:
        shutil.rmtree(cache, ignore_errors=True)
        r = run_watched([py, "llama_dataset.py", "--dataset", str(path), "--model-size", "135m",
                         "--prepare", "--num-proc", str(num_proc), "--cache-dir", str(cache)],
                        env, {}, log=work / f"{name}.log")
        r.pop("lines")
        return r

    base = prepare(small, work / "cache_small", 1, "prepare_small")
    res["prepare_baseline"] = base
    print(f"--prepare, 100 rows (baseline): {base['seconds']:.1f} s, peak RSS "
          f"{base['peak']['rss_mb']:.0f} MB (RssAnon {base['peak']['anon_mb']:.0f})", flush=True)
    for n in args.num_procs:
        r = prepare(data, work / f"cache_np{n}", n, f"prepare_np{n}")
        r["main_anon_above_baseline_mb"] = r["peak"]["anon_mb"] - base["peak"]["anon_mb"]
        r["cache_mb"] = tree_mb(work / f"cache_np{n}")
        res[f"prepare_num_proc_{n}"] = r
        print(f"--prepare --num-proc {n}, {args.rows} rows: {r['seconds']:.1f} s; main process "
              f"peak RSS {r['peak']['rss_mb']:.0f} MB (RssAnon {r['peak']['anon_mb']:.0f}, "
              f"+{r['main_anon_above_baseline_mb']:.0f} above the 100-row run); whole tree "
              f"{r['peak']['tree_mb']:.0f} MB with {r['peak']['workers']} worker(s); cache "
              f"{r['cache_mb']:.0f} MB", flush=True)

    # 3. A second training run on the built cache, up to its first step (then killed).
    def second(path: Path, cache: Path, name: str) -> dict:
        out = work / f"{name}_out"
        shutil.rmtree(out, ignore_errors=True)
        r = run_watched([py, "llama_train.py", "--model-size", "135m", "--dataset", str(path),
                         "--cache-dir", str(cache), "--output-dir", str(out), "--max-steps", "2",
                         "--batch-size", "1", "--gradient-accumulation-steps", "1",
                         "--logging-steps", "1"], env,
                        {"cache": "tokenized cache", "data_ready": "data: ",
                         "first_step": "step 1/"}, stop_at="first_step", log=work / f"{name}.log")
        r["cache_line"] = next((ln.strip() for ln in r.pop("lines") if "tokenized cache" in ln), "")
        return r

    cache = work / f"cache_np{args.num_procs[-1]}"
    sb = second(small, work / "cache_small", "train_small")
    st = second(data, cache, "train_second")
    res["second_run_baseline"], res["second_run"] = sb, st
    m, mb_ = st["marks"], sb["marks"]
    st["data_anon_above_baseline_mb"] = m["data_ready"]["RssAnon"] - mb_["data_ready"]["RssAnon"]
    print(f"second llama_train.py run, {args.rows} rows: '{st['cache_line']}'\n"
          f"  data ready at {m['data_ready']['seconds']:.1f} s (100-row run: "
          f"{mb_['data_ready']['seconds']:.1f} s), first step at {m['first_step']['seconds']:.1f} s"
          f" (100-row run: {mb_['first_step']['seconds']:.1f} s)\n"
          f"  when the data is ready: RssAnon {m['data_ready']['RssAnon']:.0f} MB (100-row run "
          f"{mb_['data_ready']['RssAnon']:.0f}: +{st['data_anon_above_baseline_mb']:.0f} MB), "
          f"RssFile {m['data_ready']['RssFile']:.0f} MB (mapped files, 100-row run "
          f"{mb_['data_ready']['RssFile']:.0f})", flush=True)

    # 4. Two processes (torchrun, gloo, a tiny model) on one cold cache: tokenized once.
    two_data = work / f"sft_{args.two_rank_rows}.jsonl"
    if not two_data.exists():
        make_dataset(two_data, args.two_rank_rows)
    model = tiny_model()
    two_cache = work / "cache_two"
    shutil.rmtree(two_cache, ignore_errors=True)
    shutil.rmtree(work / "two_out", ignore_errors=True)
    r = run_watched([py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                     "llama_train.py", "--base-model", str(model), "--model-size", "135m",
                     "--dataset", str(two_data), "--cache-dir", str(two_cache),
                     "--output-dir", str(work / "two_out"), "--max-steps", "1",
                     "--val-ratio", "0.01", "--batch-size", "1"],
                    {**env, "OMP_NUM_THREADS": "1", "LLAMA_SFT_LOG_ALL_RANKS": "1"}, {"first_step": "step 1/"},
                    log=work / "two_ranks.log")
    lines = r.pop("lines")
    built = [ln.split("]")[0].split("[")[-1] for ln in lines if "tokenized cache built" in ln]
    hits = [ln.split("]")[0].split("[")[-1] for ln in lines if "tokenized cache hit" in ln]
    misses = [ln.split("]")[0].split("[")[-1] for ln in lines if "tokenized cache miss" in ln]
    keys = [p.name for p in (two_cache / "tokenized").iterdir()]
    r.update(built=built, hits=hits, misses=misses, cache_folders=keys)
    res["two_ranks"] = r
    print(f"torchrun, 2 processes, {args.two_rank_rows} rows, cold cache: {r['seconds']:.1f} s; "
          f"'tokenized cache miss' on {misses}, 'built' on {built}, 'hit' on {hits}; cache folders "
          f"{keys}", flush=True)

    # Verdicts against the targets.
    prep_peak = max(res[f"prepare_num_proc_{n}"]["main_anon_above_baseline_mb"]
                    for n in args.num_procs)
    res["targets"] = {
        "training data RssAnon above the 100-row run < 1024 MB":
            st["data_anon_above_baseline_mb"] < 1024,
        "preparation main-process RssAnon above the 100-row run < 1024 MB": prep_peak < 1024,
        "second run: cache hit, no tokenization": "tokenized cache hit" in st["cache_line"],
        "second run: data ready < 10 s": m["data_ready"]["seconds"] < 10,
        "two ranks tokenize once": (misses == built == ["rank 0"] and hits == ["rank 1"]
                                    and len(keys) == 1),
    }
    for k, ok in res["targets"].items():
        print(f"{'PASS' if ok else 'FAIL'}: {k}")
    return res


def tree_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def machine() -> dict:
    cpu = cpu_model_name()
    mem = ""
    try:
        mem = next(line.split(":", 1)[1].strip() for line in open("/proc/meminfo")
                   if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in load], "platform": platform.platform()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--tokenize-rows", type=int, default=20_000,
                   help="rows tokenized with tokenize_examples (0: skip)")
    p.add_argument("--compare-ref", help="also measure llama_dataset & co. at this git revision")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "bench_loader"))
    p.add_argument("--quick", action="store_true", help="no tokenize subset")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure N times, alternating the revisions (timings on a shared "
                        "machine vary: compare the fastest of each)")
    p.add_argument("--only-report", action="store_true", help="measure the report command only")
    p.add_argument("--cache", action="store_true",
                   help="the tokenized-cache case instead (issue 12; use with --rows 1000000): "
                        "today's path vs the cache's first build, a second run and two ranks")
    p.add_argument("--legacy-rows", type=int, default=200_000,
                   help="with --cache: rows today's path is measured on, scaled to --rows (it "
                        "holds ~17 KB a row: 1M rows would not fit beside the rest here)")
    p.add_argument("--num-procs", type=int, nargs="+", default=[1, 2],
                   help="with --cache: the --num-proc values of the first builds")
    p.add_argument("--two-rank-rows", type=int, default=100_000,
                   help="with --cache: rows of the two-process (torchrun) case")
    args = p.parse_args(argv)
    if args.quick:
        args.tokenize_rows = 0
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    data, small = work / f"sft_{args.rows}.jsonl", work / "sft_100.jsonl"
    info = make_dataset(data, args.rows)
    make_dataset(small, 100)
    mb = info["bytes"] / 2**20
    print(f"dataset: {data} ({info['rows']} rows, {mb:.1f} MiB)")
    if args.cache:
        results = {"machine": machine(), "dataset": {**info, "mb": mb, "path": str(data)},
                   "cache": cache_case(args, work, data, small)}
        results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        print(f"load average at start {results['machine']['load_average_at_start']}, at end "
              f"{results['machine']['load_average_at_end']}")
        (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"results: {work / 'results.json'}")
        return 0 if all(results["cache"]["targets"].values()) else 1
    results = {"machine": machine(), "dataset": {**info, "mb": mb, "path": str(data)},
               "bound": f"report peak RSS above its 100-row baseline < {REPORT_BOUND} x file size"}
    codes = {"current": ROOT}
    if args.compare_ref:
        codes = {f"at {args.compare_ref}": export_revision(args.compare_ref, work / "ref_code"),
                 **codes}
    runs: dict[str, list[dict]] = {label: [] for label in codes}
    for i in range(args.repeat):
        for label, code_dir in codes.items():
            runs[label].append(measure(label.replace(" ", "_"), code_dir, data, small, work,
                                       args.tokenize_rows if i == 0 else 0, args.only_report))
    for label, rs in runs.items():
        results[label] = rs[0]
        if args.repeat > 1:
            times = [r["report"]["seconds"] for r in rs]
            results[label]["report"]["seconds_all"] = times
            results[label]["report"]["seconds"] = min(times)
            results[label]["report"]["delta_mb"] = max(r["report"]["delta_mb"] for r in rs)
            results[label]["report"]["peak_mb"] = max(r["report"]["peak_mb"] for r in rs)
            print(f"{label}: --report {[round(t, 1) for t in times]} s, fastest {min(times):.1f} s")
    cur = results["current"]["report"]
    limit = REPORT_BOUND * mb
    verdict = "PASS" if cur["delta_mb"] < limit else "FAIL"
    results["verdict"] = verdict
    print(f"\n{verdict}: --report peak RSS above baseline {cur['delta_mb']:.0f} MB "
          f"{'<' if verdict == 'PASS' else '>='} {REPORT_BOUND} x {mb:.0f} MiB = {limit:.0f} MB")
    if "load" in results["current"]:
        one_copy = results["current"]["load"]["load_delta_mb"]
        print(f"(one copy of the parsed records, load_examples: +{one_copy:.0f} MB = "
              f"{one_copy / mb:.2f} x file size)")
    if args.compare_ref:
        before = results[f"at {args.compare_ref}"]["report"]
        same = before["report"] == cur["report"]
        results["same_report"] = same
        print(f"report at {args.compare_ref}: +{before['delta_mb']:.0f} MB, {before['seconds']:.0f} s;"
              f" now +{cur['delta_mb']:.0f} MB, {cur['seconds']:.0f} s; identical report: {same}")
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {work / 'results.json'}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
