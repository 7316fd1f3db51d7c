"""Live tensor bytes during training steps, by category, on any device.

:class:`TensorTracker` is a ``TorchDispatchMode``: every operator call inside it passes
through :meth:`TensorTracker.__torch_dispatch__`, which registers the storages of the
call's outputs with a weak reference, so the tracker knows each storage's bytes from
the moment an operator returns it until Python frees it. The running sum of live
bytes, and its peak, are therefore exact tensor bytes (storage sizes, each storage
once), the same on CPU, CUDA, the meta device or under ``FakeTensorMode``.

The categories of the storages alive at the peak are settled when the tracker is read,
because what a tensor is often shows only later (an output of the backward pass
becomes a gradient; a tensor the optimizer creates becomes its state):

- ``params``: the model's parameters, quantized storage and quantization state included
  (what each layer's quantization backend stores: :func:`lorabench.backends.parameter_tensors`);
- ``buffers``: the model's registered buffers;
- ``grads``: ``.grad`` tensors of trainable parameters;
- ``optimizer``: the optimizer's state and any tensor held in its attributes;
- ``activations``: tensors created before a backward pass and still alive when it starts
  (what autograd saved for backward, the batch, the logits and the loss);
- ``temporaries``: everything else the steps created: forward intermediates freed before
  the backward pass, activation gradients, checkpoint recomputation, optimizer scratch.

torch's own ``torch.distributed._tools.mem_tracker.MemTracker`` works the same way, but
registers a gradient hook on every parameter (which fails on frozen ones, so on any
adapter) and categorizes a tensor once, when it is created; this tracker hooks only
trainable parameters and settles categories after the fact.

What it does not see: scratch memory inside a single operator (a kernel's workspace),
allocator rounding and caching, and tensors created outside the tracked steps that are
not the model's, the optimizer's or a parameter's gradient.
"""

from __future__ import annotations

import bisect
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from lorabench import backends
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

CATEGORIES = ("params", "buffers", "grads", "optimizer", "activations", "temporaries")
_FORWARD, _BACKWARD, _OPTIMIZER = "forward", "backward", "optimizer"
PHASES = (_FORWARD, _BACKWARD, _OPTIMIZER)


class _Storage:
    """What the tracker knows of one live (or once live) storage."""

    __slots__ = ("nbytes", "born", "died", "phase", "role", "ref")

    def __init__(self, nbytes: int, born: int, phase: str, role: str | None) -> None:
        self.nbytes = nbytes
        self.born = born
        self.died: int | None = None
        self.phase = phase
        self.role = role  # params, buffers, grads, optimizer; None until known (or never)
        self.ref: weakref.ref | None = None


@dataclass
class TensorPeak:
    """The peak of live tensor bytes and how it splits.

    Attributes:
        peak_bytes: the largest sum of live tensor bytes seen while tracking.
        components: bytes of each category (:data:`CATEGORIES`) at that moment; they sum to ``peak_bytes``.
        peak_phase: ``forward``, ``backward`` or ``optimizer``: where the peak happened.
        ops: operator calls seen.
        steps: tracked windows (training steps).
        storage_bytes: the size of each storage alive at the peak (an allocator rounds each one).
    """

    peak_bytes: int
    components: dict[str, int] = field(default_factory=dict)
    peak_phase: str = _FORWARD
    ops: int = 0
    steps: int = 0
    storage_bytes: list[int] = field(default_factory=list)


def model_state_tensors(model) -> tuple[list[Any], list[Any]]:
    """The model's parameters with their quantization state, and its buffers.

    Returns:
        ``(params, buffers)``: tensors owned by the model's modules; a quantized layer's packed
        weight and its quantization state (scales, code books) count as parameters.
    """

    params: list[Any] = []
    buffers: list[Any] = []
    for module in model.modules():
        params += backends.parameter_tensors(module)
        buffers += list(module.buffers(recurse=False))
    return params, buffers


