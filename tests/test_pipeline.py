"""The stages run one way for every entry point: `soup merge`, `soup run` and the Python API all check
hub ingredients from their headers before downloading anything."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import soup
from conftest import make_state, write_checkpoint
from soup.cli import app
from soup.errors import IncompatibleIngredients
from soup.hub import push
from soup.io.ingredients import HubOptions

runner = CliRunner()


@pytest.fixture
def mismatched(hub, hf_isolated, tmp_path):
    odd = make_state(3, big=3000)
    odd["model.norm.weight"] = torch.zeros(25, dtype=torch.bfloat16)
    push(write_checkpoint(tmp_path / "src" / "a", make_state(1, big=3000)), "acme/a", endpoint=hub.url)
    push(write_checkpoint(tmp_path / "src" / "odd", odd), "acme/odd", endpoint=hub.url)
    return hf_isolated


def test_soup_run_checks_headers_before_downloading(hub, mismatched, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"ingredients: [hf://acme/a, hf://acme/odd]\nstrategy: average\noutput: {tmp_path / 'o'}\n"
                      f"endpoint: {hub.url}\n")
    res = runner.invoke(app, ["run", str(recipe), "-q"])
    assert res.exit_code == 1 and "model.norm.weight: shape [24] in a but [25] in odd" in res.stderr
    assert not list(mismatched.rglob("*.safetensors"))  # no weights were downloaded


def test_python_api_checks_headers_before_downloading(hub, mismatched, tmp_path):
    calls = []
    with pytest.raises(IncompatibleIngredients, match=r"shape \[24\] in a but \[25\] in odd"):
        soup.greedy_soup(["hf://acme/a", "hf://acme/odd"], evaluator=lambda c: calls.append(c) or 0.0,
                         out=tmp_path / "o", hub=HubOptions(endpoint=hub.url))
    assert calls == [] and not list(mismatched.rglob("*.safetensors"))
