"""Task accuracy: the Wilson interval, and exact match that agrees with real greedy generation."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from lorabench.evaluation.accuracy import record_accuracy, wilson_interval
from lorabench.evaluation.heldout import EvalLoss
from lorabench.result import CaseResult


@st.composite
def counts(draw):
    n = draw(st.integers(1, 100_000))
    return draw(st.integers(0, n)), n


@given(counts())
@example((0, 75))  # float rounding once put the lower bound just above 0
def test_wilson_bounds_lie_in_unit_interval_and_contain_the_estimate(c):
    correct, n = c
    low, high = wilson_interval(correct, n)
    assert 0.0 <= low <= correct / n <= high <= 1.0
    assert low < high  # never a point, not even at 0/n or n/n


@given(counts())
def test_wilson_is_symmetric_in_successes_and_failures(c):
    correct, n = c
    low, high = wilson_interval(correct, n)
    flipped_low, flipped_high = wilson_interval(n - correct, n)
    assert low == pytest.approx(1 - flipped_high, abs=1e-12)
    assert high == pytest.approx(1 - flipped_low, abs=1e-12)


@given(st.integers(1, 5_000), st.floats(0.05, 0.95))
def test_wilson_narrows_as_samples_grow(n, share):
    correct = round(share * n)
    low, high = wilson_interval(correct, n)
    low4, high4 = wilson_interval(4 * correct, 4 * n)
    assert high4 - low4 < high - low


def test_wilson_matches_the_closed_form():
    # 88.7% of 256 (227/256), z = 1.95996: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    low, high = wilson_interval(227, 256)
    assert (low, high) == pytest.approx((0.84204, 0.91996), abs=1e-5)
    assert wilson_interval(0, 256) == pytest.approx((0.0, 0.014784), abs=1e-6)
    assert wilson_interval(10, 10, confidence=0.99)[0] < wilson_interval(10, 10)[0]


@pytest.mark.parametrize("correct, n, confidence", [(-1, 5, 0.95), (6, 5, 0.95), (0, 0, 0.95), (1, 2, 1.0)])
def test_wilson_rejects_impossible_counts(correct, n, confidence):
    with pytest.raises(ValueError, match="need 0 <= correct <= n|confidence must be"):
        wilson_interval(correct, n, confidence)


def _result() -> CaseResult:
    return CaseResult(case_id="c", config_id="c", model="m", dataset="d", device="cpu", config={})


def test_record_accuracy_records_percentages_and_the_count():
    result = _result()
    record_accuracy(result, EvalLoss(0.1, 10, 256, exact=227, answered=256), has_answers=True, seq_len=32)
    m = result.metrics
    assert m["accuracy_pct"] == pytest.approx(100 * 227 / 256)
    assert m["accuracy_ci_low_pct"] < m["accuracy_pct"] < m["accuracy_ci_high_pct"]
    assert m["accuracy_n"] == 256
    record_accuracy(result, EvalLoss(3.0, 10, 256, exact=0, answered=256), has_answers=True, seq_len=32,
                    stage="_before")
    assert result.metrics["accuracy_before_pct"] == 0.0 and "accuracy_before_n" not in result.metrics


@pytest.mark.parametrize("has_answers, answered, reason", [
    (False, 10, "plain text rows"), (True, 0, "cut by seq_len=32"),
])
def test_accuracy_is_absent_with_a_reason_never_zero(has_answers, answered, reason):
    result = _result()
    record_accuracy(result, EvalLoss(1.0, 10, 10, exact=0, answered=answered), has_answers=has_answers, seq_len=32)
    assert not any(name.startswith("accuracy") for name in result.metrics)
    assert reason in result.absent["accuracy_pct"] and reason in result.absent["accuracy_n"]


def test_teacher_forced_exact_match_agrees_with_greedy_generation(tiny_llama, cpu):
    """Row by row, the eval pass's exact match is what ``generate`` (greedy) produces.

    The rows mix pre-training-format problems the tiny model mostly solves with fine-tuning
    problems it fails before training, so both outcomes are checked.
    """
    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    from lorabench.data.tasks import collator, embedded_reverse, tokenize
    from lorabench.models.loading import load_tokenizer
    from lorabench.evaluation.heldout import eval_loss

    task = embedded_reverse()
    rows = datasets.concatenate_datasets([task.reference.select(range(24)), task.eval.select(range(8))])
    tokenizer = load_tokenizer(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama.path, dtype=torch.float32)
    tokens = tokenize(rows, tokenizer, seq_len=32)
    collate = collator(tokenizer)
    forced = [eval_loss(model, tokens.select([i]), collate, batch_size=1, device=cpu,
                        eos_token_id=tokenizer.eos_token_id).exact for i in range(len(rows))]

    tokenizer.padding_side = "left"
    batch = tokenizer(list(rows["prompt"]), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[:, batch["input_ids"].shape[1]:].tolist()
    generated = []
    for ids, answer in zip(new, rows["completion"]):
        stop = ids.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in ids else len(ids)
        generated.append(int(tokenizer.decode(ids[:stop]) == answer and stop < len(ids)))

    assert forced == generated
    assert 0 < sum(forced) < len(forced)  # both outcomes occur


def test_task_change_records_gain_and_forgetting_or_says_why_not():
    from lorabench.kinds.finetune import _record_task_change

    result = _result()
    result.metrics.update(accuracy_pct=80.0, accuracy_before_pct=5.0)
    _record_task_change(result, EvalLoss(0.07, 640, 128), EvalLoss(0.20, 640, 128))
    assert result.metrics["accuracy_gain_pp"] == 75.0
    assert result.metrics["forgetting_nats"] == pytest.approx(0.13)
    text_only = _result()
    text_only.absent["accuracy_pct"] = "the data set has plain text rows, no answers to match"
    _record_task_change(text_only, None, None)
    assert "plain text" in text_only.absent["accuracy_gain_pp"]
    assert "no reference text" in text_only.absent["forgetting_nats"] and not text_only.metrics
