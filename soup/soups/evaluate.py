"""Evaluator plug-ins: the one abstract base class, the candidate it scores, and how they are loaded.

An evaluator turns a *candidate* (an ingredient or a soup of ingredients) into a score. It has one
required method, ``score(candidate)``, and a declared direction (``"maximize"`` or ``"minimize"``, as
in optuna), so that a loss is never maximised by mistake.

A candidate offers two forms, each built lazily on first use:
- ``candidate.path()``: an HF-layout folder (sharded safetensors + config/tokenizer files) for
  external harnesses; written to a temporary folder and removed when the candidate is closed;
- ``candidate.state_dict(device)``: ``{name: tensor}`` in memory on a device, for in-process
  evaluators; no disk at all.

Evaluators are found by entry point (group ``soup.evaluators``; the built-ins are registered that
way), by ``module:Class`` or by ``path/to/file.py:Class``; keyword arguments come from the recipe.

Contract: ``score`` may be called many times on one instance, from one thread at a time; an
evaluator may keep a model resident between calls. ``close()`` releases it.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from soup.errors import EvaluatorError, redact

__all__ = ["Candidate", "Evaluator", "Score", "load_evaluator", "check_evaluator", "evaluator_names", "run_evaluator"]

ENTRY_POINT_GROUP = "soup.evaluators"


@dataclass(frozen=True)
class Score:
    """The result of one evaluation: the primary value, used for selection, plus all metrics."""

    value: float  # the primary metric
    metrics: dict[str, float] = field(default_factory=dict)  # every named metric, primary included
    primary: str = "score"  # the name of the primary metric


class Candidate:
    """Something to score: a weighted mean of ingredients, materialised on demand.

    Args:
        name: a human label naming the candidate in progress lines and errors
            (e.g. ``"ingredient 3/8 (ft-ocr)"``, ``"greedy candidate 5/8"``).
        key: the content identity (ingredient fingerprints + weights) used by the score cache.
        state_dict_fn: ``fn(device) -> {name: tensor}``, builds the weights in memory.
        write_fn: ``fn(folder)``, writes an HF-layout checkpoint into an existing empty folder.
        load_fn: ``fn(sink)``, computes the weights straight into an ``InPlaceSink``'s existing
            tensors; without it ``load_into`` copies from ``state_dict``.
        weights: ``{ingredient label: weight}``, for reports.
        tmp_dir: where ``path()`` writes its folder (default: the system temp folder).
    """

    def __init__(
        self,
        name: str,
        key: str,
        *,
        state_dict_fn: Callable[[str], dict[str, Any]],
        write_fn: Callable[[Path], None],
        weights: Mapping[str, float] | None = None,
        tmp_dir: Path | None = None,
        load_fn: Callable[[Any], None] | None = None,
    ) -> None:
        self.name = name
        self.key = key
        self.weights = dict(weights or {})
        self._state_dict_fn = state_dict_fn
        self._write_fn = write_fn
        self._load_fn = load_fn
        self._tmp: Path | None = None
        self._tmp_dir = tmp_dir

    @classmethod
    def from_state_dict(cls, name: str, state_dict: Mapping[str, Any], *, key: str | None = None,
                        config_dir: str | Path | None = None) -> Candidate:
        """A candidate over tensors already in memory (tests, training scripts).

        ``config_dir``: a folder whose config/tokenizer files are copied next to the weights when a
        folder is asked for.
        """
        from safetensors.torch import save_file

        def to_device(device: str) -> dict[str, Any]:
            return {k: v.to(device) for k, v in state_dict.items()}

        def write(folder: Path) -> None:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()},
                      str(folder / "model.safetensors"), metadata={"format": "pt"})
            if config_dir is not None:
                from soup.engine.writer import copy_aux_files
                copy_aux_files(Path(config_dir), folder)

        return cls(name, key or f"memory:{id(state_dict)}", state_dict_fn=to_device, write_fn=write)

    def state_dict(self, device: str = "cpu") -> dict[str, Any]:
        """The candidate's weights as ``{name: tensor}`` on ``device`` (built anew on each call)."""
        return self._state_dict_fn(device)

    def load_into(self, target: Any, *, strict: bool = True) -> None:
        """Compute the candidate straight into ``target``'s existing tensors, in place.

        ``target`` is an ``nn.Module`` (parameters and buffers, by ``state_dict`` name) or a mapping
        ``{name: tensor}``; each tensor keeps its device and dtype. The soup is computed block by
        block into it, so a resident model needs no second copy of the weights (peak memory: the
        model plus a few blocks). Every target tensor must be provided (tied weights count once);
        a shape that differs is an error naming the tensor, and so is a soup tensor the target
        lacks unless ``strict=False`` (then it is skipped, never computed).
        """
        from soup.engine.sinks import InPlaceSink

        sink = InPlaceSink(target, strict=strict)
        if self._load_fn is not None:
            self._load_fn(sink)
            return
        state = self.state_dict("cpu")
        from soup.engine.plan import Job

        jobs = sink.select([Job(k, tuple(v.shape), "take", v.dtype) for k, v in state.items()])
        sink.write(jobs, lambda job: [state[job.name].reshape(-1)])

    def path(self) -> Path:
        """An HF-layout folder holding the candidate; written on first call, removed by ``close``."""
        if self._tmp is None:
            tmp = Path(tempfile.mkdtemp(prefix="soup-candidate-", dir=self._tmp_dir))
            try:
                self._write_fn(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._tmp = tmp
        return self._tmp

    def close(self) -> None:
        """Remove the temporary folder, if one was written."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> Candidate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Candidate({self.name!r})"


class Evaluator(ABC):
    """Base class of evaluator plug-ins: implement ``score``; set ``direction`` if lower is better.

    ``score(candidate)`` returns a float, or a mapping of named metrics in which ``primary`` (the
    class attribute, or the ``primary=`` keyword) names the one used for selection.

    Keyword arguments given to the constructor (from the recipe) are kept in ``self.args`` and, with
    ``name``, ``version`` and the evaluator's code (``code_identity``: its class's module and name,
    the sha256 of the module's source file and the installed distribution's version), make up the
    evaluator's identity in the score cache: an edited evaluator is evaluated afresh, and two
    evaluators with one class name in different files never share scores. To keep old scores across
    edits that do not change them, set ``code_in_key = False`` on the class and bump ``version``
    yourself when a change does.
    """

    name: ClassVar[str] = ""  # the registry name; defaults to the class name
    version: ClassVar[str] = "1"  # part of the cache key
    direction: str = "maximize"  # "maximize" or "minimize"
    primary: str | None = None  # for mapping results: the metric used for selection
    code_in_key: ClassVar[bool] = True  # the code's hash is part of the identity (False: name + version only)

    def __init__(self, **args: Any) -> None:
        self.args = dict(args)
        if "direction" in args:
            self.direction = args["direction"]
        if "primary" in args:
            self.primary = args["primary"]
        if self.direction not in ("maximize", "minimize"):
            raise EvaluatorError(f"evaluator {self.label}: direction must be 'maximize' or 'minimize', "
                                 f"got {self.direction!r}")

    @abstractmethod
    def score(self, candidate: Candidate) -> float | Mapping[str, float]:
        """Score one candidate."""

    @classmethod
    def validate(cls, **args: Any) -> None:
        """Check a recipe's arguments before any work, cheaply (no model is loaded): their values and
        the files they name. ``soup validate`` and ``soup run`` call it (``check_evaluator``) before
        anything is evaluated, once the names are known to fit ``__init__``; so does ``load_evaluator``.
        Raise ``EvaluatorError`` with one line. The default accepts every value.
        """

    def close(self) -> None:
        """Release resources (a resident model, a GPU); called once when the run ends."""

    @property
    def label(self) -> str:
        return self.name or type(self).__name__

    def identity(self) -> dict[str, Any]:
        """What makes two evaluations comparable: name, version, arguments (not the device)."""
        args = {k: v for k, v in self.args.items() if k != "device"}
        ident = {"name": self.label, "version": self.version, "args": args,
                 "direction": self.direction, "primary": self.primary}
        if self.code_in_key:
            ident["code"] = code_identity(type(self))
        return ident

    def better(self, a: float, b: float) -> bool:
        """True if score ``a`` is strictly better than ``b`` in this evaluator's direction."""
        return a > b if self.direction == "maximize" else a < b


