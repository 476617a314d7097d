"""The two GPU levers of issue 14 behind `auto`: Liger kernels (--liger) and padding-free batches
(--padding-free). On the CPU: the decisions, the refusals, and padding-free batches giving the
padded batches' loss and gradients; the CUDA tests (requires_cuda, run by bench/gpu_check.sh)
check the kernels themselves against the plain model."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from helpers import adapter_tensors, losses, small_dataset, tiny_args

import llama_train
from llama_sft.data.batching import PadCollator, PaddingFreeCollator
from llama_sft.errors import ConfigError
from llama_sft.modeling import liger
from llama_sft.training.recipe import resolve_kernels, resolve_liger, resolve_padding_free
from llama_sft.training.trainer import split_micro_batch

needs_liger = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None,
                                 reason="needs liger-kernel")
needs_flash_attn = pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None,
                                      reason="needs flash-attn")

ROWS = [  # token ids and labels (-100: not supervised), of different lengths
    ([5, 6, 7, 8, 9, 10, 11], [-100, -100, -100, 8, 9, 10, 11]),
    ([12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [-100] * 6 + [18, 19, 20, 21, 22, 23]),
    ([24, 25, 26], [-100, 25, 26]),
    ([27, 28, 29, 30, 31, 32, 33, 34, 35], [-100] * 4 + [31, 32, 33, 34, 35]),
]


def _rows(rows=ROWS):
    return [{"input_ids": ids, "labels": labels, "id": f"ex{i}"}
            for i, (ids, labels) in enumerate(rows)]


def _supervised(rows) -> int:
    """Supervised targets of rows (position 0 is never a target)."""
    return sum(sum(t != -100 for t in labels[1:]) for _, labels in rows)


# ---------------------------------------------------------------------------------------------
# The collator
# ---------------------------------------------------------------------------------------------


def test_padding_free_collator_concatenates_rows_with_positions_restarting_per_row():
    batch = PaddingFreeCollator(example_ids=True)(_rows())
    assert set(batch) == {"input_ids", "labels", "position_ids", "example_ids"}  # no mask
    total = sum(len(ids) for ids, _ in ROWS)
    assert batch["input_ids"].shape == batch["labels"].shape == (1, total)
    assert batch["input_ids"][0].tolist() == [t for ids, _ in ROWS for t in ids]
    assert batch["position_ids"][0].tolist() == [p for ids, _ in ROWS for p in range(len(ids))]
    # -100 at each row's first position: the last token of a row never learns the next row's.
    assert batch["labels"][0].tolist() == [t for _, labels in ROWS for t in [-100] + labels[1:]]
    assert batch["example_ids"] == ["ex0", "ex1", "ex2", "ex3"]
    # The same supervised targets as the padded batch, in the same order.
    padded = PadCollator(0)(_rows())["labels"][:, 1:]
    flat = batch["labels"][0, 1:]
    assert flat[flat != -100].tolist() == padded[padded != -100].tolist()


# ---------------------------------------------------------------------------------------------
# Same loss and LoRA gradients as padded batches (fp32)
# ---------------------------------------------------------------------------------------------


def _tiny_base(attn: str, device: str = "cpu", dtype=torch.float32):
    """A tiny random LLaMA built in the test (no embedded tokenizer needed: it also runs on a
    GPU box)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_sft.training.recipe import resolve_attn_implementation

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                      max_position_embeddings=256)
    base = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    base.set_attn_implementation(resolve_attn_implementation(attn, device))
    return base


def _with_lora(base, tmp_path):
    """LoRA on `base` (B random, so A gets gradients too) in the toolkit's SFTTrainer."""
    from transformers import TrainingArguments

    from llama_sft.modeling.load import add_lora
    from llama_sft.training.trainer import SFTTrainer

    device = next(base.parameters()).device.type
    torch.manual_seed(1)
    model = add_lora(base, r=4, alpha=8, dropout=0.0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=device == "cpu",
                             report_to="none")
    trainer = SFTTrainer(model=model, args=args)
    model.train()
    return model, trainer


