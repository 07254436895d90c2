"""README.md says what the code does: its command-line examples run, its flag table is the parser's,
its ports are the server's defaults, and its client snippets are excerpts of the example sources."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from masquerade.cli import build_parser, main
from readme_support import code_blocks, section, table_rows
from sample_images import t1_image_path

REPO_ROOT = Path(__file__).resolve().parents[1]


def subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_command_line_examples_run_as_written(tmp_path, monkeypatch, capsys):
    (block,) = [b for b in code_blocks(section("Command line"), "bash") if "masquerade anonymize" in b]
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(tmp_path / "face.png")
    shutil.copy(t1_image_path(), tmp_path / "photo.jpg")
    (tmp_path / "photos" / "trip").mkdir(parents=True)
    shutil.copy(t1_image_path(), tmp_path / "photos" / "trip" / "group.jpg")
    Image.open(tmp_path / "face.png").save(tmp_path / "photos" / "face.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MASQUERADE_MODEL_DIR", str(tmp_path / "no-real-weights"))  # the offline default: blur
    for line in block.strip().splitlines():
        argv = shlex.split(line, comments=True)
        assert argv[0] == "masquerade", line
        assert main(argv[1:]) == 0, f"{line}\n{capsys.readouterr().err}"
    assert (tmp_path / "tiny").is_dir() and Image.open(tmp_path / "out.png").size == (48, 48)
    (record,) = json.loads((tmp_path / "report.json").read_text())
    assert record["output"] == "out.jpg" and record["faces"][0]["method_applied"] == "blur"
    assert (tmp_path / "anonymized" / "trip" / "group.jpg").is_file() and (
        tmp_path / "anonymized" / "face.png"
    ).is_file()


def test_flag_table_is_the_parsers():
    rows = table_rows(section("Command line"))
    documented = {}
    for cells in rows:
        flags = re.match(r"`([^`]*)`", cells[0]).group(1)
        default = cells[1]
        for flag in flags.split(", "):
            documented[flag.split(" ")[0]] = default
    anonymize = subparser("anonymize")
    seen = set()
    for action in anonymize._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        names = [name for name in action.option_strings if name in documented]
        assert names, f"{'/'.join(action.option_strings)} is missing from README's flag table"
        cell = documented[names[0]]
        if action.required:
            expected = "(required)"
        elif action.default is None or action.default is False:
            expected = ""
        else:
            expected = f"`{action.default}`"
        assert cell == expected, f"{names[0]}: README says default {cell!r}, the parser {expected!r}"
        if action.choices:
            assert "|".join(action.choices) in re.sub(r"\\\|", "|", [c for c in rows if names[0] in c[0]][0][0])
        seen.update(action.option_strings)
    assert set(documented) <= seen, f"README documents flags the parser lacks: {set(documented) - seen}"


def test_stated_addresses_are_the_servers_defaults():
    serve = {a.dest: a.default for a in subparser("serve")._actions}
    text = section("Command line")
    assert f"gRPC on {serve['host']}:{serve['port']}" in text
    assert f"http://{serve['metrics_host']}:{serve['metrics_port']}" in text


@pytest.mark.parametrize(
    ("language", "source"),
    [
        ("ts", "clients/typescript/example.ts"),
        ("go", "clients/go/cmd/masquerade-anonymize/main.go"),
        ("cpp", "clients/cpp/examples/anonymize.cc"),
    ],
)
def test_client_snippets_are_excerpts_of_the_example_sources(language, source):
    (snippet,) = code_blocks(section("Clients"), language)
    assert f"`{source}`" in section("Clients")
    lines = [line.strip() for line in (REPO_ROOT / source).read_text().splitlines()]
    position = 0
    for line in snippet.splitlines():
        line = line.strip()
        if not line or line.startswith("//"):
            continue
        assert line in lines[position:], f"README's {language} line is not in {source} (in order): {line}"
        position = lines.index(line, position) + 1


def test_http_examples_run_as_written(tmp_path):
    """Every curl line of "HTTP API and web page", against a real server (classical methods: no model weights)."""
    import subprocess
    from dataclasses import replace

    from masquerade.engine.engine import Engine, EngineConfig
    from server_support import BackgroundServer, loopback_config

    text = section("HTTP API")
    serve = {a.dest: a.default for a in subparser("serve")._actions}
    assert f"http://{serve['host']}:{serve['http_port']}" in text
    (block,) = code_blocks(text, "bash")
    engine_config = EngineConfig(models="tiny", device="cpu")
    engine = Engine(engine_config, None, "README test: classical methods only")
    running = BackgroundServer(replace(loopback_config(engine_config), http_port=0), engine).start()
    shutil.copy(t1_image_path(), tmp_path / "photo.jpg")
    try:
        for line in block.strip().splitlines():
            assert line.startswith("curl "), line
            command = line.replace("127.0.0.1:8080", f"127.0.0.1:{running._state.http_port}")
            done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{line}\n{done.stdout}{done.stderr}"
    finally:
        running.stop()
    info = json.loads((tmp_path / "info.json").read_text())
    assert {m["method"]: m["available"] for m in info["methods"]}["BLUR"] is True
    assert Image.open(tmp_path / "blurred.jpg").size == Image.open(tmp_path / "photo.jpg").size
    assert "x-masquerade-report-size:" in (tmp_path / "headers.txt").read_text().lower()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["request_id"] == "a1" and report["format"] == "PNG" and len(report["faces"]) == 6
    assert {face["method_applied"] for face in report["faces"]} == {"PIXELATE"}
    solid = json.loads((tmp_path / "solid.json").read_text())
    assert {face["method_applied"] for face in solid["faces"]} == {"SOLID"}
    events = (tmp_path / "events.txt").read_text()
    assert events.index("event: queued") < events.index("event: faces_found") < events.index("event: result")
    assert "/v1/anonymize:stream" in json.loads((tmp_path / "openapi.json").read_text())["paths"]
