"""dtype auto: the fastest dtype the device computes natively, and ids that never name a dtype."""

from __future__ import annotations

import pytest
import torch

from lorabench.backends import precision
from lorabench.matrix import DEFAULT_CONFIGS


@pytest.mark.parametrize(("machine", "flags", "native"), [
    ("x86_64", {"avx2", "fma"}, False),  # AVX2 only: bf16 is emulated
    ("x86_64", {"avx2", "avx512f", "avx512bw"}, False),  # AVX512 without its BF16 extension
    ("x86_64", {"avx2", "avx512f", "avx512_bf16"}, True),
    ("x86_64", {"avx2", "amx_bf16", "amx_tile"}, True),
    ("aarch64", {"fp", "asimd", "bf16"}, True),
    ("aarch64", {"fp", "asimd"}, False),
])
def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, machine, flags, native):
    monkeypatch.setattr(precision.platform, "machine", lambda: machine)
    assert precision.cpu_has_native_bf16(frozenset(flags)) is native


def test_cpu_flags_are_parsed_from_cpuinfo(tmp_path):
    precision.cpu_flags.cache_clear()
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert precision.cpu_flags(str(info)) == frozenset({"fpu", "avx2", "avx512_bf16"})
    assert precision.cpu_flags(str(tmp_path / "missing")) == frozenset()
    precision.cpu_flags.cache_clear()


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_takes_the_cpus_native_dtype_and_a_forced_one_stays(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda flags=None: native)
    cpu = torch.device("cpu")
    assert precision.resolve_dtype("auto", cpu) == expected
    assert precision.resolve_dtype("bf16", cpu) == "bf16"
    assert precision.resolve_dtype("fp32", cpu) == "fp32"


@pytest.mark.parametrize(("capability", "expected"), [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"),
                                                      ((9, 0), "bf16")])
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    assert precision.native_dtype(torch.device("cuda:0")) == expected


def test_torch_dtype_refuses_an_unresolved_name():
    assert precision.torch_dtype("fp16") is torch.float16
    with pytest.raises(ValueError, match="not resolved"):
        precision.torch_dtype("auto")


def test_no_default_case_id_names_a_dtype():
    for config in DEFAULT_CONFIGS:
        assert config.dtype == "auto"
        assert not any(name in config.id for name in ("bf16", "fp16", "fp32")), config.id
