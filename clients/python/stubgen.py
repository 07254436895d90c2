"""Generates masquerade_client/v1 (protobuf + gRPC modules) from the repository's proto/.

Used by setup.py when the distribution is built (grpcio-tools is a build requirement,
never a runtime one) and by the test suite when proto/ is newer than the stubs.
The generated files are git-ignored. ``python stubgen.py`` regenerates them by hand.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"  # clients/python -> repository root
PROTO_FILE = Path("masquerade/v1/anonymizer.proto")
OUTPUT_DIR = HERE / "masquerade_client" / "v1"
GENERATED = ("anonymizer_pb2.py", "anonymizer_pb2.pyi", "anonymizer_pb2_grpc.py")
INIT = '"""Generated from proto/masquerade/v1/anonymizer.proto when masquerade-client is built; do not edit."""\n'


def is_stale(proto_root: Path = PROTO_ROOT, output_dir: Path = OUTPUT_DIR) -> bool:
    proto = proto_root / PROTO_FILE
    outputs = [output_dir / name for name in (*GENERATED, "__init__.py")]
    if not all(path.exists() for path in outputs):
        return True
    return proto.exists() and any(path.stat().st_mtime < proto.stat().st_mtime for path in outputs)


def generate(proto_root: Path = PROTO_ROOT, output_dir: Path = OUTPUT_DIR) -> list[Path]:
    """Runs protoc and installs the modules into ``output_dir`` (atomically, file by file)."""
    from grpc_tools import protoc

    proto = proto_root / PROTO_FILE
    if not proto.exists():
        raise RuntimeError(
            f"{proto}: not found. masquerade-client is built from a checkout of the Masquerade repository "
            "(pip install ./clients/python), which holds proto/ two levels up"
        )
    well_known = Path(protoc.__file__).parent / "_proto"
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".stubgen-", dir=output_dir) as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"{proto}: protoc failed; see its messages above")
        produced = Path(tmp) / PROTO_FILE.parent
        installed = []
        for name in GENERATED:
            text = (produced / name).read_text()
            # protoc names the modules after the proto's path (masquerade.v1); here they live in
            # masquerade_client.v1, so the client never imports the server's `masquerade` package.
            text = re.sub(r"^from masquerade\.v1 import ", "from masquerade_client.v1 import ", text, flags=re.M)
            (produced / name).write_text(text)
            os.replace(produced / name, output_dir / name)
            installed.append(output_dir / name)
        init = Path(tmp) / "__init__.py"
        init.write_text(INIT)
        os.replace(init, output_dir / "__init__.py")
    return installed


if __name__ == "__main__":
    for path in generate():
        print(f"generated {path}", file=sys.stderr)
