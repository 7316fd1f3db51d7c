"""A real pretrained model: all-MiniLM-L6-v2 fine-tuned for sentiment with LoRA and with QLoRA (NF4), on the CPU.

Each post-warm-up optimizer step is one pytest-benchmark round; memory, speed, loss and
accuracy (with its Wilson interval) go into the record and through thresholds.yaml. A
quantization-error record of the encoder's own pretrained linear layers goes beside them.
Marked ``slow``: together they take about a minute or more on a 2-core CPU.
"""

import pytest

from lorabench.kinds.classify import CONFIGS, DATASET_NAME, MODEL_NAME, encoder_linear_weights, encoder_source
from lorabench.run.launch import InlineLauncher, resolve_case
from lorabench.pytest_plugin import assert_case_passed, record_result, step_timer
from lorabench.kinds.quant_error import MINILM_CASE_ID, QuantErrorParams

pytestmark = [pytest.mark.minilm, pytest.mark.slow]


def _finish(result, benchmark, bench_session):
    record_result(result, benchmark, bench_session)
    assert_case_passed(result)


# Not marked lora/qlora: `pytest bench/ -m qlora` stays the quick run of the tiny matrix.
@pytest.mark.parametrize("config", CONFIGS, ids=[c.id for c in CONFIGS])
def test_minilm_finetune(config, benchmark, bench_session):
    benchmark.group = f"finetune {MODEL_NAME} {DATASET_NAME}"
    case = resolve_case("classify", case_id=config.id, model=MODEL_NAME, dataset=DATASET_NAME, device=_cpu(),
                        config=config, source=encoder_source())
    _finish(InlineLauncher().run(case, step_timer(benchmark)), benchmark, bench_session)


@pytest.mark.quant_error
def test_minilm_quant_error(benchmark, bench_session):
    """NF4, FP4 and int8 round trips of the pretrained encoder's linear layers: real trained weights."""
    benchmark.group = "quantization error"
    case = resolve_case("quant_error", case_id=MINILM_CASE_ID, model=MODEL_NAME, dataset="(weights only)",
                        device=_cpu(), params=QuantErrorParams(encoder_linear_weights))
    _finish(InlineLauncher().run(case, step_timer(benchmark)), benchmark, bench_session)


def _cpu():
    import torch

    return torch.device("cpu")
