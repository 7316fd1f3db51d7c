"""The plugin's hooks: options, markers, case generation, gates, machine info, terminal summary.

Hooks stay thin; the logic they call lives in the engine modules, where it is
unit-tested without pytest.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest

from lorabench.run.quiet import OwnRecordsOnly, quiet_libraries  # first: before any Hugging Face library is imported
from lorabench.errors import LorabenchError
from lorabench.pytest_plugin.session import (
    AUTO_THREADS,
    DEFAULT_CASE_TIMEOUT_S,
    ISOLATION,
    REPORT_TO,
    BenchSession,
    open_session,
)
from lorabench.report.allure_results import CASE_ERROR, GATE_FAILED
from lorabench.report.failures import failure_block, failure_index, failure_report
from lorabench.storage.atomic import json_output_path
from lorabench.report.summary import render_summary
from lorabench.matrix import selection_keywords
from lorabench.meters.environment import machine
from lorabench.pytest_plugin import markers
from lorabench.report import allure_results
from lorabench.storage.atomic import make_atomic, protect_json_output
from lorabench.storage.history import INTERRUPTED_KEY
from pytest_benchmark.storage.file import FileStorage

SESSION_KEY = pytest.StashKey[BenchSession]()
# set once this process collects a bench case: until then the plugin leaves a run as it is (pytest loads
# it in every run of an environment where lorabench is installed, most of which use none of it)
_ACTIVE = pytest.StashKey[bool]()
_QUIETED = pytest.StashKey[bool]()
_PYTEST_SESSION = pytest.StashKey[pytest.Session]()  # for the save hook, which is given the config only
# set once the selected cases' inputs passed their checks: a refused run prints no plan line (its estimate
# reads the device and times a control workload for a run that will not start)
_CHECKED = pytest.StashKey[bool]()
# whether -k or -m deselected a bench case: a selection that then leaves none may name an unknown case
_DESELECTED_BENCH = pytest.StashKey[bool]()


# A value that starts with '-' and a digit (--shard -1/2, --memory-budget -5GiB) is a value: argparse reads
# only plain negative numbers (-1, -0.5) so, and takes the rest for an unknown option ("expected one
# argument"), so the option's own check never names what is wrong. No pytest option looks like -1.
_DASH_DIGIT_VALUE = re.compile(r"-\.?\d")


def pytest_addoption(parser: pytest.Parser) -> None:
    optparser = getattr(parser, "optparser", None)  # pytest 9 keeps one; pytest 8 builds one per parse
    if optparser is not None:
        optparser._negative_number_matcher = _DASH_DIGIT_VALUE
    parser.addini("lorabench_quiet_all", type="bool", default=False,
                  help="below -v, quiet the libraries and the log in every run of this project, not only in runs "
                       "with bench cases (lorabench's own test suite)")
    g = parser.getgroup("lorabench", "lorabench fine-tuning benchmark")
    g.addoption("--model", action="append", default=[], metavar="SPEC",
                help="zoo name (tiny-llama, tiny-qwen, tiny-gpt2, tiny-neox), the embedded real model smollm2-135m "
                     "(docs/real-model.md), checkpoint directory, or cached hub id; repeatable")
    g.addoption("--dataset", action="append", default=[], metavar="SPEC",
                help="digit-reverse, a .jsonl/.json/.csv/.txt file, or a cached hub data set; repeatable")
    g.addoption("--matrix", default=None, metavar="FILE", help="YAML matrix file (models, datasets, defaults, configs)")
    g.addoption("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                help="override a configuration field in every case, e.g. --set rank=32 --set optimizer=paged_adamw_8bit")
    g.addoption("--steps", type=int, default=None, metavar="N", help="training steps per case (same as --set steps=N)")
    g.addoption("--device", dest="bench_device", default="auto", metavar="DEVICE", help="auto (default), cpu, cuda or cuda:N")
    g.addoption("--thresholds", default=None, metavar="FILE", help="gates file (default: thresholds.yaml in pytest's rootdir)")
    g.addoption("--report-to", dest="report_to", default="none", choices=REPORT_TO,
                help="stream training curves through the Trainer's integration (tensorboard, or wandb offline)")
    g.addoption("--isolate", default="process", choices=ISOLATION,
                help="run each case in its own process (default; memory figures independent of earlier cases) "
                     "or in the pytest process (none; faster to debug)")
    g.addoption("--trust-remote-code", action="store_true", default=False,
                help="allow a checkpoint's own modelling code (off by default)")
    g.addoption("--memory-budget", dest="memory_budget", default=None, metavar="SIZE",
                help="cap each case's memory, e.g. 6GiB: CUDA caps the allocator, the CPU a watchdog on RSS; "
                     "a case over it records 'does not fit'")
    g.addoption("--seeds", default=None, metavar="N|S1,S2,...",
                help="run every fine-tuning case N times, with the configuration's seed and the N-1 after it, or "
                     "with the seeds listed; the record keeps each seed's figures, their mean and 95%% interval "
                     "(default: one run at the configuration's seed)")
    g.addoption("--cpu-threads", dest="cpu_threads", default=AUTO_THREADS, metavar="N|auto",
                help="torch's intra-op threads for a case on the CPU: auto (default) runs embedded zoo models on "
                     "one thread (faster at their size, and a step/control ratio that holds under load) and "
                     "leaves other models at torch's default; N for every case")
    g.addoption("--case-timeout", dest="case_timeout", type=float, default=DEFAULT_CASE_TIMEOUT_S, metavar="SECONDS",
                help=f"fail a case that runs longer than this (default {DEFAULT_CASE_TIMEOUT_S:.0f}; 0 turns it off)")


# open_session's arguments, from the options above (by their dest)
_SESSION_OPTIONS = {
    "matrix_file": "matrix", "models": "model", "datasets": "dataset", "overrides": "overrides", "steps": "steps",
    "device": "bench_device", "thresholds": "thresholds", "report_to": "report_to", "isolate": "isolate",
    "trust_remote_code": "trust_remote_code", "memory_budget": "memory_budget", "case_timeout_s": "case_timeout",
    "seeds": "seeds", "cpu_threads": "cpu_threads",
}


def pytest_configure(config: pytest.Config) -> None:
    markers.register(config)
    if config.getoption("report_to") == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
    try:
        options = {argument: config.getoption(dest) for argument, dest in _SESSION_OPTIONS.items()}
        config.stash[SESSION_KEY] = open_session(root=Path(config.rootpath), quiet=config.get_verbosity() <= 0,
                                                 **options)
    except LorabenchError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_sessionstart(session: pytest.Session) -> None:
    """After pytest-benchmark has set up its storage: make its writes atomic, with a fallback on failure."""

    benchmark_session = getattr(session.config, "_benchmarksession", None)
    bench = session.config.stash.get(SESSION_KEY, None)
    session.config.stash[_PYTEST_SESSION] = session
    if benchmark_session is not None and bench is not None:
        make_atomic(benchmark_session.storage, bench.save_failures)
        if benchmark_session.json:
            protect_json_output(benchmark_session, bench.save_failures)
    if bench is not None and session.config.getini("lorabench_quiet_all"):
        _quiet(session.config)


def _activate(config: pytest.Config) -> None:
    """This process runs bench cases: quiet (below -v), and lorabench's machine info and Allure environment."""
    config.stash[_ACTIVE] = True
    _quiet(config)


