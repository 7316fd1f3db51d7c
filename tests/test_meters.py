"""Memory meters: the peak comes from the kernel's high-water mark, reset per case."""

from __future__ import annotations

import pytest

from lorabench import meters
from lorabench.meters import RssMeter

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
