"""A case's model on the meta device: the classes, dtypes and quantization layout of a real load, no weights.

The model is built from its transformers config with ``from_config`` under
``torch.device("meta")``. A quantized configuration goes through transformers' own
bitsandbytes quantizer (the same module replacement ``from_pretrained`` does), and each
weight is quantized by bitsandbytes' own ``Params4bit`` / ``Int8Params`` code, whose
operators have meta implementations: the packed 4-bit storage, absmax, double-quantization
statistics, code book, int8 matrix and row scales all get their real shapes and dtypes.
The adapter is attached by :func:`lorabench.models.apply_adapter`, the same call a
real case makes (``prepare_model_for_kbit_training``'s fp32 upcasts included).
"""

from __future__ import annotations

import contextlib
from typing import Any

from lorabench import backends
from lorabench.config import BenchConfig
from lorabench.models import apply_adapter
from lorabench.precision import torch_dtype


def meta_model(hf_config, config: BenchConfig):
    """The model of ``config`` on the meta device, adapter attached, ready to train.

    Args:
        hf_config: a ``transformers.PretrainedConfig`` of a causal language model.
        config: the case's configuration.

    Returns:
        The model (a peft model for LoRA); every tensor on the meta device.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(config.dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    quantization = backends.quantization_config(config.quant, compute_dtype=dtype, double_quant=config.double_quant)
    if quantization is not None:
        _quantize(model, quantization, dtype)
    return apply_adapter(model, config)


def _quantize(model, quantization, dtype) -> None:
    """Replace linear layers as ``from_pretrained`` does, then quantize each weight on the meta device."""
    import bitsandbytes as bnb
    import torch
    from transformers.quantizers import AutoHfQuantizer

    shapes = {name: (m.weight.shape, m.weight.dtype) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
    quantizer = AutoHfQuantizer.from_config(quantization)
    quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": "cpu"}, checkpoint_files=None,
                               use_kernels=False)
    with _bnb_code_cache_untouched():
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.weight = _params4bit(module, _weight(shapes[name], module, dtype))
            elif isinstance(module, bnb.nn.Linear8bitLt):
                module.weight = _int8params(module, _weight(shapes[name], module, dtype))
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)


@contextlib.contextmanager
def _bnb_code_cache_untouched():
    """bitsandbytes caches its double-quantization code book on the device of its first use, for the
    process. Quantizing on the meta device first would leave a meta code book behind, which real loads
    then cannot copy: the estimate runs with a code book of its own and puts the cache back after."""
    from bitsandbytes import functional

    saved = dict(functional.name2qmap)
    functional.name2qmap["dynamic"] = functional.create_dynamic_map()  # on the CPU, like a CPU load's
    try:
        yield
    finally:
        functional.name2qmap.clear()
        functional.name2qmap.update(saved)


def _weight(shape_dtype: tuple[Any, Any], module, dtype):
    """The unquantized weight as a checkpoint would hold it: (out, in), in the load dtype."""
    import torch

    shape, _ = shape_dtype
    if getattr(module, "source_cls", None) is not None and module.source_cls.__name__ == "Conv1D":
        shape = shape[::-1]  # GPT-2's Conv1D stores (in, out); transformers transposes before quantizing
    return torch.empty(shape, dtype=dtype, device="meta")


def _params4bit(module, weight):
    import bitsandbytes as bnb

    old = module.weight
    param = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=old.blocksize,
                              compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                              quant_storage=old.quant_storage, module=module)
    return param._quantize("meta")  # .to() skips quantization on the meta device; the operators run there


def _int8params(module, weight):
    import bitsandbytes as bnb

    param = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=module.weight.has_fp16_weights)
    return param._quantize("meta")
