"""A merge method as the user chose it — ``--method``/``--set``, a recipe's ``method:``, ``method=`` in
Python, a mergekit config — checked before any work, and its parameters resolved per tensor.

Parameter values take mergekit's forms:

- a scalar: ``density: 0.5``;
- a gradient, a list of numbers interpolated over the layers: ``t: [0, 0.5, 1]`` gives layer ``i`` of
  ``L`` the value at ``i / (L - 1)`` of a piecewise-linear curve through the list; tensors outside the
  layers take the first value when they come before them (embeddings) and the last otherwise (final
  norm, head);
- filters, the first whose ``filter`` is a substring of the tensor name wins, an entry without one is
  the default: ``[{filter: self_attn, value: 0.3}, {filter: mlp, value: [0, 1]}, {value: 0.5}]``.

Global parameters (``lambda``, ``t``, ``normalize``...) are given once; per-model ones (``weight``,
``density``...) once for every ingredient or per ingredient (``model_params``). A tensor that no
filter matches and that has no default takes the method's default; a required value with no default
(mergekit's ``weight``) is the ingredient's weight in the soup (``--weights``, or the strategy's).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from soup.errors import RecipeError
from soup.methods.base import MergeMethod, Param, TensorParams
from soup.methods.registry import load_method, method_names

__all__ = ["MethodSpec", "method_spec", "layer_position", "count_layers"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_PRE = re.compile(r"embed|wte|wpe|word_embeddings|tok_embeddings")


@dataclass(frozen=True)
class MethodSpec:
    """A chosen merge method and its raw parameter values (checked; resolved per tensor by ``resolve``).

    ``params``: name -> value for every parameter given once (global ones, and per-model ones that
    apply to every ingredient); ``model_params``: one mapping per ingredient (or empty); ``base``: the
    base model (an ingredient spec) for methods that use one; ``seed``: random methods' seed.
    """

    method: MergeMethod
    params: Mapping[str, Any] = field(default_factory=dict)
    model_params: tuple[Mapping[str, Any], ...] = ()
    base: Any = None
    seed: int = 0

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def is_linear(self) -> bool:
        """The weighted mean: the engine's exact mean path, bit for bit."""
        return self.method.name == "linear"

    def resolve(self, tensor: str, sources: Sequence[int], weights: Sequence[float], n_layers: int) -> TensorParams:
        """The parameters of ``tensor`` for the ingredients ``sources`` (in order), whose soup weights
        are ``weights`` (one per ingredient): filters and gradients applied, defaults filled in."""
        pos = layer_position(tensor, n_layers)
        values, per_model = {}, {}
        for pname, p in self.method.parameters.items():
            if p.per_model:
                per_model[pname] = tuple(self._model_value(pname, p, i, tensor, pos, weights[i]) for i in sources)
            else:
                raw = self.params.get(pname, p.default)
                values[pname] = _cast(p, _pick(raw, tensor, pos), pname)
        return TensorParams(values, per_model, self.seed)

    def _model_value(self, pname: str, p: Param, i: int, tensor: str, pos: float | None, weight: float) -> Any:
        own = self.model_params[i] if i < len(self.model_params) else {}
        raw = own.get(pname, self.params.get(pname))
        value = _pick(raw, tensor, pos) if raw is not None else None
        if value is None:
            value = weight if pname == "weight" else p.default
        return _cast(p, value, pname)

    def describe(self) -> dict[str, Any]:
        """What ``soup.json`` records: the method, its reference, the values given and the seed."""
        return {"name": self.method.name, "reference": self.method.reference or None,
                "description": self.method.description or None, "parameters": dict(self.params),
                "model_parameters": [dict(m) for m in self.model_params] or None,
                "seed": self.seed if self.method.random else None}


