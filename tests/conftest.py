"""Shared fixtures for the engine's tests."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


@pytest.fixture(scope="session")
def tiny_llama():
    """The embedded tiny Llama checkpoint (built and cached on first use)."""
    from lorabench.models import resolve_model

    return resolve_model("tiny-llama")


@pytest.fixture(scope="session")
def cpu():
    import torch

    return torch.device("cpu")
