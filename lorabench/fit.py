"""``python -m lorabench fit``: which configuration fits which card, predicted without weights or a GPU.

For every model and configuration, :func:`lorabench.estimate.predict` gives the peak and
its parts at the asked batch size and length; each budget gets a yes or no, and the
largest batch size (at the asked length) and length (at the asked batch size) under it.
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
only a first guess there, and predictions around it settle the largest size exactly.

Output: a table on the terminal, ``--json`` with one record per case, and a stacked bar
chart of the parts against the budget lines (PNG and SVG) in ``--out``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorabench.budget import parse_size
from lorabench.config import BenchConfig, TrainDefaults
from lorabench.estimate import Prediction
from lorabench.footprint import MIB

SCALED = ("activations", "temporaries", "allocator_rounding")  # grow with the batch and the length; the rest is fixed
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
        components_mib, fits) plus the model, the target and the largest sizes per budget."""
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
        }


def default_shape(spec: str) -> TrainDefaults:
    """The batch size and length a model trains with when the command leaves them open."""
    from lorabench.models import CHECKPOINT_TRAIN_DEFAULTS
    from lorabench.zoo import ZOO

    return ZOO[spec].defaults if spec in ZOO else CHECKPOINT_TRAIN_DEFAULTS


def fit_case(model: str, hf_config, config: BenchConfig, budgets: list[Budget], *, batch_size: int, seq_len: int,
             target: str) -> FitCase:
    """Predict one case and judge it against every budget."""
    from lorabench.estimate import predict

    prediction = predict(hf_config, config, batch_size=batch_size, seq_len=seq_len, target=target,
                         extrapolate_layers=True)
    case = FitCase(model, config, prediction)
    lines = _phase_lines(prediction)
    if prediction.attention == "eager" and seq_len >= 2:
        half = _phase_lines(predict(hf_config, config, batch_size=batch_size, seq_len=seq_len // 2, target=target,
                                    extrapolate_layers=True))
        lengths = {p: (fixed, *_quadratic(seq_len, scaled, seq_len // 2, half[p][1]))
                   for p, (fixed, scaled) in lines.items() if p in half}
    else:
        lengths = {p: (fixed, scaled / seq_len, 0.0) for p, (fixed, scaled) in lines.items()}
    limit = getattr(hf_config, "max_position_embeddings", None)
    moves = prediction.phases.get("backward", {}).get("grads", 0) > 0
    peaks: dict[tuple[int, int], float] = {(batch_size, seq_len): prediction.peak_mib}

    def peak_at(batch: int, length: int) -> float:
        if (batch, length) not in peaks:
            peaks[batch, length] = predict(hf_config, config, batch_size=batch, seq_len=length, target=target,
                                           extrapolate_layers=True).peak_mib
        return peaks[batch, length]

    for budget in budgets:
        case.fits[budget.label] = prediction.peak_mib <= budget.mib
        batch = min(_largest_size(budget.mib - fixed, scaled / batch_size, 0.0) for fixed, scaled in lines.values())
        length = min(_largest_size(budget.mib - fixed, a, c) for fixed, a, c in lengths.values())
        if limit:
            length = min(length, limit)
        if moves:
            batch = _settle(lambda b: peak_at(b, seq_len) <= budget.mib, batch)
            length = _settle(lambda t: peak_at(batch_size, t) <= budget.mib, length, limit)
        # nothing of the step grows with it (not seen in a real step): no largest size to give
        case.max_batch_size[budget.label] = None if math.isinf(batch) else batch
        case.max_seq_len[budget.label] = None if math.isinf(length) else length
    return case


def _settle(fits, guess: int | float, limit: int | None = None) -> int | float:
    """The largest size ``n >= 1`` with ``fits(n)``, searched from ``guess`` (0 when even 1 does not fit);
    ``fits`` must hold up to some size and not beyond it."""
    if math.isinf(guess) or guess < 1:
        return guess
    cap = limit or math.inf
    n = min(guess, cap)
    step = 1
    if fits(n):  # widen upwards until a size does not fit, then halve the gap
        low, high = n, None
        while high is None and low < cap:
            probe = min(low + step, cap)
            if fits(probe):
                low, step = probe, 2 * step
            else:
                high = probe
        if high is None:
            return low
    else:  # widen downwards until a size fits
        high = n
        low = None
        while low is None:
            probe = max(high - step, 0)
            if probe == 0:
                return 0 if not fits(1) else _bisect(fits, 1, high)
            if fits(probe):
                low = probe
            else:
                high, step = probe, 2 * step
    return _bisect(fits, low, high)


def _bisect(fits, low: int, high: int) -> int:
    """The largest size in [low, high) that fits, given that ``low`` fits and ``high`` does not."""
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def _phase_lines(prediction: Prediction) -> dict[str, tuple[float, float]]:
    """(fixed, scaled) MiB of each phase's highest point: what the batch size and length do not move, and
    what grows with them. The runtime terms join every phase (allocator rounding as scaled)."""
    runtime = {t.name: t.mib for t in prediction.runtime}
    lines = {}
    for phase, parts in prediction.phases.items():
        mib = {**{k: v / MIB for k, v in parts.items()}, **runtime}
        scaled_keys = [k for k in SCALED if not (phase == OPTIMIZER_PHASE and k == "temporaries")]
        scaled = sum(mib.get(k, 0.0) for k in scaled_keys)
        lines[phase] = (sum(mib.values()) - scaled, scaled)
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


def run_fit(models: list[str], budgets: list[Budget], *, batch_size: int | None, seq_len: int | None,
            configs: list[BenchConfig], target: str, trust_remote_code: bool = False) -> list[FitCase]:
    """Every model x configuration.

    Raises:
        ModelError: a model spec names nothing known.
        ConfigError: a bad target.
    """
    from lorabench.estimate import hf_config

    cases = []
    for spec in models:
        hf = hf_config(spec, trust_remote_code=trust_remote_code)
        shape = default_shape(spec)
        for config in configs:
            b = batch_size or config.batch_size or shape.batch_size
            t = seq_len or config.seq_len or shape.seq_len
            cases.append(fit_case(spec, hf, config, budgets, batch_size=b, seq_len=t, target=target))
    return cases


def _size(n: int | None) -> str:
    return "-" if n is None else str(n)


def _gib(mib: float) -> str:
    return f"{mib / GIB:.2f}"


def render(cases: list[FitCase], budgets: list[Budget]) -> list[str]:
    """The table, one block per model and shape."""
    lines: list[str] = []
    groups: dict[tuple, list[FitCase]] = {}
    for case in cases:
        p = case.prediction
        groups.setdefault((case.model, p.batch_size, p.seq_len, p.target), []).append(case)
    for (model, b, t, target), group in groups.items():
        layers = group[0].prediction.layers_run
        how = "extrapolated from " + " and ".join(map(str, layers)) + " layers" if len(layers) == 2 else "all layers"
        lines.append(f"{model}: batch {b} x {t} tokens, {target} kernels, {group[0].prediction.attention} attention "
                     f"({how}); GiB; max batch at {t} tokens / max length at batch {b}")
        head = ["config", "ckpt", "peak", *SHOWN, "other"] + [f"fits {x.label}" for x in budgets]
        rows = [head]
        for case in group:
            parts = case.prediction.components_mib
            other = sum(v for k, v in parts.items() if k not in SHOWN)
            cells = [case.config.id, "yes" if case.config.gradient_checkpointing else "no",
                     _gib(case.prediction.peak_mib), *(_gib(parts[k]) for k in SHOWN), _gib(other)]
            for x in budgets:
                verdict = "yes" if case.fits[x.label] else "no"
                cells.append(f"{verdict} ({_size(case.max_batch_size[x.label])} / {_size(case.max_seq_len[x.label])})")
            rows.append(cells)
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        for i, row in enumerate(rows):
            lines.append("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        if target == "cuda":
            lines.append("other = buffers + allocator rounding (computed) + cuBLAS workspace and CUDA context "
                         "(assumed, not measured here; lorabench/estimate/runtime.py)")
        lines.append("")
    return lines


def write_json(cases: list[FitCase], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cases": [c.to_json() for c in cases]}, indent=2) + "\n")


def plot(cases: list[FitCase], budgets: list[Budget], out: Path) -> list[Path]:
    """A stacked bar per case (its parts, GiB) with a line per budget; PNG and SVG."""
    from lorabench.plots import _pyplot, _save
    from lorabench.matrix import short_name

    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    names = sorted({k for c in cases for k in c.prediction.components_mib})
    order = [k for k in (*SHOWN, "buffers", "allocator_rounding", "cublas_workspace", "cuda_context") if k in names]
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
    ax.set(xlabel="predicted peak, GiB (lorabench.estimate: tensor bytes by category, plus runtime terms)",
           title=f"{', '.join(sorted({c.model for c in cases}))}: batch {first.batch_size} x {first.seq_len}, "
                 f"{first.target}")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    stem = "fit-" + "-".join(short_name(m) for m in dict.fromkeys(c.model for c in cases))
    return _save(fig, out / stem.replace(".", "_"))  # no dot left for with_suffix to take for an extension
