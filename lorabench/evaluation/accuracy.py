"""Task accuracy: exact match of greedy answers, with a Wilson score interval.

The count of exact matches comes from :func:`lorabench.evaluation.heldout.eval_loss`, which scores
greedy decoding teacher-forced in the held-out loss pass (a row is correct when greedy
decoding would emit its answer's tokens and then EOS). The share correct is reported with
a Wilson score interval: it stays inside [0, 1] and keeps a sensible width at 0% and 100%,
where the normal approximation collapses to a point.
"""

from __future__ import annotations

from dataclasses import dataclass

# Deferred imports: statsmodels (optional) where needed: optional.

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Accuracy:
    correct: int
    n: int
    ci_low: float  # Wilson bounds, as fractions
    ci_high: float

    @property
    def fraction(self) -> float:
        return self.correct / self.n


def wilson_interval(correct: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (statsmodels' ``proportion_confint``).

    Args:
        correct: successes, 0 <= correct <= n.
        n: trials, at least 1.
        confidence: two-sided coverage, in (0, 1).

    Returns:
        (low, high) as fractions in [0, 1].

    Raises:
        ValueError: counts or confidence out of range.
    """
    from statsmodels.stats.proportion import proportion_confint

    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n and n >= 1; got correct={correct}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    low, high = proportion_confint(correct, n, alpha=1 - confidence, method="wilson")
    # The exact interval always holds the point estimate; at 0/n and n/n float rounding can put
    # the bound a few ulps past it (a lower bound of 1e-18 for 0 of 75), so clamp to it.
    share = correct / n
    return min(max(0.0, float(low)), share), max(min(1.0, float(high)), share)


def accuracy(correct: int, n: int) -> Accuracy:
    """``correct`` of ``n`` with its 95% Wilson interval.

    Raises:
        ValueError: counts out of range.
    """
    low, high = wilson_interval(correct, n)
    return Accuracy(correct, n, low, high)


def record_accuracy(result, evaluation, *, has_answers: bool, seq_len: int, stage: str = "") -> None:
    """Record ``accuracy{stage}_pct`` and its Wilson bounds (and, after training, ``accuracy_n``).

    Args:
        result: the :class:`~lorabench.result.CaseResult` to fill.
        evaluation: an :class:`~lorabench.evaluation.heldout.EvalLoss` computed with ``eos_token_id``.
        has_answers: whether the data set has prompt/completion rows.
        seq_len: the configuration's sequence length, named when truncation left nothing to score.
        stage: ``""`` after training, ``"_before"`` for the base model.
    """
    names = [f"accuracy{stage}_pct", f"accuracy{stage}_ci_low_pct", f"accuracy{stage}_ci_high_pct"]
    if not stage:
        names.append("accuracy_n")
    if not has_answers:
        reason = "the data set has plain text rows, no answers to match"
    elif evaluation.answered == 0:
        reason = f"every held-out answer was cut by seq_len={seq_len}, so none can be matched whole"
    else:
        reason = ""
    if reason:
        for name in names:
            result.set(name, None, reason=reason)
        return
    acc = accuracy(evaluation.exact, evaluation.answered)
    source = (f"greedy exact match, teacher-forced, on {acc.n} held-out answers; "
              f"95% Wilson interval (statsmodels)")
    values = [100 * acc.fraction, 100 * acc.ci_low, 100 * acc.ci_high] + ([acc.n] if not stage else [])
    for name, value in zip(names, values):
        result.set(name, value, source=source)
