"""Gates from thresholds.yaml: parse them (with file lines), validate them, evaluate them.

The file::

    version: 1
    profiles:
      default:                         # always applies
        "*":                           # every configuration
          - loss_drop >= 0.1           # sanity: it learned
        qlora_nf4:
          - quant_linear_ratio <= 0.3                       # absolute
          - eval_loss <= 1.10 * lora.eval_loss         # relative to another configuration
      cuda:                            # applies to cases run on a CUDA device
        ...
      "cuda & model=Qwen/Qwen3-0.6B":  # selectors combine with '&'
        ...
      "cpu & isa=AVX2":                # the CPU's vector ISA, as torch.backends.cpu.get_cpu_capability() names it
        ...
      "cpu & checkpointing":           # cases trained with gradient checkpointing ('no-checkpointing': without)
        ...
      embedded:                        # the embedded default only: a tiny zoo model on its generated task
        ...
    compare: {...}                     # tolerances for `python -m lorabench compare`

A rule reads ``METRIC OP BOUND`` where OP is one of ``<= >= < >`` and BOUND is a number,
or ``[FACTOR *] CONFIG.METRIC``: a metric of another configuration of the same run,
model and data set, or of the case itself when CONFIG is ``self``
(``peak_alloc_mib >= self.weights_mib``). Both sides of a relative rule share a unit (a plain
number is read in the metric's own unit), bounds and factors are finite, and rules that no
value can meet together are refused.

A rule may end in ``when NAME OP NUMBER``: it is decided only where the case's ``NAME`` (a metric, or
``steps``) meets that condition, and elsewhere is *not evaluable*: the data cannot decide it, which is
neither a pass nor a failure, and the outcome says what would make it evaluable
(``accuracy_ci_low_pct > self.accuracy_before_ci_high_pct when accuracy_n >= 100``: twenty held-out
answers give intervals too wide to show a gain). The file is read by :mod:`lorabench.yamlio` (no repeated
keys, bounded aliases, plain tags).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorabench import yamlio
from lorabench.data.tasks import EVAL_FRACTION, MAX_EVAL_EXAMPLES
from lorabench.errors import ThresholdError
from lorabench.metrics import CUDA_ONLY, METRICS, can_be_negative
from lorabench.models.zoo import ZOO
from lorabench.gates.compare import parse_tolerances
from lorabench.paths import read_text

TOP_LEVEL_KEYS = ("version", "profiles", "compare")
CHECKPOINTING_SELECTORS = {"checkpointing": True, "no-checkpointing": False}
EMBEDDED_SELECTOR = "embedded"  # a tiny zoo model on the generated task its bounds were measured on
EMBEDDED_TASKS = ("digit-reverse",)
DEVICE_SELECTORS = ("cpu", "cuda")
OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda a, b: a <= b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
}
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_CONFIG = r"[A-Za-z0-9][A-Za-z0-9_.-]*?"
_CONDITION = re.compile(rf"^\s*(?P<name>{_NAME})\s*(?P<op><=|>=|<|>)\s*(?P<number>{_NUMBER})\s*$")
_WHEN = " when "
CONDITION_FIELDS = ("steps",)  # configuration fields a condition may read besides the metrics
_RULE = re.compile(
    rf"^\s*(?P<metric>{_NAME})\s*(?P<op><=|>=|<|>)\s*"
    rf"(?:(?P<number>{_NUMBER})\s*$|(?:(?P<factor>{_NUMBER})\s*\*\s*)?(?P<ref_config>{_CONFIG})\.(?P<ref_metric>{_NAME})\s*$)"
)

# not evaluated: a figure the rule reads is absent; not evaluable: present, but too little data to decide
PASS, FAIL, NOT_EVALUATED, NOT_EVALUABLE = "pass", "fail", "not evaluated", "not evaluable"
SELF = "self"


def is_embedded_default(model: str, dataset: str) -> bool:
    """Whether a case runs the embedded default: a tiny zoo model on a generated data set, whose task-specific
    bounds (the ``embedded`` profile) were measured on exactly that pair."""
    return model in ZOO and dataset in EMBEDDED_TASKS


@dataclass(frozen=True)
class Condition:
    """``when NAME OP NUMBER``: where a rule can be decided."""

    name: str  # a metric, or a configuration field in CONDITION_FIELDS
    op: str
    number: float

    @property
    def text(self) -> str:
        return f"{self.name} {self.op} {_fmt(self.number)}"

    def what_would_meet_it(self) -> str:
        """How to give the rule enough data, in the user's terms."""
        if self.name == "steps":
            return f"--steps {_fmt(self.number)} or more gives it" if self.op in (">=", ">") else ""
        if self.name == "accuracy_n" and self.op in (">=", ">"):
            rows = math.ceil(self.number / EVAL_FRACTION)
            return (f"{_fmt(EVAL_FRACTION * 100)}% of a data set's rows are held out (at most {MAX_EVAL_EXAMPLES}): "
                    f"a data set of {rows} rows or more gives it")
        return ""


