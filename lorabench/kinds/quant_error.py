"""Quantization error: how far each backend's round trip (NF4, FP4, int8, ...) lands from the original weights.

Each weight matrix is quantized and dequantized with the functions its backend's layers
use (:meth:`lorabench.backends.QuantBackend.round_trip`; bitsandbytes 4-bit: blockwise absmax
with block size 64; int8: one absmax scale per row), and the error is the relative Frobenius
norm ``||W - deq(q(W))|| / ||W||``. NF4's code points are the quantiles of a normal
distribution, so on normally distributed weights its error should be below FP4's: the
ordering the QLoRA paper reports.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from lorabench import backends
from lorabench.case_kinds import CaseKind, register
from lorabench.kinds.protocol import ResolvedCase
from lorabench.result import CaseResult

# Deferred imports: torch, transformers inside the functions that use them: what only reads a configuration
# or a stored run starts without them.

QUANT_TYPES = tuple(f.quant for f in backends.formats())  # every registered format
# configuration ids gates name: normal matrices, the --model's layers, the pretrained MiniLM encoder's layers
NORMAL_CASE_ID, MODEL_CASE_ID, MINILM_CASE_ID = "quant_error_normal", "quant_error_model", "quant_error_minilm"
# Shapes of the synthetic normal layers: the tiny zoo's attention and MLP matrices, and a larger one.
NORMAL_SHAPES = ((256, 256), (704, 256), (256, 704), (512, 512))


def _columns(_device: str) -> tuple:
    """Every registered backend's formats: the mean error, then the largest layer's."""
    formats = backends.formats()
    return (*((f"{f.quant}_rel_error_mean", f"{f.label} err", f"{f.label} error") for f in formats),
            *((f"{f.quant}_rel_error_max", f"{f.label} max", f"largest {f.label} layer error") for f in formats))


# Only the rules that name these cases apply: the "*" rules are written for fine-tuning.
KIND = register(CaseKind("quant_error", case_ids=lambda: (NORMAL_CASE_ID, MODEL_CASE_ID, MINILM_CASE_ID),
                         columns=_columns, wildcard_rules=False, runner="lorabench.kinds.quant_error:QuantErrorRun"))

@dataclass(frozen=True)
class LayerError:
    name: str
    shape: tuple[int, ...]
    errors: dict[str, float]  # quant type -> relative Frobenius error


def round_trip(weight, quant_type: str):
    """``weight`` quantized and dequantized as its backend stores it, in float32.

    Raises:
        ValueError: an unknown quant type, or a weight that is not a matrix.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant type {quant_type!r}; use one of {', '.join(QUANT_TYPES)}")
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {tuple(weight.shape)}")
    return backends.round_trip(weight, quant_type)


def relative_error(weight, quant_type: str) -> float:
    """``||W - deq(q(W))||_F / ||W||_F`` for one matrix.

    Raises:
        ValueError: the weight is all zeros (no relative error is defined), or see :func:`round_trip`.
    """
    w = weight.detach().float()
    norm = float(w.norm())
    if norm == 0.0:
        raise ValueError("an all-zero weight has no relative error")
    return float((round_trip(w, quant_type) - w).norm()) / norm


def layer_errors(named_weights, quant_types=QUANT_TYPES) -> list[LayerError]:
    """Relative error of every named 2-D weight under each quant type."""
    return [
        LayerError(name, tuple(w.shape), {q: relative_error(w, q) for q in quant_types})
        for name, w in named_weights
    ]


def normal_weights(shapes=NORMAL_SHAPES, seed: int = 0):
    """Named standard-normal matrices, seeded: the distribution NF4 is built for."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [(f"normal_{r}x{c}", torch.randn(r, c, generator=gen)) for r, c in shapes]


def linear_weights(model):
    """(name, weight) of the ``nn.Linear`` layers a quantization config converts: all but the output head."""
    import torch

    head = model.get_output_embeddings()
    return [(name, m.weight) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head]


def causal_lm_weights(path: str, trust_remote_code: bool = False):
    """(name, weight) of a causal LM checkpoint's linear layers (:func:`linear_weights`), as stored (float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True,
                                                 trust_remote_code=trust_remote_code)
    return linear_weights(model)


def summarize(layers: list[LayerError]) -> dict[str, float]:
    """``{quant}_rel_error_mean`` and ``{quant}_rel_error_max`` over layers, plus ``quant_error_layers``.

    Raises:
        ValueError: no layer to summarize.
    """
    if not layers:
        raise ValueError("no weight matrix to measure")
    out: dict[str, float] = {"quant_error_layers": float(len(layers))}
    for q in layers[0].errors:
        values = [layer.errors[q] for layer in layers]
        out[f"{q}_rel_error_mean"] = statistics.fmean(values)
        out[f"{q}_rel_error_max"] = max(values)
    return out


def quant_error_result(case_id: str, model: str, layers: list[LayerError]):
    """The record of one quantization-error case: summary metrics, per-layer errors in ``details``."""

    summary = summarize(layers)
    round_trips = {q: f"{backends.backend_for(q).name}: {backends.format_for(q).note}" for q in layers[0].errors}
    result = CaseResult(case_id=case_id, config_id=case_id, model=model, dataset="(weights only)", device="cpu",
                        config={"kind": "quant_error", "quant_types": list(round_trips), "round_trips": round_trips})
    for name, value in summary.items():
        result.set(name, value, source="relative Frobenius error of the backend's quantize/dequantize round trip")
    result.details["layers"] = [{"name": layer.name, "shape": list(layer.shape), **layer.errors} for layer in layers]
    return result


@dataclass(frozen=True)
class QuantErrorParams:
    """What a quantization-error case measures (:attr:`lorabench.kinds.protocol.ResolvedCase.params`).

    Args:
        weights: returns the named matrices; a module-level function or a ``functools.partial`` of one,
            so that the case pickles (:func:`normal_weights`, ``partial(causal_lm_weights, path)``).
        quant_types: the formats whose round trips it measures (every registered one).
    """

    weights: Callable[[], list]
    quant_types: tuple[str, ...] = QUANT_TYPES


class QuantErrorRun:
    """A quantization-error case in the case protocol's phases (kind ``quant_error``): ``prepare`` loads the
    matrices, the one timed ``step`` round-trips every one through every format, ``finish`` makes the record.

    Args:
        case: the resolved case: ``params`` a :class:`QuantErrorParams`; no configuration, no data.
    """

    base_eval = None
    rounds, warmup_rounds = 1, 0

    @classmethod
    def data(cls, case: ResolvedCase) -> None:
        """None: the matrices are loaded in ``prepare``."""
        return None

    def __init__(self, case: ResolvedCase) -> None:
        self.case = case
        self.weights: list | None = None
        self.layers: list[LayerError] = []
        self.outputs = None

    def prepare(self) -> None:
        self.weights = self.case.params.weights()

    def step(self) -> None:
        self.layers = layer_errors(self.weights, self.case.params.quant_types)

    def control(self) -> None:
        """No control workload: nothing here is gated on time."""

    def finish(self):
        if not self.layers:  # where the timer ran no round (pytest-benchmark disabled)
            self.step()
        result = quant_error_result(self.case.case_id, self.case.model, self.layers)
        self.close()
        return result

    def close(self) -> None:
        self.weights = None
