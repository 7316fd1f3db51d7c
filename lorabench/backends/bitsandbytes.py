"""bitsandbytes: QLoRA's 4-bit NF4 and FP4, and LLM.int8.

4-bit layers (``Linear4bit``) pack two weights per byte and keep a ``QuantState``: one absmax
per block of 64 weights, the 16-value code book, and, with double quantization, the absmaxes
quantized to 8 bits with their own absmax, code book and offset. LLM.int8 layers
(``Linear8bitLt``) hold one int8 per weight and one float32 absmax per row (``SCB``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from lorabench.backends.base import Format, QuantBackend

# Deferred imports: bitsandbytes, torch, transformers inside the functions that use them: what only reads a
# configuration or a stored run starts without them.

BLOCKSIZE = 64  # bitsandbytes' default 4-bit block on CPU and CUDA


class _DropInt8CastNotice(logging.Filter):
    """bitsandbytes logs "inputs will be cast ... to float16" for every int8 matmul of every token:
    thousands of lines per generate call, whose writing would be timed with it (said once, in docs/inference.md)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


_INT8_NOTICE_FILTER = _DropInt8CastNotice()


def quant_state_tensors(quant_state) -> list[Any]:
    """Tensors inside a 4-bit ``QuantState`` (and its nested state)."""
    import torch

    out = []
    for name in ("absmax", "code", "offset"):
        value = getattr(quant_state, name, None)
        if isinstance(value, torch.Tensor):
            out.append(value)
    nested = getattr(quant_state, "state2", None)
    if nested is not None:
        out += quant_state_tensors(nested)
    return out


