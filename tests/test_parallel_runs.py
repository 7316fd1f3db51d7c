"""End to end: the bench under pytest-xdist (``-n 2``) and as two ``--shard`` slices, against a serial run.

Three QLoRA cases of 4 steps on a 48-row data set: ``qlora_nf4_r8`` and ``qlora_nf4_r16`` are linked by
a relative gate (so they must share a worker and a slice), ``qlora_nf4_r32`` is not. The serial and the
``-n 2`` run go side by side, then the two slices, as a CI matrix would run them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lorabench.run.scaleout import cpu_cores

ROOT = Path(__file__).resolve().parent.parent
CASES = ("qlora_nf4_r8", "qlora_nf4_r16", "qlora_nf4_r32")
GATES = """version: 1
profiles:
  default:
    "*":
      - loss_drop >= 0.1
      - adapter_mib >= self.trainable_mib
    qlora_nf4_r16:
      - params_trainable <= 2 * qlora_nf4_r8.params_trainable
      - params_trainable >= 2 * qlora_nf4_r8.params_trainable
  cpu:
    "*":
      - peak_rss_delta_mib >= self.weights_mib
"""


def _data(path: Path) -> Path:
    import random

    rng = random.Random(0)
    digits = ["".join(rng.choice("0123456789") for _ in range(4)) for _ in range(48)]
    path.write_text("".join(json.dumps({"prompt": f"rev {d}=", "completion": d[::-1]}) + "\n" for d in digits))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel")
    (tmp / "gates.yaml").write_text(GATES)
    common = [sys.executable, "-m", "pytest", str(ROOT / "bench" / "test_finetune.py"), "-p", "no:cacheprovider",
              "--rootdir", str(ROOT), "-v", "-m", "qlora", "-k", "r8 or r16 or r32", "--steps", "4",
              "--set", "warmup_steps=1", "--dataset", str(_data(tmp / "rows.jsonl")),
              "--thresholds", str(tmp / "gates.yaml")]
    plan = {"serial": [], "xdist": ["-n", "2", f"--alluredir={tmp / 'allure'}"],
            "shard1": ["--shard", "1/2"], "shard2": ["--shard", "2/2"]}
    out = {}
    for batch in (("serial", "xdist"), ("shard1", "shard2")):  # side by side, as CI jobs would
        procs = {name: subprocess.Popen(common + plan[name] + [f"--benchmark-json={tmp / name}.json"], cwd=ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for name in batch}
        for name, proc in procs.items():
            stdout, _ = proc.communicate(timeout=1500)
            out[name] = (proc.returncode, stdout, tmp / f"{name}.json")
    return tmp, out


def _stored(path: Path) -> dict:
    return json.loads(path.read_text())


def _outcomes(data: dict) -> list:
    """What must not change with parallelism: each case, its status and every gate's rule and outcome."""
    return [(b["fullname"], b["extra_info"]["case_id"], b["extra_info"]["status"],
             [(g["config"], g["rule"], g["status"]) for g in b["extra_info"]["gates"]]) for b in data["benchmarks"]]


def _lorabench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorabench", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, check=False)


def _worker_of(stdout: str) -> dict[str, str]:
    return {m.group(2): m.group(1) for m in re.finditer(r"\[(gw\d+)\] .*PASSED .*test_finetune\[(\w+)\]", stdout)}


@pytest.mark.integration
def test_xdist_runs_the_same_cases_gates_and_stored_results_as_a_serial_run(runs):
    _, out = runs
    (rc_s, log_s, serial), (rc_x, log_x, xdist) = out["serial"], out["xdist"]
    assert rc_s == 0, log_s[-4000:]
    assert rc_x == 0, log_x[-4000:]
    a, b = _stored(serial), _stored(xdist)
    assert [o[1] for o in _outcomes(a)] == list(CASES)
    assert _outcomes(b) == _outcomes(a)  # same cases, same order, same gates with the same outcomes
    assert any(g[1].startswith("params_trainable <= 2 * qlora_nf4_r8") and g[2] == "pass"
               for o in _outcomes(b) for g in o[3])  # the cross-case gate saw its reference
    assert [bench["stats"]["rounds"] for bench in b["benchmarks"]] == [3, 3, 3]
    workers = _worker_of(log_x)
    assert set(workers) == set(CASES) and len(set(workers.values())) == 2, workers  # both workers ran cases
    assert workers["qlora_nf4_r8"] == workers["qlora_nf4_r16"]  # linked by a gate: one worker, in order
    machine = b["machine_info"]
    assert machine["xdist_workers"] == 2 and "xdist_workers" not in a["machine_info"]
    assert machine["torch_threads"] == max(1, cpu_cores() // 2)
    assert sorted(machine["xdist_pins"]) == ["gw0", "gw1"]
    summary = log_x.split("lorabench summary", 1)[1]
    assert all(re.search(rf"^{case}\s+ok", summary, re.M) for case in CASES)  # one table, every worker's cases
    assert re.search(r"^gates: \d+ pass$", summary, re.M).group(0) in log_s
    compare = _lorabench("compare", str(serial), str(xdist), "--fail")
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert "the runs differ in xdist_workers: None (A) vs 2 (B)" in compare.stdout


@pytest.mark.integration
def test_xdist_workers_write_allure_results_for_every_case(runs):
    tmp, _ = runs
    results = [json.loads(p.read_text()) for p in (tmp / "allure").glob("*-result.json")]
    assert sorted(r["name"] for r in results) == sorted(f"test_finetune[{c}]" for c in CASES)
    assert all(r["status"] == "passed" for r in results)
    assert "torch_version=" in (tmp / "allure" / "environment.properties").read_text()


@pytest.mark.integration
def test_two_shards_merged_compare_clean_against_a_serial_run(runs):
    tmp, out = runs
    slices = []
    for name in ("shard1", "shard2"):
        rc, log, path = out[name]
        assert rc == 0, log[-4000:]
        slices.append([o[1] for o in _outcomes(_stored(path))])
    assert sorted(slices[0] + slices[1]) == sorted(CASES) and all(slices)  # a partition, neither slice empty
    assert any({"qlora_nf4_r8", "qlora_nf4_r16"} <= set(s) for s in slices)  # linked cases share a slice
    merged = tmp / "storage" / "merged" / "0001_merged.json"
    proc = _lorabench("merge", str(out["shard1"][2]), str(out["shard2"][2]), "--out", str(merged))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = _stored(merged)
    assert sorted(o[1] for o in _outcomes(data)) == sorted(CASES)
    assert [m["shard"] for m in data["machine_info"]["merged_from"]] == ["1/2", "2/2"]
    assert data["machine_info"]["merged_differences"] == []  # one machine, one configuration
    compare = _lorabench("compare", str(out["serial"][2]), str(merged), "--fail")
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert "no regression" in compare.stdout
    report = _lorabench("report", str(merged), "--out", str(tmp / "reports"))
    assert report.returncode == 0, report.stderr
    assert all(case in (tmp / "reports" / "summary.md").read_text() for case in CASES)
    again = _lorabench("merge", str(out["shard1"][2]), str(out["shard2"][2]), "--out", str(merged))
    assert again.returncode == 2 and "not overwriting" in again.stderr
