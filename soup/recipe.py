"""Recipes: a soup described in YAML, validated field by field, reproducible.

    ingredients:                    # folders, files, hf://owner/name@rev, or mappings
      - runs/ft-chat
      - {path: runs/ft-ocr, name: ocr}
      - {repo: acme/ft-math, revision: 3f2c...}
    strategy: {name: greedy, tie: ">=", tolerance: 0.0}   # maximum (p) | average (weights) | greedy
    evaluator: {name: perplexity, args: {data: ./val.jsonl}}
    test: {name: perplexity, args: {data: ./test.jsonl}}  # reported, never used for selection
    rules:
      - {pattern: "model.vision_tower.*", take: 0}
    dtype: bfloat16
    output: ./soup-out
    push_to: acme/soup                # or {repo, revision, private, create_pr, commit_message}

Relative paths (ingredients, output, cache, ``file.py:Class`` evaluators and evaluator arguments
starting with ``./`` or ``../``) are relative to the recipe file. Unknown keys are errors; every
error names its field path (``strategy.tie``, ``ingredients[2].path``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError
from .rules import Rule, parse_rule
from .strategies import STRATEGIES, make_strategy

__all__ = ["Recipe", "EvaluatorEntry", "load_recipe", "parse_recipe"]

TOP_KEYS = {"ingredients", "strategy", "evaluator", "test", "rules", "dtype", "accumulate", "shard_size",
            "device", "devices", "config_from", "output", "push_to", "cache", "endpoint", "strict"}
PUSH_KEYS = {"repo", "revision", "private", "create_pr", "commit_message"}


@dataclass
class EvaluatorEntry:
    name: str  # entry point, module:Class or file.py:Class
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    ingredients: list[str]  # local paths (absolute) or hf://owner/name@rev
    labels: list[str | None]
    strategy: str
    strategy_options: dict[str, Any]
    evaluator: EvaluatorEntry | None = None
    test: EvaluatorEntry | None = None
    rules: list[Rule] = field(default_factory=list)
    dtype: str | None = None
    accumulate: str = "float32"
    shard_size: str | int = "5GB"
    device: str = "cpu"
    devices: list[str] | None = None
    config_from: int | str = 0
    output: Path | None = None
    push_to: dict[str, Any] | None = None
    cache: str | None = "default"
    endpoint: str | None = None
    strict: bool = False
    source: Path | None = None  # the recipe file
    raw: dict[str, Any] = field(default_factory=dict)  # as written, for the manifest


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file (RecipeError lists every error with its field path)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_recipe(data, base=path.parent, source=path)


def parse_recipe(data: Any, *, base: Path | None = None, source: Path | None = None) -> Recipe:
    """Validate a recipe mapping; all errors are collected and raised together."""
    errors: list[str] = []
    base = (base or Path.cwd()).absolute()
    if not isinstance(data, dict):
        raise RecipeError("recipe: must be a mapping with at least 'ingredients' and 'strategy'")
    for key in sorted(set(data) - TOP_KEYS):
        errors.append(f"{key}: unknown key (allowed: {', '.join(sorted(TOP_KEYS))})")
    sources, labels = _ingredients(data.get("ingredients"), base, errors)
    strategy, options = _strategy(data.get("strategy"), len(sources), errors)
    evaluator = _evaluator(data.get("evaluator"), "evaluator", base, errors)
    test = _evaluator(data.get("test"), "test", base, errors)
    rules = []
    raw_rules = data.get("rules") or []
    if not isinstance(raw_rules, list):
        errors.append("rules: must be a list")
        raw_rules = []
    for i, r in enumerate(raw_rules):
        try:
            rules.append(parse_rule(r, where=f"rules[{i}]"))
        except RecipeError as e:
            errors.append(str(e))
    if strategy in STRATEGIES and STRATEGIES[strategy].needs_evaluator and evaluator is None:
        errors.append(f"evaluator: required by strategy {strategy}")
    for key, kinds in (("dtype", str), ("accumulate", str), ("device", str), ("endpoint", str),
                       ("shard_size", (str, int)), ("config_from", (str, int)), ("strict", bool)):
        if key in data and not isinstance(data[key], kinds):
            errors.append(f"{key}: wrong type {type(data[key]).__name__}")
    devices = data.get("devices")
    if devices is not None and not (isinstance(devices, list) and all(isinstance(d, str) for d in devices)):
        errors.append("devices: must be a list of device names, e.g. [cuda:0, cuda:1]")
    push = _push(data.get("push_to"), errors)
    cache = data.get("cache", "default")
    if cache is False:
        cache = None
    elif cache != "default":
        cache = str(_rel(base, cache)) if isinstance(cache, str) and "://" not in cache else cache
    if errors:
        err = RecipeError("; ".join(errors))
        err.errors = errors
        raise err
    output = data.get("output")
    return Recipe(ingredients=sources, labels=labels, strategy=strategy, strategy_options=options,
                  evaluator=evaluator, test=test, rules=rules, dtype=data.get("dtype"),
                  accumulate=data.get("accumulate", "float32"), shard_size=data.get("shard_size", "5GB"),
                  device=data.get("device", "cpu"), devices=devices, config_from=data.get("config_from", 0),
                  output=_rel(base, output) if output else None, push_to=push, cache=cache,
                  endpoint=data.get("endpoint"), strict=bool(data.get("strict", False)), source=source, raw=data)


def _rel(base: Path, value: str) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else base / p


def _ingredients(value: Any, base: Path, errors: list[str]) -> tuple[list[str], list[str | None]]:
    if not isinstance(value, list) or not value:
        errors.append("ingredients: a non-empty list is required")
        return [], []
    sources, labels = [], []
    for i, item in enumerate(value):
        where = f"ingredients[{i}]"
        if isinstance(item, str):
            sources.append(item if item.startswith("hf://") else str(_rel(base, item)))
            labels.append(None)
            continue
        if not isinstance(item, dict):
            errors.append(f"{where}: a path, hf://owner/name@revision, or a mapping with path or repo")
            continue
        for key in sorted(set(item) - {"path", "repo", "revision", "name"}):
            errors.append(f"{where}.{key}: unknown key (allowed: path, repo, revision, name)")
        if ("path" in item) == ("repo" in item):
            errors.append(f"{where}: give exactly one of path, repo")
            continue
        if "revision" in item and "repo" not in item:
            errors.append(f"{where}.revision: only with repo")
        if "path" in item:
            sources.append(str(_rel(base, item["path"])))
        else:
            rev = item.get("revision")
            sources.append(f"hf://{item['repo']}" + (f"@{rev}" if rev else ""))
        labels.append(str(item["name"]) if item.get("name") is not None else None)
    return sources, labels


def _strategy(value: Any, n: int, errors: list[str]) -> tuple[str, dict[str, Any]]:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        errors.append(f"strategy: a mapping with name ({', '.join(STRATEGIES)}) is required")
        return "", {}
    options = {k: v for k, v in value.items() if k != "name"}
    try:
        make_strategy(value["name"], **options)
    except RecipeError as e:
        errors.append(str(e) if str(e).startswith("strategy") else f"strategy: {e}")
    except TypeError as e:
        errors.append(f"strategy: {e}")
    return value["name"], options


def _evaluator(value: Any, where: str, base: Path, errors: list[str]) -> EvaluatorEntry | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        errors.append(f"{where}: a mapping with name (and args) is required")
        return None
    for key in sorted(set(value) - {"name", "args"}):
        errors.append(f"{where}.{key}: unknown key (allowed: name, args)")
    args = value.get("args") or {}
    if not isinstance(args, dict):
        errors.append(f"{where}.args: must be a mapping")
        return None
    name = value["name"]
    target, sep, attr = name.rpartition(":")
    if sep and target.endswith(".py"):
        name = f"{_rel(base, target)}:{attr}"
    args = {k: str(_rel(base, v)) if isinstance(v, str) and v.startswith(("./", "../")) else v
            for k, v in args.items()}
    return EvaluatorEntry(name, args)


def _push(value: Any, errors: list[str]) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return {"repo": value}
    if not isinstance(value, dict) or "repo" not in value:
        errors.append("push_to: owner/name, or a mapping with repo")
        return None
    for key in sorted(set(value) - PUSH_KEYS):
        errors.append(f"push_to.{key}: unknown key (allowed: {', '.join(sorted(PUSH_KEYS))})")
    return dict(value)

