"""Generates the Python protobuf and gRPC modules from proto/ into masquerade.v1.

The generated files are git-ignored and never edited by hand. ``ensure_generated``
rebuilds them when they are missing or older than the proto; it writes into a
temporary folder beside the target and moves each file with ``os.replace``, so
two processes racing to regenerate both leave complete, identical files.

Run explicitly with ``python -m masquerade.api.codegen``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# server/masquerade/api/codegen.py -> repository root.
REPO_ROOT = Path(__file__).resolve().parents[3]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILE = Path("masquerade/v1/anonymizer.proto")  # relative to PROTO_ROOT; its path sets the import names
OUTPUT_DIR = Path(__file__).resolve().parents[1] / "v1"  # the masquerade.v1 package
GENERATED_FILES = ("anonymizer_pb2.py", "anonymizer_pb2.pyi", "anonymizer_pb2_grpc.py")


class CodegenError(RuntimeError):
    """protoc failed or the proto cannot be found; the message says which file and why."""


def _is_stale(proto_path: Path, output_dir: Path) -> bool:
    outputs = [output_dir / name for name in GENERATED_FILES]
    if not all(path.exists() for path in outputs):
        return True
    proto_mtime = proto_path.stat().st_mtime
    return any(path.stat().st_mtime < proto_mtime for path in outputs)


def generate(proto_root: Path = PROTO_ROOT, output_dir: Path = OUTPUT_DIR) -> list[Path]:
    """Runs protoc on the proto and atomically installs the modules into ``output_dir``."""
    from grpc_tools import protoc  # grpcio-tools; imported lazily, it is only needed to regenerate

    proto_path = proto_root / PROTO_FILE
    if not proto_path.exists():
        raise CodegenError(f"{proto_path}: proto not found; run from a source checkout of masquerade")
    # protoc's own well-known types (google/protobuf/*.proto) ship inside grpc_tools.
    well_known = Path(protoc.__file__).parent / "_proto"
    output_dir.mkdir(parents=True, exist_ok=True)
    # The temporary folder sits beside the target so os.replace never crosses filesystems.
    with tempfile.TemporaryDirectory(prefix=".codegen-", dir=output_dir) as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            # An absolute path inside the -I root maps to the virtual name
            # masquerade/v1/anonymizer.proto (no chdir: servers call this from threads).
            str(proto_path),
        ]
        code = protoc.main(args)
        if code != 0:
            raise CodegenError(f"{proto_path}: protoc exited with {code}; see its messages above")
        produced = Path(tmp) / PROTO_FILE.parent
        installed = []
        for name in GENERATED_FILES:
            source = produced / name
            if not source.exists():
                raise CodegenError(f"{source}: protoc did not produce it")
            target = output_dir / name
            os.replace(source, target)
            installed.append(target)
    log.info("generated %s from %s", ", ".join(p.name for p in installed), proto_path)
    return installed


def ensure_generated(proto_root: Path = PROTO_ROOT, output_dir: Path = OUTPUT_DIR) -> bool:
    """Regenerates when the modules are missing or older than the proto. Returns True if it did.

    Without a proto (an installed wheel rather than a checkout), existing modules are used as is.
    """
    proto_path = proto_root / PROTO_FILE
    if not proto_path.exists():
        if all((output_dir / name).exists() for name in GENERATED_FILES):
            return False
        raise CodegenError(f"{proto_path}: proto not found and {output_dir} holds no generated modules")
    if not _is_stale(proto_path, output_dir):
        return False
    generate(proto_root, output_dir)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m masquerade.api.codegen", description=__doc__.splitlines()[0])
    parser.add_argument("--if-stale", action="store_true", help="only regenerate when missing or older than the proto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.if_stale:
            ensure_generated()
        else:
            generate()
    except CodegenError as exc:
        print(f"codegen: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
