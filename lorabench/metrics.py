"""Every metric lorabench records: name (with its unit), direction, group and meaning.

This registry is the one place a metric is defined. Gates reject names not listed
here, comparisons read the direction from here, and reports take labels from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorabench import backends


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    better: str | None  # "lower", "higher", or None when neither direction is better
    group: str  # memory, speed, quality, size
    help: str
    # False for figures that inform but do not gate a comparison: one-shot wall times, and wall-clock
    # speed that moves with the machine's load (step_control_ratio gates speed instead).
    gated: bool = True


def _m(name: str, unit: str, better: str | None, group: str, help: str, *, gated: bool = True) -> Metric:
    return Metric(name, unit, better, group, help, gated)


# Figures only a CUDA device gives (its allocator, NVML): a case on the CPU never records them.
CUDA_ONLY = frozenset({"peak_alloc_mib", "peak_reserved_mib", "alloc_before_mib", "avg_alloc_mib",
                       "device_used_max_mib"})

_FINETUNE: tuple[Metric, ...] = (
    # memory: process (any device)
    _m("rss_before_mib", "MiB", None, "memory", "process RSS at case start"),
    _m("peak_rss_mib", "MiB", "lower", "memory", "process peak RSS during the case (kernel VmHWM)"),
    _m("peak_rss_delta_mib", "MiB", "lower", "memory", "peak RSS minus RSS at case start: what the case added"),
    _m("avg_rss_delta_mib", "MiB", "lower", "memory", "mean RSS over step ends, minus RSS at case start"),
    # memory: CUDA
    _m("peak_alloc_mib", "MiB", "lower", "memory", "CUDA allocator peak allocated bytes"),
    _m("peak_reserved_mib", "MiB", "lower", "memory", "CUDA allocator peak reserved bytes"),
    _m("alloc_before_mib", "MiB", None, "memory", "CUDA bytes allocated at case start"),
    _m("avg_alloc_mib", "MiB", "lower", "memory", "mean CUDA allocated bytes over step ends"),
    _m("device_used_max_mib", "MiB", "lower", "memory", "NVML device memory in use, max over step ends"),
    # memory: breakdown, from the tensors themselves
    _m("weights_mib", "MiB", "lower", "memory", "parameters, buffers and quantization state of the model"),
    _m("trainable_mib", "MiB", "lower", "memory", "bytes of the parameters that train"),
    _m("grads_mib", "MiB", "lower", "memory", "gradient bytes after the last backward pass"),
    _m("optimizer_state_mib", "MiB", "lower", "memory", "optimizer state bytes after the last step"),
    _m("other_mib", "MiB", "lower", "memory", "peak minus weights, gradients and optimizer state: activations, buffers, workspace"),
    # memory: live tensor bytes over the warm-up steps (lorabench.meters.tensor_tracker), any device
    _m("tensor_peak_mib", "MiB", "lower", "memory", "peak of live tensor bytes in the training steps; the sum of the tensor_* parts"),
    _m("tensor_params_mib", "MiB", "lower", "memory", "at the tensor peak: parameters, quantized storage, quantization state"),
    _m("tensor_buffers_mib", "MiB", "lower", "memory", "at the tensor peak: the model's registered buffers"),
    _m("tensor_grads_mib", "MiB", "lower", "memory", "at the tensor peak: gradients of trainable parameters"),
    _m("tensor_optimizer_mib", "MiB", "lower", "memory", "at the tensor peak: optimizer state and tensors held by the optimizer"),
    _m("tensor_activations_mib", "MiB", "lower", "memory",
       "at the tensor peak: tensors of the forward pass alive when backward starts (saved for backward)"),
    _m("tensor_temporaries_mib", "MiB", "lower", "memory",
       "at the tensor peak: other tensors of the step (intermediates, activation gradients, recomputation)"),
    # memory: the memory model's prediction for the case (lorabench.estimate), from the config alone
    _m("predicted_peak_mib", "MiB", None, "memory", "tensor peak predicted on the meta device, no weights"),
    _m("prediction_error_pct", "%", None, "memory", "(predicted_peak_mib - tensor_peak_mib) / tensor_peak_mib"),
    _m("predicted_alloc_mib", "MiB", None, "memory",
       "CUDA: allocator peak allocated predicted from the meta run's allocations replayed through the caching "
       "allocator's rules, cuBLAS workspaces included (compare with peak_alloc_mib)"),
    _m("alloc_prediction_error_pct", "%", None, "memory", "(predicted_alloc_mib - peak_alloc_mib) / peak_alloc_mib"),
    _m("predicted_reserved_mib", "MiB", None, "memory",
       "CUDA: allocator peak reserved (its segments) predicted by the same replay (compare with peak_reserved_mib)"),
    _m("reserved_prediction_error_pct", "%", None, "memory",
       "(predicted_reserved_mib - peak_reserved_mib) / peak_reserved_mib"),
    _m("predicted_device_mib", "MiB", None, "memory",
       "CUDA: device total predicted: reserved plus the CUDA context (assumed) (compare with device_used_max_mib)"),
    _m("device_prediction_error_pct", "%", None, "memory",
       "(predicted_device_mib - device_used_max_mib) / device_used_max_mib"),
    # size
    _m("params_total", "count", None, "size", "parameters in the model (a packed 4-bit weight counts its elements)"),
    _m("params_trainable", "count", "lower", "size", "parameters that train"),
    _m("trainable_pct", "%", "lower", "size", "trainable share of all parameters"),
    _m("quant_linear_ratio", "ratio", "lower", "size",
       "quantized linear weights' bytes (with scales and code books) over their bf16 bytes"),
    # speed
    _m("step_ms", "ms", "lower", "speed", "median optimizer-step time over the measured (post-warm-up) steps",
       gated=False),
    _m("step_control_ratio", "ratio", "lower", "speed",
       "median over measured steps of step time / a fixed control workload timed just before it: speed under load"),
    _m("control_ms", "ms", None, "speed", "median time of the fixed control workload (the machine's speed then)",
       gated=False),
    _m("step_cpu_ms", "ms", "lower", "speed", "median CPU time of the case process (all threads) per measured step",
       gated=False),
    _m("samples_per_s", "samples/s", "higher", "speed", "training examples per second over the measured steps", gated=False),
    _m("tokens_per_s", "tokens/s", "higher", "speed", "non-padding tokens per second over the measured steps", gated=False),
    _m("train_s", "s", "lower", "speed", "wall time of all training steps, warm-up included", gated=False),
    _m("load_s", "s", "lower", "speed", "model load plus quantization time (one-shot)", gated=False),
    _m("mfu_pct", "%", "higher", "speed", "model FLOPs utilisation (PaLM): model FLOPs/token x tokens/s over the "
       "GPU's dense peak", gated=False),
    _m("hfu_pct", "%", "higher", "speed", "hardware FLOPs utilisation: mfu_pct plus gradient-checkpointing recompute",
       gated=False),
    # where a case's wall time goes (one-shot wall times)
    _m("phase_load_s", "s", None, "speed", "phase: data, model load and quantization, adapter", gated=False),
    _m("phase_eval_before_s", "s", None, "speed", "phase: held-out and reference evals of the base model", gated=False),
    _m("phase_train_s", "s", None, "speed", "phase: trainer set-up and every training step", gated=False),
    _m("phase_eval_after_s", "s", None, "speed", "phase: held-out, accuracy and reference evals after training",
       gated=False),
    _m("phase_adapter_check_s", "s", None, "speed", "phase: adapter save, reload and merge check", gated=False),
    # quality
    _m("train_loss_first", "nats", None, "quality", "training loss of the first step"),
    _m("train_loss_final", "nats", "lower", "quality", "mean training loss of the last 10% of steps"),
    _m("loss_drop", "nats", "higher", "quality", "train_loss_first minus train_loss_final"),
    _m("eval_loss_before", "nats", "lower", "quality", "held-out loss of the base model before training"),
    _m("eval_loss", "nats", "lower", "quality", "held-out loss after training, token-weighted"),
    _m("perplexity", "ratio", "lower", "quality", "exp(eval_loss)"),
    _m("eval_examples", "count", None, "quality", "held-out examples scored"),
    # adapters: save, reload, merge (lorabench.models.adapters)
    _m("adapter_mib", "MiB", "lower", "size", "the saved adapter's bytes on disk (safetensors + config)"),
    _m("reload_max_abs_diff", "logit", "lower", "quality", "max |logit| difference, trained vs reloaded adapter"),
    _m("merge_max_abs_diff", "logit", "lower", "quality", "max |logit| difference, merged vs unmerged adapter"),
    _m("merge_argmax_agree_pct", "%", "higher", "quality", "positions with the same greedy token, merged vs unmerged"),
    _m("adapter_check_s", "s", "lower", "speed", "wall time of the adapter save, reload and merge check (one-shot)",
       gated=False),
    # task accuracy and forgetting (lorabench.evaluation.accuracy, lorabench.evaluation.heldout)
    _m("accuracy_pct", "%", "higher", "quality", "held-out answers matched exactly by greedy decoding, after training"),
    _m("accuracy_ci_low_pct", "%", "higher", "quality", "lower bound of accuracy_pct's 95% Wilson interval"),
    _m("accuracy_ci_high_pct", "%", "higher", "quality", "upper bound of accuracy_pct's 95% Wilson interval"),
    _m("accuracy_n", "count", None, "quality", "held-out answers scored for accuracy"),
    _m("accuracy_before_pct", "%", None, "quality", "accuracy_pct of the base model before training"),
    _m("accuracy_before_ci_low_pct", "%", None, "quality", "lower 95% Wilson bound of accuracy_before_pct"),
    _m("accuracy_before_ci_high_pct", "%", None, "quality", "upper 95% Wilson bound of accuracy_before_pct"),
    _m("accuracy_gain_pp", "pp", "higher", "quality", "accuracy_pct minus accuracy_before_pct, percentage points"),
    _m("reference_loss_before", "nats", None, "quality", "loss on a reference text never trained on, before training"),
    _m("reference_loss", "nats", "lower", "quality", "loss on the same reference text after training"),
    _m("forgetting_nats", "nats", "lower", "quality", "reference_loss minus reference_loss_before: what training cost elsewhere"),
)
# What a multi-process case (world_size > 1, lorabench.run.distributed) adds; its per-device memory figures
# above are the largest rank's, and tokens_per_s / samples_per_s the sum over ranks.
_DISTRIBUTED: tuple[Metric, ...] = (
    _m("world_size", "count", None, "size", "ranks (processes, one device each) the case trained on"),
    _m("tokens_per_s_per_device", "1/s", "higher", "speed", "tokens_per_s over world_size", gated=False),
    _m("scaling_efficiency_pct", "%", "higher", "speed",
       "tokens_per_s over world_size x the single-device case's tokens_per_s (100% is linear scaling)", gated=False),
)
_INFERENCE: tuple[Metric, ...] = (
    # inference (lorabench.kinds.inference): statistics over the measured repeats, warm-up excluded
    _m("ttft_ms", "ms", "lower", "speed", "median time to first token (prefill + first sampling step)"),
    _m("ttft_ms_p90", "ms", "lower", "speed", "90th percentile of the time to first token"),
    _m("decode_tokens_per_s", "tokens/s", "higher", "speed", "median decode rate after the first token, batch 1"),
    _m("latency_ms", "ms", "lower", "speed", "median end-to-end time of one generate call"),
    _m("latency_ms_p90", "ms", "lower", "speed", "90th percentile of the end-to-end generate time"),
    _m("new_tokens", "count", None, "speed", "tokens generated per timed call"),
    _m("inference_repeats", "count", None, "speed", "measured generate calls (after warm-up)"),
    # semantic drift (lorabench.evaluation.drift): generations against the base model's, all-MiniLM-L6-v2 embeddings
    _m("drift_cosine_mean", "cosine", "higher", "quality", "mean cosine similarity of generations to the base's"),
    _m("drift_cosine_min", "cosine", "higher", "quality", "lowest cosine similarity of a generation to the base's"),
    _m("drift_exact_match_pct", "%", "higher", "quality", "generations identical to the base model's"),
    _m("adapter_drift_cosine_mean", "cosine", "higher", "quality",
       "mean cosine similarity of generations to the unmerged bf16 adapter's"),
    _m("adapter_drift_cosine_min", "cosine", "higher", "quality",
       "lowest cosine similarity of a generation to the unmerged bf16 adapter's"),
    _m("adapter_drift_exact_match_pct", "%", "higher", "quality",
       "generations identical to the unmerged bf16 adapter's"),
)
_QUANT_ERROR: tuple[Metric, ...] = (
    # quantization error (lorabench.kinds.quant_error): relative Frobenius error of a quantize/dequantize round trip,
    # one pair per format of every registered backend (nf4_rel_error_mean, nf4_rel_error_max, fp4_..., ...)
    _m("quant_error_layers", "count", None, "quality", "weight matrices measured for quantization error"),
    *(m for f in backends.formats() for m in (
        _m(f"{f.quant}_rel_error_mean", "ratio", "lower", "quality",
           f"mean over layers of ||W - {f.label}(W)|| / ||W||" + (f" ({f.note})" if f.note else "")),
        _m(f"{f.quant}_rel_error_max", "ratio", "lower", "quality", f"largest layer's {f.label} relative error"),
    )),
)

METRICS: dict[str, Metric] = {m.name: m for m in (*_FINETUNE, *_DISTRIBUTED, *_INFERENCE, *_QUANT_ERROR)}
# What a fine-tuning case records, each figure or the reason it is absent.
FINETUNE_METRICS: frozenset[str] = frozenset(m.name for m in _FINETUNE)


def direction(name: str) -> str | None:
    """``lower``, ``higher`` or ``None`` for a metric name.

    Raises:
        KeyError: the metric is unknown.
    """
    return METRICS[name].better


# Metrics whose value may fall below zero (differences, similarities); every other one is a
# size, a time, a rate, a count, a share or a loss, never negative.
SIGNED_METRICS: frozenset[str] = frozenset({
    "loss_drop", "forgetting_nats", "accuracy_gain_pp", "drift_cosine_mean", "drift_cosine_min",
    "adapter_drift_cosine_mean", "adapter_drift_cosine_min",
})


def can_be_negative(name: str) -> bool:
    """Whether a metric's value may be below zero (a difference or a cosine)."""
    return name in SIGNED_METRICS
