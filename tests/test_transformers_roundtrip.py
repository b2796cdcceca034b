"""A tiny transformers model built in a fixture (no download): souped, loaded back, same logits."""

from __future__ import annotations

import pytest
import torch

import soup

from conftest import reference_mean

transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra")


def _tiny_llama(seed: int):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


@pytest.mark.parametrize("shard_size", ["5GB", "20KB"])
def test_souped_llama_loads_with_from_pretrained(tmp_path, shard_size):
    paths, states = [], []
    for i in range(3):  # three "fine-tunes": the base plus different perturbations
        m = _tiny_llama(0)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g).to(p.dtype))
        m.save_pretrained(tmp_path / f"ft{i}")
        paths.append(tmp_path / f"ft{i}")
        states.append({k: v.clone() for k, v in m.state_dict().items()})
    res = soup.merge(paths, tmp_path / "soup", weights=[0.5, 0.25, 0.25], shard_size=shard_size)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(res.path, dtype=torch.bfloat16).eval()
    # the reference: an ingredient loaded the same way, holding the reference mean
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(paths[0], dtype=torch.bfloat16).eval()
    ref_model.load_state_dict(reference_mean(states, [0.5, 0.25, 0.25]))
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = loaded(ids).logits, ref_model(ids).logits
        base_logits = transformers.AutoModelForCausalLM.from_pretrained(paths[0], dtype=torch.bfloat16)(ids).logits
    assert torch.equal(got, want)
    assert not torch.equal(got, base_logits)  # it really is a different model
    if shard_size == "20KB":
        assert (res.path / "model.safetensors.index.json").exists()
