"""Merge methods through the streaming engine: files in, files out, against definitions computed here.

The per-method math is tested on tensors in test_methods_sparsify.py / test_methods_geometry.py; this
file checks what the engine adds: blocks (outputs identical whatever the block size), the base model
read beside the ingredients, per-tensor parameters (filters, layer gradients), the CLI, recipes and
mergekit configs, seeds, and that a strategy's candidate is the soup it writes.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import soup
import soup.engine.combine as combine
from soup.cli import app
from soup.errors import RecipeError

from conftest import make_state, write_checkpoint


def _family(tmp_path, n=3, dtype=torch.float32, big=6000):
    """A base and ``n`` fine-tunes of it (base + noise of different sizes), written as checkpoints."""
    base_state = make_state(0, dtype, big=big)
    base = write_checkpoint(tmp_path / "base", base_state)
    fts, states = [], []
    for i in range(n):
        g = torch.Generator().manual_seed(50 + i)
        st = {k: ((v.double() + (0.05 + 0.05 * i) * torch.randn(v.shape, generator=g, dtype=torch.float64))
                  .to(dtype) if v.is_floating_point() else v.clone()) for k, v in base_state.items()}
        fts.append(write_checkpoint(tmp_path / f"ft{i}", st))
        states.append(st)
    return base, base_state, fts, states


def _digest(sd):
    return hashlib.sha256(b"".join(k.encode() + sd[k].reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
                                   for k in sorted(sd))).hexdigest()


def _ties_reference(base, xs, weights, density, lam=1.0):
    """TIES on one tensor, whole-tensor in float64: per model keep the top ``int(density * numel)``
    |delta| (ties at the threshold kept), elect the sign of the sum of weighted deltas, average the
    weighted deltas that agree (divided by the sum of their weights)."""
    b = base.double().reshape(-1)
    kept = []
    for x, w in zip(xs, weights):
        d = x.double().reshape(-1) - b
        k = max(1, int(density * d.numel()))
        thr = torch.sort(d.abs(), descending=True).values[k - 1]
        kept.append(torch.where(d.abs() >= thr, d, torch.zeros_like(d)) * w)
    stack = torch.stack(kept)
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0).double()
    agree = torch.sign(stack) == sign
    wsum = (agree.double() * torch.tensor(weights, dtype=torch.float64).unsqueeze(1)).sum(0)
    merged = torch.where(agree, stack, 0.0).sum(0) / torch.where(wsum == 0, 1.0, wsum)
    return (b + lam * merged).reshape(base.shape)


def test_ties_through_the_engine_equals_its_definition(tmp_path):
    base, base_state, fts, states = _family(tmp_path)
    res = soup.merge(fts, None, method={"name": "ties", "density": 0.3}, base=base, weights=[1.0, 0.5, 2.0])
    for name, x0 in base_state.items():
        got = res.state_dict[name]
        if not x0.is_floating_point():
            assert torch.equal(got, x0)
            continue
        want = _ties_reference(x0, [s[name] for s in states], [1.0, 0.5, 2.0], 0.3)
        assert got.dtype == torch.float32
        assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6), name


@pytest.mark.parametrize("method", [{"name": "ties", "density": 0.4}, {"name": "dare_ties", "density": 0.6},
                                    {"name": "breadcrumbs", "density": 0.8, "gamma": 0.05},
                                    {"name": "della", "density": 0.5}, "model_stock", "task_arithmetic",
                                    {"name": "sce", "select_topk": 0.5}])
def test_outputs_do_not_depend_on_the_block_size(tmp_path, monkeypatch, method):
    """The first passes (thresholds, norms, cosines) and seeded masks give the same bytes whether a
    tensor is one block or many."""
    base, _, fts, _ = _family(tmp_path, dtype=torch.bfloat16)
    one = soup.merge(fts, None, method=method, base=base).state_dict
    monkeypatch.setattr(combine, "BLOCK_ELEMENTS", 997)  # a prime: blocks never line up with rows
    many = soup.merge(fts, None, method=method, base=base).state_dict
    assert _digest(one) == _digest(many)


def test_seeded_methods_give_the_same_bytes_for_a_seed_and_others_for_another(tmp_path):
    base, _, fts, _ = _family(tmp_path)
    spec = {"name": "dare_linear", "density": 0.5}
    a = soup.merge(fts, None, method=spec, base=base, seed=7).state_dict
    b = soup.merge(fts, None, method=spec, base=base, seed=7).state_dict
    c = soup.merge(fts, None, method=spec, base=base, seed=8).state_dict
    assert _digest(a) == _digest(b) and _digest(a) != _digest(c)


def test_layer_gradients_and_filters_resolve_per_tensor(tmp_path):
    """linear with a per-model weight given by filters: the mlp tensors get one weight pair, the rest
    another; each tensor is the normalised weighted mean (definition in float64)."""
    _, _, fts, states = _family(tmp_path, n=2)
    method = {"name": "linear", "models": [
        {"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.5}]},
        {"weight": [{"filter": "mlp", "value": 0.1}, {"value": 0.5}]}]}
    res = soup.merge(fts, None, method=method)
    for name, x in states[0].items():
        if not x.is_floating_point():
            continue
        w = (0.9, 0.1) if "mlp" in name else (0.5, 0.5)
        want = (x.double() * w[0] + states[1][name].double() * w[1]) / sum(w)
        assert torch.allclose(res.state_dict[name].double(), want, rtol=1e-6, atol=1e-7), name


def test_slerp_gradient_over_layers_matches_the_endpoints(tmp_path):
    """t: [0, 1] over a one-layer model: the layer is at position 0 (t = 0: the base), embeddings
    too, and the other tensors (norm, head) after the layers take t = 1 (the other model)."""
    base, base_state, fts, states = _family(tmp_path, n=1)
    res = soup.merge(fts, None, method={"name": "slerp", "t": [0.0, 1.0]}, base=base).state_dict
    layer = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(res[layer], base_state[layer], atol=1e-6)
    assert torch.allclose(res["model.norm.weight"], states[0]["model.norm.weight"], atol=1e-6)


def test_the_cli_merges_with_a_method_and_refuses_bad_choices_in_one_line(tmp_path):
    base, _, fts, _ = _family(tmp_path)
    run = CliRunner().invoke
    ok = run(app, ["merge", *map(str, fts), "-o", str(tmp_path / "soup"), "--method", "ties", "--base", str(base),
                   "--set", "density=0.3", "--weights", "1,0.5,2", "--no-normalize", "-q"])
    assert ok.exit_code == 0, ok.output
    written = load_file(str(tmp_path / "soup" / "model.safetensors"))
    direct = soup.merge(fts, None, method={"name": "ties", "density": 0.3}, base=base, weights=[1, 0.5, 2]).state_dict
    assert _digest(written) == _digest(direct)
    manifest = json.loads((tmp_path / "soup" / "soup.json").read_text())
    assert manifest["merge_method"]["name"] == "ties" and manifest["merge_method"]["parameters"] == {"density": 0.3}
    assert manifest["merge_method"]["base"] == "base"
    assert "ties" in (tmp_path / "soup" / "README.md").read_text()
    for args, line in [(["--method", "tie", "--base", str(base)], "unknown method 'tie'"),
                       (["--method", "ties", "--base", str(base), "--set", "densty=0.5"], "no parameter 'densty'"),
                       (["--method", "ties"], "needs a base model"),
                       (["--method", "ties", "--base", str(base), "--set", "density=1.5"], "outside [0.0, 1.0]"),
                       (["--method", "slerp", "--base", str(base)], "needs parameter 't'")]:
        res = run(app, ["merge", *map(str, fts), "-o", str(tmp_path / "bad"), *args, "-q"])
        assert res.exit_code == 1 and line in res.output and "Traceback" not in res.output, res.output
        assert not (tmp_path / "bad").exists()
    res = run(app, ["merge", *map(str, fts), "-o", str(tmp_path / "bad"), "--set", "density=0.5"])
    assert res.exit_code == 2


def test_a_mergekit_config_runs_as_it_is(tmp_path):
    """mergekit's YAML (per-model parameters with filters, global parameters, out_dtype) gives the
    tensors of its definition (here linear, computed in float64)."""
    base, base_state, fts, states = _family(tmp_path, n=2)
    config = {"merge_method": "linear", "base_model": "base",
              "models": [{"model": "ft0", "parameters": {"weight": [{"filter": "q_proj", "value": 3.0}, {"value": 1.0}]}},
                         {"model": "ft1", "parameters": {"weight": 1.0}}],
              "parameters": {"normalize": True}, "dtype": "float32", "out_dtype": "float32"}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(config))
    res = CliRunner().invoke(app, ["run", str(tmp_path / "mk.yml"), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, x in states[0].items():
        if not x.is_floating_point():
            continue
        w0 = 3.0 if "q_proj" in name else 1.0
        want = (x.double() * w0 + states[1][name].double()) / (w0 + 1.0)
        assert torch.allclose(got[name].double(), want, rtol=1e-6, atol=1e-7), name
    m = json.loads((tmp_path / "out" / "soup.json").read_text())
    assert m["recipe"]["merge_method"] == "linear"  # the config as given, to make it again
    assert [i["name"] for i in m["ingredients"]] == ["ft0", "ft1", "base"]


def test_a_base_listed_among_the_models_is_the_base_of_task_vector_methods(tmp_path):
    """mergekit lists the base among the models in TIES configs: it is the base, not an ingredient."""
    base, _, fts, _ = _family(tmp_path, n=2)
    config = {"merge_method": "ties", "base_model": "base",
              "models": [{"model": "base"}, {"model": "ft0", "parameters": {"density": 0.5, "weight": 1.0}},
                         {"model": "ft1", "parameters": {"density": 0.5, "weight": 1.0}}],
              "parameters": {"normalize": True}, "dtype": "float32"}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(config))
    res = CliRunner().invoke(app, ["run", str(tmp_path / "mk.yml"), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    direct = soup.merge(fts, None, method={"name": "ties", "density": 0.5}, base=base).state_dict
    assert _digest(load_file(str(tmp_path / "out" / "model.safetensors"))) == _digest(direct)


@pytest.mark.parametrize("config, line", [
    ({"merge_method": "passthrough", "models": [{"model": "a"}]}, "passthrough"),
    ({"merge_method": "ties", "slices": [], "models": [{"model": "a"}]}, "slices"),
    ({"merge_method": "ties", "models": [{"model": "a"}], "frobnicate": 1}, "unknown key(s) frobnicate"),
])
def test_unsupported_mergekit_keys_are_one_line(tmp_path, config, line):
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(config))
    res = CliRunner().invoke(app, ["validate", str(tmp_path / "mk.yml")])
    assert res.exit_code == 1 and line in res.output and "Traceback" not in res.output, res.output


def test_recipe_method_key_is_checked_before_any_work(tmp_path):
    from soup.recipe import parse_recipe

    recipe = {"ingredients": ["a", "b"], "strategy": "average", "method": {"name": "ties", "density": 2}}
    with pytest.raises(RecipeError, match="method.density: 2 is outside"):
        parse_recipe(recipe, base=tmp_path)
    with pytest.raises(RecipeError, match="needs a base model"):
        parse_recipe({**recipe, "method": "ties"}, base=tmp_path)


def test_greedy_scores_the_bytes_it_writes_with_a_method(tmp_path):
    """Every candidate is the method applied to pool + next; the soup written is the kept candidate's bytes."""
    base, _, fts, _ = _family(tmp_path, n=4)
    seen = {}

    def evaluator(candidate):  # every candidate ties: greedy (tie ">=") keeps them all
        seen[candidate.name] = _digest(candidate.state_dict())
        return 1.0

    res = soup.greedy_soup(fts, evaluator, out=tmp_path / "soup", method={"name": "ties", "density": 0.5},
                           base=base, cache=None)
    written = _digest(load_file(str(tmp_path / "soup" / "model.safetensors")))
    kept = [k for k, w in res.weights.items() if w]
    assert len(kept) == 4
    m = soup.read_manifest(tmp_path / "soup")
    assert m.merge_method["name"] == "ties"
    assert written in seen.values() and res.soup_score is not None
    direct = soup.merge(fts, None, method={"name": "ties", "density": 0.5}, base=base,
                        weights=[1.0 if res.weights[f"ft{i}"] else 0.0 for i in range(4)]).state_dict
    assert _digest(direct) == written