def _loss_and_grads(model, trainer, batches, num_items):
    """The summed loss of micro-batches normalised by the step's supervised tokens (as the
    Trainer passes num_items_in_batch under accumulation), and the LoRA gradients."""
    model.zero_grad()
    device = next(model.parameters()).device
    total = 0.0
    for batch in batches:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items)
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                   if p.requires_grad}


def _compare_padded_and_padding_free(model, trainer, *, rtol, grad_tol):
    rows, num_items = _rows(), _supervised(ROWS)
    micro = [rows[:2], rows[2:]]  # two micro-batches of one optimizer step
    padded, want = _loss_and_grads(model, trainer, [PadCollator(0)(m) for m in micro], num_items)
    flat, got = _loss_and_grads(model, trainer, [PaddingFreeCollator()(m) for m in micro],
                                num_items)
    assert flat == pytest.approx(padded, rel=rtol), (flat, padded)
    assert want.keys() == got.keys() and len(want) > 0
    for name in want:
        scale = float(want[name].abs().max())
        assert scale > 0, name  # every LoRA tensor gets a gradient
        assert float((got[name] - want[name]).abs().max()) <= grad_tol * scale, name
    return padded


@pytest.mark.parametrize("loss_path", ["fused", "generic"])
@pytest.mark.parametrize("attn", ["eager", "sdpa", "sdpa_recompute"])
def test_padding_free_gives_the_padded_loss_and_lora_gradients(tmp_path, attn, loss_path):
    """fp32 on the CPU: the same loss (mean over the step's supervised tokens, two micro-batches
    of accumulation) and LoRA gradients, with each attention the CPU runs, through the fused
    head and through the model's own loss (the path FSDP takes). Measured: the same loss to
    the last bit, gradients within 7e-7 of each tensor's largest entry; bounds 1e-5 and 1e-4.
    So sdpa_recompute handles transformers' block-diagonal mask as it does padding."""
    model, trainer = _with_lora(_tiny_base(attn), tmp_path)
    trainer.is_fsdp_enabled = loss_path == "generic"  # one process: no sharding, only the path
    loss = _compare_padded_and_padding_free(model, trainer, rtol=1e-5, grad_tol=1e-4)
    assert 3.0 < loss < 5.0  # ~ln(64) for a random model: a real loss, not a zero


def test_a_padding_free_micro_batch_splits_between_rows():
    """--auto-batch-backoff splits a micro-batch by rows: a padding-free one between its rows."""
    batch = PaddingFreeCollator()(_rows())
    parts = split_micro_batch(batch, 2)
    assert [p["input_ids"].shape[1] for p in parts] == [7 + 12, 3 + 9]
    for part, rows in zip(parts, (_rows()[:2], _rows()[2:])):
        alone = PaddingFreeCollator()(rows)
        assert all(torch.equal(part[k], alone[k]) for k in alone)
    assert split_micro_batch(batch, 4) == [batch]


# ---------------------------------------------------------------------------------------------
# A training run with --padding-free on (CPU, tiny model)
# ---------------------------------------------------------------------------------------------


def test_a_padding_free_training_run_matches_the_padded_run(tmp_path, tiny_llama_dir):
    """Four steps, batch 4, on the CPU (bf16 autocast where the CPU has it): the same examples
    per step, the same per-step losses and eval loss within rounding, LoRA moved and the base
    did not. Measured: steps 1-2 equal, steps 3-4 within 9e-6 relative, eval loss 7e-6 (bf16
    matmuls of other shapes); bound 1e-4."""
    from safetensors.torch import load_file

    base_before = load_file(str(tiny_llama_dir / "model.safetensors"))
    runs = {}
    for mode in ("off", "on"):
        argv = tiny_args(tmp_path, tiny_llama_dir, f"run-{mode}", "--max-steps", "4",
                         "--eval-steps", "4", "--padding-free", mode)
        assert llama_train.main(argv) == 0
        runs[mode] = tmp_path / f"run-{mode}"
    off, on = runs["off"], runs["on"]
    assert (on / "consumed_ids.jsonl").read_text() == (off / "consumed_ids.jsonl").read_text()
    la, lb = losses(off), losses(on)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4]
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-4), step
    res = {m: json.loads((runs[m] / "train_results.json").read_text()) for m in runs}
    assert res["on"]["kernels"] == {"attn_implementation": "sdpa_recompute", "liger": False,
                                    "padding_free": True, "torch_compile": False}
    assert res["off"]["kernels"]["padding_free"] is False
    assert res["on"]["eval_loss"] == pytest.approx(res["off"]["eval_loss"], rel=1e-4)
    # Padding is not counted as processed tokens, so both runs saw the same tokens.
    assert res["on"]["tokens_seen"] == res["off"]["tokens_seen"]
    assert res["on"]["supervised_tokens_seen"] == res["off"]["supervised_tokens_seen"]
    lora = adapter_tensors(on / "final_model")
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in lora.items())
    base_after = load_file(str(tiny_llama_dir / "model.safetensors"))
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)


