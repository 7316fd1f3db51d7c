"""The case protocol: every kind of case runs in the same phases, wherever it runs.

A runner (:class:`CaseRunner`) is built from a :class:`ResolvedCase`, the case as a launcher
(:mod:`lorabench.run.launch`) hands it down: its configuration resolved, its data built, once. Then
``prepare`` (load, meters on), ``step`` (one timed unit: an optimizer step, a generate call, a
round of quantization), ``control`` (the untimed control workload before a step, where the kind
has one), ``finish`` (stop the meters, evaluate, return the :class:`lorabench.result.CaseResult`)
and ``close`` (free what holds memory). :func:`measure` drives those phases with a timer.

In a case process or on torchrun's ranks the same phases arrive as commands over a connection;
:func:`serve` is that command loop, the one place a worker obeys its parent, and
:func:`build_runner` the one way a worker makes the runner of a case (the kind's, from its
registration in :mod:`lorabench.case_kinds`).
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from lorabench import case_kinds
from lorabench.config import BenchConfig
from lorabench.errors import ConfigError
from lorabench.result import CaseResult
from lorabench.training.loop import simple_timer

Timer = Callable[[Callable[[], Any], int, int, Callable[[], None]], Any]  # (step, rounds, warmup_rounds, control)


class CaseAborted(Exception):
    """A case stopped early (out of memory, divergence); ``result`` holds what was measured."""

    def __init__(self, result: CaseResult) -> None:
        super().__init__(result.error)
        self.result = result


@dataclass(frozen=True)
class RunOptions:
    """How a case runs, beside what it is (every field optional; fine-tuning reads them all).

    Args:
        report_to: the Trainer's ``report_to`` (``none``, ``tensorboard``, ``wandb``).
        log_dir: where those integrations write.
        memory_budget: bytes the case may use (``--memory-budget``); ``None`` for no cap.
        adapter_dir: where to keep the trained adapter (``None``: a temporary directory).
        base_eval: the base model's evaluation from an earlier case of the same base, to reuse.
        cpu_threads: torch's intra-op threads for a case on the CPU (``None``: leave torch's setting).
        parallel: this rank's part in a multi-process case (:class:`lorabench.run.distributed.RankParallel`),
            set on the rank; ``None`` for a case in one process.
    """

    report_to: str = "none"
    log_dir: str | None = None
    memory_budget: int | None = None
    adapter_dir: str | None = None
    base_eval: Any = None
    cpu_threads: int | None = None
    parallel: Any = None


@dataclass(frozen=True)
class ResolvedCase:
    """A case as its runner receives it: resolved once, by the launcher, and passed down unchanged.

    It pickles, so a case process or a torchrun rank gets exactly what an in-process run gets.

    Args:
        kind: the registered kind (:mod:`lorabench.case_kinds`) whose runner runs it.
        case_id: the id recorded with the result (the pytest id).
        model: the model's name as records carry it.
        dataset: the data set's name as records carry it.
        device: the torch device it runs on.
        config: the configuration with every open field filled (:func:`lorabench.config.resolve`);
            ``None`` for a kind without one.
        source: the model it loads (:class:`lorabench.models.loading.ModelSource`), where it loads one.
        params: the kind's own description of the case (an inference variant and its timing protocol,
            the weights a quantization-error case measures); ``None`` where the configuration says all.
        data: what the runner trains or evaluates on, built once by the launcher (tokenized splits,
            a tokenizer); ``None`` until built, and for a kind that needs none.
        options: how it runs (:class:`RunOptions`).
    """

    kind: str
    case_id: str
    model: str
    dataset: str
    device: Any
    config: BenchConfig | None = None
    source: Any = None
    params: Any = None
    data: Any = None
    options: RunOptions = field(default_factory=RunOptions)

    def with_options(self, **changes) -> ResolvedCase:
        """The same case with some :class:`RunOptions` changed."""
        return replace(self, options=replace(self.options, **changes))

    def unmeasured(self, *, status: str, error: str) -> CaseResult:
        """The record of this case when it stopped before it could report anything."""
        config = self.config.to_dict() if self.config is not None else {"kind": self.kind}
        return CaseResult(case_id=self.case_id, config_id=self.config.id if self.config is not None else self.case_id,
                          model=self.model, dataset=self.dataset, device=str(self.device), config=config,
                          status=status, error=error)


@runtime_checkable
class CaseRunner(Protocol):
    """One case in phases, so that a timer can drive the timed steps in between.

    Built as ``Runner(resolved_case)``; the class's ``data(resolved_case)`` builds what the runner
    consumes (a launcher calls it once, in the launching process, where the caller has not).

    Attributes:
        rounds: the timed steps the timer runs after the warm-up (known after ``prepare``).
        warmup_rounds: the untimed steps before them.
        base_eval: what ``prepare`` measured of the base model that a later case of the same base may
            reuse (fine-tuning's evaluation before training); ``None`` where the kind measures none.
        outputs: what ``finish`` produced besides the record, for the caller (an inference variant's
            generations, which drift compares); ``None`` where nothing.
    """

    rounds: int
    warmup_rounds: int
    base_eval: Any
    outputs: Any

    def prepare(self) -> None:
        """Load, start the meters. Raises: :class:`CaseAborted` where a measurement outcome stops it."""

    def step(self) -> float | None:
        """One timed unit of work; fine-tuning returns its loss, other kinds ``None``."""

    def control(self) -> None:
        """The untimed control workload just before the next step (:mod:`lorabench.meters.control`), or nothing."""

    def finish(self) -> CaseResult:
        """Complete the steps a timer did not run, stop the meters, evaluate and return the record."""

    def close(self) -> None:
        """Drop what holds memory; safe to call more than once."""


def measure(run: CaseRunner, timer: Timer = simple_timer) -> CaseResult:
    """Drive a case's runner (in this process or another): prepare, timed steps, finish.

    Args:
        run: the runner, or a launcher's handle on one in another process.
        timer: ``timer(step, rounds, warmup_rounds, control)``: pytest-benchmark's ``pedantic`` in the
            suite (:func:`lorabench.pytest_plugin.step_timer`), :func:`lorabench.training.loop.simple_timer` elsewhere.

    Returns:
        The result, also when the case aborted (``status`` says how).
    """
    try:
        run.prepare()
        timer(run.step, run.rounds, run.warmup_rounds, run.control)
        return run.finish()
    except CaseAborted as exc:
        return exc.result
    finally:
        run.close()


def runner_class(kind: str) -> type:
    """The runner class a kind registered (``CaseKind.runner``, ``"module:Class"``), imported now.

    Raises:
        ConfigError: the kind is not registered, or registered no runner.
    """
    registered = case_kinds.kinds().get(kind)
    if registered is None or not registered.runner:
        known = ", ".join(name for name, k in case_kinds.kinds().items() if k.runner)
        raise ConfigError(f"case kind {kind!r} has no runner registered (kinds with one: {known})")
    module, _, name = registered.runner.partition(":")
    return getattr(importlib.import_module(module), name)


def with_data(case: ResolvedCase, data_for: Callable[[ResolvedCase], Any] | None = None) -> ResolvedCase:
    """``case`` with its data built, once: from ``data_for`` where given (a session's cache), else by its
    kind's runner (``Runner.data(case)``); a case whose data is built already is returned as it is."""
    if case.data is not None:
        return case
    data = data_for(case) if data_for is not None else runner_class(case.kind).data(case)
    return replace(case, data=data)


def build_runner(case: ResolvedCase) -> CaseRunner:
    """The runner of a resolved case, its data built where the launcher did not build it.

    The one place a runner is made from a case, in this process, a case process or a rank.
    """
    return runner_class(case.kind)(with_data(case))


# ----- the worker side: phases as commands over a connection -------------------------------
EXIT = "exit"


def serve(conn, build: Callable[[], CaseRunner], group=None) -> int:
    """The worker command loop: build and prepare the runner, then obey the parent until ``finish``.

    Replies, in order: ``("ready", {"base_eval", "rounds", "warmup_rounds"})`` after ``prepare``; then per
    command ``step`` -> ``("stepped", loss)``, ``control`` -> ``("controlled", None)``, ``ping`` (a round trip
    with no work, which measures what the connection adds to a step) -> ``("pong", None)``, and ``finish``
    -> ``("result", record, outputs)``. Anything else, or the parent closing the connection, ends the case.
    A measurement outcome (out of memory, divergence) is ``("aborted", record)``; any other error
    ``("failed", message, traceback)``.

    Args:
        conn: the connection to the parent (``None`` on the ranks of a group other than the first).
        build: makes the runner (a worker passes ``lambda: build_runner(case)``).
        group: a multi-process case's ranks (:class:`lorabench.run.distributed.RankGroup`): it broadcasts each
            command from the first rank, ends a step with a barrier, gathers every rank's record at finish,
            labels a failure with the rank and raises it; one process (:class:`OneProcess`) when omitted.

    Returns:
        The exit status: 0 when the case finished or was told to end, 1 when it aborted.

    Raises:
        The error of a rank in a group, after reporting it (torchrun then ends every rank).
    """
    group = group or OneProcess()
    try:
        run = build()
        run.prepare()
        _reply(conn, ("ready", {"base_eval": run.base_eval, "rounds": run.rounds,
                                "warmup_rounds": run.warmup_rounds}))
        while True:
            command = group.broadcast(_next_command(conn))
            if command == "step":
                loss = run.step()
                group.barrier()  # the step ends when every rank's step has
                _reply(conn, ("stepped", loss))
            elif command == "control":
                run.control()
                group.barrier()
                _reply(conn, ("controlled", None))
            elif command == "ping":
                _reply(conn, ("pong", None))
            elif command == "finish":
                _reply(conn, ("result", group.gather(run.finish().to_extra_info()), run.outputs))
                return 0
            else:
                return 0
    except CaseAborted as exc:  # out of memory or divergence (on this rank): report it, then end
        _reply(conn, ("aborted", exc.result.to_extra_info()))
        return 1
    except BaseException as exc:
        label = f"{group.label}: " if group.label else ""
        _reply(conn, ("failed", f"{label}{type(exc).__name__}: {exc}", traceback.format_exc()))
        if group.raises:
            raise
        return 1


class OneProcess:
    """The group of a single-process case for :func:`serve`: nothing to broadcast, wait for or gather. A
    failure is reported and the process ends with status 1 (a group's ranks raise it instead, so that
    torchrun ends them all)."""

    label = ""
    raises = False

    def broadcast(self, command):
        return command

    def barrier(self) -> None:
        pass

    def gather(self, record):
        return record


def _next_command(conn):
    """The parent's next command (``None`` on a rank without the connection); the end when it is gone."""
    if conn is None:
        return None
    try:
        return conn.recv()
    except EOFError:  # the parent closed the case early
        return EXIT


def _reply(conn, message: tuple) -> None:
    """Send to the parent, unless this worker has no connection or the parent is gone: it stopped the
    case (a time limit reached as the process started) and closed the pipe, so there is no one to tell."""
    if conn is None:
        return
    try:
        conn.send(message)
    except OSError:
        pass
