"""The training run shared by llama_train.py and llama_pilot.py, as named phases:

    run = setup(cfg, output_dir, run_config)       kernels, resume policy, logs, precision, W&B
    model = prepare_model(cfg, run, model)          base model, attention, Liger, seed, LoRA
    trainer = build_trainer(cfg, run, model, ...)   SFTTrainer, callbacks, test-only faults
    result = train(cfg, run, trainer)               signals, out-of-memory message
    finish(cfg, run, trainer, result, stage=...)    final evaluation, train_results fields

`run_sft` chains them. Imports torch and transformers lazily, inside the phases.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llama_sft.cli import is_main_process
from llama_sft.data.batching import PadCollator, PaddingFreeCollator, TokenizedDataset
from llama_sft.errors import ConfigError, RunSetupError, TrainingError
from llama_sft.evaluation.generate import generate
from llama_sft.evaluation.metrics import perplexity
from llama_sft.layout import RESUME_STATE, RUN_CONFIG, STEP_LOGS, ResumeState, RunConfig
from llama_sft.modeling.load import add_lora, cpu_has_bf16, is_quantized, load_model
from llama_sft.training.checkpoints import (
    checkpoint_step,
    find_resume_checkpoint,
    latest_good_checkpoint,
    remove_stale_staging,
    truncate_step_logs,
)
from llama_sft.training.outputs import peak_memory_mb
from llama_sft.training.signals import EXIT_INTERRUPTED, SignalCatcher
from llama_sft.training.tracking import finish_wandb, setup_wandb

logger = logging.getLogger("llama_sft")


@dataclass
class RunSetup:
    """What the phases share: where the run writes, on what device and precision, and where it
    resumes from."""

    output_dir: Path
    device: str
    bf16: bool
    fp16: bool
    resume_from: Path | None
    start_step: int
    stop_flag: dict[str, Any] = field(default_factory=dict)  # set by SignalCatcher
    attn_implementation: str = "sdpa"
    liger: bool = False  # Liger's kernels patched into the model (modeling/liger.py)
    padding_free: bool = False  # PaddingFreeCollator instead of PadCollator
    torch_compile: bool = False  # decoder layers compiled for training (modeling/compile.py)

    @property
    def kernels(self) -> dict[str, Any]:
        """What the run computes with, for train_results.json."""
        return {"attn_implementation": self.attn_implementation, "liger": self.liger,
                "padding_free": self.padding_free, "torch_compile": self.torch_compile}


def build_training_args(cfg: Any, output_dir: Path, *, has_eval: bool, bf16: bool, fp16: bool):
    from transformers import TrainingArguments

    save_steps = cfg.save_steps or cfg.eval_steps
    early = has_eval and cfg.early_stopping_patience is not None
    if early and save_steps % cfg.eval_steps:
        raise RunSetupError(f"--save-steps {save_steps} must be a multiple of --eval-steps "
                            f"{cfg.eval_steps} for early stopping to keep the best checkpoint")
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=max(cfg.batch_size, 8),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps if cfg.max_steps and cfg.max_steps > 0 else -1,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps if has_eval else None,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=None,  # retention is ours: only after the new checkpoint is complete
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        bf16=bf16,
        fp16=fp16,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=["wandb"] if cfg.use_wandb else "none",
        run_name=output_dir.name,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length",
        dataloader_num_workers=0,
        prediction_loss_only=True,
        use_cpu=not _cuda_available(),
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
        save_only_model=False,
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def precision_flags(device: str) -> tuple[bool, bool]:
    """(bf16, fp16) for mixed precision. fp16 only where bf16 is missing, with a warning."""
    import torch

    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return True, False
        logger.warning("this GPU has no bf16: training in fp16, which LLaMA can overflow in; watch "
                       "for a non-finite loss")
        return False, True
    return cpu_has_bf16(), False


def resolve_attn_implementation(name: str | None, device: str) -> str:
    """--attn-implementation auto: on a CPU, modeling/attention.py's "sdpa_recompute" (SDPA's
    memory, eager's speed: bench/RESULTS.md); sdpa elsewhere. Registers it when used."""
    if not name or name == "auto":
        name = "sdpa_recompute" if device == "cpu" else "sdpa"
    if name == "sdpa_recompute":
        from llama_sft.modeling import attention  # imports torch

        attention.register()
    return name


