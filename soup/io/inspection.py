"""``inspect``: what a checkpoint holds, its components, and whether several can be souped together.

Without ``diff`` only headers are read (via ``open_checkpoint``; hub repos by range requests), never
tensor data. Tensors are grouped into components by name (``soup.io.components``: vision towers,
connector, language model, LoRA pairs, embeddings, head). With ``diff`` the data of every ingredient is
read once, block by block, and each component is reported identical in every ingredient (frozen) or
differing (with its relative distance from the first ingredient); identical components become
suggested ``take:0`` rules.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from soup.io.checkpoint import Checkpoint, common_prefix, strip_names
from soup.engine.combine import BLOCK_ELEMENTS, same_bits
from soup.io.components import group, suggest_rules
from soup.errors import RecipeError
from soup.io.ingredients import IngredientSpec, resolve_all, with_reading
from soup.progress import Reporter, RichReporter
from soup.engine.stream import TensorReader

__all__ = ["inspect"]


def inspect(path: IngredientSpec, *more: IngredientSpec, max_differences: int = 20, diff: bool = False,
            key: str | None = None, strip_prefix: str | None = None,
            progress: bool | Reporter = False, state_dict_key: str | None = None) -> dict[str, Any]:
    """Summarise one checkpoint, or compare several (hub repos from their headers alone).

    Args:
        path, more: checkpoints (folders, weight files, ``hf://`` specs, ``Ingredient``s).
        max_differences: how many incompatible tensors to list.
        diff: read the data and report, per component, whether the ingredients are identical;
            hub ingredients are then downloaded.
        key, strip_prefix: how to read torch files (see ``soup.Ingredient``: the same names as its
            ``key`` and the CLI's ``--key``), for every path; ``state_dict_key``: ``key``'s older name.
        progress: a progress bar on stderr while ``diff`` reads.

    Returns:
        One path: ``{"name", "source", "tensors", "parameters", "bytes", "dtypes", "files", "fingerprint",
        "prefix", "components", "lora_pairs"}``; ``lora_pairs`` lists likely LoRA pairs as
        ``{"a", "b", "pairs", "example"}`` (the ``--lora-pair`` globs that soup them as deltas); ``prefix`` is a first name component shared by every tensor
        (``"module."``) or None; each component is ``{"kind", "name", "patterns", "tensors", "parameters",
        "bytes"}``.
        Several: ``{"ingredients": [summary, ...], "compatible": bool, "differences": [...],
        "components": [...]}`` where each difference is ``{"tensor", "issue", "values": {ingredient: value}}``
        (at most ``max_differences``). With ``diff``, components add ``"status"`` (``identical``,
        ``differs`` or ``partly identical``), ``"identical_tensors"`` and ``"distance"``
        (``{ingredient: ||x_i - x_0|| / ||x_0||}`` over the component), and ``"suggested_rules"`` lists
        ``PATTERN=take:0`` rules for the identical components.

    Raises:
        CheckpointError: a path is missing or corrupt.
        RecipeError: ``diff`` with a single path.
    """
    from soup.hub.precheck import header_checkpoint

    if key is not None and state_dict_key is not None:
        raise RecipeError("inspect: key given twice (state_dict_key is its older name)")
    specs = with_reading([path, *more], key=key if key is not None else state_dict_key, strip_prefix=strip_prefix)
    if diff and not more:
        raise RecipeError("--diff: give at least two checkpoints to compare")
    if diff:  # the data is read: hub repos are downloaded
        cks = resolve_all(specs)
    else:  # hub repos are described from their safetensors headers (range requests): nothing is downloaded
        cks = resolve_all([_from_headers(s, header_checkpoint) for s in specs])
    components = group(cks[0].tensors)
    listed = [_component(c) for c in components]
    pairs = _lora_pairs(cks[0].tensors)
    if not more:
        return {**_summary(cks[0]), "components": listed, "lora_pairs": pairs}
    diffs = _differences(cks)
    report = {"ingredients": [_summary(c) for c in cks], "compatible": not diffs,
              "differences": diffs[:max_differences], "difference_count": len(diffs), "components": listed,
              "lora_pairs": pairs, "vocabulary": _vocabulary(cks)}
    if diff:
        reporter = progress if isinstance(progress, Reporter) else (RichReporter() if progress else Reporter())
        identical, dist2, norm2 = _compare(cks, reporter)
        for entry, comp in zip(listed, components):
            same = sum(t in identical for t in comp.tensors)
            entry["status"] = ("identical" if same == len(comp.tensors) else
                               "partly identical" if same else "differs")
            entry["identical_tensors"] = same
            base = math.sqrt(sum(norm2.get(t, 0.0) for t in comp.tensors))
            entry["distance"] = {ck.label: (math.sqrt(sum(dist2[t][i] for t in comp.tensors if t in dist2)) / base
                                            if base else None) for i, ck in enumerate(cks[1:])}
        report["suggested_rules"] = suggest_rules(components, identical, cks[0].tensors)
    return report


def _vocabulary(cks: Sequence[Checkpoint]) -> dict[str, Any] | None:
    """When the ingredients' vocabularies differ: the union soup's vocabulary (``VocabPlan.record``: the
    tokens each ingredient adds, the vocabulary-indexed tensors); a refusal as ``{"error": line}``."""
    from soup.errors import SoupError
    from soup.io.vocab import plan_vocab

    try:
        plan = plan_vocab(cks, "union", n=len(cks))
    except SoupError as e:
        return {"error": str(e)}
    return None if plan is None else dict(plan.record([c.label for c in cks]), tensors=sorted(plan.names))


def _lora_pairs(names) -> list[dict[str, Any]]:
    """Likely LoRA pairs (``lora_A``/``lora_B``, ``Plora_A``/``Plora_B``) grouped by the ``--lora-pair``
    that would soup them as deltas: ``{"a", "b", "pairs", "example"}``."""
    from soup.adapters.pairs import likely_pairs, suggest_pattern

    found: dict[tuple[str, str], dict[str, Any]] = {}
    for a, b in likely_pairs(list(names)):
        pa, pb = suggest_pattern(a, b)
        entry = found.setdefault((pa, pb), {"a": pa, "b": pb, "pairs": 0, "example": [a, b]})
        entry["pairs"] += 1
    return list(found.values())


def _from_headers(spec: IngredientSpec, header_checkpoint) -> IngredientSpec:
    """A hub spec as a Checkpoint read from its safetensors headers (None-able: then downloaded)."""
    if not str(spec).startswith("hf://"):
        return spec
    ck = header_checkpoint(str(spec))
    prefix = getattr(spec, "strip_prefix", None)
    if ck is not None and prefix:
        ck.tensors = strip_names(ck.tensors, prefix, ck.source)
    return ck or spec


def _component(comp) -> dict[str, Any]:
    return {"kind": comp.kind, "name": comp.name, "patterns": list(comp.patterns), "tensors": len(comp.tensors),
            "parameters": comp.parameters, "bytes": comp.bytes}


def _summary(ck: Checkpoint) -> dict[str, Any]:
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in ck.tensors.values())
    files = Counter()
    for t in ck.tensors.values():
        files[t.file.name if t.file is not None else "memory"] += t.nbytes
    return {"name": ck.label, "source": ck.source, "tensors": len(ck.tensors),
            "parameters": sum(t.numel for t in ck.tensors.values()), "bytes": ck.total_bytes,
            "dtypes": dict(dtypes), "files": {f: files[f] for f in sorted(files)},
            "fingerprint": ck.fingerprint, "prefix": common_prefix(ck.tensors)}


def _compare(cks: Sequence[Checkpoint], reporter: Reporter
             ) -> tuple[set[str], dict[str, list[float]], dict[str, float]]:
    """Read every ingredient once: the tensors bit-identical in all of them, and for float tensors the
    squared distance of each other ingredient from the first and the first's squared norm."""
    first = cks[0]
    names = [n for n, t in first.tensors.items()
             if all(n in c.tensors and c.tensors[n].shape == t.shape and c.tensors[n].dtype == t.dtype
                    for c in cks[1:])]
    readers = [TensorReader(ck) for ck in cks]
    identical: set[str] = set()
    dist2: dict[str, list[float]] = {}
    norm2: dict[str, float] = {}
    total = sum(c.tensors[n].nbytes for n in names for c in cks)
    try:
        with reporter.bytes_task(f"comparing {len(names)} tensors", total) as advance:
            for name in names:
                info = first.tensors[name]
                views = [r.view(name) for r in readers]
                same, floating = True, info.dtype.is_floating_point
                d2, n2 = [0.0] * (len(cks) - 1), 0.0
                for start in range(0, info.numel, BLOCK_ELEMENTS):
                    stop = min(start + BLOCK_ELEMENTS, info.numel)
                    x0 = views[0][start:stop]
                    equal = [same_bits(x0, v[start:stop]) for v in views[1:]]
                    same = same and all(equal)
                    if floating:
                        a = x0.to(torch.float64)
                        n2 += float(torch.dot(a, a))
                        for i, (v, eq) in enumerate(zip(views[1:], equal)):
                            if not eq:
                                d = v[start:stop].to(torch.float64) - a
                                d2[i] += float(torch.dot(d, d))
                    advance((stop - start) * info.dtype.itemsize * len(cks))
                if same:
                    identical.add(name)
                if floating:
                    dist2[name], norm2[name] = d2, n2
    finally:
        for r in readers:
            r.close()
    return identical, dist2, norm2


def _differences(cks: list[Checkpoint]) -> list[dict[str, Any]]:
    names = list(dict.fromkeys(n for c in cks for n in c.tensors))
    diffs = []
    for name in names:
        infos = {c.label: c.tensors.get(name) for c in cks}
        if any(i is None for i in infos.values()):
            diffs.append({"tensor": name, "issue": "missing",
                          "values": {k: ("present" if v else "missing") for k, v in infos.items()}})
        elif len({i.shape for i in infos.values()}) > 1:
            diffs.append({"tensor": name, "issue": "shape", "values": {k: list(v.shape) for k, v in infos.items()}})
        elif len({i.dtype for i in infos.values()}) > 1:
            diffs.append({"tensor": name, "issue": "dtype",
                          "values": {k: str(v.dtype).removeprefix("torch.") for k, v in infos.items()}})
    return diffs


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"

