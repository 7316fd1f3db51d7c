"""Fine-tuning one case end to end: load, adapt, train with meters attached, evaluate, record.

:class:`TrainingRun` is what every training kind shares through the case protocol
(:mod:`lorabench.kinds.protocol`): the memory meters and budget, the Trainer driven one optimizer step
at a time, live tensor bytes, the memory record, and turning out-of-memory and divergence into a
partial result. :class:`CaseRun` is fine-tuning a causal LM on it (the matrix's kind);
:class:`lorabench.kinds.classify.ClassifyRun` is sentence classification on it. Neither knows pytest
nor where it runs: :mod:`lorabench.run.launch` resolves the case, builds its data and runs it in this
process, a case process or torchrun's ranks, and :func:`lorabench.kinds.protocol.measure` drives it with
a timer (pytest-benchmark's ``pedantic`` in the suite, :func:`lorabench.training.loop.simple_timer` elsewhere).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

from lorabench.models.adapters import check_case_adapter, record_adapter
from lorabench.evaluation.accuracy import record_accuracy
from lorabench.meters.budget import MemoryBudget
from lorabench.config import BenchConfig
from lorabench.data.tasks import TaskData, collator, load_task_data, tokenize
from lorabench.meters.environment import machine
from lorabench.estimate.case import record_prediction
from lorabench.meters.memory import Meters, RssMeter, cuda_meter
from lorabench.models.loading import apply_adapter, load_model, load_tokenizer
from lorabench.backends.precision import torch_dtype
from lorabench.kinds.protocol import CaseAborted, ResolvedCase
from lorabench.evaluation.heldout import eval_loss
from lorabench.training.recording import record_memory, record_model, record_speed, record_train_loss
from lorabench.result import STATUS_DIVERGED, STATUS_DOES_NOT_FIT, CaseResult
from lorabench.meters.tensor_meter import TensorMeter
from lorabench.training.integrations import publish
from lorabench.training.loop import DivergenceError, DivergenceRule, StepRunner, make_trainer
import torch

# Deferred imports: transformers inside the functions that use them: what only reads a configuration or a
# stored run starts without them.

log = logging.getLogger("lorabench.progress")

# Reference rows scored for forgetting, before and after training: two extra eval passes per
# case, so a subset keeps them cheap (128 rows, 640 scored tokens on the embedded task).
REFERENCE_EXAMPLES = 128


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
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError))


class TrainingRun:
    """A training case in the protocol's phases: the part every training kind shares.

    ``prepare`` starts the meters, loads the kind's model (:meth:`_load`), evaluates it before training
    (:meth:`_evaluate_before`) and builds the Trainer; ``step`` runs one optimizer step with live tensor
    bytes tracked over the warm-up; ``finish`` completes any steps the timer did not run, stops the
    meters, records memory and hands over to the kind's records (:meth:`_record_trained`). A phase that
    runs out of memory or diverges raises :class:`lorabench.kinds.protocol.CaseAborted` with the partial
    result; any other error propagates.

    Args:
        case: the resolved case; ``case.data`` has ``train`` and ``eval`` splits, tokenized.
    """

    divergence = True  # stop on a loss that breaks the configuration's DivergenceRule (else only NaN/inf)

    def __init__(self, case: ResolvedCase) -> None:
        self.case = case
        self.config = config = case.config
        self.case_id = case.case_id
        self.source = case.source
        self.device = device = case.device
        self.options = options = case.options
        self.parallel = options.parallel
        self.cpu_threads = options.cpu_threads if device.type == "cpu" else None
        self._threads_before: int | None = None
        self.on_cuda = device.type == "cuda"
        self.result = self._new_result()
        self.rss = RssMeter()  # also the memory budget's baseline
        self.meters = Meters(self.rss, cuda_meter(device))
        self.budget = MemoryBudget(options.memory_budget, device) if options.memory_budget else None
        if self.budget:
            self.result.environment["memory_budget_mib"] = self.budget.limit_mib
        self.model = self.trainer = self.step_runner = self.tokens = self.collate = None
        self.tensors: TensorMeter | None = None
        self.base_eval = options.base_eval
        self.outputs = None
        self.rounds, self.warmup_rounds = config.steps - config.warmup_steps, config.warmup_steps
        self.started = 0.0

    # ----- what a kind says --------------------------------------------------
    def _new_result(self) -> CaseResult:
        raise NotImplementedError

    def _before_load(self) -> None:
        """Anything before the meters start (seeds, threads)."""

    def _load(self):
        """The kind's model, ready to train (adapter attached): ``(model, tokenizer, load seconds)``."""
        raise NotImplementedError

    def _collator(self, tokenizer):
        raise NotImplementedError

    def _evaluate_before(self) -> None:
        """Evaluate the model before training, into the record."""

    def _record_trained(self, train_s: float) -> None:
        """The kind's records after training (speed, quality), with the meters stopped."""
        raise NotImplementedError

    # ----- phases ------------------------------------------------------------
    def prepare(self) -> None:
        with self._guard():
            config = self.config
            self._before_load()
            self.tokens = self.case.data
            self._start_meters()
            self.model, tokenizer, load_s = self._load()
            record_model(self.result, self.model, load_s=load_s, **self._model_record())
            self.collate = self._collator(tokenizer)
            self._evaluate_before()
            self._phase("train", f"training {config.steps} steps")
            self.trainer = make_trainer(self.model, tokenizer, self.tokens.train, self.collate, config,
                                        self.device, self.options.report_to, self.options.log_dir)
            if self.parallel is not None:  # DDP: the Trainer's steps go through the wrapper that all-reduces
                self.trainer.model_wrapped = self.parallel.wrap(self.model)
            self.step_runner = StepRunner(self.trainer, on_step_end=self._on_step_end,
                                          divergence=DivergenceRule.of(config) if self.divergence else None,
                                          compute_dtype=torch_dtype(config.dtype))
            self.tensors = TensorMeter(self.model, self.trainer.optimizer, self.device, config.warmup_steps,
                                       off=self.parallel.tensor_reason if self.parallel is not None else "")
            self.meters.add(self.tensors)
            self.started = time.perf_counter()

    def step(self) -> float:
        with self._guard():
            return self.tensors.run(self.step_runner.step)

    def control(self) -> None:
        """Time the control workload just before the next step (:mod:`lorabench.meters.control`)."""
        with self._guard():
            self.step_runner.control()

    def finish(self) -> CaseResult:
        with self._guard():
            # where the timer ran fewer (pytest-benchmark disabled)
            self.step_runner.run_until(self.config.steps, lambda: self.tensors.run(self.step_runner.step))
            train_s = time.perf_counter() - self.started
            self.step_runner.end()
            record_memory(self.result, self._stop_meters(), self.step_runner, self.trainer, self.on_cuda)
            self._record_trained(train_s)
        self.close()
        return self.result

    def close(self) -> None:
        """Drop the model and everything that holds device memory."""
        if self.tensors is not None:
            self.tensors.close()
        self.model = self.trainer = self.step_runner = None
        if self._threads_before is not None:  # in the pytest process (--isolate none), the next case starts as it was

            torch.set_num_threads(self._threads_before)
            self._threads_before = None
        gc.collect()
        if self.on_cuda:
            torch.cuda.empty_cache()

    # ----- helpers -------------------------------------------------------------
    def _model_record(self) -> dict:
        """Keyword arguments of :func:`lorabench.training.recording.record_model` for this kind."""
        return {}

    def _phase(self, name: str | None, what: str) -> None:
        """A phase boundary; fine-tuning times and logs its phases, other kinds need not."""

    def _start_meters(self) -> None:
        self.meters.start()
        if self.budget:
            self.budget.start(self.rss.before)

    def _stop_meters(self):
        if self.budget:
            self.budget.stop()
        return self.meters.stop()

    def _on_step_end(self, step: int) -> None:
        self.meters.sample()

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
        if self.meters.running:
            for reading in self._stop_meters():
                result.merge(reading)
        _record_partial(result, self.step_runner)
        self.close()
        raise CaseAborted(result) from None


