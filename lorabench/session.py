"""One bench session: the parsed options, the matrix, the gates, the inputs and the results so far.

Everything a user passes is parsed here (:func:`open_session`) and checked before any case
trains (:meth:`BenchSession.load_gates`, :meth:`BenchSession.check_inputs`); the pytest
plugin only calls these and turns their errors into usage errors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorabench.budget import parse_size
from lorabench.config import parse_override
from lorabench.environment import machine
from lorabench.errors import ConfigError
from lorabench.matrix import DEFAULT_CONFIGS, Matrix, build_matrix
from lorabench.classify import CONFIGS as CLASSIFY_CONFIGS
from lorabench.classify import QUANT_ERROR_CASE_ID as MINILM_QUANT_ERROR_ID
from lorabench.quant_error import MODEL_CASE_ID, NORMAL_CASE_ID
from lorabench.result import STATUS_OK, CaseResult
from lorabench.seeds import SeedPlan, parse_seeds
from lorabench.thresholds import GateOutcome, Thresholds, evaluate, load_thresholds

REPORT_TO = ("none", "tensorboard", "wandb")
ISOLATION = ("process", "none")
DEFAULT_CASE_TIMEOUT_S = 1800.0


def built_in_case_ids() -> set[str]:
    """Every case id the bench ships, which thresholds.yaml may gate by name: the default matrix,
    the inference and GGUF variants, quantization error and the MiniLM classification cases."""
    from lorabench.gguf import GGUF_VARIANTS
    from lorabench.inference import VARIANTS

    return ({c.id for c in DEFAULT_CONFIGS} | {v.id for v in VARIANTS} | {v.id for v in GGUF_VARIANTS}
            | {NORMAL_CASE_ID, MODEL_CASE_ID, MINILM_QUANT_ERROR_ID} | {c.id for c in CLASSIFY_CONFIGS})


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
    quiet: bool = False  # below -v: library chatter hidden here and in the case processes (lorabench.quiet)
    thresholds: Thresholds | None = None
    results: list[CaseResult] = field(default_factory=list)
    # 1-minute load average when the session began: other work on the machine slows every timing
    load_at_start: float | None = field(default_factory=lambda: os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    # the base model's evaluations before training, by lorabench.runner.base_evaluation_key
    base_evaluations: dict[tuple, Any] = field(default_factory=dict)
    _device: Any = None
    _models: dict[str, Any] = field(default_factory=dict)
    _tasks: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self):
        from lorabench.models import resolve_device

        if self._device is None:
            self._device = resolve_device(self.device_choice)
        return self._device

    def model_source(self, spec: str):
        """The resolved ``--model`` (a zoo model is built on first use), cached for the session."""
        from lorabench.models import resolve_model

        if spec not in self._models:
            self._models[spec] = resolve_model(spec, trust_remote_code=self.trust_remote_code)
        return self._models[spec]

    def task(self, spec: str):
        """The loaded ``--dataset`` with its train/eval split, cached for the session."""
        from lorabench.data import load_task_data

        if spec not in self._tasks:
            self._tasks[spec] = load_task_data(spec)
        return self._tasks[spec]

    def load_gates(self) -> None:
        """Read thresholds.yaml; rules may name the run's and the default matrix's configurations,
        and the inference variants.

        Raises:
            ThresholdError: the file is malformed (with file, line, key and what is allowed).
        """
        known = built_in_case_ids() | {c.id for c in self.matrix.configs}
        self.thresholds = load_thresholds(self.thresholds_path, known)

    def check_inputs(self) -> None:
        """Check what the user supplied before any case trains: device, dtypes, models, data sets.

        Embedded zoo models are skipped here (they cannot be wrong, and building one takes a while).

        Raises:
            LorabenchError: the first bad input, named.
        """
        from lorabench.models import check_dtype_supported, load_tokenizer
        from lorabench.zoo import ZOO

        for config in self.matrix.configs:
            check_dtype_supported(config.dtype, self.device)
        for spec in self.matrix.models:
            if spec not in ZOO:
                load_tokenizer(self.model_source(spec))
        for spec in self.matrix.datasets:
            self.task(spec)

    def plan_line(self, cases: list, case_ids: list[str], storage: Path | None) -> str:
        """The first line of a run (lorabench.progress): cases, device, dtypes and the expected time."""
        from lorabench.config import resolve
        from lorabench.control import ControlWorkload
        from lorabench.models import CHECKPOINT_TRAIN_DEFAULTS
        from lorabench.progress import estimate_from_control, estimate_from_history, plan_line
        from lorabench.zoo import ZOO

        resolved = [resolve(c.config, ZOO[c.model].defaults if c.model in ZOO else CHECKPOINT_TRAIN_DEFAULTS,
                            self.device) for c in cases]
        estimate = estimate_from_history(storage, case_ids)
        if estimate is None and all(c.model in ZOO for c in cases):
            control = ControlWorkload(self.device)
            control.run()  # the first pass pays for thread-pool and kernel start-up
            control_s = min(control.run() for _ in range(5))
            estimate = (estimate_from_control([r.steps for r in resolved], control_s),
                        "a rough model of the tiny models, scaled by a control workload timed now")
        return plan_line(case_ids=case_ids, models=sorted({c.model for c in cases}),
                         datasets=sorted({c.dataset for c in cases}), device=str(self.device),
                         dtypes=sorted({r.dtype for r in resolved}), isolate=self.isolate, estimate=estimate)

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
            for g in self.thresholds.gates_for(result.config_id, device_type, result.model, machine()["cpu_isa"],
                                                   wildcard=wildcard)
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
) -> BenchSession:
    """Parse the run's options into a session (the command line's ``--matrix``, ``--set``, ...).

    Raises:
        ConfigError: a malformed matrix file, override, budget, timeout or seed list, named.
    """
    pairs = dict(parse_override(text) for text in overrides or [])
    if steps is not None:
        pairs["steps"] = steps
    matrix = build_matrix(matrix_file=matrix_file, models=models, datasets=datasets, overrides=pairs)
    if case_timeout_s < 0:
        raise ConfigError(f"--case-timeout {case_timeout_s:g}: must be 0 (off) or a positive number of seconds")
    for name, value, allowed in (("--report-to", report_to, REPORT_TO), ("--isolate", isolate, ISOLATION)):
        if value not in allowed:
            raise ConfigError(f"{name} {value!r}: choose one of {', '.join(allowed)}")
    return BenchSession(
        matrix=matrix,
        device_choice=device,
        report_to=report_to,
        trust_remote_code=trust_remote_code,
        isolate=isolate,
        thresholds_path=Path(thresholds) if thresholds else root / "thresholds.yaml",
        reports_dir=root / "reports",
        memory_budget=parse_size(memory_budget) if memory_budget is not None else None,
        case_timeout_s=case_timeout_s,
        seeds=parse_seeds(seeds),
        quiet=quiet,
    )
