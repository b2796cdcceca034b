"""lm-eval tasks named by a recipe: task names, groups and local task YAMLs, found with lm-eval's own
``TaskManager`` (only the local folder indexed when every task is local), and the digest of the local
task files and their data that goes into the evaluator's identity (an edited task is re-evaluated).
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from soup.errors import EvaluatorError

__all__ = ["is_yaml", "task_manager", "read_yaml", "tasks_digest", "data_files"]


_YAML_SUFFIXES = (".yaml", ".yml")


def is_yaml(spec: str) -> bool:
    return spec.endswith(_YAML_SUFFIXES)


def task_manager(task_manager_cls: Any, tasks: list[str], includes: list[Path]) -> Any:
    """A TaskManager that knows every task named; an unknown name is an error now, before any work.

    lm-eval's own index (thousands of YAMLs, seconds to build) is left out when every task named is
    local: a task YAML path, or a task found in ``include_path``, or a group there whose tasks are.
    """
    for spec in tasks:
        if is_yaml(spec) and not Path(spec).is_file():
            raise EvaluatorError(f"lm-eval: task YAML not found: {spec}")
    local = None
    try:
        local = task_manager_cls(include_path=[str(p) for p in includes] or None, include_defaults=False)
    except TypeError:  # an lm-eval without include_defaults: always the full index
        pass

    def is_local(spec: str, depth: int = 0) -> bool:
        if is_yaml(spec):
            return "group" not in read_yaml(Path(spec))
        if spec in local.all_subtasks:
            return True
        if spec not in local.all_groups or depth > 8:
            return False  # a tag, or a name only lm-eval's index knows
        path = getattr(local.task_index.get(spec), "yaml_path", None)
        children = read_yaml(Path(path)).get("task") if path else None
        children = [children] if isinstance(children, str) else children
        return (isinstance(children, list) and bool(children)
                and all(isinstance(c, str) and is_local(c, depth + 1) for c in children))

    if local is not None and all(is_local(s) for s in tasks):
        return local
    try:
        manager = task_manager_cls(include_path=[str(p) for p in includes] or None)
    except Exception as e:
        raise EvaluatorError(f"lm-eval: cannot index the tasks: {type(e).__name__}: {e}") from e
    known = set(manager.all_tasks)
    for spec in tasks:
        if not is_yaml(spec) and spec not in known:
            close = difflib.get_close_matches(spec, sorted(known), n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise EvaluatorError(f"lm-eval: unknown task {spec!r} (not an lm-eval task, group or tag, "
                                 f"nor in include_path){hint}")
    return manager


def read_yaml(path: Path) -> dict[str, Any]:
    """A task YAML as a mapping, lm-eval's ``!function`` tags read as None; {} if unreadable."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # a SafeLoader subclass
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def tasks_digest(tasks: list[str], includes: list[Path]) -> str:
    """sha256 over the local task files: every YAML and ``.py`` under ``include_path``, the YAML paths
    named, the files they ``include:``, and the local files their ``dataset_kwargs.data_files`` name."""
    files: dict[str, Path] = {}

    def add_yaml(path: Path, depth: int = 0) -> None:
        files[str(path.resolve())] = path
        cfg = read_yaml(path)
        inc = cfg.get("include")
        if isinstance(inc, str) and depth < 8:
            target = path.parent / inc
            if target.is_file() and str(target.resolve()) not in files:
                add_yaml(target, depth + 1)
        for data in data_files(cfg):
            if Path(data).is_file():  # relative paths: as the datasets library reads them (cwd)
                files[str(Path(data).resolve())] = Path(data)

    for folder in includes:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix in (*_YAML_SUFFIXES, ".py"):
                if path.suffix == ".py":
                    files[str(path.resolve())] = path
                else:
                    add_yaml(path)
    for spec in tasks:
        if is_yaml(spec):
            add_yaml(Path(spec))
    h = hashlib.sha256()
    for key in sorted(files):
        h.update(key.encode() + b"\0" + hashlib.sha256(files[key].read_bytes()).digest())
    return h.hexdigest()


def data_files(cfg: Mapping[str, Any]) -> list[str]:
    """The paths a task config's ``dataset_kwargs.data_files`` names (a string, list or mapping)."""
    kwargs = cfg.get("dataset_kwargs")
    value = kwargs.get("data_files") if isinstance(kwargs, Mapping) else None
    values = list(value.values()) if isinstance(value, Mapping) else [value]
    out: list[str] = []
    for v in values:
        out += [x for x in (v if isinstance(v, list) else [v]) if isinstance(x, str)]
    return out

