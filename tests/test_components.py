"""Components by tensor name (soup.io.components), their suggested rules, and the engine's identical-bytes rule."""

from __future__ import annotations

import pytest
import torch

import soup
from soup.io.checkpoint import TensorInfo
from soup.engine.combine import Combiner, same_bits
from soup.io.components import classify, group, suggest_rules
from soup.errors import CheckpointError
from soup.engine.plan import Job

from conftest import load_soup, reference_mean, write_checkpoint

# real tensor names of the seed architectures (one or two per part)
NAMES = {
    "InternLM-XComposer2": {
        "vit.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight": ("vision", "vit"),
        "vision_proj.0.weight": ("connector", "vision_proj"),
        "model.tok_embeddings.weight": ("embeddings", "model.tok_embeddings"),
        "model.layers.0.attention.wqkv.weight": ("language", "language model"),
        "model.layers.0.attention.wqkv.Plora_A.weight": ("lora", "Plora_* pairs"),
        "plora_glb_GN": ("language", "language model"),
        "output.weight": ("head", "output"),
    },
    "mPLUG-Owl2": {
        "model.vision_model.encoder.layers.3.self_attn.query_key_value.weight": ("vision", "model.vision_model"),
        "model.visual_abstractor.encoder.layers.0.crossattention.attention.query.weight":
            ("connector", "model.visual_abstractor"),
        "model.layers.0.self_attn.k_proj.multiway.1.weight": ("language", "language model"),
        "lm_head.weight": ("head", "lm_head"),
    },
    "LLaVA (transformers files)": {
        "vision_tower.vision_model.embeddings.patch_embedding.weight": ("vision", "vision_tower"),
        "multi_modal_projector.linear_1.weight": ("connector", "multi_modal_projector"),
        "language_model.model.embed_tokens.weight": ("embeddings", "language_model.model.embed_tokens"),
        "language_model.model.layers.0.self_attn.q_proj.weight": ("language", "language model"),
        "language_model.lm_head.weight": ("head", "language_model.lm_head"),
    },
    "MG-LLaVA / XTuner": {
        "visual_encoder.vision_model.encoder.layers.0.mlp.fc1.weight": ("vision", "visual_encoder"),
        "visual_encoder_aux.stages.0.blocks.0.conv_dw.weight": ("vision", "visual_encoder_aux"),
        "projector.model.0.weight": ("connector", "projector"),
        "llm.model.layers.0.mlp.down_proj.weight": ("language", "language model"),
        "llm.model.layers.0.mlp.down_proj.lora_B.default.weight": ("lora", "lora_* pairs"),
    },
    "POINTS / ParGo": {
        "general_vit.blocks.0.attn.qkv.weight": ("vision", "general_vit"),
        "vision_encoder.blocks.0.attn.qkv.weight": ("vision", "vision_encoder"),
        "vision_projector.mlp.0.weight": ("connector", "vision_projector"),
        "model.pargo_connector.queries.weight": ("connector", "model.pargo_connector"),
        "llm.model.norm.weight": ("language", "language model"),
    },
}


@pytest.mark.parametrize("family", list(NAMES))
def test_seed_architectures_are_grouped(family):
    for name, (kind, label) in NAMES[family].items():
        got = classify(name)
        assert got[:2] == (kind, label), (name, got)


def _table(names):
    return {n: TensorInfo(n, torch.bfloat16, (2, 3), None, None) for n in names}


def test_group_counts_and_patterns():
    names = list(NAMES["MG-LLaVA / XTuner"]) + ["llm.model.norm.weight", "llm.lm_head.weight"]
    comps = {c.name: c for c in group(_table(names))}
    assert [c.kind for c in group(_table(names))][:2] == ["vision", "vision"]  # two towers, two rows
    assert comps["visual_encoder"].patterns == ["visual_encoder.*"] and comps["visual_encoder"].bytes == 12
    assert comps["language model"].patterns == ["llm.model.layers.*", "llm.model.norm.*"]
    assert comps["lora_* pairs"].patterns == ["*.lora_*"] and comps["llm.lm_head"].kind == "head"


