"""Bytes held by tensors: weights, trainable parameters, gradients, optimizer state.

Counts come from the tensors themselves (storage sizes, each storage once), so they
are exact on any device. A quantized layer counts what its backend says it stores
(:func:`lorabench.backends.parameter_tensors`): packed data plus the quantization state
(scales, zero points, nested scales, code books).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lorabench import backends

# Deferred imports: torch inside the functions that use them: what only reads a configuration or a stored run
# starts without them.

MIB = 1024 * 1024


def _local(t):
    """This process's part of a tensor: an FSDP2 parameter (a DTensor) holds only its local shard."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _storage_key(t) -> tuple[str, int]:
    storage = t.untyped_storage()
    if t.device.type == "meta":  # no data, so every meta storage has data_ptr 0: tell them apart by identity
        return ("meta", id(storage))
    return (str(t.device), storage.data_ptr())


def unique_bytes(tensors: Iterable[Any]) -> int:
    """Total storage bytes of ``tensors``, each underlying storage counted once."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t is None:
            continue
        t = _local(t)
        key = _storage_key(t)
        if key not in seen:
            seen[key] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _module_state_tensors(module) -> list[Any]:
    """Parameters, buffers and quantization state directly owned by ``module``."""
    return backends.parameter_tensors(module) + list(module.buffers(recurse=False))


def weight_bytes(model) -> int:
    """Bytes of everything the model holds: parameters, buffers and quantization state."""
    return unique_bytes(t for m in model.modules() for t in _module_state_tensors(m))


def trainable_bytes(model) -> int:
    return unique_bytes(p for p in model.parameters() if p.requires_grad)


def param_counts(model) -> tuple[int, int]:
    """(total, trainable) parameter counts; a packed 4-bit parameter counts its original elements."""
    total = trainable = 0
    for p in model.parameters():
        n = backends.logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable


def grad_bytes(model) -> int:
    return unique_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (moments, 8-bit quantization maps, ...)."""
    import torch

    def walk(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from walk(v)

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps optimizers
    return unique_bytes(walk(dict(inner.state)))


def quantized_linear_ratio(model) -> float | None:
    """Bytes of quantized linear layers' weights over the bytes the same weights take in bf16.

    Returns:
        The ratio, or ``None`` when the model has no quantized linear layer.
    """
    quantized = original_elements = 0
    for module in model.modules():
        backend = backends.owner(module)
        if backend is None:
            continue
        quantized += unique_bytes(backend.weight_tensors(module))
        original_elements += module.in_features * module.out_features
    if not original_elements:
        return None
    return quantized / (original_elements * 2)
