"""Finding merge methods by name: the built-ins (one file each in this package), the entry-point group
``soup.methods``, ``module:Class`` or ``path/to/file.py:Class`` — the loader every plug-in kind uses.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from soup.errors import RecipeError
from soup.methods.base import MergeMethod
from soup.plugins import load_plugin_class, plugin_names

__all__ = ["load_method", "method_names", "builtin_methods", "GROUP"]

GROUP = "soup.methods"
_NOT_METHODS = {"base", "registry", "params", "spec", "mergekit", "sparsify", "geometry", "select"}  # helpers, not methods


@lru_cache(maxsize=1)
def builtin_methods() -> dict[str, type[MergeMethod]]:
    """name -> class of every method defined in this package (a new method is one file here)."""
    import soup.methods as package

    found: dict[str, type[MergeMethod]] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name in _NOT_METHODS or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"soup.methods.{info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, MergeMethod) and value is not MergeMethod \
                    and value.__module__ == module.__name__ and getattr(value, "name", None):
                found[value.name] = value
    return dict(sorted(found.items(), key=lambda kv: (kv[0] != "linear", kv[0])))


def method_names() -> list[str]:
    return plugin_names(GROUP, builtin_methods())


def load_method(spec: str | type | MergeMethod) -> MergeMethod:
    """A method instance from a name (``ties``), ``module:Class``, ``file.py:Class``, a class or an instance.

    Raises:
        RecipeError: unknown name (the valid ones are listed), not a MergeMethod, cannot be imported.
    """
    if isinstance(spec, MergeMethod):
        return spec
    if spec == "passthrough":
        raise RecipeError("method: passthrough changes the architecture (layers stacked from several models); "
                          "soup merges models of one architecture and does not implement it")
    builtins = builtin_methods()
    cls = builtins[spec] if isinstance(spec, str) and spec in builtins else load_plugin_class(
        spec, group=GROUP, base=MergeMethod, kind="method", error=RecipeError, builtins=builtins)
    return cls()
