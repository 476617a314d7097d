"""Training behaviour on a tiny random LLaMA (fast) and the embedded 135M model (slow)."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from helpers import adapter_tensors, losses, small_dataset, tiny_args

import llama_train
from llama_sft.config import TrainArgs
from llama_sft.data.batching import PadCollator
from llama_sft.data.loader import load_examples
from llama_sft.data.tokenize import tokenize_examples
from llama_sft.errors import NonFiniteLossError
from llama_sft.files import verify_manifest, write_manifest
from llama_sft.training.checkpoints import (
    latest_good_checkpoint,
    list_checkpoints,
    rotate_checkpoints,
)
from llama_sft.training.faults import FaultInjection
from llama_sft.training.train import run_train
from llama_sft.training.trainer import SFTTrainer


def cfg_for(argv) -> TrainArgs:
    return llama_train.resolve_train_config(argv)


# ---------------------------------------------------------------------------------------------
# Collator and loss
# ---------------------------------------------------------------------------------------------


def test_collator_masks_padding_by_attention_not_token_id(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the case that breaks naive masking
    rows = [{"input_ids": [5, 6, 7, tokenizer.eos_token_id], "labels": [-100, -100, 7, tokenizer.eos_token_id]},
            {"input_ids": [5, tokenizer.eos_token_id], "labels": [-100, tokenizer.eos_token_id]}]
    batch = PadCollator(tokenizer.pad_token_id)(rows)
    assert batch["input_ids"].shape == (2, 4)  # padded to the longest row, not to max_length
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, tokenizer.eos_token_id],
                                        [-100, tokenizer.eos_token_id, -100, -100]]


def test_supervised_position_loss_equals_the_models_own_loss(tiny_llama_dir, tokenizer, tmp_path):
    """Our LM head on supervised positions only must give the same loss as full logits."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    examples = load_examples(small_dataset(tmp_path, 6))
    batch = PadCollator(tokenizer.pad_token_id)(tokenize_examples(examples, tokenizer, max_length=256))
    expected = model(**batch).loss
    trainer = SFTTrainer(model=model, args=TrainingArguments(
        output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none"))
    model.train()
    ours = trainer.compute_loss(model, batch)
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-6), (ours, expected)
    ours.backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# End to end on the tiny model
# ---------------------------------------------------------------------------------------------

EXPECTED_TOP = {"checkpoint-2", "checkpoint-4", "final_model", "metrics.jsonl", "samples.jsonl",
                "consumed_ids.jsonl", "test.jsonl", "train_results.json", "loss_curve.png"}
EXPECTED_FINAL = {"adapter_model.safetensors", "adapter_config.json", "run_config.json",
                  "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "README.md",
                  "checkpoint_manifest.json"}
EXPECTED_CKPT = EXPECTED_FINAL | {"optimizer.pt", "scheduler.pt", "rng_state.pth",
                                  "trainer_state.json", "training_args.bin", "resume_state.json"}


def test_train_writes_the_documented_layout_and_only_lora_moves(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file

    base_before = load_file(str(tiny_llama_dir / "model.safetensors"))
    argv = tiny_args(tmp_path, tiny_llama_dir, "run", "--max-steps", "4", "--eval-steps", "2")
    assert llama_train.main(argv) == 0
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == EXPECTED_TOP
    assert {p.name for p in (run / "final_model").iterdir()} == EXPECTED_FINAL
    assert {p.name for p in (run / "checkpoint-2").iterdir()} == EXPECTED_CKPT

    # LoRA B starts at zero: a trained adapter has moved it; the base weights on disk did not move.
    lora = adapter_tensors(run / "final_model")
    b_weights = [t for k, t in lora.items() if "lora_B" in k]
    assert b_weights and all(t.abs().sum() > 0 for t in b_weights)
    base_after = load_file(str(tiny_llama_dir / "model.safetensors"))
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)

    rc = json.loads((run / "final_model" / "run_config.json").read_text())
    assert rc["base_model"] == str(tiny_llama_dir)
    assert rc["prompt_format"] == "chat" and rc["quantization"] is None
    assert rc["lora"] == {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
    assert len(rc["dataset"]["dataset_hash"]) == 16 and rc["dataset"]["splits"]["train"] > 0

    res = json.loads((run / "train_results.json").read_text())
    assert res["status"] == "completed" and res["global_step"] == 4
    assert math.isfinite(res["eval_loss"]) and res["eval_perplexity"] == pytest.approx(
        math.exp(res["eval_loss"]), rel=1e-3)
    assert res["tokens_per_second"] > 0 and res["peak_memory_mb"] > 0
    assert sorted(losses(run)) == [1, 2, 3, 4]
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {2, 4} and all("generation" in s for s in samples)
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flag, dtype", [("auto", None), ("float32", torch.float32)])
def test_base_dtype_sets_the_frozen_weights_dtype_and_mixed_precision_stays(
        tmp_path, tiny_llama_dir, flag, dtype):
    from llama_sft.modeling.load import best_dtype

    seen = {}

    def look(trainer):
        seen["frozen"] = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
        seen["lora"] = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
        seen["bf16"] = trainer.args.bf16

    cfg = cfg_for(tiny_args(tmp_path, tiny_llama_dir, "run", "--max-steps", "1",
                            "--eval-steps", "5", "--base-dtype", flag))
    result = run_train(cfg, on_trainer=look)
    assert seen["frozen"] == {dtype or best_dtype("cpu")}
    assert seen["lora"] == {torch.float32}
    assert seen["bf16"] == (best_dtype("cpu") == torch.bfloat16)
    assert math.isfinite(result["train_loss"])


def test_rerun_into_an_existing_run_is_refused_and_nothing_is_touched(tmp_path, tiny_llama_dir, capsys):
    argv = tiny_args(tmp_path, tiny_llama_dir, "run", "--max-steps", "2", "--eval-steps", "2")
    assert llama_train.main(argv) == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    assert llama_train.main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "--resume auto" in err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before


def _interrupt_at(step: int):
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        # The signal lands while step `step` is computed, as a real Ctrl-C would.
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == step - 1:
                os.kill(os.getpid(), signal.SIGINT)

    return lambda trainer: trainer.add_callback(Interrupt())


# "on": compiled decoder layers, what a long CPU run gets by default (--torch-compile auto
# compiles from 250 steps; this run is 6).
@pytest.mark.parametrize("compile_flag", ["auto", "on"], ids=["eager", "compiled"])
def test_guarantee_01_sigint_mid_epoch_then_resume_matches_an_uninterrupted_run(
        tmp_path, tiny_llama_dir, compile_flag):
    """RELIABILITY 1, 2, 5: stopped mid-epoch with accumulation > 1 and dropout > 0, then resumed
    in a fresh run: the same per-step losses and the same final LoRA tensors."""
    common = ["--max-steps", "6", "--eval-steps", "100", "--save-steps", "100",
              "--gradient-accumulation-steps", "2", "--lora-dropout", "0.1",
              "--torch-compile", compile_flag]
    straight = tiny_args(tmp_path, tiny_llama_dir, "straight", *common)
    assert llama_train.main(straight) == 0

    stopped = tiny_args(tmp_path, tiny_llama_dir, "stopped", *common)
    result = run_train(cfg_for(stopped), on_trainer=_interrupt_at(3))
    assert result["exit_code"] == 130 and result["global_step"] == 3
    assert "SIGINT" in result["status"]
    assert verify_manifest(tmp_path / "stopped" / "checkpoint-3") is None
    assert not (tmp_path / "stopped" / "final_model").exists()

    assert llama_train.main(stopped + ["--resume", "auto"]) == 0
    kernels = json.loads((tmp_path / "stopped" / "train_results.json").read_text())["kernels"]
    assert kernels["torch_compile"] is (compile_flag == "on")
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "stopped")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    ta = adapter_tensors(tmp_path / "straight" / "final_model")
    tb = adapter_tensors(tmp_path / "stopped" / "final_model")
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-5, atol=1e-6)


