"""The model card (README.md) of a soup, rendered from its ``Manifest`` (``soup.json``).

The card has YAML front matter the hub understands (``base_model`` = the ingredient repos with
``base_model_relation: merge``, ``tags``, ``library_name``), then: the method in words (from its
name and options: a maximum soup of p > 1 is the average of the top p, a plug-in strategy gets a
generic sentence) and its references, the ingredients (source, pinned revision, weight, validation
and test scores, kept), the soup's validation and held-out test scores beside the best single
ingredient's, the plot if one was written, and the recipe that reproduces the soup.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from soup.errors import printable
from soup.io.manifest import Manifest, Method, Scoring

__all__ = ["render_model_card", "write_model_card", "front_matter", "describe_method", "REFERENCES", "PLOT",
           "MINIMAL_CARD"]

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")  # owner/name, or a canonical name

SOUPS_PAPER = "https://arxiv.org/abs/2203.05482"
POINTS_PAPER = "https://arxiv.org/abs/2409.04828"
# reference URL -> how the card cites it
REFERENCES = {
    SOUPS_PAPER: "Wortsman et al. 2022, *Model soups: averaging weights of multiple fine-tuned models "
                 "improves accuracy without increasing inference time*",
    POINTS_PAPER: "*POINTS: Improving Your Vision-language Model with Affordable Strategies* (2024), "
                  "model soups of fine-tunes for vision-language models",
}
PLOT = "soup_plot.png"  # the plot's file name in a soup folder
# the card written when the full one cannot be rendered: soup.json still records everything
MINIMAL_CARD = ("---\nlibrary_name: transformers\ntags:\n- merge\n- model-soup\n---\n\n# Model soup\n\n"
                "A model soup made with `soup`: `soup.json` beside the weights records the ingredients, "
                "their weights and scores, and the recipe.\n")


def describe_method(method: Method, n_ingredients: int) -> str:
    """One sentence saying what the soup is, from the method's name and options."""
    name, opts = method.name, method.options or {}
    if name == "maximum":
        p = opts.get("p", 1)
        if p == 1:
            return ("the single best ingredient by validation score, its weights copied unchanged "
                    "(a maximum soup with p = 1)")
        return f"the uniform average of the top {p} ingredients by validation score (a maximum soup with p = {p})"
    if name == "greedy":
        tie = opts.get("tie", ">=")
        rule = "scores at least as well as" if tie == ">=" else "scores better than"
        tolerance = opts.get("tolerance") or 0
        slack = f" (or at most {tolerance:g} worse)" if isinstance(tolerance, (int, float)) and tolerance else ""
        return ("a greedy soup: the ingredients sorted best first by validation score; the best seeds the pool "
                f"and each next one is kept if the average of the pool with it {rule} the pool alone{slack}; "
                "the soup is the uniform average of the kept ingredients")
    if name == "average" and opts.get("weights") is not None:
        return f"the average of all {n_ingredients} ingredients with the given weights"
    if name in ("average", "uniform"):
        return f"the uniform average of all {n_ingredients} ingredients"
    if name == "weighted":
        return f"a weighted average of the {n_ingredients} ingredients with the given weights"
    if name == "search":
        return "a weighted average whose weights were searched with optuna against the validation evaluator"
    given = ", ".join(f"{k} = {v}" for k, v in opts.items())
    return (f"weights chosen by the `{name}` strategy" + (f" ({given})" if given else "")
            + "; the soup is the weighted average of the ingredients with the weights listed below")


def describe_merge(merge_method: dict[str, Any] | None) -> str | None:
    """One sentence on how tensors were combined when not by the weighted mean (``soup.methods``)."""
    if not merge_method:
        return None
    name = merge_method.get("name")
    text = f"tensors combined by `{name}`"
    if merge_method.get("description"):
        text += f" ({str(merge_method['description']).rstrip('.')})"
    given = ", ".join(f"{k} = {v}" for k, v in (merge_method.get("parameters") or {}).items())
    if given:
        text += f", with {given}"
    if merge_method.get("model_parameters"):
        text += " and per-model parameters (see the recipe below)"
    if merge_method.get("base"):
        text += f"; base model {merge_method['base']} (weight 0: the fine-tunes' task vectors are taken against it)"
    if merge_method.get("seed") is not None:
        text += f"; seed {merge_method['seed']}"
    return text


