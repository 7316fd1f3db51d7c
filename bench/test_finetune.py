"""Fine-tuning matrix: every configuration x model x data set is one case.

Each case loads the (quantized) model, attaches the adapter, trains with pytest-benchmark
timing every post-warm-up optimizer step, measures memory, speed and quality, and
checks the gates in thresholds.yaml.
"""

import pytest

from fixtures.case import assert_gates_pass, report_case
from lorabench.allure_results import CASE_ERROR, DOES_NOT_FIT
from lorabench.result import STATUS_DOES_NOT_FIT, STATUS_OK


def test_finetune(finetune_result, request):
    report_case(request, finetune_result)
    if finetune_result.status == STATUS_DOES_NOT_FIT:
        pytest.skip(f"{DOES_NOT_FIT}: {finetune_result.error}")
    assert finetune_result.status == STATUS_OK, f"{CASE_ERROR} ({finetune_result.status}): {finetune_result.error}"
    assert_gates_pass(finetune_result)
