"""The ``soup`` command line: one typer app (``common.app``), one function per subcommand.

Subcommands live in ``merging`` (merge, push, inspect) and ``recipes`` (run, watch, worker, validate,
report, demo); ``common`` holds the app, the shared options and the error handling. Progress goes to
stderr, results to stdout. Exit codes: 0 success, 1 a soup error (one line, no traceback unless
``--debug`` or ``SOUP_DEBUG=1``), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

from soup.cli import merging, recipes  # noqa: F401 (registers the subcommands)
from soup.cli.common import SoupCommand, app, main

for _command in app.registered_commands:  # soup's usage and help layout for every subcommand
    _command.cls = SoupCommand

__all__ = ["app", "main"]
