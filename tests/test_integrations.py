"""The Trainer's integrations get the benchmark's figures, one log directory per run; a case leaves no
temporary directory behind."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from lorabench.training import integrations
from lorabench.case_kinds import DEFAULT_KIND
from lorabench.config import BenchConfig
from lorabench.errors import ConfigError
from lorabench.run.launch import InlineLauncher, resolve_case
from lorabench.kinds.protocol import RunOptions, measure
from lorabench.pytest_plugin.session import open_session
from lorabench.training.loop import TRAINER_DIR_PREFIX


def _case_run(source, device, report_to="none", log_dir=None, **fields):
    case = resolve_case(DEFAULT_KIND, case_id="lora", model="tiny-llama", dataset="digit-reverse", device=device,
                        config=BenchConfig("lora", **fields), source=source,
                        options=RunOptions(report_to=report_to, log_dir=log_dir))
    return InlineLauncher().start(case)


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """tempfile's folder pointed at an empty directory, so what a case leaves there can be counted."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_a_case_leaves_no_trainer_directory_in_the_temp_folder(tiny_llama, cpu, private_tmp):
    result = measure(_case_run(tiny_llama, cpu, steps=3, warmup_steps=1))
    assert result.status == "ok"
    assert not list(private_tmp.glob(f"{TRAINER_DIR_PREFIX}*"))


def test_a_diverged_case_leaves_no_trainer_directory_either(tiny_llama, cpu, private_tmp):
    # lr 1e6 sends the loss up within a few steps; divergence_factor 1.01 calls it at once
    result = measure(_case_run(tiny_llama, cpu, steps=6, warmup_steps=1, lr=1e6, divergence_factor=1.01))
    assert result.status == "diverged"
    assert not list(private_tmp.glob(f"{TRAINER_DIR_PREFIX}*"))


def test_tensorboard_event_files_hold_the_benchmark_metrics_and_hparams(tiny_llama, cpu, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "run" / "lora"
    result = measure(_case_run(tiny_llama, cpu, report_to="tensorboard", log_dir=str(log_dir), steps=4,
                               warmup_steps=1))
    assert result.status == "ok"
    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for metric in ("eval_loss", "step_ms", "tokens_per_s", "train_loss_final"):
        assert metric in result.metrics
        (event,) = events.Scalars(f"lorabench/{metric}")
        assert event.value == pytest.approx(result.metrics[metric], rel=1e-6) and event.step == 4
    # every measured figure, and nothing that was not measured
    assert {t for t in tags if t.startswith("lorabench/")} == {f"lorabench/{m}" for m in result.metrics}
    # the Trainer's curve, with the epoch moving (4 steps of batch 8 over the task's training rows)
    assert len(events.Scalars("train/loss")) == 4
    epochs = [e.value for e in events.Scalars("train/epoch")]
    assert epochs[0] > 0 and epochs == sorted(epochs) and epochs[-1] > epochs[0]
    # the HParams plugin's session: the configuration's fields beside the final figures
    hparams = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    start = hparams["_hparams_/session_start_info"]
    assert b"rank" in start and b"tiny-llama" in start and b"digit-reverse" in start


def test_hyper_parameters_are_scalars_with_the_model_and_data_set(tiny_llama, cpu):
    run = _case_run(tiny_llama, cpu, steps=4, warmup_steps=1)
    values = integrations.hyper_parameters(run.result)
    assert values["model"] == "tiny-llama" and values["dataset"] == "digit-reverse"
    assert values["rank"] == run.config.rank
    assert all(isinstance(v, (str, int, float, bool)) for v in values.values())


def test_a_missing_integration_package_is_refused_before_training_with_its_install_command(monkeypatch, tmp_path):
    real = integrations.importlib.util.find_spec
    monkeypatch.setattr(integrations.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"--report-to wandb: the wandb package is not installed; "
                                          r"install it with `python -m pip install 'lorabench\[wandb\]'`"):
        open_session(root=tmp_path, report_to="wandb")
    open_session(root=tmp_path, report_to="tensorboard")  # installed here (the test extra)


def test_each_run_logs_into_its_own_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv(integrations.RUN_NAME_ENV, raising=False)
    first = open_session(root=tmp_path, report_to="tensorboard")
    monkeypatch.setattr(integrations.time, "strftime", lambda fmt: "later")
    second = open_session(root=tmp_path, report_to="tensorboard")
    assert Path(first.log_dir("lora")).parent != Path(second.log_dir("lora")).parent
    assert Path(first.log_dir("lora")).parent.parent == tmp_path / "reports" / "runs"
    # a pytest-xdist worker logs beside its controller's other cases
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    assert open_session(root=tmp_path, report_to="tensorboard").log_run == second.log_run


def test_wandb_gets_the_hyper_parameters_in_its_config_and_the_figures_in_its_summary(tiny_llama, cpu, monkeypatch):
    """W&B itself is an optional extra; a stand-in module records what lorabench hands the live run."""
    import sys
    from types import SimpleNamespace

    sent = {"config": {}, "summary": {}, "finished": 0}
    run = SimpleNamespace(config=SimpleNamespace(update=lambda d, allow_val_change: sent["config"].update(d)),
                          summary=SimpleNamespace(update=sent["summary"].update))
    stand_in = SimpleNamespace(run=run, finish=lambda: sent.update(finished=sent["finished"] + 1))
    monkeypatch.setitem(sys.modules, "wandb", stand_in)
    result = _case_run(tiny_llama, cpu, steps=4, warmup_steps=1).result
    result.metrics.update({"eval_loss": 0.5, "tensor_peak_mib": 18.2})
    integrations.publish("wandb", "unused", result, step=4)
    assert sent["config"] == integrations.hyper_parameters(result) and sent["config"]["model"] == "tiny-llama"
    assert sent["summary"] == {"lorabench/eval_loss": 0.5, "lorabench/tensor_peak_mib": 18.2}
    assert sent["finished"] == 1  # the next case in this process starts its own run
