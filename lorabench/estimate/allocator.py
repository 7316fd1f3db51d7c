"""The CUDA caching allocator, replayed: peak allocated and peak reserved from a meta run's allocations.

``torch.cuda.max_memory_allocated`` counts the blocks the caching allocator hands out, not tensor
bytes, and ``max_memory_reserved`` counts the segments it took from the driver. Both follow from
the order of allocations and frees, which the meta run sees exactly (:class:`AllocationLog`).
:class:`CachingAllocator` replays that order through the rules of
``c10/cuda/CUDACachingAllocator.cpp`` with its default configuration (no ``PYTORCH_CUDA_ALLOC_CONF``,
one stream):

- every request is rounded up to a multiple of 512 bytes (``kMinBlockSize``); a 0-byte request takes none;
- requests up to 1 MiB (``kSmallSize``) come from the small pool, larger ones from the large pool;
- a request takes the smallest free block of its pool that holds it (best fit), split when the rest is
  at least 512 bytes (small pool) or more than 1 MiB (large pool); an unsplit block counts whole as allocated;
- with no such block, a new segment: 2 MiB (``kSmallBuffer``) for small requests, 20 MiB (``kLargeBuffer``)
  for requests under 10 MiB (``kMinLargeAlloc``), else the request rounded up to 2 MiB (``kRoundLarge``);
- a freed block merges with free neighbours of its segment; segments are never given back (no
  ``empty_cache``, no out-of-memory retry), so the peak reserved is the reserved at the end.

Not replayed (each a named limit of the figure): allocations made while the model loads (a 4-bit load
quantizes each weight on the GPU and frees its bf16 copy into the cache), scratch that kernels take
inside one operator, and other streams.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

from lorabench.meters.tensor_tracker import TensorTracker

MIN_BLOCK = 512  # kMinBlockSize
SMALL_SIZE = 1 << 20  # kSmallSize: the largest small-pool request
SMALL_BUFFER = 2 << 20  # kSmallBuffer: a small-pool segment
LARGE_BUFFER = 20 << 20  # kLargeBuffer: the segment of a request between 1 and 10 MiB
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc
ROUND_LARGE = 2 << 20  # kRoundLarge

SOURCE = ("replay of the meta run's allocations and frees through CUDACachingAllocator.cpp's default rules "
          "(512-byte rounding, 2 MiB small / 20 MiB large segments, best fit, splitting, merging); "
          "load-time caching and in-kernel scratch not replayed")


def round_size(nbytes: int) -> int:
    """The block size the allocator gives a request of ``nbytes`` (``round_size``)."""
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def segment_size(size: int) -> int:
    """The segment a request of rounded ``size`` asks the driver for when no cached block holds it."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class _Block:
    __slots__ = ("size", "segment", "offset", "small", "free", "prev", "next")

    def __init__(self, size: int, segment: int, offset: int, small: bool) -> None:
        self.size, self.segment, self.offset, self.small = size, segment, offset, small  # small: its pool
        self.free = True
        self.prev: _Block | None = None
        self.next: _Block | None = None

    def key(self) -> tuple[int, int, int]:
        return self.size, self.segment, self.offset


@dataclass(frozen=True)
class AllocatorPeaks:
    """What a replay ends with, in bytes: the peaks ``max_memory_allocated`` / ``max_memory_reserved`` report,
    and the managed memory beside the allocator (paged optimizer state)."""

    allocated: int
    reserved: int
    managed: int = 0


