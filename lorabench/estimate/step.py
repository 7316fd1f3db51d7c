"""Training steps on the meta device under the tensor tracker: the same calls a case makes.

The Trainer is built by :func:`lorabench.training.make_trainer` (so the optimizer, its
parameter groups and bitsandbytes' 32-bit override for embeddings are the real ones),
and each step repeats :meth:`lorabench.training.StepRunner.step`: the batch of every
micro-batch, ``Trainer.training_step`` (forward, loss, backward), gradient clipping,
the optimizer and scheduler steps, and ``zero_grad``.

One step is tracked, after an untracked optimizer step on zero gradients has created the
optimizer state: a real run's peak comes in its second step or later, when the state
exists from the start (the first step only creates it, on the way to the same peak).

The batch is full length (no padding) and carries no attention mask into the model: a
mask of ones is what a padding-free batch has, and transformers reads its values, which
meta tensors do not have. The mask tensor is still allocated, as the collator does.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorabench.config import BenchConfig
from lorabench.estimate.device import emulate, use_foreach
from lorabench.estimate.allocator import AllocationLog
from lorabench.tensor_tracker import TensorPeak
from lorabench.training import MAX_GRAD_NORM, make_trainer


def _trainer(model, config: BenchConfig, target: str):
    import torch

    if getattr(model, "hf_device_map", None) is None:
        # The Trainer moves an unquantized model to its device, which a meta model cannot do; a
        # model with a device map stays where it is.
        model.hf_device_map = {"": "meta"}
    trainer = make_trainer(model, None, [], None, config, torch.device("cpu"))
    trainer._prepare_inputs = lambda inputs: inputs  # already on the meta device
    use_foreach(trainer.optimizer, target)
    return trainer


def _batch(batch_size: int, seq_len: int) -> tuple[dict, object]:
    import torch

    ids = torch.empty(batch_size, seq_len, dtype=torch.long, device="meta")
    mask = torch.empty(batch_size, seq_len, dtype=torch.long, device="meta")
    labels = torch.empty(batch_size, seq_len, dtype=torch.long, device="meta")
    return {"input_ids": ids, "labels": labels}, mask


def _step(trainer, model, config: BenchConfig, batch_size: int, seq_len: int) -> None:
    import torch

    micro = [_batch(batch_size, seq_len) for _ in range(config.grad_accum)]
    batches = [inputs for inputs, _ in micro]
    num_items = trainer._get_num_items_in_batch(batches, torch.device("meta"))
    trainer.current_gradient_accumulation_steps = len(batches)
    for inputs in batches:
        trainer.training_step(model, inputs, num_items)
    trainer.accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    model.zero_grad(set_to_none=True)


def _create_optimizer_state(trainer, model) -> None:
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    model.zero_grad(set_to_none=True)


@dataclass
class TrackedStep:
    """One tracked training step.

    Attributes:
        phases: the highest live tensor bytes of each phase (forward, backward, optimizer), with their parts.
        events: every allocation and free in order (:class:`lorabench.estimate.allocator.AllocationLog`).
        state_events: how many of ``events`` are the model state alive before the step.
        managed_bytes: tensor bytes in CUDA managed memory (paged optimizer state), outside the allocator.
    """

    phases: dict[str, TensorPeak]
    events: list[tuple[int, int | None]]
    state_events: int
    managed_bytes: int = 0


def track_training(model, config: BenchConfig, *, batch_size: int, seq_len: int, target: str,
                   trainer=None) -> TrackedStep:
    """Track one training step of a meta model whose optimizer state exists.

    Args:
        model: from :func:`lorabench.estimate.build.meta_model`.
        config: the case's configuration (optimizer, accumulation, checkpointing are read from it).
        batch_size: rows per micro-batch.
        seq_len: tokens per row.
        target: ``cpu`` or ``cuda``: whose kernels the meta run stands for.
        trainer: from :func:`prepared_trainer` for this model, to predict another shape without a new build.

    Returns:
        The step's phase peaks and its allocations in order.
    """
    trainer = trainer or prepared_trainer(model, config, target)
    tracker = AllocationLog(model, trainer.optimizer)
    state_events = len(tracker.events)
    try:
        with emulate(target), tracker:
            _step(trainer, model, config, batch_size, seq_len)
        return TrackedStep(tracker.phase_peaks(), tracker.events, state_events, tracker.managed_bytes)
    finally:
        tracker.close()


def prepared_trainer(model, config: BenchConfig, target: str):
    """The Trainer of a meta model whose optimizer state exists: what every tracked step starts from."""
    trainer = _trainer(model, config, target)
    with emulate(target):  # the optimizer's state takes the target's layout too (bitsandbytes' paged buffers)
        _create_optimizer_state(trainer, model)
    return trainer