@dataclass(frozen=True)
class Gate:
    """One rule, with where it is written."""

    profile: str
    config: str  # a configuration id, or "*" for every configuration
    metric: str
    op: str
    text: str
    file: str
    line: int
    number: float | None = None
    factor: float = 1.0
    ref_config: str | None = None
    ref_metric: str | None = None
    when: Condition | None = None  # decided only where this holds, not evaluable elsewhere

    @property
    def relative(self) -> bool:
        return self.ref_config is not None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Profile:
    key: str
    device: str | None = None
    model: str | None = None
    isa: str | None = None  # absolute timings hold only on the CPU class they were calibrated on
    # activations decide much of a step's memory: some memory rules hold only with (or without) checkpointing
    checkpointing: bool | None = None
    # task-specific bounds measured on the embedded default (True), or rules for any model (None)
    embedded: bool | None = None

    def applies(self, device_type: str, model: str, isa: str | None = None, checkpointing: bool | None = None,
                embedded: bool = False) -> bool:
        return all(want is None or want == have
                   for want, have in ((self.device, device_type), (self.model, model), (self.isa, isa),
                                      (self.checkpointing, checkpointing), (self.embedded, embedded)))

    def can_coapply(self, other: Profile) -> bool:
        same_or_open = lambda a, b: a is None or b is None or a == b  # noqa: E731
        return (same_or_open(self.device, other.device) and same_or_open(self.model, other.model)
                and same_or_open(self.isa, other.isa) and same_or_open(self.checkpointing, other.checkpointing)
                and same_or_open(self.embedded, other.embedded))


@dataclass
class Thresholds:
    path: str
    gates: list[Gate] = field(default_factory=list)
    profiles: dict[str, Profile] = field(default_factory=dict)

    def gates_for(self, config_id: str, device_type: str, model: str, isa: str | None = None, *,
                  wildcard: bool = True, checkpointing: bool | None = None, dataset: str | None = None) -> list[Gate]:
        """The gates that apply; ``isa`` is the CPU's vector ISA (``None`` matches no ``isa=`` profile),
        ``checkpointing`` whether the case trained with gradient checkpointing (``None``, a case that does
        not train, matches neither ``checkpointing`` nor ``no-checkpointing``), ``dataset`` the case's data
        set (the ``embedded`` profile applies to a zoo model on an embedded data set only).

        ``wildcard=False`` leaves out the ``"*"`` rules, which are written for fine-tuning cases
        (an inference variant has no training loss).
        """
        configs = ("*", config_id) if wildcard else (config_id,)
        embedded = dataset is not None and is_embedded_default(model, dataset)
        return [
            g for g in self.gates
            if g.config in configs and self.profiles[g.profile].applies(device_type, model, isa, checkpointing, embedded)
        ]

    def skipped_profiles(self, applied: Iterable[str]) -> list[str]:
        """Profiles with rules that did not apply, in file order (for saying what a run on one's own model left out)."""
        applied = set(applied)
        return [key for key in self.profiles if key not in applied and any(g.profile == key for g in self.gates)]


