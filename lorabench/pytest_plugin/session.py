"""One bench session: the parsed options, the matrix, the gates, the inputs and the results so far.

Everything a user passes is parsed here (:func:`open_session`) and checked before any case
trains (:meth:`BenchSession.load_gates`, :meth:`BenchSession.check_inputs`,
:meth:`BenchSession.check_outputs`); the pytest plugin only calls these and turns their
errors into usage errors.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorabench import backends
from lorabench.meters.budget import parse_size
from lorabench.config import parse_override
from lorabench.meters.environment import machine
from lorabench.errors import ConfigError, StorageError
from lorabench.training.integrations import require as require_integration
from lorabench.training.integrations import run_name
from lorabench.case_kinds import kind_of, known_case_ids
from lorabench.matrix import Case, Matrix, build_matrix, short_name
from lorabench.paths import expand, not_empty
from lorabench.result import STATUS_OK, CaseResult
from lorabench.evaluation.seeds import SeedPlan, parse_seeds
from lorabench.gates.thresholds import GateOutcome, Thresholds, evaluate_gate, load_thresholds
from lorabench.config import resolve
from lorabench.data.tasks import load_task_data
from lorabench.meters.control import ControlWorkload
from lorabench.models.loading import check_dtype_supported, train_defaults
from lorabench.models.loading import resolve_device
from lorabench.models.loading import resolve_model
from lorabench.models.loading import train_defaults
from lorabench.models.zoo import ZOO
from lorabench.models.zoo import ZOO, is_cached
from lorabench.run import preflight

REPORT_TO = ("none", "tensorboard", "wandb")
ISOLATION = ("process", "none")
DEFAULT_CASE_TIMEOUT_S = 1800.0
AUTO_THREADS = "auto"
# what --device accepts, checked when the options are read (a CUDA device asked for is looked up then too)
DEVICE_CHOICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# a -k word that selects by field: config[ID], model[NAME], dataset[NAME]
SELECTION_WORD = re.compile(r"\b(config|model|dataset)\[([^\]]*)\]")
log = logging.getLogger("lorabench.preflight")


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
    memory_budget: int | None = None
    case_timeout_s: float = DEFAULT_CASE_TIMEOUT_S
    seeds: SeedPlan = field(default_factory=SeedPlan)  # --seeds: how many times each fine-tuning case runs
    cpu_threads: int | None = None  # --cpu-threads N; None for auto (cpu_threads_for)
    quiet: bool = False  # below -v: library chatter hidden here and in the case processes (lorabench.run.quiet)
    thresholds: Thresholds | None = None
    results: list[CaseResult] = field(default_factory=list)
    # worth knowing, not wrong (rows left out); shown at start-up and in the summary
    notices: list[str] = field(default_factory=list)
    # runs that could not be written where asked (lorabench.storage.atomic.SaveFailure)
    save_failures: list = field(default_factory=list)
    # 1-minute load average when the session began: other work on the machine slows every timing
    load_at_start: float | None = field(default_factory=lambda: os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    # reports/runs/<log_run>/<case>: the integrations' logs, one directory per run (lorabench.training.integrations)
    log_run: str = field(default_factory=run_name)
    # the base model's evaluations before training, by lorabench.kinds.finetune.base_evaluation_key
    base_evaluations: dict[tuple, Any] = field(default_factory=dict)
    _device: Any = None
    _models: dict[str, Any] = field(default_factory=dict)
    _tasks: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self):

        if self._device is None:
            self._device = resolve_device(self.device_choice)
        return self._device

    def model_source(self, spec: str):
        """The resolved ``--model`` (a zoo model is built on first use), cached for the session."""

        if spec not in self._models:
            self._models[spec] = resolve_model(spec, trust_remote_code=self.trust_remote_code)
        return self._models[spec]

    def task(self, spec: str):
        """The loaded ``--dataset`` with its train/eval split, cached for the session."""

        if spec not in self._tasks:
            self._tasks[spec] = load_task_data(spec)
        return self._tasks[spec]

    def load_gates(self) -> None:
        """Read thresholds.yaml; rules may name the run's and the default matrix's configurations,
        and the inference variants.

        Raises:
            ThresholdError: the file is malformed (with file, line, key and what is allowed).
        """
        known = known_case_ids() | {c.id for c in self.matrix.configs}
        self.thresholds = load_thresholds(self.thresholds_path, known)

    def check_inputs(self, cases: list[Case] | None = None) -> None:
        """Check what the user supplied before any case trains: device, dtypes, models, data sets,
        and what each case would meet later (target modules, sequence length, batch size).

        Embedded zoo models are not built here: their config and tokenizer are enough.

        Args:
            cases: the cases that will run (pytest's selection); every case of the matrix if ``None``.

        Raises:
            LorabenchError: the first bad input, named.
        """

        cases = self.matrix.cases() if cases is None else cases
        for config in {c.config.id: c.config for c in cases}.values():
            check_dtype_supported(config.dtype, self.device)
            backends.check_runnable(config.quant, self.device)
        preflight.check_zoo_cache([m for m in dict.fromkeys(c.model for c in cases) if m in ZOO and not is_cached(m)])
        tasks = {spec: self.task(spec) for spec in dict.fromkeys(c.dataset for c in cases)}
        facts = {}
        for spec in dict.fromkeys(c.model for c in cases):
            source = None if spec in ZOO else self.model_source(spec)
            facts[spec] = preflight.model_facts(spec, source, trust_remote_code=self.trust_remote_code)
        notices = [n for spec, task in tasks.items() for n in preflight.check_blank_rows(task, spec)]
        lengths = {}
        for case in cases:
            fact, task = facts[case.model], tasks[case.dataset]
            preflight.check_target_modules(case.config, fact)
            key = (case.model, case.dataset)
            if key not in lengths:
                lengths[key] = preflight.token_lengths(task, fact.tokenizer)
            # the session's own look over every case before any runs (each case is resolved again where it is
            # launched, lorabench.run.launch.resolve_case): defaults as the model's source will carry them
            notices += preflight.check_lengths(resolve(case.config, train_defaults(case.model), self.device),
                                             lengths[key], fact, case.dataset)
        for notice in dict.fromkeys(notices):
            log.warning(notice)
            self.notices.append(notice)

    def check_selection(self, keyword: str) -> None:
        """A ``-k`` expression that selected no case: each ``config[ID]``, ``model[NAME]`` and
        ``dataset[NAME]`` word in it names a case of this run (:func:`lorabench.matrix.selection_keywords`).

        Raises:
            ConfigError: the first word naming no case, with the names this run knows.
        """
        known = {"config": sorted(known_case_ids() | {c.id for c in self.matrix.configs}),
                 "model": sorted({w for m in self.matrix.models for w in (m, short_name(m))}),
                 "dataset": sorted({w for d in self.matrix.datasets for w in (d, short_name(d))})}
        for field_name, value in SELECTION_WORD.findall(keyword or ""):
            if value not in known[field_name]:
                noun = {"config": "configuration", "dataset": "data set"}.get(field_name, field_name)
                raise ConfigError(f"-k {keyword!r} selects no case: {field_name}[{value}] names no {noun} of "
                                  f"this run; known: {', '.join(known[field_name])}")

    def check_outputs(self, *, storage: Path | None = None, json_path: Path | None = None, cases: int = 1,
                      ids: list[str] | None = None) -> None:
        """Check every place the run writes before any case trains: the history storage, the
        ``--benchmark-json`` file's directory, and the reports directory when ids become paths there.

        Args:
            storage: where pytest-benchmark saves this run (``None`` when it does not save).
            json_path: the ``--benchmark-json`` file, if any.
            cases: the cases the run will hold (for the free space its outputs need).
            ids: the ids of the cases that will run (every case of the matrix if ``None``).

        Raises:
            LorabenchError: a directory that cannot be written or lacks room, or a case id too long for a file name.
        """

        if storage is not None:
            preflight.check_output_dir(storage, "--benchmark-storage", cases)
        if json_path is not None:
            if json_path.is_dir():
                raise StorageError(f"--benchmark-json {json_path}: a directory, not a file; name the file to write")
            preflight.check_output_dir(json_path.absolute().parent, f"--benchmark-json {json_path}: its directory", cases)
        if self.report_to != "none":
            runs = self.reports_dir / "runs" / self.log_run
            preflight.check_name_lengths(self.matrix.ids() if ids is None else ids, runs, f"--report-to {self.report_to}")
            preflight.check_output_dir(runs, f"--report-to {self.report_to}: its log directory", cases)

    def plan_line(self, cases: list, case_ids: list[str], storage: Path | None, workers: int = 1) -> str:
        """The first line of a run (lorabench.run.progress): cases, device, dtypes and the expected time, with
        ``--seeds`` and the ``workers`` of ``-n``."""
        from lorabench.run.progress import (
            estimate_from_control,
            estimate_from_history,
            estimate_zoo_builds,
            for_run,
            plan_line,
            with_builds,
        )

        # the plan's own resolution of every case (steps, dtypes); each case is resolved where it is launched
        resolved = [resolve(c.config, train_defaults(c.model), self.device) for c in cases]
        to_build = sorted({c.model for c in cases if c.model in ZOO and not is_cached(c.model)})
        estimate = estimate_from_history(storage, case_ids)
        control_s = None
        if to_build or (estimate is None and all(c.model in ZOO for c in cases)):
            control = ControlWorkload(self.device)
            control.run()  # the first pass pays for thread-pool and kernel start-up
            control_s = min(control.run().wall_s for _ in range(5))
        if estimate is None and all(c.model in ZOO for c in cases):
            estimate = (estimate_from_control([r.steps for r in resolved], control_s),
                        "a rough model of the tiny models, scaled by a control workload timed now")
        # a model is built once, whatever the seeds; a worker with no case does not shorten the run
        estimate = for_run(estimate, seeds=self.seeds.n, workers=max(1, min(workers, len(cases))))
        if to_build:
            builds_s = estimate_zoo_builds([ZOO[name].pretrain.steps for name in to_build], control_s)
            estimate = with_builds(estimate, builds_s, to_build)
        return plan_line(case_ids=case_ids, models=sorted({c.model for c in cases}),
                         datasets=sorted({c.dataset for c in cases}), device=str(self.device),
                         dtypes=sorted({r.dtype for r in resolved}), isolate=self.isolate, estimate=estimate)

    def cpu_threads_for(self, model: str) -> int | None:
        """torch's threads for a case of ``model`` on the CPU (``None``: torch's own setting).

        auto: one for an embedded zoo model. At their size a step's operators are too small to share
        between cores (one thread ran a tiny-llama step in 119 ms, two in 202 ms, on 2 cores), and a
        one-thread step keeps its ratio to the control workload under a CPU hog (lorabench.meters.control).
        """
        if self.cpu_threads is not None:
            return self.cpu_threads

        return 1 if model in ZOO else None

    def log_dir(self, case_id: str) -> str:
        """Where the Trainer's integrations (TensorBoard) write for one case."""
        return str(self.reports_dir / "runs" / self.log_run / case_id)

    def other_case(self, model: str, dataset: str):
        """Lookup of another configuration's (metrics, absent) in this session, for relative gates."""

        def lookup(config_id: str):
            for r in reversed(self.results):
                if (r.model, r.dataset, r.config_id) == (model, dataset, config_id) and r.status == STATUS_OK:
                    return r.metrics, r.absent
            return None

        return lookup

    def gate(self, result: CaseResult) -> list[GateOutcome]:
        """Evaluate every applicable gate on ``result`` and store the outcomes in it; the ``"*"`` rules
        apply where the record's kind says so (:mod:`lorabench.case_kinds`)."""
        if self.thresholds is None or result.status != STATUS_OK:
            return []
        device_type = result.device.split(":")[0]
        outcomes = [
            evaluate_gate(g, result.config_id, result.metrics, result.absent, self.other_case(result.model, result.dataset),
                          result.config)
            for g in self.thresholds.gates_for(result.config_id, device_type, result.model, machine()["cpu_isa"],
                                                   wildcard=kind_of(result).wildcard_rules,
                                                   checkpointing=result.config.get("gradient_checkpointing"),
                                                   dataset=result.dataset)
        ]
        result.gates = [o.to_dict() for o in outcomes]
        return outcomes