def run_evaluator(evaluator: Evaluator, candidate: Candidate) -> Score:
    """Call ``evaluator.score`` and normalise the result; any failure becomes an EvaluatorError.

    A plug-in that raises, calls ``sys.exit`` or returns something other than a finite number (or a
    mapping of them) is an error naming the evaluator and the candidate; the plug-in's own text is
    passed through ``redact`` so a token it saw never reaches the terminal. A real stop signal
    (Ctrl-C, SIGTERM: see ``soup.signals``) propagates; a ``KeyboardInterrupt`` the plug-in raised
    itself is an error.
    """
    what = f"evaluator {evaluator.label}"
    try:
        raw = evaluator.score(candidate)
    except EvaluatorError as e:
        raise EvaluatorError(redact(f"{what} failed on {candidate.name}: {e}")) from e
    except SystemExit as e:  # a BaseException: uncaught, it would end soup with the plug-in's exit code
        code = "" if e.code is None else repr(e.code)
        raise EvaluatorError(redact(f"{what} called sys.exit({code}) while scoring {candidate.name}")) from None
    except KeyboardInterrupt:
        from soup.signals import received

        if received() is not None:  # the user (or the scheduler) asked soup to stop
            raise
        raise EvaluatorError(f"{what} raised KeyboardInterrupt itself while scoring {candidate.name} "
                             "(no stop signal was received)") from None
    except Exception as e:  # a plug-in crash: keep the cause, name the candidate
        raise EvaluatorError(redact(f"{what} failed on {candidate.name}: {type(e).__name__}: {e}")) from e
    if isinstance(raw, Mapping):
        metrics = {str(k): _finite(evaluator, candidate, v, str(k)) for k, v in raw.items()}
        primary = evaluator.primary or (next(iter(metrics)) if len(metrics) == 1 else None)
        if primary not in metrics:
            raise EvaluatorError(redact(f"{what} returned metrics {sorted(metrics)} for "
                                        f"{candidate.name} but its primary metric is {primary!r}"))
        return Score(metrics[primary], metrics, primary)
    value = _finite(evaluator, candidate, raw, "score")
    return Score(value, {"score": value}, "score")