@dataclass(frozen=True)
class GateOutcome:
    gate: Gate
    status: str
    message: str
    value: float | None = None
    bound: float | None = None
    reference: float | None = None  # the other configuration's value a relative bound is computed from

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.gate.text,
            "config": self.gate.config,
            "metric": self.gate.metric,
            "op": self.gate.op,
            "ref_config": self.gate.ref_config,
            "ref_metric": self.gate.ref_metric,
            "where": self.gate.where,
            "profile": self.gate.profile,
            "status": self.status,
            "value": self.value,
            "bound": self.bound,
            "reference": self.reference,
            "message": self.message,
        }


# ----- parsing ---------------------------------------------------------------
def load_thresholds(path: str | Path, known_configs: Iterable[str]) -> Thresholds:
    """Read and validate a thresholds file.

    Args:
        path: the YAML file.
        known_configs: configuration ids a rule may name (the run's and the default matrix's).

    Raises:
        ThresholdError: with the file, line, key and what is allowed.
    """

    path = Path(path)
    return parse_thresholds(read_text(path, "--thresholds", ThresholdError), str(path), set(known_configs))


def parse_thresholds(text: str, filename: str, known_configs: set[str]) -> Thresholds:
    try:
        root = yamlio.compose(text)
    except yamlio.YamlProblem as exc:
        raise ThresholdError(f"{exc.where(filename)}: {exc.problem}") from None
    if root is None:
        raise ThresholdError(f"{filename}: file is empty; expected keys {', '.join(TOP_LEVEL_KEYS)}")
    top = _mapping(root, filename, "the top level")
    unknown = [k for k in top if k not in TOP_LEVEL_KEYS]
    if unknown:
        key_node = top[unknown[0]][0]
        raise ThresholdError(
            f"{filename}:{key_node.start_mark.line + 1}: unknown key {unknown[0]!r}; allowed: {', '.join(TOP_LEVEL_KEYS)}"
        )
    result = Thresholds(path=filename)
    if "version" in top:
        version_node = top["version"][1]
        version = yamlio.construct(version_node)
        if type(version) is not int or version != 1:  # bool is an int to Python: 'version: true' is not 1
            raise ThresholdError(f"{filename}:{version_node.start_mark.line + 1}: version must be 1")
    if "compare" in top:
        # read by `python -m lorabench compare` (lorabench.commands.main); checked now, so a typo stops the bench, not CI later
        section = yamlio.construct(top["compare"][1]) or {}
        if not isinstance(section, dict):
            raise ThresholdError(f"{filename}:{top['compare'][1].start_mark.line + 1}: 'compare' must be a mapping")

        parse_tolerances(section, f"{filename}:{top['compare'][1].start_mark.line + 1}")
    if "profiles" not in top:
        raise ThresholdError(f"{filename}: missing key 'profiles'")
    for profile_key, (key_node, body) in _mapping(top["profiles"][1], filename, "'profiles'").items():
        line = key_node.start_mark.line + 1
        result.profiles[profile_key] = _parse_profile(profile_key, f"{filename}:{line}")
        for config_key, (cfg_node, rules) in _mapping(body, filename, f"profile {profile_key!r}").items():
            where = f"{filename}:{cfg_node.start_mark.line + 1}"
            if config_key != "*" and config_key not in known_configs:
                raise ThresholdError(
                    f"{where}: unknown configuration {config_key!r} in profile {profile_key!r}; "
                    f"use '*' or one of: {', '.join(sorted(known_configs))}"
                )
            if not isinstance(rules, yaml.SequenceNode):
                raise ThresholdError(f"{where}: rules for {config_key!r} must be a list of strings like 'loss_drop >= 0.1'")
            for rule in rules.value:
                result.gates.append(_parse_rule(rule, profile_key, config_key, filename, known_configs))
    _check_device_metrics(result)
    _check_contradictions(result)
    return result