def test_guarantee_01_resume_with_a_changed_config_is_refused_unless_forced(tmp_path, tiny_llama_dir, capsys):
    argv = tiny_args(tmp_path, tiny_llama_dir, "run", "--max-steps", "2", "--eval-steps", "2")
    assert llama_train.main(argv) == 0
    changed = argv + ["--resume", "auto", "--max-steps", "4", "--learning-rate", "1e-3"]
    assert llama_train.main(changed) == 2
    err = capsys.readouterr().err
    assert "training config" in err and "--force" in err
    assert llama_train.main(changed + ["--force"]) == 0
    assert json.loads((tmp_path / "run" / "train_results.json").read_text())["global_step"] == 4


def test_guarantee_06_nan_loss_stops_the_run_naming_the_step(tmp_path, tiny_llama_dir):
    """RELIABILITY 6: NaN at step 3 stops before that update; checkpoints hold finite tensors."""
    argv = tiny_args(tmp_path, tiny_llama_dir, "run", "--max-steps", "6", "--eval-steps", "2")

    def inject(trainer):
        FaultInjection(nonfinite=("nan", 3)).attach(trainer)

    with pytest.raises(NonFiniteLossError, match="at step 3"):
        run_train(cfg_for(argv), on_trainer=inject)
    ckpts = list_checkpoints(tmp_path / "run")
    assert [c.name for c in ckpts] == ["checkpoint-2"]
    for t in adapter_tensors(ckpts[0]).values():
        assert torch.isfinite(t).all()


