"""The model card (README.md) pushed with a soup, rendered from its manifest ``soup.json``.

The card has YAML front matter the hub understands (``base_model`` = the ingredient repos with
``base_model_relation: merge``, ``tags``, ``library_name``), then: the method and its reference,
a table of ingredients (source, pinned revision, weight, score, kept), the evaluator and the soup's
score, the plot if one was written, and the recipe that reproduces the soup.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import yaml

__all__ = ["render_model_card", "REFERENCES"]

SOUPS_PAPER = "https://arxiv.org/abs/2203.05482"
POINTS_PAPER = "https://arxiv.org/abs/2409.04828"
# reference URL -> how the card cites it
REFERENCES = {
    SOUPS_PAPER: "Wortsman et al. 2022, *Model soups: averaging weights of multiple fine-tuned models "
                 "improves accuracy without increasing inference time*",
    POINTS_PAPER: "*POINTS: Improving Your Vision-language Model with Affordable Strategies* (2024), "
                  "model soups of fine-tunes for vision-language models",
}
# what each soup method does, in one sentence
METHODS = {
    "average": "the uniform (or given-weight) average of all ingredients",
    "uniform": "the uniform average of all ingredients",
    "weighted": "a weighted average of the ingredients",
    "maximum": "the single best-scoring ingredient (a one-hot soup)",
    "greedy": "a greedy soup: ingredients sorted by score, each kept only if it does not hurt the "
              "soup's score; the kept ones are averaged uniformly",
    "search": "a weighted average whose weights were searched with optuna against the evaluator",
}
PLOT = "soup_plot.png"


def render_model_card(manifest: Mapping[str, Any], *, recipe_text: str | None = None) -> str:
    """Render README.md for a pushed soup.

    Args:
        manifest: the parsed ``soup.json`` (keys ``method``, ``ingredients``, ``files``,
            ``evaluation``, ``recipe``; missing or null fields are left out of the card).
        recipe_text: the recipe file's text, shown verbatim; defaults to ``manifest["recipe"]``.

    Returns:
        The card's Markdown, starting with YAML front matter.
    """
    method = manifest.get("method") or {}
    name = str(method.get("name") or "soup")
    ingredients = list(manifest.get("ingredients") or [])
    evaluation = manifest.get("evaluation") or {}

    repos = list(dict.fromkeys(str(i["repo"]) for i in ingredients if i.get("repo")))
    meta: dict[str, Any] = {}
    if repos:
        meta["base_model"] = repos
        meta["base_model_relation"] = "merge"
    meta["library_name"] = "transformers"
    meta["tags"] = ["merge", "model-soup", f"soup-{name}"]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)

    kept = [i for i in ingredients if i.get("kept") is not False]
    lines = [f"---\n{front}---", "", f"# Model soup ({name})", "",
             f"This model is a **model soup**: a weight-space average of {len(ingredients)} fine-tuned "
             f"models of one base model ({len(kept)} kept), made with `soup`.", ""]

    lines += ["## Method", "", f"**{name}**: {METHODS.get(name, 'a weighted average of the ingredients')}.", ""]
    refs = [r for r in (method.get("reference"), SOUPS_PAPER) if r]
    for ref in dict.fromkeys(refs):
        lines.append(f"- {REFERENCES.get(ref, 'Reference')}: {ref}")
    if name == "greedy" and POINTS_PAPER not in refs:
        lines.append(f"- {REFERENCES[POINTS_PAPER]}: {POINTS_PAPER}")
    lines.append("")

    if ingredients:
        lines += ["## Ingredients", "", "| # | Source | Revision | Weight | Score | Kept |",
                  "|---|---|---|---|---|---|"]
        for k, ing in enumerate(ingredients):
            source = ing.get("repo") or ing.get("source") or ing.get("name") or "?"
            revision = ing.get("revision")
            cells = [str(k), _cell(source), f"`{revision[:12]}`" if revision else "–",
                     _num(ing.get("weight")), _num(ing.get("score")), _kept(ing.get("kept"))]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    evaluator = evaluation.get("evaluator") or {}
    if evaluator or evaluation.get("soup_score") is not None:
        lines += ["## Evaluation", ""]
        if evaluator.get("name"):
            direction = f", {evaluator['direction']}" if evaluator.get("direction") else ""
            lines.append(f"- Evaluator: `{evaluator['name']}`{direction}")
        for key, label in (("soup_score", "Soup score"), ("test_score", "Held-out test score")):
            if evaluation.get(key) is not None:
                lines.append(f"- {label}: {_num(evaluation[key])}")
        lines.append("")
    if manifest.get("plot") == PLOT or PLOT in (manifest.get("files") or {}):
        lines += [f"![Scores of the ingredients and the soup]({PLOT})", ""]

    recipe = recipe_text if recipe_text is not None else manifest.get("recipe")
    if isinstance(recipe, Mapping):
        recipe = yaml.safe_dump(dict(recipe), sort_keys=False, allow_unicode=True)
    lines += ["## Reproduce", ""]
    if recipe:
        fence = "````" if "```" in recipe else "```"
        lines += ["The recipe that made this soup:", "", f"{fence}yaml", str(recipe).rstrip("\n"), fence]
    else:
        lines.append("The pinned ingredient revisions above and `soup.json` in this repo record the whole soup.")
    lines.append("")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _num(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else _cell(value)


def _kept(value: Any) -> str:
    return "–" if value is None else ("yes" if value else "no")
