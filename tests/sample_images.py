"""Real photographs shipped by installed packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def t1_image_path() -> Path:
    """insightface's sample photo with six people (its data ships with the package)."""
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("insightface is not installed: run scripts/setup.sh --test (it installs the sample photos)")
    return Path(spec.submodule_search_locations[0]) / "data" / "images" / "t1.jpg"
