"""Adapter soups: PEFT LoRA adapters souped as the weighted sum of their deltas, never factor by factor.

``adapter_soup(adapters, out)`` reads LoRA adapters (``soup.adapters.peft_io``) and writes their soup
``D = sum_i w_i * s_i * B_i @ A_i`` per module (``soup.adapters.lora``), one of three ways:

- default: **one adapter of rank sum r_i**, exact (A stacked, B concatenated with ``w_i * s_i``
  folded in, ``lora_alpha = r`` so the scaling is 1, rsLoRA off), loadable with peft;
- ``rank=R``: the best rank-R adapter of each module's ``D`` (truncated SVD); each module's relative
  Frobenius error is measured and reported (``result.errors``, ``soup.json``), and the worst;
- ``merge_into=BASE``: full weights ``W = W0 + D`` (``W0`` from the base checkpoint), streamed tensor
  by tensor like any soup (one module's delta in memory at a time), HF-loadable, with the base's
  config and tokenizer files.

Other adapter tensors (``modules_to_save``) are weighted means, computed by the engine's
``Combiner`` (the same float32 arithmetic as every soup). The output goes through the same
machinery as ``soup.merge``: ``OutputDir`` (locked, temp folder, renamed into place), the shard
writer, ``soup.json`` written last.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soup.adapters import lora
from soup.engine.combine import Combiner
from soup.merging import MergeResult, _manifest
from soup.errors import CheckpointError, RecipeError, SoupError, os_error_line
from soup.io.ingredients import HubOptions, IngredientSpec, resolve
from soup.io.manifest import Method, Selection
from soup.options import MergeOptions, check_option_names
from soup.engine.output import OutputDir, checkpoint_paths, input_paths
from soup.adapters.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Adapter, LoraModule, check_adapters, open_adapter
from soup.adapters.peft_io import NOT_BY_TOKEN, base_tensor, first_difference, vocab_tensors
from soup.io.vocab import read_vocab
from soup.engine.plan import Job, Plan, normalise_weights
from soup.progress import Reporter, RichReporter
from soup.signals import graceful
from soup.engine.sinks import MemorySink
from soup.engine.stream import TensorReader
from soup.engine.writer import ShardWriter, copy_aux_files, write_manifest

__all__ = ["adapter_soup", "AdapterResult"]

REFERENCE = "https://arxiv.org/abs/2203.05482"
_ONE_FILE = 1 << 62  # an adapter is one safetensors file, whatever its size


@dataclass
class AdapterResult(MergeResult):
    """A merge result plus, for ``rank=R``, each module's relative Frobenius error ``||D - D_R|| / ||D||``."""

    errors: dict[str, float] = field(default_factory=dict)

    @property
    def worst(self) -> tuple[str, float] | None:
        """The module with the largest error, and that error (None when nothing was truncated)."""
        return max(self.errors.items(), key=lambda kv: kv[1]) if self.errors else None


