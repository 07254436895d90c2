"""The `masquerade` command: anonymize files, manage model sets, serve over gRPC.

One module per sub-command (`anonymize`, `models`, `serve`), each with ``register(subparsers)``
adding its parser and a ``handler``; flags two of them share live in `options`. Nothing heavy is
imported here: each handler imports what its run needs, so `masquerade anonymize --method blur`
never loads torch (see docs/design.md, "What the classical path imports").
"""

from __future__ import annotations

import argparse
import logging
import sys

SUBCOMMANDS = {
    "anonymize": "anonymize image files or folders",
    "models": "fetch, build or check model sets",
    "serve": "run the gRPC anonymization server",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``argv``, only the sub-command it names gets its flags (some flags' defaults
    import the video or server modules: a blur run need not pay for them)."""
    import importlib

    chosen = next((arg for arg in argv if not arg.startswith("-")), None) if argv is not None else None
    parser = argparse.ArgumentParser(prog="masquerade", description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, summary in SUBCOMMANDS.items():
        if chosen is None or chosen == name or chosen not in SUBCOMMANDS:
            importlib.import_module(f"masquerade.cli.{name}").register(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _quiet_third_party()
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # the user gets one line; -v gives the traceback
        from masquerade.cli.files import PlanError
        from masquerade.engine.request import InvalidRequestError, MethodUnavailableError

        expected = (InvalidRequestError, MethodUnavailableError, PlanError, ValueError)
        # A ModelLoadError can only come from a loader already imported; importing it here would
        # load torch just to print a classical run's error line.
        loader = sys.modules.get("masquerade.models.loader")
        if loader is not None:
            expected += (loader.ModelLoadError,)
        if args.verbose or not isinstance(error, expected):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


def run() -> None:
    """The `masquerade` console script and `python -m masquerade.cli`: ``main``, then a quick exit.

    Once the command is done, everything it wrote is closed and its output is flushed here; what is
    left is the interpreter's exit, which collects every object of numpy, OpenCV, onnxruntime and
    ours: about 40 ms of a one-photo run's 200. Freezing the collector's generations first leaves
    them to the operating system (atexit handlers and reference-count finalizers still run): 20 ms."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    import gc

    gc.freeze()
    sys.exit(code)


def _quiet_third_party() -> None:
    """Warnings and loggers only: importing diffusers here would load torch for a classical run."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="diffusers")
    for name in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_model_libraries() -> None:
    """Silences diffusers' and transformers' own handlers and progress bars; call before loading weights."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
