"""The pytest side of scale-out: pytest-xdist workers, ``--shard I/N``, and results sent to the controller.

Under ``pytest -n N`` the controller collects and measures nothing; each worker runs its share
of the cases and, when it finishes, sends back (``workeroutput``) its result records and its
pytest-benchmark measurements. The controller then stores one run with all of them, prints one
summary, and records the worker count in ``machine_info``. The logic lives in
:mod:`lorabench.run.scaleout`.
"""

from __future__ import annotations

import json
import pytest

from lorabench.run import scaleout
from lorabench.errors import LorabenchError
from lorabench.case_kinds import known_case_ids
from lorabench.gates.thresholds import SELF, load_thresholds
from lorabench.matrix import single_device_id
from lorabench.result import CaseResult

# Deferred imports: xdist inside the functions that use them: what only reads a configuration or a stored run
# starts without them.

_OUTPUT_KEY = "lorabench"


class _State:
    """What this process knows about scale-out: its pin (a worker), and what the workers sent (the controller)."""

    def __init__(self) -> None:
        self.pin: scaleout.WorkerPin | None = None
        self.shard: scaleout.Shard | None = None
        self.positions: dict[str, int] = {}  # a worker: node id -> position in the collection
        self.indexed: list[tuple[int, object]] = []  # (position, CaseResult), this worker's or every worker's
        self.pins: dict[str, dict] = {}  # the controller: each worker's pin
        self.scopes: dict[str, str] = {}  # the controller: node id -> its gate group's scheduling scope
        self.scopes_ready = False


_STATE = pytest.StashKey[_State]()


def _state(config: pytest.Config) -> _State:
    if _STATE not in config.stash:
        config.stash[_STATE] = _State()
    return config.stash[_STATE]


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _is_controller(config: pytest.Config) -> bool:
    return not _is_worker(config) and bool(getattr(config.option, "numprocesses", None))


def _bench(config: pytest.Config):
    from lorabench.pytest_plugin.hooks import SESSION_KEY  # deferred: imports allure, pytest_benchmark, rich

    return config.stash.get(SESSION_KEY, None)


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("lorabench")
    g.addoption("--shard", default=None, metavar="I/N",
                help="run only the I-th of N slices of the selected cases (one job of a CI matrix); cases that a "
                     "relative gate links stay in one slice; join the stored runs with `python -m lorabench merge`")


@pytest.hookimpl(wrapper=True)
def pytest_cmdline_main(config: pytest.Config):
    """``-n N`` alone means ``--dist load`` to xdist; here it means ``loadgroup``, so linked cases share a worker.

    A wrapper, so it runs before xdist's own ``tryfirst`` implementation whichever plugin pytest loaded first.
    """
    option = config.option
    if getattr(option, "numprocesses", None) and getattr(option, "dist", "no") == "no":
        option.dist = "loadgroup"
    return (yield)


def pytest_configure(config: pytest.Config) -> None:
    state = _state(config)
    if config.getoption("shard") is not None:  # --shard '' is refused, not read as no shard
        try:
            state.shard = scaleout.parse_shard(config.getoption("shard"))
        except LorabenchError as exc:
            raise pytest.UsageError(str(exc)) from None
        config.pluginmanager.register(_ShardSelection(state.shard), "lorabench-shard")
    if _is_worker(config):
        info = config.workerinput
        state.pin = scaleout.pin_worker(info["workerid"], int(info["workercount"]),
                                        use_gpu=config.getoption("bench_device") != "cpu")


def pytest_sessionstart(session: pytest.Session) -> None:
    """On a worker, pytest-benchmark measures again (it turns itself off under xdist) but stores nothing:
    the controller stores one run with every worker's measurements."""
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is None or not _is_worker(session.config):
        return
    if _disabled_by_xdist(session.config, bs):
        bs.disabled = False
    bs.save = bs.autosave = bs.json = None
    bs.compare = bs.compare_fail = None


def _disabled_by_xdist(config: pytest.Config, bs) -> bool:
    """Whether pytest-benchmark turned itself off for xdist, not at the user's --benchmark-disable or -skip.

    pytest-benchmark 5.1 flags that case with ``xdist_warning``; 5.2 keeps no flag, so it is read from the
    options it decides by.
    """
    if hasattr(bs, "xdist_warning"):
        flagged = bool(bs.xdist_warning)
        bs.xdist_warning = False
        return flagged
    asked_off = config.getoption("benchmark_disable") and not config.getoption("benchmark_enable")
    return bs.disabled and not bs.skip and not asked_off


