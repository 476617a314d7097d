"""Model and tokenizer loading for every stage: hub ids (failing fast offline or gated), local
folders, the embedded model, 4-bit/8-bit quantization, LoRA, adapters for inference, and the
one pad-token fallback. Never unpickles weights: safetensors only."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from llama_sft.config import get_spec
from llama_sft.errors import ModelLoadError
from llama_sft.hub import hub_offline
from llama_sft.layout import RUN_CONFIG
from llama_sft.modeling.embedded import ensure_embedded_model, is_embedded

logger = logging.getLogger("llama_sft")



def resolve_base_model(model_size: str | None, base_model: str | None) -> str:
    """The name stages record: 'smollm2-135m', a hub id, or a local folder."""
    if base_model:
        return "smollm2-135m" if is_embedded(base_model) else base_model
    spec = get_spec(model_size or "7b")
    return spec.hub_id


def hub_help(name: str) -> str:
    return (f"To use {name!r}: request access on https://huggingface.co/{name}, run "
            "`huggingface-cli login`, and make sure this machine can reach the hub; or pass a "
            "local folder with --base-model PATH; or run offline on the CPU with --model-size 135m.")


def model_path(name: str) -> str:
    """A loadable path for a recorded base-model name; fails fast with a clear message."""
    if is_embedded(name):
        return str(ensure_embedded_model())
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"--base-model {name}: the folder has no config.json; point it "
                                 "at a transformers model folder")
        return str(p)
    if p.suffix == ".gguf" or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"--base-model {name}: no such folder")
    # A hub id: use the local HF cache when it has it; otherwise check the hub is reachable
    # before transformers spends ~30 s in retries.
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        if isinstance(cached, str):
            return name
    except Exception:  # noqa: BLE001 - an invalid repo id is reported below
        pass
    if hub_offline():
        raise ModelLoadError(f"{name!r} is not in the local Hugging Face cache and the hub cannot "
                             f"be reached. {hub_help(name)}")
    return name


def _wrap_hub_error(name: str, e: Exception) -> ModelLoadError:
    text = str(e)
    kind = type(e).__name__
    if "gated" in text.lower() or kind == "GatedRepoError" or "401" in text or "403" in text:
        return ModelLoadError(f"{name!r} is a gated model and this account has no access. "
                              f"{hub_help(name)}")
    if kind in ("RepositoryNotFoundError",) or "not a valid model identifier" in text:
        return ModelLoadError(f"{name!r} was not found on the hub nor as a local folder. "
                              f"{hub_help(name)}")
    first = text.strip().splitlines()[0] if text.strip() else kind
    return ModelLoadError(f"could not load {name!r}: {first}. {hub_help(name)}")


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise ModelLoadError(f"{name!r} needs its own code to run; pass --trust-remote-code "
                                 "if you trust it") from None
        raise _wrap_hub_error(name, e) from None
    return ensure_pad_token(tok)


# Tokens some tokenizers reserve for padding without setting pad_token (Llama 3.1+).
RESERVED_PAD_TOKENS = ("<|finetune_right_pad_id|>", "<|finetune_right_pad|>", "<pad>", "[PAD]")


def ensure_pad_token(tok):
    """Give a tokenizer without a pad token one: its reserved pad token where the vocabulary
    has one (Llama 3's `<|finetune_right_pad_id|>`), else unk (Llama 2), else eos. Padding is
    masked by the attention mask, never by token id, so any of them is safe for training and
    generation. The one place this choice is made."""
    if tok.pad_token_id is None:
        vocab = tok.get_vocab()
        reserved = next((t for t in RESERVED_PAD_TOKENS if t in vocab), None)
        tok.pad_token = reserved or (tok.unk_token if tok.unk_token is not None
                                     else tok.eos_token)
    return tok


def load_generation_config(name: str):
    """The base model's generation_config (its eos_token_id may be a list), or None where the
    model folder has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path(name))
    except OSError:
        return None


