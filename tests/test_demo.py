"""The digits model-soup demo: reproducible ingredients, the evaluator, and the soup outcome itself.

The experiment test cooks the soups with the real strategies (``soup.demo.run_demo``) over
several seeds and counts the wins.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
from safetensors.torch import load_file  # noqa: E402

from soup.demo import (  # noqa: E402
    INGREDIENTS, MODEL_TYPE, DigitsAccuracy, accuracy, build_ingredients, format_markdown, format_rows, load_model,
    run_demo)
from soup.progress import Reporter  # noqa: E402
from soup.errors import EvaluatorError  # noqa: E402
from soup.soups.evaluate import Candidate, run_evaluator  # noqa: E402

SEEDS = (0, 1, 2, 3, 4)
BAD = "ft-bad"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[Path]]:
    """Ingredients for every seed, built once for the module."""
    root = tmp_path_factory.mktemp("digits")
    return {seed: build_ingredients(root / f"seed{seed}", seed=seed) for seed in SEEDS}


def _sd(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_layout_and_buffers(built: dict[int, list[Path]]) -> None:
    paths = built[0]
    assert [p.name for p in paths] == [r.name for r in INGREDIENTS]
    assert 0 < [p.name for p in paths].index(BAD) < len(paths) - 1  # neither first nor last
    counts = set()
    for p in paths:
        config = json.loads((p / "config.json").read_text())
        assert config["model_type"] == MODEL_TYPE and config["seed"] == 0
        sd = _sd(p)
        assert sd["norm.count"].dtype == torch.int64
        assert all(v.dtype == torch.float32 for k, v in sd.items() if k != "norm.count")
        assert all(torch.isfinite(v).all() for v in sd.values())
        counts.add(int(sd["norm.count"]))
        loaded = load_model(p).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    assert len(counts) == 1  # the integer buffer is identical in every ingredient


def test_build_is_deterministic(built: dict[int, list[Path]], tmp_path: Path) -> None:
    again = build_ingredients(tmp_path, seed=0)
    for a, b in zip(built[0], again, strict=True):
        for f in ("model.safetensors", "config.json"):
            assert (a / f).read_bytes() == (b / f).read_bytes(), f"{a.name}/{f} differs between builds"
    assert _sd(built[1][0])["net.0.weight"].ne(_sd(built[0][0])["net.0.weight"]).any()


def test_evaluator_matches_accuracy(built: dict[int, list[Path]]) -> None:
    sd = _sd(built[0][0])
    for split in ("val", "test"):
        evaluator = DigitsAccuracy(split=split, seed=0)
        assert evaluator.name == "digits-accuracy" and evaluator.direction == "maximize"
        got = run_evaluator(evaluator, Candidate.from_state_dict("ft", sd)).value
        assert got == accuracy(sd, split, 0)
        assert 0.9 < got <= 1.0
    with pytest.raises(EvaluatorError, match="split"):
        DigitsAccuracy(split="train")


def test_soup_outcome_with_the_real_strategies(built: dict[int, list[Path]], tmp_path: Path) -> None:
    """Greedy >= the best single ingredient on test, maximum = the best, average hurt by ft-bad."""
    rows = []
    for seed, paths in built.items():
        out = paths[0].parent.parent  # run_demo reuses the ingredients built by the fixture
        (out / f"ingredients-seed{seed}").mkdir(exist_ok=True)
        for p in paths:
            link = out / f"ingredients-seed{seed}" / p.name
            if not link.exists():
                link.symlink_to(p)
        steps = _Steps()
        row = run_demo(out, seed=seed, cache=None, progress=steps)
        named = [s for s in steps.lines if s.startswith(f"seed {seed}: the ")]
        assert [s.split(" soup")[0] for s in named] == [f"seed {seed}: the {k}" for k in ("greedy", "maximum", "average")]
        sds = {p.name: _sd(p) for p in paths}
        test = {n: accuracy(sd, "test", seed) for n, sd in sds.items()}
        assert row["maximum_test"] == test[row["best"]]  # maximum soup (p=1) is the best ingredient
        assert row["best"] != BAD and BAD not in row["kept"]
        soup_sd = load_file(str(row["path"] / "model.safetensors"))
        assert accuracy(soup_sd, "test", seed) == row["greedy_test"]  # the written soup is the one scored
        rows.append(row)
    print("\n" + format_rows(rows))
    documented, where = documented_table()
    assert format_markdown(rows) == documented, (
        f"{where}: the demo's table is not what `soup demo --seeds 5 --markdown` prints now:\n{format_markdown(rows)}")
    greedy_ge_best = sum(r["greedy_test"] >= r["best_test"] for r in rows)
    avg_lt_greedy = sum(r["average_test"] < r["greedy_test"] for r in rows)
    # measured on seeds 0-4: greedy >= best single 5/5 (strictly better 5/5); average < greedy 5/5
    assert greedy_ge_best >= 4, rows
    assert avg_lt_greedy == len(SEEDS), rows


class _Steps(Reporter):
    """A reporter that keeps the step lines (the demo's named phases)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def step(self, message: str) -> None:
        self.lines.append(message)


def documented_table() -> tuple[str, Path]:
    """The five-seed table the documentation shows (README.md, else docs/demo.md), and where it is."""
    root = Path(__file__).resolve().parents[1]
    for page in (root / "README.md", root / "docs" / "demo.md"):
        lines = page.read_text().splitlines() if page.exists() else []
        start = next((i for i, line in enumerate(lines) if line.startswith("| seed | best single")), None)
        if start is not None:
            end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
            return "\n".join(lines[start:end]), page
    raise AssertionError("no demo table (| seed | best single ...) in README.md or docs/demo.md")


def test_demo_without_scikit_learn_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain install (no ``demo`` extra): ``soup demo`` is one line naming the extra, and writes nothing."""
    import sys

    from typer.testing import CliRunner

    from soup.cli import app

    for name in [m for m in sys.modules if m == "soup.demo" or m.startswith("soup.demo.")]:
        monkeypatch.delitem(sys.modules, name)  # imported afresh, as in a new process
    monkeypatch.setitem(sys.modules, "sklearn", None)  # None in sys.modules: the import fails
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    res = CliRunner().invoke(app, ["demo", "--output", str(tmp_path / "out")])
    assert res.exit_code == 1
    assert res.stderr == ("error: the digits demo needs scikit-learn, which is not installed: "
                          "pip install 'soup-merge[demo]'\n")
    assert not (tmp_path / "out").exists()
