"""A case's model on the meta device: the classes, dtypes and quantization layout of a real load, no weights.

The model is built from its transformers config with ``from_config`` under
``torch.device("meta")``. A quantized configuration is quantized there by its backend
(:meth:`lorabench.backends.QuantBackend.quantize_meta`: bitsandbytes through transformers'
own quantizer and its ``Params4bit`` / ``Int8Params`` code, torchao through ``quantize_``),
so every packed weight, scale and code book gets its real shape and dtype.
The adapter is attached by :func:`lorabench.models.loading.apply_adapter`, the same call a
real case makes (``prepare_model_for_kbit_training``'s fp32 upcasts included).
"""

from __future__ import annotations

from lorabench import backends
from lorabench.config import BenchConfig
from lorabench.models.loading import apply_adapter
from lorabench.backends.precision import torch_dtype
import torch

# Deferred imports: transformers inside the functions that use them: what only reads a configuration or a
# stored run starts without them.


def meta_model(hf_config, config: BenchConfig):
    """The model of ``config`` on the meta device, adapter attached, ready to train.

    Args:
        hf_config: a ``transformers.PretrainedConfig`` of a causal language model.
        config: the case's configuration.

    Returns:
        The model (a peft model for LoRA); every tensor on the meta device.
    """
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(config.dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    backends.quantize_meta(model, config.quant, dtype=dtype, double_quant=config.double_quant)
    return apply_adapter(model, config)