def test_search_chooses_among_methods_and_their_parameters_and_ships_what_it_scored(tmp_path):
    """strategy search with methods [linear, ties] and density in [0.3, 1]: trials try both methods;
    the soup written is the best trial's bytes, and soup.json names its method and density."""
    base, _, fts, _ = _family(tmp_path)
    seen = []

    def evaluator(candidate):
        sd = candidate.state_dict()
        h = _digest(sd)
        value = int(h[:8], 16) / 0xFFFFFFFF
        seen.append((h, value))
        return value

    res = soup.search_soup(fts, evaluator, n_trials=10, methods=["linear", "ties"], params={"density": [0.3, 1.0]},
                           method="linear", base=base, out=tmp_path / "soup", cache=None)
    written = _digest(load_file(str(tmp_path / "soup" / "model.safetensors")))
    assert written in {h for h, v in seen if v == res.soup_score.value}
    m = soup.read_manifest(tmp_path / "soup")
    chosen = m.merge_method
    if chosen is None:  # a seed won: one ingredient alone, its own bytes
        assert sum(1 for w in res.weights.values() if w) == 1
    elif chosen["name"] == "ties":
        assert 0.3 <= chosen["parameters"]["density"] <= 1.0
    import optuna  # noqa: F401  the study holds both methods' trials
    assert {"linear", "ties"} <= {t.get("method") for t in _trial_params(tmp_path)}