def adapter_soup(
    adapters: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    weights: Sequence[float] | None = None,
    merge_into: IngredientSpec | None = None,
    rank: int | None = None,
    overwrite: bool = False,
    progress: bool | Reporter = False,
    labels: Sequence[str | None] | None = None,
    hub: HubOptions | None = None,
    selection: Selection | None = None,
    **option_values: Any,
) -> AdapterResult:
    """Soup PEFT LoRA adapters exactly: as one adapter (rank concatenation), a rank-R adapter, or full weights.

    Args:
        adapters: adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``).
        out: output folder; None returns the soup in memory (``result.state_dict``).
        weights: one per adapter (default uniform), normalised to sum to 1 unless ``normalize=False``.
        merge_into: a base checkpoint (folder, file, ``hf://``): write full weights ``W0 + D``.
        rank: write the best rank-``rank`` adapter of each module's delta (not with ``merge_into``).
        overwrite, progress, labels, hub: as for ``soup.merge``.
        option_values: ``dtype``, ``accumulate``, ``shard_size`` (full weights only), ``device``,
            ``normalize`` (see ``soup.merge``).

    Returns:
        AdapterResult: path (or state dict), manifest, and ``errors`` per module for ``rank``.

    Raises:
        SoupError: a bad option (RecipeError), an adapter that cannot be read or souped
            (CheckpointError), adapters or a base that do not fit (IncompatibleIngredients).

    Example::

        soup.adapter_soup(["runs/lora-chat", "runs/lora-math"], "runs/soup-lora")          # one adapter
        soup.adapter_soup(["runs/lora-chat", "runs/lora-math"], "runs/soup", merge_into="base")  # full weights
    """
    t0 = time.perf_counter()
    allowed = ("dtype", "accumulate", "shard_size", "device", "normalize")
    check_option_names(option_values, allowed, where="adapter_soup")
    opts = MergeOptions(**option_values)
    if not adapters:
        raise RecipeError("adapters: give at least one adapter folder")
    if weights is not None:
        weights = normalise_weights(weights, len(adapters), normalize=opts.normalize)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise RecipeError(f"rank: {rank!r} must be a positive integer")
    if rank is not None and merge_into is not None:
        raise RecipeError("rank: a rank applies to an adapter output; with merge_into the full delta is merged")
    from soup.merging import _check_device

    _check_device(str(opts.device))
    reporter = progress if isinstance(progress, Reporter) else (RichReporter() if progress else Reporter())
    protect = input_paths([*adapters, *([merge_into] if merge_into is not None else [])])
    owned = not isinstance(out, OutputDir)  # an OutputDir from the caller is locked and released by it
    output = out if not owned else OutputDir(out, overwrite=overwrite, protect=protect) if out is not None else None
    if not owned:
        output.protect(protect)
    with graceful():
        try:
            if output is not None and owned:
                output.lock(warn=reporter.warn)
            return _soup(adapters, output, opts, weights=weights, merge_into=merge_into, rank=rank,
                         labels=labels, hub=hub, reporter=reporter, t0=t0, selection=selection)
        except OSError as e:
            raise SoupError(f"output {output.given if output else '-'}: {os_error_line(e)}") from e
        finally:
            if output is not None and owned:
                output.release()


def open_adapters(adapters: Sequence[str | Path], labels: Sequence[str | None] | None = None) -> list[Adapter]:
    """Open and check adapters (unique labels, as for checkpoints)."""
    labels = list(labels) if labels is not None else [None] * len(adapters)
    opened = [open_adapter(a, label=lab) for a, lab in zip(adapters, labels)]
    seen = Counter(a.label for a in opened)
    for i, a in enumerate(opened):
        if seen[a.label] > 1:
            a.label = a.checkpoint.label = f"{a.label}#{i}"
    check_adapters(opened)
    return opened


