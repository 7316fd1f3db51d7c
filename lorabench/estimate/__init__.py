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
always the one that peaks in the whole one.

A prediction names each figure with the counter it is to be compared with (:meth:`Prediction.figures`):
tensor bytes (``tensor_peak_mib``, any device); on CUDA also the caching allocator's peak allocated
(``peak_alloc_mib``) and reserved (``peak_reserved_mib``), replayed from the meta run's allocations with
the cuBLAS workspaces (:mod:`lorabench.estimate.allocator`), and the device total (``device_used_max_mib``):
reserved plus the CUDA context, which is outside the allocator (:mod:`lorabench.estimate.runtime`).
Budgets are checked against the device total. Every fine-tuning case records each figure's error
against its own counter (:mod:`lorabench.estimate.case`).
"""

from __future__ import annotations

from pathlib import Path
import copy
from dataclasses import dataclass, field

from lorabench.config import BenchConfig
from lorabench.estimate.allocator import AllocatorPeaks, replay
from lorabench.estimate.allocator import SOURCE as ALLOCATOR_SOURCE
from lorabench.estimate.runtime import CUBLAS_WORKSPACE, CUDA_CONTEXT, RuntimeTerm, workspace_blocks
from lorabench.meters.footprint import MIB
from lorabench.meters.tensor_tracker import CATEGORIES, TensorPeak
from lorabench.backends.precision import predicted_dtype
from lorabench.config import TrainDefaults, resolve
from lorabench.models import presets
from lorabench.models.loading import hub_snapshot, resolve_model
from lorabench.models.zoo import ZOO, model_config

# Deferred imports: transformers inside the functions that use them: what only reads a configuration or a
# stored run starts without them.


@dataclass(frozen=True)
class Figure:
    """One predicted figure and the counter it is to be compared with.

    Attributes:
        name: ``tensor``, ``allocated``, ``reserved`` or ``device``.
        mib: the prediction.
        counter: the metric a run measures it as (``peak_alloc_mib``).
        meaning: what the figure holds, and how it was predicted.
    """

    name: str
    mib: float
    counter: str
    meaning: str


FIGURE_COUNTERS = {  # name -> (metric of the run it compares with, what that counter is)
    "tensor": ("tensor_peak_mib", "peak live tensor bytes (lorabench.meters.tensor_tracker), any device"),
    "allocated": ("peak_alloc_mib", "torch.cuda.max_memory_allocated"),
    "reserved": ("peak_reserved_mib", "torch.cuda.max_memory_reserved"),
    "device": ("device_used_max_mib", "NVML device memory in use"),
}


@dataclass
class Prediction:
    """A predicted peak, its parts, and on CUDA the allocator's and the device's figures.

    Attributes:
        tensor: the tracked meta run's peak of live tensor bytes, by category.
        runtime: named terms no tensor shows (CUDA targets only): the cuBLAS workspaces and the CUDA context.
        target: ``cpu`` or ``cuda``.
        batch_size, seq_len: the shape predicted for.
        layers_run: decoder layers of the meta runs behind it (the full depth, or the two extrapolated from).
        attention: the attention implementation the model ran (``sdpa``, ``eager``, ...).
        phases: the highest tensor bytes of each phase of the step (``forward``, ``backward``,
            ``optimizer``), by category; ``tensor`` is the highest of them.
        allocator: the replayed caching allocator's peaks, workspaces included (CUDA targets only).
    """

    tensor: TensorPeak
    target: str
    batch_size: int
    seq_len: int
    runtime: list[RuntimeTerm] = field(default_factory=list)
    layers_run: tuple[int, ...] = ()
    attention: str = ""
    phases: dict[str, dict[str, int]] = field(default_factory=dict)
    allocator: AllocatorPeaks | None = None

    @property
    def tensor_mib(self) -> float:
        return self.tensor.peak_bytes / MIB

    @property
    def allocated_mib(self) -> float | None:
        """What ``torch.cuda.max_memory_allocated`` would show (CUDA only)."""
        return None if self.allocator is None else self.allocator.allocated / MIB

    @property
    def reserved_mib(self) -> float | None:
        """What ``torch.cuda.max_memory_reserved`` would show (CUDA only)."""
        return None if self.allocator is None else self.allocator.reserved / MIB

    @property
    def device_mib(self) -> float | None:
        """What the device shows in use for this process: reserved, managed memory (paged optimizer state,
        resident while the card has room) and the CUDA context (CUDA only)."""
        if self.allocator is None:
            return None
        context = sum(t.mib for t in self.runtime if t.name == CUDA_CONTEXT.name)
        return self.reserved_mib + self.allocator.managed / MIB + context

    @property
    def peak_mib(self) -> float:
        """The figure a budget is checked against: the device total on CUDA, tensor bytes on the CPU."""
        return self.tensor_mib if self.device_mib is None else self.device_mib

    @property
    def budget_figure(self) -> str:
        return "tensor" if self.device_mib is None else "device"

    def figures(self) -> list[Figure]:
        """Every figure predicted, each named with the counter it is to be compared with."""
        values = {"tensor": self.tensor_mib, "allocated": self.allocated_mib, "reserved": self.reserved_mib,
                  "device": self.device_mib}
        meanings = {
            "tensor": "exact live tensor bytes at the peak (meta-device build, one tracked step)",
            "allocated": f"tensor bytes through the caching allocator, cuBLAS workspaces included ({ALLOCATOR_SOURCE})",
            "reserved": f"the caching allocator's segments ({ALLOCATOR_SOURCE})",
            "device": f"reserved + managed memory (paged optimizer state) + CUDA context ({CUDA_CONTEXT.source})",
        }
        return [Figure(name, value, FIGURE_COUNTERS[name][0], meanings[name])
                for name, value in values.items() if value is not None]

    @property
    def components_mib(self) -> dict[str, float]:
        """The parts of :attr:`peak_mib`: tensor bytes by category and, on CUDA, the allocator's rounding (its
        peak allocated less tensor bytes and workspaces), its cached free blocks, the workspaces and the context."""
        parts = {c: self.tensor.components[c] / MIB for c in CATEGORIES}
        if self.allocator is not None:
            workspace = sum(workspace_blocks()) / MIB
            # tensor bytes in managed memory (paged optimizer state) are not the allocator's
            parts["allocator_rounding"] = self.allocated_mib - (self.tensor_mib - self.allocator.managed / MIB) - workspace
            parts["allocator_cached"] = self.reserved_mib - self.allocated_mib
        parts.update({t.name: t.mib for t in self.runtime})
        return parts


def hf_config(spec: str, *, trust_remote_code: bool = False):
    """The transformers config of a model spec, without loading any weight.

    A checkpoint directory needs only its ``config.json`` here: weight files are loading's business.

    Args:
        spec: ``preset:NAME``, a zoo name, a checkpoint directory or a hub id in the local cache.
        trust_remote_code: allow the checkpoint's own configuration code.

    Raises:
        ModelError: the spec names no known model, not a causal language model, or its config.json has
            a shape field missing or out of range (:mod:`lorabench.estimate.model_check`).
    """

    from lorabench.estimate.model_check import read_config  # deferred: lorabench.estimate.model_check imports this module

    if presets.is_preset(spec):
        return presets.hf_config(spec)
    if spec in ZOO:
        return model_config(ZOO[spec])
    from transformers import AutoConfig

    folder = Path(spec).expanduser()
    if not folder.exists() and spec.split("@", 1)[0].count("/") == 1 and not spec.startswith((".", "/", "~")):
        folder = Path(hub_snapshot(spec))  # an org/name id in the local cache
    if (folder / "config.json").is_file():  # checked before transformers fills in or trips over its fields
        read_config(folder / "config.json")
    source = resolve_model(spec, trust_remote_code=trust_remote_code, weights=False)
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
        extrapolate_layers: run two and three periods of the decoder layers and extend the line to the full depth.

    Returns:
        The prediction: exact tensor bytes by category, and for CUDA the allocator's figures and runtime terms.

    Raises:
        ConfigError: an unknown target.
    """
    return Predictor(hf_config, config, target=target, extrapolate_layers=extrapolate_layers).predict(
        batch_size, seq_len)