def _trial_params(tmp_path):
    import glob

    import optuna

    (db,) = glob.glob(str(tmp_path / ".soup.soup-study.sqlite"))
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    (summary,) = optuna.study.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    return [t.params for t in study.trials]


def test_search_refuses_a_method_parameter_no_method_has(tmp_path):
    base, _, fts, _ = _family(tmp_path)
    with pytest.raises(RecipeError, match="strategy.params.t: none of linear, ties has this parameter"):
        soup.search_soup(fts, lambda c: 0.0, n_trials=2, methods=["linear", "ties"], params={"t": [0, 1]},
                         method="linear", base=base, cache=None)
    with pytest.raises(RecipeError, match="ties needs a base model"):
        soup.search_soup(fts, lambda c: 0.0, n_trials=2, methods=["linear", "ties"], cache=None)


def test_the_docs_methods_table_lists_every_method_with_its_parameters():
    """docs/methods.md's table is the registry's: every method, its base, parameters and defaults."""
    import re
    from pathlib import Path

    from soup.methods.registry import builtin_methods

    text = (Path(__file__).parent.parent / "docs" / "methods.md").read_text()
    table = re.search(r"<!-- methods-table.*?-->\n(.*?)\n<!-- /methods-table -->", text, re.S).group(1)
    rows = {line.split("|")[1].strip().strip("`"): line for line in table.splitlines()[2:]}
    assert set(rows) == set(builtin_methods())
    for name, cls in builtin_methods().items():
        row = rows[name]
        assert row.split("|")[2].strip() == ("yes" if cls.needs_base else "no"), name
        for p, spec in cls.parameters.items():
            default = "required" if spec.default is None else repr(spec.default)
            assert f"`{p}`{' (per model)' if spec.per_model else ''} = {default}" in row, (name, p)
        assert cls.reference in row


