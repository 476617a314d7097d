"""TODO docstring"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from llama_sft.data.batching import GroupedLengthSampler, TokenizedDataset
from llama_sft.errors import NonFiniteLossError, NonFiniteWeightsError
from llama_sft.files import write_json_atomic
from llama_sft.modeling.loss import fusable_head, supervised_cross_entropy
from llama_sft.training.checkpoints import finalize_checkpoint, staging_dir
from llama_sft.training.faults import FaultInjection

logger = logging.getLogger("llama_sft")


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA and others), or the CPU allocator's failure, which torch
    raises as a plain RuntimeError."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def split_micro_batch(inputs: dict[str, Any], rows: int,
                      pad_to_multiple_of: int | None = None) -> list[dict[str, Any]]:
    """A collated batch cut into parts of at most `rows` rows, each cut to its own longest row
    (right padding: the columns dropped are padding only)."""
    n = int(inputs["input_ids"].shape[0])
    if rows >= n:
        return [inputs]
    parts = []
    for start in range(0, n, rows):
        part = {k: v[start:start + rows] for k, v in inputs.items()}
        mask = part.get("attention_mask")
        if mask is not None:
            width = int(mask.sum(dim=1).max())
            if pad_to_multiple_of:
                m = pad_to_multiple_of
                width = min((width + m - 1) // m * m, int(mask.shape[1]))
            part = {k: v[:, :width] if getattr(v, "dim", lambda: 0)() == 2 else v
                    for k, v in part.items()}
        parts.append(part)
    return parts


@contextlib.contextmanager
def _input_cast_off(layers):
    saved = [m.cast_input_dtype_enabled for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m, v in zip(layers, saved):
            m.cast_input_dtype_enabled = v


def make_trainer_class():
    """Our Trainer subclass, built lazily so importing this module stays cheap."""
    import torch
    import torch.nn.functional as F
    from transformers import Trainer


    class SFTTrainer(Trainer):
        """Loss at supervised positions only; counts processed and supervised tokens."""

        tokens_seen = 0
        supervised_tokens_seen = 0
        nan_check_step_offset = 0
        loss_hook: Callable[[Any, int], Any] | None = None  # test hook: (loss, step) -> loss

        def _final_norm(self, model):
            base = model
            for attr in ("module",):  # DDP wrapper
                base = getattr(base, attr, base)
            if hasattr(base, "get_base_model"):
                base = base.get_base_model()
            inner = getattr(base, "model", None)
            norm = getattr(inner, "norm", None)
            head = getattr(base, "lm_head", None)
            return norm, head

        def _keep_index(self, device):
            if getattr(self, "_keep", None) is None or self._keep.device != device:
                self._keep = torch.tensor([0], device=device)
            return self._keep

        def _no_lora_input_cast(self, model):
            """peft casts every LoRA input to the adapter's dtype (fp32) and autocast casts it
            back to bf16 for the matmul: under autocast the cast changes nothing but costs a
            copy per layer that autograd keeps. Off only while autocast is on. (peft's own
            helpers.disable_input_dtype_casting walks every module twice per call: 7.8 ms per
            micro-batch on the 135M model; the layer list here is found once.)"""
            if not torch.is_autocast_enabled(self.args.device.type):
                return contextlib.nullcontext()
            if getattr(self, "_tuner_layers", None) is None:
                from peft.tuners.tuners_utils import BaseTunerLayer

                self._tuner_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)
                                      and hasattr(m, "cast_input_dtype_enabled")]
            return _input_cast_off(self._tuner_layers)

        def _get_train_sampler(self, train_dataset=None):
            ds = train_dataset if train_dataset is not None else self.train_dataset
            if (self.args.train_sampling_strategy != "group_by_length"
                    or not isinstance(ds, TokenizedDataset)):
                return super()._get_train_sampler(train_dataset)
            # Grouped by the global batch (all processes, all micro-batches of a step), so
            # every process count draws the same rows for each optimizer step: accelerate hands
            # consecutive per-process batches to consecutive processes.
            return GroupedLengthSampler(
                [len(r["input_ids"]) for r in ds.rows],
                self.args.train_batch_size * self.args.gradient_accumulation_steps
                * max(1, self.args.world_size))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            mask = inputs.get("attention_mask")
            self.tokens_seen += int(mask.sum()) if mask is not None else labels.numel()
            shift_labels = labels[:, 1:]
            supervised = shift_labels != -100
            n_sup = int(supervised.sum())
            self.supervised_tokens_seen += n_sup
            norm, head = self._final_norm(model)
            if norm is None or head is None or self.is_fsdp_enabled:
                # Generic path (FSDP shards the head outside forward): the model's own loss.
                outputs = model(input_ids=inputs["input_ids"], attention_mask=mask, labels=labels,
                                use_cache=False)
                loss = outputs.loss
            else:
                captured = {}

                def grab(_module, _inp, out):
                    captured["h"] = out

                handle = norm.register_forward_hook(grab)
                try:
                    with self._no_lora_input_cast(model):
                        # The model's own head runs on one position only (a tensor index, so
                        # the slice is a contiguous copy: a 1-long view of [B, T, H] makes the
                        # head copy its whole weight per row); ours runs on the supervised
                        # positions below.
                        model(input_ids=inputs["input_ids"], attention_mask=mask, use_cache=False,
                              logits_to_keep=self._keep_index(labels.device))
                finally:
                    handle.remove()
                hidden = captured["h"][:, :-1][supervised]
                denom = num_items_in_batch if num_items_in_batch is not None else max(n_sup, 1)
                scale = 1.0 / float(denom)
                if (self.args.average_tokens_across_devices and num_items_in_batch is not None
                        and self.accelerator.num_processes > 1):
                    scale *= self.accelerator.num_processes
                if fusable_head(head):
                    loss = supervised_cross_entropy(hidden, head.weight, shift_labels[supervised],
                                                    scale=scale)
                else:
                    logits = head(hidden).float()
                    loss = F.cross_entropy(logits, shift_labels[supervised],
                                           reduction="sum") * scale
            if self.loss_hook is not None and model.training:
                loss = self.loss_hook(loss, self.state.global_step + 1)
            if model.training and not torch.isfinite(loss.detach()).all():
                raise NonFiniteLossError(
                    f"the loss became {float(loss.detach())} at step {self.state.global_step + 1}; "
                    "the run stopped before that step's update, so no checkpoint holds a "
                    "non-finite tensor. Lower --learning-rate, check the data, or avoid fp16.")
            return (loss, {"loss": loss}) if return_outputs else loss

        # -- Fault tolerance: consumed ids, out-of-memory back-off, atomic checkpoints ----------
        # run_sft sets these; the class defaults leave a bare SFTTrainer (tests, benchmarks) as is.
        auto_batch_backoff: bool = False
        micro_batch_limit: int | None = None  # rows per micro-batch after an out-of-memory back-off
        checkpoint_extras: Callable[[Any], dict[str, Any]] | None = None  # state -> {file: JSON}
        faults: FaultInjection = FaultInjection()

        def pop_consumed_ids(self) -> list[str]:
            """The ids of the examples consumed since the last call (one optimizer step)."""
            ids, self._consumed = getattr(self, "_consumed", []), []
            return ids

        def training_step(self, model, inputs, num_items_in_batch=None):
            """One micro-batch; records its example ids. With auto_batch_backoff, an out-of-memory
            error rolls the micro-batch back and splits it into halves run as extra accumulation,
            down to one row; the smaller size is kept for the rest of the run. The update is the
            same: the loss is normalised by num_items_in_batch (the supervised tokens of the whole
            optimizer step), so the halves' gradients sum to the whole micro-batch's."""
            ids = inputs.pop("example_ids", None)
            if ids is not None:
                self._consumed = getattr(self, "_consumed", []) + list(ids)
            if not self.auto_batch_backoff:
                return self._micro_step(model, inputs, num_items_in_batch)
            rows = int(inputs["input_ids"].shape[0])
            if num_items_in_batch is None:
                # Pin the normaliser to the whole micro-batch's (mean over its supervised tokens,
                # divided by the accumulation steps) so that the parts add up to it.
                n_sup = int((inputs["labels"][..., 1:] != -100).sum())
                num_items_in_batch = max(n_sup, 1) * self.current_gradient_accumulation_steps
            while True:
                size = min(self.micro_batch_limit or rows, rows)
                saved = self._detach_grads(model)
                counters = (self.tokens_seen, self.supervised_tokens_seen)
                try:
                    total = None
                    for part in split_micro_batch(
                            inputs, size, getattr(self.data_collator, "pad_to_multiple_of", None)):
                        loss = self._micro_step(model, part, num_items_in_batch)
                        total = loss if total is None else total + loss
                    out_of_memory = False
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    if not is_out_of_memory(e):
                        raise
                    out_of_memory = True
                # Outside the except block, so the failed attempt's tensors are freed first.
                self._reattach_grads(saved, keep_new=not out_of_memory)
                if not out_of_memory:
                    return total
                self.tokens_seen, self.supervised_tokens_seen = counters
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if size <= 1:
                    raise torch.OutOfMemoryError(
                        f"out of memory at step {self.state.global_step + 1} even with "
                        "micro-batches of one row")
                self.micro_batch_limit = (size + 1) // 2
                logger.warning(
                    "out of memory at step %d on a micro-batch of %d rows: retrying it as "
                    "micro-batches of %d rows (extra gradient accumulation, same effective batch)"
                    " and keeping that size for the rest of the run", self.state.global_step + 1,
                    size, self.micro_batch_limit)

        def _micro_step(self, model, inputs, num_items_in_batch):
            handle = None
            limit = self.faults.oom_rows_limit(self.state.global_step + 1)
            if limit is not None and inputs["input_ids"].shape[0] > limit:
                handle = self._arm_simulated_oom(model)
            try:
                return super().training_step(model, inputs, num_items_in_batch)
            finally:
                if handle is not None:
                    handle.remove()

        @staticmethod
        def _arm_simulated_oom(model):
            """Test hook (LLAMA_SFT_TEST_OOM): fail when the backward pass reaches the first
            trainable tensor, the last gradient it computes, so the later layers' gradients have
            already been accumulated: what a real out-of-memory error in backward leaves."""
            first = next(p for p in model.parameters() if p.requires_grad)

            def fail(_grad):
                raise torch.OutOfMemoryError("simulated out of memory (LLAMA_SFT_TEST_OOM)")

            return first.register_hook(fail)

        @staticmethod
        def _detach_grads(model) -> list[tuple[Any, Any]]:
            """Set the accumulated gradients aside, so a failed micro-batch can be dropped."""
            saved = []
            for p in model.parameters():
                if p.requires_grad:
                    saved.append((p, p.grad))
                    p.grad = None
            return saved

        @staticmethod
        def _reattach_grads(saved: list[tuple[Any, Any]], *, keep_new: bool) -> None:
            """Add the micro-batch's gradients to the ones set aside (the same sum autograd's
            accumulation makes), or drop them (keep_new=False)."""
            for p, before in saved:
                if not keep_new or p.grad is None:
                    p.grad = before
                elif before is not None:
                    before.add_(p.grad)
                    p.grad = before

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = {k: v for k, v in inputs.items() if k != "example_ids"}
            return super().prediction_step(model, inputs, prediction_loss_only,
                                           ignore_keys=ignore_keys)

        def _check_finite_weights(self, model, step: int) -> None:
            bad = [n for n, p in model.named_parameters()
                   if p.requires_grad and not bool(torch.isfinite(p.detach()).all())]
            count = len(bad)
            if self.accelerator.num_processes > 1:  # sharded weights: every process must agree
                count = int(self.accelerator.reduce(
                    torch.tensor(count, device=self.args.device), reduction="sum"))
            if count:
                first = f" (first: {bad[0]})" if bad else ""
                raise NonFiniteWeightsError(
                    f"trainable weights became NaN or inf by step {step}{first}; the checkpoint "
                    f"of step {step} was not written and the earlier ones are untouched. Lower "
                    "--learning-rate, check the data, or avoid fp16.")

        def _save_checkpoint(self, model, trial):
            """transformers' checkpoint (same files, same trainer state), written atomically:
            into .checkpoint-N.tmp/, then run_config.json and resume_state.json, every file
            fsynced, the sha256 manifest last, then renamed to checkpoint-N/. A kill at any
            moment leaves either the complete checkpoint or no folder of that name."""
            from transformers.trainer import TRAINER_STATE_NAME
            from transformers.trainer_callback import ExportableState
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy

            step = self.state.global_step
            self._check_finite_weights(model, step)
            run_dir = Path(self._get_output_dir(trial=trial))
            final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            staging = staging_dir(final)
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            if self.hp_search_backend is None and trial is None:
                self.store_flos()
            self.save_model(str(staging), _internal_call=True)
            delay = self.faults.save_delay_at(step)
            if delay and self.args.should_save:
                logger.warning("test hook LLAMA_SFT_TEST_SAVE_DELAY: pausing %g s in the middle "
                               "of writing %s", delay, staging)
                time.sleep(delay)
            if (self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH,
                                            SaveStrategy.BEST) and self.state.best_global_step):
                # Recorded under its final name (the trainer state is written before the rename).
                best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}"
                if self.state.best_global_step == step or best.is_dir():
                    self.state.best_model_checkpoint = str(best)
            if not self.args.save_only_model:
                self._save_optimizer_and_scheduler(str(staging))
                self._save_scaler(str(staging))
                self._save_rng_state(str(staging))
            if self.args.should_save:
                for cb in [c for c in self.callback_handler.callbacks + [self.control]
                           if isinstance(c, ExportableState)]:
                    name, cb_state = cb.__class__.__name__, cb.state()
                    if isinstance(self.state.stateful_callbacks[name], list):
                        self.state.stateful_callbacks[name].append(cb_state)
                    else:
                        self.state.stateful_callbacks[name] = cb_state
                self.state.save_to_json(str(staging / TRAINER_STATE_NAME))
                extras = self.checkpoint_extras(self.state) if self.checkpoint_extras else {}
                for name, obj in extras.items():
                    write_json_atomic(staging / name, obj)
            self.accelerator.wait_for_everyone()  # every process's files are in the folder
            if self.args.should_save:
                finalize_checkpoint(staging, final)
            self.accelerator.wait_for_everyone()
            if self.args.push_to_hub:
                self._push_from_checkpoint(str(final))

    SFTTrainer.model_accepts_loss_kwargs = True
    return SFTTrainer
