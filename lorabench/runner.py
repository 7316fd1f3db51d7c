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
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorabench.adapters import check_case_adapter, record_adapter
from lorabench.accuracy import record_accuracy
from lorabench.budget import MemoryBudget
from lorabench.config import BenchConfig, resolve
from lorabench.data import TaskData, collator, tokenize
from lorabench.environment import machine
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
from lorabench.result import STATUS_DIVERGED, STATUS_DOES_NOT_FIT, CaseResult
from lorabench.tensor_meter import TensorMeter
from lorabench.training import DivergenceError, DivergenceRule, StepRunner, make_trainer, simple_timer

log = logging.getLogger("lorabench.progress")

# Reference rows scored for forgetting, before and after training: two extra eval passes per
# case, so a subset keeps them cheap (128 rows, 640 scored tokens on the embedded task).
REFERENCE_EXAMPLES = 128

Timer = Callable[[Callable[[], Any], int, int, Callable[[], None]], Any]  # (step, rounds, warmup_rounds, control)


@dataclass(frozen=True)
class BaseEvaluation:
    """The base model's held-out and reference losses before training.

    Every case whose base loads the same way (model, data set, quantization, dtype, sequence
    length, batch) starts from the same model output, a LoRA adapter included (its B starts at
    zero), so a session computes it once and the cases after the first reuse it.
    """

    held_out: Any  # EvalLoss with exact-match counts
    reference: Any | None  # EvalLoss on the reference text, where the data set has one


