"""Training throughput, memory, MFU and loss: the toolkit against TRL and a naive HF Trainer.

    python3 bench/bench_train.py --quick          # ~10 min on 2 cores: 2 rounds, 2+4 steps each
    python3 bench/bench_train.py                  # 2 rounds, 3 warm-up + 10 timed steps each
    python3 bench/bench_train.py --model random-tiny --contenders ours,trl_default   # smoke test
    python3 bench/bench_train.py --device cuda --model random-7b --layers 16 --use-4bit  # GPU

Contenders (each runs in its own subprocess, so its peak RSS is its own; the parent alternates
them A B C D, D C B A, ... so drift on a shared machine hits each alike):

- ours: llama_sft.training.recipe.run_sft, the toolkit's real training path (config from llama_train's
  precedence chain for the model size: bf16 weights + bf16 autocast on a CPU with bf16, LoRA,
  PadCollator dynamic padding, group_by_length batches, LM head at supervised positions only).
- trl_default: trl.SFTTrainer with its defaults (model given by path: fp32 weights, bf16
  autocast, gradient checkpointing on, random batches padded to the longest row, completion-only
  loss because the data is conversational prompt/completion, chunked log-probs over every
  position on a CPU).
- trl_fast: TRL with its fastest settings that work here: bf16 weights, no gradient
  checkpointing, and --trl-fast-mode: 'padding_free' (rows concatenated; on SDPA transformers
  builds a block-diagonal mask from position_ids, so attention runs over the whole concatenated
  row) or 'group_by_length' (padded, length-grouped batches).
- naive: plain transformers.Trainer, every row padded to --max-length, the model's own loss on
  full logits at every position (labels still mask prompt and padding, so the loss is the same
  objective), fp32 weights loaded as stored, bf16 autocast.

All share: model, LoRA (r, alpha, dropout of the size's config, all linear layers), data (GSM8K
training rows, question -> instruction and answer -> response, plus sft_output/sft_dataset.jsonl,
shuffled with a fixed seed), batch size, gradient accumulation, max length, learning rate,
schedule, seed and number of optimizer steps.

Per contender: supervised tokens/s, processed (non-pad) tokens/s, seconds per optimizer step
(warm-up steps skipped), peak RSS (CUDA: torch.cuda.max_memory_allocated), MFU against the bf16
matmul peak measured in this run (CUDA: --peak-tflops), and the loss on one held-out set of
rows after the same steps (plus the mean training loss of the last steps). The last line:

    RESULT ours/trl_default=X ours/trl_fast=Y mfu=Z mem/trl_default=W

with the ratios of supervised tokens/s, per round, then their median; mem is the ratio of peak
memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BENCH,
    GSM8K,
    ROOT,
    bench_examples,
    cpu_model_name,
    current_rss_mb,
    fmt_table,
    matmul_peak_flops,
    model_shape,
    peak_rss_mb,
    quiet_environment,
    sequence_lengths,
    training_flops,
)

CONTENDERS = ("ours", "trl_default", "trl_fast", "naive")
# ours_alt: ours with --alt-flags added to the toolkit's flags, to measure a lever side by side
# (not in the default set); --ours-flags pins ours' side of it.
ALL_CONTENDERS = CONTENDERS + ("ours_alt",)
GPU_ASSETS = BENCH / ".gpu_assets"
HELDOUT_ROWS = 32


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_train.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="Short run: 2 rounds of 2 warm-up + 4 timed steps per contender.")
    p.add_argument("--rounds", type=int, help="Rounds of all contenders (default 2).")
    p.add_argument("--warmup-steps", type=int, help="Steps not timed (default 3; quick 2).")
    p.add_argument("--timed-steps", type=int, help="Steps timed (default 10; quick 4).")
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help=f"Comma-separated subset of {', '.join(ALL_CONTENDERS)}.")
    p.add_argument("--alt-flags", default="",
                   help="ours_alt only: extra llama_train.py flags, e.g. "
                        "'--attn-implementation sdpa'.")
    p.add_argument("--ours-flags", default="",
                   help="ours only: extra llama_train.py flags, to pin the other side of a "
                        "lever ('--liger off' against --alt-flags '--liger on').")
    p.add_argument("--model", default="embedded", choices=("embedded", "random-tiny", "random-7b"),
                   help="embedded: SmolLM2-135M (CPU). random-7b: LLaMA-7B shapes with random "
                        "weights (--layers of them). random-tiny: 2 layers of 64, a smoke test.")
    p.add_argument("--layers", type=int, default=None,
                   help="Decoder layers of random-7b (default 16 of the real 32, to fit the "
                        "GPU check's time).")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--use-4bit", action="store_true", help="QLoRA: NF4 base for ours and TRL.")
    p.add_argument("--batch-size", type=int, help="Per-device batch (default: the size's config).")
    p.add_argument("--gradient-accumulation-steps", type=int,
                   help="Default: the size's config.")
    p.add_argument("--max-length", type=int, help="Default: the size's config.")
    p.add_argument("--train-rows", type=int,
                   help="Rows in the training set (a fixed shuffle of GSM8K + sample data). "
                        "Default: exactly the rows the steps consume (steps x batch x "
                        "accumulation), so every contender trains on the same rows, once each, "
                        "only in its own order.")
    p.add_argument("--gsm8k", default=str(GSM8K), help="GSM8K training JSONL.")
    p.add_argument("--trl-fast-mode", default="group_by_length",
                   choices=("padding_free", "group_by_length"),
                   help="How trl_fast avoids padding (see the module docstring).")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="CUDA only: the card's dense bf16 peak for MFU (H100 SXM: 989).")
    p.add_argument("--threads", type=int,
                   help="torch threads for every contender and for the peak (default: torch's "
                        "choice, one per core). On a CPU that other jobs share, 2 threads on 2 "
                        "cores stall at every parallel region; --threads 1 measures compute.")
    p.add_argument("--json-out", help="Write every measurement as JSON here.")
    p.add_argument("--keep-logs", help="Copy each worker's log into this folder.")
    p.add_argument("--worker", choices=ALL_CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    return p


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


def bench_tokenizer():
    """The embedded model's tokenizer; on a machine without the embedded model (a GPU box), the
    copy that `bench/gpu_check.sh prepare` put in bench/.gpu_assets/tokenizer."""
    from llama_sft.errors import ModelLoadError
    from llama_sft.modeling.load import load_tokenizer

    try:
        return load_tokenizer("smollm2-135m")
    except ModelLoadError:
        folder = GPU_ASSETS / "tokenizer"
        if not folder.is_dir():
            raise
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok


def random_model_config(name: str, layers: int | None, vocab_size: int, tok):
    from transformers import LlamaConfig

    common = dict(vocab_size=vocab_size, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if name == "random-tiny":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers or 2,
                           num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=2048, tie_word_embeddings=True, **common)
    # LLaMA-2-7B shapes; the vocabulary is the tokenizer's (49,152, not 32,000).
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers or 16,
                       num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, **common)


def ensure_model(args) -> tuple[str, str]:
    """(path the workers load, model size whose config defaults apply)."""
    if args.model == "embedded":
        from llama_sft.modeling.embedded import ensure_embedded_model

        return str(ensure_embedded_model()), "135m"
    import torch
    from transformers import LlamaForCausalLM

    from llama_sft.modeling.embedded import cache_root

    tok = bench_tokenizer()
    cfg = random_model_config(args.model, args.layers, len(tok), tok)
    folder = cache_root() / f"bench-{args.model}-L{cfg.num_hidden_layers}"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return str(folder), "7b" if args.model == "random-7b" else "135m"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    device = args.device if args.model == "random-7b" else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=cache_root()))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    del model
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    print(f"[bench] random model {args.model} ({cfg.num_hidden_layers} layers) written to {folder} "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)
    return str(folder), "7b" if args.model == "random-7b" else "135m"


def resolve_cfg(args, model_path: str, size: str, max_steps: int, output_dir: Path):
    """The toolkit's own config for this size (llama_train's precedence chain), with the
    benchmark's steps; every contender trains with these hyperparameters."""
    from llama_train import resolve_train_config

    argv = ["--model-size", size, "--base-model", model_path, "--max-steps", str(max_steps),
            "--logging-steps", "1", "--save-steps", "1000000", "--eval-steps", "1000000",
            "--output-dir", str(output_dir)]
    for flag, value in (("--batch-size", args.batch_size),
                        ("--gradient-accumulation-steps", args.gradient_accumulation_steps),
                        ("--max-length", args.max_length)):
        if value is not None:
            argv += [flag, str(value)]
    if args.use_4bit:
        argv.append("--use-4bit")
    if args.worker == "ours_alt":
        argv += shlex.split(args.alt_flags)
    elif args.worker == "ours":
        argv += shlex.split(args.ours_flags)
    return resolve_train_config(argv)


