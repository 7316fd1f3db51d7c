"""Run one case end to end: load, adapt, train with meters attached, evaluate, record.

:class:`CaseRun` is the engine's one way to run a case, and :func:`measure` drives it.
It knows nothing of pytest: the step timer is passed in (pytest-benchmark's
``pedantic`` in the suite, :func:`lorabench.training.simple_timer` elsewhere), and
:mod:`lorabench.isolation` runs the same phases in a child process.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorabench.adapters import check_case_adapter
from lorabench.accuracy import record_accuracy
from lorabench.budget import MemoryBudget
from lorabench.config import BenchConfig, resolve
from lorabench.data import TaskData, collator, tokenize
from lorabench.environment import gpu_peak_flops, machine
from lorabench.estimate.case import record_prediction
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
from lorabench.tensor_meter import TensorMeter
from lorabench.training import DivergenceError, StepRunner, make_trainer, simple_timer

log = logging.getLogger("lorabench.progress")

# Reference rows scored for forgetting, before and after training: two extra eval passes per
# case, so a subset keeps them cheap (128 rows, 640 scored tokens on the embedded task).
REFERENCE_EXAMPLES = 128

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


class CaseAborted(Exception):
    """A case stopped early (out of memory, divergence); ``result`` holds what was measured."""

    def __init__(self, result: CaseResult) -> None:
        super().__init__(result.error)
        self.result = result


class CaseRun:
    """One case in three phases, so a timer can drive the training steps in between.

    ``prepare`` loads and adapts the model and builds the Trainer; ``step`` runs one
    optimizer step; ``finish`` completes any steps the timer did not run, stops the
    meters and evaluates. A phase that runs out of memory or diverges raises
    :class:`CaseAborted` with the partial result; any other error propagates.

    Args:
        case: the configuration, model and data set.
        case_id: the pytest id, recorded with the result.
        source: the resolved model.
        tokens_for: tokenized data for a resolved configuration.
        device: where to train.
        report_to: the Trainer's ``report_to`` (``none``, ``tensorboard``, ``wandb``).
        log_dir: where those integrations write.
        memory_budget: bytes the case may use (``--memory-budget``); ``None`` for no cap.
        adapter_dir: where to keep the trained adapter (``None``: a temporary directory).
    """

    def __init__(self, case: Case, *, case_id: str, source: ModelSource,
                 tokens_for: Callable[[BenchConfig], TokenizedTask], device, report_to: str = "none",
                 log_dir: str | None = None, memory_budget: int | None = None,
                 adapter_dir: str | None = None) -> None:
        self.config = config = resolve(case.config, source.defaults)
        self.case_id = case_id
        self.source = source
        self.tokens_for = tokens_for
        self.device = device
        self.report_to = report_to
        self.log_dir = log_dir
        self.adapter_dir = adapter_dir
        self.on_cuda = device.type == "cuda"
        self.result = CaseResult(
            case_id=case_id,
            config_id=config.id,
            model=case.model,
            dataset=case.dataset,
            device=str(device),
            config=config.to_dict(),
            environment=dict(machine()),
        )
        self.rss = RssMeter()
        self.cuda = CudaMeter(device) if self.on_cuda else None
        self.budget = MemoryBudget(memory_budget, device) if memory_budget else None
        if self.budget:
            self.result.environment["memory_budget_mib"] = self.budget.limit_mib
        self._meters_running = False
        self.model = self.trainer = self.runner = self.tokens = self.collate = None
        self.tensors: TensorMeter | None = None
        self.eos_token_id = None
        self.reference_before = None
        self.started = 0.0

    # ----- phases ------------------------------------------------------------
    def prepare(self) -> None:
        from transformers import set_seed

        with self._guard():
            config, result = self.config, self.result
            set_seed(config.seed)
            self.tokens = self.tokens_for(config)
            self._start_meters()
            loaded = load_model(self.source, config, self.device)
            self.model = apply_adapter(loaded.model, config)
            result.set("load_s", loaded.load_s, source="wall clock around from_pretrained (load + quantize)")
            _record_model(result, self.model)
            self.collate = collator(loaded.tokenizer)
            self.eos_token_id = loaded.tokenizer.eos_token_id
            before = eval_loss(self.model, self.tokens.eval, self.collate, batch_size=config.batch_size,
                               device=self.device, eos_token_id=self.eos_token_id)
            result.set("eval_loss_before", before.loss)
            record_accuracy(result, before, has_answers=self.tokens.task.has_answers, seq_len=config.seq_len,
                            stage="_before")
            self.reference_before = self._reference_loss()
            self.trainer = make_trainer(self.model, loaded.tokenizer, self.tokens.train, self.collate, config,
                                        self.device, self.report_to, self.log_dir)
            self.runner = StepRunner(self.trainer, on_step_end=self._on_step_end)
            self.tensors = TensorMeter(self.model, self.trainer.optimizer, self.device, config.warmup_steps)
            self.started = time.perf_counter()

    def step(self) -> float:
        with self._guard():
            return self.tensors.run(self.runner.step)

    def finish(self) -> CaseResult:
        with self._guard():
            config, result = self.config, self.result
            while self.runner.steps_done < config.steps:  # where the timer ran fewer (pytest-benchmark disabled)
                self.tensors.run(self.runner.step)
            train_s = time.perf_counter() - self.started
            self.runner.end()
            _record_memory(result, self._stop_meters(), self.runner, self.trainer, self.on_cuda)
            record_prediction(result, self.source, config, self.tensors, self.runner.record.shapes, self.device)
            _record_speed(result, self.runner, config, train_s, self.model, self.device)
            after = eval_loss(self.model, self.tokens.eval, self.collate, batch_size=config.batch_size,
                              device=self.device, eos_token_id=self.eos_token_id)
            _record_quality(result, self.runner, after)
            record_accuracy(result, after, has_answers=self.tokens.task.has_answers, seq_len=config.seq_len)
            _record_task_change(result, self.reference_before, self._reference_loss())
            # last: it saves, reloads and merges the adapter, so every other figure comes from the trained model itself
            check_case_adapter(result, self.model, self.source, config, self.device, self.tokens.eval, self.collate,
                               self.adapter_dir)
            self._judge_budget()
        self.close()
        return self.result

    def close(self) -> None:
        """Drop the model and everything that holds device memory."""
        if self.tensors is not None:
            self.tensors.close()
        self.model = self.trainer = self.runner = None
        gc.collect()
        if self.on_cuda:
            import torch

            torch.cuda.empty_cache()
        if not self.on_cuda:
            reason = f"not measured: the case ran on {self.device.type}, not CUDA"
            for name, why in cuda_only_absent(reason).items():
                self.result.absent.setdefault(name, why)

    # ----- helpers -------------------------------------------------------------
    def _reference_loss(self):
        """Loss on the reference text the fine-tune never sees, or ``None`` where the data set has none."""
        reference = self.tokens.reference
        if reference is None:
            return None
        rows = reference.select(range(min(REFERENCE_EXAMPLES, len(reference))))
        return eval_loss(self.model, rows, self.collate, batch_size=self.config.batch_size, device=self.device)

    def _start_meters(self) -> None:
        self.rss.start()
        if self.cuda:
            self.cuda.start()
        if self.budget:
            self.budget.start(self.rss.before)
        self._meters_running = True

    def _stop_meters(self):
        self._meters_running = False
        if self.budget:
            self.budget.stop()
        tensors = [self.tensors.reading()] if self.tensors is not None else []
        return [self.rss.stop()] + ([self.cuda.stop()] if self.cuda else []) + tensors

    def _judge_budget(self) -> None:
        """A case whose measured peak passed the budget between two watchdog samples does not fit either."""
        if not self.budget:
            return
        peak = self.result.metrics.get("peak_alloc_mib" if self.on_cuda else "peak_rss_delta_mib")
        violation = self.budget.violation(peak)
        if violation:
            self.result.status, self.result.error = STATUS_DOES_NOT_FIT, violation

    def _on_step_end(self, step: int) -> None:
        self.rss.sample()
        if self.cuda:
            self.cuda.sample()
        steps = self.config.steps
        if step % max(1, steps // 5) == 0 or step == steps:
            log.info("%s: step %d/%d loss %.4f elapsed %.1f s", self.case_id, step, steps,
                     self.runner.record.losses[-1], time.perf_counter() - self.started)

    @contextlib.contextmanager
    def _guard(self):
        """Turn out-of-memory and divergence into :class:`CaseAborted` with the partial result."""
        try:
            yield
        except DivergenceError as exc:
            self._abort(STATUS_ERROR, f"{exc} (configuration {self.config.id})")
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            self._abort(STATUS_DOES_NOT_FIT, f"out of memory: {type(exc).__name__}: {first_line}".rstrip(": "))

    def _abort(self, status: str, error: str) -> None:
        result = self.result
        result.status, result.error = status, error
        if self._meters_running:
            for reading in self._stop_meters():
                result.metrics.update(reading.metrics)
                result.absent.update(reading.absent)
                result.sources.update(reading.sources)
        _record_partial(result, self.runner)
        self.close()
        raise CaseAborted(result) from None


def measure(run, timer: Timer = simple_timer) -> CaseResult:
    """Drive a case run (in this process or another): prepare, timed steps, finish.

    Returns:
        The result, also when the case aborted (``status`` says how).
    """
    try:
        run.prepare()
        warmup = run.config.warmup_steps
        timer(run.step, run.config.steps - warmup, warmup)
        return run.finish()
    except CaseAborted as exc:
        return exc.result
    finally:
        run.close()


def _record_partial(result: CaseResult, runner: StepRunner | None) -> None:
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


def _record_task_change(result: CaseResult, reference_before, reference_after) -> None:
    """What fine-tuning changed: accuracy gained on the task, loss added on the reference text."""
    metrics = result.metrics
    if "accuracy_pct" in metrics and "accuracy_before_pct" in metrics:
        result.set("accuracy_gain_pp", metrics["accuracy_pct"] - metrics["accuracy_before_pct"])
    else:
        result.set("accuracy_gain_pp", None, reason=result.absent.get("accuracy_pct", "accuracy not measured"))
    if reference_before is None:
        reason = "the data set has no reference text (only the embedded digit-reverse ships one)"
        for name in ("reference_loss_before", "reference_loss", "forgetting_nats"):
            result.set(name, None, reason=reason)
        return
    source = f"token-weighted loss on {reference_after.tokens} tokens of {reference_after.examples} reference rows"
    result.set("reference_loss_before", reference_before.loss, source=source)
    result.set("reference_loss", reference_after.loss, source=source)
    result.set("forgetting_nats", reference_after.loss - reference_before.loss,
               source="reference_loss minus reference_loss_before")
