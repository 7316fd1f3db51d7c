"""Launchers: where a case runs, over the one case protocol (:mod:`lorabench.kinds.protocol`).

A caller resolves a case once with :func:`resolve_case` (the one place a case's configuration
is resolved: open fields from its model's defaults, ``dtype: auto`` from the device) and hands
it to a launcher, which builds its data once (:meth:`Launcher.start`, in the launching process)
and runs it:

- :class:`InlineLauncher`: in this process (``--isolate none``);
- :class:`ProcessLauncher`: in a process of its own (``--isolate process``, the default; the
  mechanics are :mod:`lorabench.run.isolation`);
- :class:`TorchrunLauncher`: on ``world_size`` ranks under torchrun (the mechanics are
  :mod:`lorabench.run.distributed`).

Every launcher returns a :class:`lorabench.kinds.protocol.CaseRunner`: the kind's runner itself, or a
:class:`WorkerRun`, the parent's handle that sends each phase as a command to the worker's
command loop (:func:`lorabench.kinds.protocol.serve`). :func:`lorabench.kinds.protocol.measure` drives either.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from lorabench.config import BenchConfig, resolve
from lorabench.run.distributed import TorchrunRanks
from lorabench.errors import ConfigError
from lorabench.run.isolation import CaseProcess, ChildFailed
from lorabench.kinds.protocol import (
    EXIT,
    CaseAborted,
    CaseRunner,
    ResolvedCase,
    RunOptions,
    Timer,
    build_runner,
    measure,
    with_data,
)
from lorabench.result import CaseResult
from lorabench.training.loop import simple_timer

DataFor = Callable[[ResolvedCase], Any]  # a caller's own source of a case's data (a session's cache)


def resolve_case(kind: str, *, case_id: str, model: str, dataset: str, device, config: BenchConfig | None = None,
                 source=None, params: Any = None, data: Any = None, options: RunOptions | None = None) -> ResolvedCase:
    """A case as its runner receives it: its configuration resolved, here and nowhere below.

    Args:
        kind: a registered kind (:mod:`lorabench.case_kinds`).
        case_id: the id recorded with the result.
        model: the model's name as records carry it.
        dataset: the data set's name as records carry it.
        device: the torch device it runs on.
        config: the configuration as written (open fields ``None``, ``dtype`` maybe ``auto``); ``None``
            for a kind without one.
        source: the model it loads (:class:`lorabench.models.loading.ModelSource`); its ``defaults`` fill the
            configuration's open fields (:func:`lorabench.models.loading.train_defaults` decides them).
        params: the kind's own description of the case (see :class:`lorabench.kinds.protocol.ResolvedCase`).
        data: its data, where the caller has it already; else a launcher builds it.
        options: how it runs.

    Raises:
        ConfigError: a configuration without the model source whose defaults resolve it, or ``dtype: auto``
            without a device.
    """
    if config is not None:
        if source is None:
            raise ConfigError(f"case {case_id!r}: its configuration needs the model source whose defaults fill it")
        config = resolve(config, source.defaults, device)
    return ResolvedCase(kind=kind, case_id=case_id, model=model, dataset=dataset, device=device, config=config,
                        source=source, params=params, data=data, options=options or RunOptions())


class Launcher:
    """Where a case runs. A subclass says how in :meth:`_start`."""

    name = ""

    def start(self, case: ResolvedCase, data_for: DataFor | None = None) -> CaseRunner:
        """A runner of ``case``, not yet prepared, with its data built in this process (:func:`with_data`)."""
        return self._start(with_data(case, data_for))

    def run(self, case: ResolvedCase, timer: Timer = simple_timer, data_for: DataFor | None = None) -> CaseResult:
        """Run ``case`` to its record (:func:`lorabench.kinds.protocol.measure`)."""
        return measure(self.start(case, data_for), timer)

    def _start(self, case: ResolvedCase) -> CaseRunner:
        raise NotImplementedError


class InlineLauncher(Launcher):
    """In this process: the kind's runner itself."""

    name = "none"

    def _start(self, case: ResolvedCase) -> CaseRunner:
        return build_runner(case)


