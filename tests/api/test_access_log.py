"""The access log: one line per request with ids, peer, RPC, faces, statuses, durations and code; no content."""

from __future__ import annotations

import json
import logging
import shlex

import pytest
from api_support import wait_until

from masquerade.api.access_log import ACCESS_LOGGER, JsonFormatter
from masquerade_client import InvalidArgument, build_request

PROMPT = "freckled sailor with a green scarf"  # must never reach a log line


def _lines(caplog, request_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == ACCESS_LOGGER and r.access["request_id"] == request_id]


@pytest.fixture
def access_caplog(caplog):
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    return caplog


def test_one_line_per_request_with_its_outcome_and_no_content(client, face_png, access_caplog):
    client.anonymize(
        face_png, aligned=True, method="reverse_personalization", steps=2, attribute_prompt=PROMPT, request_id="log-1"
    )
    wait_until(lambda: _lines(access_caplog, "log-1"), what="the access line")
    (record,) = _lines(access_caplog, "log-1")
    fields = record.access
    assert fields["rpc"] == "Anonymize" and fields["method"] == "reverse_personalization"
    assert fields["server_request_id"].startswith("log-1~")
    assert fields["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:[::1]:")) and fields["client"] == ""  # no mTLS
    assert fields["faces"] == 1 and fields["statuses"] == ["ANONYMIZED"] and fields["complete"] is True
    assert fields["code"] == "OK"
    durations = fields["durations_ms"]
    assert set(durations) == {"queued", "preprocess", "inversion", "generation", "postprocess", "total"}
    assert durations["total"] >= durations["generation"] > 0
    text = record.getMessage()
    assert text.startswith("access ") and "\n" not in text
    for expected in ('request_id="log-1"', "rpc=Anonymize", "faces=1", "statuses=ANONYMIZED", "complete=true"):
        assert expected in text
    assert "code=OK" in text and "total_ms=" in text
    as_json = JsonFormatter().format(record)
    assert json.loads(as_json)["event"] == "access" and json.loads(as_json)["statuses"] == ["ANONYMIZED"]
    for line in (text, as_json):
        assert PROMPT not in line and "PNG" not in line and "embedding" not in line


def test_failed_and_streamed_requests_are_logged_with_their_code(client, face_png, access_caplog):
    with pytest.raises(InvalidArgument):
        client.anonymize(b"not an image", request_id="log-bad")
    events = list(client.anonymize_stream(face_png, aligned=True, method="blur", request_id="log-stream"))
    assert events[-1].WhichOneof("event") == "result"
    responses = list(
        client.anonymize_batch([build_request(face_png, aligned=True, method="pixelate", request_id="b1")])
    )
    assert responses[0].WhichOneof("outcome") == "result"
    wait_until(
        lambda: all(_lines(access_caplog, rid) for rid in ("log-bad", "log-stream", "b1")), what="the access lines"
    )
    (bad,) = _lines(access_caplog, "log-bad")
    assert bad.access["code"] == "INVALID_ARGUMENT" and bad.access["faces"] is None
    assert "faces=- " in bad.getMessage() and "complete=-" in bad.getMessage()
    (streamed,) = _lines(access_caplog, "log-stream")
    assert streamed.access["rpc"] == "AnonymizeStream" and streamed.access["method"] == "blur"
    assert streamed.access["statuses"] == ["ANONYMIZED"] and streamed.access["code"] == "OK"
    (batched,) = _lines(access_caplog, "b1")
    assert batched.access["rpc"] == "AnonymizeBatch" and batched.access["code"] == "OK"


def test_a_request_id_cannot_forge_a_second_line(client, face_png, access_caplog):
    forged = 'x" code=OK\naccess request_id="y'
    client.anonymize(face_png, aligned=True, method="solid", request_id=forged)
    wait_until(lambda: _lines(access_caplog, forged), what="the access line")
    (record,) = _lines(access_caplog, forged)
    text = record.getMessage()
    assert "\n" not in text
    tokens = shlex.split(text)  # the quoting is shell-like: a log parser sees the forged text as one value
    assert [t for t in tokens if t.startswith("code=")] == ["code=OK"]
    assert [t for t in tokens if t.startswith("request_id=")] == ["request_id=" + forged.replace("\n", "\\n")]
    assert json.loads(JsonFormatter().format(record))["request_id"] == forged


def test_json_log_format_sets_up_diffusers_only_once_something_imports_it():
    """--log-format json must not import diffusers (and torch) to configure it, yet its lines are JSON once loaded."""
    import subprocess
    import sys

    script = """
import json, logging, sys
from masquerade.api.access_log import configure_logging
configure_logging("INFO", "json")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("diffusers", "transformers", "torch"))
import diffusers.utils.logging as library_logging
library_logging.get_logger("diffusers.pipelines").warning("from diffusers")
library = logging.getLogger("diffusers")
print(json.dumps({"heavy": heavy, "handlers": len(library.handlers), "propagate": library.propagate,
                  "bars": library_logging.is_progress_bar_enabled()}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout.strip().splitlines()[-1])
    assert state == {"heavy": [], "handlers": 0, "propagate": True, "bars": False}
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert {"level": "WARNING", "logger": "diffusers.pipelines", "message": "from diffusers"}.items() <= lines[
        -1
    ].items()
    assert not [line for line in done.stderr.splitlines() if line and not line.startswith("{")], done.stderr
