"""One benchmark configuration: how the model is loaded, adapted and trained.

A configuration is plain data. It validates itself on construction (like peft's
``LoraConfig``), round-trips through ``to_dict`` / ``from_dict`` (and so YAML), and
derives its pytest markers from its own fields.

Training hyper-parameters that depend on the model (steps, batch size, sequence
length, learning rate) may be left as ``None``: :func:`resolve` fills them from the
model's :class:`TrainDefaults` at run time, and the resolved copy is what every
result records.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from lorabench import backends
from lorabench.errors import ConfigError
from lorabench import yamlio
from lorabench.backends.precision import AUTO, resolve_dtype

METHODS = ("full", "lora")
DTYPES = ("auto", "bf16", "fp16", "fp32")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
TARGET_MODULE_PRESETS = ("all-linear", "attention")
# How a case spreads over processes (lorabench/run/distributed.py): one process, or world_size ranks
# under torchrun with DistributedDataParallel or FSDP2 (fully_shard).
STRATEGIES = ("none", "ddp", "fsdp")
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Seeds reach numpy (``np.random.seed``), which takes 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1
# Divergence beyond NaN (lorabench.training.loop.DivergenceRule): a loss that climbs past this
# multiple of its first step, or does not once fall below its first step over this many steps.
DIVERGENCE_FACTOR = 2.0
DIVERGENCE_WINDOW = 10
# Markers a configuration may add through ``tags`` on top of the derived ones.
EXTRA_TAGS = ("sweep", "slow", "gpu")


@dataclass(frozen=True)
class TrainDefaults:
    """Hyper-parameters a model brings when a configuration leaves them open."""

    steps: int
    batch_size: int
    seq_len: int
    lr_full: float
    lr_lora: float


@dataclass(frozen=True)
class BenchConfig:
    """A fine-tuning configuration: one pytest case per model and data set.

    Args:
        id: short readable name, used as the pytest id (``qlora_nf4``).
        method: ``full`` (every weight trains) or ``lora`` (a peft adapter trains).
        quant: base weights as loaded: ``none``, or a format of a quantization backend (:mod:`lorabench.backends`;
            bitsandbytes: 4-bit ``nf4`` / ``fp4``, LLM.int8 ``int8``).
        double_quant: quantize the 4-bit scales again (QLoRA's double quantization; nf4 and fp4).
        dtype: weight dtype of an unquantized base, compute dtype of a quantized one; ``auto``
            (the default) takes the device's native dtype (:mod:`lorabench.backends.precision`).
        rank, alpha, dropout: LoRA hyper-parameters.
        target_modules: ``all-linear``, ``attention``, or a list of module names.
        optimizer: ``adamw`` (torch), ``adamw_8bit`` or ``paged_adamw_8bit`` (bitsandbytes).
        gradient_checkpointing: recompute activations in the backward pass. On by default, as in the
            QLoRA recipe (``qlora.py``: "You want to use this") and LLaMA-Factory: it is how LoRA and QLoRA
            are run, and without it activations, not weights, decide which configuration needs most memory.
        batch_size, grad_accum, seq_len, lr, steps: training; ``None`` takes the model's default.
        warmup_steps: leading optimizer steps excluded from every speed figure.
        seed: seeds data order, adapter initialisation and dropout (0 to 2**32 - 1).
        divergence_factor: the case is ``diverged`` when a step's loss exceeds this multiple of the first step's.
        divergence_window: ... or when the loss stays at or above the first step's for this many
            consecutive steps (0 turns this check off).
        tags: extra pytest markers (``sweep``, ``slow``, ``gpu``).
        world_size: processes (ranks) the case trains on, launched by ``torchrun``; 1 for one process.
        strategy: ``none`` (one process), ``ddp`` (DistributedDataParallel: every rank holds the
            whole model) or ``fsdp`` (FSDP2 ``fully_shard``: every rank holds 1/world_size of it).

    Raises:
        ConfigError: a field is out of range or two fields contradict each other.
    """

    id: str
    method: str = "lora"
    quant: str = "none"
    double_quant: bool = False
    dtype: str = "auto"
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"
    optimizer: str = "adamw"
    gradient_checkpointing: bool = True
    batch_size: int | None = None
    grad_accum: int = 1
    seq_len: int | None = None
    lr: float | None = None
    steps: int | None = None
    warmup_steps: int = 3
    seed: int = 1234
    divergence_factor: float = DIVERGENCE_FACTOR
    divergence_window: int = DIVERGENCE_WINDOW
    tags: tuple[str, ...] = field(default_factory=tuple)
    world_size: int = 1
    strategy: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.tags, list):
            object.__setattr__(self, "tags", tuple(self.tags))
        _validate(self)

    # ----- derived views -------------------------------------------------
    @property
    def quantized(self) -> bool:
        return self.quant != "none"

    @property
    def markers(self) -> tuple[str, ...]:
        """pytest markers derived from the fields (registered: pytest.ini, and each quantization backend its own)."""
        marks = [self.method]
        if self.quantized:
            marks += [*backends.format_for(self.quant).markers, "quantized"]
        if self.optimizer != "adamw":
            marks.append("optim8bit")
        if self.gradient_checkpointing:
            marks.append("checkpointing")
        if self.strategy != "none":
            marks += ["distributed", self.strategy]
        marks += [t for t in self.tags if t not in marks]
        return tuple(marks)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so the result is YAML- and JSON-safe."""
        out = dataclasses.asdict(self)
        if isinstance(self.target_modules, tuple):
            out["target_modules"] = list(self.target_modules)
        out["tags"] = list(self.tags)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "configuration") -> BenchConfig:
        """Build from a mapping, rejecting unknown keys by name.

        Args:
            data: the mapping, e.g. one entry of a matrix file.
            where: how to name the source in errors (``matrix.yaml: configs[2]``).
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(known))}"
            )
        if "id" not in data:
            raise ConfigError(f"{where}: missing required field 'id'")
        try:
            return cls(**{k: _coerce(k, v, where) for k, v in data.items()})
        except ConfigError as exc:
            if str(exc).startswith(where):
                raise
            raise ConfigError(f"{where}: {exc}") from None

    def replace(self, **changes: Any) -> BenchConfig:
        return dataclasses.replace(self, **changes)


def resolve(config: BenchConfig, defaults: TrainDefaults, device=None) -> BenchConfig:
    """Fill the fields left open: ``None`` from the model's defaults, ``dtype: auto`` from the device.

    Args:
        device: the torch device the case runs on; needed when ``dtype`` is ``auto``.

    Raises:
        ConfigError: ``dtype`` is ``auto`` and no device is given to resolve it.
    """

    if config.dtype == AUTO and device is None:
        raise ConfigError(f"configuration {config.id!r}: dtype 'auto' needs the device to resolve it")
    lr = config.lr if config.lr is not None else (defaults.lr_full if config.method == "full" else defaults.lr_lora)
    return config.replace(
        steps=config.steps if config.steps is not None else defaults.steps,
        batch_size=config.batch_size if config.batch_size is not None else defaults.batch_size,
        seq_len=config.seq_len if config.seq_len is not None else defaults.seq_len,
        lr=lr,
        dtype=resolve_dtype(config.dtype, device) if device is not None else config.dtype,
    )


def apply_overrides(config: BenchConfig, overrides: dict[str, Any], *, where: str = "--set") -> BenchConfig:
    """Return ``config`` with ``overrides`` applied and validated again."""
    if not overrides:
        return config
    merged = config.to_dict() | overrides
    return BenchConfig.from_dict(merged, where=f"{where} on {config.id!r}")


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``KEY=VALUE`` command-line override; the value is read as YAML.

    Raises:
        ConfigError: no ``=``, or an unknown key.
    """

    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set rank=32")
    key, raw = text.split("=", 1)
    key = key.strip()
    known = {f.name for f in dataclasses.fields(BenchConfig)} - {"id"}
    if key not in known:
        raise ConfigError(f"--set {text!r}: unknown key {key!r}; allowed: {', '.join(sorted(known))}")
    if not raw.strip():
        raise ConfigError(f"--set {text!r}: empty value; give one, e.g. --set {key}=...")
    try:
        value = yamlio.load(raw)
    except yamlio.YamlProblem as exc:
        raise ConfigError(f"--set {text!r}: value is not acceptable YAML: {exc.problem}") from None
    return key, _coerce(key, value, f"--set {text!r}")