# ----- collection: groups and shards ----------------------------------------------
def _gated_item(nodeid: str, cases: dict, known: set[str]) -> scaleout.GatedItem | None:
    """Where a collected item's relative gates look, from its node id: a matrix case (by its pytest id)
    gates within its model and data set; another bench case (inference variant, MiniLM configuration)
    is named by its parameter id; anything else is linked to nothing."""
    name = nodeid.rsplit("::", 1)[-1]
    if "[" not in name or not name.endswith("]"):
        return None
    param_id = name[name.index("[") + 1:-1]
    case = cases.get(param_id)
    if case is None:
        return scaleout.GatedItem("", param_id) if param_id in known else None

    configs = [c.config for c in cases.values()]
    return scaleout.GatedItem(f"{case.model}|{case.dataset}", case.config.id, single_device_id(case.config, configs))


def _groups(config: pytest.Config, nodeids: list[str]) -> list[str | None]:
    """Each node id's group (:func:`lorabench.run.scaleout.gate_groups`), or ``None`` where it may run anywhere.

    The thresholds file is read here without touching the session, whose own reading
    (lorabench.pytest_plugin.hooks) decides what is gated.

    Raises:
        pytest.UsageError: the thresholds file is malformed.
    """

    bench = _bench(config)
    if bench is None:
        return [None] * len(nodeids)
    known = known_case_ids() | {c.id for c in bench.matrix.configs}
    cases = dict(zip(bench.matrix.ids(), bench.matrix.cases()))
    gated = [_gated_item(n, cases, known) for n in nodeids]
    if not any(gated):
        return [None] * len(nodeids)
    try:
        gates = bench.thresholds or load_thresholds(bench.thresholds_path, known)
    except LorabenchError as exc:
        raise pytest.UsageError(str(exc)) from None
    rules = [(g.config, g.ref_config) for g in gates.gates if g.relative and g.ref_config != SELF]
    return scaleout.gate_groups(gated, rules)


def _make_group_scheduling(config, log, scopes: dict[str, str]):
    """xdist's load-group scheduler, with each case's scope its gate group: a group runs on one worker in
    collection order; other items keep xdist's own scoping (their ``xdist_group``, else themselves)."""
    from xdist.scheduler import LoadGroupScheduling

    class GateGroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scopes[nodeid] if nodeid in scopes else super()._split_scope(nodeid)

    return GateGroupScheduling(config, log)


class _ShardSelection:
    """``--shard I/N``: keep one slice, after pytest's own -k/-m selection (so slices balance what runs)."""

    def __init__(self, shard: scaleout.Shard) -> None:
        self.shard = shard

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        keep = set(scaleout.shard_items(_groups(config, [i.nodeid for i in items]), self.shard))
        deselected = [item for position, item in enumerate(items) if position not in keep]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for position, item in enumerate(items) if position in keep]

    def pytest_report_header(self) -> str:
        return f"lorabench: shard {self.shard} (--shard): this job runs one slice of the selected cases"


