"""MLflow Model Registry: model versions as ingredients, and soups registered back as versions.

``{registry: mlflow, model: NAME, aliases: [...], tags: {...}}`` takes every version of a registered
model (only those holding one of the aliases, when given; only those with all the tags) whose
artifact folder holds an HF-layout checkpoint (at its root or in one subfolder such as ``model/``),
pinned by version number (``models:/NAME/N``, labelled ``NAME-vN``). A version is downloaded once,
into soup's cache folder beside the score cache (``mlflow/<server>/<NAME>/<N>``, renamed into place
when complete), and only when the run needs it: a dry run or an up-to-date check downloads nothing.

``publish: {mlflow: NAME}`` registers each new soup as a version of ``NAME``: the soup folder is
logged as a run's artifacts and the version carries tags naming its ingredients, their scores and
the soup's score. ``soup run --if-changed`` then reads the previous soup from the latest version.

The tracking URI comes from the recipe's ``tracking_uri`` or ``MLFLOW_TRACKING_URI``. mlflow is an
optional extra (``pip install 'soup-merge[mlflow]'``), imported only when a recipe uses it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from soup.errors import SoupError
from soup.registry.base import Context, Event, Pinned, Query, check_keys, one_line, string_list, tracking_uri

__all__ = ["MlflowQuery", "client", "publish_version", "latest_soup"]

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
EXPERIMENT = "soup"  # where publish logs its runs


@dataclass(frozen=True)
class MlflowQuery(Query):
    """Versions of a registered model, filtered by aliases and tags."""

    registry: ClassVar[str] = "mlflow"
    where: str
    model: str  # the registered model's name
    aliases: tuple[str, ...] = ()  # any of these (none: every version)
    tags: tuple[tuple[str, str], ...] = ()  # all of these, as (key, value)

    @classmethod
    def parse(cls, item: Mapping[str, Any], where: str, base: Path, errors: list[str]) -> MlflowQuery | None:
        check_keys(item, {"registry", "model", "aliases", "tags"}, where, errors)
        n = len(errors)
        model = item.get("model")
        if not isinstance(model, str) or not model:
            errors.append(f"{where}.model: the registered model's name is required")
        aliases = string_list(item.get("aliases"), f"{where}.aliases", errors)
        tags = item.get("tags") or {}
        if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, (str, int, float))
                                                 and not isinstance(v, bool) for k, v in tags.items()):
            errors.append(f"{where}.tags: must be a mapping of tag names to values, got {tags!r}")
            tags = {}
        if len(errors) > n:
            return None
        return cls(where=where, model=model, aliases=aliases, tags=tuple(sorted((k, str(v)) for k, v in tags.items())))

    def describe(self) -> str:
        extra = [f"alias {', '.join(self.aliases)}"] if self.aliases else []
        extra += [f"tag {k}={v}" for k, v in self.tags]
        return f"mlflow model {self.model}" + (f" ({'; '.join(extra)})" if extra else "")

    def resolve(self, ctx: Context) -> list[Pinned]:
        uri = _uri(ctx.tracking_uri, self.where)
        c = client(uri)
        try:
            versions = list(c.search_model_versions(f"name = '{_quote(self.model)}'"))
            aliased: set[str] = set()
            if self.aliases and versions:  # search results carry no aliases (MLflow fills them only on single reads):
                held = c.get_registered_model(self.model).aliases or {}  # the model's {alias: version}
                aliased = {str(v) for a, v in held.items() if a in self.aliases}
            found = []
            for mv in sorted(versions, key=lambda v: int(v.version)):
                if self.aliases and str(mv.version) not in aliased:
                    continue
                if any((mv.tags or {}).get(k) != v for k, v in self.tags):
                    continue
                sub = _checkpoint_folder(c, uri, mv)
                if sub is not None:
                    found.append((mv, sub))
        except SoupError:
            raise
        except Exception as err:
            raise SoupError(f"mlflow: {self.describe()} ({self.where}) at {_safe(uri)}: {one_line(err)}") from None
        return [Pinned(f"models:/{self.model}/{mv.version}", f"{self.model}-v{mv.version}", str(mv.version),
                       self.where, fetch=_fetcher(uri, self.model, str(mv.version), sub)) for mv, sub in found]

    def matches(self, event: Event) -> bool:
        return event.registry == "mlflow" and event.name == self.model


def client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri`` (a one-line error when mlflow is not installed)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr is soup's progress
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # stdout is soup's results
    # every request bounded (mlflow's defaults: 120 s per request, 7 retries with backoff up to 120 s, some
    # 15 minutes against a server that never answers); mlflow's retry layer is the only one (soup adds none)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    import logging

    logging.getLogger("mlflow.store.model_registry.abstract_store").setLevel(logging.WARNING)  # "Waiting up to..."
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise SoupError("mlflow registry: mlflow is not installed (pip install 'soup-merge[mlflow]')") from None
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _uri(given: str | None, where: str) -> str:
    uri = tracking_uri(given)
    if uri is None:
        raise SoupError(f"{where}: no MLflow tracking URI: set tracking_uri in the recipe or MLFLOW_TRACKING_URI")
    return uri


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _safe(uri: str) -> str:
    """A tracking URI without credentials (``http://user:pass@host`` -> ``http://***@host``)."""
    scheme, sep, rest = uri.partition("://")
    host = rest.split("/", 1)
    if sep and "@" in host[0]:
        return f"{scheme}://***@{host[0].rsplit('@', 1)[1]}" + (f"/{host[1]}" if len(host) > 1 else "")
    return uri


def _checkpoint_folder(c: Any, uri: str, mv: Any) -> str | None:
    """Where in a version's artifacts the HF checkpoint is: "" (the root), a subfolder, or None."""
    import mlflow.artifacts

    root = c.get_model_version_download_uri(mv.name, mv.version)
    entries = mlflow.artifacts.list_artifacts(artifact_uri=root, tracking_uri=uri)
    names = {Path(e.path).name: e for e in entries}
    if any(n in names for n in WEIGHT_FILES):
        return ""
    for e in entries:
        if e.is_dir:
            inner = mlflow.artifacts.list_artifacts(artifact_uri=f"{root}/{Path(e.path).name}", tracking_uri=uri)
            if any(Path(i.path).name in WEIGHT_FILES for i in inner):
                return Path(e.path).name
    return None


def cache_root() -> Path:
    from soup.soups.cache import default_cache_path

    return Path(os.environ.get("SOUP_MLFLOW_CACHE") or default_cache_path().parent / "mlflow")


def _fetcher(uri: str, model: str, version: str, sub: str):
    def fetch() -> Any:
        from soup.io.checkpoint import open_checkpoint

        folder = download(uri, model, version)
        ck = open_checkpoint(folder / sub if sub else folder, label=f"{model}-v{version}")
        ck.source = f"models:/{model}/{version}"
        return ck

    return fetch


def download(uri: str, model: str, version: str) -> Path:
    """A version's artifacts in the local cache (downloaded once, renamed into place when complete)."""
    import mlflow.artifacts

    server = hashlib.sha256(uri.encode()).hexdigest()[:12]
    dest = cache_root() / server / model / version
    if dest.is_dir():
        return dest
    tmp = dest.parent / f".{version}.part-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        root = client(uri).get_model_version_download_uri(model, version)
        for entry in mlflow.artifacts.list_artifacts(artifact_uri=root, tracking_uri=uri):
            mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/{Path(entry.path).name}", dst_path=str(tmp),
                                                tracking_uri=uri)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # another process won the race with the same files: keep theirs
                raise
    except (SoupError, OSError):  # OSError: the local cache (disk full...), one line from the CLI
        raise
    except Exception as err:
        raise SoupError(f"mlflow: cannot download models:/{model}/{version} from {_safe(uri)}: "
                        f"{one_line(err)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ---- publishing soups as versions, and reading the latest back --------------------------------------


def latest_soup(name: str, uri: str, *, on_unreadable: Any = None) -> tuple[str | None, Any]:
    """``(version, Manifest)`` of the newest version of registered model ``name`` (``(None, None)``
    when it has none; the manifest is None when that version holds no soup.json).

    A soup.json that cannot be read is a ``SoupError`` naming ``models:/NAME/N``; given
    ``on_unreadable(folder, version)`` (which may raise its own error), that is called with the
    downloaded copy instead and the manifest is None."""
    import tempfile

    import mlflow.artifacts

    from soup.io.manifest import MANIFEST, read

    c = client(uri)
    try:
        versions = list(c.search_model_versions(f"name = '{_quote(name)}'"))
        if not versions:
            return None, None
        mv = max(versions, key=lambda v: int(v.version))
        root = c.get_model_version_download_uri(name, mv.version)
        if MANIFEST not in {Path(e.path).name for e in mlflow.artifacts.list_artifacts(artifact_uri=root,
                                                                                       tracking_uri=uri)}:
            return str(mv.version), None
        with tempfile.TemporaryDirectory(prefix="soup-mlflow-") as tmp:
            mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/{MANIFEST}", dst_path=tmp, tracking_uri=uri)
            try:
                return str(mv.version), read(tmp)
            except SoupError as e:
                if on_unreadable is None:
                    reason = str(e).replace(f"{Path(tmp) / MANIFEST}: ", "")
                    raise SoupError(f"models:/{name}/{mv.version}: the published soup.json cannot be read "
                                    f"({reason})") from None
                on_unreadable(Path(tmp), str(mv.version))
                return str(mv.version), None
    except SoupError:
        raise
    except Exception as err:
        raise SoupError(f"mlflow: cannot read the latest version of {name} at {_safe(uri)}: {one_line(err)}") from None


def publish_version(folder: Path, manifest: Any, name: str, uri: str, *, message: str) -> str:
    """Register the soup in ``folder`` as a new version of ``name`` (created if needed); its version number.

    The folder is logged as the artifacts of a run in the ``soup`` experiment; the version's tags name
    the method, the soup's score and each ingredient (source, weight, score, kept); its description is
    ``message`` (what changed).
    """
    c = client(uri)
    try:
        from mlflow.exceptions import MlflowException

        try:
            c.create_registered_model(name)
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(getattr(e, "error_code", "")) and "already exists" not in str(e):
                raise
        exp = c.get_experiment_by_name(EXPERIMENT)
        exp_id = exp.experiment_id if exp is not None else c.create_experiment(EXPERIMENT)
        run = c.create_run(exp_id, run_name=f"soup {name}")
        try:
            c.log_artifacts(run.info.run_id, str(folder), artifact_path="soup")
        except BaseException:
            c.set_terminated(run.info.run_id, status="FAILED")
            raise
        c.set_terminated(run.info.run_id)
        mv = c.create_model_version(name, source=f"{run.info.artifact_uri}/soup", run_id=run.info.run_id,
                                    tags=version_tags(manifest), description=message)
        return str(mv.version)
    except SoupError:
        raise
    except Exception as err:
        raise SoupError(f"mlflow: cannot register the soup as a version of {name} at {_safe(uri)}: "
                        f"{one_line(err)} (the soup is complete in {folder})") from None


def version_tags(manifest: Any) -> dict[str, str]:
    """Tags of a published soup version: method, score, and one ``soup.ingredient.N`` per ingredient."""
    ev = manifest.evaluation
    tags = {"soup.method": manifest.method.name,
            "soup.io.ingredients": str(len(manifest.ingredients)),
            "soup.kept": str(sum(1 for i in manifest.ingredients if i.weight))}
    if ev is not None and ev.soup_score is not None:
        tags["soup.score"] = f"{ev.soup_score:.6g}"
    for k, i in enumerate(manifest.ingredients):
        score = "-" if i.score is None else f"{i.score:.6g}"
        tags[f"soup.ingredient.{k}"] = f"{i.source} weight={i.weight:.6g} score={score}"
    return tags