def keep_4bit_layout_trainable(model) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference when a layer runs in eval mode.

    On CPUs with AVX512-BF16, a ``Linear4bit`` that runs one eval-mode forward converts its
    weight to a packed inference layout for good, and from then on its forward uses a kernel
    with no autograd: gradients to the layer's input are silently dropped in training. An eval
    pass before or during training would trigger it, so training models opt out.

    Returns:
        How many layers were switched.
    """
    switched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


@contextlib.contextmanager
def _code_cache_untouched():
    """bitsandbytes caches its double-quantization code book on the device of its first use, for the
    process. Quantizing on the meta device first would leave a meta code book behind, which real loads
    then cannot copy: the meta build runs with a code book of its own and puts the cache back after."""
    from bitsandbytes import functional

    saved = dict(functional.name2qmap)
    functional.name2qmap["dynamic"] = functional.create_dynamic_map()  # on the CPU, like a CPU load's
    try:
        yield
    finally:
        functional.name2qmap.clear()
        functional.name2qmap.update(saved)


def _meta_weight(shape, module, dtype):
    """The unquantized weight as a checkpoint would hold it: (out, in), in the load dtype."""
    import torch

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


def _int8_matmul(target: str, original):
    """LLM.int8 training: bitsandbytes dequantizes and calls a plain matmul on CPUs (``MatMul8bitFp``) and
    runs its int8 kernels on CUDA (``MatMul8bitLt``), chosen by the input's device type. On CUDA, which
    activation columns count as outliers (kept in fp16 beside the int8 product) depends on their values:
    the meta run assumes none, so it leaves out those columns' copies, a small share for a model without
    many outliers."""
    from bitsandbytes.autograd._functions import MatMul8bitFp, MatmulLtState

    def matmul(A, B, out=None, state=None, threshold=0.0, bias=None):
        state = state or MatmulLtState()
        if A.device.type == "meta" and target == "cpu" and state.is_training:
            if threshold > 0.0:
                state.threshold = threshold
            return MatMul8bitFp.apply(A, B, out, bias, state)
        if A.device.type == "meta":
            state.threshold = threshold = 0.0  # outlier columns are found from values, which meta tensors lack
        return original(A, B, out=out, state=state, threshold=threshold, bias=bias)

    return matmul


def _paged_state_buffer(target: str, original):
    """Paged optimizers (``paged_adamw_8bit``) put each state buffer of 100,000 elements or more in CUDA
    managed memory (``F.get_paged``: ``cudaMallocManaged``, outside torch's caching allocator), which a
    meta run cannot allocate: it gets a meta tensor marked ``is_paged`` instead, so the allocator's
    figures leave it out and the device total keeps it (resident while the card has room)."""
    import torch

    def get_state_buffer(self, p, dtype=torch.float32):
        if p.device.type != "meta":
            return original(self, p, dtype=dtype)
        buffer = torch.zeros_like(p, dtype=dtype)
        if target == "cuda" and self.is_paged and p.numel() >= 1e5:  # bitsandbytes' own threshold
            buffer.is_paged = True
        return buffer

    return get_state_buffer


def _no_meta_prefetch(original):
    """Prefetching a paged buffer moves its pages (no bytes are added): nothing to do for a meta one."""

    def prefetch_state(self, p):
        if p.device.type != "meta":
            original(self, p)

    return prefetch_state


class BitsAndBytes(QuantBackend):
    name = "bitsandbytes"
    module = "bitsandbytes"
    install = "bitsandbytes"
    formats = (
        Format("nf4", "NF4", ("qlora", "nf4"), double_quant=True, note=f"blockwise absmax, blocks of {BLOCKSIZE}"),
        Format("fp4", "FP4", ("qlora", "fp4"), double_quant=True, note=f"blockwise absmax, blocks of {BLOCKSIZE}"),
        Format("int8", "int8", ("int8",), note="row-wise absmax"),
    )
    linear_types = ("Linear4bit", "Linear8bitLt")
    marker_help = {
        "qlora": "LoRA on a 4-bit (NF4 or FP4) bitsandbytes base",
        "nf4": "4-bit NormalFloat base (bitsandbytes)",
        "fp4": "4-bit float base (bitsandbytes)",
        "int8": "LLM.int8 8-bit base (bitsandbytes)",
    }

    def quantization_config(self, quant: str, *, compute_dtype, double_quant: bool = False,
                            skip_modules: Sequence[str] = ()):
        from transformers import BitsAndBytesConfig

        skip = {"llm_int8_skip_modules": list(skip_modules)} if skip_modules else {}
        if quant == "int8":
            logging.getLogger("bitsandbytes.autograd._functions").addFilter(_INT8_NOTICE_FILTER)
            return BitsAndBytesConfig(load_in_8bit=True, **skip)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=compute_dtype, **skip)

    def prepare_for_training(self, model) -> None:
        keep_4bit_layout_trainable(model)

    def owns(self, module) -> bool:
        # bitsandbytes' own layers only: peft's LoRA wrappers reuse the class names.
        return type(module).__module__.startswith("bitsandbytes") and hasattr(module, "in_features")

    def weight_tensors(self, module) -> list[Any]:
        import torch

        weight = module.weight
        out = [weight]
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is not None:
            out += quant_state_tensors(quant_state)
        scb = getattr(weight, "SCB", None)  # LLM.int8 row scales
        if isinstance(scb, torch.Tensor):
            out.append(scb)
        return out

    def logical_numel(self, param) -> int | None:
        if type(param).__name__ != "Params4bit":
            return None
        shape = getattr(getattr(param, "quant_state", None), "shape", None)
        return int(shape.numel()) if shape is not None else param.numel() * 2  # two 4-bit values per stored byte

    def quantize_meta(self, model, quantization_config, dtype) -> None:
        """transformers' own bitsandbytes quantizer replaces the linear layers (as ``from_pretrained`` does),
        then each weight is quantized by bitsandbytes' ``Params4bit`` / ``Int8Params`` code, whose operators
        have meta implementations: packed storage, absmax, double-quantization statistics, code book, int8
        matrix and row scales all get their real shapes and dtypes."""
        import bitsandbytes as bnb
        import torch
        from transformers.quantizers import AutoHfQuantizer

        shapes = {name: m.weight.shape for name, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
        quantizer = AutoHfQuantizer.from_config(quantization_config)
        quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": "cpu"}, checkpoint_files=None,
                                   use_kernels=False)
        with _code_cache_untouched():
            for name, module in model.named_modules():
                if isinstance(module, bnb.nn.Linear4bit):
                    module.weight = _params4bit(module, _meta_weight(shapes[name], module, dtype))
                elif isinstance(module, bnb.nn.Linear8bitLt):
                    module.weight = _int8params(module, _meta_weight(shapes[name], module, dtype))
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)

    def meta_patches(self, target: str) -> list[tuple[Any, str, Any]]:
        import bitsandbytes
        from bitsandbytes.optim.optimizer import Optimizer8bit

        return [(bitsandbytes, "matmul", _int8_matmul(target, bitsandbytes.matmul)),
                (Optimizer8bit, "get_state_buffer", _paged_state_buffer(target, Optimizer8bit.get_state_buffer)),
                (Optimizer8bit, "prefetch_state", _no_meta_prefetch(Optimizer8bit.prefetch_state))]

    def round_trip(self, weight, quant: str):
        """The functions ``Linear4bit`` (bf16 in, blocks of 64) and ``Linear8bitLt`` (fp16 in, one absmax per row) use."""
        import bitsandbytes.functional as bnbf
        import torch

        if quant == "int8":
            codes, scales, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16))
            return bnbf.int8_vectorwise_dequant(codes, scales).float()
        packed, state = bnbf.quantize_4bit(weight.to(torch.bfloat16), blocksize=BLOCKSIZE, quant_type=quant)
        return bnbf.dequantize_4bit(packed, state).float()


BACKEND = BitsAndBytes()
