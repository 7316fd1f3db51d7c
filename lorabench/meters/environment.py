"""What a result was measured on: hardware and library versions, recorded with every result."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform

from lorabench import backends
from lorabench.meters.control import CONTROL_VERSION
import lorabench

# Deferred imports: torch inside the functions that use them: what only reads a configuration or a stored run
# starts without them; pynvml (CUDA machines only) where needed: optional.

# every quantization backend's library too: a backend's figures move with its version
LIBRARIES = ("torch", "transformers", "peft", *(b.install for b in backends.backends()), "accelerate", "datasets",
             "pytest-benchmark")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


@functools.lru_cache(maxsize=1)
def omp_wait_policy() -> str:
    """How idle OpenMP threads wait in this process: ``OMP_WAIT_POLICY`` as OpenMP read it at torch's import."""

    value = os.environ.get("OMP_WAIT_POLICY") or "unset (the OpenMP runtime's default: spin, then sleep)"
    if not lorabench.OMP_WAIT_POLICY_APPLIED:
        return f"{value}, but set after torch was imported: the runtime's default applies"
    return value


def machine() -> dict[str, object]:
    """Hardware and versions; GPU fields are ``None`` (not 0, not "") where there is no GPU."""
    import torch

    info: dict[str, object] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),  # AVX2, AVX512, ...: selects calibrated timing gates
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": omp_wait_policy(),
        "control_version": CONTROL_VERSION,
        **{f"{k}_version": v for k, v in library_versions().items()},
        "cuda_version": torch.version.cuda,
        "gpu_name": None,
        "gpu_count": 0,
        "gpu_memory_mib": None,
        "gpu_driver": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu_name=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_mib=props.total_memory // (1024 * 1024),
            gpu_capability=".".join(map(str, torch.cuda.get_device_capability(0))),
        )
        try:
            import pynvml

            pynvml.nvmlInit()
            info["gpu_driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:
            pass
    return info
