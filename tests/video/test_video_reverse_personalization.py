"""Reverse personalization on video, on the tiny models: one identity and one noise stream per track,
every frame's faces through the engine's step-level batching, frames and audio kept."""

from __future__ import annotations

import asyncio

import av
import numpy as np
import pytest

from masquerade.engine.engine import Engine, EngineConfig
from masquerade.engine.request import Method, ReversePersonalizationParams
from masquerade.video import VideoOptions, anonymize_video
from masquerade.video.synthetic import ClipSpec, MovingFace, make_clip


@pytest.fixture
def engine(tiny_models):
    return Engine(EngineConfig(models="tiny", device="cpu", max_batch=8), tiny_models)


def test_each_track_keeps_one_identity_and_one_seed(tmp_path, engine, monkeypatch):
    source, target = tmp_path / "two.mp4", tmp_path / "out.mp4"
    # Face 1 is blurred on frame 3: covered there by tracking, through the engine like the rest.
    spec = ClipSpec(
        frames=6,
        faces=(MovingFace(0, 110, (10, 60), (3, 0)), MovingFace(4, 100, (200, 50), (-2, 0))),
        hard={3: {1: "blur"}},
    )
    make_clip(source, spec)

    jobs = []  # every FaceJob the engine made: (noise stream, identity)
    make_job = engine.core.make_job

    def recording_make_job(request_id, face_index, clean_latent, identity, params, noise_index=None):
        jobs.append((noise_index, identity.detach().cpu().numpy().copy(), params.attribute_prompt))
        return make_job(request_id, face_index, clean_latent, identity, params, noise_index=noise_index)

    monkeypatch.setattr(engine.core, "make_job", recording_make_job)
    params = ReversePersonalizationParams(steps=2, attribute_prompt="an old man")
    options = VideoOptions(method=Method.REVERSE_PERSONALIZATION, params=params, frames_in_flight=3)

    async def run():
        await engine.start()
        try:
            return await anonymize_video(source, target, options, engine=engine)
        finally:
            await engine.shutdown(grace_seconds=1)

    report = asyncio.run(run())

    assert [t.method_applied for t in report.tracks] == ["reverse_personalization"] * 2, [
        t.reason for t in report.tracks
    ]
    assert [t.frames_detected + t.frames_filled for t in report.tracks] == [6, 6]
    assert sum(t.frames_filled for t in report.tracks) >= 1
    streams = {noise for noise, _, _ in jobs}
    assert streams == {t.track_id for t in report.tracks} and len(jobs) == 12  # every face, every frame
    for stream in streams:
        identities = [identity for noise, identity, _ in jobs if noise == stream]
        assert len(identities) == 6
        for identity in identities[1:]:  # one identity per track: the same vector on every frame
            np.testing.assert_array_equal(identity, identities[0])
        assert np.linalg.norm(identities[0]) == pytest.approx(1.0, abs=1e-4)
    first, second = (next(identity for noise, identity, _ in jobs if noise == s) for s in sorted(streams))
    assert float(first @ second) < 0.99  # two people, two identities
    assert {prompt for *_, prompt in jobs} == {"an old man"}
    seeds = [t.seed for t in report.tracks]
    assert len(set(seeds)) == 2 and all(isinstance(seed, int) for seed in seeds)
    assert report.flicker["pairs"] == 10

    with av.open(str(target)) as container:
        assert sum(1 for _ in container.decode(container.streams.video[0])) == 6


def test_max_faces_applies_per_frame_and_the_rest_fall_back_covered(tmp_path, engine, monkeypatch):
    source, target = tmp_path / "two.mp4", tmp_path / "capped.mp4"
    spec = ClipSpec(frames=4, faces=(MovingFace(0, 110, (10, 60), (3, 0)), MovingFace(4, 100, (200, 50), (-2, 0))))
    truth = make_clip(source, spec)

    generated = []  # (request, face index) of every face the engine generated
    make_job = engine.core.make_job

    def recording_make_job(request_id, face_index, *args, **kwargs):
        generated.append((request_id, face_index))
        return make_job(request_id, face_index, *args, **kwargs)

    monkeypatch.setattr(engine.core, "make_job", recording_make_job)
    params = ReversePersonalizationParams(steps=2)
    options = VideoOptions(
        method=Method.REVERSE_PERSONALIZATION, params=params, max_faces=1, frames_in_flight=2, report_frames=True
    )

    async def run():
        await engine.start()
        try:
            return await anonymize_video(source, target, options, engine=engine)
        finally:
            await engine.shutdown(grace_seconds=1)

    report = asyncio.run(run())

    # One generated face per frame (the cap is per frame, not per clip); the other falls back to blur.
    assert sorted(request for request, _ in generated) == sorted({request for request, _ in generated})
    assert len(generated) == spec.frames
    methods = [[face["method_applied"] for face in frame["faces"]] for frame in report.frame_boxes]
    assert all(sorted(m) == ["blur", "reverse_personalization"] for m in methods), methods
    assert "fallback" in {t.status for t in report.tracks}
    assert all(t.reason for t in report.tracks if t.status == "fallback")

    # The face past the cap is still covered on every frame.
    with av.open(str(source)) as a, av.open(str(target)) as b:
        originals = [f.to_ndarray(format="rgb24") for f in a.decode(video=0)]
        outputs = [f.to_ndarray(format="rgb24") for f in b.decode(video=0)]
    assert len(outputs) == spec.frames
    for index, boxes in enumerate(truth.boxes):
        for box in boxes:
            x0, y0, x1, y1 = (int(v) for v in box)
            inner = (slice(y0 + (y1 - y0) // 4, y1 - (y1 - y0) // 4), slice(x0 + (x1 - x0) // 4, x1 - (x1 - x0) // 4))
            assert np.abs(outputs[index][inner].astype(int) - originals[index][inner].astype(int)).mean() > 5
