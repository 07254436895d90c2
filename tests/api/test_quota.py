"""Per-client policies and quotas without a server: token-line settings, the ceiling, the token bucket."""

from __future__ import annotations

import pytest

from masquerade.api.quota import ClientPolicy, QuotaBook, client_name, parse_policy
from masquerade.engine.job_state import Priority
from masquerade.errors import QuotaExceededError


def test_token_line_settings_parse_and_name_the_bad_word():
    policy = parse_policy(["name=nightly", "priority=bulk", "max-priority=bulk", "rps=2", "burst=4", "faces=32"], "l1")
    assert policy == ClientPolicy("nightly", Priority.BULK, Priority.BULK, 2.0, 4, 32)
    for words, complaint in (
        (["speed=fast"], "'speed=fast' is not one of"),
        (["priority=urgent"], "priority 'urgent' is not one of interactive, bulk"),
        (["rps=-1"], "rps must be a positive number"),
        (["faces=many"], "'faces=many'"),
    ):
        with pytest.raises(ValueError, match=complaint):
            parse_policy(words, "line 3")


def test_the_ceiling_caps_what_is_asked_and_defaults_fill_in():
    bulk_only = ClientPolicy(default_priority=Priority.BULK, max_priority=Priority.BULK)
    assert bulk_only.effective_priority(Priority.INTERACTIVE, Priority.INTERACTIVE) is Priority.BULK
    assert bulk_only.effective_priority(None, Priority.INTERACTIVE) is Priority.BULK
    assert ClientPolicy().effective_priority(None, Priority.BULK) is Priority.BULK  # the server's default
    assert ClientPolicy().effective_priority(Priority.INTERACTIVE, Priority.BULK) is Priority.INTERACTIVE
    flags = ClientPolicy(requests_per_second=5.0, max_faces=10)
    assert ClientPolicy(name="x", max_faces=2).over(flags) == ClientPolicy(
        name="x", requests_per_second=5.0, max_faces=2
    )


def test_the_token_bucket_refuses_with_when_to_come_back_and_clients_are_apart():
    now = [100.0]
    book = QuotaBook(clock=lambda: now[0])
    policy = ClientPolicy(requests_per_second=2.0, burst=2)
    book.admit("a", policy)
    book.admit("a", policy)
    with pytest.raises(QuotaExceededError) as refused:
        book.admit("a", policy)
    assert refused.value.retry_after_s == pytest.approx(0.5)
    book.admit("b", policy)  # another client's bucket
    now[0] += 0.5
    book.admit("a", policy)  # refilled by one request in 1 / rps seconds


def test_the_faces_quota_reads_the_faces_in_flight():
    held = {"a": 3}
    book = QuotaBook(faces_in_flight=lambda c: held.get(c, 0), faces_retry_after=lambda c: 2.5)
    policy = ClientPolicy(max_faces=3)
    with pytest.raises(QuotaExceededError, match="3 faces in flight") as refused:
        book.admit("a", policy)
    assert refused.value.retry_after_s == 2.5
    held["a"] = 2
    book.admit("a", policy)


def test_client_names():
    assert client_name("abc123", ClientPolicy(name="nightly"), "cn") == "nightly"
    assert client_name("abc123", None, "cn") == "token-abc123"
    assert client_name(None, None, "svc.example") == "cert:svc.example"
    assert client_name(None, None, None) == "anonymous"


def test_serve_flags_reach_the_server_and_engine_config():
    from masquerade.cli import build_parser
    from masquerade.cli.serve import config_from_args

    def config(*flags):
        return config_from_args(build_parser().parse_args(["serve", *flags]))

    default = config()
    assert default.default_priority is Priority.INTERACTIVE and default.quotas == ClientPolicy()
    assert default.engine.aging_calls == 32 and default.engine.interactive_slack == 1.25
    chosen = config(
        "--default-priority", "bulk", "--quota-rps", "2.5", "--quota-burst", "5", "--quota-faces", "16",
        "--aging-calls", "8", "--interactive-slack", "1.5",
    )  # fmt: skip
    assert chosen.default_priority is Priority.BULK
    assert chosen.quotas == ClientPolicy(requests_per_second=2.5, burst=5, max_faces=16)
    assert chosen.engine.aging_calls == 8 and chosen.engine.interactive_slack == 1.5
