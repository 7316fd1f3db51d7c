"""Training, one optimizer step at a time, with the ``transformers.Trainer`` doing the work.

The Trainer builds the optimizer (``adamw_torch``, bitsandbytes' ``adamw_bnb_8bit`` and
``paged_adamw_8bit``), the scheduler, the data loader and the forward/backward pass
(``Trainer.training_step``). :class:`StepRunner` drives those pieces one optimizer step
per call, so that pytest-benchmark can time each real step as one round, and the
Trainer's callbacks (TensorBoard, W&B) still receive every step's loss through
``Trainer.log``.
"""

from __future__ import annotations

import os
import math
import tempfile
import time
from dataclasses import dataclass, field

from lorabench.config import BenchConfig
from lorabench.meters.control import ControlWorkload
from lorabench.meters.footprint import grad_bytes

# Deferred imports: torch, transformers inside the functions that use them: what only reads a configuration
# or a stored run starts without them.

TRAINER_OPTIMIZERS = {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}
MAX_GRAD_NORM = 1.0
TRAINER_DIR_PREFIX = "lorabench-trainer-"


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite, or broke a :class:`DivergenceRule`."""

    def __init__(self, step: int, loss: float, reason: str | None = None) -> None:
        super().__init__(f"training diverged: {reason or f'loss is {loss}'} at step {step}")
        self.step = step
        self.loss = loss


@dataclass(frozen=True)
class DivergenceRule:
    """When a finite loss still counts as diverged, measured against the first step's loss.

    Args:
        factor: a step whose loss exceeds ``factor`` times the first step's has diverged.
        window: the run has diverged when the loss stays at or above the first step's for
            ``window`` consecutive steps (it never fell, or it climbed back); 0 turns this off.
    """

    factor: float
    window: int

    @classmethod
    def of(cls, config: BenchConfig) -> DivergenceRule:
        return cls(config.divergence_factor, config.divergence_window)

    def check(self, losses: list[float]) -> str | None:
        """Why the run has diverged at its latest step, or ``None`` while it has not."""
        first, loss, step = losses[0], losses[-1], len(losses)
        if not math.isfinite(first) or first <= 0:
            return None  # a loss of 0 leaves nothing to measure against
        if loss > self.factor * first:
            return (f"loss {loss:.4g} is above {self.factor:g} x the first step's {first:.4g} "
                    f"(divergence_factor={self.factor:g})")
        if self.window and step >= self.window and min(losses[-self.window:]) >= first:
            return (f"loss has not fallen below the first step's {first:.4g} over steps {step - self.window + 1}-{step} "
                    f"(divergence_window={self.window})")
        return None


@dataclass
class StepRecord:
    """What each optimizer step took and gave."""

    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)  # the process's CPU time (all threads) per step
    control_seconds: list[float] = field(default_factory=list)  # the control workload timed before each step
    control_cpu_seconds: list[float] = field(default_factory=list)  # the process's CPU time over each control
    losses: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    shapes: list[tuple[int, int]] = field(default_factory=list)  # padded (batch, length) of each step's largest micro-batch


def make_trainer(model, tokenizer, train_dataset, collate, config: BenchConfig, device, report_to: str = "none",
                 log_dir: str | None = None):
    """A Trainer set up for ``config``; its optimizer and scheduler are created here.

    Args:
        report_to: the Trainer integrations that receive every step's loss (``none``, ``tensorboard``, ``wandb``).
        log_dir: where the integrations write (TensorBoard event files, W&B's offline run); if ``None``, the
            Trainer's temporary output directory, removed when training ends.
    """

    from transformers import PrinterCallback, Trainer, TrainingArguments

    if log_dir is not None and report_to != "none":
        os.environ["TENSORBOARD_LOGGING_DIR"] = log_dir  # read when the TensorBoard callback is built
        os.environ["WANDB_DIR"] = log_dir  # W&B's offline run goes beside it, one per case
        os.makedirs(log_dir, exist_ok=True)  # W&B writes into WANDB_DIR but does not create it
    # The Trainer wants an output directory though nothing is saved there (save_strategy "no"): one that
    # StepRunner.end removes, and the object's finalizer where a trainer is dropped without ending.
    output_dir = tempfile.TemporaryDirectory(prefix=TRAINER_DIR_PREFIX)
    args = TrainingArguments(
        output_dir=output_dir.name,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        max_steps=config.steps,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        optim=TRAINER_OPTIMIZERS[config.optimizer],
        logging_steps=1,
        report_to=report_to,
        run_name=config.id,
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=device.type == "cpu",
        bf16=False,  # weights already sit in the configured dtype; no autocast on top
        fp16=False,
        save_strategy="no",
        eval_strategy="no",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=collate,
        processing_class=tokenizer,
    )
    # Progress goes through the lorabench.run.progress logger; the Trainer's printer would break pytest's output.
    trainer.remove_callback(PrinterCallback)
    trainer.create_optimizer_and_scheduler(num_training_steps=config.steps)
    trainer.lorabench_output_dir = output_dir
    return trainer


class StepRunner:
    """Runs optimizer steps of a Trainer, one per :meth:`step` call, and records each one.

    Args:
        trainer: from :func:`make_trainer`.
        on_step_end: called after every step with the step number (1-based); meters sample here.
        divergence: when a finite loss counts as diverged; ``None`` stops only on NaN or infinity.
        compute_dtype: the steps' compute dtype, which the control workload computes in (fp32 if ``None``).
    """

    def __init__(self, trainer, *, on_step_end=None, divergence: DivergenceRule | None = None,
                 compute_dtype=None) -> None:

        self.trainer = trainer
        self.model = trainer.model_wrapped  # the model itself, or its DistributedDataParallel wrapper
        self.device = trainer.args.device
        self.grad_accum = trainer.args.gradient_accumulation_steps
        self.record = StepRecord()
        self.on_step_end = on_step_end
        self.divergence = divergence
        self.grad_bytes_seen: int | None = None
        self._batches = self._endless(trainer.get_train_dataloader())
        self._control = ControlWorkload(self.device, compute_dtype)
        trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)

    @staticmethod
    def _endless(loader):
        while True:  # a new epoch whenever the data runs out
            yield from loader

    @property
    def steps_done(self) -> int:
        return len(self.record.losses)

    def control(self) -> None:
        """Time the control workload once; call it just before each :meth:`step` (untimed by the step timer)."""
        timed = self._control.run()
        self.record.control_seconds.append(timed.wall_s)
        self.record.control_cpu_seconds.append(timed.cpu_s)

    def step(self) -> float:
        """One optimizer step: ``grad_accum`` forward/backward passes, clip, update. Returns the loss."""
        import torch


        trainer, model = self.trainer, self.model
        if len(self.record.control_seconds) == self.steps_done:  # every step gets its control
            self.control()
        cpu_started = time.process_time()
        started = time.perf_counter()
        batches, num_items = trainer.get_batch_samples(self._batches, self.grad_accum, self.device)
        trainer.current_gradient_accumulation_steps = len(batches)
        loss = torch.zeros((), device=self.device)
        tokens = torch.zeros((), dtype=torch.long, device=self.device)
        samples = 0
        shape = (0, 0)
        for inputs in batches:
            shape = max(shape, tuple(inputs["input_ids"].shape), key=lambda s: s[0] * s[1])
            tokens += inputs["attention_mask"].sum()
            samples += int(inputs["input_ids"].shape[0])
            loss += trainer.training_step(model, inputs, num_items)
        trainer.accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        if self.grad_bytes_seen is None:  # gradients have the same size every step
            self.grad_bytes_seen = grad_bytes(model)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad(set_to_none=True)
        value = float(loss)  # a host sync: the step's GPU work is finished here
        tokens = int(tokens)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        step_number = self.steps_done + 1
        rec = self.record
        rec.seconds.append(elapsed)
        rec.cpu_seconds.append(cpu)
        rec.losses.append(value)
        rec.tokens.append(tokens)
        rec.samples.append(samples)
        rec.shapes.append(shape)
        trainer.state.global_step = step_number
        trainer.state.epoch = sum(rec.samples) / max(1, len(trainer.train_dataset))  # Trainer.log reports it
        trainer.log({"loss": value, "learning_rate": trainer.lr_scheduler.get_last_lr()[0]})
        if not math.isfinite(value):
            raise DivergenceError(step_number, value)
        reason = self.divergence.check(rec.losses) if self.divergence is not None else None
        if reason:
            raise DivergenceError(step_number, value, reason)
        if self.on_step_end is not None:
            self.on_step_end(step_number)
        return value

    def run_until(self, total_steps: int, step=None) -> None:
        """Step until ``total_steps`` are done (after a timer that ran fewer); ``step`` wraps :meth:`step`
        (a tensor meter's tracking)."""
        while self.steps_done < total_steps:
            (step or self.step)()

    def end(self) -> None:
        """Time the control once more (it brackets the last step), and tell the Trainer's callbacks that
        training is over (integrations flush and close here)."""
        self.control()
        self.trainer.callback_handler.on_train_end(self.trainer.args, self.trainer.state, self.trainer.control)
        self.trainer.lorabench_output_dir.cleanup()


def simple_timer(step, rounds: int, warmup_rounds: int, control=None) -> None:
    """Run warm-up then measured steps without pytest-benchmark (library use, tests),
    each after its ``control`` where one is given."""
    for _ in range(warmup_rounds + rounds):
        if control is not None:
            control()
        step()