def tensors_in(value: Any, _seen: set[int] | None = None) -> Iterable[Any]:
    """Every tensor inside ``value``: through dicts, lists, tuples, sets and object attributes.

    Used on optimizers, whose state and extra attributes are plain containers (bitsandbytes
    keeps its quantization maps in attributes of the optimizer).
    """
    seen = _seen if _seen is not None else set()
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v, seen)
    elif isinstance(value, (list, tuple, set)):
        for v in value:
            yield from tensors_in(v, seen)
    elif isinstance(value, torch.optim.Optimizer) or type(value).__name__ in ("AcceleratedOptimizer", "GlobalOptimManager"):
        yield from tensors_in(vars(value), seen)


def _storages(t) -> list[Any]:
    if is_traceable_wrapper_subclass(t):
        return list(get_untyped_storages(t))
    return [t.untyped_storage()]


class TensorTracker(TorchDispatchMode):
    """Track live tensor bytes by category while the model trains.

    Enter it around each training step to track (``with tracker: step()``); it may be
    entered any number of times. Storages created in one step and freed in a later,
    untracked one are still seen to go. Read the result with :meth:`peak`; call
    :meth:`close` when done, to drop hooks and weak references.

    Args:
        model: the model being trained; its parameters, buffers and quantization state are
            registered up front, and its trainable parameters get a hook that marks their gradients.
        optimizer: the optimizer (or ``None``); its state and attributes are counted as optimizer
            memory at the start and after every optimizer step.
        device: count only storages on this device type (``cpu``, ``cuda``, ``meta``); ``None``: all.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
    """

    def __init__(self, model, optimizer=None, device: str | None = None) -> None:
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"TensorTracker needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self._live: dict[int, _Storage] = {}
        self._op = 0
        self._total = 0
        # the highest total seen in each phase, at which operator, and what died since then (so the
        # storages alive at that moment can be named afterwards); the peak is the highest of them
        self._phase_peaks: dict[str, tuple[int, int]] = {}
        self._dead_since: dict[str, list[_Storage]] = {p: [] for p in PHASES}
        self._backward_starts: list[int] = []
        self._in_backward = False
        self._optimizer_depth = 0  # an accelerate-wrapped optimizer step runs the inner step inside the outer one
        self._steps = 0
        self._hooks: list[Any] = []
        self._closed = False
        self._register_model()
        self._register_optimizer()
        self._install_hooks()

    # ----- registration --------------------------------------------------------
    def _register(self, t, phase: str, role: str | None) -> None:
        if self.device is not None and t.device.type != self.device:
            return
        for st in _storages(t):
            rec = self._live.get(id(st))
            if rec is not None:
                size = st.nbytes()
                if size != rec.nbytes:  # resized in place (resize_, set_)
                    self._total += size - rec.nbytes
                    rec.nbytes = size
                if role is not None:
                    rec.role = role
                continue
            rec = _Storage(st.nbytes(), self._op, phase, role)
            key = id(st)
            rec.ref = weakref.ref(st, lambda _ref, key=key: self._free(key))
            self._live[key] = rec
            self._total += rec.nbytes

    def _free(self, key: int) -> None:
        rec = self._live.pop(key, None)
        if rec is None:
            return
        rec.died = self._op
        self._total -= rec.nbytes
        for phase, (_, op) in self._phase_peaks.items():
            if rec.born <= op:
                self._dead_since[phase].append(rec)

    def _register_model(self) -> None:
        params, buffers = model_state_tensors(self.model)
        for t in params:
            self._register(t, _FORWARD, "params")
        for t in buffers:
            self._register(t, _FORWARD, "buffers")
        for p in self.model.parameters():
            if p.grad is not None:
                self._register(p.grad, _FORWARD, "grads")

    def _register_optimizer(self) -> None:
        if self.optimizer is None:
            return
        for t in tensors_in(self.optimizer):
            # parameters and their gradients are reachable from param_groups: they keep their own role
            rec = self._record_of(t)
            if rec is None or rec.role is None:
                self._register(t, _OPTIMIZER, "optimizer")

    def _record_of(self, t) -> _Storage | None:
        return self._live.get(id(t.untyped_storage()))

    def _install_hooks(self) -> None:
        def mark_grad(p) -> None:
            if p.grad is not None:
                self._register(p.grad, _BACKWARD, "grads")

        for p in self.model.parameters():
            if p.requires_grad and p.is_leaf:  # frozen parameters have no gradient to mark
                self._hooks.append(p.register_post_accumulate_grad_hook(mark_grad))
        if self.optimizer is not None:
            self._hooks.append(register_optimizer_step_pre_hook(self._optimizer_pre))
            self._hooks.append(register_optimizer_step_post_hook(self._optimizer_post))

    def _optimizer_pre(self, optimizer, args, kwargs) -> None:
        self._optimizer_depth += 1

    def _optimizer_post(self, optimizer, args, kwargs) -> None:
        self._optimizer_depth = max(0, self._optimizer_depth - 1)
        self._register_optimizer()

    # ----- the mode --------------------------------------------------------------
    def __enter__(self):
        if self._closed:
            raise RuntimeError("TensorTracker was closed; make a new one")
        self._steps += 1
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._op += 1
        in_backward = _graph_task_id() != -1
        if in_backward and not self._in_backward:
            self._backward_starts.append(self._op)
        self._in_backward = in_backward
        phase = _OPTIMIZER if self._optimizer_depth else _BACKWARD if in_backward else _FORWARD
        if isinstance(out, torch.Tensor):
            self._register(out, phase, None)
        elif isinstance(out, (tuple, list)):
            for t in _flat_tensors(out):
                self._register(t, phase, None)
        if self._total > self._phase_peaks.get(phase, (0, 0))[0]:
            self._phase_peaks[phase] = (self._total, self._op)
            self._dead_since[phase].clear()
        return out

    # ----- reading ------------------------------------------------------------------
    def current_bytes(self) -> int:
        """Bytes of the storages alive now (of those the tracker knows)."""
        return self._total

    def peak(self) -> TensorPeak:
        """The peak so far, split into categories (each storage alive at the peak in exactly one)."""
        peaks = self.phase_peaks()
        if not peaks:
            return TensorPeak(0, dict.fromkeys(CATEGORIES, 0), _FORWARD, self._op, self._steps, [])
        # the highest, and of equal ones the earliest
        phase = max(peaks, key=lambda p: (self._phase_peaks[p][0], -self._phase_peaks[p][1]))
        return peaks[phase]

    def phase_peaks(self) -> dict[str, TensorPeak]:
        """The highest total of each phase seen so far (``forward``, ``backward``, ``optimizer``), each split
        into categories. A model deeper by identical layers moves every one of them along a line, while
        which of them is the peak can change (:func:`lorabench.estimate.predict` extrapolates each)."""
        self._register_optimizer()
        out = {}
        for phase, (total, op) in self._phase_peaks.items():
            components = dict.fromkeys(CATEGORIES, 0)
            alive = [r for r in self._live.values() if r.born <= op] + self._dead_since[phase]
            for rec in alive:
                components[self._category(rec)] += rec.nbytes
            out[phase] = TensorPeak(total, components, phase, self._op, self._steps, [r.nbytes for r in alive])
        return out

    def _category(self, rec: _Storage) -> str:
        if rec.role is not None:
            return rec.role
        if rec.phase == _FORWARD:
            i = bisect.bisect_right(self._backward_starts, rec.born)
            if i < len(self._backward_starts) and (rec.died is None or rec.died >= self._backward_starts[i]):
                return "activations"
            if i == len(self._backward_starts) and rec.died is None:
                return "activations"  # alive at the end of a forward pass with no backward yet
        return "temporaries"

    def close(self) -> None:
        """Remove the hooks and forget every storage."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for rec in self._live.values():
            rec.ref = None
        self._live.clear()
        for dead in self._dead_since.values():
            dead.clear()
        self._closed = True


_graph_task_id = torch._C._current_graph_task_id  # -1 outside a backward pass


def _flat_tensors(out) -> list[Any]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        flat = []
        for o in out:
            flat += _flat_tensors(o)
        return flat
    return []
