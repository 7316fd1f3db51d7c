"""``python -m lorabench fit``: which configuration fits which card, predicted without weights or a GPU.

For every model and configuration, :func:`lorabench.estimate.predict` gives the peak and
its parts at the asked batch size and length; each budget gets a yes or no, and the
largest batch size (at the asked length) and length (at the asked batch size) under it.
Those two come from the peak's parts: parameters, gradients, optimizer state and the
runtime terms stay fixed, activations and temporaries scale with the batch and, with
sdpa or flash attention, with the length. Eager attention holds a length x length matrix
per head, so for it a second prediction at half the length fits the quadratic term.

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

FIXED = ("params", "buffers", "grads", "optimizer", "cuda_context", "cublas_workspace")
SCALED = ("activations", "temporaries", "allocator_rounding")
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
    max_batch_size: dict[str, int] = field(default_factory=dict)
    max_seq_len: dict[str, int] = field(default_factory=dict)

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
    parts = prediction.components_mib
    fixed = sum(parts.get(k, 0.0) for k in FIXED)
    scaled = sum(parts.get(k, 0.0) for k in SCALED)
    per_token, per_token_sq = scaled / seq_len, 0.0
    if prediction.attention == "eager" and seq_len >= 2:
        half = predict(hf_config, config, batch_size=batch_size, seq_len=seq_len // 2, target=target,
                       extrapolate_layers=True)
        per_token, per_token_sq = _quadratic(seq_len, scaled, seq_len // 2,
                                             sum(half.components_mib.get(k, 0.0) for k in SCALED))
    limit = getattr(hf_config, "max_position_embeddings", None)
    for budget in budgets:
        room = budget.mib - fixed
        case.fits[budget.label] = prediction.peak_mib <= budget.mib
        case.max_batch_size[budget.label] = max(0, math.floor(room / (scaled / batch_size))) if scaled else 0
        length = _largest_length(room, per_token, per_token_sq)
        case.max_seq_len[budget.label] = min(length, limit) if limit else length
    return case


def _quadratic(t1: int, y1: float, t2: int, y2: float) -> tuple[float, float]:
    """(a, c) of y = a t + c t^2 through two points."""
    c = (y1 / t1 - y2 / t2) / (t1 - t2)
    return y1 / t1 - c * t1, max(0.0, c)


def _largest_length(room: float, a: float, c: float) -> int:
    if room <= 0 or a <= 0 and c <= 0:
        return 0
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
                cells.append(f"{verdict} ({case.max_batch_size[x.label]} / {case.max_seq_len[x.label]})")
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
