"""The memory model: quantized layouts byte for byte, meta runs against real ones, presets, extrapolation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorabench.config import BenchConfig
from lorabench.estimate import hf_config, predict, with_layers
from lorabench.backends.bitsandbytes import _code_cache_untouched, _int8params, _params4bit
from lorabench.meters.footprint import unique_bytes
from lorabench.models.presets import names
from lorabench.meters.tensor_tracker import model_state_tensors
from lorabench.models.zoo import ZOO

FORMATS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False), ("int8", False), ("none", False)]


def expected_bytes(quant: str, double_quant: bool, out_features: int, in_features: int) -> int:
    """A linear layer's bytes as bitsandbytes lays them out, from its documented format."""
    n = out_features * in_features
    if quant == "none":
        return 2 * n  # bf16
    if quant == "int8":
        return n + 4 * out_features  # int8 matrix + one fp32 absmax scale per row (SCB)
    blocks = math.ceil(n / 64)  # 4-bit: blocks of 64 values
    packed = math.ceil(n / 2)  # two 4-bit values per byte
    code = 16 * 4  # the 16 NF4 / FP4 levels, fp32
    if not double_quant:
        return packed + 4 * blocks + code  # fp32 absmax per block
    # double quantization: absmax as uint8 in blocks of 256 with their own fp32 absmax, the
    # 256-entry fp32 dynamic code book, and the fp32 mean subtracted before (offset)
    return packed + blocks + 4 * math.ceil(blocks / 256) + 256 * 4 + 4 + code


def _layer(quant: str, double_quant: bool, out_features: int, in_features: int, device: str):
    import bitsandbytes as bnb

    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16, device="cpu")
    if device == "meta":
        weight = torch.empty_like(weight, device="meta")
    if quant == "none":
        return torch.nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16, device=device)
    with torch.device("meta"):
        layer = (bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False) if quant == "int8"
                 else bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                                        compress_statistics=double_quant, quant_type=quant))
    if device == "meta":
        with _code_cache_untouched():
            layer.weight = (_int8params if quant == "int8" else _params4bit)(layer, weight)
        return layer
    if quant == "int8":
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to("cpu")
    else:
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant,
                                         quant_type=quant, module=layer).to("cpu")
    return layer


def _state_bytes(module) -> int:
    params, buffers = model_state_tensors(module)
    return unique_bytes(params + buffers)


@pytest.mark.parametrize(("quant", "double_quant"), FORMATS)
@settings(max_examples=15)
@given(out_features=st.integers(1, 700), in_features=st.integers(1, 700))
def test_a_quantized_layer_takes_the_documented_bytes_on_meta_and_on_the_cpu(quant, double_quant, out_features,
                                                                             in_features):
    expected = expected_bytes(quant, double_quant, out_features, in_features)
    assert _state_bytes(_layer(quant, double_quant, out_features, in_features, "meta")) == expected
    assert _state_bytes(_layer(quant, double_quant, out_features, in_features, "cpu")) == expected


def test_the_meta_build_leaves_bitsandbytes_code_book_cache_as_it_was():
    from bitsandbytes import functional

    before = dict(functional.name2qmap)
    _layer("nf4", True, 64, 64, "meta")
    assert functional.name2qmap.keys() == before.keys()
    assert all(v.device.type != "meta" for v in functional.name2qmap.values())


def _measured_peak(spec: str, config: BenchConfig) -> tuple[int, tuple[int, int]]:
    """A real CPU run of the zoo family's architecture (random weights, no pre-training): tensor peak over 3 steps."""
    from transformers import AutoModelForCausalLM, set_seed

    from lorabench.config import resolve
    from lorabench.data.tasks import collator, load_task_data
    from lorabench.backends.precision import torch_dtype
    from lorabench.models.loading import apply_adapter
    from lorabench.kinds.finetune import tokenize_task
    from lorabench.meters.tensor_tracker import TensorTracker
    from lorabench.training.loop import StepRunner, make_trainer
    from lorabench.models.zoo import build_tokenizer, model_config

    set_seed(0)
    config = resolve(config, ZOO[spec].defaults, torch.device("cpu")).replace(batch_size=4, steps=4, warmup_steps=3)
    tokenizer = build_tokenizer()
    model = AutoModelForCausalLM.from_config(model_config(ZOO[spec], tokenizer), dtype=torch_dtype(config.dtype))
    model = apply_adapter(model, config)
    tokens = tokenize_task(load_task_data("digit-reverse"), tokenizer, config.seq_len)
    trainer = make_trainer(model, tokenizer, tokens.train, collator(tokenizer), config, torch.device("cpu"))
    runner = StepRunner(trainer)
    tracker = TensorTracker(model, trainer.optimizer, device="cpu")
    for _ in range(3):
        with tracker:
            runner.step()
    peak = tracker.peak()
    tracker.close()
    return peak.peak_bytes, runner.record.shapes[0]


