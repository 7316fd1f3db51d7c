"""Memory meters: peaks and averages over a case, each from a named counter.

Every meter follows one protocol (:class:`Meter`): ``start`` at the beginning of the case,
``sample`` at the end of every training step (or timed call), ``stop`` at the end, which
returns a :class:`Reading`; :meth:`lorabench.result.CaseResult.merge` puts a reading into
the record. :class:`Meters` runs a case's meters together, as a context manager or phase by
phase, and :func:`memory_meters` builds the set every kind of case uses on its device.

- ``RssMeter``: the process's resident set. The peak is the kernel's own high-water
  mark (``VmHWM``), reset at the start of the case by writing ``5`` to
  ``/proc/self/clear_refs`` (Linux >= 4.0). Where that reset is not possible the peak is
  reported absent with the reason, never estimated.
- ``CudaMeter``: the CUDA caching allocator's peak allocated and peak reserved bytes,
  reset before the case and read after ``synchronize``; and, where NVML is present,
  the device-level memory in use, sampled at each step end.

Averages are means of samples taken at the end of every training step.
"""

from __future__ import annotations

import ctypes
import gc
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from lorabench.meters.footprint import MIB

# Deferred imports: psutil, torch inside the functions that use them: what only reads a configuration or a
# stored run starts without them; pynvml (CUDA machines only) where needed: optional.

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Reading:
    """What a meter reports: metric values, and a reason for each metric it could not measure."""

    metrics: dict[str, float] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


class Meter(Protocol):
    """What the case runners call on a meter."""

    def start(self) -> None: ...

    def sample(self) -> None: ...

    def stop(self) -> Reading: ...


class Meters:
    """A case's meters, started, sampled and stopped together.

    Use it as a context manager around the measured part of a case (``readings`` holds what
    :meth:`stop` returned once the block ends), or call the phases yourself where the case
    runs in phases. A meter added while the others run (one that needs the trained model,
    say) starts at once.
    """

    def __init__(self, *meters: Meter) -> None:
        self.meters: list[Meter] = list(meters)
        self.running = False
        self.readings: list[Reading] = []

    def add(self, meter: Meter) -> None:
        self.meters.append(meter)
        if self.running:
            meter.start()

    def start(self) -> None:
        for meter in self.meters:
            meter.start()
        self.running = True

    def sample(self) -> None:
        for meter in self.meters:
            meter.sample()

    def stop(self) -> list[Reading]:
        """Stop every meter (once; later calls return the same readings)."""
        if self.running:
            self.running = False
            self.readings = [meter.stop() for meter in self.meters]
        return self.readings

    def __enter__(self) -> Meters:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def memory_meters(device) -> Meters:
    """The memory meters of a case on ``device``: the process's RSS and :func:`cuda_meter`."""
    return Meters(RssMeter(), cuda_meter(device))


def cuda_meter(device) -> Meter:
    """On CUDA the allocator and NVML; elsewhere the reason each CUDA figure is absent."""
    return CudaMeter(device) if device.type == "cuda" else NotOnCuda(device.type)


def _status_kib(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", _PROC_STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark for this process. Returns whether it worked."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so a case starts from a clean baseline."""

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssMeter:
    """Process resident memory over a case."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self.before = 0
        self.peak_resettable = False

    def start(self) -> None:
        release_freed_memory()
        self.before = current_rss_bytes()
        self.peak_resettable = reset_peak_rss()

    def sample(self) -> None:
        self.samples.append(current_rss_bytes() - self.before)

    def stop(self) -> Reading:
        r = Reading()
        r.metrics["rss_before_mib"] = self.before / MIB
        if self.peak_resettable:
            peak = (_status_kib("VmHWM") or 0) * 1024
            r.metrics["peak_rss_mib"] = peak / MIB
            r.metrics["peak_rss_delta_mib"] = (peak - self.before) / MIB
            r.sources["peak_rss_mib"] = "VmHWM from /proc/self/status, reset via /proc/self/clear_refs at case start"
        else:
            reason = "the peak-RSS mark cannot be reset here (needs Linux /proc/self/clear_refs)"
            r.absent["peak_rss_mib"] = reason
            r.absent["peak_rss_delta_mib"] = reason
        if self.samples:
            r.metrics["avg_rss_delta_mib"] = statistics.fmean(self.samples) / MIB
            r.sources["avg_rss_delta_mib"] = "psutil RSS at each step end, minus RSS at case start"
        else:
            r.absent["avg_rss_delta_mib"] = "no training step completed"
        return r


class CudaMeter:
    """CUDA allocator peaks and NVML device use over a case."""

    def __init__(self, device) -> None:
        self.device = device
        self.alloc_samples: list[int] = []
        self.nvml_samples: list[int] = []
        self._nvml_handle = None
        self._nvml_reason = ""

    def start(self) -> None:
        import torch

        release_freed_memory()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.alloc_before = torch.cuda.memory_allocated(self.device)
        self._open_nvml()

    def _open_nvml(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            index = self.device.index or 0
            self._nvml_handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:  # no NVML library, no driver access, ...
            self._nvml_reason = f"NVML unavailable: {exc}"

    def sample(self) -> None:
        import torch

        torch.cuda.synchronize(self.device)
        self.alloc_samples.append(torch.cuda.memory_allocated(self.device))
        if self._nvml_handle is not None:
            import pynvml

            self.nvml_samples.append(pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle).used)

    def stop(self) -> Reading:
        import torch

        torch.cuda.synchronize(self.device)
        r = Reading()
        r.metrics["peak_alloc_mib"] = torch.cuda.max_memory_allocated(self.device) / MIB
        r.metrics["peak_reserved_mib"] = torch.cuda.max_memory_reserved(self.device) / MIB
        r.metrics["alloc_before_mib"] = self.alloc_before / MIB
        r.sources["peak_alloc_mib"] = "torch.cuda.max_memory_allocated, reset at case start"
        r.sources["peak_reserved_mib"] = "torch.cuda.max_memory_reserved, reset at case start"
        if self.alloc_samples:
            r.metrics["avg_alloc_mib"] = statistics.fmean(self.alloc_samples) / MIB
        else:
            r.absent["avg_alloc_mib"] = "no training step completed"
        if self.nvml_samples:
            r.metrics["device_used_max_mib"] = max(self.nvml_samples) / MIB
            r.sources["device_used_max_mib"] = "NVML device memory in use (all processes), max over step-end samples"
        else:
            r.absent["device_used_max_mib"] = self._nvml_reason or "no training step completed"
        return r


class NotOnCuda:
    """Stands in for :class:`CudaMeter` off CUDA: each CUDA-only figure is absent, with the reason."""

    METRICS = ("peak_alloc_mib", "peak_reserved_mib", "alloc_before_mib", "avg_alloc_mib", "device_used_max_mib")

    def __init__(self, device_type: str) -> None:
        self.reason = f"the case ran on {device_type}, not CUDA"

    def start(self) -> None:
        pass

    def sample(self) -> None:
        pass

    def stop(self) -> Reading:
        return Reading(absent=dict.fromkeys(self.METRICS, self.reason))