MERGEKIT_CONFIGS = {  # one config of each kind: (method parameters, per-model parameters, models used)
    "linear": ({}, {"weight": 1.0}, 3), "task_arithmetic": ({"lambda": 0.8}, {"weight": 0.5}, 3),
    "ties": ({"normalize": True}, {"density": 0.5, "weight": 1.0}, 3),
    "dare_ties": ({}, {"density": 0.6, "weight": 1.0}, 3), "dare_linear": ({}, {"density": 0.6, "weight": 0.5}, 3),
    "breadcrumbs": ({}, {"density": 0.8, "gamma": 0.05, "weight": 1.0}, 3),
    "breadcrumbs_ties": ({}, {"density": 0.8, "gamma": 0.05, "weight": 1.0}, 3),
    "della": ({}, {"density": 0.5, "epsilon": 0.1, "weight": 1.0}, 3),
    "della_linear": ({}, {"density": 0.5, "epsilon": 0.1, "weight": 1.0}, 3),
    "sce": ({"select_topk": 0.5}, {}, 3), "model_stock": ({}, {}, 3), "slerp": ({"t": 0.3}, {}, 1),
    "nuslerp": ({}, {"weight": 0.5}, 2), "multislerp": ({}, {"weight": 1.0}, 3), "karcher": ({}, {}, 3),
    "nearswap": ({"t": 0.001}, {}, 1), "arcee_fusion": ({}, {}, 1), "ram": ({}, {}, 3),
    "ramplus_tl": ({}, {}, 3),
}


@pytest.mark.parametrize("name", sorted(MERGEKIT_CONFIGS))
def test_a_mergekit_config_of_each_kind_makes_the_tensors_of_the_python_api(tmp_path, name):
    """Each method's mergekit YAML (``soup run config.yml``) gives the bytes of ``soup.merge(method=...)``,
    whose values the method tests check against the definitions."""
    base, _, fts, _ = _family(tmp_path)
    glob, per_model, n = MERGEKIT_CONFIGS[name]
    config = {"merge_method": name, "base_model": "base", "parameters": glob,
              "models": [{"model": f"ft{i}", "parameters": per_model} for i in range(n)]}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(config))
    res = CliRunner().invoke(app, ["run", str(tmp_path / "mk.yml"), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    method = {"name": name, **glob, **({"models": [per_model] * n} if per_model else {})}
    direct = soup.merge(fts[:n], None, method=method, base=base).state_dict
    assert _digest(load_file(str(tmp_path / "out" / "model.safetensors"))) == _digest(direct)
