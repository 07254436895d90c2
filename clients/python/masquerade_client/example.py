"""Anonymize one image over a stream, printing progress as it arrives.

python -m masquerade_client.example --server localhost:50051 photo.jpg -o anonymized.jpg
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from masquerade.api.protos import pb2
from masquerade_client import AnonymizerClient, MasqueradeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m masquerade_client.example", description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path, help="JPEG, PNG or WebP file")
    parser.add_argument("-o", "--output", type=Path, required=True, help="where to write the anonymized image")
    parser.add_argument("--server", default="localhost:50051", help="HOST:PORT of a masquerade server")
    parser.add_argument(
        "--method", default=None, help="reverse_personalization | blur | pixelate | solid (server default if unset)"
    )
    parser.add_argument("--steps", type=int, default=None, help="diffusion steps (server default if unset)")
    parser.add_argument("--attribute-prompt", default=None, help='e.g. "an old woman"')
    parser.add_argument("--aligned", action="store_true", help="the image is one already-aligned face")
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds")
    args = parser.parse_args(argv)

    with AnonymizerClient(args.server, timeout=args.timeout) as client:
        try:
            client.wait_ready(timeout=min(args.timeout, 60.0))
            for event in client.anonymize_stream(
                args.image.read_bytes(),
                method=args.method,
                steps=args.steps,
                attribute_prompt=args.attribute_prompt,
                aligned=args.aligned,
                request_id=args.image.name,
            ):
                kind = event.WhichOneof("event")
                if kind == "queued":
                    print(f"queued (position {event.queued.position})", flush=True)
                elif kind == "faces_found":
                    print(f"{len(event.faces_found.boxes)} face(s) found", flush=True)
                elif kind == "progress":
                    p = event.progress
                    print(f"{pb2.Phase.Name(p.phase).lower():<12} {p.step}/{p.total}", flush=True)
                elif kind == "result":
                    result = event.result
                    args.output.write_bytes(result.image)
                    for face in result.faces:
                        print(
                            f"face {face.index}: {pb2.FaceStatus.Name(face.status).lower()} with "
                            f"{pb2.Method.Name(face.method_applied).lower()}"
                            + (f" ({face.reason})" if face.reason else "")
                        )
                    note = "no faces found; " if result.no_faces else ("" if result.complete else "INCOMPLETE; ")
                    print(
                        f"{note}wrote {args.output} ({result.width}x{result.height}) in {result.timings.total_seconds:.2f}s"
                    )
        except MasqueradeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
