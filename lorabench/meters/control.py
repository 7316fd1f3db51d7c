"""A control workload timed next to every training step, so step times can be judged under load.

On a shared machine a training step takes longer whenever other work competes for the cores,
and a run-to-run comparison of raw step times then reports the machine's load, not the code.
A fixed amount of work (the same matrix products on every machine and in every run), timed in
the same process just before each step, slows down with the step under the same competition.
The ratio ``step time / control time`` (the controls just before and after the step) is what
``lorabench compare`` gates:
it moves when the step's own work changes and stays put when the machine gets busier.

The control is timed outside pytest-benchmark's rounds (as ``pedantic``'s untimed ``setup``), so
the stored step statistics are the training steps alone.

What the control does matters on the CPU: a busy machine does not slow every kind of work alike.
Under a CPU hog on a 2-core VM, fixed fp32 matrix products and a tiny model's training step moved
apart by 20-26% (the step's many small operators gained more from cores that never went idle).
So on the CPU the control is a small training step of its own: one transformer block, forward and
backward, in the case's compute dtype; its ratio to a one-thread training step stayed within 5%
with and without a hog (docs/benchmarks.md). On CUDA it is matrix products: the host's load
barely moves a GPU's work.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

# Deferred imports: torch inside the functions that use them: what only reads a configuration or a stored run
# starts without them.

# CUDA: about 1 ms of fp32 matrix products on a data-centre GPU. CPU: one block of the tiny zoo's
# shape (hidden 256, 4 heads, MLP 704) on a batch of 16 x 14 tokens, ~10-20 ms on a 2-core CPU.
# Fixed, so that a control time is comparable across runs of the same machine.
_CUDA_MATMUL = (2048, 16)
_CPU_BLOCK = dict(hidden=256, heads=4, ffn=704, batch=16, tokens=14)
CONTROL_VERSION = 2  # recorded with every run: 1 was fp32 matrix products on the CPU too


def ratio_in_cpu_time(device_type: str) -> bool:
    """Whether a device's step/control ratio divides the process's CPU time (the work done: on the CPU)
    rather than wall time (on a GPU, whose work the host only waits for)."""
    return device_type == "cpu"


class ControlPass(NamedTuple):
    wall_s: float  # after a device synchronize on CUDA
    cpu_s: float  # the process's CPU time over the pass (all threads)


class ControlWorkload:
    """A fixed amount of work on ``device``; :meth:`run` times one pass.

    Args:
        device: the torch device the training steps run on.
        dtype: the steps' compute dtype (the CPU control computes in it).
    """

    def __init__(self, device, dtype=None) -> None:
        import torch

        self.device = device
        with torch.random.fork_rng(devices=[]):  # the training's random state stays as it was
            torch.manual_seed(0)
            if device.type == "cuda":
                size, self.repeats = _CUDA_MATMUL
                self.a = torch.randn(size, size).to(device)
                self.b = torch.randn(size, size).to(device)
                self.out = torch.empty(size, size, device=device)
            else:
                shape = _CPU_BLOCK
                self.block = torch.nn.TransformerEncoderLayer(
                    shape["hidden"], shape["heads"], shape["ffn"], dropout=0.0, batch_first=True,
                ).to(device=device, dtype=dtype or torch.float32)
                self.x = torch.randn(shape["batch"], shape["tokens"], shape["hidden"]).to(self.block.linear1.weight)

    def _work(self) -> None:
        import torch

        if self.device.type == "cuda":
            for _ in range(self.repeats):
                torch.mm(self.a, self.b, out=self.out)
            return
        with torch.enable_grad():
            self.block(self.x).float().square().mean().backward()
        self.block.zero_grad(set_to_none=True)

    def run(self) -> ControlPass:
        """One pass of the control work.

        Returns:
            Its wall time and the process's CPU time, in seconds.
        """
        import torch
        from torch.utils._python_dispatch import _disable_current_modes

        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        # the control is not the model's work: a tensor tracker around the step must not count its tensors
        with _disable_current_modes():
            cpu_started = time.process_time()
            started = time.perf_counter()
            self._work()
            if cuda:
                torch.cuda.synchronize(self.device)
            return ControlPass(time.perf_counter() - started, time.process_time() - cpu_started)


def paired_ratios(step_s: list[float], control_s: list[float]) -> list[float]:
    """``step / control`` for each step, the control being the geometric mean of the passes timed just
    before and just after it (one shared pass between two steps), or the one before where none follows.

    Bracketing a step with two controls halves the error of a load change that starts or ends
    mid-step, at no extra cost: the pass after step i is the pass before step i+1.

    Args:
        step_s: step times.
        control_s: the control pass before each step, plus optionally one after the last step.

    Raises:
        ValueError: ``control_s`` is neither as long as ``step_s`` nor one longer, or a control time is not positive.
    """
    if len(control_s) not in (len(step_s), len(step_s) + 1):
        raise ValueError(f"{len(step_s)} step times but {len(control_s)} control times: "
                         "they must pair up (one control before each step, optionally one after the last)")
    if any(c <= 0 for c in control_s):
        raise ValueError("a control time is not positive")
    ratios = []
    for i, step in enumerate(step_s):
        before = control_s[i]
        after = control_s[i + 1] if i + 1 < len(control_s) else before
        ratios.append(step / math.sqrt(before * after))
    return ratios
