"""Quantization error: round trips, the per-layer measure, and the gates on NF4 vs FP4."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorabench.kinds.quant_error import (
    NORMAL_CASE_ID,
    QUANT_TYPES,
    layer_errors,
    linear_weights,
    normal_weights,
    relative_error,
    round_trip,
    summarize,
)
from lorabench.case_kinds import known_case_ids
from lorabench.gates.thresholds import FAIL, PASS, evaluate_gate, load_thresholds


def test_round_trips_keep_shape_and_stay_close():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    for quant in QUANT_TYPES:  # every registered backend's formats
        back = round_trip(w, quant)
        assert back.shape == w.shape and back.dtype == torch.float32
        assert not torch.equal(back, w)  # it did quantize
    assert relative_error(w, "int8") < 0.02 < relative_error(w, "nf4")


def test_values_on_the_4bit_grid_come_back_exactly():
    # A block whose entries are NF4 code points times its absmax is represented without error.
    levels = torch.tensor([-1.0, -0.6961928, -0.3949175, 0.0, 0.2461123, 0.5626170, 1.0])
    w = levels.repeat(64, 10)[:, :64]
    assert relative_error(w, "nf4") < 1e-2


def test_nf4_beats_fp4_on_every_normal_layer():
    layers = layer_errors(normal_weights())
    assert all(layer.errors["nf4"] < layer.errors["fp4"] for layer in layers)
    assert all(layer.errors["int8"] < layer.errors["nf4"] for layer in layers)


def test_fp4_beats_nf4_on_weights_already_on_its_grid():
    """The ordering is a property of the weights, so the gate can fail: weights on FP4's levels favour FP4."""
    on_fp4_grid = round_trip(torch.randn(256, 256, generator=torch.Generator().manual_seed(0)), "fp4")
    assert relative_error(on_fp4_grid, "fp4") < 0.01 < relative_error(on_fp4_grid, "nf4")


def test_summary_means_and_maxima():
    layers = layer_errors(normal_weights(shapes=((64, 64), (128, 64))))
    out = summarize(layers)
    assert out["quant_error_layers"] == 2
    for quant in ("nf4", "fp4", "int8"):
        values = [layer.errors[quant] for layer in layers]
        assert out[f"{quant}_rel_error_max"] == max(values)
        assert min(values) <= out[f"{quant}_rel_error_mean"] <= max(values)


def test_linear_weights_leave_out_the_output_head(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama.path, dtype=torch.float32)
    names = [name for name, _ in linear_weights(model)]
    assert names and "lm_head" not in names and any("q_proj" in n for n in names)


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(4, 4), "all-zero"), (torch.ones(8), "2-D weight"),
])
def test_bad_weights_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        relative_error(bad, "nf4")
    with pytest.raises(ValueError, match="unknown quant type 'nf3'"):
        round_trip(torch.ones(4, 4), "nf3")


def test_torchao_int8_lands_where_llm_int8_does():
    """Both keep one absmax scale per row of int8 codes; torchao quantizes from float32, LLM.int8 from fp16."""
    for layer in layer_errors(normal_weights(), quant_types=("int8", "torchao_int8")):
        assert abs(layer.errors["torchao_int8"] - layer.errors["int8"]) <= 0.05 * layer.errors["int8"], layer


def _shipped_normal_gates_and_measured_errors():
    """The shipped gates of the normal-matrix case, and the errors this code measures on such a matrix."""
    thresholds = load_thresholds(Path(__file__).resolve().parent.parent / "thresholds.yaml", known_case_ids())
    gates = [g for g in thresholds.gates_for(NORMAL_CASE_ID, "cpu", "normal N(0,1) matrices")
             if g.config == NORMAL_CASE_ID]
    return gates, summarize(layer_errors(normal_weights(shapes=((128, 128),))))


def _status(gate, metrics) -> str:
    return evaluate_gate(gate, NORMAL_CASE_ID, metrics, {}, lambda _config: None).status


def test_the_shipped_gate_fails_when_torchao_int8_is_worse_than_llm_int8():
    gates, good = _shipped_normal_gates_and_measured_errors()
    gates = [g for g in gates if g.metric.startswith("torchao_int8")]
    same_format = [g for g in gates if g.ref_metric == "int8_rel_error_mean"]
    assert same_format
    worse = dict(good, torchao_int8_rel_error_mean=good["int8_rel_error_mean"] * 1.1)
    assert all(_status(g, good) == PASS for g in gates)
    assert _status(same_format[0], worse) == FAIL


def test_the_shipped_gate_fails_when_nf4_is_worse_than_fp4():
    gates, good = _shipped_normal_gates_and_measured_errors()
    ordering = [g for g in gates if g.metric == "nf4_rel_error_mean" and g.ref_metric == "fp4_rel_error_mean"]
    assert ordering
    swapped = dict(good, nf4_rel_error_mean=good["fp4_rel_error_mean"] * 1.01)
    assert all(_status(g, good) == PASS for g in gates)
    assert _status(ordering[0], swapped) == FAIL
