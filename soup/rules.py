"""Per-tensor rules: glob patterns on tensor names, applied in order, first match wins.

Multi-part models need different treatment per part: a frozen vision tower is read from one
ingredient only, an adapter is dropped, a projector gets its own weights. A rule is written

- ``PATTERN=take:INGREDIENT``  copy the tensor from one ingredient (index from 0, or its label);
- ``PATTERN=drop``             leave matching tensors out of the soup;
- ``PATTERN=W1,W2,...``        (or ``weights:W1,...``) per-pattern weights, one per ingredient.

Patterns are ``fnmatch`` globs matched case-sensitively against the full tensor name
(``model.vision_tower.*``, ``*.lora_*``). In a recipe a rule is a mapping with ``pattern`` and one of
``take``, ``drop: true`` or ``weights``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from .errors import RecipeError
from .options import check_weights

__all__ = ["Rule", "parse_rule", "parse_rules", "match_rule"]


@dataclass(frozen=True)
class Rule:
    pattern: str
    action: str  # "take", "drop" or "weights"
    ingredient: int | str | None = None  # for take: index or label
    weights: tuple[float, ...] | None = None  # for weights: one per ingredient

    def matches(self, name: str) -> bool:
        return fnmatchcase(name, self.pattern)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"pattern": self.pattern, "action": self.action}
        if self.action == "take":
            d["ingredient"] = self.ingredient
        if self.action == "weights":
            d["weights"] = list(self.weights)
        return d

    def __str__(self) -> str:
        if self.action == "take":
            return f"{self.pattern}=take:{self.ingredient}"
        if self.action == "weights":
            return f"{self.pattern}=" + ",".join(f"{w:g}" for w in self.weights)
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
    if action.startswith("weights:"):
        action = action[8:]
    return Rule(pattern, "weights", weights=check_weights(action.split(","), where=f"{where}.weights"))


def _from_mapping(spec: Mapping[str, Any], where: str) -> Rule:
    unknown = set(spec) - {"pattern", "take", "drop", "weights"}
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                          "(allowed: pattern, take, drop, weights)")
    pattern = spec.get("pattern")
    if not isinstance(pattern, str) or not pattern:
        raise RecipeError(f"{where}.pattern: a glob string is required")
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
