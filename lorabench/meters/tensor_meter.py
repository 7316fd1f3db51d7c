"""Live tensor bytes of a fine-tuning case, tracked over its warm-up steps.

The tracker (:mod:`lorabench.meters.tensor_tracker`) sees every operator call, which slows a
step by tens of percent on the tiny models (Python runs for each call; see
docs/benchmarks.md). So it watches only the warm-up steps, which no speed figure
includes, and the timed steps run untouched. The optimizer state exists from the
second step on, so at least two warm-up steps are needed; a case with fewer reports the
tensor figures absent, with the reason.

With batches padded to their longest row, a later step with a longer batch may peak
higher than the warm-up steps did; the batch shapes tracked are recorded beside the figure.
"""

from __future__ import annotations

from lorabench.meters.footprint import MIB
from lorabench.meters.memory import Reading
from lorabench.meters.tensor_tracker import CATEGORIES, TensorPeak, TensorTracker

MIN_TRACKED_STEPS = 2  # the first step creates the optimizer state; the second runs with it
PEAK_METRIC = "tensor_peak_mib"
COMPONENT_METRICS = {category: f"tensor_{category}_mib" for category in CATEGORIES}
TENSOR_METRICS = (PEAK_METRIC, *COMPONENT_METRICS.values())
SOURCE = "lorabench.meters.tensor_tracker: live tensor storage bytes (each storage once), TorchDispatchMode over the warm-up steps"


class TensorMeter:
    """Track the first ``warmup_steps`` optimizer steps of a case; a meter (:class:`lorabench.meters.memory.Meter`).

    Args:
        model: the model that trains.
        optimizer: its optimizer.
        device: the training device; only storages on it count.
        warmup_steps: how many leading steps to track (the untimed ones).
        off: why not to track at all (every figure is then absent with this reason); ``""`` to track.
    """

    def __init__(self, model, optimizer, device, warmup_steps: int, *, off: str = "") -> None:
        self.remaining = warmup_steps
        self.result: TensorPeak | None = None
        self.tracker: TensorTracker | None = None
        self.reason = off
        if off:
            return
        if warmup_steps < MIN_TRACKED_STEPS:
            self.reason = (f"live tensor bytes are tracked over the untimed warm-up steps, and warmup_steps={warmup_steps} "
                           f"is below {MIN_TRACKED_STEPS} (the optimizer state exists from the second step on)")
        else:
            self.tracker = TensorTracker(model, optimizer, device=device.type)

    def run(self, step):
        """Run ``step()`` (one optimizer step), tracked while warm-up steps remain; return what it returns."""
        if self.tracker is None:
            return step()
        with self.tracker:
            value = step()
        self.remaining -= 1
        if self.remaining == 0:
            self.result = self.tracker.peak()
            self.close()
        return value

    # The meter protocol (lorabench.meters.memory.Meter): the tracking itself happens in ``run``.
    def start(self) -> None:
        pass

    def sample(self) -> None:
        pass

    def stop(self) -> Reading:
        """The peak and its components in MiB, or the reason each is absent."""
        self.close()
        r = Reading()
        if self.result is None:
            reason = self.reason or "the case stopped before its warm-up steps were done"
            r.absent = dict.fromkeys(TENSOR_METRICS, reason)
            return r
        r.metrics[PEAK_METRIC] = self.result.peak_bytes / MIB
        r.sources[PEAK_METRIC] = f"{SOURCE} ({self.result.steps} steps; the peak fell in the {self.result.peak_phase} phase)"
        for category, name in COMPONENT_METRICS.items():
            r.metrics[name] = self.result.components[category] / MIB
            r.sources[name] = f"{category} alive at the moment of tensor_peak_mib ({SOURCE})"
        return r

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