class Predictor:
    """Predictions of one model and configuration at any shape; the meta models are built once.

    The build (classes, quantization, adapter, optimizer state) does not depend on the batch or the
    length, so a search over sizes reuses it and only runs the tracked step again.
    """

    def __init__(self, hf_config, config: BenchConfig, *, target: str = "cpu", extrapolate_layers: bool = False):
        from lorabench.estimate.device import check_target  # deferred: lorabench.estimate.device imports this module

        check_target(target)
        self.hf_config, self.config, self.target = hf_config, config, target
        depth, period = hf_config.num_hidden_layers, layer_period(hf_config)
        self.depth, self.period = depth, period
        self.layers = (2 * period, 3 * period) if extrapolate_layers and depth > 3 * period else (depth,)
        self._built: dict[int, tuple[object, object, str]] = {}

    def _resolved(self, batch_size: int, seq_len: int) -> BenchConfig:
        # steps and learning rate change no tensor; the Trainer wants them set
        open_fields = TrainDefaults(steps=self.config.warmup_steps + 1, batch_size=batch_size, seq_len=seq_len,
                                    lr_full=1e-5, lr_lora=1e-4)
        return resolve(self.config.replace(batch_size=batch_size, seq_len=seq_len,
                                           dtype=predicted_dtype(self.config.dtype, self.target)), open_fields)

    def _run(self, layers: int, config: BenchConfig, batch_size: int, seq_len: int):
        from lorabench.estimate.build import meta_model  # deferred: lorabench.estimate.build imports this module
        from lorabench.estimate.step import prepared_trainer, track_training  # deferred: lorabench.estimate.step imports this module

        if layers not in self._built:
            model = meta_model(with_layers(self.hf_config, layers), config)
            attention = getattr(model.config, "_attn_implementation", "") or ""
            self._built[layers] = (model, prepared_trainer(model, config, self.target), attention)
        model, trainer, _ = self._built[layers]
        # (the bitsandbytes backend drops LLM.int8's "inputs will be cast" notice, once per layer and call)
        step = track_training(model, config, batch_size=batch_size, seq_len=seq_len, target=self.target,
                              trainer=trainer)
        peaks = None
        if self.target == "cuda":
            replayed = replay(step.events, workspace_blocks(), step.state_events)
            peaks = AllocatorPeaks(replayed.allocated, replayed.reserved, step.managed_bytes)
        return step.phases, peaks

    def predict(self, batch_size: int, seq_len: int) -> Prediction:
        """The prediction at ``batch_size`` rows of ``seq_len`` tokens."""
        config = self._resolved(batch_size, seq_len)
        runs = [self._run(layers, config, batch_size, seq_len) for layers in self.layers]
        attention = self._built[self.layers[-1]][2]
        runtime = [CUBLAS_WORKSPACE, CUDA_CONTEXT] if self.target == "cuda" else []
        if len(runs) == 2 and runs[0][0].keys() == runs[1][0].keys():
            prediction = _extrapolated(runs, self.period, self.depth, self.target, batch_size, seq_len)
        else:
            if len(runs) == 2:  # the short runs peak in different phases: run the whole depth instead
                runs = [self._run(self.depth, config, batch_size, seq_len)]
            phases, peaks = runs[0]
            prediction = Prediction(_highest(phases), self.target, batch_size, seq_len, layers_run=(self.depth,),
                                    phases={phase: dict(at.components) for phase, at in phases.items()},
                                    allocator=peaks)
        prediction.runtime, prediction.attention = runtime, attention
        return prediction


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


