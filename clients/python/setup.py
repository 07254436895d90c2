"""Build hook: every build (wheel, local install, editable install) generates the stubs in
masquerade_client/v1 from proto/, and they are packaged like any other module.

The runtime requirements are read from what was generated: the gRPC stub refuses to import
under a grpcio older than the generator, and the messages under an older protobuf runtime.
"""

import re
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stubgen


class BuildPyWithStubs(build_py):
    def run(self):
        stubgen.generate()
        super().run()


def _requirements() -> list[str]:
    if stubgen.is_stale():
        stubgen.generate()
    grpc_stub = (stubgen.OUTPUT_DIR / "anonymizer_pb2_grpc.py").read_text()
    grpc_version = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_stub).group(1)
    messages = (stubgen.OUTPUT_DIR / "anonymizer_pb2.py").read_text()
    found = re.search(r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", messages)
    protobuf_version = ".".join(found.groups()) if found else "4.25"
    return [
        f"grpcio>={grpc_version}",
        f"grpcio-health-checking>={'.'.join(grpc_version.split('.')[:2])}",
        f"protobuf>={protobuf_version}",
        # google.rpc.Status and RetryInfo: the RESOURCE_EXHAUSTED retry advice (errors.retry_delay).
        "googleapis-common-protos>=1.56",
    ]


# stream_frames takes and yields numpy arrays: `pip install masquerade-client[video]`.
setup(
    cmdclass={"build_py": BuildPyWithStubs},
    install_requires=_requirements(),
    extras_require={"video": ["numpy>=1.24", "pillow>=10"]},
)