def _quiet(config: pytest.Config) -> None:
    """Below -v: the libraries' deprecation notices and chatter hidden, and the live log and captured-log
    sections show lorabench's records and other loggers' errors only."""
    if config.stash.get(_QUIETED, False) or not config.stash[SESSION_KEY].quiet:
        return
    config.stash[_QUIETED] = True
    for line in quiet_libraries():  # pytest reads filterwarnings for each test, so they apply from here on
        config.addinivalue_line("filterwarnings", line)
    logging_plugin = config.pluginmanager.get_plugin("logging-plugin")
    if logging_plugin is not None:
        for handler in (logging_plugin.log_cli_handler, logging_plugin.report_handler):
            handler.addFilter(OwnRecordsOnly())


def _active(config: pytest.Config) -> bool:
    """Whether lorabench took part in this run: it collected a bench case, or (an xdist controller) holds results."""
    bench = config.stash.get(SESSION_KEY, None)
    return bench is not None and (config.stash.get(_ACTIVE, False) or bool(bench.results))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A run whose results went to a fallback location fails (pytest-benchmark has saved by now);
    with --alluredir: the launch's environment (device, versions) and result categories."""

    bench = session.config.stash.get(SESSION_KEY, None)
    if bench is not None and bench.save_failures and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the controller writes them once
    if allure_results.enabled(session.config) and _active(session.config):
        allure_results.write_launch_files(Path(session.config.option.allure_report_dir), machine())
        if bench is not None:
            allure_results.attach_run(bench.results, machine())


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bench_case" not in metafunc.fixturenames:
        return
    session = metafunc.config.stash[SESSION_KEY]
    # pytest-timeout's signal method fails the case and lets the session go on; an isolated
    # case's process is killed on the way out (lorabench.run.isolation.CaseProcess.stop).
    limit = [pytest.mark.timeout(session.case_timeout_s, method="signal")] if session.case_timeout_s else []
    params = [
        pytest.param(case, id=case_id, marks=[getattr(pytest.mark, m) for m in case.config.markers] + limit)
        for case, case_id in zip(session.matrix.cases(), session.matrix.ids())
    ]
    metafunc.parametrize("bench_case", params)