def describe_soup(m: Manifest) -> str:
    """What the soup is, in one sentence: the strategy's choice, and the merge method when not the mean."""
    has_base = bool(m.merge_method and m.merge_method.get("base"))
    n = len(m.ingredients) - (1 if has_base else 0)
    merged = describe_merge(m.merge_method)
    if merged is not None and m.method.name in ("average", m.merge_method.get("name")):
        return f"the {n} ingredients merged: {merged}"
    text = describe_method(m.method, n)
    return text if merged is None else f"{text}; {merged}"


def render_model_card(manifest: Manifest, *, recipe_text: str | None = None) -> str:
    """Render README.md for a soup.

    Args:
        manifest: the soup's manifest (``soup.io.manifest.read`` or ``MergeResult.manifest``).
        recipe_text: the recipe file's text, shown verbatim; defaults to ``manifest.recipe``.

    Returns:
        The card's Markdown, starting with YAML front matter.
    """
    m, name = manifest, manifest.method.name
    ingredients, ev = m.ingredients, m.evaluation
    front = _card_yaml(front_matter(m)) + "\n"

    in_soup = [i for i in ingredients if i.kept is not False and i.weight != 0]
    lines = [f"---\n{front}---", "", f"# Model soup ({_cell(name)})", "",
             f"This model is a **model soup**: a weight-space average of {len(ingredients)} fine-tuned "
             f"models of one base model ({len(in_soup)} in the soup), made with `soup`.", ""]

    lines += ["## Method", "", f"**{_cell(name)}**: {describe_soup(m)}.", ""]
    refs = [r for r in (m.method.reference, (m.merge_method or {}).get("reference"), SOUPS_PAPER) if r]
    if name == "greedy":
        refs.append(POINTS_PAPER)
    for ref in dict.fromkeys(refs):
        lines.append(f"- {REFERENCES.get(ref, 'Reference')}: {ref}")
    lines.append("")

    if ingredients:
        cols = [("Validation", [i.score for i in ingredients]), ("Test", [i.test_score for i in ingredients]),
                ("Kept", [i.kept for i in ingredients])]
        cols = [(title, values) for title, values in cols if any(v is not None for v in values)]
        lines += ["## Ingredients", "",
                  "| " + " | ".join(["#", "Ingredient", "Source", "Revision", "Weight", *(t for t, _ in cols)]) + " |",
                  "|---" * (5 + len(cols)) + "|"]
        for k, ing in enumerate(ingredients):
            cells = [str(k), _cell(ing.name), _cell(ing.repo or ing.source),
                     f"`{ing.revision[:12]}`" if ing.revision else "–", _num(ing.weight)]
            cells += [_kept(values[k]) if title == "Kept" else _num(values[k]) for title, values in cols]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    if ev is not None:
        lines += _evaluation(m)
    if m.plot:
        lines += [f"![Scores of the ingredients, the candidates and the soup]({m.plot})", ""]

    recipe = recipe_text if recipe_text is not None else m.recipe
    if isinstance(recipe, dict):
        recipe = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
    lines += ["## Reproduce", ""]
    if recipe:
        fence = "````" if "```" in recipe else "```"
        lines += ["The recipe that made this soup:", "", f"{fence}yaml", str(recipe).rstrip("\n"), fence]
    else:
        lines.append("The pinned ingredient revisions above and `soup.json` in this repo record the whole soup.")
    lines.append("")
    return printable("\n".join(lines))  # names, sources and options came from files: no escape sequences


def write_model_card(folder: Path, manifest: Manifest, *, warn: Callable[[str], None]) -> Path:
    """Write ``folder/README.md``. A card that cannot be rendered costs ``warn`` one line and leaves
    ``MINIMAL_CARD``, never the soup: hours of evaluation are not lost to a cosmetic step."""
    try:
        text = render_model_card(manifest)
    except Exception as e:  # a bug, or a manifest field no sentence expected
        first = str(e).splitlines()[0] if str(e) else ""
        warn(f"model card not rendered ({type(e).__name__}: {first}): wrote a minimal README.md instead")
        text = MINIMAL_CARD
    path = folder / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def front_matter(m: Manifest) -> dict[str, Any]:
    """The card's metadata for the hub, in the order and shape ``huggingface_hub.ModelCardData`` gives
    it (None fields left out; built here so that writing a card never imports the hub client): an adapter soup is a PEFT
    adapter of its adapters' base model (``base_model_relation: adapter``); any other soup is a merge of
    the hub repos of the ingredients actually in it (weight not 0, kept; a merge method's base model too),
    so the hub's model tree never shows a parent the soup dropped."""
    tags = ["merge", "model-soup", "soup-" + (re.sub(r"[^a-z0-9]+", "-", m.method.name.lower()).strip("-") or "custom")]
    options = m.method.options or {}
    adapter = options if m.method.name.startswith("adapter-") else options.get("adapter")
    if isinstance(adapter, dict) and "merge_into" not in adapter:  # the soup is an adapter (concat or SVD)
        base = adapter.get("base_model")
        hub_id = isinstance(base, str) and HUB_ID.match(base) is not None
        return _card_data(library_name="peft", base_model=base if hub_id else None,
                          base_model_relation="adapter" if hub_id else None, tags=tags)
    base_name = (m.merge_method or {}).get("base")
    repos = list(dict.fromkeys(i.repo for i in m.ingredients if i.repo and (
        (i.weight != 0 and i.kept is not False) or i.name == base_name)))
    return _card_data(library_name="transformers", base_model=repos or None,
                      base_model_relation="merge" if repos else None, tags=tags)


