"""Recipes: a soup described in YAML, validated field by field, reproducible.

    ingredients:                    # folders, files, hf://owner/name@rev, or mappings
      - runs/ft-chat
      - {path: runs/ft-ocr, name: ocr}
      - {path: runs/xtuner/iter_500.pth, key: state_dict, strip_prefix: "module."}  # torch files
      - {repo: acme/ft-math, revision: 3f2c...}
      - {registry: hub, author: acme, name: "sft-*"}   # a registry query (soup.registry), pinned at run time
    strategy: {name: greedy, tie: ">=", tolerance: 0.0}   # maximum (p) | average (weights) | greedy
    method: {name: ties, base: runs/base, density: 0.5}   # how tensors combine (default: the weighted mean)
    evaluator: {name: perplexity, args: {data: ./val.jsonl}}
    test: {name: perplexity, args: {data: ./test.jsonl}}  # reported, never used for selection
    rules:
      - {pattern: "model.vision_tower.*", take: 0}
    lora_pairs:                       # LoRA pairs inside full checkpoints, souped as their deltas B @ A
      - {a: "*.Plora_A.weight", b: "*.Plora_B.weight", mode: exact, rank_key: lora_rank}
    merge_into: ./base                # PEFT adapter ingredients: full weights (else one adapter; rank: R for SVD)
    dtype: bfloat16
    output: ./soup-out
    push_to: acme/soup                # or {repo, revision, private, create_pr, commit_message}
    publish: {mlflow: soup-model}     # also register the soup as an MLflow model version
    tracking_uri: http://mlflow:5000  # MLflow (default MLFLOW_TRACKING_URI)

A mergekit configuration file (recognised by its ``merge_method`` key) is read as the recipe of the
same merge (``soup.methods.mergekit``).

Relative paths (ingredients, output, cache, ``file.py:Class`` evaluators and evaluator arguments
starting with ``./`` or ``../``) are relative to the recipe file. Unknown keys are errors; every
error names its field path (``strategy.tie``, ``ingredients[2].path``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from soup.errors import RecipeError
from soup.safeyaml import load_yaml
from soup.io.ingredients import Ingredient
from soup.methods.mergekit import from_mergekit, is_mergekit_config
from soup.methods.spec import method_spec
from soup.options import MergeOptions, check_device
from soup.engine.plan import normalise_weights
from soup.engine.rules import Rule, parse_rule
from soup.soups.strategies import STRATEGIES, make_strategy

__all__ = ["Recipe", "EvaluatorEntry", "load_recipe", "parse_recipe"]

TOP_KEYS = {"ingredients", "strategy", "evaluator", "test", "rules", "dtype", "accumulate", "shard_size",
            "device", "devices", "config_from", "output", "push_to", "cache", "endpoint", "strict",
            "tracking_uri", "publish", "lora_pairs", "merge_into", "rank", "method", "normalize", "mixed_float",
            "vocab"}
PUSH_KEYS = {"repo", "revision", "private", "create_pr", "commit_message"}


@dataclass
class EvaluatorEntry:
    name: str  # entry point, module:Class or file.py:Class
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    ingredients: list[Any]  # local paths (absolute), hf://owner/name@rev, or registry Queries (soup.registry)
    labels: list[str | None]
    strategy: str
    strategy_options: dict[str, Any]
    evaluator: EvaluatorEntry | None = None
    test: EvaluatorEntry | None = None
    rules: list[Rule] = field(default_factory=list)
    dtype: str | None = None
    accumulate: str = "auto"  # float32 for 16-bit inputs, float64 for 32-bit; or float32 / float64
    shard_size: str | int = "5GB"
    device: str = "cpu"
    devices: list[str] | None = None
    config_from: int | str = 0
    output: Path | None = None
    push_to: dict[str, Any] | None = None
    cache: str | None = "default"
    endpoint: str | None = None
    strict: bool = False
    tracking_uri: str | None = None  # MLflow, for registry queries and publish (default MLFLOW_TRACKING_URI)
    publish: dict[str, Any] | None = None  # {mlflow: NAME}: the soup is also registered as a model version
    merge_into: str | None = None  # PEFT adapter ingredients: the base checkpoint to merge their soup into
    rank: int | None = None  # PEFT adapter ingredients: a rank-R adapter by truncated SVD
    method: dict[str, Any] | None = None  # a merge method: {name, base (absolute), seed, parameters...}
    normalize: bool = True  # weights scaled to sum to 1 (false: as given), as --no-normalize / normalize=
    mixed_float: bool = False  # ingredients whose float dtypes differ, as mixed_float= in Python
    vocab: int | str = "union"  # differing vocabularies: union, first or an ingredient, as --vocab (soup.io.vocab)
    source: Path | None = None  # the recipe file
    raw: dict[str, Any] = field(default_factory=dict)  # as written, for the manifest

    def merge_options(self) -> dict[str, Any]:
        """The merge options ``cook`` gets from this recipe: one construction for ``soup run`` and for
        the checks ``soup validate`` shares with it (``soup.preflight``)."""
        return dict(shard_size=self.shard_size, accumulate=self.accumulate, device=self.device,
                    config_from=self.config_from, strict=self.strict, method=self.method, normalize=self.normalize,
                    mixed_float=self.mixed_float, vocab=self.vocab)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file (RecipeError lists every error with its field path).

    The YAML is parsed with limits (``soup.safeyaml``: size, nesting depth, alias expansion)."""
    path = Path(path)
    try:
        data = load_yaml(path)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f"{mark.line + 1}:{mark.column + 1}: " if mark is not None else ""
        line = f"{at}not valid YAML ({e.problem or e.context})"
        err = RecipeError(f"{path}:{line}" if at else f"{path}: {line}")
        err.errors = [line]  # soup validate prefixes the file name
        raise err from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_recipe(data, base=path.parent, source=path)


