"""How plug-ins are found: one loader for every plug-in kind (evaluators, strategies).

A plug-in is named by

- an entry-point name in the kind's group (``soup.evaluators``, ``soup.strategies``, ``soup.methods``; the built-ins
  are registered that way, and another package can register its own in its ``pyproject.toml``);
- ``package.module:Class``;
- ``path/to/file.py:Class`` (a file outside any package; recipes resolve it relative to themselves).

The class found must subclass the kind's base class. Every failure is one line naming the spec and,
for an unknown name, the valid ones.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from soup.errors import SoupError

__all__ = ["load_plugin_class", "plugin_names", "load_attr", "check_arguments"]


def plugin_names(group: str, builtins: Mapping[str, type] | None = None) -> list[str]:
    """Registered names of a kind: its built-ins first, then the entry points of ``group``."""
    names = list(builtins or {})
    names += sorted(ep.name for ep in importlib.metadata.entry_points(group=group) if ep.name not in names)
    return names


def load_plugin_class(spec: str | type, *, group: str, base: type, kind: str,
                      error: type[SoupError] = SoupError, builtins: Mapping[str, type] | None = None) -> type:
    """The class a spec names, checked to subclass ``base``.

    Args:
        spec: a class, an entry-point name, ``module:Class`` or ``file.py:Class``.
        group: the entry-point group searched for plain names.
        base: the kind's abstract base class.
        kind: "evaluator", "strategy"... (for messages).
        error: the SoupError subclass raised.
        builtins: names that work even when the package's entry points are not installed.
    """
    if isinstance(spec, type):
        cls = spec
    elif not isinstance(spec, str) or not spec:
        raise error(f"{kind} {spec!r}: a name, 'module:Class' or 'path/to/file.py:Class' is required")
    elif ":" in spec:
        cls = load_attr(spec, kind, error)
    else:
        eps = {ep.name: ep for ep in importlib.metadata.entry_points(group=group)}
        if spec in eps:
            cls = _load_entry_point(eps[spec], spec, kind, error)
        elif builtins and spec in builtins:
            cls = builtins[spec]
        else:
            raise error(f"unknown {kind} {spec!r}; valid names: {', '.join(plugin_names(group, builtins))} "
                        "(or 'module:Class', 'path/to/file.py:Class')")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise error(f"{kind} {spec!r} is not a subclass of soup.{base.__name__}")
    return cls


def check_arguments(cls: type, args: Mapping[str, Any], *, what: str, error: type[SoupError] = SoupError) -> None:
    """Keyword arguments checked against ``cls.__init__`` before it runs: an unknown name (the closest
    suggested, the accepted ones listed) or a missing required one is one line; ``**kwargs`` takes any."""
    import difflib
    import inspect

    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    named = [p for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    accepted = sorted(p.name for p in named)
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        for name in (n for n in args if n not in accepted):
            close = difflib.get_close_matches(str(name), accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise error(f"{what}: unknown argument {name!r}{hint}; accepted: {', '.join(accepted) or 'none'}")
    missing = [p.name for p in named if p.default is p.empty and p.name not in args]
    if missing:
        raise error(f"{what}: argument {missing[0]!r} is required")


def _load_entry_point(ep: Any, spec: str, kind: str, error: type[SoupError]) -> Any:
    try:
        return ep.load()
    except Exception as e:
        raise error(f"cannot load {kind} {spec!r} ({ep.value}): {type(e).__name__}: {e}") from e


def load_attr(spec: str, kind: str, error: type[SoupError] = SoupError) -> Any:
    """The attribute ``module:name`` or ``file.py:name`` names (a class, a function)."""
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise error(f"{kind} file not found: {path}")
            # one module per file, whatever name it is loaded by; its classes keep a stable identity
            digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
            name = f"soup_plugin_{path.stem}_{digest}"
            # compiled from the file's current text: no stale bytecode (an edit within one second at the
            # same size) and no __pycache__ written beside the user's file
            module = types.ModuleType(name)
            module.__file__ = str(path.resolve())
            sys.modules[name] = module  # as imports do (dataclasses, pickling, inspect need it)
            try:
                exec(compile(path.read_bytes(), str(path), "exec"), module.__dict__)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        else:
            module = importlib.import_module(target)
    except SoupError:
        raise
    except Exception as e:
        raise error(f"cannot import {kind} {spec!r}: {type(e).__name__}: {e}") from e
    if not hasattr(module, attr):
        raise error(f"{kind} {spec!r}: {target} has no attribute {attr!r}")
    return getattr(module, attr)