# Attention that keeps the rows of a padding-free batch apart without a dense [tokens, tokens]
# mask: flash varlen from the restarting position_ids, or flex_attention's block-sparse mask.
PACKED_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash_attention_4",
                    "flex_attention")
# Attention that gets transformers' dense block-diagonal mask from the restarting position_ids
# (masking_utils.find_packed_sequence_indices, with no cache): the same loss, but computed over
# the whole concatenated row (tests/test_gpu_levers.py checks each against padded batches).
DENSE_MASK_ATTENTION = ("sdpa", "eager", "sdpa_recompute")


def resolve_padding_free(choice: str | None, device: str, attn_implementation: str
                         ) -> tuple[bool, str]:
    """--padding-free: (concatenate each micro-batch's rows, why). 'auto': on a CUDA GPU with a
    PACKED_ATTENTION kernel only; 'on' with an attention that would let the rows see each other
    is a ConfigError."""
    if choice == "off":
        return False, "--padding-free off"
    if choice == "on":
        if attn_implementation not in PACKED_ATTENTION + DENSE_MASK_ATTENTION:
            raise ConfigError(
                f"--padding-free on: attention {attn_implementation!r} is not known to keep the "
                "concatenated rows apart; use --attn-implementation "
                f"{', '.join(PACKED_ATTENTION + DENSE_MASK_ATTENTION)}, or --padding-free off")
        return True, "--padding-free on"
    if device == "cuda" and attn_implementation in PACKED_ATTENTION:
        return True, f"auto: CUDA with {attn_implementation}"
    return False, (f"auto: on only on a CUDA GPU with {', '.join(PACKED_ATTENTION)}; here "
                   f"{device} with {attn_implementation}")


def resolve_liger(choice: str | None, device: str) -> tuple[bool, str]:
    """--liger: (patch Liger's kernels in, why). 'auto': on when the device is CUDA and
    liger_kernel imports; 'on' where that is not so is a ConfigError saying what to do."""
    if choice == "off":
        return False, "--liger off"
    if device != "cuda":
        if choice == "on":
            raise ConfigError(f"--liger on needs a CUDA GPU (Liger's kernels are Triton) and "
                              f"this run is on the {device}; use --liger auto (off here) or off")
        return False, f"auto: Liger's kernels are Triton, GPU only; here {device}"
    from llama_sft.modeling.liger import liger_import_problem

    problem = liger_import_problem()
    if problem is not None:
        if choice == "on":
            raise ConfigError(f"--liger on: liger_kernel does not import ({problem}); install "
                              "it (pip install liger-kernel; it needs triton, which CUDA builds "
                              "of torch bring), or use --liger auto or off")
        return False, f"auto: liger_kernel does not import ({problem}); pip install liger-kernel"
    return True, "--liger on" if choice == "on" else "auto: CUDA and liger_kernel found"


def resolve_compile(choice: str | None, device: str, *, steps: int, quantized: bool,
                    processes: int) -> tuple[bool, str]:
    """--torch-compile: (compile the decoder layers, why). 'auto': on a CPU, in one process,
    without 4-bit/8-bit layers, for runs of at least compile.AUTO_MIN_STEPS optimizer steps
    (below that the compile time costs more than the faster steps save: bench/RESULTS.md)."""
    from llama_sft.modeling.compile import AUTO_MIN_STEPS

    if choice == "off":
        return False, "--torch-compile off"
    if choice == "on":
        return True, "--torch-compile on"
    if device != "cpu":
        return False, f"auto: measured on a CPU only; here {device}"
    if quantized or processes > 1:
        return False, ("auto: not with 4-bit/8-bit layers" if quantized
                       else "auto: single process only")
    if steps < AUTO_MIN_STEPS:
        return False, (f"auto: {steps} steps; compiling pays from about {AUTO_MIN_STEPS} on "
                       "this kind of CPU (--torch-compile on to force it)")
    return True, f"auto: {steps} steps on a CPU"


