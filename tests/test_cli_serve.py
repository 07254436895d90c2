"""`masquerade serve`'s flags: what reaches the configs, and bad values refused before anything starts."""

from __future__ import annotations

import asyncio
import threading

import pytest


def serve_args(*flags: str):
    from masquerade.cli import build_parser

    return build_parser(["serve"]).parse_args(["serve", *flags])


def refused(capsys, *flags: str) -> str:
    """argparse's error line for ``serve FLAGS``; exit code 2."""
    with pytest.raises(SystemExit) as exit_:
        serve_args(*flags)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def pixel_threads() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name.startswith("masquerade-pre-"))


@pytest.mark.parametrize("reserved", [0, 3])
def test_interactive_threads_are_added_to_the_engines_pixel_pool(reserved):
    from masquerade.cli.serve import config_from_args
    from masquerade.engine.engine import Engine

    config = config_from_args(serve_args("--interactive-threads", str(reserved)))
    assert config.engine.interactive_threads == reserved
    before = pixel_threads()
    engine = Engine(config.engine, None, "classical only: this test loads no weights")
    try:
        assert pixel_threads() - before == config.engine.preprocess_threads + reserved
    finally:
        asyncio.run(engine.shutdown(grace_seconds=1))
    assert pixel_threads() == before


def test_interactive_threads_default_keeps_one_reserved_thread():
    from masquerade.cli.serve import config_from_args
    from masquerade.engine.engine import EngineConfig

    assert config_from_args(serve_args()).engine.interactive_threads == EngineConfig().interactive_threads == 1


@pytest.mark.parametrize("value", ["-1", "two", "1.5"])
def test_a_bad_interactive_thread_count_is_refused_naming_the_flag(capsys, value):
    assert "argument --interactive-threads:" in refused(capsys, "--interactive-threads", value)


def test_torch_threads_reach_the_engine_and_default_to_the_automatic_count():
    from masquerade.cli.serve import config_from_args

    assert config_from_args(serve_args("--torch-threads", "3")).engine.torch_threads == 3
    assert config_from_args(serve_args()).engine.torch_threads is None


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_a_bad_torch_thread_count_is_refused_naming_the_flag(capsys, value):
    assert "argument --torch-threads:" in refused(capsys, "--torch-threads", value)


# ---- --ray-replicas: the HTTP API is not served there, and the flags say so ----------------------


def test_http_flags_with_ray_replicas_are_an_error_naming_them(capsys):
    from masquerade.cli.serve import run

    code = run(serve_args("--ray-replicas", "1", "--http-port", "9000", "--http-cors-origin", "https://a.example"))
    assert code == 2
    err = capsys.readouterr().err
    assert "--http-port, --http-cors-origin: the HTTP API is not served behind --ray-replicas" in err


def test_only_http_flags_given_other_values_than_their_defaults_count_as_set():
    from masquerade.cli.serve import http_flags_set

    assert http_flags_set(serve_args("--ray-replicas", "2")) == []  # defaults: a warning, not an error
    assert http_flags_set(serve_args("--http-host", "0.0.0.0", "--http-port", "0")) == ["--http-port", "--http-host"]
