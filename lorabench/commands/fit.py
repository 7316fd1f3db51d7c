"""``python -m lorabench fit``: which configuration fits which card, predicted without weights or a GPU.

For every model and configuration, :class:`lorabench.estimate.Predictor` gives the predicted
figures (tensor bytes; on CUDA also the allocator's peak allocated and reserved and the device
total, each named with the counter it compares with) and the tensor peak's parts at the asked
batch size and length. Without ``--memory`` that is the answer; each budget adds a yes or no
against the device total (tensor bytes on the CPU), and the largest batch size (at the asked
length) and length (at the asked batch size) under it.
Those two come from the parts of each phase's highest point (forward, backward, optimizer
step): parameters, gradients, optimizer state and the runtime terms stay fixed, activations
and temporaries scale with the batch and, with sdpa or flash attention, with the length,
except the optimizer step's temporaries (its scratch is the size of the gradients). Each
phase gives a line, and a size fits when every line stays under the budget: which phase
peaks can change with the size (with gradient checkpointing, the optimizer step at a small
batch, the backward pass at a large one). Eager attention holds a length x length matrix
per head, so for it a second prediction at half the length fits the quadratic term.
Where the backward pass peaks after some gradients exist, the place of its peak moves
with the size (more activations move it towards the start of the pass), so the lines are
only a first guess there (and on CUDA the allocator's segments move in steps), and
predictions around it settle the largest size exactly.

Output: a table on the terminal, ``--json`` with one record per case, and a stacked bar
chart of the parts against the budget lines (PNG and SVG) in ``--out``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorabench.meters.budget import parse_size
from lorabench.config import BenchConfig, TrainDefaults
from lorabench.errors import ConfigError
from lorabench.estimate import FIGURE_COUNTERS, Prediction
from lorabench.meters.footprint import MIB
from lorabench.report.tables import render_table, wrap
from lorabench.estimate import Predictor
from lorabench.estimate import hf_config
from lorabench.matrix import short_name
from lorabench.models.loading import train_defaults
from lorabench.report.plots import _pyplot, _save

SCALED = ("activations", "temporaries")  # tensor parts that grow with the batch and the length; the rest is fixed
ALLOCATOR_SCALED = ("allocator_rounding", "allocator_cached")  # the caching allocator's overhead: grows with them too
RUNTIME_FIXED = ("cublas_workspace", "cuda_context")
OPTIMIZER_PHASE = "optimizer"  # its temporaries are the optimizer's scratch: fixed, not scaled
SHOWN = ("params", "grads", "optimizer", "activations", "temporaries")  # the rest is summed as "runtime"/"other"
GIB = 1024.0


@dataclass(frozen=True)
class Budget:
    """A memory size as the user wrote it (the label) and in MiB."""

    label: str
    mib: float

    @classmethod
    def parse(cls, text: str) -> Budget:
        return cls(text.strip(), parse_size(text, option="--memory") / MIB)


@dataclass
class FitCase:
    """One model x configuration: the prediction and what fits each budget."""

    model: str
    config: BenchConfig
    prediction: Prediction
    fits: dict[str, bool] = field(default_factory=dict)
    max_batch_size: dict[str, int | None] = field(default_factory=dict)
    max_seq_len: dict[str, int | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The issue's record (config, gradient_checkpointing, batch_size, seq_len, predicted_peak_mib,
        components_mib, fits) plus the model, the target, the largest sizes per budget and every predicted
        figure with the counter it compares with (``predicted_peak_mib`` is the one budgets are checked against,
        named by ``budget_figure``; ``components_mib`` sums to it)."""
        p = self.prediction
        return {
            "config": self.config.id,
            "gradient_checkpointing": self.config.gradient_checkpointing,
            "batch_size": p.batch_size,
            "seq_len": p.seq_len,
            "predicted_peak_mib": p.peak_mib,
            "components_mib": p.components_mib,
            "fits": dict(self.fits),
            "model": self.model,
            "target": p.target,
            "max_batch_size": dict(self.max_batch_size),
            "max_seq_len": dict(self.max_seq_len),
            "budget_figure": p.budget_figure,
            "predicted": {f.name: {"mib": f.mib, "compare_with": f.counter, "meaning": f.meaning}
                          for f in p.figures()},
            "assumed": {t.name: t.source for t in p.runtime},
        }


def default_shape(spec: str) -> TrainDefaults:
    """The batch size and length a model trains with when the command leaves them open."""

    return train_defaults(spec)