class CaseRun(TrainingRun):
    """Fine-tuning a causal LM (the matrix's kind, ``finetune``): the configuration's base, quantized by its
    backend, with its adapter (or every weight) trained; then held-out loss, accuracy, forgetting, the
    memory model's prediction and the adapter's save/reload/merge check.

    Args:
        case: the resolved case (:func:`lorabench.run.launch.resolve_case`); ``case.data`` is its
            :class:`TokenizedTask`, ``case.options`` its :class:`lorabench.kinds.protocol.RunOptions`
            (``parallel``: this rank's part in a multi-process case, which shards and wraps the model).
    """

    @classmethod
    def data(cls, case: ResolvedCase) -> TokenizedTask:
        """The case's data set tokenized for its model and sequence length."""
        return tokenize_task(load_task_data(case.dataset), load_tokenizer(case.source), case.config.seq_len)

    def __init__(self, case: ResolvedCase) -> None:
        super().__init__(case)
        self.eos_token_id = None
        self._current_phase: tuple[str, float] | None = None

    def _new_result(self) -> CaseResult:
        case, config = self.case, self.config
        return CaseResult(case_id=case.case_id, config_id=config.id, model=case.model, dataset=case.dataset,
                          device=str(case.device), config=config.to_dict(), environment=dict(machine()))

    def _before_load(self) -> None:
        from transformers import set_seed

        config = self.config
        set_seed(config.seed)
        self._set_threads()
        self._record_load("start")
        self._phase("load", f"loading {self.source.spec} ({config.quant}, {config.dtype}, {config.method})")

    def _load(self):
        loaded = load_model(self.source, self.config, self.device)
        model = apply_adapter(loaded.model, self.config)
        if self.parallel is not None:  # FSDP: each rank keeps its shard (weights_mib is the shard's)
            model = self.parallel.shard(model)
        self.eos_token_id = loaded.tokenizer.eos_token_id
        return model, loaded.tokenizer, loaded.load_s

    def _collator(self, tokenizer):
        return collator(tokenizer)

    def _evaluate_before(self) -> None:
        config, result = self.config, self.result
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

    def _record_trained(self, train_s: float) -> None:
        config, result = self.config, self.result
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
                               self.collate, self.options.adapter_dir)
        else:
            record_adapter(result, None, reason=self.parallel.adapter_reason)
        self._phase(None, "")
        self._record_load("end")
        self._judge_budget()
        publish(self.options.report_to, self.options.log_dir, result, step=config.steps)

    # ----- helpers -------------------------------------------------------------
    def _set_threads(self) -> None:
        """Apply ``cpu_threads``; record the threads the steps run with."""

        if self.cpu_threads:
            if self._threads_before is None:
                self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.cpu_threads)
        self.result.environment["torch_threads"] = torch.get_num_threads()

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

    def _judge_budget(self) -> None:
        """A case whose measured peak passed the budget between two watchdog samples does not fit either."""
        if not self.budget:
            return
        peak = self.result.metrics.get("peak_alloc_mib" if self.on_cuda else "peak_rss_delta_mib")
        violation = self.budget.violation(peak)
        if violation:
            self.result.status, self.result.error = STATUS_DOES_NOT_FIT, violation

    def _on_step_end(self, step: int) -> None:
        self.meters.sample()
        steps = self.config.steps
        if step % max(1, steps // 10) == 0 or step == steps:
            seconds = self.step_runner.record.seconds
            eta = statistics.median(seconds) * (steps - step)
            log.info("%s: step %d/%d loss %.4f elapsed %.1f s, training ETA %.0f s", self.case_id, step, steps,
                     self.step_runner.record.losses[-1], time.perf_counter() - self.started, eta)


def _record_partial(result: CaseResult, runner: StepRunner | None) -> None:
    if runner is not None:
        result.loss_curve = list(runner.record.losses)
        result.step_ms_curve = [s * 1000 for s in runner.record.seconds]


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