def parse_recipe(data: Any, *, base: Path | None = None, source: Path | None = None) -> Recipe:
    """Validate a recipe mapping; all errors are collected and raised together.

    Everything ``soup run`` would refuse for the recipe's shape is refused here, before any
    checkpoint is read: bad merge options, weights, rules, strategy options and field types.
    """
    errors: list[str] = []
    base = (base or Path.cwd()).absolute()
    if data is None:
        raise _error(["recipe: empty"])
    if not isinstance(data, dict):
        raise _error(["recipe: must be a mapping with at least 'ingredients' and 'strategy'"])
    original = data
    if is_mergekit_config(data):  # a mergekit config runs as it is (soup.methods.mergekit)
        data = from_mergekit(data, base=base)
    _keys(data, TOP_KEYS, "", errors)
    raw_ingredients = data.get("ingredients")
    n = len(raw_ingredients) if isinstance(raw_ingredients, list) else 0  # 0: unknown, not checked
    if n and any(isinstance(i, dict) and "registry" in i for i in raw_ingredients):
        n = 0  # registry queries: the count is known at run time
    sources, labels = _ingredients(raw_ingredients, base, errors)
    strategy, options, made = _strategy(data.get("strategy"), n, base, errors)
    evaluator = _evaluator(data.get("evaluator"), "evaluator", base, errors)
    test = _evaluator(data.get("test"), "test", base, errors)
    rules = _lora_pairs(data.get("lora_pairs"), errors) + _rules(data.get("rules"), n, errors)
    merge_into, rank = data.get("merge_into"), data.get("rank")
    if merge_into is not None and not (isinstance(merge_into, str) and merge_into):
        errors.append(f"merge_into: must be a path or hf://owner/name@revision, got {merge_into!r}")
    elif merge_into is not None and not merge_into.startswith("hf://"):
        merge_into = str(_rel(base, merge_into))
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        errors.append(f"rank: {rank!r} must be a positive integer")
    if rank is not None and merge_into is not None:
        errors.append("rank: a rank applies to an adapter output, not with merge_into")
    if made is not None and made.needs_evaluator and evaluator is None:
        errors.append(f"evaluator: required by strategy {strategy}")
    _merge_options(data, n, errors)
    method = _method(data.get("method"), n, base, errors)
    devices = data.get("devices")
    if devices is not None:
        if not isinstance(devices, list):
            errors.append("devices: must be a list of device names, e.g. [cuda:0, cuda:1]")
        for i, d in enumerate(devices if isinstance(devices, list) else []):
            _check(errors, check_device, d, where=f"devices[{i}]")
    for key in ("endpoint", "output"):
        if data.get(key) is not None and not (isinstance(data[key], str) and data[key]):
            errors.append(f"{key}: must be a string, got {data[key]!r}")
    push = _push(data.get("push_to"), errors)
    publish = _publish(data.get("publish"), errors)
    if data.get("tracking_uri") is not None and not (isinstance(data["tracking_uri"], str) and data["tracking_uri"]):
        errors.append(f"tracking_uri: must be a string, got {data['tracking_uri']!r}")
    cache = data.get("cache", "default")
    if cache is False or cache is None:
        cache = None
    elif not isinstance(cache, str) or not cache:
        errors.append(f"cache: {cache!r} must be false, default, a sqlite file path or a database URL "
                      "(sqlite:///..., postgresql+psycopg://...)")
    elif cache != "default" and "://" not in cache:
        cache = str(_rel(base, cache))
    if errors:
        raise _error(errors)
    output = data.get("output")
    return Recipe(ingredients=sources, labels=labels, strategy=strategy, strategy_options=options,
                  evaluator=evaluator, test=test, rules=rules, dtype=data.get("dtype"),
                  accumulate=data.get("accumulate", "auto"), shard_size=data.get("shard_size", "5GB"),
                  device=data.get("device", "cpu"), devices=devices, config_from=data.get("config_from", 0),
                  output=_rel(base, output) if output else None, push_to=push, cache=cache,
                  endpoint=data.get("endpoint"), strict=data.get("strict", False), source=source, raw=original,
                  tracking_uri=data.get("tracking_uri"), publish=publish, merge_into=merge_into, rank=rank,
                  method=method, normalize=data.get("normalize", True), mixed_float=data.get("mixed_float", False),
                  vocab=data.get("vocab", "union"))


