"""Inference of the fine-tuned model: base, adapter, merged, NF4 and int8 bases with the adapter.

Each variant loads on its own, then pytest-benchmark times greedy generate calls of batch 1
(warm-up calls separated from the measured rounds); time to first token and decode rate come
from per-token stamps of a streamer. The variant's generations on held-out prompts are then
compared with the base model's (semantic drift). Gates are in thresholds.yaml under the
variant ids (infer_*).
"""

import pytest

from lorabench.kinds.inference import MEASURED_CALLS, NEW_TOKENS, VARIANTS, WARMUP_CALLS, InferenceParams
from lorabench.run.launch import resolve_case
from lorabench.pytest_plugin import assert_case_passed


def _param(variant):
    return pytest.param(variant, id=variant.id, marks=[getattr(pytest.mark, m) for m in ("inference",) + variant.markers])


@pytest.mark.parametrize("variant", [_param(v) for v in VARIANTS])
def test_inference(variant, bench_session, inference_adapter, inference_prompts, model_source, tokenizer_for,
                   measure_inference):
    model, dataset = bench_session.matrix.models[0], bench_session.matrix.datasets[0]
    adapter_dir, trained = inference_adapter
    params = InferenceParams(variant, adapter_dir=str(adapter_dir), prompt=inference_prompts[0],
                             prompts=tuple(inference_prompts), new_tokens=NEW_TOKENS, warmup=WARMUP_CALLS,
                             repeats=MEASURED_CALLS)
    case = resolve_case("inference", case_id=variant.id, model=model, dataset=dataset, device=bench_session.device,
                        config=variant.base_config(), source=model_source(model), params=params,
                        data=tokenizer_for(model))
    assert_case_passed(measure_inference(case, trained))
