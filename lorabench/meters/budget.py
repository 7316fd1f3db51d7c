"""Memory budget: answer "does this case fit in N GiB?" on a machine that has more.

- CUDA: ``torch.cuda.set_per_process_memory_fraction`` caps the caching allocator, so an
  allocation past the budget raises ``torch.OutOfMemoryError`` exactly where a smaller card
  would fail.
- CPU: there is no allocator cap to set (``RLIMIT_AS`` counts the virtual address space,
  which torch's thread pools and mappings inflate far beyond resident use). A watchdog
  thread samples the process RSS every few milliseconds; once RSS above the case's
  starting RSS passes the budget, it raises :class:`MemoryBudgetExceeded` in the main
  thread through a signal. A spike shorter than one sampling interval is caught when the
  case ends, from the kernel's peak mark (``VmHWM``, see :mod:`lorabench.meters.memory`).

Either way the case records "does not fit" with the memory it reached.
"""

from __future__ import annotations

import os
import re
import signal
import threading

from lorabench.errors import ConfigError
from lorabench.meters.footprint import MIB

# Deferred imports: psutil, torch inside the functions that use them: what only reads a configuration or a
# stored run starts without them.

_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")  # a sign too, so -5GiB is named as negative
SAMPLE_INTERVAL_S = 0.005
_SIGNAL = signal.SIGUSR1


def parse_size(text: str, *, option: str = "--memory-budget") -> int:
    """Bytes in a size such as ``6GiB``, ``512MiB`` or ``8GB`` (binary and decimal units).

    Raises:
        ConfigError: not a positive number with a known unit.
    """
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise ConfigError(f"{option} {text!r}: expected a size like 6GiB, 512MiB or 8GB "
                          f"(units: {', '.join(u for u in _UNITS if u)})")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{option} {text!r}: the budget must be more than 0 bytes")
    return size


class MemoryBudgetExceeded(MemoryError):
    """The case used more memory than ``--memory-budget`` allows."""


class MemoryBudget:
    """Caps one case's memory at ``limit_bytes`` above what the process held when it started.

    Args:
        limit_bytes: the budget.
        device: the torch device the case runs on.
    """

    def __init__(self, limit_bytes: int, device) -> None:
        self.limit_bytes = limit_bytes
        self.device = device
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous_handler = None
        self.exceeded_bytes: int | None = None

    @property
    def limit_mib(self) -> float:
        return self.limit_bytes / MIB

    def start(self, rss_before: int) -> None:
        """Start enforcing; ``rss_before`` is the RSS the case's own use is counted from."""
        if self.device.type == "cuda":
            import torch

            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.limit_bytes / total), self.device)
            return
        if threading.current_thread() is not threading.main_thread():
            raise ConfigError("--memory-budget on the CPU must run the case in the main thread")
        self._previous_handler = signal.signal(_SIGNAL, self._raise_in_main_thread)
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, args=(rss_before,), daemon=True,
                                        name="lorabench-memory-budget")
        self._thread.start()

    def stop(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            signal.signal(_SIGNAL, self._previous_handler)

    def violation(self, peak_delta_mib: float | None) -> str | None:
        """Why the case does not fit, judged from its measured peak; ``None`` when it fits."""
        if peak_delta_mib is not None and peak_delta_mib > self.limit_mib:
            return (f"does not fit the memory budget: peak grew by {peak_delta_mib:.1f} MiB, "
                    f"over the budget of {self.limit_mib:.1f} MiB")
        return None

    def _watch(self, rss_before: int) -> None:
        import psutil

        process = psutil.Process()
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            used = process.memory_info().rss - rss_before
            if used > self.limit_bytes:
                self.exceeded_bytes = used
                os.kill(os.getpid(), _SIGNAL)  # handled in the main thread, between bytecodes
                return

    def _raise_in_main_thread(self, signum, frame) -> None:
        used = (self.exceeded_bytes or 0) / MIB
        raise MemoryBudgetExceeded(
            f"RSS grew by {used:.1f} MiB, over the --memory-budget of {self.limit_mib:.1f} MiB (sampled every "
            f"{SAMPLE_INTERVAL_S * 1000:.0f} ms)"
        )
