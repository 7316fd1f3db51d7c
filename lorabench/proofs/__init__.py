"""Proofs of the suite's own claims, kept apart from what a bench run uses.

- :mod:`lorabench.proofs.gate_under_load`: the regression gate's false-alarm and detection rates under
  a CPU hog (``scripts/gate-under-load``, ``tests/test_regression_gate.py``).
- :mod:`lorabench.proofs.overhead`: the harness's training step against a bare PyTorch loop
  (``bench/test_overhead.py``, marker ``overhead``).
- ``slowdown/sitecustomize.py``: a training step made slower on purpose, for the gate proof only.

Nothing in the run path imports this package.
"""