def _check_device_metrics(thresholds: Thresholds) -> None:
    """A rule of a CPU-only profile that reads a CUDA-only figure could never be decided.

    Raises:
        ThresholdError: naming the rule, its line and the figure.
    """
    for gate in thresholds.gates:
        if thresholds.profiles[gate.profile].device != "cpu":
            continue
        names = [gate.metric, gate.ref_metric, gate.when.name if gate.when else None]
        cuda_only = next((n for n in names if n in CUDA_ONLY), None)
        if cuda_only:
            raise ThresholdError(f"{gate.where}: rule {gate.text!r} in profile {gate.profile!r} reads {cuda_only}, "
                                 "which only a CUDA device records, so a CPU case could never decide it; move it to "
                                 "a cuda profile, or gate a figure the CPU has (tensor_peak_mib, peak_rss_delta_mib)")


def _mapping(node, filename: str, what: str) -> dict[str, tuple[Any, Any]]:
    if not isinstance(node, yaml.MappingNode):
        raise ThresholdError(f"{filename}:{node.start_mark.line + 1}: {what} must be a mapping")
    out: dict[str, tuple[Any, Any]] = {}
    for key_node, value_node in node.value:
        key = key_node.value
        if key in out:
            raise ThresholdError(f"{filename}:{key_node.start_mark.line + 1}: key {key!r} repeats in {what}")
        out[key] = (key_node, value_node)
    return out


def _parse_profile(key: str, where: str) -> Profile:
    if key == "default":
        return Profile(key)
    device = model = isa = checkpointing = embedded = None
    for part in (p.strip() for p in key.split("&")):
        if part == EMBEDDED_SELECTOR:
            embedded = True
        elif part in DEVICE_SELECTORS:
            if device:
                raise ThresholdError(f"{where}: profile {key!r} names two devices")
            device = part
        elif part.startswith("model=") and len(part) > len("model="):
            if model:
                raise ThresholdError(f"{where}: profile {key!r} names two models")
            model = part[len("model="):]
        elif part.startswith("isa=") and len(part) > len("isa="):
            if isa:
                raise ThresholdError(f"{where}: profile {key!r} names two instruction sets")
            isa = part[len("isa="):]
        elif part in CHECKPOINTING_SELECTORS:
            if checkpointing is not None:
                raise ThresholdError(f"{where}: profile {key!r} names checkpointing twice")
            checkpointing = CHECKPOINTING_SELECTORS[part]
        else:
            raise ThresholdError(
                f"{where}: profile {key!r}: unknown selector {part!r}; use 'default', "
                f"{', '.join(map(repr, DEVICE_SELECTORS))}, 'model=NAME', 'isa=NAME' (e.g. AVX2, AVX512), "
                f"{', '.join(map(repr, CHECKPOINTING_SELECTORS))}, {EMBEDDED_SELECTOR!r}, joined with '&'"
            )
    return Profile(key, device, model, isa, checkpointing, embedded)


