"""Registers the lorabench plugin and its fixtures for bench/ and tests/."""

pytest_plugins = ["lorabench.plugin", "fixtures.models", "fixtures.data", "fixtures.case", "fixtures.inference"]
