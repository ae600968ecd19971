"""Benchmarks: each module has `add_arguments(parser)` and `run(args)`, behind `lmstack bench NAME` and
`python -m lmstack.bench.MODULE`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from lmstack.errors import LmstackError


def module_main(module: str, doc: str | None, add_arguments: Callable[[argparse.ArgumentParser], None],
                run: Callable[[argparse.Namespace], Any]) -> None:
    """`python -m lmstack.bench.MODULE`: parse, run, and report a user's mistake as one line, not a traceback."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc)
    add_arguments(parser)
    try:
        run(parser.parse_args())
    except LmstackError as e:
        parser.exit(2, f"error: {e}\n")