# --------------------------------------------------------------------------------------
# Worker: one contender in this process
# --------------------------------------------------------------------------------------


class DecoderCounter:
    """Forward pre-hook on the decoder (LlamaModel): real tokens and causal attention pairs of
    every training forward, read from the attention mask or padding-free position_ids."""

    def __init__(self):
        self.processed = 0
        self.pairs = 0
        self.padded = 0

    def __call__(self, module, args, kwargs):
        import torch

        if not module.training or not torch.is_grad_enabled():
            return
        lens = sequence_lengths(kwargs, args)
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.processed += sum(lens)
        self.pairs += sum(n * (n + 1) // 2 for n in lens)
        if ids is not None:
            self.padded += int(ids.numel())


def counting(base):
    """A Trainer subclass that counts supervised tokens like ours does (labels[:, 1:] != -100)."""

    class Counting(base):
        bench_supervised = 0

        def compute_loss(self, model, inputs, *a, **kw):
            labels = inputs.get("labels")
            if model.training and labels is not None:
                self.bench_supervised += int((labels[..., 1:] != -100).sum())
            return super().compute_loss(model, inputs, *a, **kw)

    return Counting


def make_recorder(counter: DecoderCounter, supervised, device: str):
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def __init__(self):
            self.t: list[float] = []
            self.processed: list[int] = []
            self.supervised: list[int] = []
            self.pairs: list[int] = []
            self.padded: list[int] = []
            self.busy: list[tuple[float, float]] = []
            self.t_begin = None

        def on_train_begin(self, *a, **kw):
            self.t_begin = time.perf_counter()

        def on_step_end(self, *a, **kw):
            if device == "cuda":
                import torch

                torch.cuda.synchronize()
            self.t.append(time.perf_counter())
            self.processed.append(counter.processed)
            self.pairs.append(counter.pairs)
            self.padded.append(counter.padded)
            self.supervised.append(int(supervised()))
            self.busy.append(cpu_busy())

    return StepRecorder()


def cpu_busy() -> tuple[float, float]:
    """(CPU seconds this process used, CPU seconds the whole machine was busy) so far: their
    difference over a window is what other processes took from the cores."""
    t = os.times()
    own = t.user + t.system
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    return own, busy


def decoder_of(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def conversational(examples) -> list[dict[str, Any]]:
    """The same rows as TRL's conversational prompt/completion format (the chat template the
    toolkit uses for this tokenizer; TRL then trains on the completion only by default)."""
    from llama_sft.data.prompts import user_message

    return [{"prompt": [{"role": "user", "content": user_message(ex.instruction, ex.context)}],
             "completion": [{"role": "assistant", "content": ex.response}]} for ex in examples]


def max_length_collator(pad_id: int, max_length: int):
    """The naive collator: every row padded to max_length."""
    import torch

    def collate(rows):
        n = len(rows)
        ids = torch.full((n, max_length), pad_id, dtype=torch.long)
        labels = torch.full((n, max_length), -100, dtype=torch.long)
        mask = torch.zeros((n, max_length), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.tensor(r["input_ids"])
            labels[i, :k] = torch.tensor(r["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def heldout_loss_fp32(model_path: str, trained, rows, pad_id: int, *, base_only: bool = False):
    """The held-out loss of a contender's adapter, measured the same way for every contender:
    its LoRA tensors copied into a fresh fp32 base, no autocast. (Measuring each trained model
    as it is would also measure its weight dtype: TRL's default keeps the base in fp32, ours in
    bf16, and fp32 norms and embeddings alone lower the loss.) base_only: the base model's loss
    (LoRA B is zero at initialisation)."""
    import copy

    import torch
    from peft import (
        get_peft_model,
        get_peft_model_state_dict,
        set_peft_model_state_dict,
    )
    from transformers import AutoModelForCausalLM

    from llama_sft.modeling.loss import mean_supervised_loss

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    cfg = copy.deepcopy(trained.peft_config["default"])
    fresh = get_peft_model(base, cfg)
    if not base_only:
        state = {k: v.detach().to(torch.float32) for k, v in
                 get_peft_model_state_dict(trained).items()}
        result = set_peft_model_state_dict(fresh, state)
        if getattr(result, "unexpected_keys", None):
            raise SystemExit(f"error: LoRA keys not loaded: {result.unexpected_keys[:3]}")
    loss = mean_supervised_loss(fresh, rows, pad_id, batch_size=8)
    return loss, "adapter copied into a fresh fp32 base, no autocast"


def run_worker(args) -> dict[str, Any]:
    quiet_environment()
    t_start = time.perf_counter()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import set_seed

    from llama_sft.data.batching import TokenizedDataset
    from llama_sft.data.tokenize import tokenize_examples
    from llama_sft.layout import config_hash
    from llama_sft.modeling.load import cpu_has_bf16
    from llama_sft.modeling.loss import mean_supervised_loss

    device = args.device
    steps = args.warmup_steps + args.timed_steps
    out_dir = Path(tempfile.mkdtemp(prefix=f"bench-{args.worker}-"))
    cfg = resolve_cfg(args, args.model_path, "7b" if args.model == "random-7b" else "135m", steps,
                      out_dir / "run")
    tok = bench_tokenizer()
    rows_per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    train_ex, heldout_ex = bench_examples(n_train=args.train_rows or steps * rows_per_step,
                                          n_heldout=HELDOUT_ROWS, gsm8k=Path(args.gsm8k))
    train_rows = tokenize_examples(train_ex, tok, max_length=cfg.max_length)
    heldout_rows = tokenize_examples(heldout_ex, tok, max_length=cfg.max_length)
    bf16 = torch.cuda.is_bf16_supported() if device == "cuda" else cpu_has_bf16()
    counter = DecoderCounter()
    info: dict[str, Any] = {"contender": args.worker}
    lora_kwargs = dict(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                       target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    train_args_common = dict(
        output_dir=str(out_dir / "run"), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay, max_steps=steps,
        logging_steps=1, save_strategy="no", report_to="none", seed=cfg.seed, data_seed=cfg.seed,
        disable_tqdm=True,
        # TRL's default bf16=True is refused on a CPU unless use_cpu is set ("Your setup doesn't
        # support bf16/gpu"): the one setting a CPU user must add to TRL's defaults.
        use_cpu=device == "cpu")
    trainer = None
    recorder = None

    def instrument(tr, supervised) -> None:
        """Count the decoder's tokens, time every step; note setup time and RSS so far."""
        nonlocal recorder
        decoder_of(tr.model).register_forward_pre_hook(counter, with_kwargs=True)
        recorder = make_recorder(counter, supervised, device)
        tr.add_callback(recorder)
        info["setup_s"] = round(time.perf_counter() - t_start, 1)
        info["rss_before_train_mb"] = current_rss_mb()

    if args.worker in ("ours", "ours_alt"):
        from llama_sft.layout import RunConfig
        from llama_sft.training.recipe import run_sft

        run_config = RunConfig(base_model=args.model_path, config_hash=config_hash(cfg),
                               dataset={"dataset_hash": "bench"})
        holder: dict[str, Any] = {}

        def on_trainer(tr):
            holder["trainer"] = tr
            instrument(tr, lambda: tr.supervised_tokens_seen)

        result = run_sft(cfg, output_dir=out_dir / "run", train_rows=train_rows, eval_rows=[],
                         sample_prompts=[], run_config=run_config, tokenizer=tok,
                         on_trainer=on_trainer)
        trainer = holder["trainer"]
        model = result["model"]
        kernels = result["kernels"]
        extra_flags = args.alt_flags if args.worker == "ours_alt" else args.ours_flags
        info["settings"] = (f"llama_sft.training.recipe.run_sft; weights {next(model.parameters()).dtype}, "
                            f"bf16 autocast {bf16}, gradient checkpointing "
                            f"{cfg.gradient_checkpointing}, "
                            f"{'padding-free' if kernels['padding_free'] else 'PadCollator'} + "
                            f"group_by_length, LM head at supervised positions, attention "
                            f"{kernels['attn_implementation']}, Liger {kernels['liger']}"
                            + (f", extra flags {extra_flags!r}" if extra_flags else ""))
        info["kernels"] = kernels
        info["toolkit_tokens_seen"] = trainer.tokens_seen
    elif args.worker in ("trl_default", "trl_fast"):
        import datasets
        from peft import LoraConfig
        from trl import SFTConfig, SFTTrainer

        ds = datasets.Dataset.from_list(conversational(train_ex))
        extra: dict[str, Any] = {"max_length": cfg.max_length}
        model_init_kwargs: dict[str, Any] = {}
        if args.use_4bit:
            from transformers import BitsAndBytesConfig

            model_init_kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16)
            model_init_kwargs["dtype"] = torch.bfloat16
        if args.worker == "trl_fast":
            model_init_kwargs["dtype"] = torch.bfloat16 if bf16 else torch.float32
            extra.update(gradient_checkpointing=False, bf16=bf16)
            if args.trl_fast_mode == "padding_free":
                # Without packing TRL refuses a max_length with padding_free: the rows are
                # already cut to max_length by the toolkit's tokenization of the same data,
                # so drop the (few) longer ones instead of truncating differently.
                convs = conversational(train_ex)
                too_long = {i for i, c in enumerate(convs) if len(tok.apply_chat_template(
                    c["prompt"] + c["completion"], tokenize=True)) > cfg.max_length}
                if too_long:
                    ds = ds.select([i for i in range(len(ds)) if i not in too_long])
                info["rows_dropped_over_max_length"] = len(too_long)
                extra.update(padding_free=True, max_length=None)
            else:
                extra.update(train_sampling_strategy="group_by_length")
        if model_init_kwargs:
            extra["model_init_kwargs"] = model_init_kwargs
        conf = SFTConfig(**train_args_common, **extra)
        set_seed(cfg.seed)
        trainer = counting(SFTTrainer)(model=args.model_path, args=conf, train_dataset=ds,
                                       processing_class=tok, peft_config=LoraConfig(**lora_kwargs))
        instrument(trainer, lambda: trainer.bench_supervised)
        info["settings"] = (f"trl {__import__('trl').__version__} SFTTrainer; weights "
                            f"{next(trainer.model.parameters()).dtype}, bf16 {conf.bf16}, "
                            f"gradient checkpointing {conf.gradient_checkpointing}, padding_free "
                            f"{trainer.padding_free}, completion_only_loss "
                            f"{trainer.completion_only_loss}, sampler "
                            f"{conf.train_sampling_strategy}, attention "
                            f"{trainer.model.config._attn_implementation}")
        trainer.train()
        model = trainer.model
    else:  # naive
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

        model = AutoModelForCausalLM.from_pretrained(args.model_path)
        model.config.use_cache = False
        set_seed(cfg.seed)
        model = get_peft_model(model, LoraConfig(**lora_kwargs))
        targs = TrainingArguments(**train_args_common, bf16=bf16, remove_unused_columns=False,
                                  dataloader_num_workers=0)
        trainer = counting(Trainer)(model=model, args=targs,
                                    train_dataset=TokenizedDataset(train_rows),
                                    data_collator=max_length_collator(tok.pad_token_id,
                                                                      cfg.max_length))
        instrument(trainer, lambda: trainer.bench_supervised)
        info["settings"] = (f"transformers.Trainer; weights {next(model.parameters()).dtype}, "
                            f"bf16 {bf16}, pad to {cfg.max_length}, full logits")
        trainer.train()
        model = trainer.model

    # Peak memory of training itself, before the held-out loss below adds its own.
    train_peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb())
    w, n = args.warmup_steps, len(recorder.t)
    if n < steps:
        raise SystemExit(f"error: {args.worker} ran {n} steps, expected {steps}")

    def window(xs):
        return xs[n - 1] - xs[w - 1] if w > 0 else xs[n - 1]

    elapsed = recorder.t[n - 1] - (recorder.t[w - 1] if w > 0 else recorder.t_begin)
    step_times = [b - a for a, b in zip([recorder.t_begin] + recorder.t[:-1], recorder.t)]
    (own0, all0), (own1, all1) = recorder.busy[w - 1], recorder.busy[n - 1]
    info["others_cpu_share"] = max(0.0, (all1 - all0) - (own1 - own0)) / (elapsed * os.cpu_count())
    info["own_cpu_share"] = (own1 - own0) / (elapsed * os.cpu_count())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "step" in h]
    k = min(5, args.timed_steps)
    shape = model_shape(model)
    if device == "cpu" and not args.use_4bit:
        heldout, heldout_how = heldout_loss_fp32(args.model_path, model, heldout_rows,
                                                 tok.pad_token_id)
        if args.worker == "ours":
            info["heldout_loss_base"], _ = heldout_loss_fp32(args.model_path, model, heldout_rows,
                                                             tok.pad_token_id, base_only=True)
    else:
        amp = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16)
        with amp:
            heldout = mean_supervised_loss(model, heldout_rows, tok.pad_token_id, batch_size=8)
        heldout_how = "the trained model as it is, bf16 autocast"
    info["heldout_how"] = heldout_how
    info.update(
        steps=n, warmup_steps=w, timed_steps=n - w, window_s=elapsed,
        sec_per_step=elapsed / (n - w),
        processed_tokens=window(recorder.processed), supervised_tokens=window(recorder.supervised),
        padded_tokens=window(recorder.padded), causal_pairs=window(recorder.pairs),
        step_times=[round(x, 3) for x in step_times],
        train_loss_last_k=statistics.mean(losses[-k:]) if losses else None, last_k=k,
        train_rows=len(train_ex), rows_per_step=rows_per_step,
        heldout_loss=heldout, shape=shape,
        batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length, learning_rate=cfg.learning_rate,
        lora=[cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout], threads=torch.get_num_threads(),
        total_s=round(time.perf_counter() - t_start, 1))
    info["flops"] = training_flops(shape, processed=info["processed_tokens"],
                                   supervised=info["supervised_tokens"],
                                   causal_pairs=info["causal_pairs"])
    info["peak_memory_mb"] = train_peak
    info["peak_with_heldout_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
                                    else peak_rss_mb())
    info["memory_kind"] = "cuda max_memory_allocated" if device == "cuda" else "peak RSS"
    shutil.rmtree(out_dir, ignore_errors=True)
    return info


# --------------------------------------------------------------------------------------
# Parent: peaks, alternation, tables
# --------------------------------------------------------------------------------------


def spawn(args, contender: str, model_path: str, log_dir: Path) -> dict[str, Any]:
    out = log_dir / f"{contender}-{time.monotonic_ns()}.json"
    log = out.with_suffix(".log")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", contender,
           "--worker-out", str(out), "--model-path", model_path]
    for name in ("model", "device", "train_rows", "gsm8k", "trl_fast_mode", "warmup_steps",
                 "timed_steps", "batch_size", "gradient_accumulation_steps", "max_length",
                 "layers", "threads"):
        v = getattr(args, name)
        if v is not None:
            cmd += ["--" + name.replace("_", "-"), str(v)]
    if args.use_4bit:
        cmd.append("--use-4bit")
    if args.alt_flags:
        cmd += ["--alt-flags=" + args.alt_flags]
    if args.ours_flags:
        cmd += ["--ours-flags=" + args.ours_flags]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(ROOT))
    if rc != 0 or not out.is_file():
        tail = log.read_text(errors="replace")[-4000:]
        raise SystemExit(f"error: worker {contender} failed (exit {rc}); log {log}:\n{tail}")
    res = json.loads(out.read_text())
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["log"] = str(log)
    return res


