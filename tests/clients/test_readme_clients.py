"""README's client examples, run as written against real servers (addresses and file names
substituted): the Python library block, and each language's TLS + token command line."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from readme_support import code_blocks, section

REPO_ROOT = Path(__file__).resolve().parents[2]


def readme_command_line(program: str) -> list[str]:
    """The README's TLS + token command line that starts with ``program``, split as a shell would."""
    (block,) = [b for b in code_blocks(section("Clients"), "bash") if "--tls-ca" in b]
    (line,) = [line for line in block.splitlines() if line.startswith(program + " ")]
    return shlex.split(line)


def substituted(argv: list[str], secure_server, folder: Path) -> list[str]:
    c = secure_server.certificates
    table = {
        "gpu-host:50051": secure_server.address,
        "ca.pem": str(c.ca_cert),
        "client.pem": str(c.client_cert),
        "client.key": str(c.client_key),
        "my.token": str(secure_server.token_file),
        "in.jpg": str(folder / "in.jpg"),
        "out.jpg": str(folder / "out.jpg"),
    }
    return [table.get(arg, arg) for arg in argv]


def run_readme_line(program: str, secure_server, face_png: Path, folder: Path) -> subprocess.CompletedProcess:
    shutil.copy(face_png, folder / "in.jpg")  # PNG bytes: the server reads the content, not the name
    argv = substituted(readme_command_line(program), secure_server, folder)
    if argv[0] == "python":
        argv[0] = sys.executable
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_python_block_runs_as_written(plain_server_address, face_png, tmp_path):
    (block,) = code_blocks(section("Clients"), "python")
    assert '"127.0.0.1:50051"' in block
    shutil.copy(face_png, tmp_path / "in.jpg")
    program = block.replace('"127.0.0.1:50051"', repr(plain_server_address))
    done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "result"
    assert (tmp_path / "out.jpg").read_bytes().startswith(b"\x89PNG")


def test_python_example_tls_token_line_runs_as_written(secure_server, face_png, tmp_path):
    done = run_readme_line("python", secure_server, face_png, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.jpg").is_file()


@pytest.mark.clients
@pytest.mark.timeout(1800 + 300)  # the first clients test pays clients/build_all.sh
@pytest.mark.parametrize(
    "program",
    [
        "node clients/typescript/dist/example.js",
        "clients/go/build/bin/masquerade-anonymize",
        "clients/cpp/build/masquerade-anonymize",
    ],
)
def test_other_languages_tls_token_lines_run_as_written(program, built_clients, secure_server, face_png, tmp_path):
    done = run_readme_line(program.split(" ")[0], secure_server, face_png, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("result faces=")
    assert (tmp_path / "out.jpg").is_file()
