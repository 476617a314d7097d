"""SFTTrainer: transformers' Trainer with the toolkit's loss, batching and fault tolerance.

Built on transformers' Trainer (accelerate underneath), so `accelerate launch` / `torchrun`
give DDP, FSDP and DeepSpeed; on CPUs FSDP needs enable_fsdp_on_cpu below, and the adapter of a
sharded model is gathered whole by full_adapter_state_dict. What the subclass adds, each
configured through its constructor:

- the LM head and cross-entropy run only at supervised positions (response tokens + EOS), in
  fp32, fused with the head where it can be (modeling/loss.py);
- batches grouped by length over the global batch (data/batching.py);
- processed and supervised token counters, and the example ids of each optimizer step;
- a stop on a non-finite loss naming the step, before that step's update;
- `auto_batch_backoff`: an out-of-memory micro-batch is retried as halves accumulated into the
  same step;
- atomic checkpoints (training/checkpoints.py), with `checkpoint_extras` written into each.

This module imports torch and transformers: import it inside the functions that train.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers import Trainer

from llama_sft.data.batching import GroupedLengthSampler, TokenizedDataset, packed_row_starts
from llama_sft.errors import NonFiniteLossError, NonFiniteWeightsError
from llama_sft.modeling.loss import fusable_head, supervised_cross_entropy
from llama_sft.training.checkpoints import save_checkpoint_atomically

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
    starts = packed_row_starts(inputs)
    if starts is not None:
        return _split_padding_free(inputs, rows, starts)
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


def _split_padding_free(inputs: dict[str, Any], rows: int,
                        starts: list[int]) -> list[dict[str, Any]]:
    """A padding-free batch cut between its rows, at most `rows` rows a part (each part's first
    label is its row's -100 separator)."""
    if rows >= len(starts):
        return [inputs]
    bounds = starts[::rows] + [int(inputs["input_ids"].shape[1])]
    return [{k: v[:, a:b] if getattr(v, "dim", lambda: 0)() == 2 else v
             for k, v in inputs.items()} for a, b in zip(bounds, bounds[1:])]


def micro_batch_rows(inputs: dict[str, Any]) -> int:
    """Examples in a collated batch: its rows, or the rows concatenated into a padding-free one."""
    starts = packed_row_starts(inputs)
    return len(starts) if starts is not None else int(inputs["input_ids"].shape[0])


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


class SFTTrainer(Trainer):
    """Loss at supervised positions only; counts processed and supervised tokens.

    auto_batch_backoff: on out of memory, retry a micro-batch as halves (single process).
    checkpoint_extras: state -> {file name: JSON object} written into every checkpoint."""

    model_accepts_loss_kwargs = True

    def __init__(self, *args: Any, auto_batch_backoff: bool = False,
                 checkpoint_extras: Callable[[Any], dict[str, Any]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.auto_batch_backoff = auto_batch_backoff
        self.checkpoint_extras = checkpoint_extras
        self.micro_batch_limit: int | None = None  # rows per micro-batch after a back-off
        self.tokens_seen = 0
        self.supervised_tokens_seen = 0
        self._consumed: list[list[str]] = []  # the example ids of each micro-batch
        self._keep: torch.Tensor | None = None
        self._tuner_layers: list[Any] | None = None
        self.compiled = False  # decoder layers compiled for training (recipe.maybe_compile)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if enable_fsdp_on_cpu(self.accelerator):
            self.is_fsdp_enabled = True

    def evaluate(self, *args, **kwargs):
        """With compiled decoder layers, evaluation and the sample generations its callbacks
        run go eager: their no-grad and KV-cache shapes would only add compiles."""
        if not self.compiled:
            return super().evaluate(*args, **kwargs)
        from llama_sft.modeling.compile import eager

        with eager():
            return super().evaluate(*args, **kwargs)

    # -- the loss --------------------------------------------------------------------------

    def _final_norm(self, model):
        base = getattr(model, "module", model)  # DDP wrapper
        if hasattr(base, "get_base_model"):
            base = base.get_base_model()
        norm = getattr(getattr(base, "model", None), "norm", None)
        return norm, getattr(base, "lm_head", None)

    def _keep_index(self, device):
        if self._keep is None or self._keep.device != device:
            self._keep = torch.tensor([0], device=device)
        return self._keep

    def _no_lora_input_cast(self, model):
        """peft casts every LoRA input to the adapter's dtype (fp32) and autocast casts it
        back to bf16 for the matmul: under autocast the cast changes nothing but costs a
        copy per layer that autograd keeps. Off only while autocast is on. (peft's own
        helpers.disable_input_dtype_casting walks every module twice per call; the layer list
        here is found once: bench/RESULTS.md.)"""
        if not torch.is_autocast_enabled(self.args.device.type):
            return contextlib.nullcontext()
        if self._tuner_layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._tuner_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)
                                  and hasattr(m, "cast_input_dtype_enabled")]
        return _input_cast_off(self._tuner_layers)

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        if (self.args.train_sampling_strategy != "group_by_length"
                or not isinstance(ds, TokenizedDataset)):
            return super()._get_train_sampler(train_dataset)
        # Grouped by the global batch (all processes, all micro-batches of a step), so every
        # process count draws the same rows for each optimizer step: accelerate hands
        # consecutive per-process batches to consecutive processes.
        return GroupedLengthSampler(
            ds.lengths,
            self.args.train_batch_size * self.args.gradient_accumulation_steps
            * max(1, self.args.world_size))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        mask = inputs.get("attention_mask")
        self.tokens_seen += int(mask.sum()) if mask is not None else labels.numel()
        shift_labels = labels[:, 1:]
        supervised = shift_labels != -100
        self.supervised_tokens_seen += int(supervised.sum())
        norm, head = self._final_norm(model)
        if norm is None or head is None or self.is_fsdp_enabled:
            # Generic path (FSDP shards the head outside forward): the model's own loss, summed
            # over the step's supervised tokens of every process and scaled as _supervised_loss
            # does (a per-process mean weighs processes, not tokens, and ignores accumulation).
            extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
            loss = model(input_ids=inputs["input_ids"], attention_mask=mask, labels=labels,
                         position_ids=inputs.get("position_ids"), use_cache=False, **extra).loss
            if (self.args.average_tokens_across_devices and num_items_in_batch is not None
                    and self.accelerator.num_processes > 1):
                loss = loss * self.accelerator.num_processes
        else:
            hidden = self._final_hidden(model, norm, inputs, mask, labels.device)
            loss = self._supervised_loss(hidden[:, :-1][supervised], head,
                                         shift_labels[supervised], num_items_in_batch)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _final_hidden(self, model, norm, inputs, mask, device):
        """The final norm's output, caught by a hook: the model's own head runs on one position
        only (a tensor index, so the slice is a contiguous copy: a 1-long view of [B, T, H] makes
        the head copy its whole weight per row); ours runs on the supervised positions."""
        captured = {}

        def grab(_module, _inp, out):
            captured["h"] = out

        handle = norm.register_forward_hook(grab)
        try:
            with self._no_lora_input_cast(model):
                # No cache: with one, transformers skips the padding-free rows' mask.
                model(input_ids=inputs["input_ids"], attention_mask=mask, use_cache=False,
                      position_ids=inputs.get("position_ids"),
                      logits_to_keep=self._keep_index(device))
        finally:
            handle.remove()
        return captured["h"]

    def _supervised_loss(self, hidden, head, targets, num_items_in_batch):
        denom = num_items_in_batch if num_items_in_batch is not None else max(len(targets), 1)
        scale = 1.0 / float(denom)
        if (self.args.average_tokens_across_devices and num_items_in_batch is not None
                and self.accelerator.num_processes > 1):
            scale *= self.accelerator.num_processes
        if fusable_head(head):
            return supervised_cross_entropy(hidden, head.weight, targets, scale=scale)
        return F.cross_entropy(head(hidden).float(), targets, reduction="sum") * scale

    # -- one micro-batch: consumed ids, non-finite loss, out-of-memory back-off -------------

    def pop_consumed_ids(self) -> list[list[str]]:
        """The example ids of each micro-batch this process consumed since the last call (one
        optimizer step)."""
        batches, self._consumed = self._consumed, []
        return batches

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One micro-batch; records its example ids. With auto_batch_backoff, an out-of-memory
        error rolls the micro-batch back and splits it into halves run as extra accumulation,
        down to one row; the smaller size is kept for the rest of the run. The update is the
        same: the loss is normalised by num_items_in_batch (the supervised tokens of the whole
        optimizer step), so the halves' gradients sum to the whole micro-batch's."""
        ids = inputs.pop("example_ids", None)
        if ids is not None:
            self._consumed.append(list(ids))
        if not self.auto_batch_backoff:
            return self._micro_step(model, inputs, num_items_in_batch)
        if num_items_in_batch is None:
            # Pin the normaliser to the whole micro-batch's (mean over its supervised tokens,
            # divided by the accumulation steps) so that the parts add up to it.
            n_sup = int((inputs["labels"][..., 1:] != -100).sum())
            num_items_in_batch = max(n_sup, 1) * self.current_gradient_accumulation_steps
        while True:
            total = self._try_in_parts(model, inputs, num_items_in_batch)
            if total is not None:
                return total

    def _micro_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            # Raised before the optimizer step: no update, and so no checkpoint, holds it.
            raise NonFiniteLossError(
                f"the loss became {float(loss)} at step {self.state.global_step + 1}; the run "
                "stopped before that step's update, so no checkpoint holds a non-finite "
                "tensor. Lower --learning-rate, check the data, or avoid fp16.")
        return loss

    def _try_in_parts(self, model, inputs, num_items_in_batch):
        """The micro-batch in parts of micro_batch_limit rows; None after an out-of-memory
        error (rolled back, the limit halved)."""
        rows = micro_batch_rows(inputs)
        size = min(self.micro_batch_limit or rows, rows)
        saved = _detach_grads(model)
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
        _reattach_grads(saved, keep_new=not out_of_memory)
        if not out_of_memory:
            return total
        self.tokens_seen, self.supervised_tokens_seen = counters
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if size <= 1:
            raise torch.OutOfMemoryError(f"out of memory at step {self.state.global_step + 1} "
                                         "even with micro-batches of one row")
        self.micro_batch_limit = (size + 1) // 2
        logger.warning(
            "out of memory at step %d on a micro-batch of %d rows: retrying it as micro-batches "
            "of %d rows (extra gradient accumulation, same effective batch) and keeping that "
            "size for the rest of the run", self.state.global_step + 1, size,
            self.micro_batch_limit)
        return None

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = {k: v for k, v in inputs.items() if k != "example_ids"}
        return super().prediction_step(model, inputs, prediction_loss_only,
                                       ignore_keys=ignore_keys)

    # -- checkpoints -------------------------------------------------------------------------

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

    def _run_epoch(self, *args: Any, **kwargs: Any):
        """transformers 5.24.0 checks max_steps only after a step, so a resume from a checkpoint
        at max_steps that ends mid-epoch trained one step too many (a run whose final-model save
        failed, or one stopped by a signal in its last step): such a resume trains nothing.
        tests/test_faults.py's final-model disk-full resume logs a ninth step without it."""
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _save_checkpoint(self, model, trial):
        """transformers' checkpoint, written atomically (training/checkpoints.py)."""
        self._check_finite_weights(model, self.state.global_step)
        extras = self.checkpoint_extras(self.state) if self.checkpoint_extras else {}
        save_checkpoint_atomically(self, model, trial, extras)


# accelerate's AcceleratorState.__init__ (accelerate/state.py) as of this version turns FSDP on
# only for accelerator device types (MULTI_GPU, MULTI_XPU, ...): under an FSDP launch on CPUs it
# drops the plugin and the run is plain DDP, with no message. torch's FSDP2 runs on CPU over gloo.
# tests/test_fsdp.py fails (no sharded checkpoint) if this stops turning FSDP on.
UPSTREAM_ACCELERATE_VERSION = "1.15.0"


def enable_fsdp_on_cpu(accelerator) -> bool:
    """Under `accelerate launch` with an FSDP config on CPU processes (gloo), turn on the FSDP
    that accelerate leaves off there: the plugin accelerate builds from the launch's environment,
    with its mixed precision set as accelerate does on a GPU. True when it did."""
    import os

    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true"
            or state.distributed_type != DistributedType.MULTI_CPU):
        return False
    plugin = FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    logger.info("FSDP%d on CPU processes (gloo): accelerate %s leaves FSDP off without a GPU; "
                "turned on", plugin.fsdp_version, UPSTREAM_ACCELERATE_VERSION)
    return True


def full_adapter_state_dict(trainer) -> dict[str, Any] | None:
    """Under FSDP, the trainable (LoRA) tensors gathered whole onto rank 0's CPU, the frozen
    base left sharded: every process must call it (it is a collective); None on the others."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state_dict = get_model_state_dict(trainer.model_wrapped, options=options)
    return state_dict if trainer.args.should_save else None


def _detach_grads(model) -> list[tuple[Any, Any]]:
    """Set the accumulated gradients aside, so a failed micro-batch can be dropped."""
    saved = []
    for p in model.parameters():
        if p.requires_grad:
            saved.append((p, p.grad))
            p.grad = None
    return saved


def _reattach_grads(saved: list[tuple[Any, Any]], *, keep_new: bool) -> None:
    """Add the micro-batch's gradients to the ones set aside (the same sum autograd's
    accumulation makes), or drop them (keep_new=False)."""
    for p, before in saved:
        if not keep_new or p.grad is None:
            p.grad = before
        elif before is not None:
            before.add_(p.grad)
            p.grad = before
