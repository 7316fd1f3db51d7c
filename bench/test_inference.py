"""Inference of the fine-tuned model: base, adapter, merged, NF4 and int8 bases with the adapter.

Each variant loads on its own, then pytest-benchmark times greedy generate calls of batch 1
(warm-up calls separated from the measured rounds); time to first token and decode rate come
from per-token stamps of a streamer. The variant's generations on held-out prompts are then
compared with the base model's (semantic drift). Gates are in thresholds.yaml under the
variant ids (infer_*).
"""

import pytest

from fixtures.case import assert_gates_pass
from fixtures.inference import record_variant_drift
from lorabench import allure_results
from lorabench.inference import VARIANTS, InferenceRun

WARMUP_CALLS = 2  # the first generate call pays one-off costs (kernel selection, caches): ~6x a later one here
MEASURED_CALLS = 6
NEW_TOKENS = 16


def _param(variant):
    return pytest.param(variant, id=variant.id, marks=[getattr(pytest.mark, m) for m in ("inference",) + variant.markers])


@pytest.mark.parametrize("variant", [_param(v) for v in VARIANTS])
def test_inference(variant, benchmark, bench_session, inference_adapter, inference_prompts, base_generations, drift_encoder,
                   variant_generations, model_source, tokenizer_for, request):
    model, dataset = bench_session.matrix.models[0], bench_session.matrix.datasets[0]
    adapter_dir, trained = inference_adapter
    run = InferenceRun(variant, source=model_source(model), adapter_dir=adapter_dir, tokenizer=tokenizer_for(model),
                       prompt=inference_prompts[0], device=bench_session.device, model_name=model, dataset=dataset,
                       new_tokens=NEW_TOKENS, warmup=WARMUP_CALLS, repeats=MEASURED_CALLS)
    benchmark.group = f"inference {model} {dataset}"
    run.prepare()
    benchmark.pedantic(run.call, rounds=MEASURED_CALLS, warmup_rounds=WARMUP_CALLS, iterations=1)
    texts = variant_generations[variant.id] = run.finish(inference_prompts)
    result = run.result
    result.config["adapter_from"] = trained.case_id
    record_variant_drift(result, variant, texts, base_generations, variant_generations, drift_encoder)
    bench_session.gate(result, wildcard=False)
    bench_session.results.append(result)
    benchmark.extra_info.update(result.to_extra_info())
    if allure_results.enabled(request.config):
        allure_results.set_parameters(variant.id, model, dataset, result.config)
        allure_results.attach_result(result)
    assert_gates_pass(result)
