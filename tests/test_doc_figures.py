"""Figures in the docs come from a stored benchmark run: every number in the docs' figure tables (speed,
merge methods, racing) is, to the precision shown, a number that run printed in benchmarks/results/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# (doc, the first cell of the table's header row, the stored runs its figures come from)
TABLES = [
    ("docs/speed.md", "| | measurement", ["bench_scale.txt", "bench_load_into.txt", "bench_parallel.txt"]),
    ("docs/methods.md", "| method | soup: time", ["bench_methods.txt"]),
    ("docs/racing.md", "| task | greedy", ["bench_racing.txt", "bench_racing_lm.txt"]),
]
NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?")


def _rows(doc: Path, header: str) -> list[str]:
    lines = doc.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def _printed(results: list[str]) -> list[str]:
    return NUMBER.findall(" ".join((ROOT / "benchmarks" / "results" / r).read_text() for r in results))


def _matches(figure: str, printed: list[str]) -> bool:
    """``figure`` (as the doc shows it) is one of the printed numbers, rounded to the figure's digits."""
    places = len(figure.split(".")[1]) if "." in figure else 0
    want = float(figure.replace(",", ""))
    return any(abs(round(float(p.replace(",", "")), places) - want) < 1e-9 for p in printed)


@pytest.mark.parametrize("doc,header,results", TABLES, ids=[t[0] for t in TABLES])
def test_every_figure_in_the_docs_tables_was_printed_by_a_stored_run(doc, header, results):
    rows = _rows(ROOT / doc, header)
    assert rows, f"{doc}: no table under {header!r}"
    printed = _printed(results)
    missing = [(figure, row[:60]) for row in rows for cell in row.split("|")[2:]
               for figure in NUMBER.findall(cell.replace("`", "")) if not _matches(figure, printed)]
    assert not missing, missing