def _method(value: Any, n: int, base: Path, errors: list[str]) -> dict[str, Any] | None:
    """``method: NAME`` or ``{name, base, seed, models, PARAMETER: VALUE...}``, checked as ``soup merge
    --method`` checks it (unknown names and parameters, values, a missing base); base relative to the recipe."""
    if value is None:
        return None
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        errors.append(f"method: a method name or a mapping with name, got {value!r}")
        return None
    value = dict(value)
    if isinstance(value.get("base"), str) and value["base"] and not value["base"].startswith("hf://"):
        value["base"] = str(_rel(base, value["base"]))
    _check(errors, method_spec, value, n=n or len(value.get("models") or []) or 1)
    return value


def _error(errors: list[str]) -> RecipeError:
    err = RecipeError("; ".join(errors))
    err.errors = errors
    return err


def _check(errors: list[str], fn, *args: Any, **kwargs: Any) -> Any:
    """Call a checker; a RecipeError becomes collected error line(s)."""
    try:
        return fn(*args, **kwargs)
    except RecipeError as e:
        errors.extend(getattr(e, "errors", [str(e)]))
        return None


def _keys(value: dict, allowed: set[str], where: str, errors: list[str]) -> None:
    """Non-string and unknown keys of a mapping, reported with their field path."""
    for key in value:
        if not isinstance(key, str):
            errors.append(f"{where or 'recipe'}: key {key!r} is not a string")
    for key in sorted(k for k in value if isinstance(k, str) and k not in allowed):
        errors.append(f"{where}{'.' if where else ''}{key}: unknown key (allowed: {', '.join(sorted(allowed))})")


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
        if isinstance(item, str) and item:
            sources.append(item if item.startswith("hf://") else str(_rel(base, item)))
            labels.append(None)
            continue
        if not isinstance(item, dict):
            errors.append(f"{where}: a path, hf://owner/name@revision, or a mapping with path or repo")
            continue
        if "registry" in item:  # a query, resolved at run time (soup.registry)
            from soup.registry import parse_query

            query = parse_query(item, where, base, errors)
            if query is not None:
                sources.append(query)
                labels.append(None)
            continue
        _keys(item, {"path", "repo", "revision", "name", "key", "strip_prefix"}, where, errors)
        if ("path" in item) == ("repo" in item):
            errors.append(f"{where}: give exactly one of path, repo")
            continue
        if "revision" in item and "repo" not in item:
            errors.append(f"{where}.revision: only with repo")
        bad = [k for k, kinds in (("path", str), ("repo", str), ("revision", (str, int)), ("name", (str, int)),
                                  ("key", str), ("strip_prefix", str))
               if k in item and (isinstance(item[k], bool) or not isinstance(item[k], kinds) or item[k] == "")]
        for k in bad:
            errors.append(f"{where}.{k}: must be a string, got {item[k]!r}")
        if bad:
            continue
        if "path" in item:
            sources.append(str(_rel(base, item["path"])))
        else:
            rev = item.get("revision")
            sources.append(f"hf://{item['repo']}" + (f"@{rev}" if rev else ""))
        if "key" in item or "strip_prefix" in item:  # how to read a training framework's file
            sources[-1] = Ingredient(sources[-1], key=item.get("key"), strip_prefix=item.get("strip_prefix"))
        labels.append(str(item["name"]) if item.get("name") is not None else None)
    return sources, labels


def _strategy(value: Any, n: int, base: Path, errors: list[str]) -> tuple[str, dict[str, Any], Any]:
    """The strategy's name (a ``file.py:Class`` made absolute), its options, and the strategy built
    from them (None if it could not be: the error is in ``errors``)."""
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        errors.append(f"strategy: a name ({', '.join(STRATEGIES)}, module:Class or file.py:Class) "
                      "or a mapping with name is required")
        return "", {}, None
    if any(not isinstance(k, str) for k in value):
        _keys(value, set(value), "strategy", errors)
        return value["name"], {}, None
    name = _plugin_path(value["name"], base)
    options = {k: v for k, v in value.items() if k != "name"}
    try:
        strategy = make_strategy(name, **options)
        if n:
            strategy.check(n)
    except RecipeError as e:
        errors.append(str(e) if str(e).startswith("strategy") else f"strategy: {e}")
        return name, options, None
    except TypeError as e:
        errors.append(f"strategy: {e}")
        return name, options, None
    return name, options, strategy


