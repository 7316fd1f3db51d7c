"""The pytest plugin: options, case generation, gates, machine info, terminal summary.

Hooks stay thin; the logic they call lives in the engine modules, where it is
unit-tested without pytest.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# Offline unless the user says otherwise: the embedded default never needs the network,
# and a hub id must come from the local cache.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from lorabench.config import parse_override  # noqa: E402
from lorabench.errors import LorabenchError  # noqa: E402
from lorabench.matrix import DEFAULT_CONFIGS, Matrix, build_matrix  # noqa: E402
from lorabench.result import STATUS_OK, CaseResult  # noqa: E402
from lorabench.summary import render_summary  # noqa: E402
from lorabench.thresholds import FAIL, GateOutcome, Thresholds, evaluate, load_thresholds  # noqa: E402

REPORT_TO = ("none", "tensorboard", "wandb")
ISOLATION = ("process", "none")


@dataclass
class BenchSession:
    """What one pytest session of the bench holds: its matrix, gates and results so far."""

    matrix: Matrix
    device_choice: str
    report_to: str
    trust_remote_code: bool
    isolate: str
    thresholds_path: Path
    reports_dir: Path
    thresholds: Thresholds | None = None
    results: list[CaseResult] = field(default_factory=list)
    _device: Any = None

    @property
    def device(self):
        from lorabench.models import resolve_device

        if self._device is None:
            self._device = resolve_device(self.device_choice)
        return self._device

    def log_dir(self, case_id: str) -> str:
        """Where the Trainer's integrations (TensorBoard) write for one case."""
        return str(self.reports_dir / "runs" / case_id)

    def reference(self, model: str, dataset: str):
        """Lookup of another configuration's (metrics, absent) in this session, for relative gates."""

        def lookup(config_id: str):
            for r in reversed(self.results):
                if (r.model, r.dataset, r.config_id) == (model, dataset, config_id) and r.status == STATUS_OK:
                    return r.metrics, r.absent
            return None

        return lookup

    def gate(self, result: CaseResult, *, wildcard: bool = True) -> list[GateOutcome]:
        """Evaluate every applicable gate on ``result`` and store the outcomes in it.

        Args:
            wildcard: whether the ``"*"`` rules (written for fine-tuning cases) apply.
        """
        if self.thresholds is None or result.status != STATUS_OK:
            return []
        device_type = result.device.split(":")[0]
        outcomes = [
            evaluate(g, result.config_id, result.metrics, result.absent, self.reference(result.model, result.dataset))
            for g in self.thresholds.gates_for(result.config_id, device_type, result.model, wildcard=wildcard)
        ]
        result.gates = [o.to_dict() for o in outcomes]
        return outcomes


SESSION_KEY = pytest.StashKey[BenchSession]()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("lorabench", "lorabench fine-tuning benchmark")
    g.addoption("--model", action="append", default=[], metavar="SPEC",
                help="zoo name (tiny-llama, tiny-qwen, tiny-gpt2, tiny-neox), checkpoint directory, or cached hub id; repeatable")
    g.addoption("--dataset", action="append", default=[], metavar="SPEC",
                help="digit-reverse, a .jsonl/.json/.csv/.txt file, or a cached hub data set; repeatable")
    g.addoption("--matrix", default=None, metavar="FILE", help="YAML matrix file (models, datasets, defaults, configs)")
    g.addoption("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                help="override a configuration field in every case, e.g. --set rank=32 --set optimizer=paged_adamw_8bit")
    g.addoption("--steps", type=int, default=None, metavar="N", help="training steps per case (same as --set steps=N)")
    g.addoption("--device", dest="bench_device", default="auto", metavar="DEVICE", help="auto (default), cpu, cuda or cuda:N")
    g.addoption("--thresholds", default=None, metavar="FILE", help="gates file (default: thresholds.yaml at the root)")
    g.addoption("--report-to", dest="report_to", default="none", choices=REPORT_TO,
                help="stream training curves through the Trainer's integration (tensorboard, or wandb offline)")
    g.addoption("--isolate", default="process", choices=ISOLATION,
                help="run each case in its own process (default; memory figures independent of earlier cases) "
                     "or in the pytest process (none; faster to debug)")
    g.addoption("--trust-remote-code", action="store_true", default=False,
                help="allow a checkpoint's own modelling code (off by default)")


def _overrides(config: pytest.Config) -> dict[str, Any]:
    pairs = dict(parse_override(text) for text in config.getoption("overrides"))
    steps = config.getoption("steps")
    if steps is not None:
        pairs["steps"] = steps
    return pairs


def pytest_configure(config: pytest.Config) -> None:
    try:
        matrix = build_matrix(
            matrix_file=config.getoption("matrix"),
            models=config.getoption("model"),
            datasets=config.getoption("dataset"),
            overrides=_overrides(config),
        )
    except LorabenchError as exc:
        raise pytest.UsageError(str(exc)) from None
    thresholds = config.getoption("thresholds") or Path(config.rootpath) / "thresholds.yaml"
    if config.getoption("report_to") == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
    config.stash[SESSION_KEY] = BenchSession(
        matrix=matrix,
        device_choice=config.getoption("bench_device"),
        report_to=config.getoption("report_to"),
        trust_remote_code=config.getoption("trust_remote_code"),
        isolate=config.getoption("isolate"),
        thresholds_path=Path(thresholds),
        reports_dir=Path(config.rootpath) / "reports",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bench_case" not in metafunc.fixturenames:
        return
    matrix = metafunc.config.stash[SESSION_KEY].matrix
    params = [
        pytest.param(case, id=case_id, marks=[getattr(pytest.mark, m) for m in case.config.markers])
        for case, case_id in zip(matrix.cases(), matrix.ids())
    ]
    metafunc.parametrize("bench_case", params)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Read the gates once, before any case trains, if any bench case was collected."""
    from lorabench.inference import VARIANTS

    gated = ("bench_case", "inference_adapter")
    if not any(name in getattr(item, "fixturenames", ()) for item in items for name in gated):
        return
    session = config.stash[SESSION_KEY]
    known = {c.id for c in DEFAULT_CONFIGS} | {c.id for c in session.matrix.configs} | {v.id for v in VARIANTS}
    try:
        session.thresholds = load_thresholds(session.thresholds_path, known)
    except LorabenchError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    from lorabench.environment import machine

    machine_info.update(machine())


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is None or not session.results:
        return
    counts = Counter(g["status"] for r in session.results for g in r.gates)
    terminalreporter.write_sep("=", "lorabench summary")
    for line in render_summary(session.results, dict(counts)):
        terminalreporter.write_line(line)
    failed = [g for r in session.results for g in r.gates if g["status"] == FAIL]
    for g in failed:
        terminalreporter.write_line(f"FAILED GATE {g['message']}")
