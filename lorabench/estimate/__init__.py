"""The memory model: a case's peak tensor bytes predicted from its config alone, no weights, no GPU.

:func:`predict` builds the model on the meta device (:mod:`lorabench.estimate.build`:
the real classes, dtypes, quantization layout and adapter), runs a training step
through the Trainer under the tensor tracker (:mod:`lorabench.estimate.step`, with the
target device's kernel choices from :mod:`lorabench.estimate.device`), and reads the
peak and its parts. Meta tensors have shapes and dtypes but no data, so a 70B model
costs what a tiny one does, in tensor bytes; the Python that runs every layer's operators
is what takes time. ``extrapolate_layers`` runs the model with two and three periods of its
layers instead (identical decoder layers hold identical tensors, so every part of the
peak grows linearly with their number once the first layer, which reads the embeddings,
is behind) and extends the line to the full depth. It does so for the highest total of each
phase of the step (forward, backward, optimizer step) and takes the highest at full depth: the
phases grow by different amounts per layer, so the phase that peaks in a short model is not
always the one that peaks in the whole one. For a CUDA target
the prediction adds what no tensor shows as named terms (:mod:`lorabench.estimate.runtime`).

Every fine-tuning case checks the prediction against its own measured tensor peak
(``predicted_peak_mib``, ``prediction_error_pct``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from lorabench.config import BenchConfig
from lorabench.estimate.runtime import RuntimeTerm, allocator_rounding, cuda_terms
from lorabench.footprint import MIB
from lorabench.tensor_tracker import CATEGORIES, TensorPeak


@dataclass
class Prediction:
    """A predicted peak and its parts.

    Attributes:
        tensor: the tracked meta run's peak of live tensor bytes, by category.
        runtime: named terms no tensor shows (CUDA targets only).
        target: ``cpu`` or ``cuda``.
        batch_size, seq_len: the shape predicted for.
        layers_run: decoder layers of the meta runs behind it (the full depth, or the two extrapolated from).
        attention: the attention implementation the model ran (``sdpa``, ``eager``, ...).
        phases: the highest tensor bytes of each phase of the step (``forward``, ``backward``,
            ``optimizer``), by category; ``tensor`` is the highest of them.
    """

    tensor: TensorPeak
    target: str
    batch_size: int
    seq_len: int
    runtime: list[RuntimeTerm] = field(default_factory=list)
    layers_run: tuple[int, ...] = ()
    attention: str = ""
    phases: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def tensor_mib(self) -> float:
        return self.tensor.peak_bytes / MIB

    @property
    def peak_mib(self) -> float:
        """Tensor bytes plus every runtime term."""
        return self.tensor_mib + sum(t.mib for t in self.runtime)

    @property
    def components_mib(self) -> dict[str, float]:
        parts = {c: self.tensor.components[c] / MIB for c in CATEGORIES}
        parts.update({t.name: t.mib for t in self.runtime})
        return parts


def hf_config(spec: str, *, trust_remote_code: bool = False):
    """The transformers config of a model spec, without loading any weight.

    Args:
        spec: ``preset:NAME``, a zoo name, a checkpoint directory or a hub id in the local cache.
        trust_remote_code: allow the checkpoint's own configuration code.

    Raises:
        ModelError: the spec names no known model, or not a causal language model.
    """
    from lorabench import presets
    from lorabench.zoo import ZOO, model_config

    if presets.is_preset(spec):
        return presets.hf_config(spec)
    if spec in ZOO:
        return model_config(ZOO[spec])
    from transformers import AutoConfig

    from lorabench.models import resolve_model

    source = resolve_model(spec, trust_remote_code=trust_remote_code)
    return AutoConfig.from_pretrained(source.path, local_files_only=True, trust_remote_code=trust_remote_code)


def predict(hf_config, config: BenchConfig, *, batch_size: int, seq_len: int, target: str = "cpu",
            extrapolate_layers: bool = False) -> Prediction:
    """Predict the peak memory of training ``config`` on the model ``hf_config`` describes.

    Args:
        hf_config: a transformers config (see :func:`hf_config`).
        config: the configuration; its ``grad_accum``, optimizer, checkpointing and LoRA fields apply.
        batch_size: rows per micro-batch.
        seq_len: tokens per row (full rows, no padding).
        target: ``cpu`` or ``cuda``.
        extrapolate_layers: run one and two periods of the decoder layers and extend the line to the full depth.

    Returns:
        The prediction: exact tensor bytes by category, and for CUDA the runtime terms.

    Raises:
        ConfigError: an unknown target.
    """
    from lorabench.estimate.build import meta_model
    from lorabench.config import TrainDefaults, resolve
    from lorabench.estimate.device import check_target
    from lorabench.estimate.step import track_training
    from lorabench.precision import predicted_dtype

    check_target(target)
    # steps and learning rate change no tensor; the Trainer wants them set
    open_fields = TrainDefaults(steps=config.warmup_steps + 1, batch_size=batch_size, seq_len=seq_len,
                                lr_full=1e-5, lr_lora=1e-4)
    config = resolve(config.replace(batch_size=batch_size, seq_len=seq_len,
                                    dtype=predicted_dtype(config.dtype, target)), open_fields)

    attention = []

    def run(layers: int) -> dict[str, TensorPeak]:
        model = meta_model(with_layers(hf_config, layers), config)
        attention.append(getattr(model.config, "_attn_implementation", "") or "")
        # (the bitsandbytes backend drops LLM.int8's "inputs will be cast" notice, once per layer and call)
        return track_training(model, config, batch_size=batch_size, seq_len=seq_len, target=target)

    depth = hf_config.num_hidden_layers
    period = layer_period(hf_config)
    if extrapolate_layers and depth > 3 * period:
        runs = [run(2 * period), run(3 * period)]
        if runs[0].keys() == runs[1].keys():
            prediction = _extrapolated(runs, period, depth, target, batch_size, seq_len)
            prediction.attention = attention[-1]
            return prediction
    phases = run(depth)
    peak = _highest(phases)
    runtime = cuda_terms(peak.storage_bytes) if target == "cuda" else []
    return Prediction(peak, target, batch_size, seq_len, runtime, (depth,), attention[-1],
                      {phase: dict(at.components) for phase, at in phases.items()})


def layer_period(hf_config) -> int:
    """How many decoder layers make one repeat of the model's layer pattern (sliding/full attention)."""
    types = list(getattr(hf_config, "layer_types", None) or [])
    for period in range(1, len(types) + 1):
        if all(t == types[i % period] for i, t in enumerate(types)):
            return period
    return 1


