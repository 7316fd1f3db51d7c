"""What a CUDA process holds beyond its tensors: named terms, each with where its figure comes from.

Tensor bytes (predicted exactly by :mod:`lorabench.estimate`) are what
``torch.cuda.max_memory_allocated`` counts, less the caching allocator's rounding. A card
also holds the CUDA context (driver, kernels; outside the allocator) and the cuBLAS
workspaces (inside it). The context and workspace figures below are public figures, not
measurements of this machine: lorabench's own runs here have no GPU. The allocator's
rounding is computed from the storages alive at the predicted peak. Not included: cached
but unused blocks (``peak_reserved_mib - peak_alloc_mib``), which depend on the order of
allocations and on ``PYTORCH_CUDA_ALLOC_CONF``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lorabench.footprint import MIB

CUDA_BLOCK_BYTES = 512  # the caching allocator's smallest block: every tensor takes a multiple of it


@dataclass(frozen=True)
class RuntimeTerm:
    """A named term of a prediction that no tensor shows.

    Attributes:
        name: the component's name (``cuda_context``).
        mib: its size.
        source: where the figure comes from, and whether it was measured.
    """

    name: str
    mib: float
    source: str


CUDA_CONTEXT = RuntimeTerm(
    "cuda_context", 512.0,
    "assumed, not measured here (no GPU): the first CUDA call's context, ~0.3-0.8 GiB by GPU, driver and CUDA "
    "version (723 MiB in https://discuss.pytorch.org/t/what-is-the-reason-for-pytorchs-gpu-memory-floor/73021)")
CUBLAS_WORKSPACE = RuntimeTerm(
    "cublas_workspace", 8.125 + 32.0,
    "assumed, not measured here (no GPU): cuBLAS handle workspace 8.125 MiB (CUBLAS_WORKSPACE_CONFIG default "
    ":4096:2:16:8, aten/src/ATen/cuda/CublasHandlePool.cpp) plus the cuBLASLt workspace, 32 MiB on Hopper "
    "(pytorch/pytorch#120925; 1-4 MiB on earlier GPUs)")


def allocator_rounding(storage_bytes: Iterable[int], block: int = CUDA_BLOCK_BYTES) -> int:
    """Bytes the caching allocator adds by rounding each storage up to a whole number of blocks."""
    return sum(-size % block for size in storage_bytes)


def cuda_terms(storage_bytes: Iterable[int]) -> list[RuntimeTerm]:
    """The runtime terms of a CUDA prediction, given the sizes of the storages alive at its peak."""
    rounding = RuntimeTerm("allocator_rounding", allocator_rounding(storage_bytes) / MIB,
                           f"computed: each live storage rounded up to {CUDA_BLOCK_BYTES} bytes (CUDACachingAllocator)")
    return [rounding, CUBLAS_WORKSPACE, CUDA_CONTEXT]
