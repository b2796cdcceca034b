"""Adapter soups with real peft on a tiny Llama: merged weights, the rank-concatenated adapter, SVD
truncation errors, LoRA pairs inside full checkpoints, refusals, CLI, recipe and Python API."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

peft = pytest.importorskip("peft")

from tiny_lm import build_tiny_lm  # noqa: E402
from tiny_vlm import build_remote, finetunes, inputs, load_remote  # noqa: E402

import soup  # noqa: E402
from soup.cli import app  # noqa: E402
from soup.errors import CheckpointError, IncompatibleIngredients, RecipeError  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.tensor([[2, 10, 11, 12, 13, 14, 15]])
WEIGHTS = [0.5, 0.3, 0.2]


def _adapter(base: Path, folder: Path, config, seed: int) -> Path:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:  # B starts at zero: give every factor a value
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny Llama and three LoRA adapters of it: ranks 4 / 2 (+ rank and alpha patterns) / 8 (rsLoRA)."""
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("adapters")
    base = build_tiny_lm(root / "base")
    common = dict(target_modules=TARGETS, modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    configs = [LoraConfig(r=4, lora_alpha=8, **common),
               LoraConfig(r=2, lora_alpha=3, rank_pattern={"down_proj": 6},
                          alpha_pattern={"layers.1.self_attn.q_proj": 5}, **common),
               LoraConfig(r=8, lora_alpha=4, use_rslora=True, **common)]
    ads = [_adapter(base, root / f"lora{i}", c, seed=i) for i, c in enumerate(configs)]
    return base, ads


def _reference(base: Path, ads: list[Path], weights) -> dict[str, torch.Tensor]:
    """W0 + sum_i w_i s_i B_i A_i in float64, with each scaling read from peft's own loaded layers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    w0 = load_file(str(base / "model.safetensors"))
    ref = {k: v.double() for k, v in w0.items()}
    for w, ad in zip(weights, ads):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), ad)
        for name, mod in model.base_model.model.named_modules():
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                a, b = mod.lora_A["default"].weight.double(), mod.lora_B["default"].weight.double()
                ref[f"{name}.weight"] += w * mod.scaling["default"] * (b @ a)
    heads = [load_file(str(ad / "adapter_model.safetensors"))["base_model.model.lm_head.weight"] for ad in ads]
    ref["lm_head.weight"] = sum(w * h.double() for w, h in zip(weights, heads))
    return ref


def test_merge_into_equals_direct_formula_and_concat_adapter_gives_same_logits(lm, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, ads = lm
    merged = soup.adapter_soup(ads, tmp_path / "full", weights=WEIGHTS, merge_into=base)
    ref = _reference(base, ads, WEIGHTS)
    got = load_file(str(merged.path / "model.safetensors"))
    assert set(got) == set(ref)
    worst = max(float((got[k].double() - ref[k]).abs().max() / ref[k].abs().max()) for k in ref)
    assert worst < 1e-6  # float32 arithmetic against the float64 reference (measured ~1e-7)
    assert merged.manifest.method.name == "adapter-merge"
    assert (merged.path / "config.json").is_file() and (merged.path / "soup.json").is_file()

    concat = soup.adapter_soup(ads, tmp_path / "adapter", weights=WEIGHTS)
    cfg = json.loads((concat.path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 + 2 + 8 and cfg["lora_alpha"] == cfg["r"] and cfg["use_rslora"] is False
    assert set(cfg["rank_pattern"].values()) == {4 + 6 + 8}  # down_proj modules
    full = AutoModelForCausalLM.from_pretrained(merged.path).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), concat.path).eval()
    with torch.no_grad():
        a, b = full(IDS).logits, with_adapter(IDS).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())  # measured ~3e-6


def test_svd_rank_reports_the_error_measured_from_the_weights(lm, tmp_path):
    base, ads = lm
    res = soup.adapter_soup(ads, tmp_path / "r3", weights=WEIGHTS, rank=3)
    exact = soup.adapter_soup(ads, None, weights=WEIGHTS).state_dict
    written = load_file(str(res.path / "adapter_model.safetensors"))
    cfg = json.loads((res.path / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 3
    assert len(res.errors) == 6 and res.worst[1] == max(res.errors.values()) > 0
    for module, reported in res.errors.items():
        key = f"base_model.model.{module}"
        d = exact[f"{key}.lora_B.weight"].double() @ exact[f"{key}.lora_A.weight"].double()
        approx = written[f"{key}.lora_B.weight"].double() @ written[f"{key}.lora_A.weight"].double()
        measured = float(torch.linalg.matrix_norm(d - approx) / torch.linalg.matrix_norm(d))
        assert math.isclose(reported, measured, rel_tol=1e-5, abs_tol=1e-7), (module, reported, measured)
    options = res.manifest.method.options
    assert options["worst"]["module"] == res.worst[0] and options["relative_errors"] == res.errors
    # a rank at least the summed rank is exact
    big = soup.adapter_soup(ads, None, weights=WEIGHTS, rank=64)
    assert max(big.errors.values()) < 1e-6


def test_mismatched_adapters_are_refused_naming_the_module(lm, tmp_path):
    from peft import LoraConfig

    base, ads = lm
    other = _adapter(base, tmp_path / "other", LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                          modules_to_save=["lm_head"], task_type="CAUSAL_LM"), 9)
    with pytest.raises(IncompatibleIngredients, match=r"module model\.layers\.0\.mlp\.down_proj: has a LoRA in "):
        soup.adapter_soup([ads[0], other], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"layers.0.self_attn.q_proj": 16}  # says 16 where the tensors have 4
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"module model\.layers\.0\.self_attn\.q_proj: the config gives rank 16"):
        soup.adapter_soup([other], None)
    with pytest.raises(RecipeError, match="rank"):
        soup.adapter_soup(ads, tmp_path / "x", merge_into=base, rank=2)
    with pytest.raises(RecipeError, match="unknown option"):
        soup.adapter_soup(ads, tmp_path / "x", shard_sise="1GB")


def test_cli_and_recipe(lm, tmp_path):
    base, ads = lm
    runner = CliRunner()
    res = runner.invoke(app, ["merge", *map(str, ads), "-o", str(tmp_path / "cli"), "--rank", "2", "-q"])
    assert res.exit_code == 0, res.output
    assert "worst relative error" in res.output
    res = runner.invoke(app, ["merge", str(ads[0]), str(base), "-o", str(tmp_path / "mixed"), "-q"])
    assert res.exit_code == 1 and "is not a PEFT adapter folder" in res.output
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"ingredients: [{ads[0]}, {ads[1]}, {ads[2]}]\n"
                      "strategy: {name: average, weights: [5, 3, 2]}\n"
                      f"merge_into: {base}\noutput: ./from-recipe\n")
    res = runner.invoke(app, ["run", str(recipe), "-q"])
    assert res.exit_code == 0, res.output
    ref = _reference(base, ads, WEIGHTS)
    got = load_file(str(tmp_path / "from-recipe" / "model.safetensors"))
    assert max(float((got[k].double() - ref[k]).abs().max()) for k in ref) < 1e-5


# ---- LoRA pairs inside full checkpoints ------------------------------------------------------------------


@pytest.fixture(scope="module")
def xcomposer(tmp_path_factory):
    root = tmp_path_factory.mktemp("plora")
    base = build_remote(root / "base", "xcomposer")
    folders, states = finetunes(base, root, 3, scale=0.1)
    return folders, states


def _pairs(state):
    return [(a, a.replace("Plora_A", "Plora_B")) for a in state if "Plora_A" in a]


def test_pair_rule_soups_the_deltas_exactly_and_updates_the_rank_key(xcomposer, tmp_path):
    folders, states = xcomposer
    res = soup.merge(folders, tmp_path / "soup", rules=[{"pattern": "*.Plora_A.weight", "pair": "*.Plora_B.weight",
                                                        "rank_key": "lora_rank"}])
    assert not res.warnings
    assert json.loads((res.path / "config.json").read_text())["lora_rank"] == 12
    model = load_remote(res.path)  # loads with its own code at the new rank
    sd = model.state_dict()
    for a, b in _pairs(states[0]):
        ref = sum(s[b].double() @ s[a].double() for s in states) / 3
        assert torch.allclose(sd[b].double() @ sd[a].double(), ref, atol=1e-6)  # measured ~3e-9
        naive = (sum(s[b] for s in states) / 3).double() @ (sum(s[a] for s in states) / 3).double()
        assert not torch.allclose(naive, ref, atol=1e-4)  # what averaging A and B separately gives
    with torch.no_grad():
        assert model(**inputs("xcomposer")).logits.isfinite().all()


def test_pair_modes_svd_independent_and_the_unpaired_warning(xcomposer, tmp_path):
    folders, states = xcomposer
    svd = soup.merge(folders, None, rules=["*.Plora_A.weight=pair:*.Plora_B.weight:svd"])
    assert any("refactored to their rank by SVD" in w for w in svd.warnings)
    a, b = _pairs(states[0])[0]
    assert svd.state_dict[a].shape == states[0][a].shape
    ind = soup.merge(folders, None, rules=["*.Plora_A.weight=pair:*.Plora_B.weight:independent"])
    assert any("averaged independently" in w for w in ind.warnings)
    plain = soup.merge(folders, None)
    assert any("--lora-pair '*.Plora_A.weight=*.Plora_B.weight'" in w for w in plain.warnings)
    assert torch.equal(plain.state_dict[a], ind.state_dict[a])
    report = soup.inspect(folders[0])
    assert report["lora_pairs"][0]["a"] == "*.Plora_A.weight" and report["lora_pairs"][0]["pairs"] == 4


def test_pair_rules_from_cli_and_recipe(xcomposer, tmp_path):
    folders, states = xcomposer
    runner = CliRunner()
    res = runner.invoke(app, ["merge", *map(str, folders), "-o", str(tmp_path / "c"), "-q",
                              "--lora-pair", "*.Plora_A.weight=*.Plora_B.weight", "--rank-key", "lora_rank"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "c" / "config.json").read_text())["lora_rank"] == 12
    res = runner.invoke(app, ["merge", *map(str, folders), "-o", str(tmp_path / "d"),
                              "--lora-pair", "*.Plora_A.weight=*.Plora_B.weight", "--pair-mode", "average"])
    assert res.exit_code == 2 and "pair-mode" in res.output
    res = runner.invoke(app, ["merge", *map(str, folders), "-o", str(tmp_path / "e"),
                              "--lora-pair", "*.Plora_A.weight=*.Plora_B.weight", "--rank-key", "no_such_key"])
    assert res.exit_code == 1 and "rank_key no_such_key" in res.output and not (tmp_path / "e").exists()
    res = runner.invoke(app, ["inspect", str(folders[0])])
    assert "--lora-pair '*.Plora_A.weight=*.Plora_B.weight'" in res.output
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"ingredients: [{folders[0]}, {folders[1]}]\nstrategy: average\n"
                      "lora_pairs: [{a: '*.Plora_A.weight', b: '*.Plora_B.weight', mode: svd}]\noutput: ./out\n")
    res = runner.invoke(app, ["run", str(recipe), "-q"])
    assert res.exit_code == 0, res.output
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    a, _ = _pairs(states[0])[0]
    assert written[a].shape == states[0][a].shape
    recipe.write_text("ingredients: [a, b]\nstrategy: average\nlora_pairs: [{a: '*.A', b: '*.B', mode: odd}]\n")
    res = runner.invoke(app, ["validate", str(recipe)])
    assert res.exit_code == 1 and "lora_pairs[0].mode" in res.output


def test_pair_of_plain_checkpoint_equals_mean_of_deltas(tmp_path):
    """A hand-made full checkpoint with lora_A/lora_B-style pairs of different ranks per pair."""
    states = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        states.append({"layer.w": torch.randn(6, 5, generator=g), "layer.adapter.lora_A.weight":
                       torch.randn(3, 5, generator=g), "layer.adapter.lora_B.weight": torch.randn(6, 3, generator=g)})
        (tmp_path / f"m{i}").mkdir()
        save_file(states[-1], str(tmp_path / f"m{i}" / "model.safetensors"))
    res = soup.merge([tmp_path / f"m{i}" for i in range(3)], None, weights=[1, 2, 1],
                     rules=["*.lora_A.weight=pair:*.lora_B.weight"])
    sd = res.state_dict
    ref = sum(w * s["layer.adapter.lora_B.weight"].double() @ s["layer.adapter.lora_A.weight"].double()
              for w, s in zip([0.25, 0.5, 0.25], states))
    got = sd["layer.adapter.lora_B.weight"].double() @ sd["layer.adapter.lora_A.weight"].double()
    assert sd["layer.adapter.lora_A.weight"].shape == (9, 5)
    assert float((got - ref).abs().max()) < 1e-5


# ---- evaluated adapter soups: one resident peft model, adapters swapped in place ---------------------------


class ResidentAdapterEval(soup.Evaluator):
    """Base loaded once; each candidate's adapter tensors are copied into the resident peft model."""

    direction = "minimize"
    base_loads = 0

    def __init__(self, base=None, target=None, **args):
        super().__init__(**args)
        self.base, self.model = base, None
        self.target = torch.load(target) if isinstance(target, str) else target  # a recipe gives a .pt file

    def score(self, candidate):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        if self.model is None:  # the first candidate fixes the shapes (rank sum r_i in every candidate)
            type(self).base_loads += 1
            self.model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(self.base),
                                                   candidate.path()).eval()
        else:
            candidate.load_into(self.model)
        with torch.no_grad():
            return float((self.model(IDS).logits - self.target).abs().max())