def planned_steps(args, n_rows: int) -> int:
    """Optimizer steps a run with these TrainingArguments takes over n_rows (from step 0)."""
    import math

    if args.max_steps and args.max_steps > 0:
        return int(args.max_steps)
    per_step = (args.per_device_train_batch_size * args.gradient_accumulation_steps
                * max(1, args.world_size))
    return int(math.ceil(n_rows / per_step) * args.num_train_epochs)


def maybe_compile(cfg: Any, run: RunSetup, trainer, n_rows: int) -> None:
    """Compile the decoder layers when --torch-compile resolves to on (logged with why)."""
    from llama_sft.modeling.compile import compile_layers

    model = trainer.model
    on, why = resolve_compile(getattr(cfg, "torch_compile", "auto"), run.device,
                              steps=planned_steps(trainer.args, n_rows),
                              quantized=is_quantized(model), processes=trainer.args.world_size)
    if on:
        n = compile_layers(model)
        on = n > 0
        why += f"; {n} decoder layers" if n else "; no decoder layers found, not compiled"
    run.torch_compile = on
    trainer.compiled = on
    logger.info("torch.compile %s (%s)", "on" if on else "off", why)


def training_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_kernels(cfg: Any, device: str, *, log: bool = True) -> tuple[str, bool, bool]:
    """(attention, Liger, padding-free) for this device, logged with the reasons in one line;
    a ConfigError for a choice that cannot run here. Stages call it once with log=False before
    they write anything, so such a refusal leaves --output-dir as it was."""
    attn = resolve_attn_implementation(getattr(cfg, "attn_implementation", "auto"), device)
    liger, liger_why = resolve_liger(getattr(cfg, "liger", "auto"), device)
    padding_free, free_why = resolve_padding_free(getattr(cfg, "padding_free", "auto"), device,
                                                  attn)
    if log:
        logger.info("kernels: attention %s | Liger %s (%s) | padding-free batches %s (%s)",
                    attn, "on" if liger else "off", liger_why, "on" if padding_free else "off",
                    free_why)
    return attn, liger, padding_free


def setup(cfg: Any, output_dir: Path, run_config: RunConfig) -> RunSetup:
    """The kernels for this device and the resume decision (both refused before anything is
    written), then the logs cut back to the resumed step (or removed for a fresh start), and
    W&B."""
    device = training_device()
    attn, liger, padding_free = resolve_kernels(cfg, device)
    output_dir.mkdir(parents=True, exist_ok=True)
    bf16, fp16 = precision_flags(device)
    resume_from = find_resume_checkpoint(output_dir, cfg.resume, run_config, cfg.force)
    start_step = checkpoint_step(resume_from) if resume_from else 0
    if cfg.resume:
        same_resume_step_everywhere(output_dir, cfg.resume, start_step)
    if is_main_process():
        remove_stale_staging(output_dir)
        if resume_from is not None:
            truncate_step_logs(output_dir, start_step)
        elif cfg.resume:
            # Nothing to resume: a fresh run must not append to an old run's logs.
            for name in STEP_LOGS:
                (output_dir / name).unlink(missing_ok=True)
    if cfg.use_wandb:
        setup_wandb(cfg)
    return RunSetup(output_dir, device, bf16, fp16, resume_from, start_step,
                    attn_implementation=attn, liger=liger, padding_free=padding_free)


