"""Per-tensor rules: glob patterns on tensor names, applied in order, first match wins.

Multi-part models need different treatment per part: a frozen vision tower is read from one
ingredient only, an adapter is dropped, a projector gets its own weights. A rule is written

- ``PATTERN=take:INGREDIENT``  copy the tensor from one ingredient (index from 0, or its label);
- ``PATTERN=drop``             leave matching tensors out of the soup;
- ``PATTERN=W1,W2,...``        (or ``weights:W1,...``) per-pattern weights, one per ingredient;
- ``A_PATTERN=pair:B_PATTERN[:MODE]``  LoRA-style pairs inside full checkpoints, souped as their delta
  ``B @ A`` (``soup.adapters.pairs``); MODE is ``exact`` (default), ``svd`` or ``independent``
  (``--lora-pair`` and recipes' ``lora_pairs:`` build these rules).

Patterns are ``fnmatch`` globs matched case-sensitively against the full tensor name
(``model.vision_tower.*``, ``*.lora_*``). In a recipe a rule is a mapping with ``pattern`` and one of
``take``, ``drop: true`` or ``weights``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from soup.errors import RecipeError
from soup.options import check_weights

__all__ = ["Rule", "parse_rule", "parse_rules", "match_rule", "pair_rule", "parse_lora_pair", "PAIR_MODES"]


@dataclass(frozen=True)
class Rule:
    pattern: str
    action: str  # "take", "drop", "weights" or "pair"
    ingredient: int | str | None = None  # for take: index or label
    weights: tuple[float, ...] | None = None  # for weights: one per ingredient
    partner: str | None = None  # for pair: the B tensors' pattern (``pattern`` matches the A tensors)
    mode: str | None = None  # for pair: "exact", "svd" or "independent"
    rank_key: str | None = None  # for pair, exact: the config key holding the rank (updated to the new rank)

    def matches(self, name: str) -> bool:
        return fnmatchcase(name, self.pattern)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"pattern": self.pattern, "action": self.action}
        if self.action == "take":
            d["ingredient"] = self.ingredient
        if self.action == "weights":
            d["weights"] = list(self.weights)
        if self.action == "pair":
            d.update(partner=self.partner, mode=self.mode)
            if self.rank_key:
                d["rank_key"] = self.rank_key
        return d

    def __str__(self) -> str:
        if self.action == "take":
            return f"{self.pattern}=take:{self.ingredient}"
        if self.action == "weights":
            return f"{self.pattern}=" + ",".join(f"{w:g}" for w in self.weights)
        if self.action == "pair":
            return f"{self.pattern}=pair:{self.partner}:{self.mode}"
        return f"{self.pattern}=drop"


def parse_rule(spec: str | Mapping[str, Any], *, where: str = "rule") -> Rule:
    """Parse ``"PATTERN=ACTION"`` or a recipe mapping into a Rule (RecipeError names ``where``)."""
    if isinstance(spec, Mapping):
        return _from_mapping(spec, where)
    pattern, sep, action = str(spec).rpartition("=")
    if not sep or not pattern:
        raise RecipeError(f"{where}: {spec!r} is not PATTERN=take:N, PATTERN=drop or PATTERN=W1,W2,...")
    action = action.strip()
    if action == "drop":
        return Rule(pattern, "drop")
    if action.startswith("take:"):
        return Rule(pattern, "take", ingredient=_ingredient(action[5:].strip(), f"{where}.take"))
    if action.startswith("pair:"):
        partner, _, mode = action[5:].partition(":")
        return pair_rule(pattern, partner, mode or "exact", where=where)
    if action.startswith("weights:"):
        action = action[8:]
    return Rule(pattern, "weights", weights=check_weights(action.split(","), where=f"{where}.weights"))


def _from_mapping(spec: Mapping[str, Any], where: str) -> Rule:
    unknown = set(spec) - {"pattern", "take", "drop", "weights", "pair", "mode", "rank_key"}
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                          "(allowed: pattern, take, drop, weights, pair, mode, rank_key)")
    pattern = spec.get("pattern")
    if not isinstance(pattern, str) or not pattern:
        raise RecipeError(f"{where}.pattern: a glob string is required")
    if "pair" in spec or "mode" in spec or "rank_key" in spec:
        if any(k in spec for k in ("take", "drop", "weights")):
            raise RecipeError(f"{where}: give exactly one of take, drop, weights, pair")
        return pair_rule(pattern, spec.get("pair"), spec.get("mode", "exact"), spec.get("rank_key"), where=where)
    actions = [k for k in ("take", "drop", "weights") if k in spec]
    if len(actions) != 1:
        raise RecipeError(f"{where}: give exactly one of take, drop, weights")
    if actions[0] == "drop":
        if spec["drop"] is not True:
            raise RecipeError(f"{where}.drop: must be true")
        return Rule(pattern, "drop")
    if actions[0] == "take":
        return Rule(pattern, "take", ingredient=_ingredient(spec["take"], f"{where}.take"))
    w = spec["weights"]
    if not isinstance(w, (list, tuple)):
        raise RecipeError(f"{where}.weights: a list of numbers is required")
    return Rule(pattern, "weights", weights=check_weights(w, where=f"{where}.weights"))


PAIR_MODES = ("exact", "svd", "independent")


def parse_lora_pair(spec: Any, mode: Any = "exact", rank_key: Any = None, *, where: str = "--lora-pair") -> Rule:
    """``"A_PATTERN=B_PATTERN"`` (``--lora-pair``) or ``{a, b, mode, rank_key}`` (a recipe's ``lora_pairs``)."""
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"a", "b", "mode", "rank_key"}
        if unknown:
            raise RecipeError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                              "(allowed: a, b, mode, rank_key)")
        return pair_rule(spec.get("a"), spec.get("b"), spec.get("mode", mode), spec.get("rank_key", rank_key),
                         where=where)
    a, sep, b = str(spec).partition("=")
    if not sep or not a or not b:
        raise RecipeError(f"{where}: {spec!r} is not A_PATTERN=B_PATTERN (e.g. '*.Plora_A.weight=*.Plora_B.weight')")
    return pair_rule(a, b, mode, rank_key, where=where)


