"""``soup merge``, ``soup push`` and ``soup inspect``: the commands that read checkpoints directly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from soup.errors import SoupError

from soup.cli.common import _print_push, app, out, Quiet, Overwrite, PushTo, Revision, Private, CreatePr, Message, Endpoint, StateDictKey, StripPrefix, _errors, _weights


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
    vocab: Annotated[str, typer.Option(help="Ingredients with different vocabularies (added tokens): union "
                                       "(every token, the first ingredient's ids kept), first, or an ingredient's "
                                       "index or name (its vocabulary). Embedding and head rows are souped by token.")
                     ] = "union",
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
    method: Annotated[Optional[str], typer.Option(
        metavar="NAME", help="Merge method (default: the weighted mean, 'linear'): task_arithmetic, ties, "
        "dare_ties, dare_linear, breadcrumbs, della, sce, model_stock, slerp, nuslerp, karcher, ... "
        "(mergekit's names and parameters), or 'module:Class' / 'file.py:Class'.")] = None,
    base: Annotated[Optional[str], typer.Option(
        metavar="PATH", help="Base model of the fine-tunes, for methods on task vectors (ties, dare_*, "
        "task_arithmetic, model_stock, slerp...).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="NAME=VALUE", help="A method parameter, e.g. density=0.5, lambda=0.9, "
        "'t=[0, 0.5, 1]' (a gradient over the layers). Repeatable.")] = None,
    seed: Annotated[Optional[int], typer.Option(min=0, help="Seed of random methods (dare_*, della).")] = None,
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
    """Merge checkpoints into their weighted mean (a model soup), or by a merge method, streaming tensor by tensor."""
    from soup.io.ingredients import HubOptions, with_reading
    from soup.io.inspection import human_bytes
    from soup.merging import merge as run_merge
    from soup.hub.publisher import Publisher

    w = _weights(weights)
    if w is not None and len(w) != len(ingredients):  # the engine's check, in the option's name
        with _errors():
            raise SoupError(f"--weights: {len(w)} weights given for {len(ingredients)} ingredients")
    target = {"repo": push_to, "revision": revision, "private": private, "create_pr": create_pr,
              "commit_message": commit_message} if push_to else None
    from soup.adapters.peft_io import is_adapter

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
    params = _method_params(set_ or [])
    if params and method is None:
        raise typer.BadParameter("a method parameter needs --method NAME", param_hint="--set")
    with _errors():
        chosen = {"name": method, **params} if method is not None else None
        recipe = _recipe(ingredients, output, w, normalize=not no_normalize, dtype=dtype, accumulate=accumulate,
                         shard_size=shard_size, device=device, rules=rule or [], strict=strict,
                         config_from=config_from, vocab=vocab, method=chosen, base=base, seed=seed,
                         lora_pairs=[{"a": p.pattern, "b": p.partner, "mode": p.mode, "rank_key": p.rank_key}
                                     for p in pair_rules], key=state_dict_key, strip_prefix=strip_prefix,
                         push_to=target, endpoint=endpoint)
        publisher = Publisher(target, endpoint=endpoint)
        try:
            publisher.start()
            result = run_merge(with_reading(ingredients, key=state_dict_key, strip_prefix=strip_prefix),
                               output, weights=w, normalize=not no_normalize, dtype=dtype,
                               accumulate=accumulate, shard_size=shard_size, device=device,
                               rules=[*pair_rules, *(rule or ())],
                               strict=strict, config_from=config_from, vocab=vocab, overwrite=overwrite,
                               progress=not quiet,
                               hub=HubOptions(endpoint=endpoint), on_shard=publisher.on_shard,
                               method=chosen, base=base, seed=seed,
                               selection=_selection(recipe, w, chosen, n=len(ingredients), base=base, seed=seed))
            m = result.manifest
            out.print(f"{result.path}\t{m.tensors} tensors\t{human_bytes(m.total_size)}\t"
                      f"{len(m.files)} shard(s)\t{result.seconds:.1f}s")
            if target:
                _print_push(publisher.finish(result.path))
        finally:
            publisher.close()


def _recipe(ingredients: list[str], output: Path, weights, *, normalize: bool, dtype, accumulate: str,
            shard_size: str, device: str, rules: list[str], strict: bool, config_from: str, vocab: str, method,
            base, seed, lora_pairs: list[dict], key, strip_prefix, push_to, endpoint) -> dict:
    """The recipe equivalent to this ``soup merge`` (recorded in soup.json, shown on the card): ``soup run``
    of it makes the same bytes. Local paths absolute; options only where they differ from the defaults."""
    import os

    def local(spec: str) -> str:
        return spec if spec.startswith("hf://") else os.path.abspath(spec)

    items = [local(s) if key is None and strip_prefix is None else
             {"path": local(s), **({"key": key} if key else {}), **({"strip_prefix": strip_prefix} if strip_prefix else {})}
             for s in ingredients]
    recipe: dict = {"ingredients": items, "strategy": {"name": "average", "weights": list(weights)}
                    if weights is not None else "average"}
    if method is not None:
        recipe["method"] = {**method, **({"base": local(base)} if base is not None else {}),
                            **({"seed": seed} if seed is not None else {})}
    if lora_pairs:
        recipe["lora_pairs"] = [{k: v for k, v in p.items() if v is not None} for p in lora_pairs]
    if rules:
        recipe["rules"] = list(rules)
    given = {"dtype": dtype, "accumulate": accumulate, "shard_size": shard_size, "device": device, "strict": strict,
             "config_from": config_from, "vocab": vocab, "normalize": normalize}
    defaults = {"dtype": None, "accumulate": "auto", "shard_size": "5GB", "device": "cpu", "strict": False,
                "config_from": "0", "vocab": "union", "normalize": True}
    recipe.update({k: v for k, v in given.items() if v != defaults[k]})
    recipe["output"] = os.path.abspath(output)
    if push_to:
        recipe["push_to"] = {k: v for k, v in push_to.items() if v not in (None, False)}
    if endpoint:
        recipe["endpoint"] = endpoint
    return recipe


def _selection(recipe: dict, weights, method, *, n: int, base, seed):
    """What ``soup.merge`` records beside the engine's part: the method it would name itself (a merge
    method, else an average or a weighted one), and the equivalent recipe."""
    from soup.io.manifest import Method, Selection
    from soup.methods.spec import method_spec

    spec = method_spec(method, n=n, base=base, seed=seed)
    if spec is not None and not spec.is_linear:
        return Selection(Method(spec.name, spec.method.reference or None), recipe=recipe)
    uniform = weights is None or all(abs(x - weights[0]) < 1e-12 for x in weights)
    return Selection(Method("average" if uniform else "weighted", "https://arxiv.org/abs/2203.05482"), recipe=recipe)


def _method_params(items: list[str]) -> dict:
    """``--set NAME=VALUE`` (VALUE read as YAML: 0.5, true, [0, 0.5, 1]) as a mapping."""
    import yaml

    params = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise typer.BadParameter(f"{item!r}: expected NAME=VALUE", param_hint="--set")
        try:
            params[name.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise typer.BadParameter(f"{item!r}: the value is not a number, true/false or a [list]",
                                     param_hint="--set") from None
    return params


def _lora_pairs(specs: list[str], mode: str, rank_key: str | None) -> list:
    """``--lora-pair`` / ``--pair-mode`` / ``--rank-key`` as pair rules (a bad value is a usage error)."""
    from soup.engine.rules import parse_lora_pair

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
    """``soup merge`` with PEFT adapter ingredients (``soup.adapters.merging.adapter_soup``)."""
    from soup.adapters.merging import adapter_soup
    from soup.io.inspection import human_bytes

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
    from soup.hub import push as hub_push
    from soup.io.manifest import read

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
    from soup.io.checkpoint import WRAPPER_PREFIXES
    from soup.io.inspection import human_bytes, inspect as run_inspect

    with _errors():
        report = run_inspect(*paths, diff=diff, key=state_dict_key, strip_prefix=strip_prefix,
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
        _print_vocabulary(report.get("vocabulary"))
        _print_components(report, human_bytes)
    if report.get("compatible") is False:
        raise typer.Exit(1)


def _print_vocabulary(v: dict | None) -> None:
    """Ingredients with different vocabularies: the tokens each adds, and the tensors souped by token."""
    if not v:
        return
    if "error" in v:
        out.print(f"vocabularies: {v['error']}")
        return
    added: dict[str, list[str]] = {}
    for a in v["added"]:
        for who in a["from"]:
            added.setdefault(who, []).append(a["token"])
    out.print(f"vocabularies differ: rows souped by token (--vocab union: {v['rows']} rows, the ids of {v['ids_from']}) "
              f"in {', '.join(v['tensors'])}")
    for who, tokens in added.items():
        out.print(f"  {who} adds {', '.join(tokens)}")


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

