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

Optional per-example scores (racing, docs/racing.md): an evaluator that scores a candidate on a subset
of its examples implements ``examples()`` and ``score_examples``; candidates then race on shared examples.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from soup.errors import EvaluatorError, redact

__all__ = ["Candidate", "Evaluator", "Score", "load_evaluator", "check_evaluator", "evaluator_names", "run_evaluator",
           "run_examples", "mean_score"]

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

    The optional per-example part, one contract for all (racing, docs/racing.md; without it every
    candidate is scored whole): ``examples()`` says how many examples there are (indices ``0..n-1``;
    None, the default: no per-example scores; it may stay None until the first ``score``, then never
    changes); ``score_examples(candidate, indices)`` returns one finite score per index, in order and in
    the evaluator's ``direction`` (1.0/0.0 for right/wrong, a loss...), each a function of the candidate
    and its example only (never of the other indices: cached scores from different calls are mixed),
    their mean over every example ranking candidates as ``score`` does. ``example_range = (low, high)``
    bounds each per-example score (racing's scale, checked; None: the range seen). ``score_is_mean``:
    ``score`` is exactly ``mean_score`` of every per-example score (a float), so the scorer builds full
    scores from cached per-example ones and reads a tolerance on their scale; False (perplexity: token
    losses per example, a perplexity as the score): a full score is always ``score``'s.
    """

    name: ClassVar[str] = ""  # the registry name; defaults to the class name
    version: ClassVar[str] = "1"  # part of the cache key
    direction: str = "maximize"  # "maximize" or "minimize"
    primary: str | None = None  # for mapping results: the metric used for selection
    code_in_key: ClassVar[bool] = True  # the code's hash is part of the identity (False: name + version only)
    example_range: tuple[float, float] | None = None  # per-example scores lie in [low, high] (None: unknown)
    score_is_mean: bool = False  # score == mean_score(every per-example score), exactly

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
        """Check the arguments' values and the files they name, cheaply (no model), before any work:
        ``soup validate``, ``soup run`` and ``load_evaluator`` call it; raise one-line ``EvaluatorError``s."""

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

    def examples(self) -> int | None:
        """How many examples ``score_examples`` can score; None (the default): no per-example scores."""
        return None

    def score_examples(self, candidate: Candidate, indices: Sequence[int]) -> Sequence[float]:
        """One score per example of ``indices`` (see the class docstring); implemented with ``examples``."""
        raise NotImplementedError(f"evaluator {self.label} gives no per-example scores")

    def aggregate(self, values: Sequence[float]) -> float | Mapping[str, float] | None:
        """The full score from every example's score (``values[i]``: example ``i``), as ``score`` would
        return it, so a race that used every example needs no second, whole evaluation; None (the
        default, unless ``score_is_mean``): not possible, ``score`` is called. Perplexity: the
        token-weighted mean of its per-sequence losses."""
        return mean_score(values) if self.score_is_mean else None


def run_evaluator(evaluator: Evaluator, candidate: Candidate) -> Score:
    """Call ``evaluator.score`` and normalise the result; any failure becomes an EvaluatorError.

    A plug-in that raises, calls ``sys.exit`` or returns something other than a finite number (or a
    mapping of them) is an error naming the evaluator and the candidate; the plug-in's own text is
    passed through ``redact`` so a token it saw never reaches the terminal. A real stop signal (Ctrl-C,
    SIGTERM: ``soup.signals``) propagates; a ``KeyboardInterrupt`` the plug-in raised is an error.
    """
    return to_score(evaluator, candidate, _call(evaluator, candidate, lambda: evaluator.score(candidate), ""))


def run_aggregate(evaluator: Evaluator, candidate: Candidate, values: Sequence[float]) -> Score | None:
    """``evaluator.aggregate(values)`` normalised as ``run_evaluator`` normalises ``score`` (None: the
    evaluator cannot build its score from per-example scores)."""
    raw = _call(evaluator, candidate, lambda: evaluator.aggregate(values), " (aggregate)")
    return None if raw is None else to_score(evaluator, candidate, raw)


def to_score(evaluator: Evaluator, candidate: Candidate, raw: Any) -> Score:
    """A plug-in's result (a number, or a mapping of metrics with a primary one) as a checked ``Score``."""
    what = f"evaluator {evaluator.label}"
    if isinstance(raw, Mapping):
        metrics = {str(k): _finite(evaluator, candidate, v, str(k)) for k, v in raw.items()}
        primary = evaluator.primary or (next(iter(metrics)) if len(metrics) == 1 else None)
        if primary not in metrics:
            raise EvaluatorError(redact(f"{what} returned metrics {sorted(metrics)} for "
                                        f"{candidate.name} but its primary metric is {primary!r}"))
        return Score(metrics[primary], metrics, primary)
    value = _finite(evaluator, candidate, raw, "score")
    return Score(value, {"score": value}, "score")


def run_examples(evaluator: Evaluator, candidate: Candidate, indices: Sequence[int]) -> list[float]:
    """Call ``evaluator.score_examples`` and check the result: one finite number per index; any failure
    is an EvaluatorError naming the evaluator and the candidate (as ``run_evaluator``)."""
    what = f"evaluator {evaluator.label}"
    raw = _call(evaluator, candidate, lambda: evaluator.score_examples(candidate, list(indices)), " (per-example)")
    try:
        values = list(raw)
    except TypeError:
        raise EvaluatorError(f"{what} returned {type(raw).__name__} from score_examples for {candidate.name}: "
                             "expected one number per example") from None
    if len(values) != len(indices):
        raise EvaluatorError(f"{what} returned {len(values)} per-example scores for {len(indices)} examples "
                             f"({candidate.name})")
    out = [_finite(evaluator, candidate, v, "per-example score") for v in values]
    low, high = evaluator.example_range or (-math.inf, math.inf)  # races bound each difference by it
    if (bad := next(((i, v) for i, v in zip(indices, out) if not low <= v <= high), None)) is not None:
        raise EvaluatorError(f"{what} returned {bad[1]!r} for example {bad[0]} ({candidate.name}), outside its "
                             f"example_range ({low}, {high})")
    return out


def _call(evaluator: Evaluator, candidate: Candidate, call: Callable[[], Any], kind: str) -> Any:
    """``call()``, a plug-in's method: its failures become EvaluatorErrors naming the evaluator and the
    candidate, its text redacted; a real stop signal propagates (see ``run_evaluator``)."""
    what = f"evaluator {evaluator.label}"
    try:
        return call()
    except EvaluatorError as e:
        raise EvaluatorError(redact(f"{what} failed on {candidate.name}{kind}: {e}")) from e
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
        raise EvaluatorError(redact(f"{what} failed on {candidate.name}{kind}: {type(e).__name__}: {e}")) from e


def mean_score(values: Sequence[float]) -> float:
    """The mean of per-example scores, exactly as the scorer computes a ``score_is_mean`` evaluator's
    score (``math.fsum``: correctly rounded, the same whatever the order of summation)."""
    if not values:
        raise ValueError("mean_score of no values")
    return math.fsum(values) / len(values)


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
    """The class an evaluator spec names, with ``args`` checked before anything is built: their names
    against its ``__init__`` (``soup.plugins.check_arguments``), their values and files by its ``validate``.

    Raises:
        EvaluatorError: an unknown name (listing the valid ones), a missing file or class, a bad argument.
    """
    from soup.plugins import check_arguments, load_plugin_class

    cls = load_plugin_class(spec, group=ENTRY_POINT_GROUP, base=Evaluator, kind="evaluator", error=EvaluatorError)
    check_arguments(cls, args, what=f"evaluator {cls.name or cls.__name__}", error=EvaluatorError)
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
