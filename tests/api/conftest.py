"""One real server per session: the real engine on tiny random models, on loopback.

Extra servers (small queue, classical-only, shutdown) reuse the loaded tiny models,
so only the first engine pays the model-loading seconds.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from api_support import MAX_FACES, MAX_IMAGE_PIXELS, png_bytes

from masquerade.engine.engine import Engine, EngineConfig
from masquerade_client import AnonymizerClient
from server_support import BackgroundServer, ServerConfig, loopback_config, make_certificates


@pytest.fixture(scope="session")
def tiny_engine_config() -> EngineConfig:
    return EngineConfig(
        models="tiny", device="cpu", max_batch=16, max_queue=32, max_image_pixels=MAX_IMAGE_PIXELS, max_faces=MAX_FACES
    )


@pytest.fixture(scope="session")
def server(tiny_engine_config) -> BackgroundServer:
    running = BackgroundServer(loopback_config(tiny_engine_config, metrics=True)).start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def client(server) -> AnonymizerClient:
    with AnonymizerClient(server.address, timeout=120) as c:
        c.wait_ready(timeout=30)
        yield c


@pytest.fixture
def start_server_sharing_models(server):
    """Starts more servers over the session engine's loaded models; stops them after the test."""
    started: list[BackgroundServer] = []

    def start(
        engine_config: EngineConfig,
        *,
        grace_seconds: float = 2.0,
        models=True,
        configure: Callable[[ServerConfig], ServerConfig] | None = None,
    ) -> BackgroundServer:
        """``configure`` edits the loopback config (TLS, tokens, drain) before the server starts."""
        engine = Engine(
            engine_config, server.engine.models if models else None, "" if models else "test: no diffusion weights"
        )
        config = loopback_config(engine_config, grace_seconds=grace_seconds)
        running = BackgroundServer(configure(config) if configure else config, engine).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture(scope="session")
def face_png() -> bytes:
    """An 'already aligned' face: any picture works with tiny models (detection is skipped)."""
    rng = np.random.default_rng(0)
    return png_bytes(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def oversized_png() -> bytes:
    return png_bytes(np.zeros((1001, 1000, 3), dtype=np.uint8))  # just over MAX_IMAGE_PIXELS


@pytest.fixture(scope="session")
def certificates(tmp_path_factory):
    """A throw-away CA with server and client certificates, generated for this session."""
    return make_certificates(tmp_path_factory.mktemp("pki"))