def _unknown_metric(name: str, where: str) -> ThresholdError:
    close = difflib.get_close_matches(name, METRICS, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ThresholdError(f"{where}: unknown metric {name!r}{hint}; known metrics: {', '.join(sorted(METRICS))}")


def _parse_rule(node, profile: str, config: str, filename: str, known_configs: set[str]) -> Gate:
    line = node.start_mark.line + 1
    where = f"{filename}:{line}"
    if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:str":
        raise ThresholdError(f"{where}: a rule must be a string like 'loss_drop >= 0.1', got {yamlio.node_kind(node)}")
    text = node.value
    rule_text, when_text = text.split(_WHEN, 1) if _WHEN in text else (text, None)
    when = None if when_text is None else _parse_condition(when_text, text, where)
    m = _RULE.match(rule_text)
    if not m:
        raise ThresholdError(
            f"{where}: cannot read rule {text!r}; write 'METRIC OP NUMBER' or 'METRIC OP [FACTOR *] CONFIG.METRIC' "
            f"with OP one of {' '.join(OPS)}"
        )
    metric = m["metric"]
    if metric not in METRICS:
        raise _unknown_metric(metric, where)
    common = dict(profile=profile, config=config, metric=metric, op=m["op"], text=text, file=filename, line=line,
                  when=when)
    if m["number"] is not None:
        number = float(m["number"])
        if not math.isfinite(number):
            raise ThresholdError(f"{where}: rule {text!r}: the bound {m['number']} is not a finite number")
        return Gate(number=number, **common)
    ref_config, ref_metric = m["ref_config"], m["ref_metric"]
    if ref_config != SELF and ref_config not in known_configs:
        raise ThresholdError(
            f"{where}: rule {text!r} names unknown configuration {ref_config!r}; known: {', '.join(sorted(known_configs))}"
        )
    if ref_metric not in METRICS:
        raise _unknown_metric(ref_metric, where)
    factor = float(m["factor"]) if m["factor"] else 1.0
    if not math.isfinite(factor) or factor <= 0:
        raise ThresholdError(f"{where}: rule {text!r}: the factor must be positive and finite, got {m['factor']}")
    unit, ref_unit = METRICS[metric].unit, METRICS[ref_metric].unit
    if unit != ref_unit:
        raise ThresholdError(
            f"{where}: rule {text!r} compares {metric} ({unit}) with {ref_metric} ({ref_unit}); both sides "
            f"must share a unit (a plain number on the right is read in {unit})"
        )
    if ref_config in (config, SELF) and ref_metric == metric:
        raise ThresholdError(f"{where}: rule {text!r} compares {config}.{metric} with itself")
    return Gate(factor=factor, ref_config=ref_config, ref_metric=ref_metric, **common)


def _parse_condition(text: str, rule: str, where: str) -> Condition:
    m = _CONDITION.match(text)
    if not m:
        raise ThresholdError(f"{where}: rule {rule!r}: cannot read the condition {text.strip()!r}; write "
                             f"'when NAME OP NUMBER' (e.g. 'when accuracy_n >= 100', 'when steps >= 20')")
    name = m["name"]
    if name not in METRICS and name not in CONDITION_FIELDS:
        close = difflib.get_close_matches(name, [*CONDITION_FIELDS, *METRICS], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ThresholdError(f"{where}: rule {rule!r}: the condition names {name!r}{hint}; use a metric or "
                             f"{', '.join(CONDITION_FIELDS)}")
    number = float(m["number"])
    if not math.isfinite(number):
        raise ThresholdError(f"{where}: rule {rule!r}: the condition's bound {m['number']} is not a finite number")
    return Condition(name, m["op"], number)


def _check_contradictions(t: Thresholds) -> None:
    """Pairs of rules on one metric that no value can meet together are an error in the file.

    Absolute bounds are compared as numbers. Relative bounds are compared when both rules read
    the same reference (``X <= 0.5 * ref`` against ``X >= 0.8 * ref``), for references that cannot
    be negative (then no positive reference value leaves room for X).
    """
    for i, a in enumerate(t.gates):
        for b in t.gates[i + 1:]:
            if a.metric != b.metric or not (a.config == b.config or "*" in (a.config, b.config)):
                continue
            if not t.profiles[a.profile].can_coapply(t.profiles[b.profile]):
                continue
            if a.relative != b.relative or (a.relative and (a.ref_config, a.ref_metric) != (b.ref_config, b.ref_metric)):
                continue
            if a.relative and can_be_negative(a.ref_metric):
                continue
            lower, upper = (a, b) if a.op in (">=", ">") else (b, a)
            if lower.op not in (">=", ">") or upper.op not in ("<=", "<"):
                continue
            strict = lower.op == ">" or upper.op == "<"
            low, high = (lower.factor, upper.factor) if a.relative else (lower.number, upper.number)
            if low > high or (strict and low == high):
                reference = f" for any positive {a.ref_config}.{a.ref_metric}" if a.relative else ""
                raise ThresholdError(
                    f"{upper.where}: {upper.text!r} contradicts {lower.text!r} at {lower.where}: "
                    f"no value of {a.metric} can meet both{reference}"
                )


# ----- evaluation --------------------------------------------------------------
def _fmt(x: float) -> str:
    return f"{x:.6g}"


def evaluate_gate(gate: Gate, config_id: str, metrics: dict[str, float], absent: dict[str, str],
             reference: Callable[[str], tuple[dict[str, float], dict[str, str]] | None],
             config: dict[str, Any] | None = None) -> GateOutcome:
    """Check one gate against a case's metrics.

    Args:
        reference: returns (metrics, absent) of another configuration of the same run, model and
            data set, or ``None`` when that configuration has not run.
        config: the case's resolved configuration, for a ``when steps ...`` condition.
    """
    head = f"{config_id}: {gate.metric}"
    if gate.metric not in metrics:
        reason = absent.get(gate.metric, "not recorded")
        return GateOutcome(gate, NOT_EVALUATED, f"{head} is absent ({reason}) [{gate.where}]")
    value = metrics[gate.metric]
    if gate.when is not None:
        undecided = _undecidable(gate, head, metrics, absent, config or {})
        if undecided is not None:
            return undecided
    if gate.relative:
        ref = (metrics, absent) if gate.ref_config == SELF else reference(gate.ref_config)
        if ref is None:
            return GateOutcome(gate, NOT_EVALUATED, f"{head}: {gate.ref_config} did not run before it in this session [{gate.where}]", value)
        ref_metrics, ref_absent = ref
        if gate.ref_metric not in ref_metrics:
            reason = ref_absent.get(gate.ref_metric, "not recorded")
            return GateOutcome(gate, NOT_EVALUATED, f"{head}: {gate.ref_config}.{gate.ref_metric} is absent ({reason}) [{gate.where}]", value)
        ref_value = ref_metrics[gate.ref_metric]
        bound = gate.factor * ref_value
        bound_text = f"{_fmt(bound)} (= {_fmt(gate.factor)} x {gate.ref_config}.{gate.ref_metric} {_fmt(ref_value)})"
    else:
        bound, ref_value = gate.number, None
        bound_text = _fmt(bound)
    ok = OPS[gate.op](value, bound)
    verdict = "meets" if ok else "violates"
    message = f"{head} = {_fmt(value)} {verdict} '{gate.text}': bound {gate.op} {bound_text} [{gate.where}, profile {gate.profile}]"
    return GateOutcome(gate, PASS if ok else FAIL, message, value, bound, ref_value)


def _undecidable(gate: Gate, head: str, metrics: dict[str, float], absent: dict[str, str],
                 config: dict[str, Any]) -> GateOutcome | None:
    """The outcome of a gate whose ``when`` condition does not hold (not evaluable, with what would make it so),
    or whose condition cannot be read (not evaluated); ``None`` when the condition holds."""
    when = gate.when
    have = config.get(when.name) if when.name in CONDITION_FIELDS else metrics.get(when.name)
    if not isinstance(have, (int, float)) or isinstance(have, bool):
        reason = absent.get(when.name, "not recorded")
        return GateOutcome(gate, NOT_EVALUATED, f"{head}: the condition's {when.name} is absent ({reason}) [{gate.where}]")
    if OPS[when.op](have, when.number):
        return None
    what = "training steps" if when.name == "steps" else METRICS[when.name].help
    remedy = when.what_would_meet_it()
    message = (f"{head}: not evaluable: {when.name} = {_fmt(have)} ({what}); the rule is decided only where "
               f"{when.text}" + (f"; {remedy}" if remedy else "") + f" [{gate.where}, profile {gate.profile}]")
    return GateOutcome(gate, NOT_EVALUABLE, message, metrics[gate.metric])