@pytest.mark.parametrize("spec", sorted(ZOO))
def test_the_meta_run_predicts_a_real_run_of_each_zoo_family(spec):
    config = BenchConfig("lora", method="lora")
    measured, (batch_size, seq_len) = _measured_peak(spec, config)
    predicted = predict(hf_config(spec), config, batch_size=batch_size, seq_len=seq_len, target="cpu")
    # what the prediction leaves out: the step loop's own scalars and the collator's few small tensors
    assert predicted.tensor.peak_bytes == pytest.approx(measured, rel=2e-4)
    assert sum(predicted.tensor.components.values()) == predicted.tensor.peak_bytes


@pytest.mark.parametrize("spec", sorted(ZOO))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_extrapolating_from_two_and_three_layers_gives_the_full_depth_exactly(spec, checkpointing):
    config = BenchConfig("q", method="lora", quant="nf4", double_quant=True, gradient_checkpointing=checkpointing)
    hf = hf_config(spec)
    full = predict(hf, config, batch_size=2, seq_len=24, target="cuda")
    short = predict(hf, config, batch_size=2, seq_len=24, target="cuda", extrapolate_layers=True)
    assert short.layers_run == (2, 3) and full.layers_run == (4,)
    assert short.tensor.components == full.tensor.components


def test_extrapolation_follows_each_phase_when_the_peak_moves_to_another_with_depth():
    # Full fine-tuning of a deep, narrow model: with 3 layers the logits make the backward pass the peak,
    # with 24 the optimizer step (every gradient, the state and foreach AdamW's scratch) outgrows it.
    from transformers import LlamaConfig

    hf = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=24, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=4096, tie_word_embeddings=False)
    config = BenchConfig("full", method="full", gradient_checkpointing=True)
    shape = dict(batch_size=1, seq_len=64, target="cuda")
    three = predict(with_layers(hf, 3), config, **shape)
    full = predict(hf, config, **shape)
    short = predict(hf, config, **shape, extrapolate_layers=True)
    assert (three.tensor.peak_phase, full.tensor.peak_phase) == ("backward", "optimizer")
    assert short.layers_run == (2, 3)
    assert short.tensor.peak_bytes == full.tensor.peak_bytes
    assert short.tensor.components == full.tensor.components


def test_a_70b_model_is_predicted_from_two_short_runs():
    prediction = predict(hf_config("preset:llama-3.1-70b"), BenchConfig("q", method="lora", quant="nf4",
                                                                        double_quant=True, gradient_checkpointing=True),
                         batch_size=1, seq_len=256, target="cuda", extrapolate_layers=True)
    assert prediction.layers_run == (2, 3)
    h, i, kv, layers, vocab, rank = 8192, 28672, 8 * 128, 80, 128256, 16
    linears = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # q k v o gate up down: (out, in)
    quantized = layers * sum(expected_bytes("nf4", True, o, n) for o, n in linears)
    lora = layers * sum(rank * (o + n) for o, n in linears) * 4  # fp32 adapters (peft's autocast)
    # prepare_model_for_kbit_training upcasts everything left unquantized to fp32: embeddings, lm_head, norms
    upcast = (2 * vocab * h + (2 * layers + 1) * h) * 4
    assert prediction.tensor.components["params"] == quantized + lora + upcast
    assert set(prediction.components_mib) >= {"cuda_context", "cublas_workspace", "allocator_rounding"}


