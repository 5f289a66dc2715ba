"""User-facing errors: one line, non-zero exit, no traceback.

Library code raises `UserError` for bad input (a missing file, a bad field, an unsupported architecture); tools wrap
their `main` with `run_cli`, which prints `error: <message>` on stderr and exits with status 2. A run that cannot go on
(a training loss that became NaN) raises `RunStopped`: also one line, exit status 1. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user. The message names the file/line/field and the problem, in one line."""


class RunStopped(Exception):
    """A run stopped on purpose because going on would write wrong results (e.g. a NaN loss before the optimizer step);
    the message says why, what was kept and what to do, in one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a one-line `UserError` (run_cli prints it; no usage dump)."""

    def error(self, message):  # noqa: D401 - argparse API
        raise UserError(f"{self.prog}: {message}")


def run_cli(main: Callable[[], object]) -> None:
    try:
        result = main()
    except (UserError, RunStopped) as exc:
        message = " ".join(str(exc).split())  # guarantee one line
        # one write of the whole line: under torchrun every rank's line arrives whole (print writes the newline
        # separately, and two ranks' lines ran together)
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        sys.exit(2 if isinstance(exc, UserError) else 1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    if isinstance(result, int) and result:
        sys.exit(result)
