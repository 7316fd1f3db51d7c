"""Prove the regression gate both ways under load: no false alarm from a busy machine, a caught slowdown.

One repetition stores three real bench runs of one case and compares them with
``python -m lorabench compare --fail``:

- A: unchanged code on the machine as it is;
- B: unchanged code while a bounded CPU hog (busy processes, one per core) competes for the cores:
  the comparison A -> B must pass (exit 0);
- C: the same hog, and every training step given 30% more work (CPU time) of the same kind (the
  ``LORABENCH_SLOWDOWN`` hook of ``lorabench/proofs/slowdown/sitecustomize.py``): A -> C must fail
  (exit 1), naming ``step_control_ratio``.

``scripts/gate-under-load`` runs it N times and writes the false-alarm and detection rates;
``tests/test_regression_gate.py`` runs one repetition at small scale.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from lorabench.gates.compare import DEFAULT_ALPHA, compare_runs, step_ratio_shift
from lorabench.storage.history import select_run

# Deferred imports: torch inside the functions that use them: what only reads a configuration or a stored run
# starts without them.

SLOWDOWN_DIR = Path(__file__).resolve().parent / "slowdown"
DEFAULT_CASE = "qlora_nf4 and not sweep"
DEFAULT_STEPS = 20
HOG_LIMIT_S = 900  # a hog never outlives this, whatever happens to its parent


def _spin(deadline: float) -> None:
    x = 0
    while time.time() < deadline:
        x = (x * 1103515245 + 12345) % 2147483648


def _train(deadline: float) -> None:
    """Another tenant's training job: one thread of matrix products over ~40 MB of weights, which also
    competes for the caches and memory bandwidth a spinning loop leaves alone."""
    import torch

    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024))
    x = torch.randn(64, 1024)
    while time.time() < deadline:
        model(x).square().mean().backward()


HOGS = {"spin": _spin, "train": _train}


@contextlib.contextmanager
def cpu_hog(processes: int | None = None, limit_s: float = HOG_LIMIT_S, kind: str = "spin"):
    """Busy processes (one per core by default) for the duration of the block, at most ``limit_s``.

    Args:
        kind: ``spin`` (a busy loop) or ``train`` (a torch training loop, :func:`_train`).
    """
    count = processes or os.cpu_count() or 1
    deadline = time.time() + limit_s
    ctx = multiprocessing.get_context("spawn")
    hogs = [ctx.Process(target=HOGS[kind], args=(deadline,), daemon=True, name="lorabench-cpu-hog")
            for _ in range(count)]
    for hog in hogs:
        hog.start()
    try:
        yield count
    finally:
        for hog in hogs:
            hog.kill()
            hog.join()


def bench_run(root: Path, storage: Path, *, case: str = DEFAULT_CASE, steps: int = DEFAULT_STEPS,
              slowdown: float = 0.0, extra: tuple[str, ...] = (), timeout_s: float = 900) -> None:
    """One autosaved bench run of ``case`` into ``storage``, gates off (this is about stored runs).

    Args:
        slowdown: make every training step this fraction slower (0.3 = 30%).

    Raises:
        RuntimeError: the run failed (its output tail is in the message).
    """
    no_gates = storage.parent / f"{storage.name}-no-gates.yaml"
    no_gates.write_text("version: 1\nprofiles: {}\n")
    env = dict(os.environ)
    if slowdown:
        env["LORABENCH_SLOWDOWN"] = str(slowdown)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SLOWDOWN_DIR), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(root / "bench" / "test_finetune.py"), "-p", "no:cacheprovider",
         "--rootdir", str(root), "-k", case, "--steps", str(steps), "--benchmark-autosave",
         f"--benchmark-storage=file://{storage}", f"--thresholds={no_gates}", *extra],
        capture_output=True, text=True, timeout=timeout_s, cwd=root, env=env, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")


def compare(root: Path, storage: Path, run_a: str, run_b: str) -> subprocess.CompletedProcess:
    """``python -m lorabench compare RUN_A RUN_B --fail`` on ``storage``."""
    return subprocess.run([sys.executable, "-m", "lorabench", "compare", run_a, run_b, "--storage", str(storage),
                           "--fail"], capture_output=True, text=True, timeout=120, cwd=root, check=False)


@dataclass
class Repetition:
    unchanged_exit: int  # A -> B under the hog: 0 is right
    slowdown_exit: int  # A -> C under the hog with the slowdown: 1 naming step_control_ratio is right
    slowdown_named: bool
    ratio_change_pct: tuple[float | None, float | None]  # step_control_ratio change A->B, A->C
    step_change_pct: tuple[float | None, float | None]  # raw step_ms change A->B, A->C
    # the lower confidence bound of the per-step ratios' shift A->B, A->C: it must pass the tolerance to gate
    ratio_bound_pct: tuple[float | None, float | None]

    @property
    def false_alarm(self) -> bool:
        return self.unchanged_exit != 0

    @property
    def detected(self) -> bool:
        return self.slowdown_exit == 1 and self.slowdown_named


def repetition(root: Path, storage: Path, *, case: str = DEFAULT_CASE, steps: int = DEFAULT_STEPS,
               slowdown: float = 0.3, hog_processes: int | None = None, hog: str = "spin") -> Repetition:
    """Runs A, B (hog) and C (hog + slowdown) into a new ``storage`` and compares A -> B and A -> C."""
    storage.mkdir(parents=True, exist_ok=False)
    bench_run(root, storage, case=case, steps=steps)
    with cpu_hog(hog_processes, kind=hog):
        bench_run(root, storage, case=case, steps=steps)
        bench_run(root, storage, case=case, steps=steps, slowdown=slowdown)
    unchanged = compare(root, storage, "1", "2")
    slowed = compare(root, storage, "1", "3")
    regressions = slowed.stdout.split("regression(s):", 1)[-1]
    ab, ac = _pair_figures(storage, "1", "2"), _pair_figures(storage, "1", "3")
    return Repetition(
        unchanged_exit=unchanged.returncode,
        slowdown_exit=slowed.returncode,
        slowdown_named="step_control_ratio" in regressions,
        ratio_change_pct=(ab.ratio_change_pct, ac.ratio_change_pct),
        step_change_pct=(ab.step_change_pct, ac.step_change_pct),
        ratio_bound_pct=(ab.ratio_bound_pct, ac.ratio_bound_pct),
    )


class _PairFigures(NamedTuple):
    ratio_change_pct: float | None
    step_change_pct: float | None
    ratio_bound_pct: float | None


def _pair_figures(storage: Path, run_a: str, run_b: str) -> _PairFigures:
    """The changes (percent) of step_control_ratio and step_ms between two stored runs, and the lower
    confidence bound of the per-step ratios' shift, for the first case: one load and one comparison."""

    a, b = select_run(run_a, storage), select_run(run_b, storage)
    case_id = min(a.results)
    changes = {r.metric: r.change_pct for r in compare_runs(a, b).rows if r.case_id == case_id}
    shift = step_ratio_shift(a.results[case_id], b.results[case_id], DEFAULT_ALPHA) if case_id in b.results else None
    return _PairFigures(changes.get("step_control_ratio"), changes.get("step_ms"),
                        None if shift is None else shift.lower * 100)
