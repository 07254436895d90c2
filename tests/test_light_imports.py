"""The classical path loads no diffusion stack: what `python -X importtime` lists for real runs.

Importing torch and diffusers alone takes seconds, which blur, pixelate and solid never use
(docs/design.md, "What the classical path imports").
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from sample_images import t1_image_path

# Top-level packages and our own modules that belong to reverse personalization only.
HEAVY_PACKAGES = ("torch", "diffusers", "transformers", "triton", "accelerate", "peft", "safetensors")
HEAVY_MODULES = (
    "masquerade.engine.diffusion",
    "masquerade.engine.runner",
    "masquerade.engine.job",
    "masquerade.engine.noise",
    "masquerade.engine.solver",
    "masquerade.models.loader",
    "masquerade.models.arcface",
    "masquerade.models.optimize",
    "masquerade.models.tiny",
    "masquerade_kernels.reference",
    "masquerade_kernels.guidance_step",
)


def imported_modules(importtime_log: str) -> set[str]:
    """Module names from PYTHONPROFILEIMPORTTIME's lines: `import time: self | cumulative | name`."""
    names = set()
    for line in importtime_log.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+\d+ \|\s*(\S+)", line)
        if match:
            names.add(match.group(1))
    return names


def heavy_among(names: set[str]) -> list[str]:
    return sorted(name for name in names if name.split(".")[0] in HEAVY_PACKAGES or name in HEAVY_MODULES)


def _serve_flags() -> set[str]:
    from masquerade.cli import build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    return {flag for action in serve._actions for flag in action.option_strings}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}


def test_classical_cli_imports_no_torch_diffusers_or_diffusion_engine(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.open(t1_image_path()).save(folder / "people.jpg")  # faces: detection and covers really run
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "blank.png")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "masquerade.cli",
            "anonymize",
            "--method",
            "blur",
            str(folder),
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "people.jpg").is_file() and (tmp_path / "out" / "blank.png").is_file()
    names = imported_modules(result.stderr)
    assert "masquerade.face.classical" in names and "onnxruntime" in names  # the log really lists imports
    assert heavy_among(names) == []


@pytest.mark.parametrize("log_format", ["text", "json"])  # json also routes the HF libraries' logging
def test_default_server_without_weights_imports_no_torch(tmp_path, log_format):
    empty_models = tmp_path / "models"
    empty_models.mkdir()
    stderr_path, stdout_path = tmp_path / "stderr.txt", tmp_path / "stdout.txt"
    command = [sys.executable, "-m", "masquerade.cli", "serve", "--port", "0", "--metrics-port", "0"]
    command += ["--log-format", log_format]
    command += ["--drain-seconds", "0", "--grace-seconds", "1"]
    if "--http-port" in _serve_flags():
        command += ["--http-port", "0"]  # the HTTP API (and its imports) too, on a free port
    serving = False
    with open(stderr_path, "w") as stderr, open(stdout_path, "w") as stdout:
        process = subprocess.Popen(
            command, stdout=stdout, stderr=stderr, env={**_env(), "MASQUERADE_MODEL_DIR": str(empty_models)}
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and process.poll() is None:
                # The log goes to stdout or stderr depending on the log handler: read both files.
                lines = [
                    line
                    for path in (stdout_path, stderr_path)
                    for line in path.read_text(errors="replace").splitlines()
                    if "masquerade serving on" in line
                ]
                if lines:
                    serving = "methods=[blur,pixelate,solid]" in lines[0]
                    break
                time.sleep(0.2)
        finally:
            process.terminate()
            process.wait(timeout=60)
    assert serving, stdout_path.read_text()[-2000:] + stderr_path.read_text()[-2000:]
    log = stderr_path.read_text()
    if log_format == "json":  # once the JSON log is set up, native stderr lines arrive as its messages
        log = "\n".join(json.loads(line)["message"] if line.startswith("{") else line for line in log.splitlines())
    names = imported_modules(log)
    assert "masquerade.api.server" in names
    assert heavy_among(names) == []
