"""What a reader of stored runs refuses or skips: interrupted runs, values that are not finite numbers,
wrong types and unknown keys, a yardstick that moved, and outputs that cannot be written.

Every run here is built from the stored run in tests/data/stored-run.json (three cases of a real
bench run), edited as the adversary would; nothing trains.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from lorabench.commands.main import main
from lorabench.gates.compare import REGRESSED, UNCHANGED, Tolerances, compare_runs
from lorabench.errors import HistoryError
from lorabench.storage.history import INTERRUPTED_KEY, InterruptedRunError, read_run, select_run
from lorabench.result import INVALID_STORED, read_record

STORED = Path(__file__).parent / "data" / "stored-run.json"
MACHINE_DIR = "Linux-CPython-3.11-64bit"


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    """Messages on one line each: the commands fold their output to COLUMNS."""
    monkeypatch.setenv("COLUMNS", "1000")


def stored() -> dict:
    return json.loads(STORED.read_text())


def write(storage: Path, number: int, data: dict, name: str = "run") -> Path:
    path = storage / MACHINE_DIR / f"{number:04d}_{name}{number}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def record(data: dict, case_id: str) -> dict:
    return next(b["extra_info"] for b in data["benchmarks"] if b["extra_info"].get("case_id") == case_id)


def interrupted_legacy() -> dict:
    """What pytest-benchmark saved before the plugin marked interrupted runs: the case stopped by Ctrl-C
    has its two timed rounds and an empty extra_info, and no case had recorded a result yet."""
    data = stored()
    bench = data["benchmarks"][0]
    bench["extra_info"] = {}
    bench["stats"]["rounds"] = 2
    data["benchmarks"] = [bench]
    return data


def run_cli(*argv: str, capsys) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


# ----- interrupted runs ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["marked", "legacy"])
def test_an_interrupted_run_is_passed_over_by_compare_and_report_with_the_reason(kind, tmp_path, capsys):
    storage = tmp_path / "history"
    write(storage, 1, stored())
    write(storage, 2, stored())
    interrupted = {**stored(), INTERRUPTED_KEY: "stopped by Ctrl-C after 1 recorded case(s)"} if kind == "marked" \
        else interrupted_legacy()
    path = write(storage, 3, interrupted)

    with pytest.raises(InterruptedRunError, match="an interrupted run"):
        read_run(path)
    code, out = run_cli("compare", "--storage", str(storage), "--fail", capsys=capsys)
    assert code == 0, out
    assert f"skipped run {path}: an interrupted run (" in out
    assert "A = 0001_run1" in out and "B = 0002_run2" in out and "no regression" in out

    code, out = run_cli("report", "--storage", str(storage), "--out", str(tmp_path / "reports"), capsys=capsys)
    assert code == 0, out
    assert f"skipped run {path}: an interrupted run" in out
    assert "report of 0002_run2 (ce81e563f1): 3 case(s); plots ..." in out and "report: done in" in out  # progress


def test_an_interrupted_run_named_is_refused_with_why(tmp_path, capsys):
    storage = tmp_path / "history"
    write(storage, 1, stored())
    write(storage, 2, interrupted_legacy())
    with pytest.raises(InterruptedRunError, match="has 2 timed round"):
        select_run("2", storage)
    code, out = run_cli("merge", "1", "2", "--storage", str(storage), capsys=capsys)
    assert code == 2 and "0002_run2.json: an interrupted run" in out and "Traceback" not in out
    assert not (storage / "merged").exists()


def test_a_run_of_benchmarks_without_timings_or_records_is_still_not_a_result(tmp_path):
    """Not every run without a record is an interrupted one: no timed rounds, no lorabench result."""
    storage = tmp_path / "history"
    path = write(storage, 1, {"benchmarks": [{"name": "test_overhead", "extra_info": {}}]})
    with pytest.raises(HistoryError, match="holds no lorabench result") as raised:
        read_run(path)
    assert not isinstance(raised.value, InterruptedRunError)


def test_the_plugin_marks_an_interrupted_runs_json_and_the_storage_keeps_it_out_of_the_history(tmp_path, monkeypatch):
    from lorabench.pytest_plugin import hooks
    from lorabench.storage.atomic import AtomicFileStorage, make_atomic
    from pytest_benchmark.storage.file import FileStorage

    config = SimpleNamespace(stash=pytest.Stash())
    config.stash[hooks._PYTEST_SESSION] = SimpleNamespace(exitstatus=pytest.ExitCode.INTERRUPTED)
    config.stash[hooks.SESSION_KEY] = SimpleNamespace(results=[object()])
    output = stored()
    hooks.pytest_benchmark_update_json(config, [], output)
    assert output[INTERRUPTED_KEY] == "stopped by Ctrl-C, SIGINT or pytest.exit after 1 recorded case(s)"
    finished = stored()
    config.stash[hooks._PYTEST_SESSION] = SimpleNamespace(exitstatus=pytest.ExitCode.OK)
    hooks.pytest_benchmark_update_json(config, [], finished)
    assert INTERRUPTED_KEY not in finished

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    history = tmp_path / "history"
    store = AtomicFileStorage(history, logging.getLogger("test"))
    store.__class__ = FileStorage
    failures = []
    make_atomic(store, failures)
    store.save(output, "run")
    assert not list(history.rglob("*.json"))
    (failure,) = failures
    assert failure.reason.startswith("the run was interrupted (stopped by Ctrl-C")
    assert failure.fallback.parent == tmp_path / "tmp" / "lorabench-unsaved"
    with pytest.raises(InterruptedRunError):
        read_run(failure.fallback)


# ----- values that cannot stand -----------------------------------------------------------------
@pytest.mark.parametrize("value, words", [(float("nan"), "nan (not finite)"), (float("inf"), "inf (not finite)"),
                                          ("0.9", "'0.9' (not a number)")])
def test_a_stored_gated_metric_that_is_not_a_finite_number_fails_compare_naming_it(value, words, tmp_path, capsys):
    storage = tmp_path / "history"
    write(storage, 1, stored())
    bad = stored()
    record(bad, "lora")["metrics"]["eval_loss"] = value
    path = write(storage, 2, bad)

    run = read_run(path)
    assert "eval_loss" not in run.results["lora"].metrics
    assert run.results["lora"].absent["eval_loss"].startswith(INVALID_STORED)
    assert run.read_warnings == [f"{path}: case lora: metric eval_loss is {words}: read as not measured"]
    code, out = run_cli("compare", "--storage", str(storage), "--fail", capsys=capsys)
    assert code == 1, out
    assert f"WARNING: run B: {path}: case lora: metric eval_loss is {words}" in out
    assert "lora: eval_loss" in out.split("regression(s):")[1]


def test_a_non_finite_metric_in_both_runs_is_still_a_regression_of_b():
    data = stored()
    record(data, "lora")["metrics"]["eval_loss"] = float("nan")
    a, b = _runs(data, copy.deepcopy(data))
    row = next(r for r in compare_runs(a, b).rows if (r.case_id, r.metric) == ("lora", "eval_loss"))
    assert row.status == REGRESSED and row.note == f"B's {INVALID_STORED}: nan"


def test_a_metric_gone_from_b_without_a_reason_is_a_regression():
    data = stored()
    del record(data, "lora")["metrics"]["eval_loss"]
    a, b = _runs(stored(), data)
    row = next(r for r in compare_runs(a, b).rows if (r.case_id, r.metric) == ("lora", "eval_loss"))
    assert row.status == REGRESSED and "not measured in B" in row.note


def test_nan_timings_are_flagged_and_the_per_step_test_is_not_evaluated(tmp_path):
    data = stored()
    extra = record(data, "lora")
    extra["step_ms_curve"][4] = float("nan")
    bench = next(b for b in data["benchmarks"] if b["extra_info"] is extra)
    bench["stats"]["median"] = float("nan")
    run = read_run(write(tmp_path, 1, data))
    assert run.results["lora"].step_ms_curve == []
    assert any("step_ms_curve holds nan at step 5" in w and "not evaluable" in w for w in run.read_warnings)
    assert any("timing stat(s) median=nan not finite" in w for w in run.read_warnings)


def test_an_unknown_record_key_is_named_and_the_rest_read(tmp_path, capsys):
    data = stored()
    record(data, "lora")["gpu_temperature"] = 71
    path = write(tmp_path / "history", 1, data)
    run = read_run(path)
    assert run.read_warnings == [f"{path}: case lora: unknown record key 'gpu_temperature' ignored "
                                 "(not a field of a schema 1 record)"]
    assert set(run.results) == {"full", "lora", "qlora_nf4_r8"}


@pytest.mark.parametrize("key, value, words", [
    ("metrics", "fast", "record key 'metrics': must be a mapping, not str"),
    ("loss_curve", [1.0, "x"], "record key 'loss_curve': entry 1 is 'x', not a number"),
    ("status", 3, "record key 'status': 3 must be text"),
    ("case_id", None, "record key 'case_id': None must be text"),
])
def test_a_record_field_of_the_wrong_type_is_named_with_the_file_and_benchmark(key, value, words, tmp_path, capsys):
    storage = tmp_path / "history"
    write(storage, 1, stored())
    data = stored()
    record(data, "lora")[key] = value
    path = write(storage, 2, data)
    with pytest.raises(HistoryError) as raised:
        read_run(path)
    assert str(raised.value) == f"{path}: benchmark 'test_finetune[lora]': {words}"
    code, out = run_cli("compare", "--storage", str(storage), capsys=capsys)
    assert code == 2 and words in out and "pass --skip-broken" in out and "Traceback" not in out
    code, out = run_cli("compare", "--storage", str(storage), "--skip-broken", capsys=capsys)
    assert code == 2 and "1 usable run(s) stored, 2 needed" in out and f"passed over: {path}: " in out


def test_a_seeds_non_finite_figure_is_left_out_of_the_seeds_statistics():
    from lorabench.evaluation.seeds import seed_values

    extra = record(stored(), "lora")
    extra["seeds"] = [{"seed": 1, "status": "ok", "metrics": {"eval_loss": 0.7}},
                      {"seed": 2, "status": "ok", "metrics": {"eval_loss": float("nan")}}]
    result, findings = read_record(extra)
    assert seed_values(result, "eval_loss") == [0.7]
    assert findings == ["seed 2: metric eval_loss is nan: left out of the seeds' statistics"]
    assert extra["seeds"][1]["metrics"]["eval_loss"] != extra["seeds"][1]["metrics"]["eval_loss"]  # input untouched


def test_a_missing_record_key_is_named():
    extra = record(stored(), "lora")
    del extra["model"]
    with pytest.raises(ValueError, match="missing record key\\(s\\) 'model'"):
        read_record(extra)


def test_reading_around_a_value_leaves_the_stored_dict_as_it_was():
    extra = record(stored(), "lora")
    extra["metrics"]["eval_loss"] = float("nan")
    before = json.dumps(extra)
    read_record(extra)
    assert json.dumps(extra) == before


# ----- the speed gate's yardstick ---------------------------------------------------------------
def slowed_by_the_library(factor: float = 1.6) -> tuple[dict, dict]:
    """Two runs of the stored cases; in B every step and every control is ``factor`` slower (as a torch or
    autograd regression would make them), so the step/control ratio does not move."""
    a = stored()
    for extra in (b["extra_info"] for b in a["benchmarks"]):
        steps = extra["step_ms_curve"]
        extra["control_ms_curve"] = [s / 10 for s in steps]
        extra["step_cpu_ms_curve"] = list(steps)
        extra["control_cpu_ms_curve"] = [s / 10 for s in steps]
        extra["metrics"].update(control_ms=extra["metrics"]["step_ms"] / 10, step_cpu_ms=extra["metrics"]["step_ms"],
                                step_control_ratio=10.0)
    b = copy.deepcopy(a)
    b["machine_info"]["torch_version"] = "2.14.0+cpu"
    for extra in (x["extra_info"] for x in b["benchmarks"]):
        for curve in ("step_ms_curve", "control_ms_curve", "step_cpu_ms_curve", "control_cpu_ms_curve"):
            extra[curve] = [v * factor for v in extra[curve]]
        for metric in ("step_ms", "control_ms", "step_cpu_ms", "train_s"):
            extra["metrics"][metric] *= factor
        extra["metrics"]["tokens_per_s"] /= factor
        extra["metrics"]["samples_per_s"] /= factor
    return a, b


def _runs(a: dict, b: dict, tmp: Path | None = None):
    tmp = Path(tempfile.mkdtemp()) if tmp is None else tmp
    return read_run(write(tmp, 1, a)), read_run(write(tmp, 2, b))


def test_a_slowdown_the_control_shares_names_the_moved_yardstick_and_the_raw_cpu_change(tmp_path, capsys):
    a, b = slowed_by_the_library()
    write(tmp_path, 1, a)
    write(tmp_path, 2, b)
    code, out = run_cli("compare", "--storage", str(tmp_path), "--fail", capsys=capsys)
    assert code == 0, out  # the ratio cancels it: that is the limit the warning names
    (line,) = [w for w in out.splitlines() if "the yardstick moved" in w]
    assert "control_ms +60.0%" in line and "past its ±15% tolerance" in line
    assert "raw step CPU time (step_cpu_ms) +60.0% there" in line
    assert "the runs differ in torch_version '2.13.0+cpu' -> '2.14.0+cpu'" in line
    assert "--gate-step-cpu-time" in line

    code, out = run_cli("compare", "--storage", str(tmp_path), "--fail", "--gate-step-cpu-time", capsys=capsys)
    assert code == 1, out
    regressions = out.split("regression(s):")[1]
    assert "lora: step_cpu_ms" in regressions and "Hodges-Lehmann over raw step CPU times" in regressions


def test_a_yardstick_within_its_tolerance_says_nothing_and_raw_cpu_gating_needs_the_steps():
    a, b = slowed_by_the_library(1.05)
    comparison = compare_runs(*_runs(a, b), Tolerances(gate_step_cpu_time=True))
    assert not [w for w in comparison.warnings if "yardstick" in w]
    assert not comparison.regressions
    rows = {(r.case_id, r.metric): r for r in comparison.rows}
    assert rows[("lora", "step_cpu_ms")].status == UNCHANGED


def test_the_ratios_row_shows_the_raw_cpu_change_beside_it():
    a, b = slowed_by_the_library()
    for extra in (x["extra_info"] for x in b["benchmarks"]):  # the step slower than the control as well
        extra["step_cpu_ms_curve"] = [v * 1.5 for v in extra["step_cpu_ms_curve"]]
        extra["metrics"]["step_cpu_ms"] *= 1.5
        extra["metrics"]["step_control_ratio"] = 15.0
    rows = {(r.case_id, r.metric): r for r in compare_runs(*_runs(a, b)).rows}
    row = rows[("lora", "step_control_ratio")]
    assert row.status == REGRESSED and "raw step CPU time +140.0%" in row.note


# ----- the commands' own inputs ---------------------------------------------------------------
def test_compare_refuses_a_thresholds_file_that_does_not_exist(tmp_path, capsys):
    write(tmp_path, 1, stored())
    write(tmp_path, 2, stored())
    code, out = run_cli("compare", "--storage", str(tmp_path), "--thresholds", str(tmp_path / "nope.yaml"),
                        capsys=capsys)
    assert code == 2 and f"--thresholds {tmp_path / 'nope.yaml'}: not found" in out


@pytest.mark.parametrize("argv, words", [
    (("report", "--out", "{f}/reports"), "report --out {f}/reports: cannot be made a folder (a "),
    (("report", "--out", "{f}"), "report --out {f}: cannot be made a folder (a file stands where the directory "),
    (("merge", "1", "2", "--out", "{f}/merged.json"), "merge --out {f}/merged.json: its folder {f}: cannot be made"),
    (("compare", "--csv", "{f}/rows.csv"), "--csv {f}/rows.csv: its folder {f}: cannot be made a folder"),
])
def test_an_output_under_a_file_is_refused_before_any_work(argv, words, tmp_path, capsys):
    storage = tmp_path / "history"
    write(storage, 1, stored())
    write(storage, 2, stored())
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    fill = lambda text: text.replace("{f}", str(blocker))  # noqa: E731
    code, out = run_cli(*map(fill, argv), "--storage", str(storage), capsys=capsys)
    assert code == 2 and fill(words) in out, out
    assert "Traceback" not in out and "report of" not in out
    assert blocker.read_text() == "not a folder"


def many_cases(n: int) -> dict:
    """The stored run's three cases repeated as ``n`` distinct cases of one model and data set."""
    data = stored()
    benches = []
    for i in range(n):
        bench = copy.deepcopy(data["benchmarks"][i % 3])
        extra = bench["extra_info"]
        extra["case_id"] = extra["config_id"] = f"{extra['config_id']}_{i}"
        bench["name"] = f"test_finetune[{extra['case_id']}]"
        benches.append(bench)
    data["benchmarks"] = benches
    return data