# ----- validation ----------------------------------------------------------
_INT_FIELDS = ("rank", "alpha", "grad_accum", "warmup_steps", "seed", "batch_size", "seq_len", "steps",
               "divergence_window", "world_size")
_FLOAT_FIELDS = ("dropout", "lr", "divergence_factor")
_BOOL_FIELDS = ("double_quant", "gradient_checkpointing")


def _coerce(key: str, value: Any, where: str) -> Any:
    """Accept what YAML and the command line naturally give (``1e-4`` as a string, lists)."""
    if key in _FLOAT_FIELDS and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: {key}={value!r} is not a number") from None
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# What each field takes, checked in this order: its type, its choices, its range, then the rules between
# fields. A field of _OPTIONAL may be None (the model's default fills it: :func:`resolve`).
_OPTIONAL = frozenset({"batch_size", "seq_len", "steps", "lr"})
_TYPES = {
    **dict.fromkeys(_INT_FIELDS, (_is_int, "must be a whole number")),
    **dict.fromkeys(_FLOAT_FIELDS, (_is_finite, "must be a finite number")),
    **dict.fromkeys(_BOOL_FIELDS, (lambda v: isinstance(v, bool), "must be true or false")),
}
_CHOICES = {"method": METHODS, "dtype": DTYPES, "optimizer": OPTIMIZERS, "strategy": STRATEGIES}
_AT_LEAST_1 = (lambda v: v >= 1, "must be at least 1")
_RANGES = {
    "rank": _AT_LEAST_1,
    "alpha": _AT_LEAST_1,
    "dropout": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    "grad_accum": _AT_LEAST_1,
    "warmup_steps": (lambda v: v >= 0, "must not be negative"),
    "seed": (lambda v: 0 <= v <= MAX_SEED, f"is out of range; use 0 to {MAX_SEED} (2**32 - 1, numpy's limit)"),
    "divergence_factor": (lambda v: v > 1, "must be above 1 (a multiple of the first step's loss)"),
    "divergence_window": (lambda v: v >= 0, "must be 0 (off) or a number of steps"),
    "batch_size": _AT_LEAST_1,
    "seq_len": _AT_LEAST_1,
    "steps": _AT_LEAST_1,
    "lr": (lambda v: v > 0, "must be positive"),
    "world_size": _AT_LEAST_1,
}
# (broken, what to say): rules between fields, for a configuration whose fields are each valid
_RULES: tuple[tuple[Callable[[BenchConfig], bool], Callable[[BenchConfig], str]], ...] = (
    (lambda c: c.steps is not None and c.steps <= c.warmup_steps,
     lambda c: f"steps={c.steps} must exceed warmup_steps={c.warmup_steps}: no step would be measured"),
    (lambda c: c.method == "full" and c.quantized,
     lambda c: f"method='full' with quant={c.quant!r}: quantized weights cannot be trained directly; "
               "use method='lora'"),
    (lambda c: c.double_quant and not backends.takes_double_quant(c.quant),
     lambda c: f"double_quant=true needs a 4-bit quant ({' or '.join(backends.double_quant_values())}), "
               f"not {c.quant!r}"),
    (lambda c: isinstance(c.target_modules, str) and c.target_modules not in TARGET_MODULE_PRESETS,
     lambda c: f"target_modules={c.target_modules!r}: use {' or '.join(TARGET_MODULE_PRESETS)} "
               "or a list of module names"),
    (lambda c: not isinstance(c.target_modules, str)
     and not (c.target_modules and all(isinstance(m, str) and m for m in c.target_modules)),
     lambda c: "target_modules must be a preset or a non-empty list of module names"),
    (lambda c: c.world_size > 1 and c.strategy == "none",
     lambda c: f"world_size={c.world_size} needs a strategy: ddp or fsdp"),
    (lambda c: c.strategy != "none" and c.world_size < 2,
     lambda c: f"strategy={c.strategy!r} needs world_size of at least 2 (one process is strategy 'none')"),
    (lambda c: c.strategy == "fsdp" and c.quantized,
     lambda c: f"strategy='fsdp' with quant={c.quant!r}: sharding a bitsandbytes-quantized base is not supported "
               "yet; use strategy='ddp' or quant='none'"),
    (lambda c: any(t not in EXTRA_TAGS for t in c.tags),
     lambda c: f"tags {[t for t in c.tags if t not in EXTRA_TAGS]} are not allowed; "
               f"choose from {', '.join(EXTRA_TAGS)}"),
)