def pytest_itemcollected(item: pytest.Item) -> None:
    """Give each bench case its ``-k`` words: ``config[ID]``, ``model[NAME]``, ``dataset[NAME]``."""

    params = getattr(getattr(item, "callspec", None), "params", {})
    session = item.config.stash.get(SESSION_KEY, None)
    if "bench_case" in params:
        item.extra_keyword_matches.update(params["bench_case"].keywords())
    elif session is not None and hasattr(params.get("variant"), "id"):
        # inference and GGUF variants run on the run's first model and data set
        item.extra_keyword_matches.update(selection_keywords(
            params["variant"].id, model=session.matrix.models[0], dataset=session.matrix.datasets[0]))
    elif hasattr(params.get("config"), "id"):
        item.extra_keyword_matches.update(selection_keywords(params["config"].id))


def pytest_deselected(items: list[pytest.Item]) -> None:
    if items and any("bench_session" in getattr(item, "fixturenames", ()) for item in items):
        items[0].config.stash[_DESELECTED_BENCH] = True


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: only the selected cases are checked
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Read the gates and check every user input once, before any case trains, if a bench case was collected.

    A bench case is any test that records through the session (fine-tuning, inference, GGUF,
    classification, quantization error): each of them is gated, whichever file ran alone.
    """
    if not any("bench_session" in getattr(item, "fixturenames", ()) for item in items):
        if config.stash.get(_DESELECTED_BENCH, False) and SESSION_KEY in config.stash:
            try:
                config.stash[SESSION_KEY].check_selection(config.getoption("keyword"))
            except LorabenchError as exc:
                raise pytest.UsageError(str(exc)) from None
        return
    _activate(config)
    session = config.stash[SESSION_KEY]
    selected = [item.callspec.params["bench_case"] for item in items
                if "bench_case" in getattr(getattr(item, "callspec", None), "params", {})]
    ids = [item.callspec.id for item in items if "bench_case" in getattr(getattr(item, "callspec", None), "params", {})]
    # a case that is not a matrix case (an inference variant's adapter) draws on the whole matrix
    whole_matrix = len(selected) < len(items)
    try:
        session.load_gates()
        session.check_inputs(None if whole_matrix else selected)
        session.check_outputs(**_outputs(config), cases=len(items), ids=None if whole_matrix else ids)
    except LorabenchError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_CHECKED] = True


def _outputs(config: pytest.Config) -> dict:
    """Where pytest-benchmark will write this run: its storage directory (when saving) and --benchmark-json."""

    benchmark_session = getattr(config, "_benchmarksession", None)
    if benchmark_session is None:
        return {}
    storage = benchmark_session.storage
    saving = (benchmark_session.save or benchmark_session.autosave) and isinstance(storage, FileStorage)
    directory = None
    if saving:
        directory = storage.path / storage.default_machine_id if storage.default_machine_id else storage.path
    json_path = json_output_path(benchmark_session)
    return {"storage": directory, "json_path": json_path}


def pytest_collection_finish(session: pytest.Session) -> None:
    """The run's first line: which cases, on what, in which dtype, and how long it should take."""
    bench = session.config.stash.get(SESSION_KEY, None)
    items = [i for i in session.items if "bench_case" in getattr(i, "fixturenames", ())]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if (bench is None or not items or reporter is None or hasattr(session.config, "workerinput")
            or not session.config.stash.get(_CHECKED, False)):
        return
    reporter.write_line(bench.plan_line([i.callspec.params["bench_case"] for i in items],
                                        [i.callspec.id for i in items], _storage_path(session.config)))


