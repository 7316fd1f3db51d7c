"""What every training case records from its run: model sizes, memory, speed and training loss.

One home for these figures, so fine-tuning (:mod:`lorabench.kinds.finetune`), classification
(:mod:`lorabench.kinds.classify`) and multi-process runs (:mod:`lorabench.run.distributed`) name,
compute and source them the same way. Evaluation figures differ by task and stay with
each kind of case.
"""

from __future__ import annotations

import statistics

from lorabench.config import BenchConfig
from lorabench.meters.footprint import (
    MIB,
    optimizer_state_bytes,
    param_counts,
    quantized_linear_ratio,
    trainable_bytes,
    weight_bytes,
)
from lorabench.result import CaseResult
from lorabench.training.loop import StepRunner
from lorabench.meters.control import paired_ratios, ratio_in_cpu_time
from lorabench.meters.flops import matmul_params, model_shape, peak_flops, training_flops

# Deferred imports: torch inside the functions that use them: what only reads a configuration or a stored run
# starts without them.


def record_model(result: CaseResult, model, *, unquantized_reason: str = "the base model has no quantized linear layer",
                 load_s: float | None = None) -> None:
    """Parameter counts and sizes of the model as it trains (adapter included); ``load_s`` where it was timed."""
    if load_s is not None:
        result.set("load_s", load_s, source="wall clock around from_pretrained (load + quantize)")
    total, trainable = param_counts(model)
    result.set("params_total", total)
    result.set("params_trainable", trainable)
    result.set("trainable_pct", 100.0 * trainable / total)
    result.set("weights_mib", weight_bytes(model) / MIB, source="storage bytes of parameters, buffers, quantization state")
    result.set("trainable_mib", trainable_bytes(model) / MIB)
    result.set("quant_linear_ratio", quantized_linear_ratio(model), reason=unquantized_reason)


def record_memory(result: CaseResult, readings, runner: StepRunner, trainer, on_cuda: bool) -> None:
    """The meters' readings, the gradient and optimizer-state bytes, and what the peak holds beyond them."""
    for reading in readings:
        result.merge(reading)
    grads = None if runner.grad_bytes_seen is None else runner.grad_bytes_seen / MIB
    result.set("grads_mib", grads, reason="no backward pass completed",
               source="storage bytes of .grad tensors after the first backward pass")
    opt = optimizer_state_bytes(trainer.optimizer) / MIB
    result.set("optimizer_state_mib", opt, source="storage bytes of optimizer.state tensors")
    peak_name = "peak_alloc_mib" if on_cuda else "peak_rss_delta_mib"
    if grads is None:
        result.set("other_mib", None, reason="grads_mib is absent: no backward pass completed")
    elif peak_name in result.metrics:
        other = result.metrics[peak_name] - result.metrics["weights_mib"] - grads - opt
        if other >= 0:
            result.set("other_mib", other, source=f"{peak_name} minus weights, gradients and optimizer state")
        else:
            result.set("other_mib", None, reason=f"{peak_name} is below the sum of its parts (memory was reused "
                                                 "from before the case), so the remainder is not meaningful")
    else:
        result.set("other_mib", None, reason=f"{peak_name} is absent: {result.absent.get(peak_name, '')}")


def record_speed(result: CaseResult, runner: StepRunner, config: BenchConfig, train_s: float, model, device) -> None:
    """Wall-clock speed (informational under load), and the step time against the control (gated)."""

    rec = runner.record
    w = config.warmup_steps
    measured_s = sum(rec.seconds[w:])
    result.step_ms_curve = [s * 1000 for s in rec.seconds]
    result.control_ms_curve = [s * 1000 for s in rec.control_seconds]
    result.step_cpu_ms_curve = [s * 1000 for s in rec.cpu_seconds]
    result.control_cpu_ms_curve = [s * 1000 for s in rec.control_cpu_seconds]
    result.set("step_ms", statistics.median(rec.seconds[w:]) * 1000, source="median of post-warm-up optimizer steps")
    result.set("step_cpu_ms", statistics.median(rec.cpu_seconds[w:]) * 1000,
               source="median of the case process's CPU time (all threads) per post-warm-up step")
    result.set("control_ms", statistics.median(rec.control_seconds[w:]) * 1000,
               source="median time of the fixed control workload run before each step (lorabench.meters.control)")
    if ratio_in_cpu_time(device.type):
        ratios = paired_ratios(rec.cpu_seconds[w:], rec.control_cpu_seconds[w:])
        clock = "the case process's CPU time (all threads)"
    else:
        ratios = paired_ratios(rec.seconds[w:], rec.control_seconds[w:])
        clock = "wall time"
    result.set("step_control_ratio", statistics.median(ratios),
               source=f"median over post-warm-up steps of step / the controls before and after it, in {clock}")
    result.set("samples_per_s", sum(rec.samples[w:]) / measured_s)
    result.set("tokens_per_s", sum(rec.tokens[w:]) / measured_s, source="attention-mask tokens (no padding)")
    result.set("train_s", train_s, source="wall clock around all training steps")
    record_flops(result, rec, w, model, config, device)


def record_flops(result: CaseResult, rec, warmup: int, model, config: BenchConfig, device) -> None:
    """MFU (PaLM's model FLOPs) and HFU (with recompute) against the GPU's dense peak for the dtype."""

    if device.type != "cuda":
        for name in ("mfu_pct", "hfu_pct"):
            result.set(name, None, reason=f"no peak FLOP/s for a {device.type} device: MFU is measured on CUDA GPUs")
        return
    import torch

    name = torch.cuda.get_device_name(device)
    peak = peak_flops(name, config.dtype)
    if peak is None:
        reason = f"no dense {config.dtype} peak FLOP/s known for {name!r} (lorabench.meters.flops.GPU_PEAK_FLOPS)"
        for metric in ("mfu_pct", "hfu_pct"):
            result.set(metric, None, reason=reason)
        return
    frozen, trainable = matmul_params(model)
    layers, hidden = model_shape(model)
    seq_len = sum(rec.tokens[warmup:]) / sum(rec.samples[warmup:])  # mean real tokens per sequence
    flops = training_flops(frozen=frozen, trainable=trainable, layers=layers, hidden=hidden, seq_len=seq_len,
                           checkpointing=config.gradient_checkpointing)
    tokens_per_s = result.metrics["tokens_per_s"]
    result.set("mfu_pct", 100.0 * flops.model_per_token * tokens_per_s / peak,
               source=f"PaLM model FLOPs/token ({flops.model_per_token:.3g}) x tokens/s over {peak:.4g} FLOP/s")
    result.set("hfu_pct", 100.0 * flops.hardware_per_token * tokens_per_s / peak,
               source=f"model FLOPs plus recompute ({flops.hardware_per_token:.3g}/token) x tokens/s over {peak:.4g}")


def record_train_loss(result: CaseResult, losses: list[float], *, source: str = "") -> None:
    """``train_loss_first``, ``train_loss_final`` (mean of the last 10% of steps) and ``loss_drop``.

    Args:
        source: where each step's loss comes from, when not this process's own steps.
    """
    tail = losses[-max(1, len(losses) // 10):]
    prefix = f"{source}; " if source else ""
    result.set("train_loss_first", losses[0], source=source)
    result.set("train_loss_final", statistics.fmean(tail), source=f"{prefix}mean of the last {len(tail)} steps")
    result.set("loss_drop", losses[0] - statistics.fmean(tail), source=source)
