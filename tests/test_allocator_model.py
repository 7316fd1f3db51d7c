"""The caching allocator's replay (lorabench.estimate.allocator) against the rules of
c10/cuda/CUDACachingAllocator.cpp, and the figures a CUDA prediction names."""

from __future__ import annotations

import pytest

from lorabench.estimate.allocator import CachingAllocator, replay, round_size, segment_size

MiB = 1 << 20


def test_requests_round_to_512_bytes_and_take_the_segment_of_their_size():
    assert (round_size(1), round_size(512), round_size(513), round_size(0)) == (512, 512, 1024, 512)
    assert segment_size(512) == 2 * MiB  # small pool: 2 MiB segments
    assert segment_size(1 * MiB) == 2 * MiB
    assert segment_size(1 * MiB + 512) == 20 * MiB  # 1-10 MiB: a 20 MiB segment to split
    assert segment_size(10 * MiB) == 10 * MiB  # 10 MiB and more: rounded up to 2 MiB
    assert segment_size(11 * MiB) == 12 * MiB


def test_small_requests_share_a_2_mib_segment_and_large_ones_split_20_mib():
    a = CachingAllocator()
    for i in range(4):
        a.malloc(("s", i), 1000)  # 1024-byte blocks in one small segment
    assert (a.allocated, a.reserved) == (4 * 1024, 2 * MiB)
    a.malloc("l1", 3 * MiB)
    a.malloc("l2", 3 * MiB)  # the first 20 MiB segment's remainder (17 MiB) holds it
    assert a.reserved == 22 * MiB and a.allocated == 4 * 1024 + 6 * MiB
    a.malloc("big", 12 * MiB)  # the 14 MiB left of that segment holds it
    assert a.reserved == 22 * MiB
    a.malloc("bigger", 12 * MiB)  # no free block of 12 MiB left: its own segment, 12 MiB
    assert a.reserved == 34 * MiB


def test_freed_blocks_merge_and_are_reused_best_fit():
    a = CachingAllocator()
    a.malloc("x", 3 * MiB)
    a.malloc("y", 3 * MiB)
    a.free("x")
    a.free("y")  # merges with x and the tail: one free 20 MiB block again
    a.malloc("z", 15 * MiB)
    assert a.reserved == 20 * MiB  # reused, no new segment
    assert a.peak_allocated == 15 * MiB


def test_a_block_not_worth_splitting_counts_whole_as_allocated():
    a = CachingAllocator()
    a.malloc("x", 3 * MiB)
    a.free("x")
    a.malloc("y", 19 * MiB + 256 * 1024)  # the free 20 MiB block: the rest (0.75 MiB) is not split off
    assert a.allocated == 20 * MiB


def test_replay_puts_the_persistent_workspaces_after_the_model_state():
    events = [(1, 12 * MiB), (2, 4 * MiB), (2, None), (3, 4 * MiB)]
    peaks = replay(events, persistent=(32 * MiB,), after=1)
    # 12 MiB state, then the 32 MiB workspace, then a 4 MiB block freed and taken again (same 20 MiB segment)
    assert peaks.reserved == 12 * MiB + 32 * MiB + 20 * MiB
    assert peaks.allocated == 12 * MiB + 32 * MiB + 4 * MiB


def test_a_storage_id_used_again_is_a_new_allocation():
    events = [(7, 1000), (7, None), (7, 3000), (7, None)]
    assert replay(events).allocated == 3072


@pytest.fixture(scope="module")
def cuda_prediction():
    from lorabench.config import BenchConfig
    from lorabench.estimate import hf_config, predict

    config = BenchConfig("q", method="lora", quant="nf4", double_quant=True, gradient_checkpointing=True)
    return predict(hf_config("tiny-llama"), config, batch_size=4, seq_len=16, target="cuda")


def test_a_cuda_prediction_names_each_figure_with_its_counter(cuda_prediction):
    figures = {f.name: f for f in cuda_prediction.figures()}
    assert {name: f.counter for name, f in figures.items()} == {
        "tensor": "tensor_peak_mib", "allocated": "peak_alloc_mib", "reserved": "peak_reserved_mib",
        "device": "device_used_max_mib"}
    tensor, allocated, reserved, device = (figures[n].mib for n in ("tensor", "allocated", "reserved", "device"))
    workspace = cuda_prediction.components_mib["cublas_workspace"]
    context = cuda_prediction.components_mib["cuda_context"]
    assert tensor + workspace <= allocated <= reserved < device
    assert device == pytest.approx(reserved + context)  # the context is in the device total only
    assert allocated < tensor + workspace + context / 2  # ... and never in an allocator figure
    assert cuda_prediction.peak_mib == device  # budgets are checked against the device total
    assert sum(cuda_prediction.components_mib.values()) == pytest.approx(device)


def test_a_cpu_prediction_has_tensor_bytes_only():
    from lorabench.config import BenchConfig
    from lorabench.estimate import hf_config, predict

    prediction = predict(hf_config("tiny-llama"), BenchConfig("l", method="lora"), batch_size=2, seq_len=8,
                         target="cpu")
    assert [f.name for f in prediction.figures()] == ["tensor"]
    assert prediction.peak_mib == prediction.tensor_mib


def test_paged_8bit_adam_state_is_outside_the_allocator_but_in_the_device_total():
    # bitsandbytes' Optimizer2State, 8 bits: per parameter of n >= 4096 elements, state1 and state2 uint8
    # (n each) and absmax1/absmax2 float32 (one per block of 256); paged: buffers of n >= 1e5 elements
    # in CUDA managed memory (cudaMallocManaged), not the caching allocator
    from transformers import LlamaConfig

    from lorabench.config import BenchConfig
    from lorabench.estimate import predict

    hf = LlamaConfig(hidden_size=64, intermediate_size=8192, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=512)
    rank = 16
    shape = dict(batch_size=1, seq_len=8, target="cuda")
    plain = predict(hf, BenchConfig("a", method="lora", rank=rank, optimizer="adamw_8bit"), **shape)
    paged = predict(hf, BenchConfig("p", method="lora", rank=rank, optimizer="paged_adamw_8bit"), **shape)
    assert plain.tensor.components == paged.tensor.components  # the same tensors
    # lora_B of gate_proj and up_proj, lora_A of down_proj: 16 x 8192 elements each; state1 + state2 uint8
    assert paged.allocator.managed == 3 * 2 * rank * 8192
    assert plain.allocator.managed == 0
    assert paged.device_mib - paged.reserved_mib > plain.device_mib - plain.reserved_mib
