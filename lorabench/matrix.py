"""The configuration matrix: which cases a run holds.

A case is one configuration applied to one model and one data set. The default
matrix covers the reference reports (full fine-tuning baseline, LoRA, QLoRA NF4 and
FP4, LLM.int8, torchao int8, and an NF4 rank sweep); a YAML matrix file can replace or
extend it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorabench import yamlio
from lorabench.case_kinds import CUDA_PEAK, DEFAULT_KIND, PROCESS_PEAK, TENSOR_PEAK, CaseKind, register
from lorabench.config import BenchConfig, apply_overrides
from lorabench.errors import ConfigError
from lorabench.models.real_model import REAL_MODELS
from lorabench.paths import read_text

BASELINE_ID = "full"
SWEEP_RANKS = (8, 16, 32, 64)
# The sweep keeps alpha fixed, as the QLoRA paper did (r = 64, alpha = 16): the adapter's scale
# alpha / r then shrinks as the rank grows, so rank changes capacity rather than step size. With
# alpha = 2 r, rank 64 at the default learning rate lost the pre-training skill (forgetting 1.58
# nats on the 2-core AVX2 CPU, 2026-11-23) while rank 8 did not.
SWEEP_ALPHA = 16

DEFAULT_CONFIGS: tuple[BenchConfig, ...] = (
    BenchConfig("full", method="full"),
    BenchConfig("lora", method="lora"),
    BenchConfig("qlora_nf4", method="lora", quant="nf4", double_quant=True),
    BenchConfig("qlora_fp4", method="lora", quant="fp4"),
    BenchConfig("lora_int8", method="lora", quant="int8"),
    BenchConfig("lora_torchao_int8", method="lora", quant="torchao_int8"),
    *(
        BenchConfig(f"qlora_nf4_r{r}", method="lora", quant="nf4", double_quant=True, rank=r, alpha=SWEEP_ALPHA, tags=("sweep",))
        for r in SWEEP_RANKS
    ),
    # LoRA on two processes (lorabench/run/distributed.py), scaled against `lora`: DDP keeps a whole replica
    # per rank, FSDP2 a half of every weight. gloo on the CPU, NCCL on CUDA (one GPU per rank).
    BenchConfig("lora_ddp2", method="lora", world_size=2, strategy="ddp"),
    BenchConfig("lora_fsdp2", method="lora", world_size=2, strategy="fsdp"),
)

# Summary columns of a training case after the peak-memory ones (lorabench.case_kinds.Column).
TRAINING_COLUMNS = (
    ("weights_mib", "weights MiB", "weight memory"),
    ("step_ms", "step ms", "step time"),
    # the figure that gates speed, beside the raw wall clock it is computed from (lorabench.meters.control)
    ("step_control_ratio", "step/control", "step time over its control"),
    ("tokens_per_s", "tokens/s", "throughput"),
    ("train_loss_final", "train loss", "final train loss"),
    ("eval_loss", "eval loss", "eval loss"),
    ("perplexity", "ppl", "perplexity"),
    ("accuracy_pct", "acc % [95% CI]", "accuracy"),
    ("forgetting_nats", "forgetting", "forgetting"),
)


def training_columns(device: str) -> tuple:
    """Exact tensor bytes lead on the CPU; on CUDA the allocator's peak, tensor bytes beside it."""
    peaks = (CUDA_PEAK, TENSOR_PEAK) if device.startswith("cuda") else (TENSOR_PEAK, PROCESS_PEAK)
    return peaks + TRAINING_COLUMNS


register(CaseKind(DEFAULT_KIND, case_ids=lambda: [c.id for c in DEFAULT_CONFIGS], columns=training_columns,
                   runner="lorabench.kinds.finetune:CaseRun"))

DEFAULT_MODEL = "tiny-llama"
DEFAULT_DATASET = "digit-reverse"
_MATRIX_KEYS = ("models", "datasets", "defaults", "configs")


@dataclass(frozen=True)
class Case:
    """One pytest case: a configuration on a model and a data set."""

    model: str
    dataset: str
    config: BenchConfig

    def case_id(self, *, with_model: bool, with_dataset: bool) -> str:
        """The pytest id: the configuration id, prefixed by model and data set when a run has several."""
        parts = []
        if with_model:
            parts.append(short_name(self.model))
        if with_dataset:
            parts.append(short_name(self.dataset))
        parts.append(self.config.id)
        return "-".join(parts)

    def keywords(self) -> set[str]:
        """The ``-k`` words that select this case by field (see :func:`selection_keywords`)."""
        return selection_keywords(self.config.id, model=self.model, dataset=self.dataset)


@dataclass(frozen=True)
class Matrix:
    models: tuple[str, ...]
    datasets: tuple[str, ...]
    configs: tuple[BenchConfig, ...]

    def cases(self) -> list[Case]:
        """Models x data sets x configurations, configurations in matrix order (baseline first)."""
        return [Case(m, d, c) for m in self.models for d in self.datasets for c in self.configs]

    def ids(self) -> list[str]:
        multi_model, multi_data = len(self.models) > 1, len(self.datasets) > 1
        return [c.case_id(with_model=multi_model, with_dataset=multi_data) for c in self.cases()]


# Fields that say how a case spreads over processes, not what it trains.
_SPREAD_FIELDS = ("id", "world_size", "strategy", "tags")


