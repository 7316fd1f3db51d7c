"""Adapters: size on disk, logit comparison, and the save/reload/merge parity check on a real tiny model."""

from __future__ import annotations

import pytest
import torch

from lorabench.models.adapters import adapter_size_bytes, check_adapter, compare_logits, record_adapter
from lorabench.config import BenchConfig, resolve
from lorabench.models.loading import apply_adapter, load_model, load_tokenizer
from lorabench.result import CaseResult


def test_compare_logits_reads_only_masked_positions():
    a = torch.zeros(1, 3, 4)
    b = a.clone()
    b[0, 2] = torch.tensor([0.0, 0.0, 0.0, 5.0])  # a padding position: differs, but is not compared
    b[0, 1, 0] = 0.25
    diff = compare_logits(a, b, torch.tensor([[1, 1, 0]]))
    assert diff.max_abs == pytest.approx(0.25)
    assert diff.argmax_agree_pct == 100.0  # argmax of [0.25, 0, 0, 0] is still index 0
    b[0, 0, 3] = 1.0
    assert compare_logits(a, b, torch.tensor([[1, 1, 0]])).argmax_agree_pct == 50.0


def test_compare_logits_rejects_mismatched_shapes_and_empty_masks():
    with pytest.raises(ValueError, match="different shapes"):
        compare_logits(torch.zeros(1, 2, 3), torch.zeros(1, 3, 3), torch.ones(1, 2))
    with pytest.raises(ValueError, match="no position"):
        compare_logits(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2))


def test_adapter_size_needs_a_saved_adapter(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved peft adapter"):
        adapter_size_bytes(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "adapter_config.json").write_text("{}")
    assert adapter_size_bytes(tmp_path) == 102


def test_full_fine_tuning_has_no_adapter_figures():
    result = CaseResult("c", "full", "m", "d", "cpu", {})
    record_adapter(result, None, reason="no adapter")
    assert "adapter_mib" not in result.metrics and result.absent["merge_max_abs_diff"] == "no adapter"


def _trained_looking_adapter(source, config, device):
    """A LoRA model whose B matrices are non-zero (as after training), seeded, without training."""
    torch.manual_seed(0)  # before peft draws A, so every quantization gets the same adapter
    model = apply_adapter(load_model(source, config, device).model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return model


QUANTS = ("none", "int8", "nf4")


def _config(quant: str, source):
    # bf16 on any CPU (emulated where it has no bf16 instructions): the tolerances below are those of a bf16
    # base, and `dtype: auto` gives fp32 on an AVX2-only machine
    config = BenchConfig(f"p_{quant}", quant=quant, double_quant=quant == "nf4", dtype="bf16")
    return resolve(config, source.defaults, torch.device("cpu"))


@pytest.fixture(scope="module")
def parity(tiny_llama, cpu, tmp_path_factory):
    """check_adapter on a bf16, an int8 and an NF4 base, same seeded adapter values."""
    tokenizer = load_tokenizer(tiny_llama)
    batch = tokenizer(["rev 4821=", "rev 0093=", "c:1234>"], return_tensors="pt", padding=True)
    out = {}
    for quant in QUANTS:
        config = _config(quant, tiny_llama)
        model = _trained_looking_adapter(tiny_llama, config, cpu)
        directory = tmp_path_factory.mktemp(f"adapter-{quant}")
        out[quant] = (check_adapter(model, tiny_llama, config, cpu, dict(batch), directory), directory)
    return out


def test_reloaded_adapter_reproduces_the_trained_logits_exactly(parity):
    for check, directory in parity.values():
        assert check.reload.max_abs == 0.0 and check.reload.argmax_agree_pct == 100.0
        assert check.adapter_bytes == adapter_size_bytes(directory) > 0


def test_merged_and_unmerged_logits_agree_within_the_stated_tolerance(parity):
    # The tolerance thresholds.yaml states for every LoRA case: max |logit| difference <= 0.5
    # (logits of this model span about +-20) on bf16 and int8 bases. Of these 25 positions one
    # may flip its greedy token where two logits lie within the rounding (the gates ask >= 98%
    # over 32 held-out rows); NF4, whose merge re-quantizes every weight, keeps >= 80%.
    for quant in ("none", "int8"):
        check, _ = parity[quant]
        assert 0.0 < check.merge.max_abs <= 0.5, quant
        assert check.merge.argmax_agree_pct >= 95.0, quant
    assert parity["nf4"][0].merge.argmax_agree_pct >= 80.0


def _dequantized(layer):
    from peft.utils.integrations import dequantize_bnb_weight

    if hasattr(layer.weight, "quant_state") or hasattr(layer, "state"):
        return dequantize_bnb_weight(layer.weight, getattr(layer, "state", None)).float()
    return layer.weight.detach().float()


@pytest.fixture(scope="module")
def merged_weights(tiny_llama, cpu):
    """Per base: (merged layer, merged weight, exact W + scaling * B A) of layer 0's q_proj."""
    out = {}
    for quant in QUANTS:
        model = _trained_looking_adapter(tiny_llama, _config(quant, tiny_llama), cpu)
        lora = model.base_model.model.model.layers[0].self_attn.q_proj
        with torch.no_grad():
            exact = _dequantized(lora.base_layer) + lora.get_delta_weight("default").float()
        layer = model.merge_and_unload().model.layers[0].self_attn.q_proj
        out[quant] = (layer, _dequantized(layer), exact)
    return out


def _relative_error(merged, exact) -> float:
    return ((merged - exact).abs().max() / exact.abs().max()).item()


def test_merging_into_bf16_rounds_w_plus_ba_only(merged_weights):
    layer, merged, exact = merged_weights["none"]
    assert layer.weight.dtype == torch.bfloat16
    assert 0.0 < _relative_error(merged, exact) <= 2 ** -7  # two bf16 roundings (of B A, of the sum)


def test_merging_into_a_quantized_base_quantizes_the_sum_again(merged_weights):
    """peft dequantizes W, adds B A and quantizes the sum: the merged model stays 4-/8-bit and
    carries a fresh quantization error, bounded by the format's grid."""
    import bitsandbytes as bnb

    bf16 = _relative_error(*merged_weights["none"][1:])
    int8_layer, int8, int8_exact = merged_weights["int8"]
    assert isinstance(int8_layer, bnb.nn.Linear8bitLt) and int8_layer.weight.dtype == torch.int8
    # int8 rows are scaled by their absmax / 127: rounding is at most half a step, plus the fp16 cast
    assert 0.0 < _relative_error(int8, int8_exact) <= 1 / 127
    nf4_layer, nf4, nf4_exact = merged_weights["nf4"]
    assert isinstance(nf4_layer, bnb.nn.Linear4bit) and nf4_layer.weight.dtype == torch.uint8
    # NF4's widest gap (between -1 and -0.696 of the block absmax) halved bounds the rounding
    assert 10 * bf16 < _relative_error(nf4, nf4_exact) <= 0.16