def _storage_path(config: pytest.Config) -> Path | None:
    storage = getattr(getattr(config, "_benchmarksession", None), "storage", None)
    path = getattr(storage, "path", None)
    return Path(path) if path is not None else None


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    if not _active(config):
        return
    machine_info.update(machine())
    session = config.stash.get(SESSION_KEY, None)
    if session is not None:
        # --isolate none understates a repeated case's memory: compare warns when two runs differ in it
        machine_info["isolate"] = session.isolate
        # the step/control ratio depends on the threads a case runs with and on what the control does
        machine_info["cpu_threads"] = session.cpu_threads or AUTO_THREADS
    if hasattr(os, "getloadavg"):
        machine_info["load_avg_1m_start"] = session.load_at_start if session is not None else None
        machine_info["load_avg_1m_end"] = os.getloadavg()[0]


@pytest.hookimpl(optionalhook=True)  # pytest-benchmark's hook: absent under -p no:benchmark
def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    """Mark the JSON of a run that Ctrl-C (SIGINT) or ``pytest.exit`` stopped: pytest-benchmark still saves
    the rounds the interrupted case had timed, with no record. The storage writes a marked run outside
    the history (lorabench.storage.atomic), and every reader passes over one (lorabench.storage.history)."""

    session = config.stash.get(_PYTEST_SESSION, None)
    if session is not None and session.exitstatus == pytest.ExitCode.INTERRUPTED:
        bench = config.stash.get(SESSION_KEY, None)
        done = len(bench.results) if bench is not None else 0
        output_json[INTERRUPTED_KEY] = f"stopped by Ctrl-C, SIGINT or pytest.exit after {done} recorded case(s)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A case's failure block (lorabench.report.failures) whole under FAILURES, one line in the short summary."""
    report = yield
    failed = call.excinfo is not None and call.excinfo.errisinstance(pytest.fail.Exception)
    text = str(call.excinfo.value.msg) if failed else ""
    if report.failed and text.startswith((GATE_FAILED, CASE_ERROR)):
        path, lineno, _ = item.location
        report.longrepr = failure_report(text, path, (lineno or 0) + 1)
    return report


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is None:
        return
    for failure in session.save_failures:
        terminalreporter.write_sep("=", "lorabench: results not saved where asked", red=True)
        for line in failure.lines():
            terminalreporter.write_line(line, red=True)
    if not session.results:
        return
    counts = Counter(g["status"] for r in session.results for g in r.gates)
    terminalreporter.write_sep("=", "lorabench summary")
    workers = getattr(config.option, "numprocesses", None)  # pytest-xdist's -n, where it is installed
    for line in render_summary(session.results, dict(counts), width=terminalreporter._tw.fullwidth,
                               workers=workers if isinstance(workers, int) else None):
        terminalreporter.write_line(line)
    # each block is under pytest's FAILURES already, unless --tb=no leaves that section out
    show = ((lambda r: failure_block(r, verbose=config.get_verbosity() > 0)) if config.option.tbstyle == "no"
            else failure_index)
    blocks = [b for r in session.results if (b := show(r))]
    if blocks:
        terminalreporter.write_sep("-", f"lorabench: {len(blocks)} case(s) failed")
        for block in blocks:
            terminalreporter.write_line(block)
    for notice in session.notices:
        terminalreporter.write_line(f"NOTE {notice}")