# ---------------------------------------------------------------------------------------------
# The auto decisions and the refusals
# ---------------------------------------------------------------------------------------------


def test_auto_turns_both_levers_off_on_the_cpu():
    assert resolve_liger("auto", "cpu")[0] is False
    assert "GPU only" in resolve_liger("auto", "cpu")[1]
    for attn in ("sdpa_recompute", "sdpa", "eager", "flash_attention_2", "flex_attention"):
        on, why = resolve_padding_free("auto", "cpu", attn)
        assert on is False and "CUDA" in why, attn
    assert resolve_liger("off", "cuda") == (False, "--liger off")
    assert resolve_padding_free("off", "cuda", "flash_attention_2") == (False,
                                                                          "--padding-free off")


def test_auto_on_cuda_follows_the_liger_import_and_the_attention(monkeypatch):
    """The CUDA branch of the decisions (the import check patched; the kernels are tested on a
    GPU below)."""
    monkeypatch.setattr(liger, "liger_import_problem", lambda: None)
    assert resolve_liger("auto", "cuda")[0] is True
    assert resolve_liger("on", "cuda")[0] is True
    monkeypatch.setattr(liger, "liger_import_problem",
                        lambda: "ModuleNotFoundError: No module named 'liger_kernel'")
    on, why = resolve_liger("auto", "cuda")
    assert on is False and "pip install liger-kernel" in why
    with pytest.raises(ConfigError, match=r"--liger on: liger_kernel does not import .*"
                                          r"pip install liger-kernel"):
        resolve_liger("on", "cuda")
    for attn in ("flash_attention_2", "flash_attention_3", "flex_attention"):
        assert resolve_padding_free("auto", "cuda", attn)[0] is True, attn
    for attn in ("sdpa", "eager"):  # a dense [tokens, tokens] mask over the concatenated row
        assert resolve_padding_free("auto", "cuda", attn)[0] is False, attn
        assert resolve_padding_free("on", "cuda", attn)[0] is True, attn


def test_liger_on_without_cuda_and_padding_free_on_with_an_unknown_attention_are_refused():
    with pytest.raises(ConfigError, match=r"--liger on needs a CUDA GPU .* --liger auto"):
        resolve_liger("on", "cpu")
    with pytest.raises(ConfigError, match=r"--padding-free on: attention 'my_kernel' .*"
                                          r"--attn-implementation .* or --padding-free off"):
        resolve_padding_free("on", "cpu", "my_kernel")


def test_liger_on_a_model_type_its_patch_does_not_cover():
    from types import SimpleNamespace

    model = SimpleNamespace(config=SimpleNamespace(model_type="mistral"))
    assert liger.apply_liger(model, "auto") is False
    with pytest.raises(ConfigError, match=r"--liger on: .* 'mistral'; use --liger auto or off"):
        liger.apply_liger(model, "on")


def test_prepare_model_applies_liger_before_lora_and_records_the_outcome(tmp_path, tiny_llama_dir,
                                                                         monkeypatch):
    """The wiring, with the kernels replaced (they are tested on a GPU below): the plain model
    goes to apply_liger, the attention setup chose is set, and what apply_liger returned is
    what train_results.json records."""
    from llama_sft.training.recipe import RunSetup, prepare_model

    seen = []
    monkeypatch.setattr(liger, "apply_liger",
                        lambda model, choice: seen.append((type(model).__name__, choice)) or False)
    cfg = llama_train.resolve_train_config(tiny_args(tmp_path, tiny_llama_dir, "x"))
    run = RunSetup(tmp_path, "cpu", False, False, None, 0, attn_implementation="eager",
                   liger=True)
    model = prepare_model(cfg, run, str(tiny_llama_dir))
    assert seen == [("LlamaForCausalLM", "auto")]
    assert run.kernels == {"attn_implementation": "eager", "liger": False, "padding_free": False,
                           "torch_compile": False}
    assert model.get_base_model().config._attn_implementation == "eager"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal on a machine without CUDA")
