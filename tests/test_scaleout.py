"""Scale-out logic without pytest runs: shards, gate groups, worker pins, worker benchmarks, merged runs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorabench.run import scaleout
from lorabench.errors import ConfigError, HistoryError
from lorabench.matrix import DEFAULT_CONFIGS, single_device_id
from lorabench.commands.merge import merge_runs

IDS = [c.id for c in DEFAULT_CONFIGS]


@pytest.mark.parametrize("text", ["", "1", "0/2", "3/2", "1/0", "a/b", "1/2/3"])
def test_a_bad_shard_is_refused_naming_it(text):
    with pytest.raises(ConfigError, match="--shard"):
        scaleout.parse_shard(text)


@given(st.lists(st.one_of(st.none(), st.sampled_from("abc")), max_size=30), st.integers(1, 5))
def test_shards_partition_the_items_and_keep_each_group_whole(groups, count):
    slices = [scaleout.shard_items(groups, scaleout.Shard(i, count)) for i in range(1, count + 1)]
    flat = sorted(p for s in slices for p in s)
    assert flat == list(range(len(groups)))  # every item runs in exactly one slice
    for name in set(g for g in groups if g):
        holders = {i for i, s in enumerate(slices) if any(groups[p] == name for p in s)}
        assert len(holders) == 1, f"group {name} split over slices {holders}"
    sizes = [len(s) for s in slices]
    biggest_unit = max([groups.count(g) for g in set(groups) if g] + [1])
    assert max(sizes) - min(sizes) <= biggest_unit


def test_relative_gates_link_configurations_within_one_model_and_data_set():
    items = [scaleout.GatedItem(scope, c) for scope in ("m|d1", "m|d2") for c in IDS] + [None]
    rules = [("qlora_nf4_r16", "qlora_nf4_r8"), ("qlora_nf4_r64", "qlora_nf4_r8"), ("qlora_fp4", "qlora_nf4")]
    groups = scaleout.gate_groups(items, rules)
    by = {(i.scope, i.config_id): g for i, g in zip(items, groups) if i is not None}
    assert by[("m|d1", "qlora_nf4_r16")] == by[("m|d1", "qlora_nf4_r64")] == by[("m|d1", "qlora_nf4_r8")]
    assert by[("m|d1", "qlora_nf4_r8")] != by[("m|d2", "qlora_nf4_r8")]  # another data set: gates never cross
    assert by[("m|d1", "qlora_fp4")] == by[("m|d1", "qlora_nf4")] != by[("m|d1", "qlora_nf4_r8")]
    assert by[("m|d1", "qlora_nf4_r32")] is None and by[("m|d1", "full")] is None  # unlinked: anywhere
    assert groups[-1] is None


def test_a_wildcard_rule_links_every_configuration_to_its_reference():
    items = [scaleout.GatedItem("s", c) for c in ("full", "lora", "qlora_nf4")]
    assert len(set(scaleout.gate_groups(items, [("*", "full")]))) == 1
    # a reference that is not collected links nothing: the gate is "not evaluated" wherever the case runs
    assert scaleout.gate_groups(items[1:], [("*", "full")]) == [None, None]


def test_a_multi_process_case_joins_its_single_device_configuration():
    ddp = DEFAULT_CONFIGS[1].replace(id="lora_ddp2", world_size=2, strategy="ddp")
    assert single_device_id(ddp, DEFAULT_CONFIGS) == "lora"
    assert single_device_id(DEFAULT_CONFIGS[1], DEFAULT_CONFIGS) is None
    items = [scaleout.GatedItem("s", "lora"), scaleout.GatedItem("s", "lora_ddp2", "lora")]
    first, second = scaleout.gate_groups(items, [])
    assert first == second is not None


def test_each_worker_gets_its_gpu_and_a_share_of_the_cores():
    pins = [scaleout.plan_pin(f"gw{i}", 3, ["0", "1"], 8) for i in range(3)]
    assert [p.gpu for p in pins] == ["0", "1", "0"]  # more workers than GPUs: they share, in turn
    assert {p.threads for p in pins} == {2}
    assert scaleout.plan_pin("gw0", 4, [], 2).threads == 1  # never zero threads
    assert scaleout.plan_pin("gw1", 2, ["5", "7"], 4, use_gpu=False).gpu is None
    assert scaleout.visible_gpus({"CUDA_VISIBLE_DEVICES": "4,6"}, lambda: 8) == ["4", "6"]
    assert scaleout.visible_gpus({}, lambda: 2) == ["0", "1"]


def test_pinning_sets_the_environment_the_case_processes_inherit():
    import torch

    threads = torch.get_num_threads()
    env = {"CUDA_VISIBLE_DEVICES": "3,5"}
    try:
        pin = scaleout.pin_worker("gw1", 2, environ=env)
    finally:
        torch.set_num_threads(threads)
    assert env["CUDA_VISIBLE_DEVICES"] == "5" and pin.gpu == "5"
    assert env["OMP_NUM_THREADS"] == str(pin.threads) == str(max(1, scaleout.cpu_cores() // 2))


def test_a_worker_benchmark_answers_as_pytest_benchmark_metadata_does():
    data = {"group": "g", "name": "t[a]", "fullname": "f::t[a]", "params": {"x": "1"}, "param": "a",
            "extra_info": {"case_id": "a"}, "options": {},
            "stats": {"min": 1.0, "max": 3.0, "median": 2.0, "rounds": 3, "data": [1.0, 2.0, 3.0], "iterations": 1}}
    bench = scaleout.WorkerBenchmark(data, position=4)
    assert bench and not bench.has_error and bench["median"] == 2.0 and bench["fullname"] == "f::t[a]"
    assert bench.as_dict(include_data=True) == data
    assert "data" not in bench.as_dict(include_data=False)["stats"]
    flat = bench.as_dict(include_data=False, flat=True)
    assert flat["median"] == 2.0 and "stats" not in flat


def _run(case_ids, *, commit="c0ffee", shard=None, **machine):
    info = {"cpu": "x86", "torch_threads": 2, "load_avg_1m_start": 1.0, **machine}
    if shard:
        info["shard"] = shard
    return {"machine_info": info, "commit_info": {"id": commit}, "datetime": f"2026-12-0{len(case_ids)}",
            "benchmarks": [{"name": f"t[{c}]", "fullname": f"f::t[{c}]", "extra_info": {"case_id": c}}
                           for c in case_ids]}


def test_merging_slices_keeps_every_case_and_flags_machine_differences():
    merged = merge_runs([("a.json", _run(["lora"], shard="1/2")),
                         ("b.json", _run(["full", "qlora_nf4"], shard="2/2", cpu="arm", load_avg_1m_start=3.0))])
    data = merged.data
    assert [b["extra_info"]["case_id"] for b in data["benchmarks"]] == ["lora", "full", "qlora_nf4"]
    assert data["machine_info"]["merged_differences"] == ["cpu: 'x86' (a.json), 'arm' (b.json)"]
    assert data["machine_info"]["load_avg_1m_start"] == 3.0  # the busiest slice
    assert [m["shard"] for m in data["machine_info"]["merged_from"]] == ["1/2", "2/2"]
    assert merged.warnings == ["the slices differ in cpu: 'x86' (a.json), 'arm' (b.json)"]


def test_merging_warns_when_a_slice_is_missing():
    merged = merge_runs([("a", _run(["lora"], shard="1/3")), ("c", _run(["full"], shard="3/3"))])
    assert merged.warnings == ["slices 2/3 are missing: the merged run is incomplete"]


def test_merging_refuses_a_case_run_twice_or_runs_of_two_commits():
    with pytest.raises(HistoryError, match="'lora' is in a and in b"):
        merge_runs([("a", _run(["lora"])), ("b", _run(["lora", "full"]))])
    with pytest.raises(HistoryError, match="different commits"):
        merge_runs([("a", _run(["lora"], commit="aaa")), ("b", _run(["full"], commit="bbb"))])
    with pytest.raises(HistoryError, match="at least two"):
        merge_runs([("a", _run(["lora"]))])


def test_compare_names_the_differences_inside_a_merged_run():
    from lorabench.gates.compare import machine_warnings

    warnings = machine_warnings({"cpu": "x"}, {"cpu": "x", "merged_differences": ["cpu: 'x' (a), 'y' (b)"]})
    assert warnings == ["run B joins slices whose machines differ in cpu: 'x' (a), 'y' (b); its figures may not "
                        "be comparable with one another"]


def test_the_sharded_ci_example_runs_every_slice_and_joins_them():
    from pathlib import Path

    import yaml

    workflow = yaml.safe_load((Path(__file__).resolve().parent.parent / ".ci/examples/github-bench-gate-sharded.yml")
                              .read_text())
    bench, gate = workflow["jobs"]["bench"], workflow["jobs"]["gate"]
    shards = bench["strategy"]["matrix"]["shard"]
    run = " ".join(step.get("run", "") for step in bench["steps"])
    assert f"--shard ${{{{ matrix.shard }}}}/{len(shards)}" in run and shards == list(range(1, len(shards) + 1))
    assert "--benchmark-json shard-${{ matrix.shard }}.json" in run
    gate_runs = [step.get("run", "") for step in gate["steps"]]
    assert any(r.startswith("python -m lorabench merge shard-*.json") for r in gate_runs)
    assert any("python -m lorabench compare --fail" in r for r in gate_runs)


def test_the_controller_finds_each_collected_bench_case_by_its_node_id():
    from lorabench.matrix import build_matrix
    from lorabench.pytest_plugin.scaleout import _gated_item

    matrix = build_matrix(models=["tiny-llama", "tiny-qwen"])
    cases = dict(zip(matrix.ids(), matrix.cases()))
    known = {"infer_base"}
    assert _gated_item("bench/test_finetune.py::test_finetune[tiny-qwen-lora_ddp2]", cases, known) == \
        scaleout.GatedItem("tiny-qwen|digit-reverse", "lora_ddp2", "lora")
    assert _gated_item("bench/test_inference.py::test_inference[infer_base]", cases, known) == \
        scaleout.GatedItem("", "infer_base")
    assert _gated_item("tests/test_x.py::test_y[fields0]", cases, known) is None  # not a bench case
    assert _gated_item("bench/test_overhead.py::test_harness_overhead", cases, known) is None
