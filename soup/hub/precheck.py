"""Hub ingredients known from their safetensors headers only (HTTP range requests, no weights).

Before gigabytes are downloaded, every ingredient's tensor table is read — local ones from their
headers, hub ones with ``HfApi.get_safetensors_metadata`` at the pinned commit — and checked for
compatibility, so a mismatched fine-tune fails the run in seconds. ``soup inspect hf://...`` uses
the same path and downloads nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import NotASafetensorsRepoError

from soup.io.checkpoint import DTYPES, Checkpoint, TensorInfo, open_checkpoint
from soup.errors import CheckpointError
from soup.io.ingredients import HubOptions, IngredientSpec
from soup.hub.errors import hub_error, retrying
from soup.hub.specs import HUB_PREFIX, hub_endpoint, parse_hub_spec

__all__ = ["header_checkpoint", "precheck"]


def header_checkpoint(spec: IngredientSpec, *, label: str | None = None,
                      hub: HubOptions | None = None) -> Checkpoint | None:
    """A Checkpoint whose table comes from headers only; None when that is not possible (.bin repos)."""
    text = str(spec) if isinstance(spec, (str, Path)) else None
    if text is None:
        return None
    if not text.startswith(HUB_PREFIX):
        return open_checkpoint(Path(text), label=label)
    repo_id, revision = parse_hub_spec(text)
    opts = hub or HubOptions()
    api = HfApi(endpoint=hub_endpoint(opts.endpoint), token=opts.token)
    try:
        sha = retrying(lambda: api.model_info(repo_id, revision=revision).sha)
        meta = retrying(lambda: api.get_safetensors_metadata(repo_id, revision=sha))
    except NotASafetensorsRepoError:
        return None  # pytorch_model*.bin weights: checked after the download
    except Exception as err:
        raise hub_error(err, f"{repo_id}@{revision}" if revision else repo_id, token=opts.token) from None
    tensors: dict[str, TensorInfo] = {}
    digest = hashlib.sha256(sha.encode())
    for fname, fmeta in sorted(meta.files_metadata.items()):
        for name, t in fmeta.tensors.items():
            if t.dtype not in DTYPES:
                raise CheckpointError(f"hf://{repo_id}@{sha[:12]}/{fname}: tensor {name}: unknown dtype {t.dtype!r}")
            tensors[name] = TensorInfo(name, DTYPES[t.dtype], tuple(t.shape), Path(fname), None)
    return Checkpoint(label=label or repo_id.split("/")[-1], source=f"hf://{repo_id}@{sha}", root=None,
                      files=[Path(f) for f in sorted(meta.files_metadata)], tensors=tensors,
                      fingerprint="headers-" + digest.hexdigest(), extra={"repo": repo_id, "revision": sha})


def precheck(specs: Sequence[IngredientSpec], *, labels: Sequence[str | None] | None = None,
             hub: HubOptions | None = None, allow_float_mix: bool = False) -> list[IngredientSpec]:
    """Check hub ingredients' compatibility from headers before anything is downloaded.

    Does nothing unless there is at least one ``hf://`` ingredient among two or more.
    Raises IncompatibleIngredients (or HubError / CheckpointError) exactly as the full check would.

    Returns:
        ``specs`` with the local ingredients it opened replaced by their Checkpoints, so their
        headers are not read a second time.
    """
    def is_hub(s: IngredientSpec) -> bool:
        return isinstance(s, (str, Path)) and str(s).startswith(HUB_PREFIX)

    if len(specs) < 2 or not any(is_hub(s) for s in specs):
        return list(specs)
    labels = list(labels) if labels is not None else [None] * len(specs)
    cks = [header_checkpoint(s, label=lab, hub=hub) for s, lab in zip(specs, labels)]
    known = [c for c in cks if c is not None]
    if len(known) >= 2:
        from soup.engine.plan import check_compatible
        from soup.io.vocab import vocab_indexed_by_name

        # embeddings and heads may differ in rows (added tokens): matched by token once the tokenizers are here
        check_compatible(known, allow_float_mix=allow_float_mix,
                         rows={k for k in known[0].tensors if vocab_indexed_by_name(k)})
    return [ck if ck is not None and not is_hub(s) else s for s, ck in zip(specs, cks)]