def _extrapolated(runs: list[tuple[dict[str, TensorPeak], AllocatorPeaks | None]], period: int, depth: int,
                  target: str, batch_size: int, seq_len: int) -> Prediction:
    """Extend the line through runs of two and three layer periods to ``depth`` layers, phase by phase
    (and the allocator's peaks, which grow by a layer's blocks per layer alike)."""
    repeats = depth / period - 2  # periods beyond the first run's

    def line(first: int, second: int) -> int:
        return round(first + repeats * (second - first))

    (phases_one, alloc_one), (phases_two, alloc_two) = runs
    at_depth = {}
    for phase in phases_two:
        first, second = phases_one[phase], phases_two[phase]
        components = {c: line(first.components[c], second.components[c]) for c in CATEGORIES}
        at_depth[phase] = (sum(components.values()), components, first, second)
    total, components, one, two = max(at_depth.values(), key=lambda v: v[0])
    peak = TensorPeak(total, components, two.peak_phase, one.ops + two.ops, 1)
    allocator = None
    if alloc_one is not None and alloc_two is not None:
        allocated = line(alloc_one.allocated, alloc_two.allocated)
        # the segments grow in steps of 2 or 20 MiB, so the line through two depths can pass under the
        # allocated peak; a reserved figure never does
        allocator = AllocatorPeaks(allocated, max(allocated, line(alloc_one.reserved, alloc_two.reserved)),
                                   line(alloc_one.managed, alloc_two.managed))
    return Prediction(peak, target, batch_size, seq_len, layers_run=(2 * period, 3 * period),
                      phases={phase: v[1] for phase, v in at_depth.items()}, allocator=allocator)