def _validate(c: BenchConfig) -> None:
    """Check ``c`` against the tables above.

    Raises:
        ConfigError: the first field or rule it breaks, with the value and what is allowed.
    """

    def fail(msg: str) -> None:
        raise ConfigError(f"configuration {c.id!r}: {msg}")

    if not isinstance(c.id, str) or not _ID_PATTERN.match(c.id):
        raise ConfigError(
            f"configuration id {c.id!r}: use letters, digits, '_', '.', '-' and start with a letter or digit"
        )
    if isinstance(c.quant, (list, tuple)):
        fail(f"quant={list(c.quant)!r}: a base loads in one quantization format, not both; give one value: "
             f"{backends.allowed_text()}")
    try:
        backends.check_quant(c.quant)
    except ConfigError as exc:
        fail(str(exc))
    for name, allowed in _CHOICES.items():
        value = getattr(c, name)
        if value not in allowed:
            fail(f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")
    for name, (valid, must) in _TYPES.items():
        value = getattr(c, name)
        if not valid(value) and not (value is None and name in _OPTIONAL):
            fail(f"{name}={value!r} {must}")
    for name, (within, must) in _RANGES.items():
        value = getattr(c, name)
        if value is not None and not within(value):
            fail(f"{name}={value} {must}")
    for broken, say in _RULES:
        if broken(c):
            fail(say(c))
