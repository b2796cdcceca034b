"""The ``soup`` command line: one typer app, one function per subcommand.

Progress goes to stderr, results to stdout. Exit codes: 0 success, 1 a soup error (one line, no
traceback unless ``--debug`` or ``SOUP_DEBUG=1``), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .errors import SoupError

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


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False) -> None:
    if debug:
        _state["debug"] = True


@contextmanager
def _errors():
    """Run a command body: a SoupError or an environment fault becomes one line on stderr and exit 1;
    Ctrl-C, SIGTERM and SIGHUP unwind (temp folders and child processes cleaned up) and exit 128+N.
    Every line is stripped of hub tokens."""
    from .errors import os_error_line, redact
    from .signals import exit_code, graceful

    try:
        with graceful():
            yield
    except SoupError as e:
        if _state["debug"]:
            raise
        err.print(f"error: {redact(str(e))}")
        raise typer.Exit(1) from None
    except OSError as e:  # disk full, read-only, permission denied, too many open files...
        if _state["debug"]:
            raise
        err.print(f"error: {redact(os_error_line(e))}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt as e:
        name = getattr(e, "args", None) and e.args[0] or "SIGINT"
        err.print(f"interrupted ({name}): nothing half-written was left behind")
        raise typer.Exit(exit_code(e)) from None


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    from .options import check_weights

    try:
        return list(check_weights(text.split(","), where="--weights"))
    except SoupError as e:  # not numbers, NaN, inf or overflowing
        raise typer.BadParameter(str(e).removeprefix("--weights: "), param_hint="--weights") from None


@app.command()
def merge(
    ingredients: Annotated[list[str], typer.Argument(help="Checkpoint folders, weight files or hf://owner/name@revision.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (created atomically).")],
    weights: Annotated[Optional[str], typer.Option(help="Comma-separated weights, one per ingredient "
                                                   "(default uniform), normalised to sum to 1.")] = None,
    no_normalize: Annotated[bool, typer.Option("--no-normalize", help="Use the weights as given.")] = False,
    dtype: Annotated[Optional[str], typer.Option(help="Output dtype of float tensors: bfloat16, float16, "
                                                 "float32 (default: the ingredients').")] = None,
    accumulate: Annotated[str, typer.Option(help="Accumulation dtype: float32 or float64.")] = "float32",
    shard_size: Annotated[str, typer.Option(help="Maximum bytes per output shard, e.g. 5GB, 500MB.")] = "5GB",
    device: Annotated[str, typer.Option(help="Where the math runs: cpu or cuda.")] = "cpu",
    rule: Annotated[Optional[list[str]], typer.Option("--rule", help="Per-tensor rule, first match wins: "
                                                      "'PATTERN=take:N', 'PATTERN=drop' or 'PATTERN=W1,W2,...'. "
                                                      "Repeatable.")] = None,
    config_from: Annotated[str, typer.Option(help="Ingredient (index or name) whose config, tokenizer and "
                                             "processor files are copied.")] = "0",
    strict: Annotated[bool, typer.Option(help="Differing integer/bool buffers are an error, not a warning.")] = False,
    overwrite: Overwrite = False,
    push_to: PushTo = None,
    revision: Revision = None,
    private: Private = False,
    create_pr: CreatePr = False,
    commit_message: Message = None,
    endpoint: Endpoint = None,
    quiet: Quiet = False,
) -> None:
    """Merge checkpoints into their weighted mean (a model soup), streaming tensor by tensor."""
    from .ingredients import HubOptions
    from .inspection import human_bytes
    from .engine import merge as run_merge
    from .hub.publisher import Publisher

    w = _weights(weights)
    target = {"repo": push_to, "revision": revision, "private": private, "create_pr": create_pr,
              "commit_message": commit_message} if push_to else None
    with _errors():
        publisher = Publisher(target, endpoint=endpoint)
        try:
            publisher.start()
            result = run_merge(ingredients, output, weights=w, normalize=not no_normalize, dtype=dtype,
                               accumulate=accumulate, shard_size=shard_size, device=device, rules=rule or (),
                               strict=strict, config_from=config_from, overwrite=overwrite, progress=not quiet,
                               hub=HubOptions(endpoint=endpoint), on_shard=publisher.on_shard)
            m = result.manifest
            out.print(f"{result.path}\t{m.tensors} tensors\t{human_bytes(m.total_size)}\t"
                      f"{len(m.files)} shard(s)\t{result.seconds:.1f}s")
            if target:
                _print_push(publisher.finish(result.path))
        finally:
            publisher.close()


@app.command()
def push(
    folder: Annotated[Path, typer.Argument(help="A finished soup folder (with soup.json).")],
    repo: Annotated[str, typer.Argument(help="Hub repo, owner/name (created if needed).")],
    revision: Revision = None,
    private: Private = False,
    create_pr: CreatePr = False,
    commit_message: Message = None,
    endpoint: Endpoint = None,
) -> None:
    """Push an existing soup folder to a hub repo in one commit (against the head read at the start)."""
    from .hub import push as hub_push
    from .manifest import read

    with _errors():
        read(folder)  # only finished soups are pushed
        res = hub_push(folder, repo, revision=revision, private=private, create_pr=create_pr,
                       commit_message=commit_message, endpoint=endpoint)
    _print_push(res)


@app.command()
def inspect(
    paths: Annotated[list[str], typer.Argument(help="One checkpoint to describe, or several to compare.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Describe a checkpoint (tensors, parameters, dtypes, shards, bytes), or check several for compatibility."""
    from .inspection import human_bytes, inspect as run_inspect

    with _errors():
        report = run_inspect(*paths)
    if as_json:
        out.print(json.dumps(report, indent=2))
    else:
        for s in report.get("ingredients", [report]):
            out.print(f"{s['name']}: {s['tensors']} tensors, {s['parameters']:,} parameters, "
                      f"{human_bytes(s['bytes'])}, dtypes {s['dtypes']}, {len(s['files'])} file(s)")
            for f, size in s["files"].items():
                out.print(f"  {f}\t{human_bytes(size)}")
        if "compatible" in report:
            if report["compatible"]:
                out.print("compatible: yes")
            else:
                out.print(f"compatible: no ({report['difference_count']} tensor(s) differ)")
                for d in report["differences"]:
                    out.print(f"  {d['tensor']}: {d['issue']} {d['values']}")
    if report.get("compatible") is False:
        raise typer.Exit(1)


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Override the recipe's output.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; evaluate and write nothing.")] = False,
    cache: Annotated[Optional[str], typer.Option(help="Score cache: a sqlite path or sqlite:/// URL.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Evaluate everything; store nothing.")] = False,
    devices: Annotated[Optional[str], typer.Option(help="Evaluate on these devices concurrently, e.g. "
                                                   "cuda:0,cuda:1 (overrides the recipe's devices).")] = None,
    endpoint: Endpoint = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Cook the soup a recipe describes: evaluate, choose weights, merge, report (and push)."""
    from .pipeline import describe_recipe, run_recipe
    from .recipe import load_recipe
    from .report import format_report

    with _errors():
        r = load_recipe(recipe)
        if devices:
            r.devices = [d.strip() for d in devices.split(",") if d.strip()]
        if endpoint:
            r.endpoint = endpoint
        if dry_run:
            out.print(describe_recipe(r))
            return
        if no_cache:
            from .cache import ScoreCache

            chosen = ScoreCache(None)
        else:
            chosen = cache
        result = run_recipe(r, overwrite=overwrite, cache=chosen, progress=not quiet, output=output)
        out.print(format_report(result.manifest))
        out.print(f"wrote {result.path}")
        if result.push is not None:
            _print_push(result.push)


def _print_push(res) -> None:
    out.print(f"pushed {res.pr_url or res.commit_url or res.repo_url} (commit {res.commit})")


@app.command()
def validate(recipe: Annotated[Path, typer.Argument(help="A YAML recipe.")]) -> None:
    """Check a recipe: every error is printed with its field path; exit 1 if any."""
    from .errors import RecipeError
    from .recipe import load_recipe

    with _errors():
        try:
            load_recipe(recipe)
        except RecipeError as e:
            for line in getattr(e, "errors", [str(e)]):
                err.print(line if line.startswith(str(recipe)) else f"{recipe}: {line}")
            raise typer.Exit(1) from None
    out.print(f"{recipe}: ok")


@app.command()
def report(
    folder: Annotated[Path, typer.Argument(help="A soup output folder (with soup.json).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Print a soup's report: ingredients, weights, scores, every evaluation in order, greedy trajectory, soup scores."""
    from .manifest import read
    from .report import format_report

    with _errors():
        manifest = read(folder)
        text = json.dumps(manifest.to_dict(), indent=2) if as_json else format_report(manifest)
    out.print(text)


@app.command()
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for ingredients, soups and the score cache.")] = Path("soup-demo"),
    seeds: Annotated[int, typer.Option(help="How many seeds (0..N-1) to run.")] = 1,
    quiet: Quiet = False,
) -> None:
    """Run the built-in example: digit classifiers fine-tuned from one start (one on noisy labels), souped
    three ways (maximum, average, greedy) on CPU in seconds; prints test accuracies."""
    try:
        from .demo import format_rows, run_demo
    except ImportError as e:  # the demo extra (scikit-learn) is missing: its message says what to install
        err.print(f"error: {e}")
        raise typer.Exit(1) from None
    with _errors():
        rows = [run_demo(output, seed=s, progress=not quiet) for s in range(seeds)]
    out.print(format_rows(rows))
    out.print(f"greedy soup written to {rows[-1]['path']} (see: soup report {rows[-1]['path']})")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SoupError as e:  # raised outside a command body (e.g. by a callback)
        if _state["debug"]:
            raise
        from .errors import redact

        print(f"error: {redact(str(e))}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
