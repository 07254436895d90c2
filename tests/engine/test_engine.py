"""The async engine on tiny models: results, fail-closed fallbacks and isolation between requests."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from masquerade.engine.engine import Engine, EngineConfig
from masquerade.engine.request import (
    DetectionOptions,
    EngineRequest,
    FaceStatus,
    FailedEvent,
    Method,
    ResultEvent,
    ReversePersonalizationParams,
)
from sample_images import t1_image_path


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    return buffer.getvalue()


FACE = png(np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8))


def aligned_request(request_id: str, steps: int = 4) -> EngineRequest:
    return EngineRequest(
        request_id=request_id,
        image=FACE,
        params=ReversePersonalizationParams(steps=steps),
        detection=DetectionOptions(aligned=True),
    )


async def run(engine: Engine, *requests: EngineRequest) -> list:
    async def last_event(request):
        async for event in engine.submit(request):
            pass
        return event

    return await asyncio.gather(*(last_event(r) for r in requests))


@pytest.fixture
def engine(tiny_models):
    return Engine(EngineConfig(models="tiny", device="cpu", max_batch=8), tiny_models)


def with_engine(engine, body):
    async def main():
        await engine.start()
        try:
            return await body(engine)
        finally:
            await engine.shutdown(grace_seconds=5)

    return asyncio.run(main())


def test_a_failed_unet_call_falls_back_to_a_classical_cover_and_says_so(engine):
    real_unet = engine.core.runner.unet_fn
    calls = {"n": 0}

    def flaky_unet(*inputs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device fault")
        return real_unet(*inputs)

    engine.core.runner.unet_fn = flaky_unet

    async def body(e):
        faulted = await run(e, aligned_request("a"), aligned_request("b"))
        e.core.runner.unet_fn = real_unet
        return faulted, await run(e, aligned_request("c"))

    faulted, (after,) = with_engine(engine, body)
    for event in faulted:
        assert isinstance(event, ResultEvent)
        face = event.result.faces[0]
        assert face.status is FaceStatus.FALLBACK and face.method_applied is Method.BLUR
        assert "diffusion step failed" in face.reason
        assert event.result.complete  # covered, just not by the requested method
    # The engine keeps serving after the fault, and nothing is left in the scheduler.
    assert after.result.faces[0].status is FaceStatus.ANONYMIZED
    assert engine.active_jobs == 0


def test_an_image_without_faces_comes_back_unchanged_and_says_so(engine):
    blank = png(np.full((64, 80, 3), 200, np.uint8))
    request = EngineRequest(request_id="blank", image=blank, params=ReversePersonalizationParams(steps=3))
    (event,) = with_engine(engine, lambda e: run(e, request))
    result = event.result
    assert result.no_faces and result.complete and (result.width, result.height) == (80, 64)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(result.image))), np.full((64, 80, 3), 200, np.uint8))


def test_faces_below_the_minimum_size_are_covered_classically(engine):
    request = EngineRequest(
        request_id="t1",
        image=t1_image_path().read_bytes(),
        params=ReversePersonalizationParams(steps=3),
        detection=DetectionOptions(min_face_size=10_000),
    )
    (event,) = with_engine(engine, lambda e: run(e, request))
    faces = event.result.faces
    assert len(faces) == 6 and event.result.complete
    assert all(f.status is FaceStatus.FALLBACK and "min_face_size" in f.reason for f in faces)


def test_undecodable_bytes_fail_only_their_own_request(engine):
    bad = EngineRequest(request_id="bad", image=b"not an image", detection=DetectionOptions(aligned=True))
    events = with_engine(engine, lambda e: run(e, bad, aligned_request("good")))
    assert isinstance(events[0], FailedEvent) and "image" in str(events[0].error)
    assert isinstance(events[1], ResultEvent)


def test_identity_receipt_compares_with_the_reconstruction_baseline(engine, tiny_models):
    size = tiny_models.face_size
    face = png(np.random.default_rng(9).integers(0, 256, (size, size, 3), dtype=np.uint8))

    def request(request_id, id_scale):
        return EngineRequest(
            request_id=request_id,
            image=face,
            params=ReversePersonalizationParams(steps=4, guidance_scale=0.0, id_emb_scale=id_scale),
            detection=DetectionOptions(aligned=True),
        )

    reconstructed, anonymized = with_engine(engine, lambda e: run(e, request("zero", 0.0), request("one", 1.0)))
    zero = reconstructed.result.faces[0]
    # With a zero identity the output is the VAE round trip, so after equals the baseline.
    assert -1.0 <= zero.identity_similarity_before <= 1.0
    assert zero.identity_similarity_after == pytest.approx(zero.identity_similarity_before, abs=0.02)
    one = anonymized.result.faces[0]
    assert one.identity_similarity_before == pytest.approx(zero.identity_similarity_before, abs=1e-5)
    assert one.identity_similarity_after is not None