def test_suggested_rules_never_catch_a_differing_tensor():
    names = ["model.vision_tower.blocks.0.weight", "model.vision_tower.blocks.0.lora_A.weight",
             "model.vision_tower.blocks.0.lora_B.weight", "model.layers.0.weight", "model.image_newline",
             "model.mm_projector.weight"]
    comps = group(_table(names))
    # the tower is frozen but LoRA inside it was trained: "model.vision_tower.*" would copy the LoRA
    identical = {"model.vision_tower.blocks.0.weight", "model.image_newline", "model.mm_projector.weight"}
    rules = suggest_rules(comps, identical, names)
    assert rules == ["model.vision_tower.blocks.0.weight=take:0", "model.mm_projector.*=take:0"]
    identical.add("model.layers.0.weight")  # now the language model is frozen too: its rows are exact
    rules = suggest_rules(comps, identical, names)
    assert "model.image_newline=take:0" in rules and "model.layers.*=take:0" in rules
    parsed = soup.engine.rules.parse_rules(rules)
    for n in names:
        rule = soup.engine.rules.match_rule(parsed, n)
        assert (rule is not None) == (n in identical), n


# ---- the engine: identical inputs are written as their bytes ------------------------------------------
def _states(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(300_000, generator=g).to(dtype)  # more than one block
    return [{"shared": shared.clone(), "moved": torch.randn(1000, generator=g).to(dtype)} for _ in range(3)]


def test_identical_tensor_written_as_its_bytes(tmp_path):
    states = _states()
    paths = [write_checkpoint(tmp_path / f"i{i}", st) for i, st in enumerate(states)]
    got = load_soup(soup.merge(paths, tmp_path / "soup", weights=[0.5, 0.3, 0.2]).path)
    assert same_bits(got["shared"], states[0]["shared"])  # whatever float32 rounding would have done
    assert torch.equal(got["moved"], reference_mean(states, [0.5, 0.3, 0.2])["moved"])
    got = load_soup(soup.merge(paths, tmp_path / "bf16", dtype="bfloat16").path)
    assert torch.equal(got["shared"], states[0]["shared"].to(torch.bfloat16))
    summed = soup.merge(paths, None, weights=[1, 1, 1], normalize=False).state_dict  # not a mean: no shortcut
    assert torch.equal(summed["shared"], reference_mean(states, [1.0, 1.0, 1.0])["shared"])


def test_identical_means_bit_identical_not_equal():
    a = torch.tensor([-0.0, 1.0])
    b = torch.tensor([0.0, 1.0])
    assert torch.equal(a, b) and not same_bits(a, b)
    nan = torch.tensor([float("nan")])
    assert same_bits(nan, nan.clone())
    odd = torch.arange(7, dtype=torch.bfloat16)
    assert same_bits(odd[1:], odd.clone()[1:]) and not same_bits(odd[1:], odd[:-1])


def test_identical_nonfinite_or_overflowing_is_still_an_error(tmp_path):
    for bad, dtype, words in ((float("nan"), None, "non-finite"), (1e6, "float16", "overflows float16")):
        states = _states()
        for st in states:
            st["shared"][123] = bad
        paths = [write_checkpoint(tmp_path / f"{words}{i}", st) for i, st in enumerate(states)]
        with pytest.raises(CheckpointError, match=f"tensor shared.*{words}"):
            soup.merge(paths, None, dtype=dtype)


def test_decision_is_per_tensor_not_per_block():
    """A tensor identical in its first blocks but not its last is a mean everywhere (block-size free)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, generator=g)
    views = [x.clone(), x.clone(), x.clone()]
    views[2][-1] += 1.0
    w = (0.5, 0.3, 0.2)
    job = Job("t", (40,), "mean", torch.float32, weights=w)
    want = reference_mean([{"t": v} for v in views], list(w))["t"]
    for block in (8, 40, 64):
        comb = Combiner(["a", "b", "c"], where=lambda i, n: n, block=block)
        got = torch.cat([b.clone() for b in comb.blocks(job, views)])
        comb.close()
        assert torch.equal(got, want), block