def test_liger_on_on_a_cpu_stops_the_run_before_anything_is_written(tmp_path, tiny_llama_dir,
                                                                    capsys):
    argv = tiny_args(tmp_path, tiny_llama_dir, "run", "--max-steps", "2", "--liger", "on")
    assert llama_train.main(argv) == 2
    err = capsys.readouterr().err
    assert "--liger on needs a CUDA GPU" in err and "--liger auto" in err
    run = tmp_path / "run"
    assert not run.exists() or not any(run.iterdir())  # no test.jsonl: a rerun is not refused
    assert resolve_kernels(llama_train.resolve_train_config(
        tiny_args(tmp_path, tiny_llama_dir, "x")), "cpu", log=False) == (
        "sdpa_recompute", False, False)


@pytest.mark.parametrize("flag", ["--liger", "--padding-free"])
def test_a_bad_choice_names_the_flag(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        llama_train.resolve_train_config(["--dataset", str(small_dataset(tmp_path, 4)), flag,
                                          "maybe"])
    assert stopped.value.code == 2
    assert f"argument {flag}: invalid choice: 'maybe'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# On a CUDA GPU (bench/gpu_check.sh runs these)
# ---------------------------------------------------------------------------------------------


@pytest.mark.requires_cuda
@needs_liger
def test_liger_kernels_give_the_plain_models_loss_and_lora_gradients_on_cuda(tmp_path,
                                                                             monkeypatch):
    """fp32 on CUDA: the same model with and without Liger's RMSNorm, RoPE and SwiGLU, LoRA on
    top, through the toolkit's loss. Bounds (not yet measured): loss 1e-4 relative, gradients
    1e-3 of each tensor's largest entry."""
    from transformers.models.llama import modeling_llama

    base = _tiny_base("sdpa", "cuda")
    patched = copy.deepcopy(base)
    rows, num_items = _rows(), _supervised(ROWS)
    plain, trainer = _with_lora(base, tmp_path)
    want_loss, want = _loss_and_grads(plain, trainer, [PadCollator(0)(rows)], num_items)
    # Liger patches modeling_llama itself (RoPE is a function there): put it back afterwards.
    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    assert liger.apply_liger(patched, "on") is True
    assert patched.model.layers[0].mlp._get_name() == "LigerSwiGLUMLP"
    model, trainer = _with_lora(patched, tmp_path)  # the same adapter as `plain` started with
    got_loss, got = _loss_and_grads(model, trainer, [PadCollator(0)(rows)], num_items)
    assert got_loss == pytest.approx(want_loss, rel=1e-4)
    for name in want:
        scale = float(want[name].abs().max())
        assert float((got[name] - want[name]).abs().max()) <= 1e-3 * scale, name


@pytest.mark.requires_cuda
@pytest.mark.parametrize("attn,dtype,rtol,grad_tol", [
    ("sdpa", torch.float32, 1e-5, 1e-4),
    ("flex_attention", torch.float32, 1e-5, 1e-4),
    pytest.param("flash_attention_2", torch.bfloat16, 2e-2, 5e-2, marks=needs_flash_attn),
])
def test_padding_free_gives_the_padded_loss_with_cuda_attention(tmp_path, attn, dtype, rtol,
                                                                grad_tol):
    """On CUDA: sdpa (the dense block-diagonal mask), flex_attention (its block mask) and
    flash_attention_2 (varlen from position_ids; bf16, which it needs, so looser bounds). Bounds
    not yet measured on a GPU."""
    model, trainer = _with_lora(_tiny_base(attn, "cuda", dtype), tmp_path)
    _compare_padded_and_padding_free(model, trainer, rtol=rtol, grad_tol=grad_tol)