def test_early_stopping_stops_and_keeps_the_best_checkpoint(tmp_path, tiny_llama_dir):
    # A learning rate this large makes the eval loss climb after the first evaluation.
    argv = tiny_args(tmp_path, tiny_llama_dir, "run", "--max-steps", "40", "--eval-steps", "1",
                     "--early-stopping-patience", "2", "--learning-rate", "0.5",
                     "--save-total-limit", "1")
    assert llama_train.main(argv) == 0
    res = json.loads((tmp_path / "run" / "train_results.json").read_text())
    assert res["early_stopped"] and res["status"] == "early stopped"
    assert res["global_step"] < 40
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    eval_losses = {r["step"]: r["eval_loss"] for r in evals if "eval_loss" in r}
    best_step = min(eval_losses, key=eval_losses.get)
    assert res["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    assert (tmp_path / "run" / f"checkpoint-{best_step}").is_dir()  # retention kept the best


def test_guarantee_04_retention_keeps_the_newest_complete_checkpoint(tmp_path):
    for step in (1, 2, 3):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "a.bin").write_bytes(bytes([step]))
        write_manifest(d)
    (tmp_path / "checkpoint-4").mkdir()  # an unfinished save: no manifest
    (tmp_path / "checkpoint-4" / "a.bin").write_bytes(b"partial")
    rotate_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]
    assert latest_good_checkpoint(tmp_path).name == "checkpoint-3"
    (tmp_path / "checkpoint-3" / "a.bin").write_bytes(b"\x00\x01")  # truncated/modified
    assert "sha256" in verify_manifest(tmp_path / "checkpoint-3")
    assert latest_good_checkpoint(tmp_path) is None


def test_wandb_logs_offline_without_leaking_secrets(tmp_path, tiny_llama_dir, monkeypatch):
    pytest.importorskip("wandb")
    canary = "CANARY-SECRET-7f3a9"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("HF_TOKEN", canary)
    monkeypatch.setenv("WANDB_API_KEY", canary + "0" * 20)
    (tmp_path / "wb").mkdir()
    argv = tiny_args(tmp_path, tiny_llama_dir, "run", "--max-steps", "2", "--eval-steps", "2",
                     "--use-wandb", "--wandb-project", "test-proj")
    assert llama_train.main(argv) == 0
    runs = list((tmp_path / "wb").rglob("*.wandb"))
    assert runs, "no offline W&B run was written"
    for p in list((tmp_path / "wb").rglob("*")) + list((tmp_path / "run").rglob("*")):
        if p.is_file():
            assert canary.encode() not in p.read_bytes(), p