def best_dtype(device: str):
    import torch

    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def inference_dtype(name: str):
    """A --dtype / --merge-dtype for inference: auto is float32 on a CPU and the best half
    precision on a GPU.

    On a CPU, bf16 greedy decoding is not batch-invariant: rounding differs with the padded
    batch shape, and near-tied logits then pick other tokens (measured here on the embedded
    model: 5 of 6 texts equal between --batch-size 16 and 1 in bf16, 6 of 6 in fp32), and fp32
    batched generation was not slower on a 2-core CPU (small per-token matmuls)."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    return best_dtype("cuda") if torch.cuda.is_available() else torch.float32


def cpu_has_bf16() -> bool:
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - older torch builds lack the op
        return False


def fsdp_enabled() -> bool:
    """True under `accelerate launch` with an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def quantization_config(use_4bit: bool, use_8bit: bool, compute_dtype):
    if not (use_4bit or use_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if use_4bit:
        extra = {}
        if fsdp_enabled():
            # FSDP flattens parameters of one dtype: store the 4-bit weights in the compute
            # dtype's storage (the FSDP-QLoRA recipe of Answer.AI / peft docs).
            extra["bnb_4bit_quant_storage"] = compute_dtype
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, **extra)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(name: str, *, use_4bit: bool = False, use_8bit: bool = False,
               trust_remote_code: bool = False, dtype=None, device_map: Any = None,
               for_training: bool = False):
    """Load a causal LM, quantized if asked. Weights load from safetensors only: a folder that
    holds only pickle (`.bin`) weights is refused (we never unpickle files we did not write)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = model_path(name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compute_dtype = dtype or best_dtype(device)
    qcfg = quantization_config(use_4bit, use_8bit, compute_dtype)
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelLoadError(f"{name!r} needs its own code to run; pass --trust-remote-code "
                                 "if you trust it") from None
        raise _wrap_hub_error(name, e) from None
    except OSError as e:
        raise _wrap_hub_error(name, e) from None
    kwargs: dict[str, Any] = dict(trust_remote_code=trust_remote_code, use_safetensors=True)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        kwargs["dtype"] = compute_dtype
        if device_map is not None:
            kwargs["device_map"] = device_map
        elif not fsdp_enabled():  # FSDP places the shards itself
            kwargs["device_map"] = ({"": int(os.environ.get("LOCAL_RANK", 0))} if device == "cuda"
                                    else {"": "cpu"})
    else:
        kwargs["dtype"] = compute_dtype
        if device_map is not None:
            kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        if "safetensors" in str(e).lower() or ".bin" in str(e):
            raise ModelLoadError(f"{name!r} has no safetensors weights. This toolkit does not "
                                 "load pickle (.bin) weights it did not write; convert them with "
                                 "transformers' save_pretrained(safe_serialization=True)") from None
        raise _wrap_hub_error(name, e) from None
    if for_training:
        model.config.use_cache = False
        if qcfg is not None and use_4bit:
            keep_4bit_training_layout(model)
    return model


def keep_4bit_training_layout(model) -> int:
    """Stop bitsandbytes (0.50, on an AVX512-BF16 CPU) from repacking a 4-bit weight in place
    the first time its layer runs in eval mode without gradients (an evaluation, a sample
    generation): the repacked layer then computes through `gemv_4bit`, which has no autograd
    kernel, so every later training step silently drops the gradient through the frozen base
    ("an autograd kernel was not registered" UserWarning) and its absmax is rounded to bf16.
    Returns how many layers it changed. tests/test_generation_model.py fails if upstream renames
    the switch."""
    changed = 0
    for module in model.modules():
        if type(getattr(module, "weight", None)).__name__ == "Params4bit":
            if not hasattr(module, "support_avx512bf16_for_cpu"):
                raise RuntimeError("bitsandbytes' Linear4bit has no support_avx512bf16_for_cpu "
                                   "switch any more: revisit keep_4bit_training_layout")
            changed += bool(module.support_avx512bf16_for_cpu)
            module.support_avx512bf16_for_cpu = False
    return changed


def is_quantized(model) -> bool:
    """Loaded in 4-bit or 8-bit (bitsandbytes); peft's wrappers pass the question through."""
    return bool(getattr(model, "is_loaded_in_4bit", False)
                or getattr(model, "is_loaded_in_8bit", False))


