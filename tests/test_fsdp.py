"""LoRA under FSDP2 on two CPU processes (gloo), launched the way a user would:
`accelerate launch --config_file configs/accelerate_fsdp.yaml llama_train.py ...`.

What is checked against one process with the same global batch (as tests/test_multiprocess.py
does for DDP): the losses and the adapter. Then what FSDP changes: the model really was sharded
(sharded checkpoints), final_model/ holds the whole adapter and loads on one process, and a run
killed after a sharded checkpoint resumes (--resume auto, same world size) to the same training as
an uninterrupted FSDP run. FSDP with 4-bit (QLoRA) needs CUDA and is not run here."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import adapter_tensors, losses, small_dataset, tiny_args

from llama_sft.layout import CONSUMED_IDS, FINAL_MODEL, MANIFEST, METRICS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "llama_train.py"
CONFIG = ROOT / "configs" / "accelerate_fsdp.yaml"
STEPS = 4
TIMEOUT = 300
# Dropout 0: each process draws its own dropout masks, which no global batch can match. A
# checkpoint every 2 steps: the resume test starts from checkpoint-2.
COMMON = ["--max-steps", str(STEPS), "--eval-steps", "100", "--save-steps", "2",
          "--lora-dropout", "0", "--gradient-accumulation-steps", "1"]
SHARDED = ("pytorch_model_fsdp_0", "optimizer_0")  # accelerate's sharded checkpoint folders


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_SFT_TEST_")}
    out.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    out.update(extra)
    return out


def fsdp_cmd(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
            "--main_process_port", str(free_port()), "--num_cpu_threads_per_process", "1",
            str(SCRIPT), *argv]


def run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def argv(work: Path, tiny_llama_dir: Path, out: str, batch_size: int, *extra: str) -> list[str]:
    a = tiny_args(work, tiny_llama_dir, out, *COMMON, "--cache-dir", str(work / "cache"), *extra)
    a[a.index("--batch-size") + 1] = str(batch_size)
    return a


def loss_steps(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) in file order, duplicates kept: a step logged twice shows."""
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / METRICS).open())
            if "loss" in r]


def consumed(run_dir: Path) -> list[tuple[int, list[str]]]:
    return [(r["step"], r["ids"]) for r in map(json.loads, (run_dir / CONSUMED_IDS).open())]