def pair_rule(a: Any, b: Any, mode: Any = "exact", rank_key: Any = None, *, where: str = "lora_pairs") -> Rule:
    """A LoRA pair rule: tensors matching ``a`` (A: (r, in)) paired with ``b`` (B: (out, r)); each ``*``
    or ``?`` of ``b`` takes what the same wildcard matched in ``a``."""
    for key, value in (("pattern", a), ("pair", b)):
        if not isinstance(value, str) or not value:
            raise RecipeError(f"{where}.{key}: a glob string is required, got {value!r}")
    if _wildcards(a) != _wildcards(b):
        raise RecipeError(f"{where}: {a} and {b} must have the same wildcards (*, ?) in the same order")
    if mode not in PAIR_MODES:
        raise RecipeError(f"{where}.mode: {mode!r} is not one of {', '.join(PAIR_MODES)}")
    if rank_key is not None and (not isinstance(rank_key, str) or not rank_key):
        raise RecipeError(f"{where}.rank_key: a config key (e.g. lora_rank) is required, got {rank_key!r}")
    if rank_key is not None and mode != "exact":
        raise RecipeError(f"{where}.rank_key: only with mode exact (the {mode} mode keeps the rank)")
    return Rule(a, "pair", partner=b, mode=mode, rank_key=rank_key)


def _wildcards(pattern: str) -> list[str]:
    return [c for c in pattern if c in "*?"]


def _ingredient(value: Any, where: str) -> int | str:
    """An ingredient index (>= 0) or label."""
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise RecipeError(f"{where}: {value!r} must be an ingredient index (0, 1, ...) or name")
    if isinstance(value, int) and value < 0:
        raise RecipeError(f"{where}: {value} is negative; ingredients are numbered from 0")
    return value


def parse_rules(specs: Iterable[str | Mapping[str, Any] | Rule], *, where: str = "rules") -> list[Rule]:
    return [s if isinstance(s, Rule) else parse_rule(s, where=f"{where}[{i}]") for i, s in enumerate(specs)]


def match_rule(rules: Sequence[Rule], name: str) -> Rule | None:
    """The first rule whose pattern matches ``name``, or None."""
    for rule in rules:
        if rule.matches(name):
            return rule
    return None
