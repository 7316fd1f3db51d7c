"""The compute dtype a case runs in: the fastest one the device computes natively.

A configuration asks for ``dtype: auto`` unless the user forces one. ``auto`` resolves per device:

- CUDA: bf16 from compute capability 8.0 (Ampere) on; fp16 below (T4, V100, older 6 GB cards),
  whose tensor cores have no bf16;
- CPU: bf16 where the CPU has bf16 instructions (x86 AVX512-BF16 or AMX-BF16, Arm's BF16
  extension); fp32 elsewhere, because there every bf16 matmul is emulated and ~10x slower
  than fp32 (AVX2-only CPUs: most laptops and many CI runners).

The resolved dtype is what every result records (its ``config.dtype``), so two runs on different
machines say which precision each one trained in; case ids never name a dtype.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# Deferred imports: torch inside the functions that use them: what only reads a configuration or a stored run
# starts without them.

AUTO = "auto"
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# /proc/cpuinfo flags that mean bf16 arithmetic in hardware
_X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_ARM_BF16_FEATURES = ("bf16",)


def torch_dtype(name: str):
    """The torch dtype of a resolved name (``bf16``, ``fp16``, ``fp32``).

    Raises:
        ValueError: ``name`` is ``auto`` or unknown: resolve it first with :func:`resolve_dtype`.
    """
    import torch

    if name not in TORCH_DTYPES:
        raise ValueError(f"dtype {name!r} is not resolved; expected one of {', '.join(TORCH_DTYPES)}")
    return getattr(torch, TORCH_DTYPES[name])


@functools.lru_cache(maxsize=1)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as the kernel lists them; empty where there is no /proc/cpuinfo."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU computes bf16 in hardware (x86 AVX512-BF16/AMX-BF16, Arm BF16)."""
    flags = cpu_flags() if flags is None else flags
    wanted = _ARM_BF16_FEATURES if platform.machine().lower() in ("aarch64", "arm64") else _X86_BF16_FLAGS
    return any(f in flags for f in wanted)


def native_dtype(device) -> str:
    """The fastest training dtype ``device`` computes natively, with the reason.

    Returns:
        ``bf16``, ``fp16`` or ``fp32``.
    """
    return native_dtype_and_reason(device)[0]


def native_dtype_and_reason(device) -> tuple[str, str]:
    if device.type == "cuda":
        import torch

        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        if major >= 8:
            return "bf16", f"{name} (compute capability {major}.{minor}) has bf16 tensor cores"
        return "fp16", f"{name} (compute capability {major}.{minor} < 8.0) has no bf16 tensor cores"
    if device.type == "cpu":
        if cpu_has_native_bf16():
            return "bf16", "the CPU has bf16 instructions (AVX512-BF16, AMX-BF16 or Arm BF16)"
        return "fp32", "the CPU has no bf16 instructions, so bf16 would be emulated (~10x slower than fp32)"
    return "fp32", f"no native-dtype rule for device type {device.type!r}"


def resolve_dtype(requested: str, device) -> str:
    """``auto`` becomes the device's native dtype; a forced dtype stays as given."""
    return native_dtype(device) if requested == AUTO else requested


def predicted_dtype(requested: str, target: str) -> str:
    """``auto`` for a device that is not here (the memory model's ``target``): bf16 for ``cuda`` (a GPU of
    compute capability 8.0 or newer; force ``fp16`` for older cards), this CPU's native dtype for ``cpu``."""
    import torch

    if requested != AUTO:
        return requested
    return "bf16" if target == "cuda" else native_dtype(torch.device("cpu"))
