"""The ``soup`` app, the options several subcommands share, and how errors become exit codes.

Progress goes to stderr, results to stdout. Exit codes: 0 success, 1 a soup error (one ``error:`` line,
no traceback unless ``--debug`` or ``SOUP_DEBUG=1``), 2 a usage error (one ``error:`` line too, naming
the option), 130 interrupted. ``--debug`` and ``-q`` go before or after the subcommand; help is plain
text with upper-case metavars, readable at 80 columns.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from soup.errors import SoupError, printable

_FLAGS = ("--debug",)  # the app's own flags, accepted after the subcommand too
_QUIET = ("-q", "--quiet")  # the subcommands' own flag, accepted before the subcommand too


class SoupCommand(TyperCommand):
    """typer's command with click's plain layout: upper-case metavars (``--weights WEIGHTS``), usage
    ``soup merge [OPTIONS] INGREDIENTS...`` and arguments listed without a type column. Every subcommand
    gets it (``soup.cli`` sets it on the registered commands: typer has no app-wide command class)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.metavar is None and not getattr(param, "is_flag", False) and param.name:
                dots = "..." if param.param_type_name == "argument" and param.nargs != 1 else ""
                param.metavar = param.name.upper() + dots

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(param.metavar if param.required else f"[{param.metavar}]")
        return pieces

    def format_options(self, ctx, formatter) -> None:
        args = [(p.metavar, p.help or "") for p in self.get_params(ctx) if p.param_type_name == "argument"]
        opts = [rv for p in self.get_params(ctx) if p.param_type_name == "option"
                if (rv := p.get_help_record(ctx)) is not None]
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


class SoupGroup(TyperGroup):
    """typer's group with the habits of its neighbours (``hf``, ``git``): ``--debug`` anywhere and ``-q``
    before the subcommand too, and a usage error as one ``error:`` line naming the option (exit 2), like
    a soup error's (exit 1)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _arrange(list(args), self.commands))

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode: bool = True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            err.print("aborted")
            sys.exit(1)
        except typer.TyperException as e:  # click's usage errors (typer's copy of click)
            from soup.errors import printable

            if type(e).__name__ == "NoArgsIsHelpError":  # `soup` alone: the help, as typer prints it
                err.print(e.format_message())
            else:
                err.print(f"error: {printable(_usage_line(e))}")
            sys.exit(getattr(e, "exit_code", 2))
        sys.exit(code if isinstance(code, int) else 0)


def _arrange(args: list[str], commands) -> list[str]:
    """``--debug`` after the subcommand moved before it (the app's flag); ``-q`` before it moved after it
    (the subcommand's flag, where it has one). Nothing after ``--`` moves."""
    at = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
    if at is None or args[at] not in commands:
        return args
    before, name, after = args[:at], args[at], args[at + 1:]
    end = after.index("--") if "--" in after else len(after)
    flags = [a for a in after[:end] if a in _FLAGS]
    after = [a for a in after[:end] if a not in _FLAGS] + after[end:]
    quiet = [a for a in before if a in _QUIET] if any(p.name == "quiet" for p in commands[name].params) else []
    before = [a for a in before if a not in quiet]
    return before + flags + [name] + quiet + after


def _usage_line(e) -> str:
    """A usage error in soup's words: ``--weights: 'a' is not a number (see: soup merge --help)``."""
    text = e.format_message()
    if isinstance(e, typer.BadParameter) and type(e).__name__ == "BadParameter":  # not MissingParameter
        hint = e.param_hint
        if hint is None and e.param is not None:
            hint = " / ".join(e.param.opts) if getattr(e.param, "opts", None) else e.param.name
        hint = " / ".join(hint) if isinstance(hint, (list, tuple)) else hint
        if hint:
            text = f"{hint.replace(chr(39), '')}: {e.message}"
    ctx = getattr(e, "ctx", None)
    return f"{text} (see: {ctx.command_path if ctx is not None else 'soup'} --help)"


app = typer.Typer(name="soup", cls=SoupGroup, no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False, rich_markup_mode=None,
                  help="Model soups: merge fine-tuned checkpoints by weighted averaging, "
                       "driven by evaluation scores.")


class _Inert(Console):
    """A console that prints text from files inert: control characters (an escape sequence in a folder
    name, a tensor name, a downloaded soup.json) shown as visible escapes (``soup.errors.printable``)."""

    def print(self, *objects: object, **kwargs: object) -> None:  # type: ignore[override]
        super().print(*(printable(o) if isinstance(o, str) else o for o in objects), **kwargs)


# user text (paths, rule strings such as take:-1 or :fire:) is printed literally: no markup, no emoji
out = _Inert(highlight=False, soft_wrap=True, emoji=False, markup=False)
err = _Inert(stderr=True, highlight=False, soft_wrap=True, emoji=False, markup=False)
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
    "--key", "--state-dict-key", metavar="KEY", help="Torch files (.pt/.pth/.bin): the top-level key the weights are under "
    "(default: the file itself if it is a flat state dict, else the one of state_dict, module, model "
    "holding one); the recipe's ingredient key and soup.Ingredient(key=...).")]
StripPrefix = Annotated[Optional[str], typer.Option(
    "--strip-prefix", help="Remove this prefix from every tensor name that has it, e.g. 'module.' "
    "(DDP) or '_orig_mod.' (torch.compile); soup inspect shows a shared prefix.")]
Cache = Annotated[Optional[str], typer.Option(help="Score cache: a sqlite path, or a database URL "
                                              "(sqlite:///..., postgresql://...).")]
NoCache = Annotated[bool, typer.Option("--no-cache", help="Evaluate everything; store nothing.")]
Devices = Annotated[Optional[str], typer.Option(help="Evaluate on these devices concurrently, e.g. "
                                                "cuda:0,cuda:1 (overrides the recipe's devices).")]


def _version(value: bool) -> None:
    if value:
        from soup.merging import soup_version

        out.print(f"soup {soup_version()}")
        raise typer.Exit()


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks (also after the "
                                              "subcommand, or SOUP_DEBUG=1).")] = False,
          quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr (as the subcommand's "
                                              "-q).")] = False,
          version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version,
                                                help="Print soup's version and exit.")] = False) -> None:
    _state["debug"] = debug or os.environ.get("SOUP_DEBUG", "") not in ("", "0")  # read at each command


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
    except (typer.Exit, typer.Abort, click.ClickException):
        raise
    except Exception as e:  # a bug in soup or a plug-in: still one line (the traceback with --debug)
        if _state["debug"]:
            raise
        err.print(f"error: internal error: {type(e).__name__}: {printable(redact(str(e)))} "
                  "(run with --debug for the traceback)")
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
