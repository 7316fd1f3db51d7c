"""Training steps on the meta device under the tensor tracker: the same calls a case makes.

The Trainer is built by :func:`lorabench.training.loop.make_trainer` (so the optimizer, its
parameter groups and bitsandbytes' 32-bit override for embeddings are the real ones),
and each step repeats :meth:`lorabench.training.loop.StepRunner.step`: the batch of every
micro-batch, ``Trainer.training_step`` (forward, loss, backward), gradient clipping,
the optimizer and scheduler steps, and ``zero_grad``.

One step is tracked, after an untracked optimizer step on zero gradients has created the
optimizer state: a real run's peak comes in its second step or later, when the state
exists from the start (the first step only creates it, on the way to the same peak).

The batch is full length (no padding) and carries no attention mask into the model: a
mask of ones is what a padding-free batch has, and transformers reads its values, which
meta tensors do not have. The mask tensor is still allocated, as the collator does.

Most of a tracked step's time is torch's meta kernels, written in Python (``torch._refs`` and
``torch._prims``): a few hundred microseconds an operator, and every call with the same input
shapes computes the same output shapes again (each decoder layer repeats the one before, the
checkpointed forward pass runs twice, the three-layer run of an extrapolated prediction repeats
the two-layer one, and every probe of ``fit``'s size search repeats the optimizer step).
:class:`MetaKernelCache` answers such a call from what the first one returned: fresh meta tensors
of the same shapes, strides and storage sizes, or for an in-place operator the argument it returns.
The tracker above it sees the same storages born and freed in the same order, so every figure is
the one the kernels give (``tests/test_estimate.py`` compares cached and uncached steps).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lorabench.config import BenchConfig
from lorabench.estimate.device import emulate, use_foreach
from lorabench.estimate.allocator import AllocationLog
from lorabench.meters.tensor_tracker import TensorPeak
from lorabench.training.loop import MAX_GRAD_NORM, make_trainer

CACHE_KERNELS = True  # False: every operator runs its meta kernel (the cache's own check)
KERNEL_CACHE_ENTRIES = 50_000  # the cache is emptied past this many input signatures
_KERNEL_OUTPUTS: dict = {}  # input signature -> what the meta kernel returned (see MetaKernelCache)
_CALL_KINDS: dict = {}  # operator -> "fresh", "inplace" or None (run it every time)
_PLAIN_VALUES = frozenset({int, float, bool, str, type(None)})  # an output that is not a tensor
# argument types compared by value (exact types: a subclass may compare otherwise)
_BY_VALUE = _PLAIN_VALUES | {torch.dtype, torch.device, torch.layout, torch.memory_format}


class _Uncacheable(Exception):
    """An argument or an output the cache does not reproduce exactly: the kernel runs."""


class _Aliases(_Uncacheable):
    """An output shares a storage with an input though the schema does not say so (``aten._unsafe_view``):
    the operator is run every time from then on."""


def _call_kind(func) -> str | None:
    """How the cache may answer ``func``: ``fresh`` (its outputs are new storages), ``inplace`` (it writes
    arguments in place and returns them, or nothing), or None (views, ``out=`` variants, resizes,
    data-dependent shapes, operators outside aten and prims: always run)."""
    kind = _CALL_KINDS.get(func, False)
    if kind is not False:
        return kind
    kind = None
    schema, tags = func._schema, set(func.tags)
    skip = {torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape, torch.Tag.inplace_view}
    if func.namespace in ("aten", "prims") and not tags & skip:
        written = [a for a in schema.arguments if a.alias_info is not None]
        returned = [r.alias_info for r in schema.returns]
        if not schema.is_mutable and not written and not any(returned):
            kind = "fresh"
        elif (torch.Tag.inplace in tags and written
              and all(a.alias_info.is_write and not a.kwarg_only for a in written)
              and all(r is not None and r.is_write for r in returned)):
            kind = "inplace"
    _CALL_KINDS[func] = kind
    return kind


class _Fresh:
    """A new meta tensor's layout: shape, strides, storage offset, dtype and storage bytes."""

    __slots__ = ("shape", "stride", "offset", "dtype", "nbytes", "plain")

    def __init__(self, t) -> None:
        self.shape, self.stride, self.offset, self.dtype = t.shape, t.stride(), t.storage_offset(), t.dtype
        self.nbytes = t.untyped_storage().nbytes()
        # what empty_strided allocates for this shape and stride
        natural = 0 if 0 in self.shape else (1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride)))
        self.plain = self.offset == 0 and self.nbytes == natural * t.element_size()

    def make(self):
        if self.plain:
            return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device="meta")
        out = torch.empty(0, dtype=self.dtype, device="meta")
        return out.set_(torch.UntypedStorage(self.nbytes, device="meta"), self.offset, self.shape, self.stride)


