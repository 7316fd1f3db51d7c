"""torchao: int8 weight-only quantization (``Int8WeightOnlyConfig``), PyTorch's own quantization library.

Each linear weight becomes an ``Int8Tensor`` inside an ordinary ``nn.Linear``: one int8 per
weight, and per row a float32 scale (whatever the model's dtype) and an int8 zero point
(symmetric, so zero, but stored). peft wraps these layers in its ``TorchaoLoraLinear``, whose
merge dequantizes, adds the LoRA delta and quantizes again with the same configuration.

Why this library for the second backend (docs/backends.md, measured in
docs/benchmarks.md): torchao int8 loads on a CPU, trains a LoRA as well as an unquantized
base does, and peft merges into it with its own layer. optimum-quanto trains too, but peft has
no layer for it and its merge moves logits by 4.3; HQQ does not load in transformers 5 on a CPU;
torchao's 4-bit weight-only formats need CUDA kernels, and its CPU int4 keeps each code in an
int8 byte.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from lorabench.backends.base import Format, QuantBackend

# Deferred imports: torch, torchao, transformers inside the functions that use them: what only reads a
# configuration or a stored run starts without them.


class _DropMissingKernelNotice(logging.Filter):
    """torchao's wheel ships CUDA kernels built for other Python and GPU versions; importing it logs
    "Failed to load ..." for each, every case. int8 weight-only does not use them."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Failed to load") or "register_constant()" in message)


# Before torchao is first imported; torch's pytree logs a deprecation for each of torchao's enums.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).addFilter(_DropMissingKernelNotice())


def flatten(tensor) -> list[Any]:
    """The plain tensors inside a tensor subclass (``Int8Tensor``: ``qdata``, ``scale``, ``zero_point``)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not is_traceable_wrapper_subclass(tensor):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [inner for name in names for inner in flatten(getattr(tensor, name))]


class TorchAO(QuantBackend):
    name = "torchao"
    module = "torchao"
    install = "torchao"
    formats = (Format("torchao_int8", "torchao int8", ("torchao",), note="row-wise absmax, weight-only"),)
    marker_help = {"torchao": "torchao int8 weight-only base"}

    def quantization_config(self, quant: str, *, compute_dtype, double_quant: bool = False,
                            skip_modules: Sequence[str] = ()):
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        # compute_dtype: the layers dequantize to the weight's dtype, which from_pretrained's dtype sets.
        return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=list(skip_modules) or None)

    def owns(self, module) -> bool:
        # The weight must be the module's own parameter: peft's wrappers only forward ``weight`` to their base layer.
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        return weight is not None and type(weight).__module__.startswith("torchao")

    def weight_tensors(self, module) -> list[Any]:
        return flatten(module.weight)

    def quantize_meta(self, model, quantization_config, dtype) -> None:
        """``quantize_`` with the loading configuration on the layers transformers' torchao quantizer would
        convert (every ``nn.Linear`` outside its ``modules_to_not_convert``: the output head); torchao's
        int8 tensors build on the meta device with their real shapes and dtypes."""
        import torch
        from torchao.quantization import quantize_
        from transformers.quantizers import AutoHfQuantizer
        from transformers.quantizers.quantizers_utils import should_convert_module

        quantizer = AutoHfQuantizer.from_config(quantization_config)
        quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": "cpu"}, checkpoint_files=None,
                                   use_kernels=False)
        skip = quantizer.modules_to_not_convert
        quantize_(model, quantization_config.quant_type,
                  filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and should_convert_module(name, skip))
        model.hf_quantizer = quantizer  # peft's TorchaoLoraLinear takes its requantization from it
        quantizer.postprocess_model(model)

    def round_trip(self, weight, quant: str):
        """``quantize_`` with the loading configuration on a one-layer copy, then ``dequantize``; float32 in,
        so the figure is the format's own error (bitsandbytes' int8 takes fp16, which rounds far less than int8)."""
        import torch
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        layer.weight = torch.nn.Parameter(weight.detach().float().clone(), requires_grad=False)
        quantize_(layer, Int8WeightOnlyConfig())
        return layer.weight.dequantize().float()


BACKEND = TorchAO()
