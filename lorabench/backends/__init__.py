"""The quantization-backend registry: which ``quant`` values exist and which library serves each.

Every module in this package that defines ``BACKEND`` (a :class:`~lorabench.backends.base.QuantBackend`)
is registered when the package is imported, in module-name order; adding a backend is adding
a module (docs/extending.md, "Adding a backend"). The rest of lorabench asks the functions here: the
configuration validates ``quant`` against :func:`quant_values`, the loader takes
:func:`quantization_config`, byte accounting :func:`parameter_tensors`, the quantization-error
cases :func:`round_trip`, pytest its markers from :func:`markers`.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Sequence
from typing import Any

from lorabench.backends.base import Format, QuantBackend
from lorabench.errors import ConfigError

NONE = "none"  # an unquantized base: no backend
# Linear layers of plain torch and transformers (GPT-2's Conv1D); backends add their own classes.
PLAIN_LINEAR_TYPES = ("Linear", "Conv1D")

_BACKENDS: list[QuantBackend] = []
_BY_QUANT: dict[str, tuple[QuantBackend, Format]] = {}


def register(backend: QuantBackend) -> QuantBackend:
    """Add a backend; its ``quant`` values must be new and its markers described.

    Raises:
        ValueError: a ``quant`` value is taken (or is ``none``), or a marker has no description.
    """
    for fmt in backend.formats:
        if fmt.quant == NONE or fmt.quant in _BY_QUANT:
            owner = "an unquantized base" if fmt.quant == NONE else _BY_QUANT[fmt.quant][0].name
            raise ValueError(f"backend {backend.name}: quant {fmt.quant!r} is already {owner}'s")
        undescribed = [m for m in fmt.markers if m not in backend.marker_help]
        if undescribed:
            raise ValueError(f"backend {backend.name}: marker(s) {undescribed} of {fmt.quant!r} need a description "
                             "in marker_help")
    _BACKENDS.append(backend)
    for fmt in backend.formats:
        _BY_QUANT[fmt.quant] = (backend, fmt)
    return backend


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name == "base" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if isinstance(getattr(module, "BACKEND", None), QuantBackend):
            register(module.BACKEND)


def backends() -> tuple[QuantBackend, ...]:
    return tuple(_BACKENDS)


def formats() -> tuple[Format, ...]:
    """Every quantized format, backend by backend."""
    return tuple(fmt for backend in _BACKENDS for fmt in backend.formats)


def quant_values() -> tuple[str, ...]:
    """Every value ``quant`` may take: ``none`` and each backend's formats."""
    return (NONE, *(fmt.quant for fmt in formats()))


def allowed_text() -> str:
    """The allowed ``quant`` values for an error message, each group named by its backend."""
    groups = [f"{', '.join(f.quant for f in b.formats)} ({b.name})" for b in _BACKENDS]
    return ", ".join([NONE, *groups])


def check_quant(quant: Any) -> None:
    """Raises:
        ConfigError: ``quant`` is not ``none`` nor a registered format; the message lists the allowed values.
    """
    if quant != NONE and (not isinstance(quant, str) or quant not in _BY_QUANT):
        raise ConfigError(f"quant={quant!r} is not allowed; choose one of {allowed_text()}")


def backend_for(quant: str) -> QuantBackend:
    """The backend that serves ``quant``.

    Raises:
        ConfigError: ``quant`` is ``none`` (no backend) or unknown.
    """
    check_quant(quant)
    if quant == NONE:
        raise ConfigError("quant='none' is an unquantized base: no backend serves it")
    return _BY_QUANT[quant][0]


def format_for(quant: str) -> Format:
    """The :class:`Format` named ``quant``. Raises: ConfigError as :func:`backend_for`."""
    backend_for(quant)
    return _BY_QUANT[quant][1]


def double_quant_values() -> tuple[str, ...]:
    """The formats that accept ``double_quant: true``."""
    return tuple(f.quant for f in formats() if f.double_quant)


def takes_double_quant(quant: str) -> bool:
    """Whether a base in ``quant`` can quantize its scales again (its :class:`Format` says; ``none``: no).

    The one answer to "may this base be double-quantized": the configuration's validation and every
    kind that chooses a base's load (an inference variant's quantized base) ask it.
    """
    return quant in double_quant_values()