def open_session(
    *,
    root: Path,
    matrix_file: str | None = None,
    models: list[str] | None = None,
    datasets: list[str] | None = None,
    overrides: list[str] | None = None,
    steps: int | None = None,
    device: str = "auto",
    thresholds: str | None = None,
    report_to: str = "none",
    isolate: str = "process",
    trust_remote_code: bool = False,
    memory_budget: str | None = None,
    case_timeout_s: float = DEFAULT_CASE_TIMEOUT_S,
    seeds: str | None = None,
    quiet: bool = False,
    cpu_threads: str = AUTO_THREADS,
) -> BenchSession:
    """Parse the run's options into a session (the command line's ``--matrix``, ``--set``, ...).

    Raises:
        ConfigError: a malformed matrix file, override, budget, timeout or seed list, or an empty value, named.
    """
    for option, values in (("--model", models or []), ("--dataset", datasets or []), ("--set", overrides or [])):
        for value in values:
            not_empty(value, option)
    pairs = dict(parse_override(text) for text in overrides or [])
    if steps is not None:
        if pairs.get("steps", steps) != steps:
            raise ConfigError(f"--steps {steps} and --set steps={pairs['steps']} conflict; give the number of steps once")
        pairs["steps"] = steps
    if matrix_file is not None:
        matrix_file = expand(matrix_file, "--matrix")
    matrix = build_matrix(matrix_file=matrix_file, models=models, datasets=datasets, overrides=pairs)
    _check_unique_cases(matrix, from_command_line={"--model": models or [], "--dataset": datasets or []})
    if not math.isfinite(case_timeout_s) or case_timeout_s < 0:
        raise ConfigError(f"--case-timeout {case_timeout_s:g}: must be 0 (off) or a finite positive number of seconds")
    for name, value, allowed in (("--report-to", report_to, REPORT_TO), ("--isolate", isolate, ISOLATION),
                                 ("--device", device, None)):
        not_empty(value, name)
        if allowed and value not in allowed:
            raise ConfigError(f"{name} {value!r}: choose one of {', '.join(allowed)}")
    if not DEVICE_CHOICE.fullmatch(device):
        raise ConfigError(f"--device {device!r}: use auto, cpu, cuda or cuda:N (N a device number, e.g. cuda:0)")
    require_integration(report_to)
    session = BenchSession(
        matrix=matrix,
        device_choice=device,
        report_to=report_to,
        trust_remote_code=trust_remote_code,
        isolate=isolate,
        thresholds_path=expand(thresholds, "--thresholds") if thresholds is not None else root / "thresholds.yaml",
        reports_dir=root / "reports",
        memory_budget=parse_size(not_empty(memory_budget, "--memory-budget")) if memory_budget is not None else None,
        case_timeout_s=case_timeout_s,
        seeds=parse_seeds(seeds),
        quiet=quiet,
        cpu_threads=_parse_threads(cpu_threads),
        notices=_thread_notices(cpu_threads),
    )
    if device.startswith("cuda"):
        # asked for by name: resolved (torch imported) and refused here, once, before any hook or xdist
        # worker reads it; auto and cpu cannot fail and wait until a case needs the device
        session.device  # noqa: B018
    return session