def _finite(evaluator: Evaluator, candidate: Candidate, value: Any, metric: str) -> float:
    """``value`` as a finite float: ints, floats, numpy scalars and one-element tensors qualify;
    booleans and strings do not, although ``float()`` would take them (``True`` -> 1.0, ``"0.5"``)."""
    what = f"evaluator {evaluator.label}"
    dtype = str(getattr(value, "dtype", ""))
    if isinstance(value, (bool, str, bytes)) or dtype in ("bool", "torch.bool"):
        raise EvaluatorError(redact(f"{what} returned {value!r} ({metric}) for {candidate.name}: "
                                    f"a score must be a number, not a {type(value).__name__}"))
    try:
        number = float(value)
    except Exception:  # TypeError, ValueError, a tensor of many elements, a failing __float__
        raise EvaluatorError(redact(f"{what} returned a non-number {value!r} ({metric}) "
                                    f"for {candidate.name}")) from None
    if not math.isfinite(number):
        raise EvaluatorError(f"{what} returned a non-finite score {number} ({metric}) for {candidate.name}")
    return number


def evaluator_names() -> list[str]:
    """Names registered under the ``soup.evaluators`` entry-point group."""
    from soup.plugins import plugin_names

    return plugin_names(ENTRY_POINT_GROUP)


def load_evaluator(spec: str | type[Evaluator] | Evaluator, **args: Any) -> Evaluator:
    """Build an evaluator from an entry-point name, ``module:Class`` or ``file.py:Class`` (see
    ``soup.plugins``). An Evaluator instance is returned as is; a class is instantiated with ``args``.

    Raises:
        EvaluatorError: an unknown name (listing the valid ones), an import failure, bad arguments.
    """
    if isinstance(spec, Evaluator):
        return spec
    cls = check_evaluator(spec, args)
    try:
        return cls(**args)
    except EvaluatorError:
        raise
    except TypeError as e:
        raise EvaluatorError(f"evaluator {spec!r}: bad arguments {sorted(args)}: {e}") from e


def check_evaluator(spec: str | type[Evaluator], args: Mapping[str, Any]) -> type[Evaluator]:
    """The class an evaluator spec names, with ``args`` checked against it, before anything is built:
    the names against its ``__init__`` (an unknown one suggests the closest), the values and the
    files they name by its ``validate``.

    Raises:
        EvaluatorError: an unknown name (listing the valid ones), a missing file or class, a bad argument.
    """
    import difflib
    import inspect

    from soup.plugins import load_plugin_class

    cls = load_plugin_class(spec, group=ENTRY_POINT_GROUP, base=Evaluator, kind="evaluator", error=EvaluatorError)
    label = cls.name or cls.__name__
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        accepted = sorted(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        for name in args:
            if name not in accepted:
                close = difflib.get_close_matches(str(name), accepted, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise EvaluatorError(f"evaluator {label}: unknown argument {name!r}{hint}; "
                                     f"accepted: {', '.join(accepted) or 'none'}")
    missing = [p.name for p in params if p.default is p.empty and p.name not in args
               and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if missing:
        raise EvaluatorError(f"evaluator {label}: argument {missing[0]!r} is required")
    cls.validate(**args)
    return cls


def code_identity(cls: type) -> dict[str, Any]:
    """What code an evaluator class runs: ``module:qualname``, the sha256 of its module's source file
    (read whenever an identity is taken, once per run: well under a millisecond for a file of a few
    hundred lines; no cache, so an edit within one clock tick is still seen) and the version of the
    installed distribution that ships the module, if any."""
    import hashlib
    import importlib.metadata
    import inspect

    ident: dict[str, Any] = {"spec": f"{cls.__module__}:{cls.__qualname__}"}
    try:
        path = inspect.getsourcefile(cls)
    except (TypeError, OSError):
        path = None
    if path:
        try:
            with open(path, "rb") as f:
                ident["sha256"] = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            pass
    top = cls.__module__.split(".")[0]
    dists = importlib.metadata.packages_distributions().get(top) or []
    if dists:
        try:
            ident["distribution"] = f"{dists[0]}=={importlib.metadata.version(dists[0])}"
        except importlib.metadata.PackageNotFoundError:
            pass
    return ident
