"""Evaluated adapter soups: maximum, greedy (and search) over PEFT LoRA adapters, with the base resident.

An adapter candidate with weights ``w`` is the rank-concatenated adapter of *every* ingredient (rank
``sum r_i`` in each module, whatever the weights) with ``B_i`` scaled by ``w_i * s_i`` — zero for an
excluded ingredient — so all candidates have the same shapes. An evaluator keeps one peft model
resident (base weights loaded once, on its GPU) and swaps only the adapter tensors in place::

    class MyEval(soup.Evaluator):
        def score(self, candidate):
            if self.model is None:  # the first candidate fixes the adapter's shapes
                self.model = PeftModel.from_pretrained(self.base, candidate.path())
            else:
                candidate.load_into(self.model)  # lora_A / lora_B (and modules_to_save) only
            ...

The chosen soup is written by ``adapter_soup`` (``soup.adapters.merging``) with the chosen weights.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from soup.adapters.merging import _Soup, _soup, open_adapters
from soup.errors import RecipeError
from soup.soups.evaluate import Candidate
from soup.options import MergeOptions
from soup.engine.output import OutputDir
from soup.adapters.peft_io import Adapter
from soup.progress import Reporter
from soup.soups.scorer import Scorer
from soup.engine.sinks import MemorySink

__all__ = ["AdapterCandidate", "AdapterScorer", "adapter_tensors"]


def adapter_tensors(model: Any) -> dict[str, torch.Tensor]:
    """A peft model's adapter tensors under their saved names (``...q_proj.lora_A.weight``), sharing
    storage with its parameters: writing into them changes the model. peft's public
    ``get_peft_model_state_dict`` does the renaming (adapter name removed, ``modules_to_save``)."""
    from peft import get_peft_model_state_dict

    return dict(get_peft_model_state_dict(model))


class AdapterCandidate(Candidate):
    """A candidate adapter; ``load_into`` takes a resident peft model (or a ``{saved name: tensor}``
    mapping) and overwrites only its adapter tensors."""

    def load_into(self, target: Any, *, strict: bool = True) -> None:
        """Copy the candidate's adapter tensors into ``target``'s in place (its base weights untouched).

        ``target``: a peft model holding an adapter of the candidates' shapes (rank ``sum r_i``;
        e.g. loaded once from ``candidate.path()``), or a mapping ``{saved name: tensor}``.
        """
        if isinstance(target, torch.nn.Module):
            target = adapter_tensors(target)
        super().load_into(target, strict=strict)


class AdapterScorer(Scorer):
    """A ``Scorer`` whose candidates are adapters (see the module docstring); the same contract, so
    ``maximum``, ``greedy``, ``average`` and ``search`` (without ``groups``) run unchanged."""

    def __init__(self, adapters: Sequence[Adapter], evaluators, *, opts: MergeOptions,
                 paths: Sequence[str | Path], **kwargs: Any) -> None:
        super().__init__([a.checkpoint for a in adapters], evaluators, dtype=opts.dtype, **kwargs)
        self.ads, self.opts, self.paths = list(adapters), opts, [str(p) for p in paths]

    def _vocab_digest(self) -> None:
        """Adapter soups are means of low-rank products: no token alignment goes into their bytes."""
        return None

    def candidate(self, weights: Sequence[float], name: str, groups: Mapping[str, Sequence[float]] | None = None,
                  method: Mapping[str, Any] | None = None) -> Candidate:
        if groups:
            raise RecipeError("strategy: per-pattern weight groups are not supported for adapter soups")
        if method and method.get("name", "linear") != "linear":
            raise RecipeError(f"method: {method.get('name')!r} is not supported for adapter soups (their "
                              "candidates are weighted means of the low-rank products)")
        w = tuple(float(x) for x in weights)

        def build(sink) -> Any:
            soup = _Soup(self.ads, w, self.opts, full_rank=True)
            try:
                return sink.write(sink.select(soup.jobs), soup.produce)
            finally:
                soup.close()

        def write(folder: Path) -> None:
            output = OutputDir(folder, overwrite=True)
            output.lock()
            try:
                _soup(self.paths, output, self.opts, weights=w, merge_into=None, rank=None,
                      labels=self.labels, hub=None, reporter=Reporter(), t0=time.perf_counter(), full_rank=True)
            finally:
                output.release()

        return AdapterCandidate(name, self.key(w, groups), state_dict_fn=lambda device: build(MemorySink(device)),
                                load_fn=build, write_fn=write,
                                weights={lab: x for lab, x in zip(self.labels, w) if x}, tmp_dir=self.scratch)


def choose_adapters(strategy: Any, adapters: Sequence[str | Path], evaluators: list, *, labels=None,
                    cache=None, reporter: Reporter | None = None, opts: MergeOptions | None = None):
    """Run ``strategy`` over adapter candidates: returns ``(choice, scorer)`` (scorer None without evaluators)."""
    ads = open_adapters(adapters, labels)
    strategy.check(len(ads))
    scorer = AdapterScorer(ads, evaluators, opts=opts or MergeOptions(), paths=adapters, cache=cache,
                           reporter=reporter) if evaluators else None
    try:
        return strategy.choose(scorer, len(ads)), scorer
    finally:
        if scorer is not None:
            scorer.close()