class _Soup:
    """The jobs of one adapter soup and their output blocks (a ``Produce`` for any sink)."""

    def __init__(self, ads: list[Adapter], weights: tuple[float, ...], opts: MergeOptions, *,
                 base=None, rank: int | None = None, warn=print, full_rank: bool = False) -> None:
        self.ads, self.weights, self.base, self.rank = ads, weights, base, rank
        self.acc = opts.accumulate_dtype
        self.used = [i for i, w in enumerate(weights) if w != 0.0]
        if not self.used:
            raise RecipeError("weights: every weight is zero")
        if full_rank:  # every adapter's block, zero-weight ones zeroed: the rank (and shapes) never change
            self.used = list(range(len(ads)))
        first = ads[0]
        self.transpose = bool(first.config.get("fan_in_fan_out"))
        self.sources = [a.checkpoint for a in ads] + ([base] if base is not None else [])
        self.readers = [TensorReader(ck) for ck in self.sources]
        self.combiner = Combiner([ck.label for ck in self.sources], where=self._where, accumulate=self.acc,
                                 device=str(opts.device), warn=warn)
        self.device = str(opts.device)
        self.names: dict[str, list[str | None]] = {}  # job name -> the tensor read from each source
        self.lora: dict[str, tuple[str, LoraModule]] = {}  # job name -> ("merge" | "A" | "B", module)
        self.pending: dict[str, torch.Tensor] = {}  # truncated factors waiting for their job
        self.errors: dict[str, float] = {}
        self.jobs = self._merge_jobs(opts.torch_dtype) if base is not None else self._adapter_jobs(opts.torch_dtype)

    # --- planning (headers only) ------------------------------------------------------------------

    def _adapter_jobs(self, dtype: torch.dtype | None) -> list[Job]:
        first, jobs = self.ads[0], []
        by_tensor = {m.a: ("A", m) for m in first.modules.values()} | {m.b: ("B", m) for m in first.modules.values()}
        for name, info in first.checkpoint.tensors.items():
            out = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
            if name in by_tensor:
                which, m = by_tensor[name]
                k = self.module_rank(m)
                shape = (k, m.shape[1]) if which == "A" else (m.shape[0], k)
                jobs.append(Job(name, shape, f"lora_{which}", out))
                self.lora[name] = (which, m)
            else:
                jobs.append(self._other_job(name, name, info, out))
        return jobs

    def _merge_jobs(self, dtype: torch.dtype | None) -> list[Job]:
        first, base, n = self.ads[0], self.base, len(self.ads)
        targets = {m.weight: m for m in first.modules.values()}
        others = {first.base_name(t): t for t in first.others}
        rows = vocab_tensors(first)  # tensors with a row per token: a resized vocabulary is refused first
        for aname, count in rows.items():
            info = base.tensors.get(base_tensor(aname))
            if count is not None and info is not None and info.shape and info.shape[0] != count:
                raise CheckpointError(f"adapter {first.label}: tensor {aname} has {count} rows but "
                                      f"{base_tensor(aname)} has {info.shape[0]} in the base {base.label} (embeddings "
                                      f"resized to another vocabulary): {NOT_BY_TOKEN}")
        vb, va = (read_vocab(base.root), read_vocab(first.root)) if rows else (None, None)
        if vb is not None and va is not None and vb.tokens != va.tokens:  # the output gets the base's tokenizer
            i, t0, t1 = first_difference(vb, va)
            raise CheckpointError(f"adapter {first.label}: tensor {min(rows)}: its tokenizer is not the base "
                                  f"{base.label}'s (id {i} is {t1!r} there, {t0!r} in the base): {NOT_BY_TOKEN}")
        for m in first.modules.values():
            info = base.tensors.get(m.weight)
            want = m.shape[::-1] if self.transpose else m.shape
            if info is None:
                raise CheckpointError(f"module {m.name}: the base {base.label} has no tensor {m.weight} "
                                      "(is it the adapters' base model?)")
            if info.shape != tuple(want):
                raise CheckpointError(f"module {m.name}: the delta is {list(want)} but {m.weight} is "
                                      f"{list(info.shape)} in the base {base.label}")
        for bname, aname in others.items():
            info = base.tensors.get(bname)
            if info is None or info.shape != first.checkpoint.tensors[aname].shape:
                what = "has no such tensor" if info is None else f"has shape {list(info.shape)}"
                raise CheckpointError(f"adapter {first.label}: tensor {aname} (modules_to_save): the base "
                                      f"{base.label} {what}")
        jobs = []
        for name, info in base.tensors.items():
            floating = info.dtype.is_floating_point
            out = dtype if dtype is not None and floating else info.dtype
            if name in targets:
                if not floating:
                    raise CheckpointError(f"module {targets[name].name}: {name} is {info.dtype} in the base "
                                          f"{base.label}, not a float weight (quantised bases are not supported)")
                jobs.append(Job(name, info.shape, "lora_merge", out))
                self.lora[name] = ("merge", targets[name])
            elif name in others:
                jobs.append(self._other_job(name, others[name], base.tensors[name], out))
            else:
                jobs.append(Job(name, info.shape, "take", out, source=n))
                self.names[name] = [None] * n + [name]
        return jobs

    def _other_job(self, name: str, stored: str, info, out: torch.dtype) -> Job:
        """A ``modules_to_save`` tensor: the weighted mean over the adapters."""
        self.names[name] = [stored] * len(self.ads) + ([None] if self.base is not None else [])
        w = tuple(self.weights) + ((0.0,) if self.base is not None else ())
        if not info.dtype.is_floating_point:
            return Job(name, info.shape, "take", out, source=0)
        if len(self.used) == 1 and w[self.used[0]] == 1.0:
            return Job(name, info.shape, "take", out, source=self.used[0])
        return Job(name, info.shape, "mean", out, weights=w)

    def module_rank(self, m: LoraModule) -> int:
        """The output rank of a module: sum of the used adapters' ranks, or the truncation rank."""
        total = sum(self.ads[i].modules[m.name].rank for i in self.used)
        return total if self.rank is None else min(self.rank, total, *m.shape)

    # --- computing ----------------------------------------------------------------------------------

    def produce(self, job: Job) -> Iterator[torch.Tensor]:
        kind = self.lora.get(job.name)
        if kind is None:
            views = [r.view(n) if n is not None else None for r, n in zip(self.readers, self.names[job.name])]
            yield from self.combiner.blocks(job, views)
            return
        which, m = kind
        if which == "merge":
            yield self._merged(job, m).reshape(-1)
            return
        if job.name not in self.pending:
            self._factors(m, job.out_dtype)
        yield self.pending.pop(job.name).reshape(-1)

    def terms(self, m: LoraModule) -> list[lora.Term]:
        """(A_i, B_i, w_i * s_i) of the used adapters, as views of their files."""
        out = []
        for i in self.used:
            mi = self.ads[i].modules[m.name]
            r = self.readers[i]
            a = r.view(mi.a).reshape(mi.rank, m.shape[1])
            b = r.view(mi.b).reshape(m.shape[0], mi.rank)
            out.append((a, b, self.weights[i] * mi.scaling))
        return out

    def _merged(self, job: Job, m: LoraModule) -> torch.Tensor:
        """W0 + D for one module, in the accumulation dtype, cast to the output dtype."""
        terms = self.terms(m)
        d = lora.delta(terms, dtype=self.acc, device=self.device)  # (out, in)
        if self.transpose:
            d = d.T
        w0 = self.readers[-1].view(job.name).reshape(job.shape)
        d.add_(w0.to(device=self.device, dtype=self.acc))
        out = d.to(job.out_dtype)
        if not bool(torch.isfinite(out).all()):
            self._nonfinite(m, terms, f"tensor {job.name}", w0)
        return out.contiguous()

    def _factors(self, m: LoraModule, dtype: torch.dtype) -> None:
        terms = self.terms(m)
        if self.rank is not None:  # an input's NaN/inf, named first: the SVD would fail inside torch
            self._inputs_finite(m, terms)
        if self.rank is None:
            a, b = lora.concat(terms, dtype=dtype)
        else:
            a, b, err = lora.truncate(terms, self.module_rank(m), dtype=dtype)
            self.errors[m.name] = err
        for t in (a, b):
            if not bool(torch.isfinite(t).all()):
                self._nonfinite(m, terms, f"module {m.name}", None)
        first = self.ads[0].modules[m.name]
        self.pending[first.a], self.pending[first.b] = a.contiguous(), b.contiguous()

    def _inputs_finite(self, m: LoraModule, terms) -> None:
        for i, (a, b, _) in zip(self.used, terms):
            for name, t in ((self.ads[i].modules[m.name].a, a), (self.ads[i].modules[m.name].b, b)):
                if not bool(torch.isfinite(t).all()):
                    raise CheckpointError(f"{self.ads[i].checkpoint.files[0]}: tensor {name}: non-finite value "
                                          f"(adapter {self.ads[i].label})")

    def _nonfinite(self, m: LoraModule, terms, where: str, w0) -> None:
        self._inputs_finite(m, terms)
        if w0 is not None and not bool(torch.isfinite(w0).all()):
            raise CheckpointError(f"{self.base.label}: {where}: non-finite value in the base weight")
        raise CheckpointError(f"{where}: the soup of the deltas of module {m.name} is not finite "
                              "(overflow in the output dtype)")

    def _where(self, i: int, name: str) -> str:
        f = self.sources[i].tensors.get(name)
        return str(f.file) if f is not None and f.file is not None else self.sources[i].label

    def close(self) -> None:
        self.combiner.close()
        for r in self.readers:
            r.close()


