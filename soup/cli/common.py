"""The ``soup`` app, the options several subcommands share, and how errors become exit codes.

Progress goes to stderr, results to stdout. Exit codes: 0 success, 1 a soup error (one line, no
traceback unless ``--debug`` or ``SOUP_DEBUG=1``), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Annotated, Optional

import typer
from rich.console import Console

from soup.errors import SoupError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Model soups: merge fine-tuned checkpoints by weighted averaging, "
                       "driven by evaluation scores.")
# user text (paths, rule strings such as take:-1 or :fire:) is printed literally: no markup, no emoji
out = Console(highlight=False, soft_wrap=True, emoji=False, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False, markup=False)
_state = {"debug": os.environ.get("SOUP_DEBUG", "") not in ("", "0")}

# options shared by several subcommands
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder "
                                         "(only once the new soup is complete).")]
PushTo = Annotated[Optional[str], typer.Option("--push-to", help="Push the soup to this hub repo (owner/name) "
                                              "while it is written.")]
Revision = Annotated[Optional[str], typer.Option("--revision", help="Branch to push to (default main).")]
Private = Annotated[bool, typer.Option("--private", help="Create the repo private.")]
CreatePr = Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")]
Message = Annotated[Optional[str], typer.Option("--commit-message", "-m", help="Commit message.")]
Endpoint = Annotated[Optional[str], typer.Option("--endpoint", envvar="HF_ENDPOINT",
                                                 help="Hub endpoint for hf:// ingredients and pushes.")]
StateDictKey = Annotated[Optional[str], typer.Option(
    "--state-dict-key", help="Torch files (.pt/.pth/.bin): the top-level key the weights are under "
    "(default: the file itself if it is a flat state dict, else the one of state_dict, module, model "
    "holding one).")]
StripPrefix = Annotated[Optional[str], typer.Option(
    "--strip-prefix", help="Remove this prefix from every tensor name that has it, e.g. 'module.' "
    "(DDP) or '_orig_mod.' (torch.compile); soup inspect shows a shared prefix.")]
Cache = Annotated[Optional[str], typer.Option(help="Score cache: a sqlite path, or a database URL "
                                              "(sqlite:///..., postgresql://...).")]
NoCache = Annotated[bool, typer.Option("--no-cache", help="Evaluate everything; store nothing.")]
Devices = Annotated[Optional[str], typer.Option(help="Evaluate on these devices concurrently, e.g. "
                                                "cuda:0,cuda:1 (overrides the recipe's devices).")]


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False) -> None:
    if debug:
        _state["debug"] = True


@contextmanager
def _errors():
    """Run a command body: a SoupError or an environment fault becomes one line on stderr and exit 1;
    Ctrl-C, SIGTERM and SIGHUP unwind (temp folders and child processes cleaned up) and exit 128+N.
    Every line is stripped of hub tokens and has its control characters escaped (a file name or a
    server's message may carry terminal escape sequences)."""
    from soup.errors import os_error_line, printable, redact
    from soup.signals import exit_code, graceful

    try:
        with graceful():
            yield
    except SoupError as e:
        if _state["debug"]:
            raise
        err.print(f"error: {printable(redact(str(e)))}")
        raise typer.Exit(1) from None
    except OSError as e:  # disk full, read-only, permission denied, too many open files...
        if _state["debug"]:
            raise
        err.print(f"error: {printable(redact(os_error_line(e)))}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt as e:
        name = getattr(e, "args", None) and e.args[0] or "SIGINT"
        err.print(f"interrupted ({name}): nothing half-written was left behind")
        raise typer.Exit(exit_code(e)) from None


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    from soup.options import check_weights

    try:
        return list(check_weights(text.split(","), where="--weights"))
    except SoupError as e:  # not numbers, NaN, inf or overflowing
        raise typer.BadParameter(str(e).removeprefix("--weights: "), param_hint="--weights") from None


def _print_push(res) -> None:
    out.print(f"pushed {res.pr_url or res.commit_url or res.repo_url} (commit {res.commit})")



def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SoupError as e:  # raised outside a command body (e.g. by a callback)
        if _state["debug"]:
            raise
        from soup.errors import redact

        print(f"error: {redact(str(e))}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
