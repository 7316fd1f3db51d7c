"""The first line of a run: what will run and how long it should take."""

from __future__ import annotations

import pytest

from lorabench.run.progress import ZOO_FIXED_CONTROLS, ZOO_PRETRAIN_STEP_CONTROLS, ZOO_STEP_CONTROLS, \
    estimate_from_control, estimate_from_history, estimate_zoo_builds, plan_line, with_builds
from pathlib import Path

from lorabench.storage.history import StoredRun
from lorabench.result import CaseResult


def run(*results: CaseResult, number: int) -> StoredRun:
    return StoredRun(path=Path(f"{number:04d}_x.json"), number=number, name="x", datetime="", commit={"id": "abc"},
                     machine={}, results={r.case_id: r for r in results})


def test_estimate_from_control_scales_steps_and_fixed_work():
    assert estimate_from_control([10, 20], 0.01) == pytest.approx((30 * ZOO_STEP_CONTROLS + 2 * ZOO_FIXED_CONTROLS) * 0.01)


def test_a_zoo_model_not_cached_yet_adds_its_build_to_the_estimate():
    builds = estimate_zoo_builds([600], 0.01)
    assert builds == 600 * ZOO_PRETRAIN_STEP_CONTROLS * 0.01
    seconds, source = with_builds((100.0, "stored run 0003_x"), builds, ["tiny-llama"])
    assert seconds == 100.0 + builds and source.endswith(", plus the build of tiny-llama, not cached yet")
    assert with_builds((100.0, "stored run"), builds, []) == (100.0, "stored run")
    assert with_builds(None, builds, ["tiny-llama"]) is None


def test_estimate_from_history_sums_the_phases_of_the_latest_run_holding_every_case(tmp_path, monkeypatch):
    def case(case_id, seconds):
        r = CaseResult(case_id=case_id, config_id=case_id, model="m", dataset="d", device="cpu", config={})
        r.metrics.update({"phase_train_s": seconds, "phase_load_s": 1.0, "step_ms": 99.0})
        return r

    runs = [run(case("a", 10.0), case("b", 20.0), number=1), run(case("a", 5.0), number=2)]
    monkeypatch.setattr("lorabench.run.progress.load_runs", lambda storage: runs)
    tmp_path.mkdir(exist_ok=True)
    assert estimate_from_history(tmp_path, ["a", "b"]) == (32.0, "stored run 0001_x (abc)")
    assert estimate_from_history(tmp_path, ["a"])[0] == 6.0  # the latest run holding it
    assert estimate_from_history(tmp_path, ["c"]) is None
    assert estimate_from_history(None, ["a"]) is None


def test_plan_line_says_cases_device_dtype_and_time():
    line = plan_line(case_ids=["full", "lora"], models=["tiny-llama"], datasets=["digit-reverse"], device="cpu",
                     dtypes=["fp32"], isolate="process", estimate=(150.0, "stored run 0003_x"))
    assert line == ("lorabench: 2 case(s) [full, lora] on tiny-llama x digit-reverse, cpu in fp32, isolation process; "
                    "expected about 2.5 min (from stored run 0003_x)")
    assert "no estimate" in plan_line(case_ids=["a"], models=["m"], datasets=["d"], device="cpu", dtypes=["bf16"],
                                      isolate="none", estimate=None)


def test_the_estimate_counts_every_seed_and_spreads_over_the_workers():
    from lorabench.run.progress import for_run

    assert for_run((120.0, "stored run 0003_x"), seeds=3) == (360.0, "stored run 0003_x, x 3 seeds")
    seconds, source = for_run((120.0, "stored run 0003_x"), seeds=3, workers=2)
    assert seconds == 180.0 and source.endswith("x 3 seeds, over 2 workers if they share the work evenly")
    assert for_run((120.0, "s"), seeds=1, workers=1) == (120.0, "s")
    assert for_run(None, seeds=3, workers=2) is None


def _controller(tmp_path, workers: int, **options):
    from types import SimpleNamespace

    from lorabench.pytest_plugin.hooks import SESSION_KEY
    from lorabench.pytest_plugin.session import open_session

    bench = open_session(root=tmp_path, **options)
    return SimpleNamespace(option=SimpleNamespace(numprocesses=workers), stash={SESSION_KEY: bench})


def test_under_n_the_controller_prints_the_plan_with_workers_and_seeds(tmp_path, monkeypatch):
    from lorabench.pytest_plugin import scaleout as plugin

    monkeypatch.setattr(plugin.scaleout, "cpu_cores", lambda: 2)
    config = _controller(tmp_path, 2, seeds="3")
    ids = ["bench/test_finetune.py::test_finetune[lora]", "bench/test_finetune.py::test_finetune[qlora_nf4]",
           "bench/test_inference.py::test_generation[infer_base]"]
    (line,) = plugin._controller_plan(config, ids)  # 2 workers on 2 cores: no warning
    assert line.startswith("lorabench: 2 case(s) [lora, qlora_nf4] on tiny-llama x digit-reverse")
    assert "x 3 seeds, over 2 workers if they share the work evenly" in line
    config = _controller(tmp_path, 2)
    (line,) = plugin._controller_plan(config, ids[:1])
    assert "over" not in line.split("expected", 1)[1]  # one case: the second worker has nothing to share


def test_more_workers_than_cores_is_warned(tmp_path, monkeypatch):
    from lorabench.pytest_plugin import scaleout as plugin

    monkeypatch.setattr(plugin.scaleout, "cpu_cores", lambda: 2)
    lines = plugin._controller_plan(_controller(tmp_path, 4), [])
    assert lines == ["lorabench: warning: -n 4 starts more pytest-xdist workers than the 2 core(s) this run may "
                     "use; cases compete for cores, so each runs slower and its wall-clock figures are not "
                     "comparable with a run of -n 2 or fewer"]
