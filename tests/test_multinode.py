"""Two "nodes" on one machine: two torchrun agents (--nnodes 2, one process each) meet through a
c10d rendezvous on the loopback and train over gloo on the CPU, the way two real machines would
(each with its own --output-dir and --cache-dir on its own disk). The run must match one process
with the same global batch, and only global rank 0 may write the run's outputs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import adapter_tensors, losses, tiny_args

from llama_sft.layout import CONSUMED_IDS, FINAL_MODEL, METRICS, RUN_OUTPUTS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "llama_train.py"
STEPS = 4
TIMEOUT = 300
# Dropout 0: each process draws its own dropout masks, which no global batch can match. A
# checkpoint at step 2, so the multi-node save path runs too.
COMMON = ["--max-steps", str(STEPS), "--eval-steps", "100", "--save-steps", "2",
          "--lora-dropout", "0", "--gradient-accumulation-steps", "1"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "LLAMA_SFT_LOG_ALL_RANKS": "1"}


def with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


def start_node(rank: int, port: int, run_id: str, argv: list[str], log: Path) -> subprocess.Popen:
    """One node's torchrun agent. --local-addr: the agent advertises the loopback address for
    the worker process group, not whatever this machine's hostname resolves to. The c10d
    rendezvous ignores --node-rank (torchrun says so): it numbers the nodes itself, in the order
    of (address, agent pid), so which node holds global rank 0 is read from the logs."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
           str(rank), "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
           f"127.0.0.1:{port}", "--rdzv-id", run_id, "--local-addr", "127.0.0.1",
           str(SCRIPT), *argv]
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, cwd=log.parent, env=env(), stdout=fh,
                                stderr=subprocess.STDOUT)


def wait_all(procs: list[subprocess.Popen], logs: list[Path], expect_ok: bool = True,
             timeout: float = TIMEOUT) -> None:
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:  # one node failed or hung: do not leave the other waiting for it
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert (p.returncode == 0) == expect_ok, \
            f"{log.name}: exit {p.returncode}\n" + log.read_text()[-4000:]


def run_two_nodes(base: list[str], node: list[Path], logs: list[Path], *extra: str,
                  expect_ok: bool = True, timeout: float = TIMEOUT) -> list[str]:
    """Both nodes' torchrun agents, each with its own --output-dir and --cache-dir under
    node[r]; their logs' text."""
    port, run_id = free_port(), f"test-{uuid.uuid4().hex[:12]}"
    procs = []
    for r in (0, 1):
        argv = with_flag(base, "--output-dir", str(node[r] / "out"))
        procs.append(start_node(r, port, run_id,
                                [*argv, "--cache-dir", str(node[r] / "cache"), *extra], logs[r]))
    wait_all(procs, logs, expect_ok, timeout)
    return [log.read_text() for log in logs]


def consumed(run: Path) -> list[tuple[int, list[str]]]:
    return [(r["step"], r["ids"]) for r in map(json.loads, (run / CONSUMED_IDS).open())]


def run_outputs(folder: Path) -> list[str]:
    """What a training run writes into --output-dir, found in `folder`."""
    names = [FINAL_MODEL, METRICS, *RUN_OUTPUTS]
    found = [n for n in names if (folder / n).exists()]
    return found + sorted(p.name for p in folder.glob("checkpoint-*"))


def tokenized_caches(cache_dir: Path) -> dict[str, dict]:
    """key -> meta.json of each complete cache in a --cache-dir, and no half-built folder."""
    root = cache_dir / "tokenized"
    assert not list(root.glob(".*.tmp-*")), "a build was left half-done"
    return {p.name: json.loads((p / "meta.json").read_text()) for p in root.iterdir()}