def same_resume_step_everywhere(output_dir: Path, resume: str, start_step: int) -> None:
    """Every process must resume from the same step. Each machine reads its own --output-dir:
    on local disks only rank 0's holds the checkpoints, and the others would start from step 0
    beside it (they train out of step, then wait on each other forever). RunSetupError then,
    before anything is written. Nothing to check in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    from accelerate.utils import gather_object

    steps = gather_object([start_step])
    if len(set(steps)) > 1:
        raise RunSetupError(
            f"--resume {resume}: the processes found different checkpoints in --output-dir "
            f"{output_dir} (the step each resumes from, by rank: {steps}): each machine reads "
            "its own. Put --output-dir on a filesystem every machine mounts, or copy the "
            "checkpoint folders to the same path on every machine, then resume again (nothing "
            "was changed)")


def prepare_model(cfg: Any, run: RunSetup, base_model: str, model=None):
    """The base model (loaded unless given), its attention kernel and Liger's kernels (as
    setup resolved them), then LoRA on top."""
    import torch
    from transformers import set_seed

    if model is None:
        base_dtype = getattr(cfg, "base_dtype", "auto")
        model = load_model(base_model, use_4bit=cfg.use_4bit, use_8bit=cfg.use_8bit,
                           trust_remote_code=cfg.trust_remote_code, for_training=True,
                           dtype=None if base_dtype == "auto" else getattr(torch, base_dtype))
    if getattr(model.config, "_attn_implementation", None) != run.attn_implementation:
        model.set_attn_implementation(run.attn_implementation)
    if run.liger:  # before LoRA, which wraps the projections Liger's SwiGLU calls
        from llama_sft.modeling.liger import apply_liger

        run.liger = apply_liger(model, getattr(cfg, "liger", "auto"))
    # LoRA A is initialised from the global RNG: seed first, or two runs with the same --seed
    # start from different adapters.
    set_seed(cfg.seed)
    model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                     target_modules=cfg.lora_target_modules,
                     gradient_checkpointing=cfg.gradient_checkpointing)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA r=%d alpha=%d dropout=%g on %s: %.2fM trainable of %.1fM parameters",
                cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
                trainable / 1e6, total / 1e6)
    return model


def sample_generator(cfg: Any, tokenizer, sample_prompts: list[dict]) -> Callable | None:
    """model -> the sample rows logged at each evaluation, or None without prompts."""
    if not sample_prompts:
        return None

    def sample_fn(model):
        gens = generate(model, tokenizer, [s["prompt"] for s in sample_prompts],
                        max_new_tokens=cfg.max_new_tokens, batch_size=len(sample_prompts))
        return [{"prompt_preview": s["prompt_preview"], "reference": s["reference"],
                 "generation": g.text, "ended_with_eos": g.ended_with_eos}
                for s, g in zip(sample_prompts, gens)]

    return sample_fn


def build_trainer(cfg: Any, run: RunSetup, model, tokenizer, *, train_rows: list[dict],
                  eval_rows: list[dict], sample_prompts: list[dict], run_config: RunConfig):
    """An SFTTrainer with the toolkit's callbacks, and the test-only faults when asked for."""
    from transformers import EarlyStoppingCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from llama_sft.training.callbacks import (
        CheckpointGuard,
        ConsumedIds,
        LineProgress,
        SampleGenerations,
    )
    from llama_sft.training.faults import FaultInjection
    from llama_sft.training.trainer import SFTTrainer

    args = build_training_args(cfg, run.output_dir, has_eval=bool(eval_rows), bf16=run.bf16,
                               fp16=run.fp16)
    backoff = bool(getattr(cfg, "auto_batch_backoff", False))
    if backoff and args.world_size > 1:
        raise RunSetupError("--auto-batch-backoff works in a single process only (each process "
                            "would split its micro-batches differently); leave it out and set "
                            "--batch-size / --gradient-accumulation-steps")
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=_as_dataset(train_rows),
        eval_dataset=_as_dataset(eval_rows) if eval_rows else None,
        data_collator=_collator(run, tokenizer),
        processing_class=tokenizer, auto_batch_backoff=backoff,
        checkpoint_extras=lambda state: {
            RUN_CONFIG: run_config.to_dict(),
            RESUME_STATE: ResumeState(run_config.config_hash,
                                      run_config.dataset.get("dataset_hash"),
                                      state.global_step).to_dict()})
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    # First in line, so the numbers it adds to each log (tokens/s, perplexity) reach W&B too.
    trainer.callback_handler.callbacks.insert(0, LineProgress(run.output_dir, trainer))
    trainer.add_callback(CheckpointGuard(run.output_dir, cfg.save_total_limit, run.stop_flag))
    trainer.add_callback(SampleGenerations(run.output_dir,
                                           _sample_fn(cfg, trainer, tokenizer, sample_prompts),
                                           use_wandb=cfg.use_wandb))
    trainer.add_callback(ConsumedIds(run.output_dir, trainer))
    if args.load_best_model_at_end:
        trainer.add_callback(EarlyStoppingCallback(
            early_stopping_patience=cfg.early_stopping_patience))
    FaultInjection.from_env().attach(trainer)
    return trainer