def single_device_id(config: BenchConfig, configs) -> str | None:
    """The configuration a multi-process case scales against: the one-process configuration of
    ``configs`` that trains the same thing (every field equal but id, world_size, strategy, tags).

    Returns:
        Its id, or ``None`` for a one-process configuration or where ``configs`` has no such one.
    """
    if config.world_size == 1:
        return None
    mine = {k: v for k, v in config.to_dict().items() if k not in _SPREAD_FIELDS}
    for other in configs:
        if other.world_size == 1 and {k: v for k, v in other.to_dict().items() if k not in _SPREAD_FIELDS} == mine:
            return other.id
    return None


def selection_keywords(config_id: str, *, model: str | None = None, dataset: str | None = None) -> set[str]:
    """Words that ``pytest -k`` matches on a case, one per field, bracketed so no name is part of another.

    ``-k`` matches any substring of a case's names, so ``-k qlora_nf4`` also picks up ``qlora_nf4_r8``
    and ``minilm_qlora_nf4``. ``config[qlora_nf4]`` cannot: the brackets close the name on both sides.
    Models and data sets get ``model[NAME]`` and ``dataset[NAME]`` with NAME as in the case id
    (:func:`short_name`) and also as given (``model[Qwen/Qwen3-0.6B]``).

    Returns:
        e.g. ``{"config[qlora_nf4]", "model[tiny-llama]", "dataset[digit-reverse]"}``.
    """
    words = {f"config[{config_id}]"}
    for field, spec in (("model", model), ("dataset", dataset)):
        if spec:
            words |= {f"{field}[{short_name(spec)}]", f"{field}[{spec}]"}
    return words


def short_name(spec: str) -> str:
    """A readable, id-safe name for a model or data set spec (a hub id, a path or a zoo name)."""
    name = spec.rstrip("/").replace("\\", "/").split("/")[-1]
    for suffix in (".jsonl", ".json", ".csv", ".txt"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name) or "x"


def build_matrix(
    *,
    matrix_file: str | Path | None = None,
    models: list[str] | None = None,
    datasets: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Matrix:
    """Assemble the run's matrix.

    Precedence, lowest first: built-in defaults, the matrix file, command-line
    ``--model`` / ``--dataset``, command-line overrides (``--set``, ``--steps``).

    Raises:
        ConfigError: the matrix file is unreadable or malformed, ids repeat, or an override is invalid.
    """
    file_models: list[str] = []
    file_datasets: list[str] = []
    configs = list(DEFAULT_CONFIGS)
    if matrix_file is not None:
        file_models, file_datasets, configs = _read_matrix_file(Path(matrix_file))
    configs = [apply_overrides(c, overrides or {}) for c in configs]
    return Matrix(
        models=tuple(models or file_models or [DEFAULT_MODEL]),
        datasets=tuple(datasets or file_datasets or [default_dataset(models or file_models or [DEFAULT_MODEL])]),
        configs=tuple(configs),
    )


def default_dataset(models: list[str]) -> str:
    """The data set a run takes when none is given: an embedded real model's own where the run holds
    only that model (its forgetting reference is prose, :mod:`lorabench.data.real_text`), else digit-reverse."""
    own = {REAL_MODELS[m].dataset if m in REAL_MODELS else DEFAULT_DATASET for m in models}
    return own.pop() if len(own) == 1 else DEFAULT_DATASET


def _read_matrix_file(path: Path) -> tuple[list[str], list[str], list[BenchConfig]]:

    text = read_text(path, "--matrix")
    try:
        data = yamlio.load(text)
    except yamlio.YamlProblem as exc:
        at = f" (line {exc.line})" if exc.line else ""
        raise ConfigError(f"matrix file {path}{at}: {exc.problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"matrix file {path}: expected a mapping with keys {', '.join(_MATRIX_KEYS)}")
    unknown = sorted(set(data) - set(_MATRIX_KEYS))
    if unknown:
        raise ConfigError(f"matrix file {path}: unknown key(s) {unknown}; allowed: {', '.join(_MATRIX_KEYS)}")

    def names(key: str) -> list[str]:
        value = data.get(key) or []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"matrix file {path}: '{key}' must be a list of names")
        return value

    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"matrix file {path}: 'defaults' must be a mapping of configuration fields")
    if "id" in defaults:
        raise ConfigError(f"matrix file {path}: 'defaults' may not set 'id'")
    raw_configs = data.get("configs")
    if raw_configs is None:
        configs = [apply_overrides(c, defaults, where=f"{path}: defaults") for c in DEFAULT_CONFIGS]
    else:
        if not isinstance(raw_configs, list) or not raw_configs:
            raise ConfigError(f"matrix file {path}: 'configs' must be a non-empty list of configurations")
        configs = []
        for i, entry in enumerate(raw_configs):
            where = f"{path}: configs[{i}]"
            if not isinstance(entry, dict):
                raise ConfigError(f"{where}: expected a mapping of configuration fields, got {type(entry).__name__} {entry!r}")
            configs.append(BenchConfig.from_dict({**defaults, **entry}, where=where))
    seen: set[str] = set()
    for c in configs:
        if c.id in seen:
            raise ConfigError(f"matrix file {path}: configuration id {c.id!r} appears twice")
        seen.add(c.id)
    return names("models"), names("datasets"), configs
