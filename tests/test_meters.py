"""Memory meters: the peak comes from the kernel's high-water mark, reset per case."""

from __future__ import annotations

import pytest

from lorabench.meters import memory as meters
from lorabench.meters.memory import RssMeter

MIB = 1024 * 1024


def _touch(n_bytes: int) -> bytearray:
    block = bytearray(n_bytes)
    for i in range(0, n_bytes, 4096):  # make every page resident
        block[i] = 1
    return block


@pytest.mark.skipif(not meters.reset_peak_rss(), reason="needs Linux /proc/self/clear_refs")
def test_peak_rss_sees_a_freed_allocation_and_forgets_earlier_ones():
    earlier = _touch(300 * MIB)
    del earlier  # a peak from before the case must not count
    meter = RssMeter()
    meter.start()
    block = _touch(200 * MIB)
    meter.sample()
    del block
    meter.sample()
    reading = meter.stop()
    assert 195 <= reading.metrics["peak_rss_delta_mib"] < 260
    assert reading.metrics["peak_rss_mib"] >= reading.metrics["peak_rss_delta_mib"]
    assert 90 <= reading.metrics["avg_rss_delta_mib"] < 140  # mean of ~200 and ~0
    assert "VmHWM" in reading.sources["peak_rss_mib"]


def test_without_a_resettable_peak_the_peak_is_absent_not_zero(monkeypatch, tmp_path):
    monkeypatch.setattr(meters, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    meter = RssMeter()
    meter.start()
    reading = meter.stop()
    assert "peak_rss_mib" not in reading.metrics
    assert "clear_refs" in reading.absent["peak_rss_delta_mib"]
    assert reading.absent["avg_rss_delta_mib"] == "no training step completed"


class _Counting:
    """A meter that counts its calls and reports them."""

    def __init__(self, name: str) -> None:
        self.name, self.calls = name, []

    def start(self) -> None:
        self.calls.append("start")

    def sample(self) -> None:
        self.calls.append("sample")

    def stop(self) -> meters.Reading:
        self.calls.append("stop")
        return meters.Reading(metrics={self.name: float(self.calls.count("sample"))}, sources={self.name: "counted"})


def test_meters_run_as_one_and_a_late_meter_starts_when_added():
    early, late = _Counting("early"), _Counting("late")
    with meters.Meters(early) as group:
        group.sample()
        group.add(late)  # e.g. a meter that needs the trained model
        group.sample()
    assert early.calls == ["start", "sample", "sample", "stop"]
    assert late.calls == ["start", "sample", "stop"]
    assert group.stop() is group.readings and late.calls.count("stop") == 1  # stopping again reads the same
    assert [r.metrics for r in group.readings] == [{"early": 2.0}, {"late": 1.0}]


def test_a_reading_merged_into_a_record_replaces_what_it_says():
    from lorabench.result import CaseResult

    record = CaseResult(case_id="c", config_id="c", model="m", dataset="d", device="cpu", config={})
    record.set("peak_rss_mib", None, reason="not yet")
    record.set("avg_rss_delta_mib", 5.0)
    record.merge(meters.Reading(metrics={"peak_rss_mib": 12}, absent={"avg_rss_delta_mib": "no step completed"},
                                sources={"peak_rss_mib": "VmHWM"}))
    assert record.metrics == {"peak_rss_mib": 12.0}
    assert record.absent == {"avg_rss_delta_mib": "no step completed"}
    assert record.sources["peak_rss_mib"] == "VmHWM"


def test_off_cuda_every_cuda_figure_is_absent_with_the_device_named():
    import torch

    with meters.memory_meters(torch.device("cpu")) as group:
        group.sample()
    cuda = group.readings[1]
    assert not cuda.metrics and set(cuda.absent) == set(meters.NotOnCuda.METRICS)
    assert all(why == "the case ran on cpu, not CUDA" for why in cuda.absent.values())
