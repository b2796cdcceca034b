"""Folder queries: checkpoints on a local or shared filesystem, found by a glob.

``{registry: folder, glob: "runs/*/final"}`` (relative to the recipe) takes every match that holds
weights (a folder in HF layout, or a ``.safetensors`` / ``.bin`` file); a match without weights yet
(a run still training) is skipped. A match still being written (a folder without ``config.json``, an
index naming a shard not there yet, a weight file that changed in the last seconds, or one whose header
cannot be read yet) is left for the next tick with one warning line, so a fine-tune that lands while
soup looks never fails the tick. Each is pinned by its content fingerprint (file names, sizes,
mtimes and headers, as for any local ingredient). Its label is the part of the path the wildcards
matched (``runs/ocr/final`` -> ``ocr``), so a new run never renames the others.
"""

from __future__ import annotations

import glob as globlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from soup.registry.base import Context, Event, Pinned, Query, check_keys

__all__ = ["FolderQuery"]

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
SETTLE = 1.0  # seconds a weight file must stay unchanged to count as written


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
        from soup.errors import CheckpointError
        from soup.io.checkpoint import open_checkpoint
        from soup.progress import Reporter

        pinned = []
        matches = [m for m in sorted(Path(m) for m in globlib.glob(str(self.pattern), recursive=True))
                   if _has_weights(m)]
        unfinished = _unfinished(matches)
        for match in matches:
            label = self._label(match)
            why = unfinished.get(match)
            if why is None:
                try:
                    pinned.append(Pinned(str(match), label, open_checkpoint(match, label=label).fingerprint,
                                         self.where))
                    continue
                except CheckpointError as e:
                    why = f"not readable yet ({e})"
            Reporter().warn(f"{self.where}: {match}: {why}: still being written? left for the next run")
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


def _unfinished(matches: list[Path]) -> dict[Path, str]:
    """The matches that look still being written, with why: a folder without ``config.json``, an index
    naming a shard not there yet, a weight file whose size or mtime changed within ``SETTLE`` seconds
    (files written moments ago are looked at again once, when the last of them is ``SETTLE`` old)."""
    why: dict[Path, str] = {}
    files: dict[Path, list[Path]] = {}
    for path in matches:
        found = _weight_files(path)
        if isinstance(found, str):
            why[path] = found
        else:
            files[path] = found
    before = {f: _stamp(f) for fs in files.values() for f in fs}
    newest = max((mtime for _, mtime in before.values()), default=0) / 1e9
    if newest > time.time() - SETTLE:
        time.sleep(max(0.0, newest + SETTLE - time.time()))
        for path, fs in files.items():
            if any(_stamp(f) != before[f] for f in fs):
                why[path] = "its weights are still changing"
    return why


def _weight_files(path: Path) -> list[Path] | str:
    """A match's weight files (an index's shards included), or why it is not complete yet."""
    if not path.is_dir():
        return [path]
    if not (path / "config.json").is_file():
        return "no config.json yet"
    files = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
    for index in [f for f in files if f.name.endswith(".index.json")]:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{index.name} is not complete yet"
        missing = [s for s in shards if not (path / str(s)).is_file()]
        if missing:
            return f"{index.name} names {missing[0]}, not there yet"
        files += [path / str(s) for s in shards]
    return files


def _stamp(file: Path) -> tuple[int, int]:
    try:
        st = file.stat()
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def _has_weights(path: Path) -> bool:
    if path.is_dir():
        return any((path / name).is_file() for name in WEIGHT_FILES)
    return path.is_file() and path.suffix in (".safetensors", ".bin")
