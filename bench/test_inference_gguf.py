"""The merged model exported to GGUF, quantized to Q4_0 and Q8_0 by llama.cpp and timed through llama-cpp-python.

Needs the ``gguf`` extra; without it every case is skipped with the install command. The
merged model is the inference cases' trained adapter folded into the base; it is exported
once per session as F32, and each case quantizes that file, then times greedy generation
on the CPU exactly as bench/test_inference.py times the transformers variants (warm-up
calls apart, the prompt tokenized by the model's own tokenizer). Drift compares the
generations with the base model's and with the unmerged bf16 adapter's. Gates are in
thresholds.yaml under gguf_q4_0 and gguf_q8_0.
"""

import pytest

from lorabench.kinds.gguf import GGUF_VARIANTS, GGUFParams
from lorabench.kinds.inference import MEASURED_CALLS, NEW_TOKENS, WARMUP_CALLS
from lorabench.run.launch import resolve_case
from lorabench.pytest_plugin import assert_case_passed

pytestmark = pytest.mark.gguf


@pytest.mark.parametrize("variant", GGUF_VARIANTS, ids=[v.id for v in GGUF_VARIANTS])
def test_gguf(variant, bench_session, gguf_export, inference_prompts, adapter_generations, tokenizer_for,
              measure_inference):
    import torch

    model, dataset = bench_session.matrix.models[0], bench_session.matrix.datasets[0]
    f32_path, trained = gguf_export
    params = GGUFParams(variant, adapter_dir=None, prompt=inference_prompts[0], prompts=tuple(inference_prompts),
                        new_tokens=NEW_TOKENS, warmup=WARMUP_CALLS, repeats=MEASURED_CALLS, f32_path=str(f32_path),
                        threads=torch.get_num_threads())
    case = resolve_case("gguf", case_id=variant.id, model=model, dataset=dataset, device=torch.device("cpu"),
                        params=params, data=tokenizer_for(model))
    # adapter_generations: the unmerged adapter's answers exist before drift compares with them
    assert_case_passed(measure_inference(case, trained))
