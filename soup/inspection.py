"""``inspect``: what a checkpoint holds, and whether several checkpoints can be souped together.

Reads headers only (via ``open_checkpoint``), never tensor data.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from .checkpoint import Checkpoint
from .ingredients import IngredientSpec, resolve_all

__all__ = ["inspect"]


def inspect(path: IngredientSpec, *more: IngredientSpec, max_differences: int = 20) -> dict[str, Any]:
    """Summarise one checkpoint, or compare several (hub repos from their headers alone).

    Returns:
        One path: ``{"name", "source", "tensors", "parameters", "bytes", "dtypes", "files", "fingerprint"}``.
        Several: ``{"ingredients": [summary, ...], "compatible": bool, "differences": [...]}`` where each
        difference is ``{"tensor", "issue", "values": {ingredient: value}}`` (at most ``max_differences``).

    Raises:
        CheckpointError: a path is missing or corrupt.
    """
    from .hub.precheck import header_checkpoint

    # hub repos are described from their safetensors headers (range requests): nothing is downloaded
    specs = [path, *more]
    cks = resolve_all([(header_checkpoint(s) or s) if str(s).startswith("hf://") else s for s in specs])
    if not more:
        return _summary(cks[0])
    diffs = _differences(cks)
    return {"ingredients": [_summary(c) for c in cks], "compatible": not diffs,
            "differences": diffs[:max_differences], "difference_count": len(diffs)}


def _summary(ck: Checkpoint) -> dict[str, Any]:
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in ck.tensors.values())
    files = Counter()
    for t in ck.tensors.values():
        files[t.file.name if t.file is not None else "memory"] += t.nbytes
    return {"name": ck.label, "source": ck.source, "tensors": len(ck.tensors),
            "parameters": sum(t.numel for t in ck.tensors.values()), "bytes": ck.total_bytes,
            "dtypes": dict(dtypes), "files": {f: files[f] for f in sorted(files)},
            "fingerprint": ck.fingerprint}


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

