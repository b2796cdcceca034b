"""LoRA pairs inside full checkpoints, souped as their deltas (``--lora-pair``, ``lora_pairs:``).

Some models keep low-rank pairs that cannot be folded into a base weight: InternLM-XComposer2's
Partial LoRA (``Plora_A`` / ``Plora_B``) is applied to image tokens only. Averaging A and B
separately gives ``mean(B) @ mean(A)``, which is not the soup ``sum_i w_i B_i @ A_i`` of the deltas.
A pair rule (``soup.engine.rules.pair_rule``: ``A_PATTERN=pair:B_PATTERN[:MODE]``) pairs each A tensor
(r, in) with its B tensor (out, r) and writes, by mode:

- ``exact`` (default): the soup of the deltas at rank ``sum r_i`` (``soup.adapters.lora.concat``: A stacked,
  B concatenated with ``w_i`` folded in); the model's config must say the new rank, so the rule
  names the config key holding it (``rank_key``, dotted for nested configs) and it is updated;
- ``svd``: the best approximation at the original rank (``soup.adapters.lora.truncate``), with each pair's
  relative Frobenius error reported (and the worst);
- ``independent``: A and B averaged separately, as plain tensors, with a warning saying it is not
  the soup of the deltas.

Without a rule, tensors that look like LoRA pairs (``lora_A``/``lora_B``, ``Plora_A``/``Plora_B``)
and are averaged factor by factor are reported once, with the ``--lora-pair`` that would soup them.
Pairs are planned here from the tensor tables (new shapes, ranks, the config key), before anything
is read; the engine asks ``blocks`` for their output.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from soup.adapters import lora
from soup.io.checkpoint import Checkpoint
from soup.errors import CheckpointError, IncompatibleIngredients, RecipeError
from soup.engine.plan import Job, Plan
from soup.engine.rules import Rule

__all__ = ["Pairs", "plan_pairs", "PAIR_KINDS", "likely_pairs"]

PAIR_KINDS = ("pair_A", "pair_B")
_LIKELY = re.compile(r"(?P<pre>.*(?:^|[._])P?lora)_(?P<which>[AB])(?P<post>(?:\.[^.]+)*)$")


def _capture(pattern: str) -> re.Pattern[str]:
    """``pattern`` as a regex whose groups are what its ``*`` / ``?`` wildcards matched."""
    out = []
    for c in pattern:
        out.append("(.*)" if c == "*" else "(.)" if c == "?" else re.escape(c))
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def _fill(pattern: str, groups: Sequence[str]) -> str:
    it = iter(groups)
    return "".join(next(it) if c in "*?" else c for c in pattern)


@dataclasses.dataclass
class _Pair:
    rule: Rule
    a: str
    b: str
    rank: int  # each ingredient's rank
    new_rank: int
    weights: tuple[float, ...]


class Pairs:
    """The planned pairs of one merge: computes their output blocks, reports errors, updates the config."""

    def __init__(self, pairs: list[_Pair], *, warn: Callable[[str], None],
                 where: Callable[[int, str], str] = lambda i, name: f"ingredient {i}") -> None:
        self.by_name = {p.a: p for p in pairs} | {p.b: p for p in pairs}
        self.pairs = pairs
        self.warn = warn
        self.where = where  # (ingredient, tensor) -> the file holding it, for errors
        self.pending: dict[str, torch.Tensor] = {}
        self.errors: dict[str, float] = {}  # svd: A tensor name -> relative Frobenius error

    def blocks(self, job: Job, views: Callable[[int, str], torch.Tensor]) -> Iterator[torch.Tensor]:
        """The output of a pair job; ``views(i, name)`` is ingredient i's flat tensor."""
        if job.name not in self.pending:
            p = self.by_name[job.name]
            used = [i for i, w in enumerate(p.weights) if w != 0.0]
            a0 = views(used[0], p.a)
            ins = a0.numel() // p.rank
            terms = [(views(i, p.a).reshape(p.rank, ins), views(i, p.b).reshape(-1, p.rank), p.weights[i])
                     for i in used]
            for i, (ta, tb, _) in zip(used, terms):  # an input's NaN/inf, named (SVD would fail inside torch)
                for name, t in ((p.a, ta), (p.b, tb)):
                    if not bool(torch.isfinite(t).all()):
                        raise CheckpointError(f"{self.where(i, name)}: tensor {name}: non-finite value")
            if p.rule.mode == "exact":
                a, b = lora.concat(terms, dtype=job.out_dtype)
            else:
                a, b, err = lora.truncate(terms, p.new_rank, dtype=job.out_dtype)
                self.errors[p.a] = err
            for name, t in ((p.a, a), (p.b, b)):
                if not bool(torch.isfinite(t).all()):
                    raise CheckpointError(f"tensor {name}: the soup of the pair's deltas is not finite "
                                          "(overflow in the output dtype)")
            self.pending[p.a], self.pending[p.b] = a.contiguous(), b.contiguous()
        yield self.pending.pop(job.name).reshape(-1)

    def report(self) -> None:
        """Warn with each svd rule's worst error (every pair's error is in ``errors``)."""
        for rule in dict.fromkeys(p.rule for p in self.pairs if p.rule.mode == "svd"):
            errs = {p.a: self.errors[p.a] for p in self.pairs if p.rule == rule and p.a in self.errors}
            if errs:
                name, worst = max(errs.items(), key=lambda kv: kv[1])
                self.warn(f"lora pair {rule.pattern}: {len(errs)} pair(s) refactored to their rank by SVD; "
                          f"worst relative Frobenius error {worst:.4g} ({name})")

    def update_config(self, folder: Path) -> None:
        """Write each exact rule's new rank into the copied ``config.json`` (its ``rank_key``)."""
        keyed = {p.rule.rank_key: p.new_rank for p in self.pairs if p.rule.rank_key}
        if not keyed:
            return
        path = folder / "config.json"
        config = json.loads(path.read_text())
        for key, rank in keyed.items():
            *parents, leaf = key.split(".")
            node = config
            for part in parents:
                node = node[part]
            node[leaf] = rank
        path.write_text(json.dumps(config, indent=2) + "\n")