def with_layers(hf_config, layers: int):
    """A copy of ``hf_config`` with ``layers`` decoder layers (the per-layer pattern cut to match)."""
    if layers == hf_config.num_hidden_layers:
        return hf_config
    short = copy.deepcopy(hf_config)
    short.num_hidden_layers = layers
    if getattr(short, "layer_types", None):
        short.layer_types = list(short.layer_types)[:layers]
    return short


def _highest(phase_peaks: dict[str, TensorPeak]) -> TensorPeak:
    return max(phase_peaks.values(), key=lambda p: p.peak_bytes)


def _extrapolated(runs: list[dict[str, TensorPeak]], period: int, depth: int, target: str, batch_size: int,
                  seq_len: int) -> Prediction:
    """Extend the line through runs of two and three layer periods to ``depth`` layers, phase by phase."""
    repeats = depth / period - 2  # periods beyond the first run's

    def line(first: int, second: int) -> int:
        return round(first + repeats * (second - first))

    at_depth = {}
    for phase in runs[1]:
        first, second = runs[0][phase], runs[1][phase]
        components = {c: line(first.components[c], second.components[c]) for c in CATEGORIES}
        at_depth[phase] = (sum(components.values()), components, first, second)
    total, components, one, two = max(at_depth.values(), key=lambda v: v[0])
    peak = TensorPeak(total, components, two.peak_phase, one.ops + two.ops, 1)
    runtime: list[RuntimeTerm] = []
    if target == "cuda":
        rounding = line(allocator_rounding(one.storage_bytes), allocator_rounding(two.storage_bytes))
        runtime = cuda_terms([])
        runtime[0] = RuntimeTerm(runtime[0].name, rounding / MIB,
                                 runtime[0].source + f", extrapolated from {2 * period} and {3 * period} layers")
    return Prediction(peak, target, batch_size, seq_len, runtime, (2 * period, 3 * period),
                      phases={phase: v[1] for phase, v in at_depth.items()})
