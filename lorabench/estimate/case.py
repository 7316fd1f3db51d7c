"""Every fine-tuning case checks the memory model against what it measured."""

from __future__ import annotations

import logging

from lorabench.config import BenchConfig
from lorabench.estimate.device import TARGETS
from lorabench.result import CaseResult
from lorabench.tensor_meter import PEAK_METRIC, TensorMeter

log = logging.getLogger("lorabench.estimate")
PREDICTED = "predicted_peak_mib"
ERROR = "prediction_error_pct"


def record_prediction(result: CaseResult, source, config: BenchConfig, tensors: TensorMeter,
                      shapes: list[tuple[int, int]], device) -> None:
    """Predict the case's tensor peak from its model config alone and record it beside the measured one.

    The prediction is for the largest padded batch shape among the tracked steps, the steps
    the measured figure comes from.

    Args:
        result: the case's result; ``tensor_peak_mib`` is read from it.
        source: the case's model (:class:`lorabench.models.ModelSource`).
        config: the resolved configuration.
        tensors: the case's tensor meter.
        shapes: padded (batch, length) of every step run so far.
        device: the training device.
    """
    measured = result.metrics.get(PEAK_METRIC)
    if measured is None or tensors.result is None:
        reason = f"nothing to check it against: {result.absent.get(PEAK_METRIC, 'tensor_peak_mib absent')}"
        result.set(PREDICTED, None, reason=reason)
        result.set(ERROR, None, reason=reason)
        return
    if device.type not in TARGETS:
        reason = f"the memory model knows the kernels of {', '.join(TARGETS)}, not {device.type}"
        result.set(PREDICTED, None, reason=reason)
        result.set(ERROR, None, reason=reason)
        return
    from transformers import AutoConfig

    from lorabench.estimate import predict

    batch_size, seq_len = max(shapes[:tensors.result.steps], key=lambda s: s[0] * s[1])
    hf = AutoConfig.from_pretrained(source.path, local_files_only=True, trust_remote_code=source.trust_remote_code)
    try:
        prediction = predict(hf, config, batch_size=batch_size, seq_len=seq_len, target=device.type)
    except NotImplementedError as exc:  # a quantization backend without a meta-device build
        for metric in (PREDICTED, ERROR):
            result.set(metric, None, reason=f"the memory model cannot build this case: {exc}")
        return
    where = f"batch {batch_size} x {seq_len} tokens, {device.type} kernels"
    result.set(PREDICTED, prediction.tensor_mib,
               source=f"lorabench.estimate: meta-device build and one tracked step from the config alone ({where})")
    result.set(ERROR, 100.0 * (prediction.tensor_mib - measured) / measured,
               source="(predicted_peak_mib - tensor_peak_mib) / tensor_peak_mib")
    result.details["predicted_components_mib"] = {k: v for k, v in prediction.components_mib.items()}
    log.info("%s: predicted %.3f MiB, measured %.3f MiB (%s)", result.case_id, prediction.tensor_mib, measured, where)
