"""--torch-compile: compiled decoder layers for training (llama_sft/modeling/compile.py), on a
tiny random LLaMA."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import adapter_tensors, losses, tiny_args

import llama_train
from llama_sft.training import recipe
from llama_sft.training.recipe import resolve_compile


def _run(tmp_path, tiny_llama_dir, out, compile_flag, monkeypatch):
    # fp32 weights and no autocast: inductor then computes what eager computes (in bf16 it
    # keeps fused intermediates in fp32, which is the point, and the numbers move by rounding).
    monkeypatch.setattr(recipe, "precision_flags", lambda device: (False, False))
    argv = tiny_args(tmp_path, tiny_llama_dir, out, "--max-steps", "4", "--eval-steps", "2",
                     "--base-dtype", "float32", "--torch-compile", compile_flag)
    assert llama_train.main(argv) == 0
    return tmp_path / out


def test_compiled_layers_train_like_eager_and_evaluate_without_compiling(
        tmp_path, tiny_llama_dir, monkeypatch):
    from torch._dynamo.utils import counters

    eager = _run(tmp_path, tiny_llama_dir, "eager", "off", monkeypatch)
    torch._dynamo.reset()
    counters.clear()
    compiled = _run(tmp_path, tiny_llama_dir, "compiled", "on", monkeypatch)

    kernels = json.loads((compiled / "train_results.json").read_text())["kernels"]
    assert kernels["torch_compile"] is True
    assert json.loads((eager / "train_results.json").read_text())["kernels"]["torch_compile"] is False
    # Compiled: a few graphs for the training step (first layer / later layers, with and
    # without a padding mask); the two evaluations, their sample generations (KV cache) and
    # the final evaluation ran eager and compiled nothing more.
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 4, dict(counters["stats"])
    # Same losses and adapter as eager, to fp32 rounding.
    le, lc = losses(eager), losses(compiled)
    assert sorted(le) == sorted(lc) == [1, 2, 3, 4]
    for step in le:
        assert lc[step] == pytest.approx(le[step], rel=1e-4)
    te, tc = adapter_tensors(eager / "final_model"), adapter_tensors(compiled / "final_model")
    for name in te:
        torch.testing.assert_close(tc[name], te[name], rtol=1e-3, atol=1e-5)
    samples = (compiled / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 * 2  # two evaluations, two prompts each


def test_auto_compiles_long_cpu_runs_only():
    from llama_sft.modeling.compile import AUTO_MIN_STEPS

    def auto(**kw):
        args = dict(device="cpu", steps=AUTO_MIN_STEPS, quantized=False, processes=1)
        args.update(kw)
        device = args.pop("device")
        return resolve_compile("auto", device, **args)

    assert auto()[0] is True
    on, why = auto(steps=AUTO_MIN_STEPS - 1)
    assert on is False and "--torch-compile on" in why and str(AUTO_MIN_STEPS) in why
    assert auto(device="cuda")[0] is False
    assert auto(quantized=True)[0] is False
    assert auto(processes=2)[0] is False
    assert resolve_compile("on", "cuda", steps=1, quantized=True, processes=2)[0] is True
    assert resolve_compile("off", "cpu", steps=10**6, quantized=False, processes=1)[0] is False
    # --help states the same threshold.
    from dataclasses import fields

    from llama_sft.config import TrainArgs

    help_text = next(f.metadata["help"] for f in fields(TrainArgs) if f.name == "torch_compile")
    assert f"at least {AUTO_MIN_STEPS} optimizer steps" in help_text


def test_planned_steps_counts_epochs_when_max_steps_is_unset():
    from types import SimpleNamespace

    args = SimpleNamespace(max_steps=-1, per_device_train_batch_size=4,
                           gradient_accumulation_steps=2, world_size=1, num_train_epochs=3.0)
    assert recipe.planned_steps(args, 81) == 33
    args.max_steps = 7
    assert recipe.planned_steps(args, 81) == 7


def test_bad_torch_compile_choice_names_the_flag(tmp_path, tiny_llama_dir, capsys):
    with pytest.raises(SystemExit) as e:
        llama_train.main(tiny_args(tmp_path, tiny_llama_dir, "run", "--torch-compile", "yes"))
    assert e.value.code == 2
    assert "--torch-compile" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