def _collator(run: RunSetup, tokenizer):
    """Padding-free (one concatenated row per micro-batch) or padded to the longest row."""
    if run.padding_free:
        return PaddingFreeCollator(example_ids=True)
    return PadCollator(tokenizer.pad_token_id,
                       pad_to_multiple_of=8 if run.device == "cuda" else None, example_ids=True)


def _sample_fn(cfg: Any, trainer, tokenizer, sample_prompts: list[dict]) -> Callable | None:
    """sample_generator's function, or None under FSDP: rank 0 alone generates the samples,
    and each forward of a sharded model needs every process (rank 0 would wait forever)."""
    if trainer.is_fsdp_enabled and sample_prompts:
        logger.info("FSDP: no sample generations at evaluations (samples.jsonl); evaluate the "
                    "final adapter with llama_evaluate.py")
        return None
    return sample_generator(cfg, tokenizer, sample_prompts)


def _as_dataset(rows) -> TokenizedDataset:
    """Rows of the tokenized cache as they are; a list of rows (the pilot's) wrapped."""
    return rows if isinstance(rows, TokenizedDataset) else TokenizedDataset(rows)


def train(cfg: Any, run: RunSetup, trainer) -> tuple[Any, float]:
    """trainer.train() under the signal catcher; out of memory becomes a message that says
    what to change. Returns transformers' TrainOutput and the seconds it took."""
    t0 = time.perf_counter()
    with SignalCatcher(run.stop_flag):
        try:
            result = trainer.train(resume_from_checkpoint=str(run.resume_from)
                                   if run.resume_from else None)
        except BaseException as e:
            from llama_sft.training.trainer import is_out_of_memory

            if cfg.use_wandb:
                finish_wandb()
            if not is_out_of_memory(e):
                raise
            raise _out_of_memory_error(cfg, run, trainer) from None
    return result, time.perf_counter() - t0


def _out_of_memory_error(cfg: Any, run: RunSetup, trainer) -> TrainingError:
    newest = latest_good_checkpoint(run.output_dir) if is_main_process() else None
    return TrainingError(
        f"out of memory at step {trainer.state.global_step + 1} (micro-batch of "
        f"{trainer.micro_batch_limit or cfg.batch_size} rows, --max-length {cfg.max_length}). "
        f"What was written is intact (newest complete checkpoint: "
        f"{newest.name if newest else 'none'}). To fit: lower --batch-size and raise "
        "--gradient-accumulation-steps to keep the effective batch (or add "
        "--auto-batch-backoff, which does that on its own and can continue this run with "
        "--resume auto), use --use-4bit, add --gradient-checkpointing, or lower --max-length")


