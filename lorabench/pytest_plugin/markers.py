"""The pytest markers of bench cases, registered by the plugin so ``--strict-markers`` accepts them in any project.

Fine-tuning cases get theirs from their configuration (:attr:`lorabench.config.BenchConfig.markers`);
each quantization backend registers its own (``qlora``, ``nf4``, ...: :func:`lorabench.backends.markers`).
"""

from __future__ import annotations

import pytest

from lorabench import backends

MARKERS = {
    "full": "full fine-tuning (every weight trains)",
    "lora": "a LoRA adapter trains on a frozen base",
    "quantized": "any quantized base (each backend in lorabench/backends/ registers its own markers, e.g. qlora, nf4)",
    "optim8bit": "a bitsandbytes 8-bit optimizer",
    "checkpointing": "gradient checkpointing on",
    "sweep": "part of the LoRA rank sweep",
    "slow": "takes minutes on the CPU",
    "gpu": "needs a CUDA device",
    "overhead": "harness overhead against a bare PyTorch loop",
    "inference": "generation with the trained adapter: base, adapter, merged, NF4 and int8 variants",
    "gguf": "the merged model exported to GGUF and run through llama-cpp-python (optional extra)",
    "quant_error": "reconstruction error of weight matrices in every backend's formats (NF4, FP4, int8, ...)",
    "minilm": "the pretrained all-MiniLM-L6-v2 encoder fine-tuned for classification",
    "distributed": "a case on several processes (world_size > 1), launched by torchrun",
    "ddp": "DistributedDataParallel: every rank holds the whole model",
    "fsdp": "FSDP2 (fully_shard): every rank holds a shard of the model",
}


def register(config: pytest.Config) -> None:
    """Add the bench's markers and every quantization backend's to ``config``."""

    for name, text in (MARKERS | backends.markers()).items():
        config.addinivalue_line("markers", f"{name}: {text}")
