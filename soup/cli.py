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
    accumulate: Annotated[str, typer.Option(help="Accumulation dtype: auto (float32 for 16-bit inputs, "
                                            "float64 for 32-bit), float32 or float64.")] = "auto",
    shard_size: Annotated[str, typer.Option(help="Maximum bytes per output shard, e.g. 5GB, 500MB.")] = "5GB",
    device: Annotated[str, typer.Option(help="Where the math runs: cpu or cuda.")] = "cpu",
    rule: Annotated[Optional[list[str]], typer.Option("--rule", help="Per-tensor rule, first match wins: "
                                                      "'PATTERN=take:N', 'PATTERN=drop' or 'PATTERN=W1,W2,...'. "
                                                      "Repeatable.")] = None,
    config_from: Annotated[str, typer.Option(help="Ingredient (index or name) whose config, tokenizer and "
                                             "processor files are copied.")] = "0",
    strict: Annotated[bool, typer.Option(help="Differing integer/bool buffers are an error, not a warning.")] = False,
    lora_pair: Annotated[Optional[list[str]], typer.Option(
        "--lora-pair", help="'A_PATTERN=B_PATTERN': LoRA pairs inside full checkpoints (e.g. "
        "'*.Plora_A.weight=*.Plora_B.weight'), souped as their delta B@A. Repeatable.")] = None,
    pair_mode: Annotated[str, typer.Option(help="For --lora-pair: exact (rank = sum of ranks), svd (the "
                                           "original rank, error reported) or independent (A and B "
                                           "averaged separately: not the soup of the deltas).")] = "exact",
    rank_key: Annotated[Optional[str], typer.Option(help="For --lora-pair exact: the config key holding the "
                                                    "pairs' rank (e.g. lora_rank), updated to the new rank.")] = None,
    merge_into: Annotated[Optional[str], typer.Option(help="PEFT adapter ingredients: write full weights "
                                                      "W0 + sum w_i s_i B_i A_i into this base checkpoint.")] = None,
    rank: Annotated[Optional[int], typer.Option(min=1, help="PEFT adapter ingredients: write the best rank-R "
                                                "adapter (truncated SVD per module; errors reported) instead "
                                                "of the exact rank-concatenated one.")] = None,
    state_dict_key: StateDictKey = None,
    strip_prefix: StripPrefix = None,
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
    from .ingredients import HubOptions, with_reading
    from .inspection import human_bytes
    from .engine import merge as run_merge
    from .hub.publisher import Publisher

    w = _weights(weights)
    target = {"repo": push_to, "revision": revision, "private": private, "create_pr": create_pr,
              "commit_message": commit_message} if push_to else None
    from .peft_io import is_adapter

    adapters = [is_adapter(i) for i in ingredients]
    if any(adapters) or merge_into is not None or rank is not None:
        with _errors():
            _merge_adapters(ingredients, adapters, output, w, merge_into=merge_into, rank=rank,
                            normalize=not no_normalize, dtype=dtype, accumulate=accumulate, shard_size=shard_size,
                            device=device, overwrite=overwrite, quiet=quiet, unsupported={
                                "--rule": rule, "--lora-pair": lora_pair, "--push-to": push_to,
                                "--state-dict-key": state_dict_key, "--strip-prefix": strip_prefix})
        return
    pair_rules = _lora_pairs(lora_pair or [], pair_mode, rank_key)
    with _errors():
        publisher = Publisher(target, endpoint=endpoint)
        try:
            publisher.start()
            result = run_merge(with_reading(ingredients, key=state_dict_key, strip_prefix=strip_prefix),
                               output, weights=w, normalize=not no_normalize, dtype=dtype,
                               accumulate=accumulate, shard_size=shard_size, device=device,
                               rules=[*pair_rules, *(rule or ())],
                               strict=strict, config_from=config_from, overwrite=overwrite, progress=not quiet,
                               hub=HubOptions(endpoint=endpoint), on_shard=publisher.on_shard)
            m = result.manifest
            out.print(f"{result.path}\t{m.tensors} tensors\t{human_bytes(m.total_size)}\t"
                      f"{len(m.files)} shard(s)\t{result.seconds:.1f}s")
            if target:
                _print_push(publisher.finish(result.path))
        finally:
            publisher.close()


def _lora_pairs(specs: list[str], mode: str, rank_key: str | None) -> list:
    """``--lora-pair`` / ``--pair-mode`` / ``--rank-key`` as pair rules (a bad value is a usage error)."""
    from .rules import parse_lora_pair

    if rank_key is not None and not specs:
        raise typer.BadParameter("only with --lora-pair", param_hint="--rank-key")
    try:
        return [parse_lora_pair(p, mode, rank_key) for p in specs]
    except SoupError as e:
        text = str(e)
        hint = "--pair-mode" if text.startswith("--lora-pair.mode") else "--lora-pair"
        raise typer.BadParameter(text.split(": ", 1)[-1], param_hint=hint) from None