def measure_peaks(device: str, threads: int | None = None) -> dict[str, float]:
    import torch

    if threads:
        torch.set_num_threads(threads)
    if device == "cuda":
        return {"bf16": matmul_peak_flops("bf16", n=8192, iters=20, device="cuda")}
    return {"bf16": matmul_peak_flops("bf16"), "fp32": matmul_peak_flops("fp32", iters=4),
            "threads": torch.get_num_threads()}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.warmup_steps is None:
        args.warmup_steps = 2 if args.quick else 3
    if args.timed_steps is None:
        args.timed_steps = 4 if args.quick else 10
    if args.worker:
        info = run_worker(args)
        Path(args.worker_out).write_text(json.dumps(info, indent=1))
        return 0
    quiet_environment()
    if args.warmup_steps < 1 or args.timed_steps < 1:
        raise SystemExit("error: --warmup-steps and --timed-steps must be >= 1")
    rounds = args.rounds or 2
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    bad = [c for c in contenders if c not in ALL_CONTENDERS]
    if bad:
        raise SystemExit(f"error: unknown contender(s) {bad}; choose from {ALL_CONTENDERS}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch sees no CUDA GPU")
    t0 = time.perf_counter()
    model_path, _ = ensure_model(args)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-train-"))
    print(f"[bench] machine: {cpu_model_name()}, {os.cpu_count()} CPUs; device {args.device}; "
          f"model {args.model} ({model_path}); QLoRA {args.use_4bit}", flush=True)
    peaks_before = measure_peaks(args.device, args.threads)
    print("[bench] matmul peak before: " + ", ".join(
        f"{k} {v / 1e9:.0f} GFLOP/s" if k != "threads" else f"{v} threads"
        for k, v in peaks_before.items()), flush=True)
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in contenders}
    for r in range(rounds):
        order = contenders if r % 2 == 0 else list(reversed(contenders))
        for c in order:
            res = spawn(args, c, model_path, log_dir)
            res["round"] = r + 1
            runs[c].append(res)
            print(f"[bench] round {r + 1} {c:12s} {res['sec_per_step']:.3f} s/step  "
                  f"{res['supervised_tokens'] / res['window_s']:.0f} sup tok/s  "
                  f"{res['processed_tokens'] / res['window_s']:.0f} tok/s  "
                  f"peak {res['peak_memory_mb']:.0f} MiB  held-out loss "
                  f"{res['heldout_loss']:.4f}  others' CPU {100 * res['others_cpu_share']:.0f}%  "
                  f"({res['wall_s']:.0f} s)", flush=True)
    peaks_after = measure_peaks(args.device, args.threads)
    if args.device == "cuda":
        peak = args.peak_tflops * 1e12
        peak_note = (f"{args.peak_tflops:.0f} TFLOP/s (card's bf16 dense peak); measured 8192^3 "
                     f"bf16 matmul {max(peaks_before['bf16'], peaks_after['bf16']) / 1e12:.0f} "
                     "TFLOP/s")
    else:
        peak = max(peaks_before["bf16"], peaks_after["bf16"])
        peak_note = (f"bf16 2048^3 matmul, best of before/after: {peak / 1e9:.0f} GFLOP/s "
                     f"(before {peaks_before['bf16'] / 1e9:.0f}, after "
                     f"{peaks_after['bf16'] / 1e9:.0f}); fp32 before "
                     f"{peaks_before['fp32'] / 1e9:.0f}, after {peaks_after['fp32'] / 1e9:.0f} "
                     f"GFLOP/s; {peaks_before['threads']} threads")
    for c in contenders:
        for res in runs[c]:
            res["mfu"] = res["flops"] / res["window_s"] / peak
    report = summarize(args, runs, contenders, peak_note, rounds)
    print(report["text"], flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {"args": vars(args), "peak_note": peak_note, "peaks_before": peaks_before,
             "peaks_after": peaks_after, "runs": runs, "summary": report["summary"]},
            indent=1, default=str))
    if args.keep_logs:
        dest = Path(args.keep_logs)
        dest.mkdir(parents=True, exist_ok=True)
        for f in log_dir.iterdir():
            shutil.copy(f, dest / f.name)
    shutil.rmtree(log_dir, ignore_errors=True)
    print(f"[bench] total {time.perf_counter() - t0:.0f} s", flush=True)
    print(report["result"], flush=True)
    return 0


