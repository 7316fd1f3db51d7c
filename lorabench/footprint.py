"""Bytes held by tensors: weights, trainable parameters, gradients, optimizer state.

Counts come from the tensors themselves (storage sizes, each storage once), so they
are exact on any device. A quantized layer counts what its backend says it stores
(:func:`lorabench.backends.storage_tensors`): packed data plus the quantization state
(scales, zero points, nested scales, code books).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lorabench import backends

MIB = 1024 * 1024


def _storage_key(t) -> tuple[str, int]:
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr())


def unique_bytes(tensors: Iterable[Any]) -> int:
    """Total storage bytes of ``tensors``, each underlying storage counted once."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t is None:
            continue
        key = _storage_key(t)
        if key not in seen:
            seen[key] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _module_state_tensors(module) -> list[Any]:
    """Parameters, buffers and quantization state directly owned by ``module``."""
    quantized = backends.storage_tensors(module)
    if quantized is not None:
        return quantized
    return list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))


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