class MetaKernelCache(TorchDispatchMode):
    """A dispatch mode under the tracker that answers a meta kernel's call from an earlier call with the
    same operator, input layouts (dtype, shape, strides, offset, ``requires_grad``) and other arguments.

    A call it does not reproduce exactly runs its kernel every time: an input that is not a plain meta
    tensor, an argument it cannot compare (a generator, a callable), an output that shares storage with
    an input or another output, an in-place call that changed an argument's layout, and operators whose
    outputs alias their inputs (views), resize them, or take their shape from data (:func:`_call_kind`).
    Like torch's own ``FakeTensorMode`` cache it trusts the operator's schema: an output the schema does
    not mark as an alias is a new storage. Enter it before the tracker, so the tracker sees every call
    first (``with cache, tracker:``).

    Args:
        store: input signature -> output, shared by every mode made with the same dict (default: the
            module's, so every prediction in the process shares it).
    """

    def __init__(self, store: dict | None = None) -> None:
        super().__init__()
        self.store = _KERNEL_OUTPUTS if store is None else store
        self.hits = self.misses = self.bypassed = 0
        self._by_value = _BY_VALUE
        self._tensor = torch.Tensor
        self._plain_dispatch = torch.Tensor.__torch_dispatch__
        self._strided = torch.strided
        self._default_dtype = torch.get_default_dtype

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in a dynamo guard per call unless told not to; nothing
        # here is compiled (meta runs never reach torch.compile), and the guard costs a few microseconds
        # of every operator call
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = _CALL_KINDS.get(func, False)
        if kind is False:
            kind = _call_kind(func)
        if kind is not None:
            tensors: list = []
            key = [func, self._default_dtype()]
            inplace = kind == "inplace"
            try:
                self._add(args, key, tensors, inplace)
                if kwargs:
                    self._add(tuple(kwargs.items()), key, tensors, inplace)
            except _Uncacheable:
                key = None
            if key is not None:
                key = tuple(key)
                entry = self.store.get(key)
                if entry is not None:
                    self.hits += 1
                    return _replay(entry, tensors)
                self.misses += 1
                return self._run_and_keep(func, kind, key, args, kwargs or {}, tensors)
        self.bypassed += 1
        return func(*args, **(kwargs or {}))

    def _add(self, values, key: list, tensors: list, inplace: bool) -> None:
        """Append the signature of each of ``values`` (a tuple or list) to ``key``, and its tensors to ``tensors``.

        An in-place call returns its arguments whatever the floating-point scalars it is given (AdamW's
        step sizes change every step): those count by type only. Integers count by value (dimensions, sizes).
        """
        key.append((type(values), len(values)))
        for value in values:
            kind = type(value)
            if kind in self._by_value:
                # 1, 1.0 and True are equal keys otherwise
                key.append((kind,) if inplace and kind is float else (kind, value))
            elif kind is tuple or kind is list:
                self._add(value, key, tensors, inplace)
            elif isinstance(value, self._tensor):
                # a plain strided meta tensor; not complex, so no conjugate or negative bit to compare
                if (kind.__torch_dispatch__ is not self._plain_dispatch or not value.is_meta
                        or value.layout is not self._strided or value.dtype.is_complex):
                    raise _Uncacheable
                tensors.append(value)
                key.append((value.dtype, value.shape, value.stride(), value.storage_offset(), value.requires_grad))
            else:
                raise _Uncacheable

    def _run_and_keep(self, func, kind: str, key: tuple, args, kwargs, tensors: list):
        before = [_layout(t) for t in tensors] if kind == "inplace" else None
        out = func(*args, **kwargs)
        try:
            entry = _entry(out, tensors, {t.untyped_storage()._cdata for t in tensors}, kind == "inplace")
            if before is not None and before != [_layout(t) for t in tensors]:
                raise _Uncacheable  # the call changed an argument's layout: not a pure function of it
        except _Aliases:
            _CALL_KINDS[func] = None
            return out
        except _Uncacheable:
            return out
        if len(self.store) >= KERNEL_CACHE_ENTRIES:
            self.store.clear()
        self.store[key] = entry
        return out


