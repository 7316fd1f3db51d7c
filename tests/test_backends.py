"""Quantization backends: the registry, exact byte accounting of every format, loading and training on one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from lorabench import backends
from lorabench.backends.base import Format, QuantBackend
from lorabench.config import BenchConfig
from lorabench.errors import ConfigError
from lorabench.meters.footprint import param_counts, quantized_linear_ratio, weight_bytes

OUT, IN = 64, 128  # two layers of this shape, the first with a bias: 8192 weights each
ROOT = Path(__file__).resolve().parent.parent


# ----- the registry ----------------------------------------------------------
def test_every_format_is_a_quant_value_and_carries_described_markers(pytestconfig):
    registered = {line.split(":")[0] for line in pytestconfig.getini("markers")}
    values = backends.quant_values()
    assert values[0] == "none" and len(set(values)) == len(values)
    assert {"nf4", "fp4", "int8"} <= set(values)
    for fmt in backends.formats():
        assert set(BenchConfig("c", quant=fmt.quant).markers) >= {"lora", "quantized", *fmt.markers}
        assert set(fmt.markers) <= registered
    assert {backends.backend_for(q).name for q in ("nf4", "fp4", "int8")} == {"bitsandbytes"}


@pytest.mark.parametrize("quant", ["nf3", "NF4", "", 4])
def test_an_unknown_quant_is_named_with_every_allowed_value(quant):
    with pytest.raises(ConfigError) as exc:
        BenchConfig("c", quant=quant)
    message = str(exc.value)
    assert f"quant={quant!r}" in message and "configuration 'c'" in message
    assert all(value in message for value in backends.quant_values())
    assert all(f"({b.name})" in message for b in backends.backends())  # each group named by its backend
    assert "choose one of none, nf4, fp4, int8 (bitsandbytes)" in message
    with pytest.raises(ConfigError, match=re.escape(f"choose one of {backends.allowed_text()}")):
        backends.backend_for(quant)


def test_double_quant_is_checked_against_the_formats_that_have_it():
    assert backends.double_quant_values() == ("nf4", "fp4")
    with pytest.raises(ConfigError, match="double_quant=true needs a 4-bit quant \\(nf4 or fp4\\), not 'int8'"):
        BenchConfig("c", quant="int8", double_quant=True)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_a_backend_is_one_module_that_nothing_else_imports():
    """Nothing in lorabench/, bench/ or fixtures/ imports a backend module or its library, and no backend
    module imports another: the registry is the only way in, so adding a backend touches no other module."""
    modules = {type(b).__module__: b.module for b in backends.backends()}
    libraries = set(modules.values())
    files = [p for d in ("lorabench", "bench", "fixtures") for p in (ROOT / d).rglob("*.py")]
    for path in files:
        imported = _imports(path)
        own = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if own in modules:  # a backend module: its own library, nothing of another backend
            assert not imported & (set(modules) - {own}), path
            assert not {i.split(".")[0] for i in imported} & (libraries - {modules[own]}), path
        else:
            assert not imported & set(modules), path
            assert not {i.split(".")[0] for i in imported} & libraries, path


def test_a_quant_value_belongs_to_one_backend():
    class Clash(QuantBackend):
        name = "clash"
        module = "clash"
        install = "clash"
        formats = (Format("int8", "int8", ()),)

    with pytest.raises(ValueError, match="quant 'int8' is already bitsandbytes's"):
        backends.register(Clash())

    class Undescribed(QuantBackend):
        name = "undescribed"
        module = "undescribed"
        install = "undescribed"
        formats = (Format("new4", "new4", ("new4",)),)

    with pytest.raises(ValueError, match="marker\\(s\\) \\['new4'\\] of 'new4' need a description"):
        backends.register(Undescribed())
    assert "new4" not in backends.quant_values()


def test_a_missing_library_or_device_is_named_with_the_fix(monkeypatch):
    with pytest.raises(ConfigError, match="quant='nf4' \\(bitsandbytes\\) runs on cpu or cuda, not on mps"):
        backends.check_runnable("nf4", torch.device("mps"))
    backends.check_runnable("none", torch.device("mps"))  # an unquantized base needs no backend
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="needs bitsandbytes, which is not installed: pip install bitsandbytes"):
        backends.quantization_config("nf4", compute_dtype=torch.bfloat16)


# ----- exact byte accounting, one hand count per format -------------------------
def _bnb_layers(quant: str, double_quant: bool = False):
    import bitsandbytes as bnb

    if quant == "int8":
        make = lambda bias: bnb.nn.Linear8bitLt(IN, OUT, bias=bias, has_fp16_weights=False)  # noqa: E731
    else:
        make = lambda bias: bnb.nn.Linear4bit(IN, OUT, bias=bias, compute_dtype=torch.bfloat16,  # noqa: E731
                                              compress_statistics=double_quant, quant_type=quant)
    return torch.nn.Sequential(make(True), make(False)).to("cpu")  # the move to a device quantizes


def _torchao_layers(dtype):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = torch.nn.Sequential(torch.nn.Linear(IN, OUT, bias=True), torch.nn.Linear(IN, OUT, bias=False)).to(dtype)
    quantize_(model, Int8WeightOnlyConfig())
    return model


N = OUT * IN
BLOCKS = N // 64
# Per layer: what the backend stores for one 64 x 128 weight, counted by hand.
NF4_LAYER = N // 2 + BLOCKS * 4 + 16 * 4  # two weights a byte, an fp32 absmax per block of 64, the 16-value code
NF4_DQ_LAYER = (N // 2 + BLOCKS * 1  # absmax quantized to uint8
                + 4  # their fp32 offset
                + 1 * 4 + 256 * 4  # one fp32 absmax per 256 absmaxes, the 256-value 8-bit code
                + 16 * 4)
INT8_LAYER = N + OUT * 4  # an int8 per weight, an fp32 absmax per row (SCB)
TORCHAO_LAYER = N + OUT * 4 + OUT * 1  # int8 data, an fp32 scale per row (whatever the weight's dtype), an int8 zero point


@pytest.mark.parametrize("build, layer_bytes, bias_bytes", [
    pytest.param(lambda: _bnb_layers("nf4"), NF4_LAYER, OUT * 4, id="nf4"),
    pytest.param(lambda: _bnb_layers("nf4", double_quant=True), NF4_DQ_LAYER, OUT * 4, id="nf4-double-quant"),
    pytest.param(lambda: _bnb_layers("fp4"), NF4_LAYER, OUT * 4, id="fp4"),
    pytest.param(lambda: _bnb_layers("int8"), INT8_LAYER, OUT * 4, id="int8"),
    pytest.param(lambda: _torchao_layers(torch.float32), TORCHAO_LAYER, OUT * 4, id="torchao_int8-fp32"),
    pytest.param(lambda: _torchao_layers(torch.bfloat16), TORCHAO_LAYER, OUT * 2, id="torchao_int8-bf16"),
])
def test_bytes_of_every_format_match_a_hand_count(build, layer_bytes, bias_bytes):
    model = build()
    assert all(backends.owner(layer) is not None for layer in model)
    assert weight_bytes(model) == 2 * layer_bytes + bias_bytes
    assert quantized_linear_ratio(model) == 2 * layer_bytes / (2 * N * 2)  # against the same weights in bf16
    assert param_counts(model)[0] == 2 * N + OUT  # packed weights count the elements they stand for


def test_flops_count_each_base_weight_once_under_an_adapter(tiny_llama, cpu):
    from lorabench.meters.flops import matmul_params
    from lorabench.models.loading import apply_adapter, load_model

    config = BenchConfig("q", quant="nf4", double_quant=True)
    model = load_model(tiny_llama, config, cpu).model
    head = 98 * 256  # loaded trainable; only the quantized layers are frozen
    linear = 4 * (4 * 256 * 256 + 3 * 704 * 256) + head
    assert matmul_params(model) == (linear - head, head)
    adapted = apply_adapter(model, config)
    lora = sum(p.numel() for n, p in adapted.named_parameters() if "lora_" in n)
    assert matmul_params(adapted) == (linear, lora)


# ----- the second backend: torchao int8 weight-only ------------------------------
def test_torchao_int8_is_registered_with_its_own_marker():
    assert backends.backend_for("torchao_int8").name == "torchao"
    assert BenchConfig("c", quant="torchao_int8").markers == ("lora", "torchao", "quantized", "checkpointing")  # not under -m qlora


def test_torchao_loads_every_linear_but_the_head_and_its_ratio_is_exact(tiny_llama, cpu):
    """4 layers x (q, k, v, o: 256 x 256; gate, up: 704 x 256; down: 256 x 704), per row an fp32 scale and int8 zero."""
    from lorabench.models.loading import load_model

    model = load_model(tiny_llama, BenchConfig("q", quant="torchao_int8"), cpu).model
    shapes = 4 * [(256, 256)] * 4 + 4 * [(704, 256), (704, 256), (256, 704)]
    stored = sum(rows * cols + rows * (4 + 1) for rows, cols in shapes)
    assert quantized_linear_ratio(model) == stored / (2 * sum(r * c for r, c in shapes))
    assert backends.owner(model.get_output_embeddings()) is None  # transformers leaves the head unquantized


def test_lora_on_a_torchao_base_gets_gradients_through_the_int8_layers(tiny_llama, cpu):
    from lorabench.config import resolve
    from lorabench.models.loading import apply_adapter, load_model

    config = resolve(BenchConfig("q", quant="torchao_int8"), tiny_llama.defaults, cpu)
    model = apply_adapter(load_model(tiny_llama, config, cpu).model, config)
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "TorchaoLoraLinear"
    ids = torch.randint(3, 50, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    # lora_B starts at zero: a first-layer adapter's gradient flows back through every int8 layer above it
    first_layer = {n: p.grad for n, p in model.named_parameters() if "layers.0." in n and "lora_B" in n}
    assert len(first_layer) == 7 and all(g is not None and g.abs().sum() > 0 for g in first_layer.values())
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_a_peft_wrapper_is_not_counted_as_a_second_quantized_layer(tiny_llama, cpu):
    from lorabench.models.loading import apply_adapter, load_model

    config = BenchConfig("q", quant="torchao_int8")
    model = load_model(tiny_llama, config, cpu).model
    before = weight_bytes(model), quantized_linear_ratio(model)
    adapted = apply_adapter(model, config)
    owned = [name for name, m in adapted.named_modules() if backends.owner(m) is not None]
    assert len(owned) == 4 * 7 and all(name.endswith("base_layer") for name in owned)
    assert quantized_linear_ratio(adapted) == before[1]
    lora_bytes = sum(p.numel() * p.element_size() for n, p in adapted.named_parameters() if "lora_" in n)
    assert weight_bytes(adapted) == before[0] + lora_bytes


def test_torchao_builds_on_the_meta_device_with_the_bytes_of_a_real_load(tiny_llama, cpu):
    """The memory model's meta build (lorabench.estimate) holds what a real load holds, byte for byte."""
    from transformers import AutoConfig

    from lorabench.config import resolve
    from lorabench.estimate.build import meta_model
    from lorabench.models.loading import apply_adapter, load_model

    config = resolve(BenchConfig("q", quant="torchao_int8"), tiny_llama.defaults, cpu)
    real = apply_adapter(load_model(tiny_llama, config, cpu).model, config)
    meta = meta_model(AutoConfig.from_pretrained(tiny_llama.path), config)
    assert next(meta.parameters()).device.type == "meta"
    assert weight_bytes(meta) == weight_bytes(real)
    assert quantized_linear_ratio(meta) == quantized_linear_ratio(real)
    assert type(meta.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "TorchaoLoraLinear"