PUBLISHED_PARAMETERS = {  # billions, from each model card
    "llama-2-7b": 6.74, "llama-3.1-8b": 8.03, "llama-3.2-1b": 1.24, "llama-3.2-3b": 3.21, "llama-3.1-70b": 70.6,
    "mistral-7b": 7.25, "qwen2.5-0.5b": 0.494, "qwen2.5-1.5b": 1.54, "qwen2.5-7b": 7.62, "gemma-2-2b": 2.61,
    "phi-3-mini": 3.82, "llama-7b": 6.74, "llama-13b": 13.0, "llama-30b": 32.5, "llama-65b": 65.2,
}


@pytest.mark.parametrize("name", names())
def test_each_preset_builds_with_its_published_size(name):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(f"preset:{name}"))
    count = sum(p.numel() for p in model.parameters()) / 1e9
    assert count == pytest.approx(PUBLISHED_PARAMETERS[name], rel=0.01)


def test_an_unknown_preset_names_the_known_ones():
    from lorabench.errors import ModelError

    with pytest.raises(ModelError, match="no such preset; known: .*llama-3.1-8b"):
        hf_config("preset:llama-9")


def _canonical(events):
    """A tracked step's allocations and frees with each storage named by its birth order, not its id()."""
    name, out = {}, []
    for born, (key, nbytes) in enumerate(events):
        if nbytes is not None:
            name[key] = born  # a freed storage's id can come back for a new one
        out.append((name.get(key), nbytes))
    return out


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_cached_meta_kernels_give_the_step_that_running_every_kernel_gives(quant, monkeypatch):
    # the kernel cache is the fit search's speed-up: the same storages, born and freed in the same order
    from lorabench.estimate import Predictor, step
    from lorabench.estimate.build import meta_model

    config = BenchConfig("q", method="lora", quant=quant, double_quant=quant == "nf4", gradient_checkpointing=True)
    resolved = Predictor(hf_config("tiny-llama"), config, target="cuda")._resolved(2, 16)
    shapes = ((2, 16), (3, 24), (2, 16))  # the last one's every kernel call is answered from the cache

    def tracked(cached: bool) -> list:
        monkeypatch.setattr(step, "CACHE_KERNELS", cached)
        model = meta_model(hf_config("tiny-llama"), resolved)
        trainer = step.prepared_trainer(model, resolved, "cuda")
        steps = [step.track_training(model, resolved, batch_size=b, seq_len=t, target="cuda", trainer=trainer)
                 for b, t in shapes]
        return [(_canonical(s.events), s.state_events, s.managed_bytes, s.phases) for s in steps]

    monkeypatch.setattr(step, "_KERNEL_OUTPUTS", {})
    uncached = tracked(False)
    assert not step._KERNEL_OUTPUTS
    cached = tracked(True)
    assert step._KERNEL_OUTPUTS, "the cached runs kept nothing: the cache was not used"
    assert cached == uncached


def test_the_kernel_cache_answers_pure_calls_and_runs_views_and_resizes():
    from lorabench.estimate.step import MetaKernelCache

    store = {}
    a = torch.empty(4, 6, dtype=torch.bfloat16, device="meta")
    with MetaKernelCache(store) as cache:
        first = a * 2
        second = a * 2  # same operator and input layout: answered from the first call
        assert (cache.misses, cache.hits) == (1, 1)
        assert second.untyped_storage()._cdata != first.untyped_storage()._cdata  # a new storage, not the old one
        assert (second.shape, second.stride(), second.dtype) == (first.shape, first.stride(), first.dtype)
        a * 2.0  # another scalar type is another call
        assert cache.misses == 2
        sliced = a[:, 1:].contiguous()
        assert sliced.shape == (4, 5) and sliced.untyped_storage().nbytes() == 4 * 5 * 2
        view = a.t()  # a view aliases its input: always run
        assert view.untyped_storage()._cdata == a.untyped_storage()._cdata
        hits = cache.hits
        assert a.add_(1) is a and a.add_(1) is a  # in place: the argument itself, answered the second time
        assert cache.hits == hits + 1
        b = torch.empty(2, device="meta")
        b.resize_(8)  # changes its argument's layout: always run
        assert b.shape == (8,)
        bypassed = cache.bypassed
        b.resize_(8)
        assert cache.bypassed == bypassed + 1