def method_spec(method: str | Mapping[str, Any] | MergeMethod | MethodSpec | None, *, n: int,
                params: Mapping[str, Any] | None = None, model_params: Sequence[Mapping[str, Any]] = (),
                base: Any = None, seed: int | None = None, where: str = "method") -> MethodSpec | None:
    """Check a method choice before any work: a name, a mapping ``{name: ties, density: 0.5, base: ...,
    seed: 0}``, a MergeMethod or a MethodSpec; ``params`` (``--set``) on top; ``n`` ingredients.

    Raises:
        RecipeError: an unknown method or parameter (the valid ones listed), a bad value, a missing base.
    """
    if method is None:
        if params or model_params or base is not None:
            raise RecipeError(f"{where}: parameters or a base were given without a method (--method NAME)")
        return None
    if isinstance(method, MethodSpec):
        return method
    given: dict[str, Any] = {}
    if isinstance(method, Mapping):
        given = dict(method)
        if "name" not in given:
            raise RecipeError(f"{where}.name: required (one of {', '.join(method_names())})")
        method = given.pop("name")
        base = given.pop("base", None) if base is None else base
        seed = given.pop("seed", None) if seed is None else seed
        model_params = list(model_params) or list(given.pop("models", None) or [])
    impl = load_method(method)
    given.update(params or {})
    known = impl.parameters
    for key, value in given.items():
        if key not in known:
            raise RecipeError(f"{where}: {impl.name} has no parameter {key!r}; its parameters: "
                              f"{', '.join(known) or 'none'}")
        _check(known[key], value, f"{where}.{key}")
    if model_params and len(model_params) != n:
        raise RecipeError(f"{where}: {len(model_params)} per-model parameter sets for {n} ingredients")
    for k, mp in enumerate(model_params):
        if not isinstance(mp, Mapping):
            raise RecipeError(f"{where}.models[{k}]: expected a mapping of parameters")
        for key, value in mp.items():
            if key not in known or not known[key].per_model:
                per = [p for p, v in known.items() if v.per_model]
                raise RecipeError(f"{where}.models[{k}]: {key!r} is not a per-model parameter of {impl.name} "
                                  f"({', '.join(per) or 'none'})")
            _check(known[key], value, f"{where}.models[{k}].{key}")
    for key, p in known.items():
        if not (p.required or p.default is None) or key in given or key == "weight":
            continue
        if not p.per_model or not model_params or any(key not in mp for mp in model_params):
            raise RecipeError(f"{where}: {impl.name} needs parameter {key!r} (--set {key}=VALUE, or {key}: in "
                              f"the method's parameters{' or every model' if p.per_model else ''})")
    if impl.needs_base and base is None:
        raise RecipeError(f"{where}: {impl.name} needs a base model (--base PATH, or base: in the recipe)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise RecipeError(f"{where}.seed: {seed!r} must be a whole number >= 0")
    return MethodSpec(impl, given, tuple(dict(m) for m in model_params), base, int(seed or 0))


def layer_position(tensor: str, n_layers: int) -> float | None:
    """Where ``tensor`` lies along the layers, in [0, 1]: layer i of L at i / (L - 1); embeddings 0;
    other tensors outside the layers 1; None when the model has no numbered layers."""
    if n_layers <= 0:
        return None
    m = _LAYER.search(tensor)
    if m is not None:
        return int(m.group(1)) / (n_layers - 1) if n_layers > 1 else 0.0
    return 0.0 if _PRE.search(tensor) else 1.0


def count_layers(names: Sequence[str]) -> int:
    """The number of numbered layers among tensor names (max index + 1; 0 when none)."""
    found = [int(m.group(1)) for n in names if (m := _LAYER.search(n))]
    return max(found) + 1 if found else 0


def _pick(raw: Any, tensor: str, pos: float | None) -> Any:
    """A raw value for one tensor: filters by substring, then a gradient at ``pos``."""
    if isinstance(raw, Sequence) and not isinstance(raw, str) and raw and all(isinstance(e, Mapping) for e in raw):
        chosen = None
        for entry in raw:
            f = entry.get("filter")
            if f is None or str(f) in tensor:
                chosen = entry.get("value")
                break
        raw = chosen
    if isinstance(raw, Sequence) and not isinstance(raw, str):
        return _interpolate([float(v) for v in raw], 0.0 if pos is None else pos)
    return raw


def _interpolate(points: list[float], x: float) -> float:
    """np.interp(x, linspace(0, 1, len(points)), points)."""
    if len(points) == 1:
        return points[0]
    at = x * (len(points) - 1)
    k = min(int(math.floor(at)), len(points) - 2)
    frac = at - k
    return points[k] + (points[k + 1] - points[k]) * frac


def _cast(p: Param, value: Any, name: str) -> Any:
    if value is None:
        return None
    if p.kind == "bool":
        return bool(value)
    if p.kind == "int":
        return int(value)
    return float(value)


def _check(p: Param, value: Any, where: str) -> None:
    """A raw value in one of the accepted forms, each number of the right kind and in range."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            raise RecipeError(f"{where}: an empty list")
        if all(isinstance(e, Mapping) for e in value):
            for k, entry in enumerate(value):
                unknown = set(entry) - {"filter", "value"}
                if unknown or "value" not in entry:
                    raise RecipeError(f"{where}[{k}]: a filter entry is {{filter: NAME, value: V}} "
                                      f"(got keys {sorted(entry)})")
                _check(p, entry["value"], f"{where}[{k}].value")
            return
        for k, v in enumerate(value):
            _check_scalar(p, v, f"{where}[{k}]")
        return
    _check_scalar(p, value, where)


def _check_scalar(p: Param, v: Any, where: str) -> None:
    if p.kind == "bool":
        if not isinstance(v, bool):
            raise RecipeError(f"{where}: expected true or false, got {v!r}")
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise RecipeError(f"{where}: expected a finite number, got {v!r}")
    if p.kind == "int" and float(v) != int(v):
        raise RecipeError(f"{where}: expected a whole number, got {v!r}")
    if p.low is not None and v < p.low or p.high is not None and v > p.high:
        raise RecipeError(f"{where}: {v!r} is outside [{p.low if p.low is not None else '-inf'}, "
                          f"{p.high if p.high is not None else 'inf'}]")