@dataclass
class TwoNodes:
    single: Path          # the one-process run with the same global batch
    node: list[Path]      # node[r]: node r's disk (out/, cache/)
    texts: list[str]      # node r's log
    main: int             # the node whose worker was global rank 0


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, tiny_llama_dir) -> TwoNodes:
    work = tmp_path_factory.mktemp("multinode")
    base = tiny_args(work, tiny_llama_dir, "one", *COMMON)
    one = [*with_flag(base, "--batch-size", "4"), "--cache-dir", str(work / "cache-one")]
    proc = subprocess.run([sys.executable, str(SCRIPT), *one], cwd=work, env=env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Per node: half the per-device batch (global batch 4, as above), and its own disk.
    node = [work / f"node{r}" for r in (0, 1)]
    texts = run_two_nodes(with_flag(base, "--batch-size", "2"), node,
                          [work / f"node{r}.log" for r in (0, 1)])
    # The node whose worker is global rank 0 (see start_node); the other worker is rank 1.
    main = [r for r in (0, 1) if "[rank 0]" in texts[r]]
    assert len(main) == 1 and "[rank 1]" in texts[1 - main[0]], texts
    return TwoNodes(work / "one", node, texts, main[0])


@pytest.mark.slow
def test_multinode_guarantee_20_loopback_matches_single_process(two_nodes):
    t = two_nodes
    node, texts = t.node, t.texts
    assert f"step {STEPS}/{STEPS}" in texts[t.main]
    out0, out1 = node[t.main] / "out", node[1 - t.main] / "out"

    # Only global rank 0 writes the run's outputs; the other node's --output-dir holds none.
    assert {FINAL_MODEL, METRICS, CONSUMED_IDS, "train_results.json"} <= set(run_outputs(out0))
    assert {"checkpoint-2", "checkpoint-4"} <= set(run_outputs(out0))
    assert run_outputs(out1) == []
    # What rank 1 may leave: its own RNG state, which transformers saves per process into the
    # checkpoint's staging folder; with a separate disk, rank 0 never renames that folder there.
    left = sorted(str(p.relative_to(out1)) for p in out1.rglob("*") if p.is_file())
    assert all(Path(f).name == "rng_state_1.pth" and Path(f).parent.name.startswith(".checkpoint-")
               for f in left), left

    # Each node's local rank 0 (its only process here) built the tokenized cache on its own
    # disk, once, and nothing else tokenized: the same rows on both.
    for r in (0, 1):
        assert texts[r].count("tokenized cache miss") == 1, node[r].name
        assert "INFO tokenized cache built" in texts[r]
        assert str(node[r] / "cache") in texts[r] and str(node[1 - r] / "cache") not in texts[r]
    caches = [tokenized_caches(n / "cache") for n in node]
    one_cache = tokenized_caches(t.single.parent / "cache-one")
    assert caches[0].keys() == caches[1].keys() == one_cache.keys() and len(one_cache) == 1
    key = next(iter(one_cache))
    assert caches[0][key]["rows"] == caches[1][key]["rows"] == one_cache[key]["rows"]
    assert caches[0][key]["dataset_hash"] == caches[1][key]["dataset_hash"]

    # Same training as one process with the same global batch, within test_multiprocess.py's
    # tolerance (the same gradients summed in a different order under bf16 autocast).
    a, b = adapter_tensors(t.single / FINAL_MODEL), adapter_tensors(out0 / FINAL_MODEL)
    assert a.keys() == b.keys()
    for k in a:
        rel = float((b[k] - a[k]).norm() / a[k].norm().clamp_min(1e-12))
        assert rel < 1e-2, (k, rel)
    assert [k for k in a if "lora_B" in k and a[k].abs().sum() > 0]  # trained, not zeros
    la, lb = losses(t.single), losses(out0)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-2)

    # consumed_ids.jsonl: every process's share gathered to rank 0 (callbacks.ConsumedIds),
    # the single-process sequence exactly.
    single = consumed(t.single)
    assert [len(ids) for _, ids in single] == [4] * STEPS
    assert consumed(out0) == single


@pytest.mark.slow
def test_multinode_resume_from_local_disks_is_refused_on_every_node(two_nodes, tiny_llama_dir):
    """--resume auto with each node's own --output-dir: rank 0's disk holds the checkpoints, the
    other node's none. Resuming would start that node from step 0 beside rank 0's checkpoint
    (they train out of step, then wait on each other forever): every process refuses instead,
    at once, and nothing is changed."""
    t = two_nodes
    out0 = t.node[t.main] / "out"
    before = {p: p.read_bytes() for p in out0.rglob("*") if p.is_file()}
    base = with_flag(tiny_args(t.single.parent, tiny_llama_dir, "one", *COMMON),
                     "--batch-size", "2")
    logs = [t.single.parent / f"resume{r}.log" for r in (0, 1)]
    texts = run_two_nodes(base, t.node, logs, "--resume", "auto", expect_ok=False, timeout=120)
    for text in texts:
        assert "error: --resume auto: the processes found different checkpoints" in text
        assert f"by rank: [{STEPS}, 0]" in text
    assert {p: p.read_bytes() for p in out0.rglob("*") if p.is_file()} == before