def test_a_panel_past_the_named_limit_draws_its_cases_unnamed(tmp_path, capsys):
    from lorabench.report.plots import NAMED_CASES_MAX

    n = 2 * NAMED_CASES_MAX  # a third are full fine-tuning, which the rank plot leaves out
    write(tmp_path, 1, many_cases(n))
    code, out = run_cli("report", "--storage", str(tmp_path), "--out", str(tmp_path / "reports"), capsys=capsys)
    assert code == 0, out
    for plot, shown in (("memory_vs_time", n), ("quality_vs_rank", n * 2 // 3), ("pareto_memory_quality", n),
                        ("loss_curves", n)):
        svg = (tmp_path / "reports" / "plots" / f"{plot}.svg").read_text()
        assert f"{shown} cases: not named (more than {NAMED_CASES_MAX})" in svg, plot
        assert "lora_1<" not in svg, plot  # no case's name drawn
    assert "lora_1" in (tmp_path / "reports" / "summary.md").read_text()


@pytest.mark.integration
def test_a_report_of_10000_cases_finishes_within_five_minutes_telling_its_progress(tmp_path):
    """53 s on a 2-core machine at load 20 (docs/stored-runs.md); before its plots drew many cases unnamed,
    a 1,000-case report did not finish in 600 s."""
    import subprocess
    import sys
    import time

    write(tmp_path, 1, many_cases(10_000))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lorabench", "report", "--storage", str(tmp_path), "--out",
                           str(tmp_path / "reports")], capture_output=True, text=True, timeout=600, check=False)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert seconds < 300, f"{seconds:.0f} s"
    assert "10000 case(s); plots ..." in proc.stderr and "report: plots written after" in proc.stderr
    assert "report: done in" in proc.stderr
