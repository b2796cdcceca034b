"""Folder queries: checkpoints on a local or shared filesystem, found by a glob.

``{registry: folder, glob: "runs/*/final"}`` (relative to the recipe) takes every match that holds
weights (a folder in HF layout, or a ``.safetensors`` / ``.bin`` file); a match without weights yet
(a run still training) is skipped. Each is pinned by its content fingerprint (file names, sizes,
mtimes and headers, as for any local ingredient). Its label is the part of the path the wildcards
matched (``runs/ocr/final`` -> ``ocr``), so a new run never renames the others.
"""

from __future__ import annotations

import glob as globlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from soup.registry.base import Context, Event, Pinned, Query, check_keys

__all__ = ["FolderQuery"]

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")


@dataclass(frozen=True)
class FolderQuery(Query):
    """Checkpoints matching a glob (absolute, or relative to the recipe's folder)."""

    registry: ClassVar[str] = "folder"
    where: str
    glob: str  # as written
    base: Path  # the recipe's folder

    @classmethod
    def parse(cls, item: Mapping[str, Any], where: str, base: Path, errors: list[str]) -> FolderQuery | None:
        check_keys(item, {"registry", "glob"}, where, errors)
        pattern = item.get("glob")
        if not isinstance(pattern, str) or not pattern:
            errors.append(f"{where}.glob: a glob is required, e.g. runs/*/final")
            return None
        return cls(where=where, glob=pattern, base=base)

    def describe(self) -> str:
        return f"folders matching {self.glob}"

    @property
    def pattern(self) -> Path:
        p = Path(self.glob).expanduser()
        return p if p.is_absolute() else self.base / p

    def resolve(self, ctx: Context) -> list[Pinned]:
        from soup.io.checkpoint import open_checkpoint

        pinned = []
        for match in sorted(Path(m) for m in globlib.glob(str(self.pattern), recursive=True)):
            if not _has_weights(match):
                continue
            label = self._label(match)
            pinned.append(Pinned(str(match), label, open_checkpoint(match, label=label).fingerprint, self.where))
        return pinned

    def _label(self, match: Path) -> str:
        parts = self.pattern.parts
        fixed = next((i for i, p in enumerate(parts) if globlib.has_magic(p)), len(parts))
        rel = match.parts[fixed:]
        rest = parts[fixed:]
        if "**" not in rest and len(rel) == len(rest):
            wild = [m for m, p in zip(rel, rest) if globlib.has_magic(p)]
            if wild:
                return "/".join(wild)
        return "/".join(rel) or match.name

    def matches(self, event: Event) -> bool:
        return False  # a filesystem sends no webhooks: the schedule finds new runs


def _has_weights(path: Path) -> bool:
    if path.is_dir():
        return any((path / name).is_file() for name in WEIGHT_FILES)
    return path.is_file() and path.suffix in (".safetensors", ".bin")
