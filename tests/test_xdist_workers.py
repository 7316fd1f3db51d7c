"""A pytest-xdist worker measures again with pytest-benchmark, unless the user turned benchmarks off."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lorabench.pytest_plugin.scaleout import _disabled_by_xdist


def _config(disable=False, enable=False):
    options = {"benchmark_disable": disable, "benchmark_enable": enable}
    return SimpleNamespace(getoption=options.__getitem__)


@pytest.mark.parametrize("disable, enable, skip, expected", [
    (False, False, False, True),   # off only because xdist is on: measure again
    (True, False, False, False),   # --benchmark-disable: stays off
    (True, True, False, True),     # --benchmark-enable wins over --benchmark-disable
    (False, False, True, False),   # --benchmark-skip: nothing to measure
])
def test_pytest_benchmark_5_2_is_read_from_its_options(disable, enable, skip, expected):
    session = SimpleNamespace(disabled=True, skip=skip)  # 5.2 keeps no xdist_warning flag
    assert _disabled_by_xdist(_config(disable, enable), session) is expected


def test_pytest_benchmark_5_1_flag_is_used_and_cleared():
    session = SimpleNamespace(disabled=True, skip=False, xdist_warning=True)
    assert _disabled_by_xdist(_config(), session) is True and session.xdist_warning is False
    assert _disabled_by_xdist(_config(), SimpleNamespace(disabled=True, skip=False, xdist_warning=False)) is False
