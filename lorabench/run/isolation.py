"""One process per case, so no case's memory figures depend on the cases before it: the mechanics.

The child is forked from a forkserver that has already imported torch, transformers,
peft and bitsandbytes (never CUDA), so a case starts in milliseconds from the same
clean state every time. :class:`CaseProcess` starts it with the resolved case
(:class:`lorabench.kinds.protocol.ResolvedCase`, its data included) and the child serves the
protocol's commands (:func:`lorabench.kinds.protocol.serve`); the parent's side, where each step is
one round trip that pytest-benchmark times, is :class:`lorabench.run.launch.WorkerRun`. Log
records from the child are re-emitted in the parent, so progress shows in pytest's live log.

If the child dies (the kernel's OOM killer, a crash), the case records it instead
of taking the session down.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal

from lorabench import backends
from lorabench.case_kinds import BUILT_IN_MODULES
from lorabench.errors import LorabenchError
from lorabench.kinds.protocol import ResolvedCase, build_runner, serve
from lorabench.run.quiet import QUIET_ENV
from lorabench.result import STATUS_DOES_NOT_FIT, STATUS_ERROR, CaseResult

# Imported once by the forkserver; every case process inherits them. lorabench.run.quiet comes first, so that
# libraries' import-time notices are filtered in case processes too (below -v: all of them, see quiet).
# Every installed quantization library is among them, so no backend's load time includes importing it;
# so are the runner and every built-in kind's module, where the case process finds its runner.
PRELOAD = ["lorabench.run.quiet", "torch", "transformers", "peft", *backends.preload_modules(), "accelerate", "datasets",
           "lorabench.kinds.finetune", *BUILT_IN_MODULES]


class ChildFailed(LorabenchError):
    """The case process raised an error that is not a measurement outcome (bad input, a bug).

    ``traceback`` is the child's traceback, kept apart from the message so that reports show the
    message and keep the traceback for ``-v`` and Allure.
    """

    def __init__(self, message: str, traceback: str = "") -> None:
        super().__init__(message)
        self.traceback = traceback


def _context():
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


class _PipeLogHandler(logging.Handler):
    def __init__(self, conn) -> None:
        super().__init__()
        self.conn = conn

    def emit(self, record: logging.LogRecord) -> None:
        self.conn.send(("log", record.name, record.levelno, record.getMessage()))


def send_logs(conn) -> logging.Handler:
    """In a case process: send lorabench's log records (INFO and up) through ``conn`` to the parent,
    which shows them as its own, instead of printing them here.

    Returns:
        The handler, for ``logging.getLogger("lorabench").removeHandler`` when the process is done.
    """
    handler = _PipeLogHandler(conn)
    logger = logging.getLogger("lorabench")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler


def _child_main(conn, case: ResolvedCase) -> None:
    """The case process: the worker command loop (:func:`lorabench.kinds.protocol.serve`) over the pipe."""
    handler = send_logs(conn)
    try:
        serve(conn, lambda: build_runner(case))
    finally:
        logging.getLogger("lorabench").removeHandler(handler)
        conn.close()


class CaseProcess:
    """One case process, as :class:`lorabench.run.launch.ProcessLauncher` starts it: the mechanics alone
    (start, end, how it died); the commands it obeys are the protocol's (:class:`lorabench.run.launch.WorkerRun`).

    Args:
        case: the resolved case, data included; it travels to the process as it is.
        quiet: the process filters libraries' notices (below ``-v``).
    """

    def __init__(self, case: ResolvedCase, *, quiet: bool = False) -> None:
        self.case = case
        self._quiet = quiet
        self._process = None

    def start(self):
        """Start the process; returns the parent's end of its pipe."""
        ctx = _context()
        parent_end, child_end = ctx.Pipe()
        self._process = ctx.Process(target=_child_main, args=(child_end, self.case), daemon=True,
                                    name=f"lorabench-{self.case.case_id}")
        # The first start also starts the forkserver, which reads QUIET_ENV when it imports lorabench.run.quiet.
        saved = os.environ.get(QUIET_ENV)
        os.environ[QUIET_ENV] = "1" if self._quiet else "0"
        try:
            self._process.start()
        finally:
            if saved is None:
                del os.environ[QUIET_ENV]
            else:
                os.environ[QUIET_ENV] = saved
        child_end.close()
        return parent_end

    def result(self, record) -> CaseResult:
        """The case's record from the process's ``result`` reply."""
        return CaseResult.from_extra_info(record)

    def stop(self, finished: bool) -> None:
        """Wait for the process to end (after ``finish``) or end it (a case stopped mid-phase)."""
        if self._process is not None and self._process.pid is None:
            self._process = None  # stopped (time limit, Ctrl-C) before it started: nothing to wait for
        if self._process is not None:
            # A child stopped mid-phase (time limit, Ctrl-C) is busy and would not read "exit".
            self._process.join(timeout=10 if finished else 0)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._process = None

    def death_result(self) -> CaseResult:
        """The record of a case whose process died without reporting."""
        self._process.join(timeout=10)
        code = self._process.exitcode
        killed = code is not None and code < 0 and -code == signal.SIGKILL
        if killed:
            status = STATUS_DOES_NOT_FIT
            error = "the case process was killed (SIGKILL), most likely by the kernel's out-of-memory killer"
        else:
            status, error = STATUS_ERROR, f"the case process died with exit code {code}"
        return self.case.unmeasured(status=status, error=error)
