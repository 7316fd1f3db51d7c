"""MFU as PaLM defines it, HFU with recompute, and GPU peaks matched by exact device name."""

from __future__ import annotations

import pytest
import torch

from lorabench.config import BenchConfig
from lorabench.meters.flops import matmul_params, model_shape, peak_flops, training_flops
from lorabench.models.loading import apply_adapter, load_model


def test_full_fine_tuning_is_6n_plus_the_attention_term():
    f = training_flops(frozen=0, trainable=1000, layers=2, hidden=8, seq_len=10, checkpointing=False)
    assert f.model_per_token == 6 * 1000 + 12 * 2 * 8 * 10
    assert f.hardware_per_token == f.model_per_token


def test_lora_counts_forward_and_input_gradients_of_the_frozen_base_and_all_of_the_adapter():
    f = training_flops(frozen=1000, trainable=10, layers=2, hidden=8, seq_len=10, checkpointing=False)
    assert f.model_per_token == 4 * 1000 + 6 * 10 + 12 * 2 * 8 * 10


def test_checkpointing_adds_one_forward_to_hardware_flops_only():
    plain = training_flops(frozen=1000, trainable=10, layers=2, hidden=8, seq_len=10, checkpointing=False)
    ckpt = training_flops(frozen=1000, trainable=10, layers=2, hidden=8, seq_len=10, checkpointing=True)
    assert ckpt.model_per_token == plain.model_per_token
    assert ckpt.hardware_per_token - plain.hardware_per_token == pytest.approx(2 * 1010 + 4 * 2 * 8 * 10)


@pytest.mark.parametrize(("name", "dtype", "peak"), [
    ("NVIDIA L4", "bf16", 121e12), ("NVIDIA L40", "bf16", 181.05e12), ("NVIDIA L40S", "bf16", 362.05e12),
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4e12), ("Tesla T4", "fp16", 65e12), ("Tesla T4", "bf16", None),
    ("NVIDIA L4 (made up)", "bf16", None), ("NVIDIA H200", "fp32", None),
])
def test_peaks_are_matched_by_exact_name_and_dtype(name, dtype, peak):
    assert peak_flops(name, dtype) == peak


def test_matmul_parameters_of_full_and_lora_models(tiny_llama, cpu):
    full_config = BenchConfig("f", method="full", dtype="fp32")
    full = apply_adapter(load_model(tiny_llama, full_config, cpu).model, full_config)
    frozen, trainable = matmul_params(full)
    embeddings = full.get_input_embeddings().weight.numel()
    linear = sum(m.weight.numel() for m in full.modules() if isinstance(m, torch.nn.Linear))
    assert (frozen, trainable) == (0, linear) and linear < sum(p.numel() for p in full.parameters()) - embeddings + 1
    lora_config = BenchConfig("l", quant="nf4", double_quant=True, dtype="fp32")
    lora = apply_adapter(load_model(tiny_llama, lora_config, cpu).model, lora_config)
    frozen, trainable = matmul_params(lora)
    adapter = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert trainable == adapter and frozen == linear  # 4-bit weights count their logical elements
    assert model_shape(lora) == (4, 256)