def _soup(paths, output: OutputDir | None, opts: MergeOptions, *, weights, merge_into, rank, labels, hub,
          reporter: Reporter, t0: float, full_rank: bool = False,
          selection: Selection | None = None) -> AdapterResult:
    ads = open_adapters(paths, labels)
    w = weights if weights is not None else normalise_weights(None, len(ads))
    base = resolve(merge_into, label=None, hub=hub) if merge_into is not None else None
    if output is not None:
        output.protect(checkpoint_paths([a.checkpoint for a in ads] + ([base] if base is not None else [])))
    soup = _Soup(ads, tuple(w), opts, base=base, rank=rank, warn=reporter.warn, full_rank=full_rank)
    mode = "merge" if base is not None else "svd" if rank is not None else "concat"
    try:
        total = sum(ck.total_bytes for ck in soup.sources)
        with reporter.bytes_task(f"souping {len(ads)} adapter(s) ({mode})", total) as advance:
            def produce(job: Job) -> Iterator[torch.Tensor]:
                for block in soup.produce(job):
                    yield block
                    advance(block.numel() * block.element_size())

            if output is None:
                state = MemorySink(opts.device).write(soup.jobs, produce)
                manifest = _adapter_manifest(soup, mode, base, opts, {}, selection)
                return AdapterResult(None, manifest, state, time.perf_counter() - t0, errors=dict(soup.errors))
            with output as tmp:
                shard = opts.shard_bytes if mode == "merge" else _ONE_FILE
                writer = ShardWriter(tmp, soup.jobs, shard_size=shard)
                writer.write(produce)
                files = dict(writer.files)
                if mode == "merge":
                    if base.root is not None:
                        copy_aux_files(base.root, tmp, dtype=opts.torch_dtype, warn=reporter.warn)
                else:
                    (tmp / "model.safetensors").rename(tmp / ADAPTER_WEIGHTS)
                    files = {ADAPTER_WEIGHTS: files.pop("model.safetensors")}
                    config = _adapter_config(soup)
                    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
                manifest = _adapter_manifest(soup, mode, base, opts, files, selection)
                from soup.finish.card import write_model_card

                write_model_card(tmp, manifest, warn=reporter.warn)  # a card that fails costs a warning
                write_manifest(tmp, manifest)  # last: its presence means the soup is complete
                path = output.commit()
    finally:
        soup.close()
    if soup.errors:
        name, err = max(soup.errors.items(), key=lambda kv: kv[1])
        reporter.step(f"rank {rank}: worst relative error {err:.3g} ({name})")
    return AdapterResult(path, manifest, None, time.perf_counter() - t0, errors=dict(soup.errors))


