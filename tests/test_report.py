"""Reports from a stored run: Markdown, HTML (escaped), plots, and what Allure receives."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from lorabench.report.allure_results import CATEGORIES, gates_csv, metrics_csv, not_measured_csv, write_launch_files
from lorabench.report.summary import columns_for
from lorabench.commands.main import main
from lorabench.storage.history import StoredRun, read_run
from lorabench.matrix import short_name
from lorabench.report.plots import base_label, front_is_decided, memory_metric, panels, pareto_front, write_plots
from lorabench.report.pages import build_groups, hyper_parameters, model_by_dataset, write_report
from lorabench.result import STATUS_DOES_NOT_FIT, CaseResult

STORED_RUN = Path(__file__).parent / "data" / "stored-run.json"  # a real autosaved run of three cases
# A real autosaved run of two models x two data sets (tiny-llama, tiny-qwen; digit-reverse, add-qa), 5 configurations.
STORED_2X2 = Path(__file__).parent / "data" / "stored-run-2x2.json"


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
    for plot in ("memory_vs_time", "quality_vs_time", "quality_vs_rank", "pareto_memory_quality", "loss_curves"):
        assert {f"plots/{plot}.png", f"plots/{plot}.svg"} <= names
    for p in written:
        assert p.stat().st_size > 0
    md = (tmp_path / "summary.md").read_text()
    assert "Baseline: full." in md
    assert "| qlora_nf4 | weights_mib | 6.00 | 3.00 | -50.0% | 50.0% less weight memory (3.00 vs 6.00 MiB, better) |" in md
    assert "50.0% more weight memory" not in md
    assert "eval loss from one seed each, so no case is shown to have the lowest" in md
    html = (tmp_path / "summary.html").read_text()
    # self-contained: the five plots inline, no file beside the page to fetch
    assert html.count("<svg") == 5 and "<img " not in html and 'src="plots/' not in html
    assert 'id="results-1"' in html


def test_html_escapes_what_comes_from_the_run(tmp_path):
    evil = result("<script>alert(1)</script>")
    evil.status, evil.error = STATUS_DOES_NOT_FIT, "<img src=x onerror=alert(2)>"
    write_report(stored(result("full"), evil), tmp_path)
    html = (tmp_path / "summary.html").read_text()
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_absent_metrics_are_listed_once_per_reason_not_as_zero():
    r = result("lora")
    del r.metrics["eval_loss"]
    r.absent["eval_loss"] = "the data set has no eval split"
    base = result("full")
    for case in (base, r):  # the form the runner recorded CUDA-only figures in before
        case.absent.update({"peak_alloc_mib": "not measured: the case ran on cpu, not CUDA",
                            "mfu_pct": "not measured: the case ran on cpu, not CUDA"})
    group = build_groups([base, r])[0]
    assert group.not_measured == ["the case ran on cpu, not CUDA: mfu_pct, peak_alloc_mib (every case)",
                                  "the data set has no eval split: eval_loss (lora)"]
    assert "0" not in [row[5] for row in group.table[1:]]  # eval loss column shows "-", never 0


def test_model_by_dataset_table_has_quality_speed_and_memory_for_every_case():
    one = [result("full")]
    assert model_by_dataset(one) is None
    several = one + [result("full", model="tiny-qwen", eval_loss=0.7, accuracy_pct=41.5),
                     result("lora", dataset="data.jsonl", eval_loss=0.4)]
    table = model_by_dataset(several)
    assert table[0] == ["model", "data set", "config", "status", "eval loss (nats)", "perplexity", "accuracy (%)",
                        "tokens/s", "process memory added (MiB, peak RSS)"]
    assert table[1] == ["tiny-llama", "data.jsonl", "lora", "ok", "0.4", "1.65", "-", "2,000", "100.0"]
    assert table[3] == ["tiny-qwen", "digit-reverse", "full", "ok", "0.7", "1.65", "41.50", "2,000", "100.0"]


def test_gates_table_in_markdown_html_and_allure(tmp_path):
    failing = result("qlora_nf4", quant="nf4", eval_loss=0.9)
    failing.gates = [
        {"rule": "eval_loss <= 2.0 * lora.eval_loss", "config": "qlora_nf4", "metric": "eval_loss", "op": "<=",
         "ref_config": "lora", "ref_metric": "eval_loss", "where": "thresholds.yaml:37", "profile": "default",
         "status": "fail", "value": 0.9, "bound": 0.8, "reference": 0.4, "message": "..."},
        {"rule": "peak_alloc_mib >= self.weights_mib", "config": "*", "metric": "peak_alloc_mib", "op": ">=",
         "ref_config": "self", "ref_metric": "weights_mib", "where": "thresholds.yaml:60", "profile": "cuda",
         "status": "not evaluated", "value": None, "bound": None, "reference": None,
         "message": "qlora_nf4: peak_alloc_mib is absent (cpu) [thresholds.yaml:60]"},
        {"rule": "loss_drop >= 0.1", "config": "*", "metric": "loss_drop", "op": ">=", "ref_config": None,
         "ref_metric": None, "where": "thresholds.yaml:8", "profile": "default", "status": "pass", "value": 2.4,
         "bound": 0.1, "reference": None, "message": "..."},
    ]
    write_report(stored(result("full"), failing), tmp_path)
    md = (tmp_path / "summary.md").read_text()
    # Markdown-escaped (lorabench.report.textsafe): renders as "eval_loss <= 2.0 * lora.eval_loss"
    assert ("| fail | qlora_nf4-tiny-llama-digit-reverse | tiny-llama | digit-reverse | "
            "eval_loss &lt;= 2.0 \\* lora.eval_loss | 0.9 | &lt;= 0.8 | thresholds.yaml:37 |") in md
    assert md.index("| fail |") < md.index("| not evaluated |") < md.index("| pass |")
    assert "| qlora_nf4 | failed 1 gate |" in md  # the case's status says so, not "ok"
    assert "- 2 case(s): 1 ok, 1 failed 1 gate" in md and "- gates: 1 fail, 1 not evaluated, 1 pass" in md
    html = (tmp_path / "summary.html").read_text()
    assert '<td class="fail">fail</td>' in html and "1 passed</summary>" in html
    rows = list(csv.reader(io.StringIO(gates_csv(failing))))
    assert rows[0] == ["status", "rule", "value", "bound", "reference value", "where", "profile"]
    assert rows[1] == ["fail", "eval_loss <= 2.0 * lora.eval_loss", "0.9", "<= 0.8", "lora.eval_loss = 0.4",
                       "thresholds.yaml:37", "default"]


def test_hyper_parameters_of_each_configuration(tmp_path):
    full = result("full")
    full.config.update({"lr": 0.001, "steps": 60, "seed": 1234})
    qwen = result("full", model="tiny-qwen")
    qwen.config.update(full.config)
    other = result("qlora_nf4", model="big/model", quant="nf4")
    other.config.update({"lr": 0.0002, "steps": 100, "seed": 1234, "target_modules": ["q_proj", "v_proj"]})
    table = hyper_parameters([full, qwen, other])
    header = table[0]
    assert header[:3] == ["config", "models", "method"] and "lr" in header and "seed" in header
    assert table[1][:2] == ["full", "tiny-llama, tiny-qwen"]
    assert table[2][header.index("target_modules")] == "q_proj,v_proj" and table[2][header.index("lr")] == "0.0002"


def test_plots_have_a_panel_per_model_and_data_set_labelled_with_both(tmp_path):
    run = read_run(STORED_2X2)
    results = list(run.results.values())
    assert {(m, short_name(d)) for m, d, _ in panels(results)} == {(m, d) for m in ("tiny-llama", "tiny-qwen")
                                                                    for d in ("digit-reverse", "add-qa")}
    written = write_report(run, tmp_path)
    for name in ("memory_vs_time", "quality_vs_time", "quality_vs_rank", "pareto_memory_quality", "loss_curves"):
        svg = (tmp_path / "plots" / f"{name}.svg").read_text()
        for model in ("tiny-llama", "tiny-qwen"):
            for dataset in ("digit-reverse", "add-qa"):
                assert f"{model} on {dataset}" in svg, (name, model, dataset)
    rank = (tmp_path / "plots" / "quality_vs_rank.svg").read_text()
    ranks = sorted({int(r.config["rank"]) for r in results if r.config.get("method") == "lora"})
    for tick in ranks:
        assert f">{tick}</text>" in rank  # ticks at the ranks used, written as numbers
    assert "2^" not in rank and "none tiny" not in rank and "NF4 base (double quant.), alpha 16 (sweep)" in rank
    md = (tmp_path / "summary.md").read_text()
    assert md.count("## tiny-") == 4 and "## Model × data set" in md and "## Gates" in md
    assert len([p for p in written if p.suffix == ".png"]) == 5


@pytest.mark.parametrize("config, label", [({"quant": "none", "dtype": "bf16"}, "bf16 base"),
                                           ({"quant": "nf4", "double_quant": True}, "NF4 base (double quant.)"),
                                           ({"quant": "int8"}, "int8 base")])
def test_rank_series_are_named_by_their_base(config, label):
    assert base_label(config) == label


def test_memory_is_the_devices_primary_figure():
    assert memory_metric([result("lora", tensor_peak_mib=40.0)]) == "tensor_peak_mib"
    assert memory_metric([result("lora")]) == "peak_rss_delta_mib"  # a stored run from before tensor bytes
    gpu = result("lora", tensor_peak_mib=40.0, peak_alloc_mib=60.0)
    gpu.device = "cuda:0"
    assert memory_metric([gpu]) == "peak_alloc_mib"


def test_plot_axes_are_labelled_in_words_with_the_tensor_peak_on_the_cpu(tmp_path):
    run = stored(result("full", tensor_peak_mib=90.0), result("lora", tensor_peak_mib=30.0, eval_loss=0.55))
    write_plots(list(run.results.values()), tmp_path)
    memory = (tmp_path / "memory_vs_time.svg").read_text()
    assert "training time (s, wall clock of all steps)" in memory
    assert "peak memory (MiB of live tensors in a step)" in memory
    assert "train_s (s)" not in memory and "peak_rss_delta_mib" not in memory
    assert "held-out loss after training (nats)" in (tmp_path / "pareto_memory_quality.svg").read_text()


def test_loss_curves_of_every_configuration_are_overlaid_in_one_panel(tmp_path):
    a, b = result("full"), result("lora")
    b.loss_curve = [3.0, 2.5, 2.2, 2.0]
    write_plots([a, b], tmp_path)
    svg = (tmp_path / "loss_curves.svg").read_text()
    assert svg.count("tiny-llama on digit-reverse") == 1  # one panel
    assert ">full</text>" in svg and ">lora</text>" in svg  # both in its legend
    assert "training loss (nats)" in svg and "optimizer step" in svg


def _seeded(config_id, loss, low, high, memory):
    r = result(config_id, eval_loss=loss, tensor_peak_mib=memory)
    r.seeds = [{"seed": s, "metrics": {"eval_loss": loss}} for s in (1, 2, 3)]
    r.spread = {"eval_loss": {"sd": (high - low) / 4, "ci_low": low, "ci_high": high}}
    return r


def test_the_pareto_frontier_is_a_finding_only_where_the_loss_intervals_separate(tmp_path):
    apart = [_seeded("lora", 0.60, 0.58, 0.62, 30.0), _seeded("full", 0.40, 0.38, 0.42, 90.0)]
    points = [(r.metrics["tensor_peak_mib"], r.metrics["eval_loss"], r.config_id, r) for r in apart]
    assert front_is_decided(pareto_front(points), points)
    overlapping = [_seeded("lora", 0.45, 0.35, 0.55, 30.0), _seeded("full", 0.40, 0.30, 0.50, 90.0)]
    points = [(r.metrics["tensor_peak_mib"], r.metrics["eval_loss"], r.config_id, r) for r in overlapping]
    assert not front_is_decided(pareto_front(points), points)
    # one configuration beats the rest on the means, but its interval overlaps another's: not a finding
    beaten = [_seeded("qlora_nf4", 0.62, 0.56, 0.68, 15.0), _seeded("lora", 0.64, 0.61, 0.66, 18.0),
              _seeded("full", 0.90, 0.85, 0.95, 27.0)]
    points = [(r.metrics["tensor_peak_mib"], r.metrics["eval_loss"], r.config_id, r) for r in beaten]
    assert [p[2] for p in pareto_front(points)] == ["qlora_nf4"]
    assert not front_is_decided(pareto_front(points), points)
    beaten[1] = _seeded("lora", 0.75, 0.70, 0.80, 18.0)  # now apart from qlora_nf4's interval, as full is
    points = [(r.metrics["tensor_peak_mib"], r.metrics["eval_loss"], r.config_id, r) for r in beaten]
    assert front_is_decided(pareto_front(points), points)
    single = [result("lora", eval_loss=0.6, tensor_peak_mib=30.0), result("full", eval_loss=0.4, tensor_peak_mib=90.0)]
    points = [(r.metrics["tensor_peak_mib"], r.metrics["eval_loss"], r.config_id, r) for r in single]
    assert not front_is_decided(pareto_front(points), points)  # one seed: no interval, nothing decided
    write_plots(single, tmp_path)
    assert "not shown to differ" in (tmp_path / "pareto_memory_quality.svg").read_text()
    write_plots(apart, tmp_path)
    assert "its losses' 95% intervals separate" in (tmp_path / "pareto_memory_quality.svg").read_text()


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


def test_storage_is_a_folder_or_pytest_benchmarks_file_url(tmp_path, capsys, monkeypatch):
    storage = tmp_path / ".benchmarks" / "Linux-CPython-3.11-64bit"
    storage.mkdir(parents=True)
    shutil.copy(STORED_RUN, storage / "0001_stored.json")
    out = tmp_path / "reports"
    assert main(["report", "--storage", f"file://{tmp_path / '.benchmarks'}", "--out", str(out)]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--storage", "file://./.benchmarks", "--out", str(out)]) == 0  # as --benchmark-storage
    assert (out / "summary.md").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--storage", "elasticsearch+https://host:9200/bench"])
    assert exit_info.value.code == 2 and "only pytest-benchmark's file storage" in capsys.readouterr().err


def test_allure_metrics_table_and_launch_files(tmp_path):
    r = result("qlora_nf4", tensor_peak_mib=40.0, my_plugin_metric=1.0)
    r.absent["mfu_pct"] = "no GPU"
    rows = list(csv.reader(io.StringIO(metrics_csv(r))))
    assert rows[0] == ["metric", "value", "unit", "better", "counter"]
    # the summary's columns first, in its order; then the registry's; no row without a value
    summary = [m for m, _, _ in columns_for(r) if m in r.metrics]
    assert [row[0] for row in rows[1:len(summary) + 1]] == summary and summary[0] == "tensor_peak_mib"
    assert all(row[1] for row in rows[1:]) and len(rows) == len(r.metrics) + 1
    assert rows[-1][0] == "my_plugin_metric"  # a metric the registry does not know comes last
    r.absent["peak_alloc_mib"] = "not measured: the case ran on cpu, not CUDA"
    absent = list(csv.reader(io.StringIO(not_measured_csv(r))))
    assert absent == [["metric", "unit", "why not measured"], ["mfu_pct", "%", "no GPU"],
                      ["peak_alloc_mib", "MiB", "the case ran on cpu, not CUDA"]]
    write_launch_files(tmp_path, {"gpu_name": None, "torch_version": "2.13.0", "cpu": "a=b:c"})
    props = (tmp_path / "environment.properties").read_text()
    assert "torch_version=2.13.0" in props and "gpu_name" not in props and r"cpu=a\=b\:c" in props
    assert json.loads((tmp_path / "categories.json").read_text()) == CATEGORIES


@pytest.mark.parametrize("message, category", [
    ("gate(s) failed: qlora_nf4 (model tiny-llama, data set digit-reverse, configuration qlora_nf4): 1 gate failed",
     "Failed gates"),
    ("Skipped: does not fit: out of memory", "Does not fit"),
    ("Failed: Timeout (>25.0s) from pytest-timeout.", "Timed out"),
    ("case error (error): lora (model tiny-llama, ...): error\n  training diverged", "Case errors"),
])
def test_categories_match_the_messages_the_bench_produces(message, category):
    import re

    matched = [c["name"] for c in CATEGORIES if re.fullmatch(c["messageRegex"], message)]
    assert matched[0] == category


def test_a_failed_case_reads_as_one_block():
    from lorabench.report.failures import failure_block

    r = result("qlora_nf4", quant="nf4", eval_loss=0.0912)
    assert failure_block(r) is None
    r.gates = [{"rule": "eval_loss <= 2.0 * lora.eval_loss", "config": "qlora_nf4", "metric": "eval_loss",
                "op": "<=", "ref_config": "lora", "ref_metric": "eval_loss", "where": "thresholds.yaml:37",
                "profile": "default", "status": "fail", "value": 0.0912, "bound": 0.0896, "reference": 0.0448,
                "message": "..."}]
    assert failure_block(r) == (
        "qlora_nf4-tiny-llama-digit-reverse (model tiny-llama, data set digit-reverse, configuration qlora_nf4): "
        "1 gate failed\n"
        "  violates 'eval_loss <= 2.0 * lora.eval_loss'  [thresholds.yaml:37, profile default]\n"
        "    qlora_nf4.eval_loss = 0.0912, lora.eval_loss = 0.0448: bound <= 0.0896")
    broken = result("lora")
    broken.status, broken.error = "error", "ValueError: target module q_prj not found"
    broken.details["traceback"] = "Traceback (most recent call last):\n  ...\nValueError: target module q_prj not found"
    block = failure_block(broken)
    assert block.splitlines()[1:] == ["  ValueError: target module q_prj not found", "  (run with -v for the traceback)"]
    assert "Traceback (most recent call last)" in failure_block(broken, verbose=True)