def summarize(args, runs, contenders, peak_note: str, rounds: int) -> dict[str, Any]:
    def med(xs):
        return statistics.median(xs) if xs else float("nan")

    lines = [f"\nMFU peak: {peak_note}", ""]
    rows = []
    summary: dict[str, Any] = {}
    for c in contenders:
        rs = runs[c]
        s = {
            "sup_tok_s": med([r["supervised_tokens"] / r["window_s"] for r in rs]),
            "tok_s": med([r["processed_tokens"] / r["window_s"] for r in rs]),
            "sec_per_step": med([r["sec_per_step"] for r in rs]),
            "peak_mb": med([r["peak_memory_mb"] for r in rs]),
            "mfu": med([r["mfu"] for r in rs]),
            "heldout_loss": med([r["heldout_loss"] for r in rs]),
            "train_loss": med([r["train_loss_last_k"] for r in rs if r["train_loss_last_k"]
                               is not None]),
            "pad_share": med([1 - r["processed_tokens"] / max(r["padded_tokens"], 1) for r in rs]),
            "others_cpu": med([r.get("others_cpu_share", float("nan")) for r in rs]),
            "tokens_per_row": med([r["processed_tokens"] / (r["timed_steps"] * r["rows_per_step"])
                                   for r in rs]),
            "rss_before_mb": med([r.get("rss_before_train_mb", float("nan")) for r in rs]),
            "peak_heldout_mb": med([r.get("peak_with_heldout_mb", float("nan")) for r in rs]),
        }
        summary[c] = s
        rows.append([c, s["sup_tok_s"], s["tok_s"], s["sec_per_step"], s["tokens_per_row"],
                     s["peak_mb"], s["rss_before_mb"], s["peak_heldout_mb"],
                     f"{100 * s['mfu']:.1f}%", f"{s['heldout_loss']:.4f}",
                     f"{s['train_loss']:.4f}", f"{100 * s['pad_share']:.0f}%",
                     f"{100 * s['others_cpu']:.0f}%"])
    first = runs[contenders[0]][0]
    lines.append(f"Medians over {rounds} round(s); {first['warmup_steps']} warm-up + "
                 f"{first['timed_steps']} timed optimizer steps; batch {first['batch_size']} x "
                 f"accumulation {first['gradient_accumulation_steps']}, max length "
                 f"{first['max_length']}, lr {first['learning_rate']}, {first['train_rows']} "
                 f"training rows, LoRA r/alpha/dropout "
                 f"{first['lora']}, {first['threads']} torch threads; memory = "
                 f"{first['memory_kind']} at the end of training (the held-out loss after it is "
                 f"not counted); held-out loss on {HELDOUT_ROWS} rows ({first.get('heldout_how', '')}"
                 f"{'; base model ' + format(first['heldout_loss_base'], '.4f') if first.get('heldout_loss_base') else ''}); "
                 f"train loss = mean of the last {first['last_k']} steps")
    lines.append("")
    lines.append(fmt_table(["contender", "supervised tok/s", "processed tok/s", "s/step",
                            "tokens/row (timed)", "peak MiB (training)", "MiB before training",
                            "peak MiB with held-out loss", "MFU", "held-out loss", "train loss (last k)",
                            "padding share", "CPU taken by others"], rows))
    lines.append("")
    lines.append("Per-run:")
    per = []
    for c in contenders:
        for r in runs[c]:
            per.append([r["round"], c, r["supervised_tokens"], r["processed_tokens"],
                        r["window_s"], r["supervised_tokens"] / r["window_s"],
                        r["peak_memory_mb"], f"{100 * r['mfu']:.1f}%",
                        f"{r['heldout_loss']:.4f}",
                        f"{100 * r.get('others_cpu_share', float('nan')):.0f}%", r["setup_s"],
                        r["settings"]])
    lines.append(fmt_table(["round", "contender", "sup tokens", "tokens", "window s",
                            "sup tok/s", "peak MiB", "MFU", "held-out", "others' CPU", "setup s",
                            "settings"],
                           per))
    ratios: dict[str, list[float]] = {}
    if "ours" in contenders:
        for other in contenders:
            if other == "ours":
                continue
            pair = [a["supervised_tokens"] / a["window_s"] / (b["supervised_tokens"] / b["window_s"])
                    for a, b in zip(runs["ours"], runs[other])]
            ratios[f"ours/{other}"] = pair
            mem = [a["peak_memory_mb"] / b["peak_memory_mb"] for a, b in zip(runs["ours"], runs[other])]
            ratios[f"mem/{other}"] = mem
        lines.append("")
        lines.append("Ratios of supervised tokens/s (and of peak memory), per round, median:")
        for k, v in ratios.items():
            lines.append(f"  {k}: " + ", ".join(f"{x:.2f}" for x in v) + f"  -> median {med(v):.2f}")
    summary["ratios"] = {k: med(v) for k, v in ratios.items()}
    summary["ratios_per_round"] = ratios
    parts = []
    for k in ("ours/trl_default", "ours/trl_fast", "ours/ours_alt", "mem/ours_alt"):
        if k in ratios:
            parts.append(f"{k}={med(ratios[k]):.2f}")
    if "ours" in summary:
        parts.append(f"mfu={summary['ours']['mfu']:.3f}")
    if "mem/trl_default" in ratios:
        parts.append(f"mem/trl_default={med(ratios['mem/trl_default']):.2f}")
    return {"text": "\n".join(lines), "summary": summary, "result": "RESULT " + " ".join(parts)}


if __name__ == "__main__":
    raise SystemExit(main())
