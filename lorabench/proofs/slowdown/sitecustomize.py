"""A training step that does 30% (or ``LORABENCH_SLOWDOWN``) more work, for proving the regression gate.

Put first on ``PYTHONPATH`` by :mod:`lorabench.proofs.gate_under_load` only; every Python process of that run
(pytest, the forkserver, each case process) then follows every ``Trainer.training_step`` with more
of the same kind of work (multi-threaded matrix products) until the process has spent that
fraction more CPU time on the step. The extra is measured in CPU time, not wall time, because
that is what a slower code path adds: a fixed amount of work. Timed by the wall clock, the
injected work would shrink whenever a busy machine took the cores away (under a CPU hog a
"30% in wall time" injection added as little as 3% of work), and the proof would measure the load.
Nothing else imports this file.
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
        started = time.process_time()
        out = _training_step(self, *args, **kwargs)
        until = time.process_time() + _FRACTION * (time.process_time() - started)
        while time.process_time() < until:
            torch.mm(_work, _work)
        return out

    Trainer.training_step = _slower_training_step
