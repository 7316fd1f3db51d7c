"""Quantization error: every backend's round trips (NF4, FP4, int8, ...) of every weight matrix, against the original.

Two cases: seeded standard-normal matrices (the distribution NF4's code points are built
for; thresholds.yaml gates the QLoRA paper's ordering NF4 < FP4 there), and the linear layers
of the first ``--model`` as its checkpoint stores them. Per-layer errors go into the record's
``details``; the means and maxima are metrics.
"""

from functools import partial

import pytest

from lorabench.run.launch import InlineLauncher, resolve_case
from lorabench.pytest_plugin import assert_case_passed, record_result, step_timer
from lorabench.kinds.quant_error import MODEL_CASE_ID, NORMAL_CASE_ID, QuantErrorParams, causal_lm_weights, normal_weights


def _record(case_id, model, weights, benchmark, bench_session):
    benchmark.group = "quantization error"
    case = resolve_case("quant_error", case_id=case_id, model=model, dataset="(weights only)", device=_cpu(),
                        params=QuantErrorParams(weights))
    result = InlineLauncher().run(case, step_timer(benchmark))
    record_result(result, benchmark, bench_session)
    assert_case_passed(result)


@pytest.mark.quant_error
@pytest.mark.quantized
def test_quant_error_normal(benchmark, bench_session):
    _record(NORMAL_CASE_ID, "normal N(0,1) matrices", normal_weights, benchmark, bench_session)


@pytest.mark.quant_error
@pytest.mark.quantized
def test_quant_error_model(benchmark, bench_session, model_source):
    spec = bench_session.matrix.models[0]
    source = model_source(spec)
    _record(MODEL_CASE_ID, spec, partial(causal_lm_weights, source.path, source.trust_remote_code), benchmark,
            bench_session)


def _cpu():
    import torch

    return torch.device("cpu")
