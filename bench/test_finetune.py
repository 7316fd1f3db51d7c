"""Fine-tuning matrix: every configuration x model x data set is one case.

Each case loads the (quantized) model, attaches the adapter, trains with pytest-benchmark
timing every post-warm-up optimizer step, measures memory, speed and quality, and
checks the gates in thresholds.yaml.
"""

import pytest

from lorabench.pytest_plugin import assert_case_passed, report_case
from lorabench.report.allure_results import DOES_NOT_FIT
from lorabench.result import STATUS_DOES_NOT_FIT


def test_finetune(finetune_result, request):
    report_case(request, finetune_result)
    if finetune_result.status == STATUS_DOES_NOT_FIT:
        pytest.skip(f"{DOES_NOT_FIT}: {finetune_result.error}")
    assert_case_passed(finetune_result, request)
