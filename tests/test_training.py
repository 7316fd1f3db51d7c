"""Training steps: real steps through the Trainer, honest counters, divergence caught."""

from __future__ import annotations

import math

import pytest

from lorabench.case_kinds import DEFAULT_KIND
from lorabench.config import BenchConfig, resolve
from lorabench.data.tasks import collator, load_task_data
from lorabench.run.launch import InlineLauncher, resolve_case
from lorabench.models.loading import apply_adapter, load_model, load_tokenizer
from lorabench.kinds.protocol import RunOptions
from lorabench.kinds.finetune import tokenize_task
from lorabench.training.loop import DivergenceError, StepRunner, make_trainer, simple_timer


def _runner(source, device, **fields):
    config = resolve(BenchConfig("t", **fields), source.defaults, device)
    tokenizer = load_tokenizer(source)
    tokens = tokenize_task(load_task_data("digit-reverse"), tokenizer, config.seq_len)
    model = apply_adapter(load_model(source, config, device).model, config)
    trainer = make_trainer(model, tokenizer, tokens.train, collator(tokenizer), config, device)
    return StepRunner(trainer), config


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "paged_adamw_8bit"])
def test_steps_count_samples_and_tokens_with_accumulation(tiny_llama, cpu, optimizer):
    runner, config = _runner(tiny_llama, cpu, steps=4, warmup_steps=1, batch_size=4, grad_accum=2, optimizer=optimizer)
    runner.run_until(3)
    rec = runner.record
    assert rec.samples == [8, 8, 8]
    # every row of the embedded task is "rev dddd=" + 4 digits + eos: 14 tokens, no padding counted
    assert rec.tokens == [8 * 14] * 3
    assert all(math.isfinite(x) and x > 0 for x in rec.losses)
    assert runner.grad_bytes_seen > 0
    assert runner.trainer.optimizer is not None


def test_divergence_names_the_step(tiny_llama, cpu):
    runner, _ = _runner(tiny_llama, cpu, steps=4, warmup_steps=1)
    runner.step()
    for p in runner.model.parameters():
        if p.requires_grad:
            p.data.fill_(float("nan"))
    with pytest.raises(DivergenceError, match="loss is nan at step 2"):
        runner.step()


def test_a_case_records_every_metric_or_why_not(tiny_llama, cpu):
    from lorabench.metrics import FINETUNE_METRICS

    case = resolve_case(DEFAULT_KIND, case_id="qlora_nf4", model="tiny-llama", dataset="digit-reverse", device=cpu,
                        config=BenchConfig("qlora_nf4", quant="nf4", double_quant=True, steps=6), source=tiny_llama)
    result = InlineLauncher().run(case)
    assert result.status == "ok"
    assert set(result.metrics) | set(result.absent) == FINETUNE_METRICS
    assert not set(result.metrics) & set(result.absent)
    assert all(reason for reason in result.absent.values())
    assert len(result.loss_curve) == 6 and len(result.step_ms_curve) == 6
    assert result.metrics["peak_rss_delta_mib"] >= result.metrics["weights_mib"] > 0
    assert result.environment["torch_version"]


def test_report_to_tensorboard_streams_every_step(tiny_llama, cpu, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = resolve(BenchConfig("t", steps=5, warmup_steps=1), tiny_llama.defaults, cpu)
    tokenizer = load_tokenizer(tiny_llama)
    tokens = tokenize_task(load_task_data("digit-reverse"), tokenizer, config.seq_len)
    model = apply_adapter(load_model(tiny_llama, config, cpu).model, config)
    trainer = make_trainer(model, tokenizer, tokens.train, collator(tokenizer), config, cpu,
                           report_to="tensorboard", log_dir=str(tmp_path))
    runner = StepRunner(trainer)
    runner.run_until(5)
    runner.end()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx(runner.record.losses, rel=1e-6)


def test_a_case_runs_its_steps_on_the_threads_asked_and_gives_them_back(tiny_llama, cpu):
    import torch

    case = resolve_case(DEFAULT_KIND, case_id="lora", model="tiny-llama", dataset="digit-reverse", device=cpu,
                        config=BenchConfig("lora", steps=4, warmup_steps=2), source=tiny_llama,
                        options=RunOptions(cpu_threads=1))
    before = torch.get_num_threads()
    seen = []

    def timer(step, rounds, warmup_rounds, control):
        seen.append(torch.get_num_threads())
        simple_timer(step, rounds, warmup_rounds, control)

    result = InlineLauncher().run(case, timer)
    assert seen == [1] and result.environment["torch_threads"] == 1
    assert torch.get_num_threads() == before  # the pytest process (--isolate none) is left as it was


def test_the_control_leaves_the_training_random_state_alone(cpu):
    import torch

    from lorabench.meters.control import ControlWorkload

    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    control = ControlWorkload(cpu, torch.bfloat16)
    control.run()
    assert torch.equal(torch.rand(3), expected)
    assert control.block.linear1.weight.dtype == torch.bfloat16 and control.block.linear1.weight.grad is None