def _check_unique_cases(matrix: Matrix, from_command_line: dict[str, list[str]]) -> None:
    """Each model and data set once, and one case per id: pytest would run a repeated one twice, as
    ``..._0`` and ``..._1``, which later compare as two cases missing from the other run.

    Raises:
        ConfigError: a name given twice (naming the option), or two names that make the same case id.
    """
    for option, values in from_command_line.items():
        repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if repeated is not None:
            raise ConfigError(f"{option} {repeated}: given twice; name each {option[2:]} once")
    for field, values in (("models", matrix.models), ("datasets", matrix.datasets)):
        repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if repeated is not None:
            raise ConfigError(f"matrix file: {field} lists {repeated!r} twice; name each once")
    ids, cases = matrix.ids(), matrix.cases()
    first: dict[str, Case] = {}
    for case_id, case in zip(ids, cases):
        if case_id in first:
            other = first[case_id]
            both = ", ".join(f"{what} {a!r} and {b!r}" for what, a, b in (
                ("model", other.model, case.model), ("data set", other.dataset, case.dataset)) if a != b)
            raise ConfigError(f"case id {case_id!r} stands for two cases ({both}): their names end alike; rename one "
                              "file or directory so each case has its own id")
        first[case_id] = case


def _available_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's share), else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _thread_notices(text: str) -> list[str]:
    """A warning for ``--cpu-threads`` past the cores: the threads then take turns, and every step slows."""
    threads, cores = _parse_threads(text), _available_cores()
    if threads is None or threads <= cores:
        return []
    notice = (f"--cpu-threads {threads}: this process may use {cores} core(s); {threads} threads share them and "
              f"slow every step (use --cpu-threads {cores} or less, or auto)")
    log.warning(notice)
    return [notice]


def _parse_threads(text: str) -> int | None:
    """``--cpu-threads``: ``auto`` (``None``) or a positive number of threads."""
    not_empty(text, "--cpu-threads")
    if text == AUTO_THREADS:
        return None
    try:
        threads = int(text)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ConfigError(f"--cpu-threads {text!r}: use auto or a whole number of threads, 1 or more")
    return threads