def finish(cfg: Any, run: RunSetup, trainer, result, elapsed: float, *, stage: str,
           has_eval: bool) -> dict[str, Any]:
    """train_results fields: status, steps, losses, throughput, memory, best checkpoint, the
    final evaluation; "model" holds the trained model, "adapter_state_dict" its gathered adapter
    under FSDP, "exit_code" a signal's exit status."""
    state, args, signum = trainer.state, trainer.args, run.stop_flag.get("signal")
    early_stopped = (args.load_best_model_at_end and state.global_step < state.max_steps
                     and signum is None)
    status = ("completed" if signum is None and not early_stopped else "early stopped"
              if signum is None else f"interrupted by {signal.Signals(signum).name}")
    final_eval = _final_evaluation(trainer) if has_eval and signum is None else {}
    steps = max(state.global_step - run.start_step, 1)
    results: dict[str, Any] = {
        "stage": stage, "status": status, "global_step": state.global_step,
        "max_steps": state.max_steps, "epochs": round(state.epoch or 0, 4),
        "train_loss": round(result.training_loss, 6),
        "train_runtime_seconds": round(elapsed, 2),
        "tokens_seen": trainer.tokens_seen,
        "supervised_tokens_seen": trainer.supervised_tokens_seen,
        "tokens_per_second": round(trainer.tokens_seen / max(elapsed, 1e-9), 2),
        "supervised_tokens_per_second": round(trainer.supervised_tokens_seen
                                              / max(elapsed, 1e-9), 2),
        "seconds_per_step": round(elapsed / steps, 4),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "best_checkpoint": state.best_model_checkpoint, "best_eval_loss": state.best_metric,
        "early_stopped": bool(early_stopped),
        "resumed_from": str(run.resume_from) if run.resume_from else None,
        "kernels": run.kernels,
    }
    if final_eval:
        results["eval_loss"] = round(final_eval["eval_loss"], 6)
        results["eval_perplexity"] = round(perplexity(final_eval["eval_loss"]), 4)
    results["model"] = trainer.model
    if trainer.is_fsdp_enabled and signum is None:
        from llama_sft.training.trainer import full_adapter_state_dict

        # Sharded: every process joins the gather; finish_outputs saves rank 0's copy.
        results["adapter_state_dict"] = full_adapter_state_dict(trainer)
    if cfg.use_wandb:
        finish_wandb()
    if signum is not None:
        results["exit_code"] = EXIT_INTERRUPTED[signum]
    return results


def _final_evaluation(trainer) -> dict[str, Any]:
    last = [h for h in trainer.state.log_history if "eval_loss" in h]
    if (last and last[-1].get("step") == trainer.state.global_step
            and not trainer.args.load_best_model_at_end):
        return last[-1]  # already evaluated at the last step
    return trainer.evaluate()


def run_sft(cfg: Any, *, output_dir: Path, train_rows: list[dict], eval_rows: list[dict],
            sample_prompts: list[dict], run_config: RunConfig, tokenizer, model=None,
            stage: str = "train", on_trainer: Callable | None = None) -> dict[str, Any]:
    """Train a LoRA adapter and write the output layout; returns what it measured.

    `sample_prompts`: [{prompt (rendered), prompt_preview, reference}] generated at each eval.
    `model`: a prepared base (unwrapped) model, or None to load run_config.base_model.
    `on_trainer(trainer)` runs before training starts (tests and benchmarks add callbacks)."""
    run = setup(cfg, output_dir, run_config)
    model = prepare_model(cfg, run, run_config.base_model, model)
    trainer = build_trainer(cfg, run, model, tokenizer, train_rows=train_rows,
                            eval_rows=eval_rows, sample_prompts=sample_prompts,
                            run_config=run_config)
    maybe_compile(cfg, run, trainer, len(train_rows))
    if on_trainer is not None:
        on_trainer(trainer)
    result, elapsed = train(cfg, run, trainer)
    if run.torch_compile:  # the final evaluation and any generation after it run eager
        from llama_sft.modeling.compile import uncompile

        uncompile(model)
    return finish(cfg, run, trainer, result, elapsed, stage=stage, has_eval=bool(eval_rows))
