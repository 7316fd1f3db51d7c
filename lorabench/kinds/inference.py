"""Inference with a trained adapter: the variants, token timing, and statistics over repeats.

A variant is the base model in some form with or without the adapter: the base alone,
the base with the adapter unmerged, the adapter merged into the base
(``merge_and_unload``), and an NF4- or int8-quantized base with the adapter unmerged.
Every variant loads through :func:`lorabench.models.loading.load_model`, so a quantized base is
the same backend load (:mod:`lorabench.backends`) the fine-tuning cases use.

Timing: one greedy ``generate`` call with a :class:`TokenClock` streamer. ``generate``
hands every new token to the streamer with ``tokens.cpu()``, which waits for the device
(transformers' ``StopCheck``), so the clock's stamps are when each token was on the host.
Time to first token is the first new token's stamp minus the start of the call (prefill
plus one sampling step); decode tokens/s is the remaining tokens over the time from the
first to the last stamp. On CUDA the device is synchronized before the start clock.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorabench import backends
from lorabench.case_kinds import CUDA_PEAK, PROCESS_PEAK, CaseKind, register
from lorabench.config import BenchConfig
from lorabench.backends.precision import resolve_dtype
from lorabench.kinds.protocol import ResolvedCase
from lorabench.meters.environment import machine
from lorabench.meters.footprint import MIB, weight_bytes
from lorabench.meters.memory import memory_meters
from lorabench.models.loading import load_model
from lorabench.models.loading import load_tokenizer
from lorabench.result import CaseResult

# Deferred imports: numpy, peft, torch inside the functions that use them: what only reads a configuration or
# a stored run starts without them.

# The timing protocol of every inference variant, transformers and GGUF alike.
WARMUP_CALLS = 2  # the first generate call pays one-off costs (kernel selection, caches): ~6x a later one here
MEASURED_CALLS = 6
NEW_TOKENS = 16
DRIFT_NEW_TOKENS = 16  # longest answer generated per prompt for semantic drift (EOS stops it sooner)


@dataclass(frozen=True)
class Variant:
    """One way to serve the fine-tuned model."""

    id: str
    quant: str  # none or a backend's format (nf4, int8): how the base is loaded
    adapter: bool  # whether the trained adapter is attached
    merged: bool = False  # whether the adapter is folded into the base weights
    markers: tuple[str, ...] = ()

    def base_config(self, dtype: str = "auto") -> BenchConfig:
        """The loading configuration of this variant's base (``dtype``: its weights, or a quantized one's
        compute); a quantized base takes double quantization wherever its format allows it."""
        return BenchConfig(self.id, method="lora", quant=self.quant,
                           double_quant=backends.takes_double_quant(self.quant), dtype=dtype)


VARIANTS: tuple[Variant, ...] = (
    Variant("infer_base", "none", adapter=False),
    Variant("infer_adapter", "none", adapter=True),
    Variant("infer_merged", "none", adapter=True, merged=True),
    Variant("infer_nf4_adapter", "nf4", adapter=True, markers=("quantized", "nf4")),
    Variant("infer_int8_adapter", "int8", adapter=True, markers=("quantized", "int8")),
)
BASE_VARIANT_ID = "infer_base"  # the one without an adapter, which drift is measured against
COLUMNS = (
    ("weights_mib", "weights MiB", "weight memory"),
    ("ttft_ms", "TTFT ms", "time to first token"),
    ("decode_tokens_per_s", "decode tok/s", "decode rate"),
    ("latency_ms", "latency ms", "end-to-end latency"),
    ("drift_cosine_mean", "cos to base", "similarity to the base's generations"),
    ("adapter_drift_cosine_mean", "cos to adapter", "similarity to the unmerged adapter's generations"),
)


@dataclass(frozen=True)
class GGUFVariant:
    """The merged model as llama.cpp serves it (:mod:`lorabench.kinds.gguf` runs it), at one quantization type:
    another runtime's variant, recorded as an inference case."""

    id: str
    quant: str  # a key of lorabench.kinds.gguf.FILE_TYPES
    adapter: bool = True
    merged: bool = True


# Q8_0 first: the Q4_0 gates compare with it
GGUF_VARIANTS: tuple[GGUFVariant, ...] = (GGUFVariant("gguf_q8_0", "Q8_0"), GGUFVariant("gguf_q4_0", "Q4_0"))


def _case_ids() -> list[str]:
    return [v.id for v in VARIANTS] + [v.id for v in GGUF_VARIANTS]


def columns(device: str) -> tuple:
    """The summary's columns of an inference record (transformers and GGUF variants alike)."""
    return (CUDA_PEAK if device.startswith("cuda") else PROCESS_PEAK,) + COLUMNS


# Only the rules that name these cases apply: the "*" rules are written for fine-tuning.
KIND = register(CaseKind("inference", case_ids=_case_ids, wildcard_rules=False, columns=columns,
                         runner="lorabench.kinds.inference:InferenceRun"))


