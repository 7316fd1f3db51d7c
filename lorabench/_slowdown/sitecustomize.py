"""A 30% (or ``LORABENCH_SLOWDOWN``) slower training step, for proving the regression gate.

Put first on ``PYTHONPATH`` by :mod:`lorabench.gate_proof` only; every Python process of that run
(pytest, the forkserver, each case process) then runs every ``Trainer.training_step`` that fraction
longer, spending the extra time on more of the same kind of work (multi-threaded matrix products),
so the slowdown competes for the cores like the step itself does. Nothing else imports this file.
"""

import os
import time

_FRACTION = float(os.environ.get("LORABENCH_SLOWDOWN") or 0)

if _FRACTION > 0:
    import torch
    from transformers import Trainer

    _training_step = Trainer.training_step
    _work = torch.randn(128, 128, generator=torch.Generator().manual_seed(0))

    def _slower_training_step(self, *args, **kwargs):
        started = time.perf_counter()
        out = _training_step(self, *args, **kwargs)
        until = time.perf_counter() + _FRACTION * (time.perf_counter() - started)
        while time.perf_counter() < until:
            torch.mm(_work, _work)
        return out

    Trainer.training_step = _slower_training_step