def _layout(t) -> tuple:
    return t.shape, t.stride(), t.storage_offset(), t.untyped_storage().nbytes()


def _entry(out, inputs: list, storages: set, inplace: bool):
    """What :func:`_replay` needs to give ``out`` again: for each output tensor its layout (a new storage)
    or, for an in-place call, the input it is. Raises :class:`_Uncacheable` for anything else.

    ``storages`` holds the storages (``_cdata``) of the inputs and of the outputs seen so far; a plain
    recursive function and no closure, so that no reference cycle keeps a tensor alive past its time
    (the tracker would see it freed late, at the next garbage collection)."""
    if isinstance(out, torch.Tensor):
        if inplace:
            for i, t in enumerate(inputs):
                if t is out:
                    return ("input", i)
            raise _Uncacheable
        if type(out) is not torch.Tensor or not out.is_meta or out.layout is not torch.strided or out.dtype.is_complex:
            raise _Uncacheable
        storage = out.untyped_storage()._cdata
        if storage in storages:  # an alias of an input or of another output
            raise _Aliases
        storages.add(storage)
        return _Fresh(out)
    if type(out) is tuple or type(out) is list:
        return (type(out), [_entry(v, inputs, storages, inplace) for v in out])
    if type(out) in _PLAIN_VALUES:
        return ("value", out)
    raise _Uncacheable


def _replay(entry, inputs: list):
    if type(entry) is _Fresh:
        return entry.make()
    kind, body = entry
    if kind == "input":
        return inputs[body]
    if kind == "value":
        return body
    return kind(_replay(v, inputs) for v in body)


def _trainer(model, config: BenchConfig, target: str):
    if getattr(model, "hf_device_map", None) is None:
        # The Trainer moves an unquantized model to its device, which a meta model cannot do; a
        # model with a device map stays where it is.
        model.hf_device_map = {"": "meta"}
    trainer = make_trainer(model, None, [], None, config, torch.device("cpu"))
    trainer._prepare_inputs = lambda inputs: inputs  # already on the meta device
    use_foreach(trainer.optimizer, target)
    return trainer


def _batch(batch_size: int, seq_len: int) -> tuple[dict, object]:
    ids = torch.empty(batch_size, seq_len, dtype=torch.long, device="meta")
    mask = torch.empty(batch_size, seq_len, dtype=torch.long, device="meta")
    labels = torch.empty(batch_size, seq_len, dtype=torch.long, device="meta")
    return {"input_ids": ids, "labels": labels}, mask


def _step(trainer, model, config: BenchConfig, batch_size: int, seq_len: int) -> None:
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
    kernels = MetaKernelCache() if CACHE_KERNELS else contextlib.nullcontext()
    try:
        with emulate(target), kernels, tracker:  # the cache under the tracker: the tracker sees every call
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