def _plugin_path(name: str, base: Path) -> str:
    """``./my_strategy.py:Class`` relative to the recipe -> an absolute path; other names as they are."""
    target, sep, attr = name.rpartition(":")
    return f"{_rel(base, target)}:{attr}" if sep and target.endswith(".py") else name


def _rules(value: Any, n: int, errors: list[str]) -> list[Rule]:
    """Rules, checked against the number of ingredients where that is known."""
    if value is None:
        return []
    if not isinstance(value, list):
        errors.append("rules: must be a list")
        return []
    rules = []
    for i, spec in enumerate(value):
        rule = _check(errors, parse_rule, spec, where=f"rules[{i}]")
        if rule is None:
            continue
        rules.append(rule)
        if n and rule.action == "take" and isinstance(rule.ingredient, int) and rule.ingredient >= n:
            errors.append(f"rules[{i}].take: ingredient index {rule.ingredient} out of range (0..{n - 1})")
        if n and rule.action == "weights":
            _check(errors, normalise_weights, rule.weights, n, where=f"rules[{i}].weights")
        if rule.action == "drop" and set(rule.pattern) == {"*"} and all(r.action == "drop" for r in rules):
            errors.append(f"rules[{i}]: every tensor is dropped ({rule}); the soup would be empty")
    return rules


def _lora_pairs(value: Any, errors: list[str]) -> list[Rule]:
    """``lora_pairs:``: ``"A=B"`` strings or ``{a, b, mode, rank_key}`` mappings, as pair rules (first)."""
    from soup.engine.rules import parse_lora_pair

    if value is None:
        return []
    if not isinstance(value, list):
        errors.append("lora_pairs: must be a list")
        return []
    rules = [_check(errors, parse_lora_pair, spec, where=f"lora_pairs[{i}]") for i, spec in enumerate(value)]
    return [r for r in rules if r is not None]


def _merge_options(data: dict, n: int, errors: list[str]) -> None:
    """dtype, accumulate, shard_size, device, strict, config_from, normalize, mixed_float, vocab: checked
    as the engine will."""
    given = {k: data[k] for k in ("dtype", "accumulate", "shard_size", "device", "strict", "config_from", "normalize",
                                  "mixed_float", "vocab") if k in data}
    _check(errors, MergeOptions, **given)
    for key in ("config_from", "vocab"):  # an ingredient by index
        value = given.get(key)
        if n and (type(value) is int or (isinstance(value, str) and value.isdigit())) and int(value) >= n:
            errors.append(f"{key}: index {value} out of range (0..{n - 1})")


def _evaluator(value: Any, where: str, base: Path, errors: list[str]) -> EvaluatorEntry | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        errors.append(f"{where}: a name, or a mapping with name (and args), is required")
        return None
    _keys(value, {"name", "args"}, where, errors)
    args = value.get("args") or {}
    if not isinstance(args, dict):
        errors.append(f"{where}.args: must be a mapping")
        return None
    if any(not isinstance(k, str) for k in args):
        _keys(args, set(args), f"{where}.args", errors)
        return None
    name = _plugin_path(value["name"], base)
    args = {k: str(_rel(base, v)) if isinstance(v, str) and v.startswith(("./", "../")) else v
            for k, v in args.items()}
    return EvaluatorEntry(name, args)


def _publish(value: Any, errors: list[str]) -> dict[str, Any] | None:
    """``publish: {mlflow: NAME}``: register each new soup as a version of an MLflow registered model."""
    if value is None:
        return None
    if not isinstance(value, dict):
        errors.append("publish: a mapping, e.g. {mlflow: soup-model}")
        return None
    _keys(value, {"mlflow"}, "publish", errors)
    if not isinstance(value.get("mlflow"), str) or not value["mlflow"]:
        errors.append(f"publish.mlflow: the registered model's name is required, got {value.get('mlflow')!r}")
        return None
    return dict(value)


def _push(value: Any, errors: list[str]) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, str) and value:
        return {"repo": value}
    if not isinstance(value, dict) or not isinstance(value.get("repo"), str) or not value["repo"]:
        errors.append("push_to: owner/name, or a mapping with repo")
        return None
    _keys(value, PUSH_KEYS, "push_to", errors)
    for key, kinds, what in (("revision", str, "a branch name"), ("commit_message", str, "a string"),
                             ("private", bool, "true or false"), ("create_pr", bool, "true or false")):
        if value.get(key) is not None and not isinstance(value[key], kinds):
            errors.append(f"push_to.{key}: must be {what}, got {value[key]!r}")
    return dict(value)
