"""A failed case as a person reads it: one block per case, naming the case, the rule, the values and the bound.

The same block is the pytest failure message of the case and a section of the terminal summary::

    qlora_nf4 (model tiny-llama, data set digit-reverse, configuration qlora_nf4): 1 gate failed
      violates 'eval_loss <= 2.0 * lora.eval_loss'  [thresholds.yaml:37, profile default]
        qlora_nf4.eval_loss = 0.0912, lora.eval_loss = 0.0448: bound <= 0.0896

The full record and any traceback stay in the Allure attachments, and show with ``-v``.

The block is printed once: under pytest's FAILURES (:func:`failure_report` keeps pytest's one-line short
summary to the block's first line, on CI and with ``-vv`` too), while lorabench's own summary lists each
failed case in one line (:func:`failure_index`), or prints the blocks where pytest shows no tracebacks
(``--tb=no``).
"""

from __future__ import annotations

from _pytest._code.code import ReprEntryNative, ReprExceptionInfo, ReprFileLocation, ReprTraceback

from lorabench.result import STATUS_DOES_NOT_FIT, STATUS_OK, CaseResult
from lorabench.gates.thresholds import FAIL, NOT_EVALUABLE, NOT_EVALUATED, PASS


def case_label(result: CaseResult) -> str:
    """``qlora_nf4 (model tiny-llama, data set digit-reverse, configuration qlora_nf4)``."""
    return (f"{result.case_id} (model {result.model}, data set {result.dataset}, "
            f"configuration {result.config_id})")


def failed_gates(result: CaseResult) -> list[dict]:
    return [g for g in result.gates if g["status"] == FAIL]


def status_text(result: CaseResult) -> str:
    """The case's status as the reports show it: ``ok``, ``failed 2 gates``, ``error``, ..."""
    if result.status != STATUS_OK:
        return result.status
    n = len(failed_gates(result))
    return f"failed {n} gate{'s' if n > 1 else ''}" if n else "ok"


def _num(x) -> str:
    return "-" if x is None else f"{x:.6g}"


def _op(gate: dict) -> str:
    """The rule's comparison (``<=``); records stored before it was kept separately have it in the rule."""
    return gate.get("op") or gate["rule"].split()[1]


def gate_value_text(gate: dict, result: CaseResult) -> tuple[str, str, str]:
    """(value, bound, reference) as text: ``0.9``, ``<= 0.8``, ``lora.eval_loss = 0.4`` (``-`` or ``""`` when absent)."""
    bound = "-" if gate.get("bound") is None else f"{_op(gate)} {_num(gate['bound'])}"
    ref_config = gate.get("ref_config")
    reference = ""
    if ref_config and gate.get("reference") is not None:
        name = result.config_id if ref_config == "self" else ref_config
        reference = f"{name}.{gate['ref_metric']} = {_num(gate['reference'])}"
    return _num(gate.get("value")), bound, reference


def gate_lines(gate: dict, result: CaseResult) -> list[str]:
    """Two lines for one gate outcome: the rule and where it is written, then the values and the bound."""
    where = f"[{gate['where']}" + (f", profile {gate['profile']}]" if gate.get("profile") else "]")
    verb = {FAIL: "violates", PASS: "meets"}.get(gate["status"], "cannot check")
    head = f"{verb} '{gate['rule']}'  {where}"
    metric = gate.get("metric") or gate["rule"].split()[0]
    if gate["status"] == NOT_EVALUABLE:
        return [head, f"  not evaluable: {undecided_reason(gate)}"]
    if gate["status"] == NOT_EVALUATED or gate.get("value") is None:
        # the outcome's message says which value was missing and why
        reason = gate["message"].split(" [", 1)[0]
        return [head, f"  not evaluated: {reason}"]
    value, bound, reference = gate_value_text(gate, result)
    text = f"{result.config_id}.{metric} = {value}"
    if len(result.seeds) > 1:
        text += f" (mean of {len(result.seeds)} seeds)"
    if reference:
        text += f", {reference}"
    return [head, f"  {text}: bound {bound}"]


def undecided_reason(gate: dict) -> str:
    """Why a not-evaluable gate's data cannot decide it, and what would: its message between the verdict and
    the rule's place (``accuracy_n = 20 (...); the rule is decided only where accuracy_n >= 100; ...``)."""
    return gate["message"].split(f"{NOT_EVALUABLE}: ", 1)[-1].split(" [", 1)[0]


def failure_block(result: CaseResult, *, verbose: bool = False) -> str | None:
    """The block for a case that failed (a gate, an error, a time-out), or ``None`` when it did not.

    Args:
        verbose: add the traceback of a case error, where one was kept.
    """
    failed = failed_gates(result)
    if result.status == STATUS_OK and not failed:
        return None
    if result.status == STATUS_OK:
        lines = [f"{case_label(result)}: {len(failed)} gate{'s' if len(failed) > 1 else ''} failed"]
        for gate in failed:
            lines += ["  " + line for line in gate_lines(gate, result)]
        return "\n".join(lines)
    what = "does not fit" if result.status == STATUS_DOES_NOT_FIT else result.status
    lines = [f"{case_label(result)}: {what}"]
    lines += ["  " + line for line in (result.error or "no reason recorded").splitlines()]
    trace = result.details.get("traceback")
    if trace:
        lines += (["  traceback:"] + ["    " + line for line in trace.rstrip().splitlines()] if verbose
                  else ["  (run with -v for the traceback)"])
    return "\n".join(lines)


def failure_report(message: str, path: str, lineno: int) -> ReprExceptionInfo:
    """A pytest failure representation that prints ``message`` whole under FAILURES and only its first line
    in the short test summary (pytest prints a plain-text failure whole there on CI and with ``-vv``).
    pytest's own representation classes, so that it crosses pytest-xdist's report serialization as it is."""
    lines = message.splitlines() or [""]
    return ReprExceptionInfo(ReprTraceback([ReprEntryNative([line + "\n" for line in lines])], None, "native"),
                             ReprFileLocation(path, lineno, lines[0]))


def failure_index(result: CaseResult) -> str | None:
    """One line for a failed case in lorabench's summary: what failed, its block being under FAILURES."""
    failed = failed_gates(result)
    if result.status == STATUS_OK and not failed:
        return None
    what = (", ".join(f"'{g['rule']}'" for g in failed) if result.status == STATUS_OK
            else "does not fit" if result.status == STATUS_DOES_NOT_FIT else result.status)
    return f"{result.case_id}: {what} (its block is under FAILURES above)"


def gate_rows(results: list[CaseResult]) -> list[list[str]]:
    """Every gate outcome of a run, failures first, header first: for the reports and Allure."""
    order = {FAIL: 0, NOT_EVALUABLE: 1, NOT_EVALUATED: 1, PASS: 2}
    rows = []
    for r in results:
        for g in r.gates:
            rows.append((order.get(g["status"], 3), r, g))
    rows.sort(key=lambda row: row[0])
    table = [["status", "case", "model", "data set", "rule", "value", "bound", "where"]]
    for _, r, g in rows:
        value, bound, _ = gate_value_text(g, r)
        table.append([g["status"], r.case_id, r.model, r.dataset, g["rule"], value, bound, g["where"]])
    return table
