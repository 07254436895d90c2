"""The Python client's three request builders set the fields their messages share the same way."""

from __future__ import annotations

import pytest

from masquerade_client import build_request, pb2
from masquerade_client.video import frame_options, video_start

SHARED = dict(
    method="pixelate",
    priority="bulk",
    strength=2.5,
    score_threshold=0.3,
    min_face_size=12,
    max_faces=4,
    steps=7,
    seed=11,
)


def test_image_video_and_live_builders_agree_on_the_shared_fields():
    messages = [build_request(b"img", **SHARED), video_start(**SHARED), frame_options(**SHARED)]
    for message in messages:
        assert message.method == pb2.PIXELATE
        assert message.priority == pb2.PRIORITY_BULK
        assert message.classical == messages[0].classical
        assert message.detection == messages[0].detection
        assert (message.params.steps, message.params.seed) == (7, 11)
    assert messages[0].detection.max_faces == 4 and not messages[0].detection.aligned


def test_unset_options_stay_unset_for_the_servers_defaults():
    for message in (build_request(b"img"), video_start(), frame_options()):
        for group in ("params", "classical", "detection"):
            assert not message.HasField(group), group
        assert message.method == pb2.METHOD_UNSPECIFIED and message.priority == pb2.PRIORITY_UNSPECIFIED


@pytest.mark.parametrize("builder", [lambda **o: build_request(b"img", **o), video_start, frame_options])
def test_a_bad_enum_name_names_the_option_and_the_choices(builder):
    with pytest.raises(ValueError, match=r"priority: unknown value 'urgent'; use one of \['bulk', 'interactive'"):
        builder(priority="urgent")


def test_live_frames_carry_the_callers_capture_time_or_none():
    import numpy as np

    from masquerade_client.video import frame_requests

    frame = np.zeros((4, 4, 3), np.uint8)
    options = frame_options(method="blur")
    stamped = list(frame_requests(options, [(frame, 12.5), (b"jpeg", 12.54)]))
    assert [m.timestamp for m in stamped] == [12.5, 12.54]
    assert stamped[0].options == options and not stamped[1].HasField("options")
    assert (stamped[0].raw.width, stamped[1].encoded) == (4, b"jpeg")
    bare = list(frame_requests(options, [frame, frame]))
    assert [m.timestamp for m in bare] == [0.0, 0.0]  # unstamped: the server times them as it reads them
