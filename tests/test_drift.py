"""Semantic drift: paired cosine similarity and the drift reading, on the shipped all-MiniLM-L6-v2."""

from __future__ import annotations

import pytest
import torch

from lorabench.evaluation.drift import drift, paired_cosine


def test_paired_cosine_pairs_rows():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    assert paired_cosine(a, b) == pytest.approx([1.0, 0.0, -1.0], abs=1e-6)


def test_paired_cosine_rejects_unequal_or_empty_sets():
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_cosine(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_cosine(torch.zeros(0, 3), torch.zeros(0, 3))


@pytest.fixture(scope="module")
def encoder():
    from lorabench.evaluation.drift import load_encoder

    return load_encoder()


def test_identical_texts_have_no_drift(encoder):
    texts = ["1284", "the cat sat on the mat", "rev 4821="]
    reading = drift(encoder, texts, list(texts))
    assert reading.cosine_mean == pytest.approx(1.0, abs=1e-5)
    assert reading.cosine_min == pytest.approx(1.0, abs=1e-5)
    assert reading.exact_match_pct == 100.0 and reading.pairs == 3


def test_related_text_is_closer_than_unrelated_text(encoder):
    baseline = ["the cat sat on the mat"]
    close = drift(encoder, baseline, ["a cat was sitting on the mat"])
    far = drift(encoder, baseline, ["quarterly tax filing deadlines"])
    assert far.cosine_mean < close.cosine_mean < 1.0
    assert close.exact_match_pct == 0.0


def test_min_and_mean_over_pairs(encoder):
    reading = drift(encoder, ["hello", "hello"], ["hello", "stock market crash"])
    assert reading.cosine_min < reading.cosine_mean < 1.0
    assert reading.exact_match_pct == 50.0


def test_drift_needs_one_generation_per_baseline_generation(encoder):
    with pytest.raises(ValueError, match="one generation per baseline generation"):
        drift(encoder, ["a", "b"], ["a"])


def test_record_drift_names_whose_generations_it_compared_with():
    from lorabench.evaluation.drift import DriftReading, record_drift, record_no_drift
    from lorabench.result import CaseResult

    result = CaseResult("c", "infer_merged", "m", "d", "cpu", {})
    record_drift(result, DriftReading(0.9, 0.5, 75.0, 4), "base")
    record_drift(result, DriftReading(1.0, 1.0, 100.0, 4), "adapter")
    assert result.metrics["drift_cosine_mean"] == 0.9 and result.metrics["adapter_drift_cosine_mean"] == 1.0
    assert result.metrics["adapter_drift_exact_match_pct"] == 100.0
    assert "unmerged bf16 adapter" in result.sources["adapter_drift_cosine_min"]
    other = CaseResult("c", "infer_nf4_adapter", "m", "d", "cpu", {})
    record_no_drift(other, "adapter", "infer_adapter did not run")
    assert "adapter_drift_cosine_mean" not in other.metrics
    assert other.absent["adapter_drift_exact_match_pct"] == "infer_adapter did not run"
    with pytest.raises(KeyError):
        record_drift(other, DriftReading(1.0, 1.0, 100.0, 1), "merged")
