"""Test guards: only the built-in plugins load unless a test asks for more; a fresh host per test."""

import os

import pytest

os.environ.setdefault("EFLOW_PLUGINS", "")  # never load whatever third-party plugins happen to be installed


@pytest.fixture
def fresh_host(monkeypatch):
    """A plugin host that re-reads entry points and environment variables (restored afterwards)."""
    from eflow.registry import reset_host

    reset_host()
    yield monkeypatch
    reset_host()
