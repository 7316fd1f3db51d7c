"""Models: quantized loading, adapters, the 4-bit training layout (bad --model values: test_bad_inputs.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lorabench.config import BenchConfig, resolve
from lorabench.models import apply_adapter, attention_module_names, load_model, resolve_model
from lorabench.precision import native_dtype, torch_dtype
from lorabench.zoo import ZOO


def test_a_checkpoint_directory_goes_through_the_same_path(tiny_llama):
    source = resolve_model(tiny_llama.path)
    assert not source.embedded and source.path == tiny_llama.path


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_family_loads_quantized_and_finds_attention_layers(name, cpu):
    source = resolve_model(name)
    model = load_model(source, BenchConfig("q", quant="nf4", double_quant=True), cpu).model
    names = attention_module_names(model)
    assert names and all("lm_head" not in n for n in names)
    adapted = apply_adapter(model, BenchConfig("q", quant="nf4", double_quant=True, target_modules="attention"))
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_4bit_layers_keep_input_gradients_after_an_eval_pass(tiny_llama, cpu):
    """An eval-mode forward must not switch bitsandbytes to its autograd-less CPU inference kernel."""
    config = resolve(BenchConfig("q", quant="nf4", double_quant=True), tiny_llama.defaults, cpu)
    model = apply_adapter(load_model(tiny_llama, config, cpu).model, config)
    ids = torch.randint(3, 50, (2, 12))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*autograd kernel was not registered.*")
        model(input_ids=ids, labels=ids).loss.backward()
    # lora_B starts at zero, so a first-layer q/k/v/gate/up adapter only gets a gradient
    # through the frozen 4-bit layers above it: the path the inference kernel would cut.
    first_layer_grads = {n: p.grad for n, p in model.named_parameters() if "layers.0." in n and "lora_B" in n}
    assert len(first_layer_grads) == 7
    assert all(g is not None and g.abs().sum() > 0 for g in first_layer_grads.values())


def test_full_fine_tuning_trains_every_weight(tiny_llama, cpu):
    model = apply_adapter(load_model(tiny_llama, BenchConfig("f", method="full"), cpu).model, BenchConfig("f", method="full"))
    assert all(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch_dtype(native_dtype(cpu))  # dtype auto: the CPU's native one
