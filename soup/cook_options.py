"""The options that travel together into ``cook``, as checked objects: evaluation, output, publishing.

``soup.cook`` takes them whole (``cook(strategy, ingredients, evaluation=..., output=..., publishing=...)``);
``soup run`` builds them from a recipe (the CLI's flags override recipe keys, then the same objects are
built), and the Python soups (``greedy_soup(..., evaluator=fn, output="runs/soup")``) build them from their
keyword arguments with ``split_options``. Each checks its values on construction, so a bad one is a
``RecipeError`` naming the option before anything is opened or evaluated. The names are the recipe's and
the CLI's: ``output`` (``--output``/``-o``), ``overwrite``, ``cache``, ``devices``, ``storage``,
``local_worker``, ``push_to`` (the recipe's ``endpoint`` / ``--endpoint`` is ``hub=HubOptions(endpoint=...)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from soup.errors import RecipeError
from soup.options import check_device

__all__ = ["EvaluationOptions", "OutputOptions", "PublishOptions", "split_options", "keywords"]


@dataclass(frozen=True)
class EvaluationOptions:
    """Who scores the candidates, and where: the evaluator (selection) and the test evaluator (report
    only) with their keyword arguments, the score cache, the devices, and the optuna storage shared
    with ``soup worker`` processes."""

    evaluator: Any = None  # entry-point name, module:Class, file.py:Class, an Evaluator, or fn(candidate)
    evaluator_args: Mapping[str, Any] | None = None
    test_evaluator: Any = None
    test_args: Mapping[str, Any] | None = None
    cache: Any = "default"  # "default", a path or URL, a ScoreCache, or None (no cache)
    devices: Sequence[str] | None = None  # one evaluator per device, candidates evaluated concurrently
    storage: str | None = None  # optuna storage URL: evaluations go through a queue workers share
    local_worker: bool = True  # with a storage, this process evaluates queued candidates too

    def __post_init__(self) -> None:
        for name in ("evaluator_args", "test_args"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise RecipeError(f"{name}: must be a mapping of keyword arguments, got {value!r}")
        if self.devices is not None:
            if isinstance(self.devices, str) or not isinstance(self.devices, Sequence):
                raise RecipeError(f"devices: a list of devices is required, got {self.devices!r}")
            for i, d in enumerate(self.devices):
                check_device(d, where=f"devices[{i}]")
        if self.storage is not None and (not isinstance(self.storage, str) or "://" not in self.storage):
            raise RecipeError(f"storage: {self.storage!r} must be an optuna storage URL (sqlite:///..., "
                              "postgresql://...)")
        if not isinstance(self.local_worker, bool):
            raise RecipeError(f"local_worker: must be true or false, got {self.local_worker!r}")


@dataclass(frozen=True)
class OutputOptions:
    """Where the soup goes: a folder (``path``; replaced only if it holds a previous soup, with
    ``overwrite``), and/or the state dict in memory (``return_state_dict``, or no path)."""

    path: str | Path | None = None
    overwrite: bool = False
    return_state_dict: bool = False
    protect: Sequence[str | Path] = field(default_factory=tuple)  # more inputs the output keeps clear of

    def __post_init__(self) -> None:
        if self.path is not None and not isinstance(self.path, (str, Path)):
            raise RecipeError(f"output: {self.path!r} must be a folder path")
        for name in ("overwrite", "return_state_dict"):
            if not isinstance(getattr(self, name), bool):
                raise RecipeError(f"{name}: must be true or false, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class PublishOptions:
    """Where the soup is published and what it records: a hub repo (``push_to``: ``"owner/name"`` or
    ``{repo, revision, private, create_pr, commit_message}``), the hub options (endpoint, token), and the
    recipe that made it (kept in ``soup.json``)."""

    push_to: Mapping[str, Any] | str | None = None
    hub: Any = None  # soup.io.ingredients.HubOptions
    recipe: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.push_to is not None and not isinstance(self.push_to, (str, Mapping)):
            raise RecipeError(f"push_to: {self.push_to!r} must be owner/name or a mapping with a repo")
        if self.recipe is not None and not isinstance(self.recipe, Mapping):
            raise RecipeError(f"recipe: must be a mapping, got {self.recipe!r}")


# the Python soups' keyword arguments, by the object they belong to ("out" is the older name of "output")
_KEYWORDS = {EvaluationOptions: [f.name for f in fields(EvaluationOptions)],
             OutputOptions: ["output", "out", "overwrite", "return_state_dict", "protect"],
             PublishOptions: [f.name for f in fields(PublishOptions)]}

_PARAM = {EvaluationOptions: "evaluation", OutputOptions: "output", PublishOptions: "publishing"}


def keywords() -> list[str]:
    """Every keyword argument ``split_options`` takes out (for "did you mean" suggestions)."""
    return sorted({k for names in _KEYWORDS.values() for k in names})


def split_options(options: dict[str, Any], *, evaluation: EvaluationOptions | None = None, output: Any = None,
                  publishing: PublishOptions | None = None) -> tuple[EvaluationOptions, OutputOptions, PublishOptions]:
    """Take the keyword arguments that belong to the three objects out of ``options`` (the rest stays:
    merge options) and build the objects, or check that a given object is not also given in pieces.

    ``output`` may be an ``OutputOptions`` or a folder path; ``out=`` is accepted as its older name.
    """
    if "out" in options:
        if output is not None or "output" in options:
            raise RecipeError("output: given twice (output= and its older name out=)")
        options["output"] = options.pop("out")
    if output is not None and not isinstance(output, OutputOptions):
        options["output"] = output
        output = None
    built = []
    for cls, given in ((EvaluationOptions, evaluation), (OutputOptions, output), (PublishOptions, publishing)):
        pieces = {k: options.pop(k) for k in _KEYWORDS[cls] if k in options}
        if given is not None:
            if not isinstance(given, cls):
                raise RecipeError(f"{_PARAM[cls]}: must be a {cls.__name__}, got {type(given).__name__}")
            if pieces:
                raise RecipeError(f"{', '.join(sorted(pieces))}: given both on their own and in {_PARAM[cls]}=")
            built.append(given)
            continue
        if cls is OutputOptions and "output" in pieces:
            pieces["path"] = pieces.pop("output")
        built.append(cls(**pieces))
    return built[0], built[1], built[2]
