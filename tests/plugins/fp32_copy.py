"""A memory regression to inject into a bench run (``-p tests.plugins.fp32_copy``, with ``--isolate none``).

The optimizer keeps an fp32 copy of every trainable parameter from its first step on and
never frees it, as a forgotten master-weights copy would: +50% optimizer-state memory
for AdamW's two fp32 moments, invisible to a count of ``optimizer.state``.
"""

from __future__ import annotations

import lorabench.kinds.finetune

_make_trainer = lorabench.kinds.finetune.make_trainer


def _keep_copy(optimizer, args, kwargs) -> None:
    if not hasattr(optimizer, "fp32_copy"):
        optimizer.fp32_copy = [p.detach().float().clone() for g in optimizer.param_groups for p in g["params"]]


def make_trainer(*args, **kwargs):
    trainer = _make_trainer(*args, **kwargs)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    optimizer.register_step_post_hook(_keep_copy)
    return trainer


lorabench.kinds.finetune.make_trainer = make_trainer
