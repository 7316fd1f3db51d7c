"""What a CUDA process holds beyond its tensors: named terms, each with where its figure comes from.

Tensor bytes (predicted exactly by :mod:`lorabench.estimate`) are not what a card shows:

- inside the caching allocator (so in ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved``):
  the cuBLAS workspaces, one per cuBLAS handle and stream, and a handle per thread that runs matmuls (the
  main thread's forward and the autograd engine's device thread's backward), plus the allocator's own
  rounding and cached free blocks (:mod:`lorabench.estimate.allocator` replays them);
- outside it (so only in the device total NVML or ``nvidia-smi`` shows): the CUDA context (driver state,
  the kernel images of torch and of every library that loads its own, cuBLAS handles' own state).

The workspace and context figures below come from PyTorch's source and public reports, not from a
measurement here: lorabench's own runs here have no GPU. Every case on CUDA records each prediction's
error against its own counter, which is how these assumptions get checked.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorabench.meters.footprint import MIB

MATMUL_THREADS = 2  # the main thread (forward, optimizer) and the autograd engine's CUDA device thread (backward)
CUBLAS_WORKSPACE_BYTES = 4096 * 8 * 1024  # the Hopper (sm90) default; :4096:2:16:8 = 8.125 MiB on other GPUs
CUBLASLT_WORKSPACE_BYTES = 1024 * 1024  # CUBLASLT_WORKSPACE_SIZE's default, 1024 KiB


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
    "assumed, not measured here (no GPU): the CUDA context outside the caching allocator (driver, kernel images "
    "of torch and the libraries it loads, cuBLAS handles' state), ~0.3-0.8 GiB by GPU, driver and CUDA version "
    "(723 MiB in https://discuss.pytorch.org/t/what-is-the-reason-for-pytorchs-gpu-memory-floor/73021); "
    "in the device total only")
CUBLAS_WORKSPACE = RuntimeTerm(
    "cublas_workspace", MATMUL_THREADS * (CUBLAS_WORKSPACE_BYTES + CUBLASLT_WORKSPACE_BYTES) / MIB,
    f"assumed, not measured here (no GPU): per cuBLAS handle and stream, a cuBLAS workspace of "
    f"{CUBLAS_WORKSPACE_BYTES / MIB:g} MiB (the sm90 default in aten/src/ATen/cuda/CublasHandlePool.cpp; 8.125 MiB "
    f"before Hopper) and a cuBLASLt workspace of {CUBLASLT_WORKSPACE_BYTES / MIB:g} MiB (CUBLASLT_WORKSPACE_SIZE's "
    f"default), both through the caching allocator; {MATMUL_THREADS} handles: the main thread's and the autograd "
    f"engine's device thread's")


def workspace_blocks() -> tuple[int, ...]:
    """The persistent blocks the cuBLAS workspaces take from the caching allocator, in bytes."""
    return (CUBLAS_WORKSPACE_BYTES, CUBLASLT_WORKSPACE_BYTES) * MATMUL_THREADS
