"""The live tensor tracker: exact bytes, categories that add up, frozen parameters, a kept copy caught."""

from __future__ import annotations

import pytest
import torch

from lorabench.meters.tensor_tracker import CATEGORIES, TensorTracker


def _model(frozen_first: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128, bias=False), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    if frozen_first:
        model[0].requires_grad_(False)
    return model


def _steps(model, optimizer, tracker, n: int = 2, batch: int = 8) -> None:
    for _ in range(n):
        with tracker:
            x = torch.randn(batch, 64)
            loss = model(x).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def _bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def test_the_peak_is_the_sum_of_its_parts_and_parameters_count_exactly():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker = TensorTracker(model, optimizer)
    _steps(model, optimizer, tracker)
    peak = tracker.peak()
    tracker.close()
    assert set(peak.components) == set(CATEGORIES)
    assert sum(peak.components.values()) == peak.peak_bytes
    params = _bytes(model.parameters())
    assert peak.components["params"] == params
    # AdamW keeps two moments per parameter (and a scalar step each) from the first step on
    assert peak.components["optimizer"] >= 2 * params
    assert peak.components["optimizer"] == _bytes(t for s in optimizer.state.values() for t in s.values())
    assert peak.steps == 2 and peak.ops > 0


def test_each_phase_keeps_its_own_peak_and_the_peak_is_the_highest():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker = TensorTracker(model, optimizer)
    _steps(model, optimizer, tracker, batch=512)  # a large batch: the forward pass's activations peak
    phases = tracker.phase_peaks()
    peak = tracker.peak()
    tracker.close()
    assert set(phases) == {"forward", "backward", "optimizer"}
    for phase, at in phases.items():
        assert at.peak_phase == phase
        assert sum(at.components.values()) == at.peak_bytes
    assert peak == max(phases.values(), key=lambda p: p.peak_bytes)
    # the optimizer step holds every gradient, and of the forward pass only the batch and the loss
    # (still referenced by the step's code); the forward pass holds no gradient yet
    assert phases["optimizer"].components["activations"] == 512 * 64 * 4 + 4
    assert phases["optimizer"].components["grads"] == _bytes(model.parameters())
    assert phases["forward"].components["grads"] == 0
    assert phases["forward"].components["activations"] > phases["optimizer"].components["optimizer"]


def test_frozen_parameters_are_counted_without_gradients_or_state():
    model = _model(frozen_first=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    tracker = TensorTracker(model, optimizer)  # torch's MemTracker fails here: hooks on frozen parameters
    _steps(model, optimizer, tracker)
    peak = tracker.peak()
    tracker.close()
    assert peak.components["params"] == _bytes(model.parameters())
    assert peak.components["optimizer"] == _bytes(t for s in optimizer.state.values() for t in s.values())
    assert peak.components["grads"] <= _bytes(trainable)


def test_activations_are_what_the_forward_pass_leaves_for_backward():
    model = torch.nn.Linear(256, 256, bias=False)
    tracker = TensorTracker(model)
    with tracker:
        x = torch.randn(32, 256, requires_grad=True)
        h = torch.relu(model(x))  # relu saves its output; the linear saves its input x
        loss = h.sum()
        loss.backward()
    peak = tracker.peak()
    tracker.close()
    row = 32 * 256 * 4
    # alive when backward starts: x and relu's output (the linear's output went to relu and was freed),
    # the loss and the ones that backward() seeds it with: two fp32 scalars
    assert peak.components["activations"] == 2 * row + 2 * 4
    assert peak.components["params"] == 256 * 256 * 4


def test_an_extra_fp32_copy_kept_by_the_optimizer_shows_up_byte_for_byte():
    def run(keep_copy: bool) -> tuple[int, int]:
        model = _model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if keep_copy:  # a regression: a master copy made at the first step and never freed
            def copy_once(opt, args, kwargs):
                if not hasattr(opt, "master"):
                    opt.master = [p.detach().float().clone() for p in model.parameters()]
            optimizer.register_step_post_hook(copy_once)
        tracker = TensorTracker(model, optimizer)
        _steps(model, optimizer, tracker, n=3)
        peak = tracker.peak()
        tracker.close()
        return peak.peak_bytes, peak.components["optimizer"]

    base_peak, base_opt = run(False)
    peak, opt = run(True)
    copy = _bytes(_model().parameters())
    assert opt - base_opt == copy
    assert peak - base_peak == copy


def test_an_optimizer_attribute_set_before_tracking_counts_too():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.shadow = {"w": torch.zeros(1000)}
    tracker = TensorTracker(model, optimizer)
    _steps(model, optimizer, tracker, n=2)
    peak = tracker.peak()
    tracker.close()
    state = _bytes(t for s in optimizer.state.values() for t in s.values())
    assert peak.components["optimizer"] == state + 4000


def test_it_works_on_the_meta_device_and_filters_by_device():
    def run(device):
        with torch.device("meta"):
            model = _model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tracker = TensorTracker(model, optimizer, device=device)
        for _ in range(2):
            with tracker:
                loss = model(torch.empty(8, 64, device="meta")).pow(2).mean()
                kept = torch.zeros(10_000)  # a CPU tensor alive through the step
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                del kept
        peak = tracker.peak()
        tracker.close()
        assert peak.components["params"] == _bytes(model.parameters())
        assert peak.peak_bytes == sum(peak.components.values())
        return peak.peak_bytes

    # the kept tensor, and AdamW's step counters, which torch keeps on the CPU as fp32 scalars
    assert run(None) - run("meta") == 40_000 + 3 * 4


def test_two_identical_runs_give_identical_figures():
    def run():
        model = _model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tracker = TensorTracker(model, optimizer)
        _steps(model, optimizer, tracker, n=2)
        peak = tracker.peak()
        tracker.close()
        return peak.peak_bytes, peak.components

    assert run() == run()


def test_a_closed_tracker_cannot_be_entered_again():
    model = _model()
    tracker = TensorTracker(model)
    tracker.close()
    with pytest.raises(RuntimeError, match="closed"):
        with tracker:
            pass


def test_it_needs_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        TensorTracker(object())