def plan_pairs(plan: Plan, cks: Sequence[Checkpoint], rules: Sequence[Rule], *, config: Checkpoint | None,
               warn: Callable[[str], None]) -> Pairs | None:
    """Replace the plan's jobs of paired tensors by pair jobs (new shapes), checking shapes and the
    config key; warn about ``independent`` rules and about likely pairs no rule covers."""
    pair_rules = [r for r in rules if r.action == "pair"]
    jobs = {j.name: j for j in plan.jobs}
    names = list(cks[0].tensors)
    covered: set[str] = set()
    planned: list[_Pair] = []
    for rule in pair_rules:
        rx = _capture(rule.pattern)
        found = []
        for name in names:
            m = rx.match(name)
            if m is None:
                continue
            b = _fill(rule.partner, m.groups())
            found.append((name, b))
            covered.update((name, b))
        if rule.mode == "independent":
            if found:
                warn(f"lora pair {rule.pattern} / {rule.partner}: A and B are averaged independently "
                     f"({len(found)} pair(s)): mean(B) @ mean(A) is not the soup of the deltas mean(B @ A)")
            continue
        for a, b in found:
            planned.append(_plan_one(rule, a, b, jobs, cks))
    if not pair_rules or any(r.mode != "independent" for r in pair_rules):
        loose = [(a, b) for a, b in likely_pairs(names) if a not in covered and b not in covered
                 and jobs.get(a) is not None and jobs[a].kind == "mean" and jobs.get(b) is not None
                 and jobs[b].kind == "mean"]
        if loose:
            a, b = loose[0]
            pa, pb = suggest_pattern(a, b)
            warn(f"{len(loose)} LoRA-style pair(s) such as {a} / {b} are averaged factor by factor, which is not "
                 f"the soup of their deltas: pass --lora-pair '{pa}={pb}' (or a drop rule)")
    if not planned:
        return None
    _check_rank_keys(planned, config)
    for rule in dict.fromkeys(p.rule for p in planned if p.rule.mode == "exact" and not p.rule.rank_key):
        p = next(p for p in planned if p.rule == rule)
        if p.new_rank != p.rank:
            warn(f"lora pair {rule.pattern}: written exactly at rank {p.new_rank} (was {p.rank}); the model's "
                 "config must say so: name its key with --rank-key (rank_key:) or use --pair-mode svd")
    for p in planned:
        ja, jb = jobs[p.a], jobs[p.b]
        a_shape, b_shape = cks[0].tensors[p.a].shape, cks[0].tensors[p.b].shape
        jobs[p.a] = Job(p.a, (p.new_rank, *a_shape[1:]), "pair_A", ja.out_dtype, weights=p.weights)
        jobs[p.b] = Job(p.b, (b_shape[0], p.new_rank), "pair_B", jb.out_dtype, weights=p.weights)
    plan.jobs = [jobs[j.name] for j in plan.jobs]
    return Pairs(planned, warn=warn, where=lambda i, name: str(cks[i].tensors[name].file or cks[i].label))


