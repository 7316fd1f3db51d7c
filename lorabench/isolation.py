"""Run each case in its own process, so no case's memory figures depend on the cases before it.

The child is forked from a forkserver that has already imported torch, transformers,
peft and bitsandbytes (never CUDA), so a case starts in milliseconds from the same
clean state every time. The parent keeps the pytest side: each
:meth:`IsolatedCaseRun.step` is one round trip (send "step", the child runs one
optimizer step, reply), which is what pytest-benchmark times. Log records from the
child are re-emitted in the parent, so progress shows in pytest's live log.

If the child dies (the kernel's OOM killer, a crash), the case records it instead
of taking the session down.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import traceback
from typing import Any

from lorabench import backends
from lorabench.errors import LorabenchError
from lorabench.quiet import QUIET_ENV
from lorabench.result import STATUS_DOES_NOT_FIT, STATUS_ERROR, CaseResult
from lorabench.runner import CaseAborted

# Imported once by the forkserver; every case process inherits them. lorabench.quiet comes first, so that
# libraries' import-time notices are filtered in case processes too (below -v: all of them, see quiet).
# Every installed quantization library is among them, so no backend's load time includes importing it.
PRELOAD = ["lorabench.quiet", "torch", "transformers", "peft", *backends.preload_modules(), "accelerate", "datasets",
           "lorabench.runner"]


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


def _child_main(conn, payload: dict[str, Any]) -> None:
    """The case process: build the run, then obey "step" and "finish" until done."""
    import torch

    from lorabench.data import load_task_data
    from lorabench.models import load_tokenizer
    from lorabench.runner import CaseRun, tokenize_task

    handler = send_logs(conn)
    try:
        source = payload["source"]
        task = load_task_data(payload["case"].dataset)
        tokenizer = load_tokenizer(source)
        run = CaseRun(
            payload["case"],
            case_id=payload["case_id"],
            source=source,
            tokens_for=lambda config: tokenize_task(task, tokenizer, config.seq_len),
            device=torch.device(payload["device"]),
            report_to=payload["report_to"],
            log_dir=payload["log_dir"],
            memory_budget=payload["memory_budget"],
            base_eval=payload["base_eval"],
            cpu_threads=payload["cpu_threads"],
        )
        run.prepare()
        conn.send(("ready", run.base_eval))
        while True:
            try:
                command = conn.recv()
            except EOFError:  # the parent closed the case early
                return
            if command == "step":
                conn.send(("stepped", run.step()))
            elif command == "control":
                conn.send(("controlled", run.control()))
            elif command == "ping":
                conn.send(("pong", None))
            elif command == "finish":
                conn.send(("result", run.finish().to_extra_info()))
                return
            else:
                return
    except CaseAborted as exc:
        _report(conn, ("aborted", exc.result.to_extra_info()))
    except BaseException as exc:  # report, then let the process end
        _report(conn, ("failed", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    finally:
        logging.getLogger("lorabench").removeHandler(handler)
        conn.close()


def _report(conn, message: tuple) -> None:
    """Send the case's last word to the parent, unless it is gone: it stopped the case (a time limit
    reached as the process started) and closed the pipe, so there is no one to tell."""
    try:
        conn.send(message)
    except OSError:
        pass


class IsolatedCaseRun:
    """The parent's handle on a case running in a child process; same phases as ``CaseRun``."""

    def __init__(self, case, *, case_id: str, source, device, report_to: str = "none",
                 log_dir: str | None = None, memory_budget: int | None = None, base_eval=None,
                 quiet: bool = False, cpu_threads: int | None = None) -> None:
        from lorabench.config import resolve

        self.case = case
        self.case_id = case_id
        self.config = resolve(case.config, source.defaults, device)
        self._payload = {"case": case, "case_id": case_id, "source": source, "device": str(device),
                         "report_to": report_to, "log_dir": log_dir, "memory_budget": memory_budget,
                         "base_eval": base_eval, "cpu_threads": cpu_threads}
        self.base_eval = base_eval
        self._device = str(device)
        self._quiet = quiet
        self._process = None
        self._conn = None
        self._finished = False

    def prepare(self) -> None:
        ctx = _context()
        parent_end, child_end = ctx.Pipe()
        self._process = ctx.Process(target=_child_main, args=(child_end, self._payload), daemon=True,
                                    name=f"lorabench-{self.case_id}")
        # The first start also starts the forkserver, which reads QUIET_ENV when it imports lorabench.quiet.
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
        self._conn = parent_end
        self.base_eval = self._await("ready")

    def step(self) -> float:
        self._conn.send("step")
        return self._await("stepped")

    def control(self) -> None:
        """Time the control workload in the case process, just before the next step."""
        self._conn.send("control")
        self._await("controlled")

    def ping(self) -> None:
        """One round trip with no work, to measure what isolation adds to a step."""
        self._conn.send("ping")
        self._await("pong")

    def finish(self) -> CaseResult:
        self._conn.send("finish")
        result = CaseResult.from_extra_info(self._await("result"))
        self._finished = True
        return result

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send("exit")
            except OSError:  # the child is gone already
                pass
            self._conn.close()
            self._conn = None
        if self._process is not None and self._process.pid is None:
            self._process = None  # stopped (time limit, Ctrl-C) before it started: nothing to wait for
        if self._process is not None:
            # A child stopped mid-phase (time limit, Ctrl-C) is busy and would not read "exit".
            self._process.join(timeout=10 if self._finished else 0)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._process = None

    def _await(self, expected: str):
        """Read messages until the expected reply, re-emitting log records on the way."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                raise CaseAborted(self._death_result()) from None
            kind = message[0]
            if kind == "log":
                _, name, level, text = message
                logging.getLogger(name).log(level, "%s", text)
            elif kind == expected:
                return message[1]
            elif kind == "aborted":
                raise CaseAborted(CaseResult.from_extra_info(message[1]))
            elif kind == "failed":
                if message[1].startswith("KeyboardInterrupt"):  # Ctrl-C reached the case process: stop as inline
                    raise KeyboardInterrupt(f"{self.case_id}: the case process was interrupted")
                raise ChildFailed(f"{self.case_id}: {message[1]}", message[2])
            else:
                raise ChildFailed(f"{self.case_id}: unexpected message {kind!r} from the case process")

    def _death_result(self) -> CaseResult:
        """The record of a case whose process died without reporting."""
        self._process.join(timeout=10)
        code = self._process.exitcode
        killed = code is not None and code < 0 and -code == signal.SIGKILL
        if killed:
            status = STATUS_DOES_NOT_FIT
            error = "the case process was killed (SIGKILL), most likely by the kernel's out-of-memory killer"
        else:
            status, error = STATUS_ERROR, f"the case process died with exit code {code}"
        return CaseResult.unmeasured(self.case, self.config, case_id=self.case_id, device=self._device,
                                     status=status, error=error)
