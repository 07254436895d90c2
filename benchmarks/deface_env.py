"""deface (https://github.com/ORB-HD/deface) in a venv of its own, for side-by-side benchmarks.

Never in the project's venv: deface depends on the GUI OpenCV build, which clashes with the
headless one. The venv is made on first use (``pip install deface==1.5.0 onnxruntime``, a minute
or two from PyPI) under ``benchmarks/.deface-venv`` (git-ignored) and reused afterwards.

    deface_command() -> list[str]        # argv prefix that runs deface: [".../bin/deface"]
    deface_python() -> Path              # the venv's python, for `python -c "import ..."` timings
    DEFACE_VERSION                       # "1.5.0"
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DEFACE_VERSION = "1.5.0"
VENV = Path(__file__).resolve().parent / ".deface-venv"


def ensure_deface_env(venv: Path = VENV) -> Path:
    """The venv's root, created and filled if it is not there yet (raises CalledProcessError offline)."""
    executable = venv / "bin" / "deface"
    if not executable.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, f"deface=={DEFACE_VERSION}", "onnxruntime"], check=True, timeout=1800)
    return venv


def deface_command(venv: Path = VENV) -> list[str]:
    return [str(ensure_deface_env(venv) / "bin" / "deface")]


def deface_python(venv: Path = VENV) -> Path:
    return ensure_deface_env(venv) / "bin" / "python"


if __name__ == "__main__":
    print(" ".join(deface_command()))