class ProcessLauncher(Launcher):
    """One process per case, so that no case's memory figures depend on the cases before it.

    Args:
        quiet: the case process filters libraries' notices (below ``-v``).
    """

    name = "process"

    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet

    def _start(self, case: ResolvedCase) -> WorkerRun:
        return WorkerRun(case, CaseProcess(case, quiet=self.quiet))


class TorchrunLauncher(Launcher):
    """``world_size`` ranks under torchrun (DDP or FSDP2), rank 0 obeying this process.

    Args:
        quiet: the ranks filter libraries' notices (below ``-v``).
    """

    name = "torchrun"

    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet

    def _start(self, case: ResolvedCase) -> WorkerRun:
        return WorkerRun(case, TorchrunRanks(case, quiet=self.quiet))


def launcher_for(config: BenchConfig | None, isolate: str, *, quiet: bool = False) -> Launcher:
    """The launcher of a case: torchrun for a multi-process configuration, else as ``--isolate`` says
    (``process`` or ``none``)."""
    if config is not None and config.world_size > 1:
        return TorchrunLauncher(quiet=quiet)
    if isolate == "process":
        return ProcessLauncher(quiet=quiet)
    return InlineLauncher()


class WorkerRun:
    """The parent's handle on a case whose runner works elsewhere (a case process, torchrun's rank 0):
    the protocol's phases as commands, each one round trip (what pytest-benchmark times as a step).

    Args:
        case: the resolved case.
        worker: the mechanics (:class:`lorabench.run.isolation.CaseProcess`,
            :class:`lorabench.run.distributed.TorchrunRanks`): ``start()`` returns the connection,
            ``result(record)`` makes the case's record of the ``result`` reply, ``stop(finished)`` ends
            it, ``death_result()`` is the record of a worker that died without reporting.
    """

    def __init__(self, case: ResolvedCase, worker) -> None:
        self.case = case
        self.case_id = case.case_id
        self.config = case.config
        self.worker = worker
        self.base_eval = case.options.base_eval
        self.outputs = None
        self.rounds = self.warmup_rounds = 0  # the worker's runner says, when it is ready
        self._conn = None
        self._finished = False

    def prepare(self) -> None:
        self._conn = self.worker.start()
        ready = self._await("ready")
        self.base_eval, self.rounds, self.warmup_rounds = ready["base_eval"], ready["rounds"], ready["warmup_rounds"]

    def step(self) -> float | None:
        self._conn.send("step")
        return self._await("stepped")

    def control(self) -> None:
        """Time the control workload in the worker, just before the next step."""
        self._conn.send("control")
        self._await("controlled")

    def ping(self) -> None:
        """One round trip with no work, to measure what the connection adds to a step."""
        self._conn.send("ping")
        self._await("pong")

    def finish(self) -> CaseResult:
        self._conn.send("finish")
        record, self.outputs = self._await("result")
        self._finished = True
        return self.worker.result(record)

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(EXIT)
            except OSError:  # the worker is gone already
                pass
            self._conn.close()
            self._conn = None
        self.worker.stop(self._finished)

    def _await(self, expected: str):
        """Read messages until the expected reply (its payload), re-emitting log records on the way."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                raise CaseAborted(self.worker.death_result()) from None
            kind = message[0]
            if kind == "log":
                _, name, level, text = message
                logging.getLogger(name).log(level, "%s", text)
            elif kind == expected:
                return message[1] if len(message) == 2 else message[1:]
            elif kind == "aborted":
                raise CaseAborted(CaseResult.from_extra_info(message[1]))
            elif kind == "failed":
                if message[1].startswith("KeyboardInterrupt"):  # Ctrl-C reached the case process: stop as inline
                    raise KeyboardInterrupt(f"{self.case_id}: the case process was interrupted")
                raise ChildFailed(f"{self.case_id}: {message[1]}", message[2])
            else:
                raise ChildFailed(f"{self.case_id}: unexpected message {kind!r} from the case process")