def load_variant(variant: Variant, source, adapter_dir: str | Path | None, device, dtype: str = "auto"):
    """Load a variant for inference, in eval mode.

    Raises:
        ValueError: the variant needs an adapter and ``adapter_dir`` is ``None``.
    """
    return load_variant_as(variant, variant.base_config(resolve_dtype(dtype, device)), source, adapter_dir, device)


def load_variant_as(variant: Variant, config: BenchConfig, source, adapter_dir: str | Path | None, device):
    """:func:`load_variant` with the base's loading configuration resolved already (an inference case's).

    Raises:
        ValueError: the variant needs an adapter and ``adapter_dir`` is ``None``.
    """
    from peft import PeftModel


    model = load_model(source, config, device).model
    if variant.adapter:
        if adapter_dir is None:
            raise ValueError(f"variant {variant.id} needs a trained adapter directory")
        model = PeftModel.from_pretrained(model, str(adapter_dir))
        if variant.merged:
            model = model.merge_and_unload()
    return model.eval()


class TokenClock:
    """A ``generate`` streamer that stamps when each new token reaches the host.

    The first ``put`` is the prompt (transformers streams it before decoding starts); every
    later ``put`` is one new token for the batch.
    """

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass(frozen=True)
class GenerationTiming:
    """One timed ``generate`` call."""

    ttft_s: float  # start of the call to the first new token on the host
    total_s: float  # start to the end of the call
    new_tokens: int
    decode_s: float  # first new token to the last

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first over the time they took; ``None`` with fewer than two tokens."""
        if self.new_tokens < 2 or self.decode_s <= 0:
            return None
        return (self.new_tokens - 1) / self.decode_s


def timing_from_stamps(started: float, stamps: list[float], ended: float) -> GenerationTiming:
    """A :class:`GenerationTiming` from the start clock, the per-token stamps and the end clock.

    Raises:
        ValueError: no token was stamped, or the clocks run backwards.
    """
    if not stamps:
        raise ValueError("generate produced no new token")
    if stamps[0] < started or ended < stamps[-1] or any(b < a for a, b in zip(stamps, stamps[1:])):
        raise ValueError("token stamps are not in order between the start and the end of the call")
    return GenerationTiming(stamps[0] - started, ended - started, len(stamps), stamps[-1] - stamps[0])


def timed_generate(model, input_ids, new_tokens: int, device) -> GenerationTiming:
    """Greedy-generate exactly ``new_tokens`` tokens (EOS does not stop it) and time each one."""
    import torch

    clock = TokenClock()
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, streamer=clock)
    if on_cuda:
        torch.cuda.synchronize(device)
    return timing_from_stamps(started, clock.stamps, time.perf_counter())


def summarize_timings(timings: list[GenerationTiming]) -> dict[str, float]:
    """Statistics over the measured repeats (warm-up calls must not be in ``timings``).

    Returns:
        Metric name to value: medians and 90th percentiles of time to first token and of
        end-to-end latency in ms, the median decode rate, and the number of repeats.

    Raises:
        ValueError: ``timings`` is empty, or no repeat generated two tokens.
    """
    import numpy as np

    if not timings:
        raise ValueError("no measured repeat")
    ttft = [t.ttft_s * 1000 for t in timings]
    total = [t.total_s * 1000 for t in timings]
    rates = [r for r in (t.decode_tokens_per_s for t in timings) if r is not None]
    if not rates:
        raise ValueError("no repeat generated two tokens, so no decode rate")
    return {
        "ttft_ms": statistics.median(ttft),
        "ttft_ms_p90": float(np.percentile(ttft, 90)),  # linear between order statistics
        "decode_tokens_per_s": statistics.median(rates),
        "latency_ms": statistics.median(total),
        "latency_ms_p90": float(np.percentile(total, 90)),
        "new_tokens": float(timings[0].new_tokens),
        "inference_repeats": float(len(timings)),
    }


def greedy_texts(model, tokenizer, prompts: list[str], device, max_new_tokens: int = DRIFT_NEW_TOKENS,
                 batch_size: int = 16) -> list[str]:
    """Greedy completions of ``prompts`` (stopping at EOS), decoded without special tokens."""
    import torch

    out: list[str] = []
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = previous_side
    return out


def variant_by_id(variant_id: str) -> Variant:
    """Raises: KeyError naming the known variants."""
    for v in VARIANTS:
        if v.id == variant_id:
            return v
    raise KeyError(f"unknown inference variant {variant_id!r}; known: {', '.join(v.id for v in VARIANTS)}")


def variant_result_config(variant: Variant, dtype: str, new_tokens: int, repeats: int, warmup: int) -> dict[str, Any]:
    """What a variant's result record says about how it ran."""
    return {"id": variant.id, "quant": variant.quant, "adapter": variant.adapter, "merged": variant.merged,
            "dtype": dtype, "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup, "batch_size": 1}


@dataclass(frozen=True)
class InferenceParams:
    """What an inference case is beside its model (:attr:`lorabench.kinds.protocol.ResolvedCase.params`).

    Args:
        variant: which form of the model.
        adapter_dir: the trained adapter (``None`` only for a variant without one).
        prompt: the prompt of the timed calls (batch 1).
        prompts: the held-out prompts generated after the meters stop, for semantic drift.
        new_tokens: tokens each timed call generates.
        warmup: how many calls are warm-up, before the measured ones.
        repeats: the measured calls.
    """

    variant: Any
    adapter_dir: str | None
    prompt: str
    prompts: tuple[str, ...] = ()
    new_tokens: int = NEW_TOKENS
    warmup: int = WARMUP_CALLS
    repeats: int = MEASURED_CALLS


class InferenceRun:
    """One inference variant in the case protocol's phases (kind ``inference``); a timed call is a step.

    ``prepare`` starts the memory meters and loads the variant; ``step`` runs one timed
    ``generate`` (the first ``warmup`` calls are warm-up and excluded from every figure);
    ``finish`` stops the meters, records the statistics and then, outside the memory
    window, the greedy generations that semantic drift compares (:attr:`outputs`).

    Args:
        case: the resolved case: ``params`` an :class:`InferenceParams`, ``config`` the variant's base
            configuration resolved (:meth:`Variant.base_config`), ``data`` the model's tokenizer.
    """

    base_eval = None

    @classmethod
    def data(cls, case: ResolvedCase):
        """The model's tokenizer (the prompts are encoded with it)."""

        return load_tokenizer(case.source)

    def __init__(self, case: ResolvedCase) -> None:
        params = case.params
        self.case, self.params, self.variant, self.source = case, params, params.variant, case.source
        self.adapter_dir, self.tokenizer, self.device = params.adapter_dir, case.data, case.device
        self.new_tokens, self.warmup, self.repeats = params.new_tokens, params.warmup, params.repeats
        self.rounds, self.warmup_rounds = params.repeats, params.warmup
        self.prompt, self.dtype = params.prompt, self._dtype()
        self.result = CaseResult(case_id=case.case_id, config_id=self.variant.id, model=case.model,
                                 dataset=case.dataset, device=str(case.device), environment=dict(machine()),
                                 config={"kind": "inference", **variant_result_config(
                                     self.variant, self.dtype, self.new_tokens, self.repeats, self.warmup)})
        self.meters = memory_meters(case.device)
        self.timings: list[GenerationTiming] = []
        self.model = self.input_ids = self.outputs = None

    def prepare(self) -> None:
        self.meters.start()
        started = time.perf_counter()
        self.model = self.load()
        self.result.set("load_s", time.perf_counter() - started, source=self.load_source)
        self.record_size()
        self.encode_prompt()

    def step(self) -> None:
        self.timings.append(self.timed_call())
        self.meters.sample()  # averages are over call ends, as they are over step ends in training

    def control(self) -> None:
        """No control workload: inference figures are not gated on a ratio to one."""

    # What differs between runtimes; a subclass for another runtime overrides these.
    load_source = "wall clock: from_pretrained, adapter load and merge where the variant has them"

    def _dtype(self) -> str:
        return self.case.config.dtype  # resolved: the weights', or a quantized base's compute dtype

    def load(self):
        return load_variant_as(self.variant, self.case.config, self.source, self.adapter_dir, self.device)

    def record_size(self) -> None:
        self.result.set("weights_mib", weight_bytes(self.model) / MIB,
                        source="storage bytes of parameters, buffers, quantization state")

    def encode_prompt(self) -> None:
        self.input_ids = self.tokenizer(self.prompt, return_tensors="pt")["input_ids"].to(self.device)

    def timed_call(self) -> GenerationTiming:
        return timed_generate(self.model, self.input_ids, self.new_tokens, self.device)

    def generations(self, prompts: list[str]) -> list[str]:
        return greedy_texts(self.model, self.tokenizer, prompts, self.device)

    def finish(self):
        """Record memory and timing statistics, then generate for the drift prompts (:attr:`outputs`) and
        free the model.

        Raises:
            ValueError: no measured call generated two tokens.
        """
        while len(self.timings) < self.warmup + self.repeats:  # where the timer ran fewer (--benchmark-disable)
            self.step()
        result = self.result
        for reading in self.meters.stop():
            result.merge(reading)
        measured = self.timings[self.warmup:]
        source = f"over {len(measured)} measured calls after {self.warmup} warm-up calls; batch 1, greedy, " \
                 f"{self.new_tokens} new tokens; per-token stamps from a generate streamer"
        for name, value in summarize_timings(measured).items():
            result.set(name, value, source=source)
        result.step_ms_curve = [t.total_s * 1000 for t in self.timings]
        self.outputs = self.generations(list(self.params.prompts))
        self.close()
        return result

    def close(self) -> None:
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