def _plan_one(rule: Rule, a: str, b: str, jobs: dict[str, Job], cks: Sequence[Checkpoint]) -> _Pair:
    first = cks[0]
    if b not in first.tensors:
        raise IncompatibleIngredients(f"lora pair {rule.pattern}: tensor {a} has no partner {b} in {first.label}")
    ja, jb = jobs.get(a), jobs.get(b)
    for name, job in ((a, ja), (b, jb)):
        if job is None:
            raise RecipeError(f"lora pair {rule.pattern}: tensor {name} is dropped by another rule")
        if job.kind not in ("mean", "take") or not first.tensors[name].dtype.is_floating_point:
            raise RecipeError(f"lora pair {rule.pattern}: tensor {name} is not a float tensor to soup "
                              f"(planned as {job.kind})")
    sa, sb = first.tensors[a].shape, first.tensors[b].shape
    if len(sa) != 2 or len(sb) != 2 or sb[1] != sa[0]:
        raise IncompatibleIngredients(f"lora pair {rule.pattern}: {a} {list(sa)} and {b} {list(sb)} are not a "
                                      "LoRA pair (A: [r, in], B: [out, r])")
    n = len(cks)
    weights = ja.weights if ja.kind == "mean" else tuple(1.0 if i == ja.source else 0.0 for i in range(n))
    used = sum(1 for w in weights if w != 0.0)
    new_rank = sa[0] * used if rule.mode == "exact" else sa[0]
    return _Pair(rule, a, b, sa[0], new_rank, weights)


def _check_rank_keys(pairs: list[_Pair], config: Checkpoint | None) -> None:
    """Each exact rule's ``rank_key`` exists in the config, holds the pairs' rank, and one new rank fits all."""
    by_key: dict[str, set[int]] = {}
    for p in pairs:
        if p.rule.rank_key:
            by_key.setdefault(p.rule.rank_key, set()).add(p.rank)
    if not by_key:
        return
    path = config.root / "config.json" if config is not None and config.root is not None else None
    if path is None or not path.is_file():
        raise RecipeError(f"rank_key {next(iter(by_key))}: the soup has no config.json to update")
    cfg = json.loads(path.read_text())
    for key, ranks in by_key.items():
        node = cfg
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise RecipeError(f"rank_key {key}: no such key in {path}")
            node = node[part]
        if len(ranks) > 1 or node not in ranks:
            raise RecipeError(f"rank_key {key}: {path} says {node!r} but the pairs have rank "
                              f"{', '.join(map(str, sorted(ranks)))}")
    news = {}
    for p in pairs:
        if p.rule.rank_key and news.setdefault(p.rule.rank_key, p.new_rank) != p.new_rank:
            raise RecipeError(f"rank_key {p.rule.rank_key}: pairs would get different ranks")


def likely_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """(A, B) tensor names that look like LoRA pairs: ``lora_A``/``lora_B``, ``Plora_A``/``Plora_B``."""
    from soup.io.components import classify  # the lora component's names (lora_A/B, Plora_A/B, lora_down/up...)

    present = set(names)
    out = []
    for name in names:
        m = _LIKELY.match(name)
        if m and m["which"] == "A" and classify(name)[0] == "lora":
            b = f"{m['pre']}_B{m['post']}"
            if b in present:
                out.append((name, b))
    return out


def suggest_pattern(a: str, b: str) -> tuple[str, str]:
    """The ``--lora-pair`` globs for a likely pair: ``*.Plora_A.weight`` / ``*.Plora_B.weight``."""
    m = _LIKELY.match(a)
    family = re.split(r"[._]", m["pre"])[-1] if m else "lora"
    post = m["post"] if m else ""
    dot = "." if m and m["pre"].endswith(f".{family}") else ""
    return f"*{dot}{family}_A{post}", f"*{dot}{family}_B{post}"
