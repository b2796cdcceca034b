"""``merge``: the streaming engine end to end — ingredients -> plan -> stream -> combine -> write.

Every soup is a weighted mean of ingredients; strategies only decide the weights and call this.
With ``out`` the soup is written as HF-loadable sharded safetensors (atomically, manifest last);
without it the soup is returned in memory as a state dict on ``device`` (same plan, other sink).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from soup.io.checkpoint import Checkpoint
from soup.engine.combine import Combiner, accumulation_dtype
from soup.errors import RecipeError, SoupError, os_error_line
from soup.io.ingredients import HubOptions, IngredientSpec, describe, resolve_all
from soup.adapters.pairs import PAIR_KINDS, plan_pairs
from soup.engine.plan import Job, Plan, build_plan
from soup.engine.prefetch import Prefetcher, available_memory, plan_ranges
from soup.progress import Reporter, RichReporter
from soup.engine.rules import Rule, parse_rules
from soup.engine.stream import TensorReader
from soup.options import MergeOptions, check_option_names, check_weights
from soup.engine.output import OutputDir, checkpoint_paths, input_paths
from soup.methods.spec import MethodSpec, method_spec
from soup.signals import graceful
from soup.engine.sinks import InPlaceSink, MemorySink
from soup.engine.writer import ShardWriter, copy_aux_files, write_manifest
from soup.io.manifest import FileEntry, IngredientEntry, Manifest, Method, Selection
from soup.io.vocab import plan_vocab
from soup.io.vocab_files import write_vocab

__all__ = ["merge", "MergeResult", "soup_version"]


def soup_version() -> str:
    try:
        return importlib.metadata.version("soup-merge")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


@dataclass
class MergeResult:
    """What a merge produced: the output folder (or the state dict) and its manifest."""

    path: Path | None
    manifest: Manifest
    state_dict: dict[str, torch.Tensor] | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def merge(
    ingredients: Sequence[IngredientSpec],
    out: str | Path | OutputDir | torch.nn.Module | Mapping[str, torch.Tensor] | None = None,
    *,
    weights: Sequence[float] | None = None,
    rules: Sequence[str | Mapping[str, Any] | Rule] = (),
    overwrite: bool = False,
    progress: bool | Reporter = False,
    labels: Sequence[str | None] | None = None,
    hub: HubOptions | None = None,
    on_shard: Callable[[Path, str], None] | None = None,
    selection: Selection | None = None,
    method: str | Mapping[str, Any] | MethodSpec | None = None,
    base: IngredientSpec | None = None,
    seed: int | None = None,
    options: MergeOptions | None = None,
    **option_values: Any,
) -> MergeResult:
    """Merge ingredients into their weighted mean, streaming tensor by tensor.

    Args:
        ingredients: folders, weight files, ``hf://owner/name@rev``, state dicts or Checkpoints.
        out: output folder; None returns the soup in memory (``result.state_dict`` on ``device``);
            an ``nn.Module`` or ``{name: tensor}`` mapping (or an ``InPlaceSink`` around one)
            receives the soup in place (its own devices and dtypes; no second copy of the weights).
        weights: one per ingredient (default uniform); normalised to sum to 1 unless ``normalize=False``.
        rules: per-tensor rules, ``"PATTERN=take:N"``, ``"PATTERN=drop"``, ``"PATTERN=W1,W2"``.
        overwrite: replace a previous soup at ``out`` (only once the new soup is complete).
        progress: True for rich progress on stderr, or a Reporter.
        labels: ingredient names (default: folder or repo names).
        hub: how to reach the hub for ``hf://`` ingredients.
        on_shard: ``fn(path, sha256_hex)`` called as soon as each shard is written (a hub uploader).
        selection: how the weights were chosen (method, evaluation, kept flags, recipe), recorded in
            ``soup.json``, the model card and the plot; default: a plain average/weighted merge.
        method: how tensors combine (``soup.methods``): a name (``"ties"``), a mapping with its
            parameters (``{"name": "ties", "density": 0.5, "lambda": 1.0}``, per-model ones under
            ``models``) or a ``MethodSpec``; default the weighted mean. With a method, ``weights`` are
            the method's per-model ``weight`` (default 1 each).
        base: the base model (a folder, file or ``hf://`` repo) for methods on task vectors.
        seed: the seed of random methods (DARE, DELLA); default 0.
        options / option_values: the engine's options, a ``MergeOptions`` or its fields as keywords:
            ``dtype`` (output float dtype), ``accumulate`` ("auto": float32 for 16-bit inputs, float64
            for 32-bit; or "float32", "float64" for every tensor), ``shard_size``
            ("5GB"), ``device`` ("cpu", "cuda"), ``strict`` (differing integer buffers are an
            error), ``config_from`` (ingredient whose config/tokenizer files are copied),
            ``normalize``, ``mixed_float``, ``vocab`` (ingredients with different vocabularies:
            ``union``, ``first`` or an ingredient's index or name; see ``soup.io.vocab``). Checked
            before anything is read.

    Returns:
        MergeResult with the output path and manifest (or the state dict).

    Raises:
        SoupError: bad input (CheckpointError, IncompatibleIngredients, RecipeError); nothing is written.
    """
    t0 = time.perf_counter()
    # every value is checked before anything is read or written (RecipeError naming the option)
    check_option_names(option_values, MergeOptions.names(), where="merge")
    opts = dataclasses.replace(options, **option_values) if options is not None else MergeOptions(**option_values)
    if weights is not None:
        check_weights(weights, where="weights")
    rule_list = parse_rules(rules)
    spec = method_spec(method, n=len(ingredients), base=base, seed=seed)
    _check_device(opts.device)  # is CUDA there?
    reporter = progress if isinstance(progress, Reporter) else (RichReporter() if progress else Reporter())
    into = out if isinstance(out, (torch.nn.Module, Mapping, InPlaceSink)) else None  # written in place
    sources = list(ingredients) + ([spec.base] if spec is not None and spec.base is not None else [])
    output = _output_dir(None if into is not None else out, overwrite, sources)  # refused before any read
    owned = output is not None and not isinstance(out, OutputDir)
    with graceful():
        try:
            if owned:
                output.lock(warn=reporter.warn)
            return _merge(ingredients, output, into, opts, weights=weights, rules=rule_list, reporter=reporter,
                          on_shard=on_shard, labels=labels, hub=hub, selection=selection, t0=t0, spec=spec)
        except OSError as e:  # an environment fault: disk full, read-only, permission, a file for a folder
            raise SoupError(f"output {output.given if output else '-'}: {os_error_line(e)}") from e
        finally:
            if owned:
                output.release()


def _output_dir(out: str | Path | OutputDir | None, overwrite: bool,
                ingredients: Sequence[IngredientSpec]) -> OutputDir | None:
    """The checked destination (None in memory); local ingredients are protected from the start."""
    if out is None or isinstance(out, OutputDir):
        return out
    return OutputDir(out, overwrite=overwrite, protect=input_paths(ingredients))


def _merge(ingredients: Sequence[IngredientSpec], output: OutputDir | None, into: Any, opts: MergeOptions, *,
           weights: Sequence[float] | None, rules: list[Rule], reporter: Reporter, on_shard, labels, hub,
           selection: Selection | None, t0: float, spec: MethodSpec | None = None) -> MergeResult:
    """The body of ``merge`` once the options are checked and the output (if any) is locked."""
    out_dtype, acc_dtype, device = opts.torch_dtype, opts.accumulate_dtype, str(opts.device)
    rule_list, accumulate, config_from = rules, opts.accumulate, opts.config_from
    specs = list(ingredients)
    with_base = spec is not None and spec.base is not None
    if with_base:  # the base model is read like an ingredient, last, with weight 0
        specs.append(spec.base)
        labels = list(labels) + [None] if labels is not None else None
    if any(isinstance(s, (str, Path)) and str(s).startswith("hf://") for s in specs):
        from soup.hub.precheck import precheck  # huggingface_hub's client: imported for hub ingredients only

        specs = precheck(specs, labels=labels, hub=hub, allow_float_mix=out_dtype is not None or opts.mixed_float)
    cks = resolve_all(specs, labels=labels, hub=hub)
    if output is not None:
        output.protect(checkpoint_paths(cks))  # hub snapshots and link targets, known only now
    vocab = plan_vocab(cks, opts.vocab, n=len(cks) - with_base)  # differing vocabularies: rows by token
    plan = build_plan(cks, weights=weights, rules=rule_list, dtype=out_dtype, normalize=opts.normalize,
                      mixed_float=opts.mixed_float, method=spec, base=with_base, vocab=vocab)
    source = _config_source(cks, config_from, base=with_base)
    accumulate = _accumulation_used(cks, plan, accumulate)  # recorded in soup.json
    sink = (into if isinstance(into, InPlaceSink) else InPlaceSink(into)) if into is not None \
        else MemorySink(device) if output is None else None
    jobs = sink.select(plan.jobs) if sink is not None else plan.jobs  # checked before anything is read
    readers = [TensorReader(ck) for ck in cks]
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        reporter.warn(msg)

    pairs = plan_pairs(plan, cks, rule_list, config=source, warn=warn)  # LoRA pairs souped as their deltas
    if pairs is not None:
        jobs = sink.select(plan.jobs) if sink is not None else plan.jobs  # with the pairs' new shapes
    for r in plan.unused_rules:
        warn(f"rule {r} matched no tensor")
    threads = torch.get_num_threads()
    drop_read = plan.input_bytes > available_memory() // 2  # inputs cannot stay cached: evict once read
    compute_threads = _compute_threads(plan, threads, to_disk=output is not None and device == "cpu")
    combiner = Combiner([c.label for c in cks], where=lambda i, name: _where(cks[i], name),
                        accumulate=acc_dtype, device=device, strict=opts.strict, warn=warn, threads=compute_threads,
                        host_output=output is not None)
    in_dtypes = {t.dtype for ck in cks for t in ck.tensors.values() if t.dtype.is_floating_point}
    out_dtypes = {j.out_dtype for j in plan.jobs if j.kind == "mean"}
    # the kernel runs its own threads; idle torch (OpenMP) workers would only spin beside it
    torch.set_num_threads(1 if combiner.fused_covers(in_dtypes, out_dtypes) else compute_threads)
    try:
        with reporter.bytes_task(f"merging {len(jobs)} tensors", plan.input_bytes) as advance:
            def produce(job: Job):
                srcs = job.reads(len(cks))
                views = [readers[i].view(job.name) if i in srcs else None for i in range(len(cks))]
                per_element = sum(cks[i].tensors[job.name].dtype.itemsize for i in srcs)
                if pairs is not None and job.kind in PAIR_KINDS:
                    blocks = pairs.blocks(job, lambda i, name: readers[i].view(name))
                else:
                    blocks = combiner.blocks(job, views)
                for block in blocks:
                    yield block
                    used = block.numel() * per_element
                    advance(used)
                    ahead.consumed(used)
                del views, blocks
                for i in srcs:  # done with these pages (soup.engine.stream: unmapped; evicted when RAM is short)
                    readers[i].release(job.name, drop=drop_read)

            def read_ahead(order: Sequence[Job]) -> Prefetcher:
                """Background reads of the inputs, in the order the jobs will be run (soup.engine.prefetch)."""
                return Prefetcher(plan_ranges(cks, [j for j in order if j.kind not in PAIR_KINDS and j.rows is None]),
                                  threads=min(4, max(2, len(cks))))

            if sink is not None:
                combiner.dest = sink.reserve  # output blocks computed in place where the sink allows
                with read_ahead(jobs) as ahead:
                    state = sink.write(jobs, produce)  # a new state dict, or None when written in place
                if pairs is not None:
                    pairs.report()
                for ck in cks:
                    ck.verify("the soup in memory is not used")
                manifest = _manifest(cks, plan, rule_list, out_dtype, accumulate, source, {}, selection, spec=spec,
                                     vocab=vocab)
                return MergeResult(None, manifest, state, time.perf_counter() - t0, warnings)
            with output as tmp:
                writer = ShardWriter(tmp, plan.jobs, shard_size=opts.shard_bytes, on_shard=on_shard)
                combiner.dest = writer.reserve  # output blocks are computed in the write buffers
                with read_ahead([j for js in writer.shards.values() for j in js]) as ahead:
                    writer.write(produce)
                if source is not None and source.root is not None:
                    copy_aux_files(source.root, tmp, dtype=out_dtype, warn=warn)
                    if vocab is not None:  # the soup's tokenizer and vocab_size (soup.io.vocab_files)
                        write_vocab(vocab, tmp, source.root, warn=warn)
                if pairs is not None:
                    pairs.report()
                    pairs.update_config(tmp)  # an exact pair rule's rank_key
                manifest = _manifest(cks, plan, rule_list, out_dtype, accumulate, source, writer.files,
                                     selection, folder=True, spec=spec, vocab=vocab)
                from soup.finish.card import write_model_card
                from soup.finish.report import write_plot

                # the plot and the card are cosmetic: a failure costs a warning line, never the soup
                if manifest.plot is not None and not write_plot(manifest, tmp / manifest.plot, warn=warn):
                    manifest = dataclasses.replace(manifest, plot=None)  # soup.json names no missing file
                write_model_card(tmp, manifest, warn=warn)
                for ck in cks:  # the soup is made of the bytes the ingredients held when opened
                    ck.verify("nothing was written")
                write_manifest(tmp, manifest)  # last: its presence means the soup is complete
                path = output.commit()
    finally:
        combiner.close()
        torch.set_num_threads(threads)
        for r in readers:
            r.close()
    return MergeResult(path, manifest, None, time.perf_counter() - t0, warnings)


def _compute_threads(plan: Plan, threads: int, *, to_disk: bool) -> int:
    """Threads for the math. With few ingredients, writing and hashing the output is a large share
    of the work, so it gets a core of its own (measured on 2 cores: 3 inputs 0.9 s instead of 1.3 s;
    8 inputs are faster with every core on the math)."""
    if to_disk and plan.input_bytes < 5 * sum(j.nbytes for j in plan.jobs):
        return max(1, threads - 1)
    return threads


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RecipeError(f"device: {device!r} is not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SoupError(f"device {device}: no CUDA device is available here (use --device cpu)")


def _config_source(cks: Sequence[Checkpoint], config_from: int | str, *, base: bool = False) -> Checkpoint | None:
    if base and config_from == "base":  # the base model of a merge method (the last checkpoint)
        return cks[-1]
    if isinstance(config_from, int) or str(config_from).isdigit():
        i = int(config_from)
        if not 0 <= i < len(cks):
            raise RecipeError(f"config_from: index {i} out of range (0..{len(cks) - 1})")
        return cks[i]
    for ck in cks:
        if ck.label == config_from:
            return ck
    raise RecipeError(f"config_from: no ingredient named {config_from!r}")


def _accumulation_used(cks: Sequence[Checkpoint], plan: Plan, accumulate: str) -> str:
    """What soup.json records: the dtype given, or for auto what the plan's means accumulate in."""
    if accumulate != "auto":
        return accumulate
    used = {accumulation_dtype([cks[i].tensors[j.name].dtype for i in j.sources()]) for j in plan.jobs
            if j.kind == "mean"}
    if len(used) == 1:
        return f"auto ({str(used.pop()).removeprefix('torch.')})"
    return "auto (float32 for 16-bit inputs, float64 for 32-bit)"


def _where(ck: Checkpoint, name: str) -> str:
    f = ck.tensors[name].file
    return str(f) if f is not None else ck.label


def _manifest(cks: Sequence[Checkpoint], plan: Plan, rules: Sequence[Rule], dtype: torch.dtype | None,
              accumulate: str, source: Checkpoint | None, files: Mapping[str, Mapping[str, Any]],
              selection: Selection | None, *, folder: bool = False, spec: MethodSpec | None = None,
              vocab: Any = None) -> Manifest:
    """The one place a soup's manifest is built: the engine's part from the plan, the rest from the
    typed ``selection`` (method, evaluation, kept flags, recipe). ``folder``: written to disk, so a plot
    can go beside it (its file name is decided here, before anything is written)."""
    from soup.finish.card import PLOT
    from soup.finish.report import can_plot

    out_dtypes = sorted({str(j.out_dtype).removeprefix("torch.") for j in plan.jobs})
    own = plan.weights[:len(plan.weights) - (1 if spec is not None and spec.base is not None else 0)]
    uniform = all(abs(w - own[0]) < 1e-12 for w in own)
    method = selection.method if selection is not None else \
        Method(spec.name, spec.method.reference or None) if spec is not None and not spec.is_linear else \
        Method("average" if uniform else "weighted", "https://arxiv.org/abs/2203.05482")
    evaluation = selection.evaluation if selection is not None else None
    scores = evaluation.ingredient_scores() if evaluation is not None else {}
    tests = evaluation.test.ingredient_scores() if evaluation is not None and evaluation.test is not None else {}
    kept = list(selection.kept) if selection is not None and selection.kept is not None else []
    kept = kept if len(kept) == len(cks) else [None] * len(cks)  # a plug-in's odd list is left out
    ingredients = [IngredientEntry(**describe(ck), weight=w, score=scores.get(ck.label),
                                   test_score=tests.get(ck.label), kept=k)
                   for ck, w, k in zip(cks, plan.weights, kept)]
    return Manifest(
        soup_version=soup_version(),
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        method=method,
        ingredients=ingredients,
        rules=[r.to_dict() for r in rules],
        dropped=list(plan.dropped),
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else ",".join(out_dtypes),
        accumulate=accumulate,
        config_from=source.label if source is not None else None,
        tensors=len(plan.jobs),
        files={name: FileEntry(f["sha256"], f["size"]) for name, f in files.items()},
        total_size=sum(j.nbytes for j in plan.jobs),
        evaluation=evaluation,
        recipe=dict(selection.recipe) if selection is not None and selection.recipe else None,
        plot=PLOT if folder and can_plot(evaluation) else None,
        merge_method=dict(spec.describe(), base=cks[-1].label if spec.base is not None else None)
        if spec is not None else None,
        vocabulary=vocab.record([ck.label for ck in cks]) if vocab is not None else None,
    )


def read_manifest(folder: str | Path) -> Manifest:
    """Read and check a soup's ``soup.json`` (``soup.io.manifest.read``)."""
    from soup.io.manifest import read

    return read(folder)