def _merge_adapters(ingredients: list[str], adapters: list[bool], output: Path, weights, *, merge_into, rank,
                    quiet: bool, unsupported: dict, **options) -> None:
    """``soup merge`` with PEFT adapter ingredients (``soup.adapters.adapter_soup``)."""
    from .adapters import adapter_soup
    from .inspection import human_bytes

    if not all(adapters):
        plain = ingredients[adapters.index(False)]
        what = "is not a PEFT adapter folder (no adapter_config.json)"
        if any(adapters):
            raise SoupError(f"{plain} {what} but {ingredients[adapters.index(True)]} is: adapters are souped "
                            "with adapters only")
        flag = "--merge-into" if merge_into is not None else "--rank"
        raise SoupError(f"{flag}: {plain} {what}; {flag} applies to adapter soups")
    given = [k for k, v in unsupported.items() if v]
    if given:
        raise SoupError(f"{given[0]}: not available for adapter soups")
    result = adapter_soup(ingredients, output, weights=weights, merge_into=merge_into, rank=rank,
                          progress=not quiet, **options)
    m = result.manifest
    out.print(f"{result.path}\t{m.tensors} tensors\t{human_bytes(m.total_size)}\t{m.method.name}\t"
              f"{result.seconds:.1f}s")
    for module, error in result.errors.items():
        out.print(f"  {module}\trelative error {error:.4g}")
    if result.worst is not None:
        out.print(f"worst relative error {result.worst[1]:.4g} ({result.worst[0]})")


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
    diff: Annotated[bool, typer.Option("--diff", help="Read the data once and report, per component, whether "
                                       "the ingredients are identical (frozen) or differ, with suggested "
                                       "take:0 rules for the identical ones.")] = False,
    state_dict_key: StateDictKey = None,
    strip_prefix: StripPrefix = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    quiet: Quiet = False,
) -> None:
    """Describe a checkpoint (tensors, parameters, dtypes, shards, bytes, components: vision towers,
    connector, language model, LoRA pairs, embeddings, head), or check several for compatibility."""
    from .checkpoint import WRAPPER_PREFIXES
    from .inspection import human_bytes, inspect as run_inspect

    with _errors():
        report = run_inspect(*paths, diff=diff, state_dict_key=state_dict_key, strip_prefix=strip_prefix,
                             progress=diff and not quiet and not as_json)
    if as_json:
        out.print(json.dumps(report, indent=2))
    else:
        summaries = report.get("ingredients", [report])
        for s in summaries:
            out.print(f"{s['name']}: {s['tensors']} tensors, {s['parameters']:,} parameters, "
                      f"{human_bytes(s['bytes'])}, dtypes {s['dtypes']}, {len(s['files'])} file(s)")
            for f, size in s["files"].items():
                out.print(f"  {f}\t{human_bytes(size)}")
            if s["prefix"] in WRAPPER_PREFIXES:
                out.print(f"  every tensor name starts with {s['prefix']!r}, a training wrapper's prefix: "
                          f"--strip-prefix {s['prefix']} removes it")
            elif s["prefix"]:
                out.print(f"  every tensor name starts with {s['prefix']!r} (--strip-prefix {s['prefix']} "
                          "would remove it)")
        if "compatible" in report:
            if report["compatible"]:
                out.print("compatible: yes")
            else:
                out.print(f"compatible: no ({report['difference_count']} tensor(s) differ)")
                for d in report["differences"]:
                    out.print(f"  {d['tensor']}: {d['issue']} {d['values']}")
                wrappers = sorted({s["prefix"] for s in summaries} & set(WRAPPER_PREFIXES))
                if wrappers and len({s["prefix"] for s in summaries}) > 1:
                    out.print(f"  the name prefixes differ: --strip-prefix {wrappers[0]} may make them match")
        _print_components(report, human_bytes)
    if report.get("compatible") is False:
        raise typer.Exit(1)


