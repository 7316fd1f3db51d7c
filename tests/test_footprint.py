"""Byte counts from tensors: weights, gradients, optimizer state, quantized layers."""

from __future__ import annotations

import pytest
import torch

from lorabench.meters.footprint import (
    grad_bytes,
    optimizer_state_bytes,
    param_counts,
    quantized_linear_ratio,
    trainable_bytes,
    unique_bytes,
    weight_bytes,
)


def test_views_of_one_storage_count_once():
    t = torch.zeros(1000, dtype=torch.float32)
    assert unique_bytes([t, t[10:], t.view(10, 100), None]) == 4000
    assert unique_bytes([t, torch.zeros(10, dtype=torch.bfloat16)]) == 4020


def test_adamw_state_is_two_moments_per_trainable_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    model[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(4, 64)).sum().backward()
    trainable = (32 * 8 + 8) * 4
    assert trainable_bytes(model) == trainable
    assert grad_bytes(model) == trainable
    opt.step()
    # exp_avg + exp_avg_sq per parameter, plus a scalar step count per parameter tensor
    assert optimizer_state_bytes(opt) == 2 * trainable + 2 * 4
    assert weight_bytes(model) == ((64 * 32 + 32) + (32 * 8 + 8)) * 4
    assert param_counts(model) == (64 * 32 + 32 + 32 * 8 + 8, 32 * 8 + 8)


@pytest.mark.parametrize("quant, low, high", [("nf4", 0.25, 0.3), ("fp4", 0.25, 0.3), ("int8", 0.5, 0.55)])
def test_quantized_layers_against_their_bf16_bytes(tiny_llama, cpu, quant, low, high):
    """4-bit: 4 bits a weight plus block scales; int8: 8 bits plus one fp32 scale per row."""
    from lorabench.config import BenchConfig
    from lorabench.models.loading import load_model

    config = BenchConfig("q", quant=quant, double_quant=quant == "nf4")
    model = load_model(tiny_llama, config, cpu).model
    assert low < quantized_linear_ratio(model) <= high
    unquantized = load_model(tiny_llama, BenchConfig("b"), cpu).model
    assert param_counts(model)[0] == param_counts(unquantized)[0]
    assert weight_bytes(model) < weight_bytes(unquantized)


def test_a_model_without_quantized_layers_has_no_ratio():
    assert quantized_linear_ratio(torch.nn.Sequential(torch.nn.Linear(4, 4))) is None
