"""What each format's layer keeps for backward with a frozen weight, emulated on the meta device and run
for real, against byte counts worked out by hand from the kernels' code.

The autograd graph behind a layer's output is walked: tensors its nodes saved (``save_for_backward``
and the SavedVariables of torch's own operators) and tensors a custom Function holds on its context
(bitsandbytes' ``ctx.tensors``, which no saved-tensor hook and so no gradient checkpointing sees).
The layer's weights and quantization state are left out, so what remains is activation memory.
"""

from __future__ import annotations

import pytest
import torch

from lorabench.estimate.device import emulate

M, K, N = 64, 96, 80  # rows (batch x tokens), in and out features


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the storage itself, also on the meta device (no data pointers there)


def _graph_tensors(output: torch.Tensor) -> list[torch.Tensor]:
    seen, stack, found = set(), [output.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                found += value if isinstance(value, (list, tuple)) else [value]
        if hasattr(node, "saved_tensors"):  # a custom Function: its saved tensors and what its ctx holds
            found += list(node.saved_tensors)
            for value in vars(node).values():
                found += value if isinstance(value, (list, tuple)) else [value]
        stack += [next_node for next_node, _ in node.next_functions]
    return [t for t in found if isinstance(t, torch.Tensor)]


def kept_bytes(output: torch.Tensor, exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages the graph behind ``output`` keeps, less ``exclude``'s and the output's."""
    skip = {_storage_key(t) for t in [*exclude, output]}
    kept = {}
    for t in _graph_tensors(output):
        key = _storage_key(t)
        if key not in skip:
            kept[key] = t.untyped_storage().nbytes()
    return sum(kept.values())


def _weights(layer: torch.nn.Module) -> list[torch.Tensor]:
    from lorabench.meters.tensor_tracker import model_state_tensors

    params, buffers = model_state_tensors(layer)
    return params + buffers


def _input(device: str, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(M, K, dtype=dtype, device=device).requires_grad_(True) if device == "cpu" else \
        torch.empty(M, K, dtype=dtype, device=device).requires_grad_(True)


def _bnb_layer(kind: str, device: str, threshold: float = 0.0):
    import bitsandbytes as bnb

    from lorabench.backends.bitsandbytes import _code_cache_untouched, _int8params, _params4bit

    weight = torch.randn(N, K, dtype=torch.bfloat16) if device == "cpu" else torch.empty(N, K, dtype=torch.bfloat16,
                                                                                          device="meta")
    with torch.device("meta"):
        layer = (bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=threshold) if kind == "int8"
                 else bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, quant_type=kind))
    if device == "meta":
        with _code_cache_untouched():
            layer.weight = (_int8params if kind == "int8" else _params4bit)(layer, weight)
    elif kind == "int8":
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to("cpu")
    else:
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=kind, module=layer).to("cpu")
    return layer


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_a_frozen_bf16_linear_keeps_nothing_but_its_weight(device):
    layer = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16, device=device).requires_grad_(False)
    x = _input(device)
    with emulate("cuda"):
        out = layer(x)
    assert kept_bytes(out, [x, *_weights(layer)]) == 0  # grad_input = grad @ W needs W only


@pytest.mark.parametrize("device", ["meta", "cpu"])
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_matmul4bit_keeps_only_the_packed_weight_and_its_state(kind, device):
    # MatMul4Bit.forward: ctx.tensors = (None, B) with B the packed weight, ctx.state its QuantState
    layer = _bnb_layer(kind, device)
    x = _input(device)
    with emulate("cuda"):
        out = layer(x)
    assert out.shape == (M, N)
    assert kept_bytes(out, [x, *_weights(layer)]) == 0
    assert kept_bytes(out, _weights(layer)) == 0  # not even its input


def test_matmul8bitlt_on_cuda_keeps_its_input_outside_save_for_backward():
    # MatMul8bitLt.forward with a frozen weight: the fast path (no CAt), threshold 0 (no subA):
    # ctx.tensors = (None, None, A), A the input itself (a reshaped view of it, in its own dtype)
    layer = _bnb_layer("int8", "meta")
    x = _input("meta")
    with emulate("cuda"):
        out = layer(x)
    assert kept_bytes(out, _weights(layer)) == M * K * 2  # bf16 input
    assert kept_bytes(out, [x, *_weights(layer)]) == 0  # nothing beyond it: no int8 copy, no transposed copy


def test_the_real_matmul8bitlt_keeps_the_input_and_the_outlier_columns():
    # bitsandbytes' CUDA autograd Function run on CPU tensors (its default-backend kernels): the saved
    # tensors are decided by the Function's Python code, the same on every device
    from bitsandbytes.autograd._functions import MatMul8bitLt, MatmulLtState

    layer = _bnb_layer("int8", "cpu", threshold=6.0)
    x = (torch.randn(M, K, dtype=torch.float16) * 0.5)
    outlier_columns = [3, 17, 40]
    x[:, outlier_columns] = 10.0  # past the threshold: LLM.int8 keeps these columns in fp16 beside the int8 product
    x.requires_grad_(True)
    state = MatmulLtState()
    state.threshold, state.has_fp16_weights, state.is_training = 6.0, False, True
    state.CB, state.SCB = layer.weight.data, layer.weight.SCB
    out = MatMul8bitLt.apply(x, layer.weight, None, None, state)
    c = len(outlier_columns)
    # A (M x K fp16) + subA = A[:, outlier_cols] (M x c fp16) + outlier_cols (c int64)
    assert kept_bytes(out, [layer.weight, layer.weight.SCB]) == M * K * 2 + M * c * 2 + c * 8
    # the meta run cannot see values, so it assumes no outlier columns: M * c * 2 + c * 8 bytes per layer left out
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_matmul8bitlt_input_outlives_non_reentrant_checkpointing():
    # ctx.tensors is a plain attribute, not save_for_backward: torch.utils.checkpoint(use_reentrant=False),
    # which lorabench uses, replaces saved tensors by recomputation, yet this reference keeps the input alive
    import weakref

    from bitsandbytes.autograd._functions import MatMul8bitLt, MatmulLtState

    layer = _bnb_layer("int8", "cpu")
    state = MatmulLtState()
    state.has_fp16_weights, state.is_training = False, True
    state.CB, state.SCB = layer.weight.data, layer.weight.SCB

    def block(h):
        return MatMul8bitLt.apply(h * 2, layer.weight, None, None, state)  # h * 2: an activation inside the block

    x = torch.randn(M, K, dtype=torch.float16, requires_grad=True)
    inside = []
    original = MatMul8bitLt.forward

    def spy(ctx, A, *args):
        inside.append(weakref.ref(A))
        return original(ctx, A, *args)

    MatMul8bitLt.forward = staticmethod(spy)
    try:
        out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    finally:
        MatMul8bitLt.forward = staticmethod(original)
    assert inside[0]() is not None  # the block's activation h * 2 is still alive until backward
    out.sum().backward()


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_matmul8bitfp_on_the_cpu_keeps_its_input(device):
    # MatMul8bitFp.forward: ctx.A = A (dequantizes the weight for every matmul instead)
    layer = _bnb_layer("int8", device)
    x = _input(device)
    with emulate("cpu"):
        out = layer(x)
    assert kept_bytes(out, _weights(layer)) == M * K * 2
    assert kept_bytes(out, [x, *_weights(layer)]) == 0


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_torchao_int8_weight_only_keeps_a_bf16_copy_of_its_weight(device):
    # Int8Tensor's linear, per-row weight-only path, above autograd (a torch_function):
    # m = torch.mm(x, qdata.t().to(bf16)) saves the bf16 copy (K x N) for grad_input, and
    # y = m * scale.to(bf16) saves the bf16 scale (N): a bf16 copy of every weight held until backward
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layer = torch.nn.Sequential(torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16, device=device))
    if device == "meta":
        layer = torch.nn.Sequential(torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16)).to("meta")
    quantize_(layer, Int8WeightOnlyConfig())
    layer.requires_grad_(False)
    x = _input(device)
    with emulate("cuda"):
        out = layer(x)
    assert kept_bytes(out, [x, *_weights(layer)]) == K * N * 2 + N * 2


B, H, L, D = 2, 4, 40, 16


def _qkv():
    return [torch.empty(B, H, L, D, dtype=torch.bfloat16, device="meta").requires_grad_(True) for _ in range(3)]


def test_sdpa_on_cuda_takes_the_flash_kernel_and_keeps_output_and_log_sum_exp():
    # _scaled_dot_product_flash_attention (torch's meta shapes follow its CUDA kernel): saves q, k, v, the
    # output, a float32 log-sum-exp per row (B x H x L), the philox rng state (2 x uint64) and an unused
    # uint64 scalar; no L x L matrix
    q, k, v = _qkv()
    with emulate("cuda"):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert type(out.grad_fn).__name__ == "ScaledDotProductFlashAttentionBackward0"
    assert kept_bytes(out, [q, k, v]) == B * H * L * 4 + 2 * 8 + 8  # besides its inputs and output


def test_sdpa_on_cuda_with_a_mask_takes_the_memory_efficient_kernel():
    # _scaled_dot_product_efficient_attention: the log-sum-exp padded to a multiple of 32 rows, and the
    # philox seed and offset (int64 scalars)
    q, k, v = _qkv()
    mask = torch.empty(B, 1, L, L, dtype=torch.bfloat16, device="meta")
    with emulate("cuda"):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert type(out.grad_fn).__name__ == "ScaledDotProductEfficientAttentionBackward0"
    padded = -(-L // 32) * 32
    assert kept_bytes(out, [q, k, v, mask]) == B * H * padded * 4 + 8 + 8
