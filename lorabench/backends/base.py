"""What a quantization backend provides: the contract every module in ``lorabench/backends/`` fulfils.

A backend is one library that stores a model's linear weights in fewer bits (bitsandbytes,
HQQ, torchao, ...). It names the ``quant`` values it serves (:class:`Format`), builds the
``quantization_config`` that ``from_pretrained`` loads with, recognises its own quantized
layers, counts the exact bytes they hold, quantizes and dequantizes a single matrix for the
quantization-error cases, and says on which devices it runs. Everything else in lorabench
asks the registry (:mod:`lorabench.backends`) instead of naming a library.

Backends import their library lazily (inside methods): listing the allowed ``quant`` values
or validating a configuration must not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from lorabench.errors import ConfigError


@dataclass(frozen=True)
class Format:
    """One ``quant`` value a backend serves.

    Args:
        quant: the value a configuration names (``nf4``); unique across backends.
        label: how reports and metric descriptions name it (``NF4``).
        markers: pytest markers a case in this format carries, besides ``quantized`` (every quantized case).
        double_quant: whether the format can quantize its scales again (``double_quant: true``).
        note: what the quantization-error round trip does, for the metric's description.
    """

    quant: str
    label: str
    markers: tuple[str, ...]
    double_quant: bool = False
    note: str = ""


class QuantBackend:
    """Base class of a quantization backend; subclass it in a module of ``lorabench/backends/``
    and assign an instance to the module-level name ``BACKEND``.

    Class attributes:
        name: the library, as reports and errors name it.
        module: the import name of the library (checked before a case loads).
        install: the pip requirement that provides it.
        formats: the ``quant`` values it serves.
        devices: the torch device types it runs on.
        linear_types: class names of its quantized linear layers where they are not ``nn.Linear``
            (``target_modules: attention`` and the FLOP count look for linear layers by class name).
        marker_help: a description for each pytest marker its formats use.
    """

    name: ClassVar[str]
    module: ClassVar[str]
    install: ClassVar[str]
    formats: ClassVar[tuple[Format, ...]]
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    linear_types: ClassVar[tuple[str, ...]] = ()
    marker_help: ClassVar[dict[str, str]] = {}

    # ----- loading ---------------------------------------------------------
    def quantization_config(self, quant: str, *, compute_dtype, double_quant: bool = False,
                            skip_modules: Sequence[str] = ()) -> Any:
        """The ``quantization_config`` ``from_pretrained`` loads a base in ``quant`` with.

        Args:
            quant: one of this backend's formats.
            compute_dtype: the torch dtype the layers compute in.
            double_quant: quantize the scales again (only where the format allows it).
            skip_modules: module names to leave unquantized (a new classification head).
        """
        raise NotImplementedError

    def prepare_for_training(self, model) -> None:
        """Make a loaded base safe to train an adapter on (before peft's k-bit preparation); default: nothing."""

    # ----- what it stores ----------------------------------------------------
    def owns(self, module) -> bool:
        """Whether ``module`` is one of this backend's quantized linear layers (not a peft wrapper around one)."""
        raise NotImplementedError

    def weight_tensors(self, module) -> list[Any]:
        """The plain tensors that hold an owned layer's quantized weight: packed data plus every scale,
        offset and code book it needs to dequantize (its bias is not included)."""
        raise NotImplementedError

    def logical_numel(self, param) -> int | None:
        """Elements a packed parameter stands for, or ``None`` where ``param.numel()`` already says it."""
        return None

    # ----- the memory model (lorabench.estimate) ------------------------------
    def quantize_meta(self, model, quantization_config, dtype) -> None:
        """Quantize a model built on the meta device as ``from_pretrained`` with ``quantization_config``
        would: the same layer classes, and every quantized tensor with its real shape and dtype.

        Raises:
            NotImplementedError: the backend cannot build on the meta device (its cases get no prediction).
        """
        raise NotImplementedError(f"{self.name} has no meta-device build")

    def meta_patches(self, target: str) -> list[tuple[Any, str, Any]]:
        """``(owner, attribute, replacement)`` patches under which meta tensors take the kernels the
        ``target`` device type (``cpu``, ``cuda``) would; default: none. Only called where the library is installed."""
        return []

    # ----- quantization error ------------------------------------------------
    def round_trip(self, weight, quant: str):
        """A 2-D float32 ``weight`` quantized and dequantized as the backend stores it, in float32."""
        raise NotImplementedError

    # ----- where it runs -----------------------------------------------------
    def check_device(self, quant: str, device) -> None:
        """Fail early, with the reason, where ``device`` cannot run ``quant``.

        Raises:
            ConfigError: the device type is not one the backend runs on.
        """
        if device.type not in self.devices:
            raise ConfigError(f"quant={quant!r} ({self.name}) runs on {' or '.join(self.devices)}, not on {device}")