def base_evaluation_key(model: str, dataset: str, config: BenchConfig) -> tuple:
    """What a base evaluation depends on; ``config`` is resolved (dtype, seq_len, batch_size filled)."""
    return (model, dataset, config.quant, config.double_quant, config.dtype, config.seq_len, config.batch_size,
            config.seed)


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
        parallel: this rank's part in a multi-process case (:class:`lorabench.distributed.RankParallel`):
            it shards and wraps the model; ``None`` for a case in one process.
    """

    def __init__(self, case: Case, *, case_id: str, source: ModelSource,
                 tokens_for: Callable[[BenchConfig], TokenizedTask], device, report_to: str = "none",
                 log_dir: str | None = None, memory_budget: int | None = None,
                 adapter_dir: str | None = None, base_eval: BaseEvaluation | None = None,
                 parallel=None) -> None:
        self.config = config = resolve(case.config, source.defaults, device)
        self.case_id = case_id
        self.source = source
        self.tokens_for = tokens_for
        self.device = device
        self.report_to = report_to
        self.log_dir = log_dir
        self.adapter_dir = adapter_dir
        self.parallel = parallel
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
        self.model = self.trainer = self.step_runner = self.tokens = self.collate = None
        self.tensors: TensorMeter | None = None
        self.eos_token_id = None
        self.base_eval = base_eval
        self.started = 0.0
        self._current_phase: tuple[str, float] | None = None

    # ----- phases ------------------------------------------------------------
    def prepare(self) -> None:
        from transformers import set_seed

        with self._guard():
            config, result = self.config, self.result
            set_seed(config.seed)
            self._record_load("start")
            self._phase("load", f"loading {self.source.spec} ({config.quant}, {config.dtype}, {config.method})")
            self.tokens = self.tokens_for(config)
            self._start_meters()
            loaded = load_model(self.source, config, self.device)
            self.model = apply_adapter(loaded.model, config)
            if self.parallel is not None:  # FSDP: each rank keeps its shard (weights_mib is the shard's)
                self.model = self.parallel.shard(self.model)
            result.set("load_s", loaded.load_s, source="wall clock around from_pretrained (load + quantize)")
            _record_model(result, self.model)
            self.collate = collator(loaded.tokenizer)
            self.eos_token_id = loaded.tokenizer.eos_token_id
            self._phase("eval_before", "evaluating the base model" if self.base_eval is None
                        else "reusing this session's evaluation of the same base")
            if self.base_eval is None:
                held_out = eval_loss(self.model, self.tokens.eval, self.collate, batch_size=config.batch_size,
                                     device=self.device, eos_token_id=self.eos_token_id)
                self.base_eval = BaseEvaluation(held_out, self._reference_loss())
                shared = "measured in this case"
            else:
                shared = "shared: measured once per model, data set and base (quantization, dtype, length, batch)"
            result.set("eval_loss_before", self.base_eval.held_out.loss, source=shared)
            record_accuracy(result, self.base_eval.held_out, has_answers=self.tokens.task.has_answers,
                            seq_len=config.seq_len, stage="_before")
            self._phase("train", f"training {config.steps} steps")
            self.trainer = make_trainer(self.model, loaded.tokenizer, self.tokens.train, self.collate, config,
                                        self.device, self.report_to, self.log_dir)
            if self.parallel is not None:  # DDP: the Trainer's steps go through the wrapper that all-reduces
                self.trainer.model_wrapped = self.parallel.wrap(self.model)
            self.step_runner = StepRunner(self.trainer, on_step_end=self._on_step_end,
                                     divergence=DivergenceRule.of(config))
            self.tensors = TensorMeter(self.model, self.trainer.optimizer, self.device, config.warmup_steps,
                                       off=self.parallel.tensor_reason if self.parallel is not None else "")
            self.started = time.perf_counter()

    def step(self) -> float:
        with self._guard():
            return self.tensors.run(self.step_runner.step)

    def control(self) -> None:
        """Time the control workload just before the next step (:mod:`lorabench.control`)."""
        with self._guard():
            self.step_runner.control()

    def finish(self) -> CaseResult:
        with self._guard():
            config, result = self.config, self.result
            while self.step_runner.steps_done < config.steps:  # where the timer ran fewer (pytest-benchmark disabled)
                self.tensors.run(self.step_runner.step)
            train_s = time.perf_counter() - self.started
            self.step_runner.end()
            _record_memory(result, self._stop_meters(), self.step_runner, self.trainer, self.on_cuda)
            record_prediction(result, self.source, config, self.tensors, self.step_runner.record.shapes, self.device)
            record_speed(result, self.step_runner, config, train_s, self.model, self.device)
            self._phase("eval_after", "evaluating the trained model")
            after = eval_loss(self.model, self.tokens.eval, self.collate, batch_size=config.batch_size,
                              device=self.device, eos_token_id=self.eos_token_id)
            _record_quality(result, self.step_runner, after)
            record_accuracy(result, after, has_answers=self.tokens.task.has_answers, seq_len=config.seq_len)
            _record_task_change(result, self.base_eval.reference, self._reference_loss())
            # last: it saves, reloads and merges the adapter, so every other figure comes from the trained model itself
            if self.parallel is None:
                self._phase("adapter_check", "saving, reloading and merging the adapter")
                check_case_adapter(result, self.model, self.source, config, self.device, self.tokens.eval,
                                   self.collate, self.adapter_dir)
            else:
                record_adapter(result, None, reason=self.parallel.adapter_reason)
            self._phase(None, "")
            self._record_load("end")
            self._judge_budget()
        self.close()
        return self.result

    def close(self) -> None:
        """Drop the model and everything that holds device memory."""
        if self.tensors is not None:
            self.tensors.close()
        self.model = self.trainer = self.step_runner = None
        gc.collect()
        if self.on_cuda:
            import torch

            torch.cuda.empty_cache()
        if not self.on_cuda:
            reason = f"the case ran on {self.device.type}, not CUDA"
            for name, why in cuda_only_absent(reason).items():
                self.result.absent.setdefault(name, why)

    # ----- helpers -------------------------------------------------------------
    def _record_load(self, when: str) -> None:
        """The machine's 1-minute load average, so a reader knows what else competed for the cores."""
        if hasattr(os, "getloadavg"):
            self.result.environment[f"load_avg_1m_{when}"] = round(os.getloadavg()[0], 2)

    def _phase(self, name: str | None, what: str) -> None:
        """End the current phase (its wall time becomes ``phase_<name>_s``) and start the next one."""
        now = time.perf_counter()
        if self._current_phase is not None:
            done, since = self._current_phase
            self.result.set(f"phase_{done}_s", now - since, source="wall clock of the phase (informational)")
        self._current_phase = (name, now) if name else None
        if name:
            log.info("%s: %s", self.case_id, what)

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
        if step % max(1, steps // 10) == 0 or step == steps:
            seconds = self.step_runner.record.seconds
            eta = statistics.median(seconds) * (steps - step)
            log.info("%s: step %d/%d loss %.4f elapsed %.1f s, training ETA %.0f s", self.case_id, step, steps,
                     self.step_runner.record.losses[-1], time.perf_counter() - self.started, eta)

    @contextlib.contextmanager
    def _guard(self):
        """Turn out-of-memory and divergence into :class:`CaseAborted` with the partial result."""
        try:
            yield
        except DivergenceError as exc:
            self.result.details["diverged_at_step"] = exc.step
            self._abort(STATUS_DIVERGED, f"{exc} (configuration {self.config.id})")
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
        _record_partial(result, self.step_runner)
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
        timer(run.step, run.config.steps - warmup, warmup, run.control)
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


def record_speed(result: CaseResult, runner: StepRunner, config: BenchConfig, train_s: float, model, device) -> None:
    """Wall-clock speed (informational under load), and the step time against the control (gated)."""
    from lorabench.control import paired_ratios, ratio_in_cpu_time

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
               source="median time of the fixed control workload run before each step (lorabench.control)")
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
    _record_flops(result, rec, w, model, config, device)


def _record_flops(result: CaseResult, rec, warmup: int, model, config: BenchConfig, device) -> None:
    """MFU (PaLM's model FLOPs) and HFU (with recompute) against the GPU's dense peak for the dtype."""
    from lorabench.flops import matmul_params, model_shape, peak_flops, training_flops

    if device.type != "cuda":
        for name in ("mfu_pct", "hfu_pct"):
            result.set(name, None, reason=f"no peak FLOP/s for a {device.type} device: MFU is measured on CUDA GPUs")
        return
    import torch

    name = torch.cuda.get_device_name(device)
    peak = peak_flops(name, config.dtype)
    if peak is None:
        reason = f"no dense {config.dtype} peak FLOP/s known for {name!r} (lorabench.flops.GPU_PEAK_FLOPS)"
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


def _record_quality(result: CaseResult, runner: StepRunner, after) -> None:
    losses = runner.record.losses
    result.loss_curve = list(losses)
    record_train_loss(result, losses)
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
