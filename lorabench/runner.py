"""Run one case end to end: load, adapt, train with meters attached, evaluate, record.

This is the engine's one entry point for a case. It knows nothing of pytest: the
step timer is passed in (pytest-benchmark's ``pedantic`` in the suite,
:func:`lorabench.training.simple_timer` elsewhere).
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorabench.config import BenchConfig, resolve
from lorabench.data import TaskData, collator, tokenize
from lorabench.environment import gpu_peak_flops, machine
from lorabench.footprint import (
    MIB,
    optimizer_state_bytes,
    param_counts,
    quantized_linear_ratio,
    trainable_bytes,
    weight_bytes,
)
from lorabench.matrix import Case
from lorabench.meters import CudaMeter, RssMeter, cuda_only_absent
from lorabench.models import ModelSource, apply_adapter, load_model
from lorabench.quality import eval_loss
from lorabench.result import STATUS_DOES_NOT_FIT, STATUS_ERROR, CaseResult
from lorabench.training import DivergenceError, StepRunner, make_trainer, simple_timer

log = logging.getLogger("lorabench.progress")

Timer = Callable[[Callable[[], Any], int, int], Any]  # (step, rounds, warmup_rounds)


@dataclass(frozen=True)
class TokenizedTask:
    """A data set tokenized for one tokenizer and sequence length."""

    task: TaskData
    train: Any
    eval: Any
    reference: Any | None


def tokenize_task(task: TaskData, tokenizer, seq_len: int) -> TokenizedTask:
    reference = tokenize(task.reference, tokenizer, seq_len) if task.reference is not None else None
    return TokenizedTask(task, tokenize(task.train, tokenizer, seq_len), tokenize(task.eval, tokenizer, seq_len), reference)


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError))


def run_case(
    case: Case,
    *,
    case_id: str,
    source: ModelSource,
    tokens_for: Callable[[BenchConfig], TokenizedTask],
    device,
    timer: Timer = simple_timer,
    report_to: str = "none",
) -> CaseResult:
    """Measure one case.

    Args:
        case: the configuration, model and data set.
        case_id: the pytest id, recorded with the result.
        source: the resolved model.
        tokens_for: tokenized data for a resolved configuration (cached by the caller).
        device: where to train.
        timer: runs ``step`` for ``warmup_rounds`` then ``rounds`` measured rounds.
        report_to: the Trainer's ``report_to`` (``none``, ``tensorboard``, ``wandb``).

    Returns:
        The result; ``status`` says whether it ran, did not fit, or failed (with ``error``).
    """
    import torch
    from transformers import set_seed

    config = resolve(case.config, source.defaults)
    result = CaseResult(
        case_id=case_id,
        config_id=config.id,
        model=case.model,
        dataset=case.dataset,
        device=str(device),
        config=config.to_dict(),
        environment=dict(machine()),
    )
    on_cuda = device.type == "cuda"
    rss = RssMeter()
    cuda = CudaMeter(device) if on_cuda else None
    state: dict[str, Any] = {}
    try:
        set_seed(config.seed)
        tokens = tokens_for(config)
        rss.start()
        if cuda:
            cuda.start()
        loaded = load_model(source, config, device)
        state["model"] = model = apply_adapter(loaded.model, config)
        result.set("load_s", loaded.load_s, source="wall clock around from_pretrained (load + quantize)")
        _record_model(result, model)
        collate = collator(loaded.tokenizer)
        before = eval_loss(model, tokens.eval, collate, batch_size=config.batch_size, device=device)
        result.set("eval_loss_before", before.loss)

        state["trainer"] = trainer = make_trainer(model, loaded.tokenizer, tokens.train, collate, config, device, report_to)

        def on_step_end(step: int) -> None:
            rss.sample()
            if cuda:
                cuda.sample()
            every = max(1, config.steps // 5)
            if step % every == 0 or step == config.steps:
                log.info("%s: step %d/%d loss %.4f elapsed %.1f s", case_id, step, config.steps,
                         runner.record.losses[-1], time.perf_counter() - started)

        runner = StepRunner(trainer, on_step_end=on_step_end)
        state["runner"] = runner
        started = time.perf_counter()
        timer(runner.step, config.steps - config.warmup_steps, config.warmup_steps)
        runner.run_until(config.steps)  # where the timer ran fewer (pytest-benchmark disabled)
        train_s = time.perf_counter() - started
        readings = [rss.stop()] + ([cuda.stop()] if cuda else [])
        _record_memory(result, readings, runner, trainer, on_cuda)
        _record_speed(result, runner, config, train_s, model, device)
        after = eval_loss(model, tokens.eval, collate, batch_size=config.batch_size, device=device)
        _record_quality(result, runner, after)
    except DivergenceError as exc:
        result.status = STATUS_ERROR
        result.error = f"{exc} (configuration {config.id})"
        _record_partial(result, state)
    except Exception as exc:
        if not _is_out_of_memory(exc):
            raise
        result.status = STATUS_DOES_NOT_FIT
        result.error = f"out of memory: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        for reading in [rss.stop()] + ([cuda.stop()] if cuda else []):
            result.metrics.update(reading.metrics)
            result.sources.update(reading.sources)
        _record_partial(result, state)
    finally:
        state.clear()
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
    if not on_cuda:
        for name, reason in cuda_only_absent(f"not measured: the case ran on {device.type}, not CUDA").items():
            result.absent.setdefault(name, reason)
    return result


def _record_partial(result: CaseResult, state: dict[str, Any]) -> None:
    runner = state.get("runner")
    if runner is not None:
        result.loss_curve = list(runner.record.losses)
        result.step_ms_curve = [s * 1000 for s in runner.record.seconds]


def _record_model(result: CaseResult, model) -> None:
    total, trainable = param_counts(model)
    result.set("params_total", total)
    result.set("params_trainable", trainable)
    result.set("trainable_pct", 100.0 * trainable / total)
    result.set("weights_mib", weight_bytes(model) / MIB, source="storage bytes of parameters, buffers, quantization state")
    result.set("trainable_mib", trainable_bytes(model) / MIB)
    ratio = quantized_linear_ratio(model)
    result.set("quant_linear_ratio", ratio, reason="the base model has no quantized linear layer")


def _record_memory(result: CaseResult, readings, runner: StepRunner, trainer, on_cuda: bool) -> None:
    for reading in readings:
        result.metrics.update(reading.metrics)
        result.absent.update(reading.absent)
        result.sources.update(reading.sources)
    grads = (runner.grad_bytes_seen or 0) / MIB
    result.set("grads_mib", grads, source="storage bytes of .grad tensors after the first backward pass")
    opt = optimizer_state_bytes(trainer.optimizer) / MIB
    result.set("optimizer_state_mib", opt, source="storage bytes of optimizer.state tensors")
    peak_name = "peak_alloc_mib" if on_cuda else "peak_rss_delta_mib"
    if peak_name in result.metrics:
        other = result.metrics[peak_name] - result.metrics["weights_mib"] - grads - opt
        if other >= 0:
            result.set("other_mib", other, source=f"{peak_name} minus weights, gradients and optimizer state")
        else:
            result.set("other_mib", None, reason=f"{peak_name} is below the sum of its parts (memory was reused "
                                                 "from before the case), so the remainder is not meaningful")
    else:
        result.set("other_mib", None, reason=f"{peak_name} is absent: {result.absent.get(peak_name, '')}")


def _training_flops_per_token(model, config: dict[str, Any]) -> float:
    """6N for full fine-tuning; 4N for an adapter (no weight gradients for the frozen base); +2N recompute."""
    total, _ = param_counts(model)
    per_token = (6 if config["method"] == "full" else 4) * total
    if config["gradient_checkpointing"]:
        per_token += 2 * total
    return per_token


def _record_speed(result: CaseResult, runner: StepRunner, config: BenchConfig, train_s: float, model, device) -> None:
    rec = runner.record
    w = config.warmup_steps
    measured_s = sum(rec.seconds[w:])
    result.step_ms_curve = [s * 1000 for s in rec.seconds]
    result.set("step_ms", statistics.median(rec.seconds[w:]) * 1000, source="median of post-warm-up optimizer steps")
    result.set("samples_per_s", sum(rec.samples[w:]) / measured_s)
    result.set("tokens_per_s", sum(rec.tokens[w:]) / measured_s, source="attention-mask tokens (no padding)")
    result.set("train_s", train_s, source="wall clock around all training steps")
    if device.type == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        if peak is None:
            result.set("mfu_pct", None, reason=f"no dense bf16 peak FLOP/s known for {name}")
        else:
            flops = _training_flops_per_token(model, result.config) * result.metrics["tokens_per_s"]
            result.set("mfu_pct", 100.0 * flops / peak, source=f"(6N or 4N) x tokens/s over {peak:.3g} FLOP/s")


def _record_quality(result: CaseResult, runner: StepRunner, after) -> None:
    losses = runner.record.losses
    result.loss_curve = list(losses)
    tail = losses[-max(1, len(losses) // 10):]
    result.set("train_loss_first", losses[0])
    result.set("train_loss_final", statistics.fmean(tail), source=f"mean of the last {len(tail)} steps")
    result.set("loss_drop", losses[0] - statistics.fmean(tail))
    result.set("eval_loss", after.loss, source=f"token-weighted over {after.tokens} held-out tokens")
    result.set("perplexity", after.perplexity)
    result.set("eval_examples", after.examples)