class CachingAllocator:
    """One device's caching allocator, one stream, default configuration."""

    def __init__(self) -> None:
        self._pools: dict[bool, list[tuple[int, int, int]]] = {True: [], False: []}  # small? -> sorted free keys
        self._free_blocks: dict[tuple[int, int], _Block] = {}  # (segment, offset) -> free block
        self._taken: dict[object, _Block | None] = {}
        self._segments = itertools.count()
        self.allocated = self.reserved = self.peak_allocated = 0

    def malloc(self, key, nbytes: int) -> None:
        """Hand out a block for ``nbytes`` under ``key`` (freed later by :meth:`free`)."""
        if nbytes == 0:
            self._taken[key] = None
            return
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        pool = self._pools[small]
        i = bisect.bisect_left(pool, (size, -1, -1))
        if i < len(pool):
            _, segment, offset = pool.pop(i)
            block = self._free_blocks.pop((segment, offset))
        else:
            block = _Block(segment_size(size), next(self._segments), 0, small)
            self.reserved += block.size
        rest = block.size - size
        if rest >= MIN_BLOCK if small else rest > SMALL_SIZE:
            tail = _Block(rest, block.segment, block.offset + size, small)
            tail.prev, tail.next = block, block.next
            if block.next is not None:
                block.next.prev = tail
            block.next, block.size = tail, size
            self._add_free(tail, small)
        block.free = False
        self._taken[key] = block
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)

    def free(self, key) -> None:
        """Return ``key``'s block to its pool, merged with free neighbours in its segment."""
        block = self._taken.pop(key, None)
        if block is None:
            return
        self.allocated -= block.size
        small = block.small
        for neighbour in (block.prev, block.next):
            if neighbour is not None and neighbour.free:
                self._remove_free(neighbour, small)
                if neighbour is block.prev:
                    neighbour.size += block.size
                    neighbour.next = block.next
                    if block.next is not None:
                        block.next.prev = neighbour
                    block = neighbour
                else:
                    block.size += neighbour.size
                    block.next = neighbour.next
                    if neighbour.next is not None:
                        neighbour.next.prev = block
        block.free = True
        self._add_free(block, small)

    def peaks(self) -> AllocatorPeaks:
        return AllocatorPeaks(self.peak_allocated, self.reserved)

    def _add_free(self, block: _Block, small: bool) -> None:
        block.free = True
        bisect.insort(self._pools[small], block.key())
        self._free_blocks[block.segment, block.offset] = block

    def _remove_free(self, block: _Block, small: bool) -> None:
        pool = self._pools[small]
        i = bisect.bisect_left(pool, block.key())
        if i < len(pool) and pool[i] == block.key():
            pool.pop(i)
        self._free_blocks.pop((block.segment, block.offset), None)


class AllocationLog(TensorTracker):
    """The tensor tracker, also writing down every storage's birth and death in order (:attr:`events`:
    ``(key, nbytes)`` for an allocation, ``(key, None)`` for a free); storages alive when it starts
    (parameters, optimizer state) come first, in the order they are registered."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # see __torch_dispatch__ below

    # The tracker's own dispatch, without the dynamo guard torch wraps around every mode's: it costs a few
    # microseconds of each operator call, and a meta run is never compiled.
    __torch_dispatch__ = getattr(TensorTracker.__torch_dispatch__, "__wrapped__", TensorTracker.__torch_dispatch__)

    def __init__(self, *args, **kwargs) -> None:
        self.events: list[tuple[int, int | None]] = []
        self.managed_bytes = 0  # storages in CUDA managed memory (``is_paged``): not the allocator's
        self._managed: set[int] = set()
        super().__init__(*args, **kwargs)

    def _register(self, t, phase: str, role: str | None) -> None:
        if getattr(t, "is_paged", False):
            key = id(t.untyped_storage())
            if key not in self._managed:
                self._managed.add(key)
                self.managed_bytes += t.untyped_storage().nbytes()
            super()._register(t, phase, role)
            return
        before = len(self._live)
        super()._register(t, phase, role)
        added = len(self._live) - before
        if added == 1:  # the common case: one new storage, the newest key
            key = next(reversed(self._live))
            self.events.append((key, self._live[key].nbytes))
        elif added:
            newest = list(itertools.islice(reversed(self._live), added))
            self.events.extend((key, self._live[key].nbytes) for key in reversed(newest))

    def _free(self, key: int) -> None:
        if key in self._live and key not in self._managed:
            self.events.append((key, None))
        super()._free(key)


def replay(events: list[tuple[int, int | None]], persistent: tuple[int, ...] = (), after: int = 0) -> AllocatorPeaks:
    """The peaks of ``events`` through a fresh :class:`CachingAllocator`; ``persistent`` blocks (cuBLAS
    workspaces) are allocated once the first ``after`` events (the model state) are in."""
    allocator = CachingAllocator()
    generation: dict[int, int] = {}  # a freed storage's id can come back for a new one
    for i, (key, nbytes) in enumerate(events):
        if i == after:
            for n, size in enumerate(persistent):
                allocator.malloc(("persistent", n), size)
        if nbytes is None:
            allocator.free((key, generation.get(key, 0)))
        else:
            generation[key] = generation.get(key, 0) + 1
            allocator.malloc((key, generation[key]), nbytes)
    if after >= len(events):
        for n, size in enumerate(persistent):
            allocator.malloc(("persistent", n), size)
    return allocator.peaks()