def _print_components(report: dict, human_bytes) -> None:
    """The component table of ``soup inspect`` and, after --diff, the suggested rules."""
    import shlex

    rows = []
    for c in report["components"]:
        status = ""
        if "status" in c:
            dist = ", ".join(f"{k} {v * 100:.3g}%" for k, v in c["distance"].items() if v is not None)
            status = {"identical": "identical (frozen)",
                      "differs": f"differs (distance from the first: {dist})" if dist else "differs",
                      "partly identical": f"partly identical ({c['identical_tensors']}/{c['tensors']} tensors; "
                                          f"distance from the first: {dist})"}[c["status"]]
        shown = c["patterns"][:3] + (["..."] if len(c["patterns"]) > 3 else [])
        rows.append([c["kind"], c["name"], f"{c['tensors']} tensor{'s' if c['tensors'] != 1 else ''}",
                     f"{c['parameters']:,} params",
                     human_bytes(c["bytes"]), ", ".join(shown), status])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))] if rows else []
    out.print("components (by tensor name):")
    for r in rows:
        out.print("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    for p in report.get("lora_pairs") or ():
        out.print(f"likely LoRA pairs: {p['pairs']} such as {p['example'][0]} / {p['example'][1]}; averaging A and "
                  f"B separately is not the soup of their deltas: --lora-pair {shlex.quote(p['a'] + '=' + p['b'])}")
    if "suggested_rules" in report:
        if report["suggested_rules"]:
            out.print("suggested rules (identical in every ingredient: read once, from the first):")
            for rule in report["suggested_rules"]:
                out.print(f"  --rule {shlex.quote(rule)}")
        else:
            out.print("suggested rules: none (no component is identical in every ingredient)")


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Override the recipe's output.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; evaluate and write nothing.")] = False,
    cache: Cache = None,
    no_cache: NoCache = False,
    devices: Devices = None,
    storage: Annotated[Optional[str], typer.Option(help="An optuna storage URL (sqlite:///study.db, "
                                                   "postgresql://user@host/db) shared with `soup worker` processes: "
                                                   "candidates are queued there and evaluated by the workers; "
                                                   "the default score cache is then that database.")] = None,
    local_worker: Annotated[bool, typer.Option("--local-worker/--no-local-worker",
                                               help="With --storage: also evaluate queued candidates here "
                                                    "while waiting for the workers.")] = True,
    endpoint: Endpoint = None,
    overwrite: Overwrite = False,
    if_changed: Annotated[bool, typer.Option("--if-changed", help="Only if the ingredients (pinned), the recipe "
                                             "or the evaluator changed since the published soup (hub head, MLflow "
                                             "version or local output): else print 'up to date: ...' and write "
                                             "nothing. Replaces only a previous soup.")] = False,
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
        if if_changed:
            update = run_recipe(r, cache=chosen, progress=not quiet, output=output, storage=storage,
                                local_worker=local_worker, if_changed=True)
            if update.result is not None:
                _print_result(update.result, format_report)
            out.print(update.line)
            return
        result = run_recipe(r, overwrite=overwrite, cache=chosen, progress=not quiet, output=output,
                            storage=storage, local_worker=local_worker)
        _print_result(result, format_report)


@app.command()
def watch(
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe (read again at each tick).")],
    every: Annotated[str, typer.Option(help="How often to look for new ingredients: 30m, 1h, 45s, 1h30m.")] = "30m",
    max_ticks: Annotated[Optional[int], typer.Option("--max-ticks", min=1, help="Stop after N ticks "
                                                     "(default: run until stopped).")] = None,
    log_json: Annotated[bool, typer.Option("--log-json", help="Log JSON lines on stderr.")] = False,
    webhook: Annotated[Optional[str], typer.Option(help="HOST:PORT to also accept Hugging Face Hub and MLflow "
                                                   "registry webhooks on: a matching event runs a tick at once.")] = None,
    webhook_secret: Annotated[Optional[str], typer.Option(envvar="SOUP_WEBHOOK_SECRET", show_default=False,
                                                          help="The webhooks' secret (never printed).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Override the recipe's output.")] = None,
    cache: Cache = None,
    no_cache: NoCache = False,
    endpoint: Endpoint = None,
) -> None:
    """Re-soup whenever the ingredients change: `soup run RECIPE --if-changed` every --every, one log line
    per tick on stderr; a failing tick is retried with backoff; Ctrl-C / SIGTERM stop it cleanly."""
    from .schedule import parse_every, watch as run_watch

    with _errors():
        parse_every(every)
        chosen = cache
        if no_cache:
            from .cache import ScoreCache

            chosen = ScoreCache(None)
        run_watch(recipe, every=every, max_ticks=max_ticks, webhook=webhook, webhook_secret=webhook_secret,
                  log_json=log_json, cache=chosen, output=output, endpoint=endpoint)


def _print_result(result, format_report) -> None:
    out.print(format_report(result.manifest))
    out.print(f"wrote {result.path}")
    if result.push is not None:
        _print_push(result.push)
    if result.registered:
        out.print(f"registered {result.registered}")


@app.command()
def worker(
    recipe: Annotated[Path, typer.Argument(help="The coordinator's recipe (same ingredients, evaluator, rules).")],
    storage: Annotated[str, typer.Option(help="The coordinator's optuna storage URL (soup run RECIPE --storage URL).")],
    devices: Devices = None,
    cache: Cache = None,
    no_cache: NoCache = False,
    idle_timeout: Annotated[float, typer.Option(help="Stop after this many seconds with nothing to do "
                                                "(waiting for the coordinator included).")] = 600.0,
    endpoint: Endpoint = None,
    quiet: Quiet = False,
) -> None:
    """Evaluate a coordinator's candidates on this machine until its runs are done: start one per machine
    (or GPU), e.g. as a Slurm array or a Kubernetes Job. A worker that dies mid-candidate (preempted, OOM
    killed) loses nothing: its candidate is evaluated again by another worker."""
    from .workers import worker as run_worker

    if idle_timeout <= 0:
        raise typer.BadParameter("must be > 0", param_hint="--idle-timeout")
    with _errors():
        chosen = None if no_cache else (cache or "default")
        res = run_worker(recipe, storage=storage, devices=[d.strip() for d in devices.split(",") if d.strip()]
                         if devices else None, cache=chosen, idle_timeout=idle_timeout, progress=not quiet,
                         endpoint=endpoint)
    out.print(f"{res.study}\t{res.evaluated} candidate(s) evaluated\t{res.reason}\t{res.seconds:.1f}s")


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
