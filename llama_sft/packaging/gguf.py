"""GGUF export for llama.cpp: the adapter merged into its base (unquantized), written as one
.gguf file with the `gguf` package's writer: llama architecture keys, every tensor under its GGUF
name (Q/K rows permuted to llama.cpp's rotary layout), the tokenizer (gguf_vocab.py) and the chat
template the model was trained with.

    python3 llama_package.py --adapter-path ./training_output/final_model --gguf q8_0
    # -> ./packages/NAME-q8_0.gguf beside the archive; then, with llama.cpp:
    llama-cli -m ./packages/NAME-q8_0.gguf -cnv

Types: f16 and bf16 (every matrix), q8_0 (8-bit blocks of 32), q4_0 (4-bit blocks of 32, the
embedding, which is also the output layer when tied, kept at q8_0). Norms stay f32, and a matrix
whose rows do not split into blocks of 32 falls back to f16.

package.py calls `export_adapter_gguf` while staging a package.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_sft.errors import PackageError
from llama_sft.files import sha256_file
from llama_sft.packaging.gguf_vocab import GgufVocab, vocab_for, write_vocab

logger = logging.getLogger("llama_sft")

GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_0")

# Rotary variants llama.cpp's llama architecture reproduces from the file alone.
SUPPORTED_ROPE = ("default", "linear", "llama3")


@dataclass
class TensorPlan:
    """One tensor of the file: where it comes from and how it is stored."""

    gguf_name: str
    source: str          # state-dict key, or "" for a computed tensor (rope_freqs)
    shape: tuple[int, ...]
    qtype: Any           # gguf.GGMLQuantizationType
    permute_heads: int = 0


def _ggml_types(gguf_type: str):
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    return {"f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
            "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0)}[gguf_type]


def rope_settings(config) -> dict[str, Any]:
    """rope_theta and the scaling parameters, from transformers 5's `rope_parameters` (or the
    older `rope_theta` / `rope_scaling` attributes)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if not params:
        params = dict(scaling or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.pop("type", None) or "default")
    return params


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_architecture(config) -> None:
    """Refuse what the llama architecture of llama.cpp would compute differently."""
    problems = []
    if getattr(config, "model_type", None) != "llama":
        problems.append(f"model_type {getattr(config, 'model_type', None)!r} (llama only)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("biases in attention or MLP layers")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"activation {config.hidden_act!r} (silu only)")
    rope_type = rope_settings(config)["rope_type"]
    if rope_type not in SUPPORTED_ROPE:
        problems.append(f"rope type {rope_type!r} ({', '.join(SUPPORTED_ROPE)} only)")
    if problems:
        raise PackageError("--gguf: this model cannot be exported for llama.cpp's llama "
                           f"architecture: {'; '.join(problems)}; nothing was written")


def write_hparams(writer, config, *, name: str, file_type) -> None:
    """The llama.<key> hyperparameters llama.cpp builds the graph from."""
    heads = config.num_attention_heads
    dim = head_dim(config)
    writer.add_name(name)
    writer.add_type("model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    if dim != config.hidden_size // heads:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    rope = rope_settings(config)
    writer.add_rope_dimension_count(dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(_quant_version())


def _quant_version() -> int:
    from gguf import GGML_QUANT_VERSION

    return GGML_QUANT_VERSION


def llama3_rope_factors(config):
    """rope_freqs.weight for Llama 3.1-style rope scaling: llama.cpp divides each rotary
    frequency by its factor, so the factor is transformers' unscaled over scaled frequency
    (both from transformers' own rope functions, transformers 5.24)."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dim = head_dim(config)
    theta = float(rope_settings(config)["rope_theta"])
    plain = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (plain / scaled.float()).numpy()


def permute_for_rope(weight, n_heads: int):
    """HF orders each head's rotary pairs as two halves (rotate_half); llama.cpp's llama
    rotation takes neighbouring pairs. Interleave the halves per head, row-wise (the inverse of
    the permutation transformers' Llama conversion script applies to Meta's checkpoints)."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _matrix_type(gguf_name: str, shape: tuple[int, ...], gguf_type: str):
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    qtype = _ggml_types(gguf_type)[0]
    if len(shape) == 1:
        return Q.F32
    if gguf_type == "q4_0" and gguf_name in ("token_embd.weight", "output.weight"):
        qtype = Q.Q8_0  # the embedding (and the output layer it is tied to) loses most at 4 bits
    if shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        return Q.F16
    return qtype


def plan_tensors(state: dict[str, Any], config, gguf_type: str) -> list[TensorPlan]:
    """Every tensor the file holds, in state-dict order, under its GGUF name; refuses a tensor
    the llama architecture has no name for."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    plans = []
    for key, tensor in state.items():
        if "rotary_emb" in key or (tied and key == "lm_head.weight"):
            continue  # llama.cpp computes the rotation, and reads token_embd when output is absent
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise PackageError(f"--gguf: no GGUF name for the tensor {key!r}; nothing was written")
        shape = tuple(tensor.shape)
        permute = heads if key.endswith("q_proj.weight") else (
            kv_heads if key.endswith("k_proj.weight") else 0)
        plans.append(TensorPlan(gguf_name, key, shape, _matrix_type(gguf_name, shape, gguf_type),
                                permute))
    if rope_settings(config)["rope_type"] == "llama3":
        from gguf import GGMLQuantizationType as Q

        plans.append(TensorPlan("rope_freqs.weight", "", (head_dim(config) // 2,), Q.F32))
    return plans


def tensor_bytes(plan: TensorPlan) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[plan.qtype]
    return math.prod(plan.shape) // block * size


def tensor_data(plan: TensorPlan, state: dict[str, Any], config):
    """The tensor as stored: permuted where needed, converted to its GGUF type."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if not plan.source:
        data = llama3_rope_factors(config).astype(np.float32)
    else:
        data = state[plan.source].detach().to("cpu", torch.float32).numpy()
    if plan.permute_heads:
        data = permute_for_rope(data, plan.permute_heads)
    if plan.qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if plan.qtype == Q.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return quantize(np.ascontiguousarray(data), plan.qtype)


def write_gguf(model, vocab: GgufVocab, dest: Path, *, gguf_type: str, name: str) -> dict[str, int]:
    """Write `model` (a LlamaForCausalLM in any float dtype) and `vocab` to `dest`, one tensor at
    a time (header and tensor index first, then each tensor converted as it is written), so
    memory holds the model plus one converted tensor. Returns the count of tensors per type."""
    import numpy as np
    from gguf import GGUFWriter

    config = model.config
    check_architecture(config)
    state = model.state_dict()
    plans = plan_tensors(state, config, gguf_type)
    writer = GGUFWriter(str(dest), "llama")
    write_hparams(writer, config, name=name, file_type=_ggml_types(gguf_type)[1])
    write_vocab(writer, vocab)
    for plan in plans:
        # raw_dtype with a non-uint8 dtype: the writer takes the logical shape as given.
        writer.add_tensor_info(plan.gguf_name, plan.shape, np.dtype(np.float32),
                               tensor_bytes(plan), raw_dtype=plan.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    counts: dict[str, int] = {}
    try:
        for plan in plans:
            writer.write_tensor_data(tensor_data(plan, state, config))
            counts[plan.qtype.name] = counts.get(plan.qtype.name, 0) + 1
    finally:
        writer.close()
    return counts


def load_merged(adapter: Path, base_model: str, *, dtype, trust_remote_code: bool):
    """The base model loaded unquantized with the adapter merged in; (model, base quantization):
    a checkpoint stored quantized (bitsandbytes) is de-quantized before the merge."""
    from peft import PeftModel

    from llama_sft.modeling.load import load_model

    model = load_model(base_model, dtype=dtype, trust_remote_code=trust_remote_code)
    quantizer = getattr(model, "hf_quantizer", None)
    base_quantization = None
    if quantizer is not None:
        base_quantization = str(getattr(quantizer.quantization_config, "quant_method", "quantized"))
        logger.info("de-quantizing the %s base before merging", base_quantization)
        model = model.dequantize()
    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    return model.merge_and_unload().eval(), base_quantization


def end_of_turn_id(tokenizer, prompt_format: str) -> int | None:
    """The token that ends an assistant turn in the trained format (None for the instruction
    template, whose turns end with EOS)."""
    if prompt_format != "chat":
        return None
    from llama_sft.data.prompts import turn_end_ids

    return turn_end_ids(tokenizer, prompt_format)[0]


def export_adapter_gguf(adapter: Path, base_model: str, dest: Path, *, gguf_type: str, dtype,
                        trust_remote_code: bool, tokenizer, prompt_format: str,
                        name: str) -> dict[str, Any]:
    """Merge, then write `dest`; returns the metadata entry (file, type, sha256, size, the
    tokenizer keys that decide stopping, tensor types, seconds)."""
    if gguf_type not in GGUF_TYPES:
        raise PackageError(f"--gguf {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    t0 = time.time()
    model, base_quantization = load_merged(adapter, base_model, dtype=dtype,
                                           trust_remote_code=trust_remote_code)
    vocab = vocab_for(tokenizer, model.config.vocab_size,
                      eot_id=end_of_turn_id(tokenizer, prompt_format))
    logger.info("writing %s (%s, tokenizer %s/%s)", dest.name, gguf_type, vocab.model,
                vocab.pre or "sentencepiece")
    counts = write_gguf(model, vocab, dest, gguf_type=gguf_type, name=name)
    dest.chmod(0o644)
    return {"file": dest.name, "type": gguf_type, "sha256": sha256_file(dest),
            "size_bytes": dest.stat().st_size, "merge_dtype": str(model.dtype).replace("torch.", ""),
            "base_quantization": base_quantization, "tensor_types": counts,
            "tokenizer": {"model": vocab.model, "pre": vocab.pre,
                          "special_token_ids": vocab.special_ids, "add_bos": vocab.add_bos,
                          "chat_template": bool(vocab.chat_template),
                          "padded_rows": vocab.padded_rows},
            "seconds": round(time.time() - t0, 1)}
