"""Quantization error: NF4, FP4 and int8 round trips of every weight matrix, against the original.

Two cases: seeded standard-normal matrices (the distribution NF4's code points are built
for; thresholds.yaml gates the QLoRA paper's ordering NF4 < FP4 there), and the linear layers
of the first ``--model`` as its checkpoint stores them. Per-layer errors go into the record's
``details``; the means and maxima are metrics.
"""

import pytest

from fixtures.case import assert_gates_pass
from lorabench.quant_error import (
    BLOCKSIZE,
    MODEL_CASE_ID,
    NORMAL_CASE_ID,
    QUANT_TYPES,
    layer_errors,
    linear_weights,
    normal_weights,
    summarize,
)
from lorabench.result import CaseResult

WEIGHTS_ONLY = "(weights only)"


def _record(case_id, model, device, named_weights, benchmark, bench_session):
    layers = []
    benchmark.group = "quantization error"
    benchmark.pedantic(lambda: layers.extend(layer_errors(named_weights)), rounds=1, iterations=1)
    result = CaseResult(case_id=case_id, config_id=case_id, model=model, dataset=WEIGHTS_ONLY, device=str(device),
                        config={"kind": "quant_error", "quant_types": list(QUANT_TYPES), "blocksize": BLOCKSIZE})
    source = "relative Frobenius error of a bitsandbytes quantize/dequantize round trip"
    for name, value in summarize(layers).items():
        result.set(name, value, source=source)
    result.details["layers"] = [{"name": layer.name, "shape": list(layer.shape), **layer.errors} for layer in layers]
    bench_session.gate(result)
    bench_session.results.append(result)
    benchmark.extra_info.update(result.to_extra_info())
    assert_gates_pass(result)


@pytest.mark.quant_error
@pytest.mark.quantized
def test_quant_error_normal(benchmark, bench_session):
    _record(NORMAL_CASE_ID, "normal N(0,1) matrices", "cpu", normal_weights(), benchmark, bench_session)


@pytest.mark.quant_error
@pytest.mark.quantized
def test_quant_error_model(benchmark, bench_session, model_source):
    import torch
    from transformers import AutoModelForCausalLM

    spec = bench_session.matrix.models[0]
    source = model_source(spec)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, local_files_only=True,
                                                 trust_remote_code=source.trust_remote_code)
    _record(MODEL_CASE_ID, spec, "cpu", linear_weights(model), benchmark, bench_session)