def add_lora(model, *, r: int, alpha: int, dropout: float, target_modules: str = "all-linear",
             gradient_checkpointing: bool = False):
    """Wrap a model with a LoRA adapter (all linear layers by default; the LM head is never
    adapted). For a quantized base, peft's k-bit preparation runs first."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if is_quantized(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets: Any = target_modules
    if target_modules != "all-linear":
        targets = [t.strip() for t in target_modules.split(",") if t.strip()]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def read_run_config(adapter_path: str | os.PathLike) -> dict[str, Any]:
    """The resolved config a training stage wrote next to its adapter."""
    folder = Path(adapter_path)
    if not folder.is_dir():
        raise ModelLoadError(f"--adapter-path {adapter_path}: no such folder. Train one with "
                             "`python3 llama_train.py ... --output-dir ./training_output` (the "
                             "adapter is in ./training_output/final_model)")
    if not (folder / "adapter_config.json").is_file():
        raise ModelLoadError(f"--adapter-path {adapter_path}: no adapter_config.json; point it at "
                             "a final_model/ or checkpoint-*/ folder written by llama_train.py")
    cfg_file = folder / RUN_CONFIG
    if not cfg_file.is_file():
        return {}
    try:
        return json.loads(cfg_file.read_text())
    except ValueError as e:
        raise ModelLoadError(f"{cfg_file}: not valid JSON ({e})") from None


def same_base(a: str, b: str) -> bool:
    """Whether two recorded base-model names mean the same model."""
    def norm(x: str) -> str:
        return "smollm2-135m" if is_embedded(x) else str(x).rstrip("/")
    return norm(a) == norm(b)


def load_for_inference(*, adapter_path: str | None = None, base_model: str | None = None,
                       model_size: str | None = None, use_4bit: bool = False,
                       use_8bit: bool = False, trust_remote_code: bool = False,
                       allow_base_mismatch: bool = False, dtype=None):
    """(model, tokenizer, run_config) for generation: the base model with the adapter on top,
    in `dtype` (None: the device's best, as in training).

    The base model and prompt format come from the adapter's run_config.json unless given;
    an explicit --base-model that differs from the one the adapter was trained on is an error
    (pass allow_base_mismatch to override)."""
    run_cfg: dict[str, Any] = read_run_config(adapter_path) if adapter_path else {}
    trained_on = run_cfg.get("base_model")
    if base_model and trained_on and not same_base(base_model, trained_on):
        if not allow_base_mismatch:
            raise ModelLoadError(f"the adapter in {adapter_path} was trained on {trained_on!r}, "
                                 f"not {base_model!r}; drop --base-model to use {trained_on!r}")
        logger.warning("loading an adapter trained on %r onto %r", trained_on, base_model)
    name = resolve_base_model(model_size or run_cfg.get("model_size"), base_model or trained_on)
    if base_model and trained_on:
        logger.info("base model %s (flag; adapter's run config says %s)", name, trained_on)
    if adapter_path and (Path(adapter_path) / "tokenizer_config.json").is_file():
        tok = _load_local_tokenizer(adapter_path)  # the tokenizer saved with the adapter
    else:
        tok = load_tokenizer(name, trust_remote_code=trust_remote_code)
    model = load_model(name, use_4bit=use_4bit, use_8bit=use_8bit,
                       trust_remote_code=trust_remote_code, dtype=dtype)
    if adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path, is_trainable=False)
    model.eval()
    model.config.use_cache = True
    return model, tok, run_cfg


def _load_local_tokenizer(folder: str | os.PathLike):
    from transformers import AutoTokenizer

    return ensure_pad_token(AutoTokenizer.from_pretrained(str(folder)))
