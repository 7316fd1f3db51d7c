"""Quantization error: every backend's round trips (NF4, FP4, int8, ...) of every weight matrix, against the original.

Two cases: seeded standard-normal matrices (the distribution NF4's code points are built
for; thresholds.yaml gates the QLoRA paper's ordering NF4 < FP4 there), and the linear layers
of the first ``--model`` as its checkpoint stores them. Per-layer errors go into the record's
``details``; the means and maxima are metrics.
"""

import pytest

from lorabench.pytest_plugin import assert_case_passed, record_result
from lorabench.quant_error import (
    MODEL_CASE_ID,
    NORMAL_CASE_ID,
    layer_errors,
    linear_weights,
    normal_weights,
    quant_error_result,
)


def _record(case_id, model, named_weights, benchmark, bench_session):
    layers = []
    benchmark.group = "quantization error"
    benchmark.pedantic(lambda: layers.extend(layer_errors(named_weights)), rounds=1, iterations=1)
    result = quant_error_result(case_id, model, layers)
    record_result(result, benchmark, bench_session)
    assert_case_passed(result)


@pytest.mark.quant_error
@pytest.mark.quantized
def test_quant_error_normal(benchmark, bench_session):
    _record(NORMAL_CASE_ID, "normal N(0,1) matrices", normal_weights(), benchmark, bench_session)


@pytest.mark.quant_error
@pytest.mark.quantized
def test_quant_error_model(benchmark, bench_session, model_source):
    import torch
    from transformers import AutoModelForCausalLM

    spec = bench_session.matrix.models[0]
    source = model_source(spec)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, local_files_only=True,
                                                 trust_remote_code=source.trust_remote_code)
    _record(MODEL_CASE_ID, spec, linear_weights(model), benchmark, bench_session)
