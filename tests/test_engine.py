"""The streaming engine: exact weighted means, shards, .bin inputs, rules, buffers, sinks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import soup
from soup.errors import IncompatibleIngredients, RecipeError, SoupError

from conftest import load_soup, reference_mean, write_checkpoint, make_state


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weighted_mean_is_bit_exact(make_ingredients, tmp_path, dtype):
    paths, states = make_ingredients(3, dtype=dtype)
    res = soup.merge(paths, tmp_path / "out", weights=[1, 2, 5])
    got = load_soup(res.path)
    ref = reference_mean(states, [1 / 8, 2 / 8, 5 / 8])
    assert set(got) == set(ref)
    for name in ref:
        assert got[name].dtype == ref[name].dtype, name
        assert torch.equal(got[name], ref[name]), name
    assert res.manifest.ingredients[2].weight == pytest.approx(5 / 8)


@pytest.mark.parametrize("accumulate,np_acc", [("auto", np.float64), ("float64", np.float64),
                                                ("float32", np.float32)])
def test_float32_mean_matches_numpy(make_ingredients, tmp_path, accumulate, np_acc):
    """An independent reference: numpy arithmetic, product then sum, in ingredient order (float32
    inputs accumulate in float64 by default, in float32 when asked)."""
    paths, states = make_ingredients(4, dtype=torch.float32)
    w = [0.1, 0.2, 0.3, 0.4]
    res = soup.merge(paths, tmp_path / "out", weights=w, normalize=False, accumulate=accumulate)
    got = load_soup(res.path)
    name = "model.layers.0.mlp.up_proj.weight"
    acc = np_acc(w[0]) * states[0][name].numpy().astype(np_acc)
    for st, wi in zip(states[1:], w[1:]):
        acc = acc + np_acc(wi) * st[name].numpy().astype(np_acc)
    assert np.array_equal(got[name].numpy(), acc.astype(np.float32))
    assert res.manifest.accumulate == {"auto": "auto (float64)"}.get(accumulate, accumulate)


def _copies(x: torch.Tensor, n: int = 3) -> list[torch.Tensor]:
    return [x.clone() for _ in range(n)]


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_soup_of_copies_is_the_checkpoint_without_the_shortcut(monkeypatch, dtype, kernel):
    """x*(1/3) + x*(1/3) + x*(1/3), accumulated with twice the input's mantissa, rounds back to x: the
    default accumulation proves it, not the identical-tensor shortcut (disabled here)."""
    from soup.engine.combine import Combiner
    from soup.engine.plan import Job

    if not kernel:
        monkeypatch.setenv("SOUP_NO_KERNEL", "1")
    n = 1_000_003
    x = torch.randn(n, generator=torch.Generator().manual_seed(7)).to(dtype)
    third = torch.tensor(1 / 3, dtype=torch.float32)
    narrow = (x.float() * third + x.float() * third + x.float() * third).to(dtype)  # float32 throughout
    if dtype == torch.float32:
        assert not torch.equal(narrow, x)  # float32 accumulation would not give x back: the test has teeth
    job = Job("t", (n,), "mean", dtype, weights=(1 / 3,) * 3)
    comb = Combiner(["a", "b", "c"], where=lambda i, name: name, identical=False)
    assert (comb._fused is not None) == (kernel and soup.engine.kernel.load() is not None)
    got = torch.cat([b.clone() for b in comb.blocks(job, _copies(x))])
    assert got.dtype == dtype and torch.equal(got.view(torch.uint8), x.view(torch.uint8))
    forced = Combiner(["a", "b", "c"], where=lambda i, name: name, identical=False, accumulate=torch.float32)
    if dtype == torch.float32:  # float32 asked: honoured, and then not exact
        assert not torch.equal(torch.cat([b.clone() for b in forced.blocks(job, _copies(x))]), x)


@pytest.mark.parametrize("shortcut", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_of_copies_is_bit_identical(tmp_path, monkeypatch, dtype, shortcut):
    """Souping copies of one checkpoint returns it bit for bit (the whole engine, default options),
    with the identical-tensor shortcut and without it (every mean computed)."""
    from soup.engine.combine import Combiner

    if not shortcut:
        monkeypatch.setattr(Combiner, "_identical", lambda self, xs, numel: False)
    state = make_state(5, dtype)
    paths = [write_checkpoint(tmp_path / f"copy{i}", state) for i in range(3)]
    res = soup.merge(paths, tmp_path / "out")
    got = load_soup(res.path)
    assert all(torch.equal(got[k].reshape(-1).view(torch.uint8), state[k].reshape(-1).view(torch.uint8))
               for k in state)
    assert res.manifest.accumulate == ("auto (float64)" if dtype == torch.float32 else "auto (float32)")


def test_uniform_is_default_and_blocks_do_not_matter(make_ingredients, tmp_path):
    paths, states = make_ingredients(3, big=3_000_000)  # 3M elements: several 1M blocks
    got = load_soup(soup.merge(paths, tmp_path / "out").path)
    ref = reference_mean(states, [1 / 3] * 3)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


def test_sharded_in_sharded_out(make_ingredients, tmp_path):
    paths, states = make_ingredients(3, shards=3, big=200_000)
    res = soup.merge(paths, tmp_path / "out", shard_size=2_000)
    files = sorted(p.name for p in res.path.glob("*.safetensors"))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((res.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(states[0])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in states[0].values())
    for fname in set(index["weight_map"].values()):
        with safe_open(str(res.path / fname), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert {k for k, v in index["weight_map"].items() if v == fname} == set(f.keys())
    got = load_soup(res.path)
    ref = reference_mean(states, [1 / 3] * 3)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    # manifest: written last, hashes of every shard
    import hashlib
    m = json.loads((res.path / "soup.json").read_text())
    for fname, entry in m["files"].items():
        assert hashlib.sha256((res.path / fname).read_bytes()).hexdigest() == entry["sha256"]


@pytest.mark.parametrize("shards", [1, 2])
def test_bin_inputs(make_ingredients, tmp_path, shards):
    paths, states = make_ingredients(2, fmt="bin", shards=shards)
    got = load_soup(soup.merge(paths, tmp_path / "out", weights=[3, 1]).path)
    ref = reference_mean(states, [0.75, 0.25])
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_single_files_and_mixed_formats(tmp_path):
    a = write_checkpoint(tmp_path / "a", make_state(1), fmt="bin")
    b = write_checkpoint(tmp_path / "b", make_state(2))
    got = load_soup(soup.merge([a / "pytorch_model.bin", b / "model.safetensors"], tmp_path / "out").path)
    ref = reference_mean([make_state(1), make_state(2)], [0.5, 0.5])
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_rules_take_drop_and_pattern_weights(make_ingredients, tmp_path):
    paths, states = make_ingredients(3)
    res = soup.merge(paths, tmp_path / "out", rules=[
        "model.vision_tower.*=take:2", "*.lora_A.*=drop", "model.mm_projector.*=1,0,1", "model.*=weights:1,1,2"])
    got = load_soup(res.path)
    assert torch.equal(got["model.vision_tower.norm.weight"], states[2]["model.vision_tower.norm.weight"])
    assert "model.layers.0.mlp.up_proj.lora_A.weight" not in got
    proj = reference_mean(states, [0.5, 0.0, 0.5])["model.mm_projector.weight"]
    # a zero weight skips the ingredient: (x0*0.5) + (x2*0.5)
    exp = (states[0]["model.mm_projector.weight"].float() * 0.5
           + states[2]["model.mm_projector.weight"].float() * 0.5).to(torch.bfloat16)
    assert torch.equal(got["model.mm_projector.weight"], exp) and torch.equal(proj, exp)
    norm = reference_mean(states, [0.25, 0.25, 0.5])["model.norm.weight"]
    assert torch.equal(got["model.norm.weight"], norm)
    assert res.manifest.dropped == ["model.layers.0.mlp.up_proj.lora_A.weight"]
    assert res.manifest.rules[0] == {"pattern": "model.vision_tower.*", "action": "take", "ingredient": 2}


def test_take_by_label_and_bad_rules(make_ingredients, tmp_path):
    paths, states = make_ingredients(2)
    got = load_soup(soup.merge(paths, tmp_path / "o1", rules=["model.norm.*=take:ing1"]).path)
    assert torch.equal(got["model.norm.weight"], states[1]["model.norm.weight"])
    with pytest.raises(RecipeError, match="no ingredient named 'nope'"):
        soup.merge(paths, tmp_path / "o2", rules=["x=take:nope"])
    with pytest.raises(RecipeError, match="out of range"):
        soup.merge(paths, tmp_path / "o3", rules=["x=take:7"])
    with pytest.raises(RecipeError, match="2 weights given for 3|3 weights given for 2"):
        soup.merge(paths, tmp_path / "o4", rules=["x=1,2,3"])
    assert not (tmp_path / "o2").exists()


def test_one_hot_weights_copy_bytes(make_ingredients, tmp_path):
    paths, states = make_ingredients(3)
    got = load_soup(soup.merge(paths, tmp_path / "out", weights=[0, 1, 0]).path)
    assert all(torch.equal(got[k], states[1][k]) for k in states[1])


def test_output_dtype_and_float64_accumulation(make_ingredients, tmp_path):
    paths, states = make_ingredients(3, dtype=torch.float32)
    res = soup.merge(paths, tmp_path / "out", dtype="bfloat16", accumulate="float64")
    got = load_soup(res.path)
    ref = reference_mean(states, [1 / 3] * 3, out_dtype=torch.bfloat16, acc=torch.float64)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert got["model.position_ids"].dtype == torch.int64
    assert json.loads((res.path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_non_float_buffers_differing_warn_or_fail(tmp_path):
    a, b = make_state(1), make_state(2)
    b["model.position_ids"] = b["model.position_ids"] + 1
    pa, pb = write_checkpoint(tmp_path / "a", a), write_checkpoint(tmp_path / "b", b)
    res = soup.merge([pa, pb], tmp_path / "out")
    assert any("model.position_ids" in w for w in res.warnings)
    assert torch.equal(load_soup(res.path)["model.position_ids"], a["model.position_ids"])
    with pytest.raises(IncompatibleIngredients, match="model.position_ids"):
        soup.merge([pa, pb], tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists()


def test_aux_files_copied_from_chosen_ingredient(tmp_path):
    a = write_checkpoint(tmp_path / "a", make_state(1), config={"model_type": "toy", "who": "a"})
    b = write_checkpoint(tmp_path / "b", make_state(2), config={"model_type": "toy", "who": "b"})
    res = soup.merge([a, b], tmp_path / "out", config_from=1)
    assert json.loads((res.path / "config.json").read_text())["who"] == "b"
    assert (res.path / "preprocessor_config.json").exists() and (res.path / "tokenizer_config.json").exists()


def test_in_memory_sink_and_state_dict_ingredients(make_ingredients, tmp_path):
    paths, states = make_ingredients(2)
    res = soup.merge([paths[0], states[1]], None, weights=[1, 3])
    ref = reference_mean(states, [0.25, 0.75])
    assert res.path is None and all(torch.equal(res.state_dict[k], ref[k]) for k in ref)
    assert res.state_dict["model.scalar"].shape == ()


def test_existing_output_is_kept_unless_overwrite(make_ingredients, tmp_path):
    paths, _ = make_ingredients(2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # not a soup: refused even with overwrite
        with pytest.raises(SoupError, match="is not a soup"):
            soup.merge(paths, out, overwrite=overwrite)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    first = soup.merge(paths, out, weights=[1, 0])
    with pytest.raises(SoupError, match="already exists"):
        soup.merge(paths, out)
    soup.merge(paths, out, overwrite=True)  # a previous soup is replaced
    assert json.loads((out / "soup.json").read_text())["ingredients"][1]["weight"] == 0.5
    assert first.path == out and sorted(p.name for p in tmp_path.iterdir()) == ["ing0", "ing1", "out"]


def test_incompatible_shapes_and_names(tmp_path):
    a, b = make_state(1), make_state(2)
    b["model.norm.weight"] = torch.zeros(25, dtype=torch.bfloat16)
    pa, pb = write_checkpoint(tmp_path / "a", a), write_checkpoint(tmp_path / "b", b)
    with pytest.raises(IncompatibleIngredients, match=r"model.norm.weight: shape \[24\] in a but \[25\] in b"):
        soup.merge([pa, pb], tmp_path / "out")
    c = make_state(3)
    del c["model.mm_projector.weight"]
    pc = write_checkpoint(tmp_path / "c", c)
    with pytest.raises(IncompatibleIngredients, match="model.mm_projector.weight is in a but not in c"):
        soup.merge([pa, pc], tmp_path / "out")
    d = write_checkpoint(tmp_path / "d", make_state(4, torch.float16))
    with pytest.raises(IncompatibleIngredients, match="dtype"):
        soup.merge([pa, d], tmp_path / "out")
    mixed = load_soup(soup.merge([pa, d], tmp_path / "mixed", dtype="float32").path)  # allowed with --dtype
    assert mixed["model.norm.weight"].dtype == torch.float32
    assert not (tmp_path / "out").exists()


def test_inspect_summary_and_differences(tmp_path):
    a = write_checkpoint(tmp_path / "a", make_state(1), shards=2)
    b = make_state(2)
    b["model.norm.weight"] = torch.zeros(25, dtype=torch.bfloat16)
    pb = write_checkpoint(tmp_path / "b", b)
    s = soup.inspect(a)
    assert s["tensors"] == 10 and len(s["files"]) == 2
    assert s["parameters"] == sum(t.numel() for t in make_state(1).values())
    rep = soup.inspect(a, pb)
    assert rep["compatible"] is False
    assert rep["differences"] == [{"tensor": "model.norm.weight", "issue": "shape", "values": {"a": [24], "b": [25]}}]
