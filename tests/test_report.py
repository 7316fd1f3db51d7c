"""Reports from a stored run: Markdown, HTML (escaped), plots, and what Allure receives."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from lorabench.allure_results import CATEGORIES, metrics_csv, write_launch_files
from lorabench.cli import main
from lorabench.history import StoredRun, read_run
from lorabench.plots import pareto_front
from lorabench.report import build_groups, model_by_dataset, write_report
from lorabench.result import STATUS_DOES_NOT_FIT, CaseResult

STORED_RUN = Path(__file__).parent / "data" / "stored-run.json"  # a real autosaved run of three cases


def result(config_id, model="tiny-llama", dataset="digit-reverse", rank=16, quant=None, **metrics) -> CaseResult:
    r = CaseResult(case_id=f"{config_id}-{model}-{dataset}", config_id=config_id, model=model, dataset=dataset,
                   device="cpu", config={"rank": rank, "quant": quant, "method": "full" if config_id == "full" else "lora"})
    r.metrics.update({"peak_rss_delta_mib": 100.0, "weights_mib": 6.0, "step_ms": 100.0, "tokens_per_s": 2000.0,
                      "train_s": 3.0, "eval_loss": 0.5, "train_loss_final": 0.6, "perplexity": 1.65})
    r.metrics.update(metrics)
    r.loss_curve = [3.0, 2.0, 1.0]
    return r


def stored(*results) -> StoredRun:
    return StoredRun(path=Path("0001_x.json"), number=1, name="x", datetime="2026-11-23T10:00:00",
                     commit={"id": "0123456789abcdef"}, machine={"cpu": "x86_64", "torch_version": "2.13.0"},
                     results={r.case_id: r for r in results})


def test_report_files_tables_and_worded_deltas(tmp_path):
    run = stored(result("full"), result("qlora_nf4", quant="nf4", weights_mib=3.0, peak_rss_delta_mib=80.0),
                 result("qlora_nf4_r64", rank=64, quant="nf4", weights_mib=6.6, eval_loss=0.45))
    written = write_report(run, tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in written}
    for plot in ("memory_vs_time", "quality_vs_time", "quality_vs_rank", "pareto_memory_quality"):
        assert {f"plots/{plot}.png", f"plots/{plot}.svg"} <= names
    for p in written:
        assert p.stat().st_size > 0
    md = (tmp_path / "summary.md").read_text()
    assert "Baseline: full." in md
    assert "| qlora_nf4 | weights_mib | 6.00 | 3.00 | -50.0% | 50.0% less weight memory (3.00 vs 6.00 MiB, better) |" in md
    assert "50.0% more weight memory" not in md
    assert "lowest eval loss: qlora_nf4_r64" in md
    html = (tmp_path / "summary.html").read_text()
    assert html.count("<img ") == 4 and 'id="results-1"' in html


def test_html_escapes_what_comes_from_the_run(tmp_path):
    evil = result("<script>alert(1)</script>")
    evil.status, evil.error = STATUS_DOES_NOT_FIT, "<img src=x onerror=alert(2)>"
    write_report(stored(result("full"), evil), tmp_path)
    html = (tmp_path / "summary.html").read_text()
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_absent_metrics_are_listed_with_their_reason_not_as_zero():
    r = result("lora")
    del r.metrics["eval_loss"]
    r.absent["eval_loss"] = "the data set has no eval split"
    group = build_groups([result("full"), r])[0]
    assert "lora: eval_loss not measured: the data set has no eval split" in group.problems
    assert "0" not in [row[5] for row in group.table[1:]]  # eval loss column shows "-", never 0


def test_model_by_dataset_table_appears_only_with_several():
    one = [result("full")]
    assert model_by_dataset(one) is None
    several = one + [result("full", model="tiny-qwen", eval_loss=0.7), result("lora", dataset="data.jsonl", eval_loss=0.4)]
    table = model_by_dataset(several)
    assert table[0] == ["model", "data.jsonl", "digit-reverse"]
    assert table[1] == ["tiny-llama", "0.4 (lora)", "0.5 (full)"]
    assert table[2] == ["tiny-qwen", "-", "0.7 (full)"]


def test_pareto_front_keeps_only_undominated_points():
    points = [(100, 0.5, "a"), (80, 0.6, "b"), (120, 0.4, "c"), (110, 0.55, "dominated"), (80, 0.7, "worse b")]
    assert [p[2] for p in pareto_front(points)] == ["b", "a", "c"]


def test_report_from_a_real_stored_run_through_the_command_line(tmp_path, capsys):
    storage = tmp_path / ".benchmarks" / "Linux-CPython-3.11-64bit"
    storage.mkdir(parents=True)
    shutil.copy(STORED_RUN, storage / "0001_stored.json")
    run = read_run(storage / "0001_stored.json")
    assert len(run.results) == 3
    assert main(["report", "--storage", str(tmp_path / ".benchmarks"), "--out", str(tmp_path / "reports")]) == 0
    md = (tmp_path / "reports" / "summary.md").read_text()
    for config_id in ("full", "lora", "qlora_nf4_r8"):
        assert f"| {config_id} |" in md
    assert "wrote" in capsys.readouterr().out


def test_allure_metrics_table_and_launch_files(tmp_path):
    r = result("qlora_nf4")
    r.absent["mfu_pct"] = "no GPU"
    rows = list(csv.reader(io.StringIO(metrics_csv(r))))
    assert rows[0] == ["metric", "value", "unit", "better", "counter or reason"]
    assert ["mfu_pct", "", "%", "higher", "not measured: no GPU"] in rows
    write_launch_files(tmp_path, {"gpu_name": None, "torch_version": "2.13.0", "cpu": "a=b:c"})
    props = (tmp_path / "environment.properties").read_text()
    assert "torch_version=2.13.0" in props and "gpu_name" not in props and r"cpu=a\=b\:c" in props
    assert json.loads((tmp_path / "categories.json").read_text()) == CATEGORIES


@pytest.mark.parametrize("message, category", [
    ("AssertionError: gate(s) failed:\n  step_ms = 2", "Failed gates"),
    ("Skipped: does not fit: out of memory", "Does not fit"),
    ("Failed: Timeout (>25.0s) from pytest-timeout.", "Timed out"),
    ("AssertionError: case error (error): training diverged", "Case errors"),
])
def test_categories_match_the_messages_the_bench_produces(message, category):
    import re

    matched = [c["name"] for c in CATEGORIES if re.fullmatch(c["messageRegex"], message)]
    assert matched[0] == category