def _card_data(*, library_name: str, base_model: str | list[str] | None, base_model_relation: str | None,
               tags: list[str]) -> dict[str, Any]:
    """``ModelCardData(...).to_dict()`` for these fields: its field order (base_model, library_name, tags,
    then extra keys), None left out, tags made unique in order."""
    data = {"base_model": base_model, "library_name": library_name, "tags": list(dict.fromkeys(tags)),
            "base_model_relation": base_model_relation}
    return {k: v for k, v in data.items() if v is not None}


def _card_yaml(data: dict[str, Any]) -> str:
    """``ModelCardData.to_yaml()``: huggingface_hub's yaml_dump (unicode kept, keys in order), stripped."""
    return yaml.dump(data, sort_keys=False, allow_unicode=True).strip()


def _evaluation(m: Manifest) -> list[str]:
    """The soup's validation and test scores beside the best single ingredient's, as a table."""
    ev = m.evaluation
    records: list[tuple[str, Scoring]] = []
    if ev.evaluator is not None or ev.soup_score is not None:
        records.append(("Validation (chose the weights)", ev))
    if ev.test is not None:
        records.append(("Test (held out: reported, never used to choose)", ev.test))
    if not records:
        return []
    lines = ["## Evaluation", "", "| | " + " | ".join(title for title, _ in records) + " |",
             "|---" * (1 + len(records)) + "|"]
    lines.append("| Evaluator | " + " | ".join(_evaluator(s) for _, s in records) + " |")
    lines.append("| **Soup** | " + " | ".join(f"**{_num(s.soup_score)}**" for _, s in records) + " |")
    best = _best_single(m)
    if best is not None:
        lines.append(f"| Best single ingredient ({_cell(best.name)}) | "
                     + " | ".join(_num(best.score if s is ev else best.test_score) for _, s in records) + " |")
    lines.append("")
    if ev.examples is not None and ev.examples["full"]:
        used, full = ev.examples["evaluated"], ev.examples["full"]
        early = sum(1 for t in ev.history if t.partial)
        lines += [f"Racing (candidates compared on shared examples): the evaluations scored "
                  f"{used:,} examples of the {full:,} that scoring every candidate on every example would "
                  f"({used / full:.0%}); {early} evaluation(s) stopped early once their comparison was clear. "
                  "The soup's own score is on every example.", ""]
    return lines


def _evaluator(s: Scoring) -> str:
    if s.evaluator is None:
        return "–"
    return f"`{_cell(s.evaluator.name)}`" + (f" ({s.direction})" if s.direction else "")


def _best_single(m: Manifest):
    """The best ingredient alone by validation score (by test score when only that was evaluated)."""
    ev = m.evaluation
    by_test = ev.evaluator is None and ev.test is not None
    direction = (ev.test.direction if by_test else ev.direction) or "maximize"
    scored = [(i.test_score if by_test else i.score, k, i) for k, i in enumerate(m.ingredients)]
    scored = [(s, k, i) for s, k, i in scored if s is not None and math.isfinite(s)]
    if not scored:
        return None
    sign = -1.0 if direction == "maximize" else 1.0
    return min(scored, key=lambda x: (sign * x[0], x[1]))[2]


def _cell(text: Any) -> str:
    return printable(str(text).replace("|", "\\|").replace("\n", " "), lines=False)


def _num(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else _cell(value)


def _kept(value: Any) -> str:
    return "–" if value is None else ("yes" if value else "no")