def _logits(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        return model(IDS).logits


def test_greedy_over_adapters_keeps_one_resident_model(lm, tmp_path):
    base, ads = lm
    target = _logits(base, soup.adapter_soup([ads[0], ads[2]], tmp_path / "target").path)
    ResidentAdapterEval.base_loads = 0
    ev = ResidentAdapterEval(base=base, target=target)
    res = soup.greedy_soup(ads, evaluator=ev, out=tmp_path / "greedy", cache=None)
    assert ResidentAdapterEval.base_loads == 1
    assert [w > 0 for w in res.weights.values()] == [True, False, True], res.trajectory
    assert res.soup_score.value < 1e-4
    assert torch.allclose(_logits(base, res.path), target, atol=1e-4)
    m = soup.read_manifest(res.path)  # the evaluation is recorded as for any soup
    assert m.method.name == "greedy" and [e.kept for e in m.ingredients] == [True, False, True]
    assert len(m.evaluation.history) == len(res.trajectory) + 2 and "adapter" in m.method.options
    best = soup.maximum_soup(ads, evaluator=ev, out=tmp_path / "max", cache=None)
    assert sum(w > 0 for w in best.weights.values()) == 1 and ResidentAdapterEval.base_loads == 1
    calls = []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(soup.SoupError, match="is not a soup"):  # refused before any evaluation
        soup.greedy_soup(ads, evaluator=lambda c: calls.append(c) or 0.0, out=tmp_path / "mine", cache=None,
                         overwrite=True)
    assert calls == [] and (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    torch.save(target, tmp_path / "target.pt")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"ingredients: [{ads[0]}, {ads[1]}, {ads[2]}]\nstrategy: greedy\n"
                      f"evaluator: {{name: '{Path(__file__).resolve()}:ResidentAdapterEval', "
                      f"args: {{base: '{base}', target: '{tmp_path / 'target.pt'}'}}}}\noutput: ./from-recipe\ncache: false\n")
    res = CliRunner().invoke(app, ["run", str(recipe), "-q"])
    assert res.exit_code == 0, res.output
    assert torch.allclose(_logits(base, tmp_path / "from-recipe"), target, atol=1e-4)


def test_adapter_candidate_in_place_equals_loading_its_folder(lm, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from soup.adapters.candidates import AdapterScorer
    from soup.adapters.merging import open_adapters
    from soup.options import MergeOptions

    base, ads = lm
    scorer = AdapterScorer(open_adapters(ads), [ResidentAdapterEval()], opts=MergeOptions(), paths=ads)
    with scorer.candidate([1 / 3] * 3, "all") as first, scorer.candidate([0.6, 0.0, 0.4], "two") as cand:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), first.path()).eval()
        assert set(cand.state_dict()) == set(load_file(str(first.path() / "adapter_model.safetensors")))
        cand.load_into(model)
        with torch.no_grad():
            got = model(IDS).logits
        want = _logits(base, cand.path())
        assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
        direct = _logits(base, soup.adapter_soup([ads[0], ads[2]], tmp_path / "two", weights=[0.6, 0.4]).path)
        assert torch.allclose(got, direct, atol=1e-4), float((got - direct).abs().max())