def _adapter_config(soup: _Soup) -> dict[str, Any]:
    """The output adapter's config: the first adapter's, with each module's new rank and alpha = rank
    (scaling 1; rsLoRA off). The most common rank is ``r``; the others go to ``rank_pattern``."""
    cfg = dict(soup.ads[0].config)
    ranks = {m.name: soup.module_rank(m) for m in soup.ads[0].modules.values()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(name): k for name, k in ranks.items() if k != r}
    cfg.update(r=r, lora_alpha=r, use_rslora=False, rank_pattern=pattern, alpha_pattern=dict(pattern))
    return cfg


def _adapter_manifest(soup: _Soup, mode: str, base, opts: MergeOptions, files, chosen: Selection | None = None):
    """``soup.json``: the adapters as ingredients, the method and its options (base, rank, errors)."""
    options: dict[str, Any] = {"output": {"concat": "adapter (rank concatenation, exact)",
                                          "svd": "adapter (truncated SVD)",
                                          "merge": "full weights W0 + sum w_i s_i B_i A_i"}[mode]}
    options["base_model"] = soup.ads[0].config.get("base_model_name_or_path")  # the adapters' (checked: one)
    if base is not None:
        options["merge_into"] = {"source": base.source, "fingerprint": base.fingerprint}
    if soup.rank is not None:
        options["rank"] = soup.rank
        options["relative_errors"] = dict(soup.errors)
        if soup.errors:
            name, err = max(soup.errors.items(), key=lambda kv: kv[1])
            options["worst"] = {"module": name, "relative_error": err}
    options["scalings"] = {a.label: sorted({m.scaling for m in a.modules.values()}) for a in soup.ads}
    plan = Plan(soup.jobs, [], soup.weights, sum(ck.total_bytes for ck in soup.sources), [])
    method = Method(f"adapter-{mode}", REFERENCE, options)
    if chosen is not None:  # a strategy chose the weights: its method, with the adapter output described
        method = Method(chosen.method.name, chosen.method.reference, {**chosen.method.options, "adapter": options})
    selection = Selection(method, chosen.evaluation if chosen else None, chosen.kept if chosen else None,
                          chosen.recipe if chosen else None)
    cks = [a.checkpoint for a in soup.ads]
    source = base if base is not None else cks[0]
    return _manifest(cks, plan, [], opts.torch_dtype, opts.accumulate, source, files, selection)
