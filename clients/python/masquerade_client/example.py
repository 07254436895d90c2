"""Anonymize one image over a stream, printing progress as it arrives.

python -m masquerade_client.example --server localhost:50051 photo.jpg anonymized.jpg
python -m masquerade_client.example --server host:50051 --tls-ca ca.pem --token-file token photo.jpg out.jpg

Exit codes: 0 done; 3 INVALID_ARGUMENT (the request was bad, the message names the field);
2 bad command line; 1 any other failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from masquerade_client import AnonymizerClient, InvalidArgument, MasqueradeError, pb2


def read_token(path: Path | None) -> str | None:
    """The first non-empty line of the token file."""
    if path is None:
        return None
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--token-file {path}: the file holds no token")
    return lines[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m masquerade_client.example",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("image", type=Path, help="JPEG, PNG or WebP file")
    parser.add_argument("output", type=Path, nargs="?", help="where to write the anonymized image")
    parser.add_argument("-o", "--output", dest="output_flag", type=Path, help="the same as OUTPUT")
    parser.add_argument("--server", default="localhost:50051", help="HOST:PORT of a masquerade server")
    parser.add_argument(
        "--method", default=None, help="reverse_personalization | blur | pixelate | solid (None: the server's default)"
    )
    parser.add_argument("--steps", type=int, default=None, help="diffusion steps (None: the server's default)")
    parser.add_argument("--attribute-prompt", default=None, help='e.g. "an old woman"')
    parser.add_argument("--aligned", action="store_true", help="the image is one already-aligned face")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds, retries included")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's CA roots")
    parser.add_argument("--tls-ca", type=Path, help="PEM: the CA that signed the server's certificate (implies TLS)")
    parser.add_argument("--tls-cert", type=Path, help="PEM: this client's certificate, for mutual TLS")
    parser.add_argument("--tls-key", type=Path, help="PEM: this client's private key, for mutual TLS")
    parser.add_argument("--token-file", type=Path, help="file whose first line is the bearer token")
    args = parser.parse_args(argv)
    output = args.output or args.output_flag
    if output is None or (args.output and args.output_flag):
        parser.error("give the output image once: OUTPUT or -o OUTPUT")
    try:
        token = read_token(args.token_file)
        client = AnonymizerClient(
            args.server,
            timeout=args.timeout,
            tls=args.tls,
            ca_file=args.tls_ca,
            cert_file=args.tls_cert,
            key_file=args.tls_key,
            token=token,
        )
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    with client:
        try:
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
                    output.write_bytes(result.image)
                    for face in result.faces:
                        print(
                            f"face {face.index}: {pb2.FaceStatus.Name(face.status).lower()} with "
                            f"{pb2.Method.Name(face.method_applied).lower()}"
                            + (f" ({face.reason})" if face.reason else "")
                        )
                    note = "no faces found; " if result.no_faces else ("" if result.complete else "INCOMPLETE; ")
                    print(
                        f"{note}wrote {output} ({result.width}x{result.height}) in {result.timings.total_seconds:.2f}s"
                    )
        except InvalidArgument as error:
            print(f"error: {error}", file=sys.stderr)
            return 3
        except MasqueradeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except OSError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
