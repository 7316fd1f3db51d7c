"""Training FLOPs per token and the GPU peaks they are divided by: MFU and HFU.

Model FLOPs utilisation follows PaLM (Chowdhery et al. 2022, appendix B): the FLOPs the model
needs per token, whatever the implementation does, over the device's peak. Per token, with N the
parameters of the matrix multiplications (embedding look-ups do no multiplications), L layers,
hidden size d and sequence length T:

- full fine-tuning: ``6 N + 12 L d T`` (forward 2N, backward 4N: input and weight gradients;
  the attention scores and their use add ``12 L d T`` over forward and backward);
- LoRA on a frozen base: ``4 N_base + 6 N_adapter + 12 L d T``: the base runs forward (2N) and
  passes gradients to its inputs (2N) but computes no weight gradients; the adapter trains fully.

Hardware FLOPs utilisation adds what the implementation recomputes: with gradient checkpointing,
one more forward pass (``2 N + 4 L d T``). A quantized base is counted at its logical size: its
dequantize-then-multiply does the same multiply-adds.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorabench import backends

# Dense (no sparsity) tensor-core peaks in FLOP/s by the exact name torch.cuda.get_device_name
# reports, from the vendors' data sheets: bf16 where the GPU has it, else fp16.
GPU_PEAK_FLOPS: dict[str, dict[str, float]] = {
    "NVIDIA H200": {"bf16": 989.4e12, "fp16": 989.4e12},  # H200 SXM data sheet (1,979 TFLOPS with sparsity)
    "NVIDIA H100 80GB HBM3": {"bf16": 989.4e12, "fp16": 989.4e12},  # H100 SXM data sheet
    "NVIDIA H100 PCIe": {"bf16": 756.5e12, "fp16": 756.5e12},  # H100 PCIe data sheet
    "NVIDIA A100-SXM4-80GB": {"bf16": 312e12, "fp16": 312e12},  # A100 data sheet
    "NVIDIA A100-SXM4-40GB": {"bf16": 312e12, "fp16": 312e12},
    "NVIDIA A100 80GB PCIe": {"bf16": 312e12, "fp16": 312e12},
    "NVIDIA A100-PCIE-40GB": {"bf16": 312e12, "fp16": 312e12},
    "NVIDIA L40S": {"bf16": 362.05e12, "fp16": 362.05e12},  # L40S data sheet (733 with sparsity)
    "NVIDIA L40": {"bf16": 181.05e12, "fp16": 181.05e12},  # L40 data sheet (362 with sparsity)
    "NVIDIA L4": {"bf16": 121e12, "fp16": 121e12},  # L4 data sheet (242 with sparsity)
    "NVIDIA A10": {"bf16": 125e12, "fp16": 125e12},  # A10 data sheet (250 with sparsity)
    "Tesla T4": {"fp16": 65e12},  # T4 data sheet: no bf16
    "Tesla V100-SXM2-16GB": {"fp16": 125e12},  # V100 SXM2 data sheet: no bf16
    "Tesla V100-SXM2-32GB": {"fp16": 125e12},
    "Tesla V100-PCIE-16GB": {"fp16": 112e12},
    "Tesla V100-PCIE-32GB": {"fp16": 112e12},
}


@dataclass(frozen=True)
class TrainingFlops:
    """FLOPs per trained token, as the model needs them and as the hardware executes them."""

    model_per_token: float
    hardware_per_token: float


def peak_flops(device_name: str, dtype: str) -> float | None:
    """The dense peak for ``dtype`` of the GPU named exactly ``device_name``, or ``None`` if not in the table.

    fp32 training runs on the same tensor cores through TF32 only where enabled, so it has no entry.
    """
    return GPU_PEAK_FLOPS.get(device_name, {}).get(dtype)


def matmul_params(model) -> tuple[int, int]:
    """Parameters of the matrix multiplications: (frozen, trainable). LoRA's A and B are trainable.

    A packed 4-bit weight counts its logical elements (:func:`lorabench.backends.logical_numel`).
    Only a layer's own weight counts: peft's LoRA wrappers reuse the class names and forward
    ``weight`` to the layer they wrap, which is counted once, as itself.
    """

    linear_types = backends.linear_type_names()
    frozen = trainable = 0
    for module in model.modules():
        weight = module._parameters.get("weight")
        if type(module).__name__ not in linear_types or weight is None:
            continue
        count = backends.logical_numel(weight)
        if weight.requires_grad:
            trainable += count
        else:
            frozen += count
    return frozen, trainable


def training_flops(*, frozen: int, trainable: int, layers: int, hidden: int, seq_len: float,
                   checkpointing: bool) -> TrainingFlops:
    """PaLM's per-token training FLOPs, and the hardware's with recompute.

    Args:
        frozen, trainable: matrix-multiplication parameters that do not / do train.
        layers, hidden: the transformer's depth and width (for the attention term).
        seq_len: tokens per sequence the attention runs over.
        checkpointing: gradient checkpointing recomputes one forward pass.
    """
    attention = 12 * layers * hidden * seq_len
    model = 4 * frozen + 6 * trainable + attention
    recompute = (2 * (frozen + trainable) + attention / 3) if checkpointing else 0
    return TrainingFlops(model, model + recompute)


def model_shape(model) -> tuple[int, int]:
    """(layers, hidden size) from a transformers config, whatever the family names them."""
    config = model.config
    layers = next(getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(config, k))
    hidden = next(getattr(config, k) for k in ("hidden_size", "n_embd", "d_model") if hasattr(config, k))
    return int(layers), int(hidden)