# ----- a worker: results in collection order, sent to the controller ------------------
def pytest_collection_finish(session: pytest.Session) -> None:
    if _is_worker(session.config):
        _state(session.config).positions = {item.nodeid: i for i, item in enumerate(session.items)}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    """Remember which collected item each result record came from, so the controller can order them."""
    bench = _bench(item.config)
    before = len(bench.results) if bench is not None and _is_worker(item.config) else None
    yield
    if before is not None:
        state = _state(item.config)
        position = state.positions.get(item.nodeid, len(state.positions))
        state.indexed += [(position, r) for r in bench.results[before:]]


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A worker hands its result records and pytest-benchmark measurements to the controller
    (xdist sends ``workeroutput`` when this hook returns)."""
    config = session.config
    if not _is_worker(config):
        return
    state = _state(config)
    bs = getattr(config, "_benchmarksession", None)
    benchmarks = []
    for metadata in (bs.benchmarks if bs is not None else []):
        if metadata.has_error:
            continue  # as pytest-benchmark's own JSON leaves them out
        benchmarks.append([state.positions.get(metadata.fullname, len(state.positions)),
                           scaleout.export_benchmark(metadata)])
    pin = state.pin
    config.workeroutput[_OUTPUT_KEY] = {
        "results": [[position, r.to_extra_info()] for position, r in state.indexed],
        "benchmarks": benchmarks,
        "pin": {"gpu": pin.gpu, "threads": pin.threads} if pin else {},
    }


# ----- the controller: one run from every worker -------------------------------------
@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """Fold a finished worker's results into the session (summary) and pytest-benchmark (storage)."""


    config = node.config
    output = getattr(node, "workeroutput", None) or {}
    sent = output.get(_OUTPUT_KEY)
    if sent is None:
        return
    state = _state(config)
    state.pins[node.gateway.id] = sent["pin"]
    bench = _bench(config)
    if bench is not None:
        state.indexed += [(position, CaseResult.from_extra_info(json.loads(json.dumps(data))))
                          for position, data in sent["results"]]
        state.indexed.sort(key=lambda pair: pair[0])
        bench.results[:] = [r for _, r in state.indexed]
    bs = getattr(config, "_benchmarksession", None)
    if bs is not None:
        bs.benchmarks += [scaleout.WorkerBenchmark(data, position) for position, data in sent["benchmarks"]]
        bs.benchmarks.sort(key=lambda b: getattr(b, "position", -1))


@pytest.hookimpl(trylast=True)
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """How the run was split (absent from a serial, unsharded run): the xdist worker count, each worker's
    GPU and threads, and the shard."""
    state = _state(config)
    if _is_controller(config):
        machine_info["xdist_workers"] = int(config.option.numprocesses)
    if state.shard:
        machine_info["shard"] = str(state.shard)
    if state.pins:
        threads = {p.get("threads") for p in state.pins.values()}
        if len(threads) == 1:  # the case processes ran with the workers' share, not the controller's count
            machine_info["torch_threads"] = threads.pop()
        machine_info["xdist_pins"] = {worker: state.pins[worker] for worker in sorted(state.pins)}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadgroup`` (the default here under ``-n``): scopes are gate groups (xdist's own
    ``xdist_group`` marks travel in node ids, which pytest 9.2 no longer lets a plugin change)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    return _make_group_scheduling(config, log, _state(config).scopes)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids) -> None:
    """Before xdist schedules: each case's group, from the ids the workers collected. Said once."""
    config = node.config
    state = _state(config)
    if state.scopes_ready:
        return
    state.scopes_ready = True
    groups = _groups(config, list(ids))
    state.scopes.update({nodeid: f"lorabench-group:{g}" for nodeid, g in zip(ids, groups) if g is not None})
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and config.getvalue("dist") == "loadgroup":
        linked = sorted({g for g in groups if g is not None})
        reporter.write_line(
            f"lorabench: {len(ids)} items over {config.option.numprocesses} pytest-xdist workers; "
            f"{len(linked)} group(s) of configurations linked by relative gates run each on one worker, in order "
            f"({', '.join(linked) or 'none'}); each worker gets one GPU where there are GPUs, and cores/workers "
            "torch threads")
    if reporter is not None:
        for line in _controller_plan(config, list(ids)):
            reporter.write_line(line)


def _controller_plan(config: pytest.Config, ids: list[str]) -> list[str]:
    """The controller's lines before scheduling: more workers than cores (each case then competes for a
    core and its timings read slower), and the run's plan with its expected time over the workers."""
    from lorabench.pytest_plugin.hooks import _storage_path  # deferred: imports allure, pytest_benchmark, rich

    workers, cores = int(config.option.numprocesses), scaleout.cpu_cores()
    lines = []
    if workers > cores:
        lines.append(f"lorabench: warning: -n {workers} starts more pytest-xdist workers than the {cores} core(s) "
                     f"this run may use; cases compete for cores, so each runs slower and its wall-clock figures "
                     f"are not comparable with a run of -n {cores} or fewer")
    bench = _bench(config)
    if bench is None:
        return lines
    by_id = dict(zip(bench.matrix.ids(), bench.matrix.cases()))
    params = [nodeid[nodeid.index("[") + 1:-1] for nodeid in ids if nodeid.endswith("]") and "[" in nodeid]
    chosen = [(p, by_id[p]) for p in params if p in by_id]
    if chosen:
        lines.append(bench.plan_line([case for _, case in chosen], [p for p, _ in chosen], _storage_path(config),
                                     workers=workers))
    return lines
