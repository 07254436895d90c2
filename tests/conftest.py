"""Session-wide fixtures: one tiny random model set, built offline, shared by every test.

The set is written once per session with the same factory as
`masquerade models make-tiny` and loaded through the real loaders.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest


def _refresh_client_stubs() -> None:
    """masquerade_client's stubs come from its build (scripts/setup.sh installs it); when proto/
    changed since, regenerate them so the tests never run a stale client."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "clients" / "python" / "stubgen.py"
    spec = importlib.util.spec_from_file_location("masquerade_client_stubgen", path)
    stubgen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stubgen)
    if stubgen.is_stale():
        stubgen.generate()


_refresh_client_stubs()

# Engines built with models="tiny" (the API and client tests) find the session's set here.
_SESSION_TINY_DIR = Path(tempfile.mkdtemp(prefix="masquerade-tiny-"))
os.environ.setdefault("MASQUERADE_TINY_DIR", str(_SESSION_TINY_DIR))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from masquerade.models.tiny import TINY_MARKER, make_tiny

    root = Path(os.environ["MASQUERADE_TINY_DIR"])
    if not (root / TINY_MARKER).is_file():
        make_tiny(root)
    return root


@pytest.fixture(scope="session")
def tiny_models(tiny_model_dir):
    from masquerade.models.loader import load_models

    return load_models(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def core(tiny_models):
    from masquerade.engine.diffusion import DiffusionCore

    return DiffusionCore(tiny_models)