def fit_case(model: str, hf_config, config: BenchConfig, budgets: list[Budget], *, batch_size: int, seq_len: int,
             target: str) -> FitCase:
    """Predict one case and judge it against every budget (the device total on CUDA, tensor bytes on the CPU)."""

    predictor = Predictor(hf_config, config, target=target, extrapolate_layers=True)
    peaks: dict[tuple[int, int], float] = {}

    def peak_at(batch: int, length: int) -> float:
        if (batch, length) not in peaks:
            peaks[batch, length] = predictor.predict(batch, length).peak_mib
        return peaks[batch, length]

    prediction = predictor.predict(batch_size, seq_len)
    peaks[batch_size, seq_len] = prediction.peak_mib
    case = FitCase(model, config, prediction)
    if not budgets:
        return case
    lines = _phase_lines(prediction)
    if prediction.attention == "eager" and seq_len >= 2:
        half = _phase_lines(predictor.predict(batch_size, seq_len // 2))
        lengths = {p: (fixed, *_quadratic(seq_len, scaled, seq_len // 2, half[p][1]))
                   for p, (fixed, scaled) in lines.items() if p in half}
    else:
        lengths = {p: (fixed, scaled / seq_len, 0.0) for p, (fixed, scaled) in lines.items()}
    limit = getattr(hf_config, "max_position_embeddings", None)
    # the peak's place moves within the step with the size, or the allocator's segments do not grow in
    # proportion: the lines are a first guess, predictions around it settle the largest size
    settle = prediction.phases.get("backward", {}).get("grads", 0) > 0 or prediction.allocator is not None
    for budget in budgets:
        case.fits[budget.label] = prediction.peak_mib <= budget.mib
        batch = min(_largest_size(budget.mib - fixed, scaled / batch_size, 0.0) for fixed, scaled in lines.values())
        length = min(_largest_size(budget.mib - fixed, a, c) for fixed, a, c in lengths.values())
        if limit:
            length = min(length, limit)
        if settle:
            batch = _settle(lambda b: peak_at(b, seq_len), budget.mib, batch,
                            known={b: p for (b, t), p in peaks.items() if t == seq_len})
            length = _settle(lambda t: peak_at(batch_size, t), budget.mib, length, limit,
                             known={t: p for (b, t), p in peaks.items() if b == batch_size})
        # nothing of the step grows with it (not seen in a real step): no largest size to give
        case.max_batch_size[budget.label] = None if math.isinf(batch) else batch
        case.max_seq_len[budget.label] = None if math.isinf(length) else length
    return case


def _settle(peak, budget: float, guess: int | float, limit: int | None = None,
            known: dict[int, float] | None = None) -> int | float:
    """The largest size ``n >= 1`` with ``peak(n) <= budget`` (0 when even 1 does not fit), searched from
    ``guess``; ``peak`` must grow with ``n``; ``known`` holds sizes already predicted (the asked one).

    Each probe after the first is a secant step through the probes nearest the budget on either side
    (the peak is nearly a line in the size), and a halving of the bracket where a secant step did not
    halve it: a few predictions from any guess, not a walk from it.
    """
    if math.isinf(guess) or guess < 1:
        return guess
    cap = limit or math.inf
    seen: dict[int, float] = {}
    low, high = 0, None  # the largest size known to fit (0: none yet), the smallest known not to

    def record(size: int, value: float) -> None:
        nonlocal low, high
        seen[size] = value
        if value <= budget:
            low = max(low, size)
        else:
            high = size if high is None else min(high, size)

    def settled() -> bool:
        return (high is not None and high - low <= 1) or (high is None and low >= cap)

    for size, value in (known or {}).items():
        if size <= cap:
            record(size, value)
    n, width = int(min(guess, cap)), math.inf
    while not settled():
        if n not in seen:
            record(n, peak(n))
            if settled():
                break
        n, width = _next_probe(seen, budget, low, high, cap, width)
    return low


def _next_probe(seen: dict[int, float], budget: float, low: int, high: int | None, cap: float,
                width: float) -> tuple[int, float]:
    """The next size to predict, and the bracket's width now (for the halving rule)."""
    def secant(a: int, b: int) -> float | None:
        slope = (seen[b] - seen[a]) / (b - a)
        return a + (budget - seen[a]) / slope if slope > 0 else None

    if high is None:  # everything so far fits: extend the line through the two largest probes
        below = sorted(seen)[-2:]
        x = secant(*below) if len(below) == 2 else None
        n = max(low + 1, math.floor(x) if x is not None else 2 * low)
        return int(min(n, cap)), width
    if low == 0:  # nothing fits yet: extend the line through the two smallest probes
        above = sorted(seen)[:2]
        x = secant(*above) if len(above) == 2 else None
        n = math.floor(x) if x is not None else high // 2
        return max(1, min(n, high - 1)), width
    now = high - low
    x = secant(low, high)
    if x is None or now > width / 2:  # the last step did not halve the bracket
        return (low + high) // 2, now
    return max(low + 1, min(math.floor(x), high - 1)), now


def _phase_lines(prediction: Prediction) -> dict[str, tuple[float, float]]:
    """(fixed, scaled) MiB of each phase's highest point in the budget's figure: what the batch size and
    length do not move, and what grows with them. On CUDA the workspaces and the context join every phase
    as fixed, and the allocator's rounding and cached blocks as scaled."""
    parts = prediction.components_mib
    overhead = {k: parts[k] for k in RUNTIME_FIXED if k in parts}
    allocator = sum(parts.get(k, 0.0) for k in ALLOCATOR_SCALED)
    lines = {}
    for phase, tensor in prediction.phases.items():
        mib = {k: v / MIB for k, v in tensor.items()}
        scaled_keys = [k for k in SCALED if not (phase == OPTIMIZER_PHASE and k == "temporaries")]
        scaled = sum(mib.get(k, 0.0) for k in scaled_keys) + allocator
        lines[phase] = (sum(mib.values()) + sum(overhead.values()) + allocator - scaled, scaled)
    return lines


def _quadratic(t1: int, y1: float, t2: int, y2: float) -> tuple[float, float]:
    """(a, c) of y = a t + c t^2 through two points."""
    c = (y1 / t1 - y2 / t2) / (t1 - t2)
    return y1 / t1 - c * t1, max(0.0, c)


def _largest_size(room: float, a: float, c: float) -> int | float:
    """The largest whole n with a n + c n^2 <= room (``inf`` when nothing grows)."""
    if room < 0:
        return 0
    if a <= 0 and c <= 0:
        return math.inf
    if c == 0:
        return math.floor(room / a)
    return math.floor((-a + math.sqrt(a * a + 4 * c * room)) / (2 * c))


def check_shape(batch_size: int | None, seq_len: int | None) -> None:
    """Refuse a batch size or length below 1.

    Raises:
        ConfigError: naming the option and its value.
    """
    for option, value in (("--batch-size", batch_size), ("--seq-len", seq_len)):
        if value is not None and value < 1:
            raise ConfigError(f"{option} {value}: must be at least 1")


def check_outputs(json_path: Path | None, out_dir: Path) -> None:
    """Refuse output paths that cannot be written, before any prediction runs.

    Raises:
        ConfigError: ``--json`` is a directory, ``--out`` is a file, or a folder above either is a file.
    """
    if json_path is not None and json_path.is_dir():
        raise ConfigError(f"--json {json_path}: is a directory; give a file path (e.g. {json_path / 'fit.json'})")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir}: is a file; give a folder for the chart")
    for option, path in (("--json", json_path), ("--out", out_dir)):
        for parent in (path.parents if path is not None else ()):
            if parent.exists() and not parent.is_dir():
                raise ConfigError(f"{option} {path}: {parent} is a file, so nothing can be written under it")


def check_case_shape(spec: str, hf_config, batch_size: int, seq_len: int) -> None:
    """Refuse a length past the model's positions (refused, not warned: a model trained to them is not
    defined beyond, and its tensors at such lengths can pass what torch can size).

    Raises:
        ConfigError: naming the length, the model's limit and where it comes from.
    """
    limit = getattr(hf_config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise ConfigError(f"--seq-len {seq_len}: past {spec}'s max_position_embeddings of {limit} (its config); "
                          f"give at most {limit}, or a config.json with rope scaling and a larger "
                          "max_position_embeddings")
    widest = max(getattr(hf_config, name, 0) or 0 for name in ("vocab_size", "intermediate_size", "hidden_size"))
    if batch_size * seq_len * widest * 8 >= 2**63:  # a float64-sized logits or MLP tensor: past int64 bytes
        raise ConfigError(f"--batch-size {batch_size} x --seq-len {seq_len}: a {widest}-wide tensor of that many "
                          "rows is past what torch can size (2**63 bytes); give smaller sizes")


def run_fit(models: list[str], budgets: list[Budget], *, batch_size: int | None, seq_len: int | None,
            configs: list[BenchConfig], target: str, trust_remote_code: bool = False) -> list[FitCase]:
    """Every model x configuration; every model and shape is checked before the first prediction.

    Raises:
        ModelError: a model spec names nothing known, or its config.json has a bad shape field.
        ConfigError: a bad target, or a length past a model's positions.
    """

    planned = []
    for spec in models:
        hf = hf_config(spec, trust_remote_code=trust_remote_code)
        shape = default_shape(spec)
        for config in configs:
            b = batch_size or config.batch_size or shape.batch_size
            t = seq_len or config.seq_len or shape.seq_len
            check_case_shape(spec, hf, b, t)
            planned.append((spec, hf, config, b, t))
    return [fit_case(spec, hf, config, budgets, batch_size=b, seq_len=t, target=target)
            for spec, hf, config, b, t in planned]


def _size(n: int | None) -> str:
    return "-" if n is None else str(n)


def _gib(mib: float) -> str:
    return f"{mib / GIB:.2f}"


def _unit(cases: list[FitCase]) -> tuple[str, Any]:
    """GiB for models that take a GiB or more, else MiB: a tiny model's parts would all read 0.00 GiB."""
    if max(c.prediction.peak_mib for c in cases) >= GIB:
        return "GiB", _gib
    return "MiB", lambda mib: f"{mib:.1f}"


def render(cases: list[FitCase], budgets: list[Budget], *, width: int | None = None) -> list[str]:
    """The tables, one block per model and shape, folded to ``width`` columns (the terminal's when None):
    the predicted figures with the fits columns, then the tensor peak's parts."""
    lines: list[str] = []
    groups: dict[tuple, list[FitCase]] = {}
    for case in cases:
        p = case.prediction
        groups.setdefault((case.model, p.batch_size, p.seq_len, p.target), []).append(case)
    for (model, b, t, target), group in groups.items():
        first = group[0].prediction
        how = ("extrapolated from " + " and ".join(map(str, first.layers_run)) + " layers"
               if len(first.layers_run) == 2 else "all layers")
        unit, show = _unit(group)
        lines += wrap(f"{model}: batch {b} x {t} tokens, {target} kernels, {first.attention} attention ({how}); "
                      f"{unit}" + (f"; fits: max batch at {t} tokens / max length at batch {b}" if budgets else ""),
                      width=width)
        names = [f.name for f in first.figures()]
        head = ["config", "ckpt", *names] + [f"fits {x.label}" for x in budgets]
        rows = []
        for case in group:
            cells = [case.config.id, "yes" if case.config.gradient_checkpointing else "no",
                     *(show(f.mib) for f in case.prediction.figures())]
            for x in budgets:
                verdict = "yes" if case.fits[x.label] else "no"
                cells.append(f"{verdict} ({_size(case.max_batch_size[x.label])} / {_size(case.max_seq_len[x.label])})")
            rows.append(cells)
        lines += render_table(head, rows, width=width, right_align=range(2, len(head)))
        parts = [k for k in (*SHOWN, "buffers") if any(c.prediction.tensor.components.get(k) for c in group)]
        lines += wrap(f"the tensor peak's parts, {unit}:", width=width)
        lines += render_table(["config", *parts],
                              [[c.config.id, *(show(c.prediction.components_mib[k]) for k in parts)] for c in group],
                              width=width, right_align=range(1, len(parts) + 1))
        for figure in first.figures():
            counter = FIGURE_COUNTERS[figure.name]
            lines += wrap(f"{figure.name}: compare with {counter[0]} ({counter[1]})"
                          + ("; budgets are checked against it" if figure.name == first.budget_figure else ""),
                          width=width, indent="  ", subsequent="    ")
        for term in first.runtime:
            lines += wrap(f"{term.name} {term.mib:.0f} MiB: {term.source}", width=width, indent="  ",
                          subsequent="    ")
        lines.append("")
    return lines


def write_json(cases: list[FitCase], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cases": [c.to_json() for c in cases]}, indent=2) + "\n")


def plot(cases: list[FitCase], budgets: list[Budget], out: Path) -> list[Path]:
    """A stacked bar per case (its parts, GiB) with a line per budget; PNG and SVG."""

    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    names = sorted({k for c in cases for k in c.prediction.components_mib})
    order = [k for k in (*SHOWN, "buffers", *ALLOCATOR_SCALED, *RUNTIME_FIXED) if k in names]
    labels = [c.config.id if len({x.model for x in cases}) == 1 else f"{short_name(c.model)} {c.config.id}"
              for c in cases]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(cases) + 2))
    left = [0.0] * len(cases)
    for part in order:
        widths = [c.prediction.components_mib.get(part, 0.0) / GIB for c in cases]
        ax.barh(labels, widths, left=left, label=part)
        left = [a + b for a, b in zip(left, widths)]
    for budget in budgets:
        ax.axvline(budget.mib / GIB, color="black", linestyle="--", linewidth=1)
        ax.text(budget.mib / GIB, len(cases) - 0.4, f" {budget.label}", fontsize=8, va="bottom")
    first = cases[0].prediction
    figure = "device total (reserved + CUDA context)" if first.budget_figure == "device" else "tensor bytes"
    ax.set(xlabel=f"predicted {figure}, GiB (lorabench.estimate), by part",
           title=f"{', '.join(sorted({c.model for c in cases}))}: batch {first.batch_size} x {first.seq_len}, "
                 f"{first.target}")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    stem = "fit-" + "-".join(short_name(m) for m in dict.fromkeys(c.model for c in cases))
    return _save(fig, out / stem.replace(".", "_"))  # no dot left for with_suffix to take for an extension
