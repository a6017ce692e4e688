"""The example suite: run it with `python -m pytest examples`."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "network: needs the package index (PyPI)")
