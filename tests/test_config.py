"""Configurations: validation, markers, YAML round trip, command-line overrides."""

from __future__ import annotations

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

from lorabench.config import (
    DTYPES,
    OPTIMIZERS,
    BenchConfig,
    TrainDefaults,
    apply_overrides,
    parse_override,
    resolve,
)
from lorabench.errors import ConfigError
from lorabench.backends.precision import native_dtype


@st.composite
def valid_configs(draw):
    quant = draw(st.sampled_from(["none", "nf4", "fp4", "int8"]))
    method = "lora" if quant != "none" else draw(st.sampled_from(["full", "lora"]))
    warmup = draw(st.integers(0, 5))
    steps = draw(st.one_of(st.none(), st.integers(warmup + 1, 500)))
    return BenchConfig(
        id=draw(st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)),
        method=method,
        quant=quant,
        double_quant=draw(st.booleans()) if quant in ("nf4", "fp4") else False,
        dtype=draw(st.sampled_from(DTYPES)),
        rank=draw(st.integers(1, 256)),
        alpha=draw(st.integers(1, 512)),
        dropout=draw(st.floats(0, 0.9)),
        target_modules=draw(st.one_of(st.sampled_from(["all-linear", "attention"]),
                                      st.lists(st.sampled_from(["q_proj", "v_proj", "c_attn"]), min_size=1, max_size=3).map(tuple))),
        optimizer=draw(st.sampled_from(OPTIMIZERS)),
        gradient_checkpointing=draw(st.booleans()),
        batch_size=draw(st.one_of(st.none(), st.integers(1, 64))),
        grad_accum=draw(st.integers(1, 8)),
        seq_len=draw(st.one_of(st.none(), st.integers(1, 4096))),
        lr=draw(st.one_of(st.none(), st.floats(1e-7, 1.0))),
        steps=steps,
        warmup_steps=warmup,
        seed=draw(st.integers(0, 2**31)),
        tags=tuple(draw(st.lists(st.sampled_from(["sweep", "slow", "gpu"]), unique=True))),
    )


@given(valid_configs())
def test_yaml_round_trip_is_lossless(config):
    text = yaml.safe_dump(config.to_dict())
    assert BenchConfig.from_dict(yaml.safe_load(text)) == config


@given(valid_configs())
def test_markers_follow_the_fields(config):
    marks = config.markers
    assert config.method in marks
    assert ("qlora" in marks) == (config.quant in ("nf4", "fp4"))
    assert ("int8" in marks) == (config.quant == "int8")
    assert ("quantized" in marks) == config.quantized
    assert all(tag in marks for tag in config.tags)


def test_default_markers_of_a_qlora_config():
    c = BenchConfig("qlora_nf4", quant="nf4", double_quant=True)
    assert c.markers == ("lora", "qlora", "nf4", "quantized", "checkpointing")
    assert "checkpointing" not in c.replace(gradient_checkpointing=False).markers


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"rank": 0}, ["rank=0", "at least 1"]),
        ({"steps": -3}, ["steps=-3", "at least 1"]),
        ({"steps": 3, "warmup_steps": 3}, ["steps=3", "warmup_steps=3"]),
        ({"method": "full", "quant": "nf4"}, ["method='full'", "quant='nf4'"]),
        ({"quant": "int8", "double_quant": True}, ["double_quant", "int8"]),
        ({"quant": "nf4,int8"}, ["quant='nf4,int8'", "nf4, fp4, int8"]),
        ({"optimizer": "sgd"}, ["optimizer='sgd'", "paged_adamw_8bit"]),
        ({"dtype": "bf8"}, ["dtype='bf8'", "auto, bf16, fp16, fp32"]),
        ({"dropout": 1.5}, ["dropout=1.5"]),
        ({"lr": -1.0}, ["lr=-1.0", "positive"]),
        ({"rank": "8"}, ["rank='8'", "whole number"]),
        ({"gradient_checkpointing": "yes"}, ["gradient_checkpointing='yes'", "true or false"]),
        ({"target_modules": "mlp"}, ["target_modules='mlp'", "all-linear"]),
        ({"tags": ["fast"]}, ["tags", "sweep"]),
    ],
)
def test_invalid_fields_name_the_value_and_what_is_allowed(fields, words):
    with pytest.raises(ConfigError) as info:
        BenchConfig(id="bad", **fields)
    for word in words:
        assert word in str(info.value)


def test_unknown_field_is_named_with_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"matrix.yaml: configs\[0\]: unknown field\(s\) 'rnak'.*allowed: .*rank"):
        BenchConfig.from_dict({"id": "x", "rnak": 8}, where="matrix.yaml: configs[0]")


def test_bad_id_is_rejected():
    with pytest.raises(ConfigError, match="configuration id"):
        BenchConfig(id="has space")


def test_resolve_fills_open_fields_from_the_model_defaults():
    defaults = TrainDefaults(steps=10, batch_size=2, seq_len=64, lr_full=1e-5, lr_lora=1e-4)
    cpu = torch.device("cpu")
    full = resolve(BenchConfig("f", method="full"), defaults, cpu)
    lora = resolve(BenchConfig("l", steps=7, lr=5e-3, dtype="fp16"), defaults, cpu)
    assert (full.steps, full.batch_size, full.seq_len, full.lr) == (10, 2, 64, 1e-5)
    assert (lora.steps, lora.lr) == (7, 5e-3)
    assert full.dtype == native_dtype(cpu) and lora.dtype == "fp16"  # auto resolves; a forced dtype stays
    with pytest.raises(ConfigError, match="dtype 'auto' needs the device"):
        resolve(BenchConfig("f"), defaults)


def test_overrides_are_parsed_as_yaml_and_validated():
    assert parse_override("rank=32") == ("rank", 32)
    assert parse_override("lr=2e-4") == ("lr", 2e-4)
    assert parse_override("gradient_checkpointing=true") == ("gradient_checkpointing", True)
    base = BenchConfig("x")
    assert apply_overrides(base, {"rank": 64, "optimizer": "paged_adamw_8bit"}).rank == 64
    with pytest.raises(ConfigError, match="--set on 'x'.*rank=0"):
        apply_overrides(base, {"rank": 0})


@pytest.mark.parametrize("text, match", [("rank", "expected KEY=VALUE"), ("rnak=3", "unknown key 'rnak'"),
                                         ("id=foo", "unknown key 'id'"), ("rank=[", "not valid YAML")])
def test_bad_overrides(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_override(text)