def sharded_state(ckpt: Path, name: str) -> dict[str, torch.Tensor]:
    """A sharded torch.distributed.checkpoint folder read back whole, as flat name -> tensor."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = ckpt.parent / f"{ckpt.name}-{name}.pt"
    dcp_to_torch_save(str(ckpt / name), str(whole))
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, obj) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif torch.is_tensor(obj):
            flat[prefix] = obj

    walk("", torch.load(whole, weights_only=False))
    whole.unlink()
    return flat


def test_fsdp_loss_path_is_normalised_like_the_fused_one(tiny_llama_dir, tokenizer, tmp_path):
    """Under FSDP the loss is the model's own (the generic path): given the step's supervised
    token count (here two micro-batches' worth, as with accumulation), it must be the same sum
    over that count as the fused path, not this micro-batch's mean."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from llama_sft.data.batching import PadCollator
    from llama_sft.data.loader import load_examples
    from llama_sft.data.tokenize import tokenize_examples
    from llama_sft.training.trainer import SFTTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                             init_lora_weights=False))
    trainer = SFTTrainer(model=model, args=TrainingArguments(
        output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none"))
    rows = tokenize_examples(load_examples(small_dataset(tmp_path, 6)), tokenizer, max_length=256)
    batch = PadCollator(tokenizer.pad_token_id)(rows)
    step_tokens = 2 * int((batch["labels"][:, 1:] != -100).sum())
    model.train()
    with torch.no_grad():
        fused = trainer.compute_loss(model, batch, num_items_in_batch=step_tokens)
        trainer.is_fsdp_enabled = True  # the path FSDP takes; one process, so no sharding
        generic = trainer.compute_loss(model, batch, num_items_in_batch=step_tokens)
        mean = trainer.compute_loss(model, batch)
    assert torch.allclose(generic, fused, rtol=1e-5), (generic, fused)
    assert torch.allclose(2 * generic, mean, rtol=1e-5)  # half the step's tokens are here


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def single(work, tiny_llama_dir) -> Path:
    run([sys.executable, str(SCRIPT), *argv(work, tiny_llama_dir, "single", 4)], work)
    return work / "single"


@pytest.fixture(scope="module")
def fsdp(work, tiny_llama_dir) -> tuple[Path, str]:
    log = run(fsdp_cmd(argv(work, tiny_llama_dir, "fsdp", 2)), work)
    return work / "fsdp", log


@pytest.mark.slow
def test_guarantee_20_fsdp_matches_one_process_with_the_same_global_batch(single, fsdp):
    out, log = fsdp
    assert f"step {STEPS}/{STEPS}" in log
    assert "FSDP2 on CPU processes (gloo)" in log
    # Really sharded, not a silent DDP run: each checkpoint holds the adapter and the optimizer
    # as one shard per process, and no whole optimizer file.
    for step in (2, 4):
        ckpt = out / f"checkpoint-{step}"
        assert (ckpt / MANIFEST).is_file() and not (ckpt / "optimizer.pt").exists()
        for name in SHARDED:
            assert sorted(p.name for p in (ckpt / name).glob("*.distcp")) == \
                ["__0_0.distcp", "__1_0.distcp"], (ckpt.name, name)
    # Tolerance as tests/test_multiprocess.py: the same gradients summed in a different order
    # (and FSDP computes in bf16 with fp32 master weights of the adapter, reduces gradients in
    # bf16 and returns the loss in bf16), so relative L2 under 1% per tensor, losses within 1%.
    a, b = adapter_tensors(single / FINAL_MODEL), adapter_tensors(out / FINAL_MODEL)
    assert a.keys() == b.keys()
    for k in a:
        rel = float((b[k] - a[k]).norm() / a[k].norm().clamp_min(1e-12))
        assert rel < 1e-2, (k, rel)
    assert [k for k in a if "lora_B" in k and a[k].abs().sum() > 0]  # trained, not zeros
    la, lb = losses(single), losses(out)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-2)
    # consumed_ids.jsonl: both processes' shares gathered, the single-process sequence exactly.
    assert consumed(out) == consumed(single)


@pytest.mark.slow
def test_fsdp_final_adapter_is_whole_and_loads_on_one_process(single, fsdp, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = fsdp
    a, b = adapter_tensors(single / FINAL_MODEL), adapter_tensors(out / FINAL_MODEL)
    # Gathered from both shards: the same tensors, shapes and dtypes as one process writes.
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == \
        {k: (v.shape, v.dtype) for k, v in a.items()}
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 400, 500, 600, 700, 800]])
    with torch.no_grad():
        base_logits = base(ids).logits
    model = PeftModel.from_pretrained(base, str(out / FINAL_MODEL))
    loaded = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(b)
    for name, tensor in b.items():
        key = name.replace(".weight", ".default.weight")
        assert torch.equal(loaded[key], tensor), name
    with torch.no_grad():
        tuned_logits = model(ids).logits
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-4)  # the adapter acts


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and its workers: torchrun starts each worker in a session of its
    own, and workers outlive a killed launcher."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait()


@pytest.mark.slow
def test_fsdp_run_killed_after_a_sharded_checkpoint_resumes_to_the_same_training(
        work, tiny_llama_dir, fsdp):
    ref, _ = fsdp
    a = argv(work, tiny_llama_dir, "killed", 2)
    out = work / "killed"
    log = work / "killed.log"
    with open(log, "wb") as fh:
        # One second after each step (test hook): room to kill after step 3's log line.
        proc = subprocess.Popen(fsdp_cmd(a), cwd=work, stdout=fh, stderr=subprocess.STDOUT,
                                env=env(LLAMA_SFT_TEST_STEP_DELAY="1.0"))
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ((out / "checkpoint-2" / MANIFEST).is_file() and (out / METRICS).is_file()
                   and 3 in [s for s, _ in loss_steps(out)]):
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no step 3 in time"
            time.sleep(0.05)
    finally:
        kill_tree(proc)
    assert not (out / "checkpoint-4").exists() and not (out / FINAL_MODEL).exists()
    assert [s for s, _ in loss_steps(out)] == [1, 2, 3]  # step 3 is to be trained again

    resumed_log = run(fsdp_cmd([*a, "--resume", "auto"]), work)
    assert "resuming from" in resumed_log
    results = json.loads((out / "train_results.json").read_text())
    assert Path(results["resumed_from"]).name == "checkpoint-2"
    # Each step once, with the uninterrupted run's losses, examples and adapter: the sharded
    # adapter, optimizer, scheduler and RNG states came back, and the data order with them.
    # Exact: the same arithmetic in the same order on the same thread count.
    assert loss_steps(out) == loss_steps(ref)
    assert consumed(out) == consumed(ref)
    ta, tb = adapter_tensors(ref / FINAL_MODEL), adapter_tensors(out / FINAL_MODEL)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    # The sharded optimizer state of the last checkpoint, read back whole, is the same too.
    oa = sharded_state(ref / f"checkpoint-{STEPS}", "optimizer_0")
    ob = sharded_state(out / f"checkpoint-{STEPS}", "optimizer_0")
    assert oa.keys() == ob.keys() and any("exp_avg" in k for k in oa)
    for k in oa:
        assert torch.equal(oa[k], ob[k]), k