def markers() -> dict[str, str]:
    """Every pytest marker a backend's cases carry, with its description."""
    return {name: text for backend in _BACKENDS for name, text in backend.marker_help.items()}


def check_available(quant: str) -> None:
    """Raises:
        ConfigError: the library serving ``quant`` is not installed; the message says how to install it.
    """
    backend = backend_for(quant)
    if importlib.util.find_spec(backend.module) is None:
        raise ConfigError(f"quant={quant!r} needs {backend.name}, which is not installed: pip install {backend.install}")


def check_runnable(quant: str, device) -> None:
    """Fail before any case trains where ``quant`` cannot run: its library missing, or the device unsupported.

    Raises:
        ConfigError: named, with the fix.
    """
    if quant == NONE:
        return
    check_available(quant)
    backend_for(quant).check_device(quant, device)


def quantization_config(quant: str, *, compute_dtype, double_quant: bool = False,
                        skip_modules: Sequence[str] = ()) -> Any:
    """The ``quantization_config`` for ``from_pretrained``, or ``None`` for an unquantized base.

    Raises:
        ConfigError: unknown ``quant``, or its library is not installed.
    """
    if quant == NONE:
        return None
    check_available(quant)
    return backend_for(quant).quantization_config(quant, compute_dtype=compute_dtype, double_quant=double_quant,
                                                  skip_modules=skip_modules)


def owner(module) -> QuantBackend | None:
    """The backend whose quantized linear layer ``module`` is, or ``None``."""
    return next((b for b in _BACKENDS if b.owns(module)), None)


def parameter_tensors(module) -> list[Any]:
    """The tensors that hold ``module``'s own parameters: for a quantized layer, its backend's packed weight
    and quantization state (scales, zero points, code books) plus its other parameters as they are."""
    params = list(module.named_parameters(recurse=False))
    backend = owner(module)
    if backend is None:
        return [p for _, p in params]
    return backend.weight_tensors(module) + [p for name, p in params if name != "weight"]


def logical_numel(param) -> int:
    """Elements ``param`` stands for: a packed 4-bit parameter counts its original elements."""
    for backend in _BACKENDS:
        n = backend.logical_numel(param)
        if n is not None:
            return n
    return param.numel()


def linear_type_names() -> tuple[str, ...]:
    """Class names of linear layers, plain and quantized."""
    return PLAIN_LINEAR_TYPES + tuple(t for b in _BACKENDS for t in b.linear_types)


def round_trip(weight, quant: str):
    """``weight`` quantized and dequantized by the backend serving ``quant``, in float32.

    Raises:
        ConfigError: unknown ``quant``, or its library is not installed.
    """
    check_available(quant)
    return backend_for(quant).round_trip(weight, quant)


def quantize_meta(model, config_quant: str, *, dtype, double_quant: bool = False) -> None:
    """Quantize a meta-device model as a real load in ``config_quant`` would (nothing for ``none``).

    Raises:
        ConfigError: unknown ``quant``, or its library is not installed.
        NotImplementedError: the backend cannot build on the meta device.
    """
    quantization = quantization_config(config_quant, compute_dtype=dtype, double_quant=double_quant)
    if quantization is not None:
        backend_for(config_quant).quantize_meta(model, quantization, dtype)


def meta_patches(target: str) -> list[tuple[Any, str, Any]]:
    """Every installed backend's patches under which meta tensors take ``target``'s kernels."""
    return [patch for b in _BACKENDS if importlib.util.find_spec(b.module) is not None
            for patch in b.meta_patches(target)]


def preload_modules() -> list[str]:
    """The installed backend libraries, for processes that import their libraries ahead of a case."""
    return [b.module for b in _BACKENDS if importlib.util.find_spec(b.module) is not None]


_discover()

__all__ = [
    "NONE", "Format", "QuantBackend", "allowed_text", "backend_for", "backends", "check_available", "check_quant",
    "check_runnable", "double_quant_values", "format_for", "formats", "linear_type_names", "logical_numel",
    "markers", "meta_patches", "owner", "parameter_tensors", "preload_modules", "quant_values", "quantization_config",
    "quantize_meta", "register", "round_trip", "takes_double_quant",
]
