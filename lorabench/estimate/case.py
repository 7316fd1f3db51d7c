"""Every fine-tuning case checks the memory model against what it measured: each predicted figure
against its own counter (tensor bytes against the tensor tracker's peak; on CUDA the allocator's
peak allocated and reserved against ``torch.cuda.max_memory_*``, the device total against NVML)."""

from __future__ import annotations

import logging

from lorabench.config import BenchConfig
from lorabench.estimate.device import TARGETS
from lorabench.result import CaseResult
from lorabench.meters.tensor_meter import PEAK_METRIC, TensorMeter
from lorabench.estimate import predict

# Deferred imports: transformers inside the functions that use them: what only reads a configuration or a
# stored run starts without them.

log = logging.getLogger("lorabench.estimate")
PREDICTED = "predicted_peak_mib"
ERROR = "prediction_error_pct"
# on CUDA: figure -> (its predicted metric, its error metric); the counter is FIGURE_COUNTERS[figure][0]
CUDA_FIGURES = {
    "allocated": ("predicted_alloc_mib", "alloc_prediction_error_pct"),
    "reserved": ("predicted_reserved_mib", "reserved_prediction_error_pct"),
    "device": ("predicted_device_mib", "device_prediction_error_pct"),
}


def record_prediction(result: CaseResult, source, config: BenchConfig, tensors: TensorMeter,
                      shapes: list[tuple[int, int]], device) -> None:
    """Predict the case's tensor peak from its model config alone and record it beside the measured one.

    The prediction is for the largest padded batch shape among the tracked steps, the steps
    the measured figure comes from.

    Args:
        result: the case's result; ``tensor_peak_mib`` is read from it.
        source: the case's model (:class:`lorabench.models.loading.ModelSource`).
        config: the resolved configuration.
        tensors: the case's tensor meter.
        shapes: padded (batch, length) of every step run so far.
        device: the training device.
    """
    cuda_metrics = [m for pair in CUDA_FIGURES.values() for m in pair]
    if device.type != "cuda":
        _absent(result, cuda_metrics, f"the case ran on {device.type}: the allocator's figures are CUDA's")
    measured = result.metrics.get(PEAK_METRIC)
    if measured is None or tensors.result is None:
        reason = f"nothing to check it against: {result.absent.get(PEAK_METRIC, 'tensor_peak_mib absent')}"
        _absent(result, (PREDICTED, ERROR, *(cuda_metrics if device.type == "cuda" else ())), reason)
        return
    if device.type not in TARGETS:
        _absent(result, (PREDICTED, ERROR), f"the memory model knows the kernels of {', '.join(TARGETS)}, "
                                            f"not {device.type}")
        return
    from transformers import AutoConfig


    batch_size, seq_len = max(shapes[:tensors.result.steps], key=lambda s: s[0] * s[1])
    hf = AutoConfig.from_pretrained(source.path, local_files_only=True, trust_remote_code=source.trust_remote_code)
    try:
        prediction = predict(hf, config, batch_size=batch_size, seq_len=seq_len, target=device.type)
    except NotImplementedError as exc:  # a quantization backend without a meta-device build
        _absent(result, (PREDICTED, ERROR, *(cuda_metrics if device.type == "cuda" else ())),
                f"the memory model cannot build this case: {exc}")
        return
    where = f"batch {batch_size} x {seq_len} tokens, {device.type} kernels"
    result.set(PREDICTED, prediction.tensor_mib,
               source=f"lorabench.estimate: meta-device build and one tracked step from the config alone ({where})")
    result.set(ERROR, 100.0 * (prediction.tensor_mib - measured) / measured,
               source="(predicted_peak_mib - tensor_peak_mib) / tensor_peak_mib")
    result.details["predicted_components_mib"] = {k: v for k, v in prediction.components_mib.items()}
    log.info("%s: predicted %.3f MiB, measured %.3f MiB (%s)", result.case_id, prediction.tensor_mib, measured, where)
    if device.type == "cuda":
        # the allocator's counters run over every step of the case: predicted at the largest shape of all
        widest = max(shapes, key=lambda s: s[0] * s[1])
        if widest != (batch_size, seq_len):
            prediction = predict(hf, config, batch_size=widest[0], seq_len=widest[1], target="cuda")
        record_cuda_figures(result, prediction, f"batch {widest[0]} x {widest[1]} tokens, cuda kernels")


def record_cuda_figures(result: CaseResult, prediction, where: str) -> None:
    """Each allocator and device figure of ``prediction`` beside its counter, with the error against it."""
    figures = {f.name: f for f in prediction.figures()}
    for name, (predicted_metric, error_metric) in CUDA_FIGURES.items():
        figure = figures[name]
        result.set(predicted_metric, figure.mib, source=f"lorabench.estimate ({where}): {figure.meaning}")
        measured = result.metrics.get(figure.counter)
        if measured is None or measured <= 0:
            result.set(error_metric, None, reason=f"{figure.counter} not measured: "
                                                  f"{result.absent.get(figure.counter, 'absent')}")
        else:
            result.set(error_metric, 100.0 * (figure.mib - measured) / measured,
                       source=f"({predicted_metric} - {figure.counter}) / {figure.counter}")


def _absent(result: CaseResult, metrics, reason: str) -> None:
    for metric in metrics:
        result.set(metric, None, reason=reason)
