"""The ``lpbq-tvm`` command line (also ``python -m lpbq_tvm``): readable tables over the public API.

:func:`main` parses the arguments (:mod:`~lpbq_tvm.cli.parser`), configures logging, runs the
command's handler (:mod:`~lpbq_tvm.cli.commands`) and turns an error into a one-line reason and
an exit code that says which kind of failure it was.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence

from rich.console import Console

from lpbq_tvm.cli.parser import build_parser

__all__ = ["build_parser", "main"]

# Exit codes, distinct per kind of failure (1: `check` found problems, commands.EXIT_PROBLEMS_FOUND).
EXIT_BAD_INPUT = 2  # invalid model, options or data
EXIT_OUTPUT_EXISTS = 3  # the output exists (without --force) or is a symbolic link
EXIT_IO = 4  # a file could not be read or written
EXIT_TOOLCHAIN = 5  # TVM or onnxruntime failed on a valid model
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = (
        logging.DEBUG
        if args.debug
        else logging.INFO
        if args.verbose
        else logging.ERROR
        if args.quiet
        else logging.WARNING
    )
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    console = Console(quiet=args.quiet or args.json)
    args.result = {}
    failures = (
        (FileExistsError, EXIT_OUTPUT_EXISTS),
        (ValueError, EXIT_BAD_INPUT),
        (OSError, EXIT_IO),
        (RuntimeError, EXIT_TOOLCHAIN),
    )
    try:
        code = args.handler(args, console)
        if args.json:
            print(json.dumps({"exit_code": code, **args.result}, default=str))
        return code
    except KeyboardInterrupt:
        print(f"lpbq-tvm {args.command}: interrupted; no partial output was left", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of our output went away (e.g. `| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except tuple(kind for kind, _ in failures) as error:
        if args.debug:
            raise
        message = " ".join(str(error).split())
        print(f"lpbq-tvm {args.command}: error: {message}", file=sys.stderr)
        code = next(code for kind, code in failures if isinstance(error, kind))
        if args.json:
            print(json.dumps({"exit_code": code, "error": message}))
        return code
