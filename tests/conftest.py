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
    changed since, regenerate them so the tests never run a stale client.

    Regenerating needs grpc_tools, a build-time tool that a machine holding only the runtime
    packages (the lent GPU machine's image) lacks. There the stubs carried in the working tree are
    used as they are (a copy's file times say nothing about staleness), and where none are
    present the session still starts: only the tests that import the client fail, with
    ImportError, not the whole run.
    """
    import importlib.util
    import warnings

    path = Path(__file__).resolve().parents[1] / "clients" / "python" / "stubgen.py"
    spec = importlib.util.spec_from_file_location("masquerade_client_stubgen", path)
    stubgen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stubgen)
    if not stubgen.is_stale():
        return
    try:
        import grpc_tools.protoc  # noqa: F401
    except ImportError:
        present = all((stubgen.OUTPUT_DIR / name).is_file() for name in stubgen.GENERATED)
        warnings.warn(
            "grpc_tools is not importable: "
            + (
                f"using the client stubs present in {stubgen.OUTPUT_DIR} without regenerating them"
                if present
                else f"no client stubs in {stubgen.OUTPUT_DIR}; tests that import masquerade_client will fail"
            ),
            stacklevel=1,
        )
        return
    stubgen.generate()


_refresh_client_stubs()

# Engines built with models="tiny" (the API and client tests) find the session's set here.
_SESSION_TINY_DIR = Path(tempfile.mkdtemp(prefix="masquerade-tiny-"))
os.environ.setdefault("MASQUERADE_TINY_DIR", str(_SESSION_TINY_DIR))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from masquerade.models.tiny import built_tiny_model_dir

    return built_tiny_model_dir()  # MASQUERADE_TINY_DIR, set above


@pytest.fixture(scope="session")
def tiny_models(tiny_model_dir):
    from masquerade.models.loader import load_models

    return load_models(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def core(tiny_models):
    from masquerade.engine.diffusion import DiffusionCore

    return DiffusionCore(tiny_models)
