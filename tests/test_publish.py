"""End to end with the local hub: hf:// ingredients pinned, soups pushed while written, model card."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from huggingface_hub import HfApi
from typer.testing import CliRunner

from soup.cli import app
from soup.hub import push

from conftest import load_soup, make_state, reference_mean, write_checkpoint
from conftest import TOKEN

pytestmark = pytest.mark.usefixtures("hf_isolated")

runner = CliRunner()


@pytest.fixture
def hub_ingredients(hub, tmp_path):
    """Two ingredient repos; ``acme/a`` moves on after the first commit (we pin the first)."""
    states = [make_state(1, big=3000), make_state(2, big=3000)]
    shas = []
    for name, st in zip(("a", "b"), states):
        res = push(write_checkpoint(tmp_path / "src" / name, st), f"acme/{name}", endpoint=hub.url)
        shas.append(res.commit)
    push(write_checkpoint(tmp_path / "src" / "a2", make_state(7, big=3000)), "acme/a", endpoint=hub.url)
    return states, shas


def test_merge_pulls_pinned_and_pushes_with_card(hub, hub_ingredients, tmp_path):
    states, shas = hub_ingredients
    out = tmp_path / "soup"
    res = runner.invoke(app, ["merge", f"hf://acme/a@{shas[0]}", "hf://acme/b", "-o", str(out), "-q",
                              "--endpoint", hub.url, "--push-to", "acme/soup", "--shard-size", "4KB"])
    assert res.exit_code == 0, res.output
    ref = reference_mean(states, [0.5, 0.5])
    got = load_soup(out)
    assert all(torch.equal(got[k], ref[k]) for k in ref)  # the pinned a, not the moved-on one
    m = json.loads((out / "soup.json").read_text())
    assert m["ingredients"][0]["revision"] == shas[0] and m["ingredients"][0]["repo"] == "acme/a"
    assert m["ingredients"][1]["revision"] == shas[1] and m["ingredients"][0]["fingerprint"].startswith("oids-")
    files = sorted(p.name for p in out.iterdir())
    assert len(m["files"]) > 1 and "README.md" in files
    remote = hub.files("acme/soup", "main")
    assert sorted(set(remote) - {".gitattributes"}) == files, (sorted(remote), files)
    for name in files:
        assert remote[name] == (out / name).read_bytes(), name
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["acme/a", "acme/b"] and "model-soup" in front["tags"]
    assert "pushed" in res.stdout
    assert len(HfApi(endpoint=hub.url).list_repo_commits("acme/soup")) >= 1


def test_recipe_push_and_soup_push_retry(hub, hub_ingredients, tmp_path):
    states, shas = hub_ingredients
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "ingredients": [{"repo": "acme/a", "revision": shas[0], "name": "a"}, {"repo": "acme/b"}],
        "strategy": {"name": "average", "weights": [3, 1]}, "endpoint": hub.url, "output": "out",
        "push_to": {"repo": "acme/avg", "commit_message": "an average soup"}, "cache": False}))
    res = runner.invoke(app, ["run", str(tmp_path / "r.yaml"), "-q"])
    assert res.exit_code == 0, res.output
    assert hub.files("acme/avg", "main")["soup.json"] == (tmp_path / "out" / "soup.json").read_bytes()
    assert "strategy" in (tmp_path / "out" / "README.md").read_text()  # the recipe is in the card
    # `soup push` of the same folder elsewhere, on a branch
    res = runner.invoke(app, ["push", str(tmp_path / "out"), "acme/copy", "--endpoint", hub.url])
    assert res.exit_code == 0, res.output
    assert hub.files("acme/copy", "main")["README.md"] == (tmp_path / "out" / "README.md").read_bytes()


def test_push_unauthorized_is_one_line_and_keeps_output(auth_hub, tmp_path, monkeypatch):
    a = write_checkpoint(tmp_path / "a", make_state(1))
    b = write_checkpoint(tmp_path / "b", make_state(2))
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_value")
    res = runner.invoke(app, ["merge", str(a), str(b), "-o", str(tmp_path / "out"), "-q",
                              "--endpoint", auth_hub.url, "--push-to", "acme/soup"])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "401" in lines[0] and "hf_wrong_token_value" not in res.output
    assert not (tmp_path / "out").exists()  # failed fast: nothing merged
    runner.invoke(app, ["merge", str(a), str(b), "-o", str(tmp_path / "out"), "-q"])
    res = runner.invoke(app, ["push", str(tmp_path / "out"), "acme/soup", "--endpoint", auth_hub.url])
    assert res.exit_code == 1 and (tmp_path / "out" / "soup.json").exists()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    res = runner.invoke(app, ["push", str(tmp_path / "out"), "acme/soup", "--endpoint", auth_hub.url])
    assert res.exit_code == 0, res.output
    assert TOKEN not in res.output


@pytest.mark.parametrize("uploads", ["as they come", "after the rename"])
def test_lfs_shards_reuse_the_writer_sha256(tmp_path, uploads):
    """Shards above the LFS threshold are pre-uploaded with the digest the writer computed, once each,
    even when every pre-upload starts only after the merge renamed its temporary folder into place."""
    import hashlib
    import threading

    from hubserver import running_hub
    from soup import merge
    from soup.hub import ShardUploader

    a = write_checkpoint(tmp_path / "a", make_state(1, big=20_000))
    b = write_checkpoint(tmp_path / "b", make_state(2, big=20_000))
    given = {}
    renamed = threading.Event()
    with running_hub(lfs_threshold=2000) as store:  # the shards are LFS files, the small ones are not
        up = ShardUploader("acme/lfs", endpoint=store.url)
        up.start()
        if uploads == "after the rename":  # the worst order the threads can take, made certain
            preupload = up.api.preupload_lfs_files

            def late(*args, **kwargs):
                assert renamed.wait(30)
                return preupload(*args, **kwargs)

            up.api.preupload_lfs_files = late

        def on_shard(path, sha256):
            up.shard_done(path, sha256)
            op = up._shards[path.name][0]
            given[path.name] = (sha256, op.upload_info.is_hashed and op.upload_info.sha256.hex())

        res = merge([a, b], tmp_path / "out", shard_size="20KB", on_shard=on_shard)
        renamed.set()
        assert (res.path / "soup.json").is_file()  # renamed into place before any pre-upload ran
        up.finish(res.path)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]  # the kept links are gone
        remote = store.files("acme/lfs", "main")
        batches = [r for _, r, _ in store.requests].count("lfs_batch")
        assert batches == len(given), store.requests  # one LFS batch per pre-upload; the commit reuses them, none of its own
        assert len(given) >= 2
        for name, (sha, in_op) in given.items():
            data = (tmp_path / "out" / name).read_bytes()
            assert sha == in_op == hashlib.sha256(data).hexdigest() == res.manifest.files[name].sha256
            assert remote[name] == data  # the server checks uploads against their sha256 too


def test_incompatible_hub_ingredient_fails_before_download(hub, hf_isolated, tmp_path):
    odd = make_state(3, big=3000)
    odd["model.norm.weight"] = torch.zeros(25, dtype=torch.bfloat16)
    push(write_checkpoint(tmp_path / "src" / "a", make_state(1, big=3000)), "acme/a", endpoint=hub.url)
    push(write_checkpoint(tmp_path / "src" / "odd", odd), "acme/odd", endpoint=hub.url)
    res = runner.invoke(app, ["merge", "hf://acme/a", "hf://acme/odd", "-o", str(tmp_path / "out"), "-q",
                              "--endpoint", hub.url])
    assert res.exit_code == 1
    assert "model.norm.weight: shape [24] in a but [25] in odd" in res.stderr
    assert not list(hf_isolated.rglob("*.safetensors"))  # no weights were downloaded
    res = runner.invoke(app, ["inspect", "hf://acme/a", "hf://acme/odd", "--json"], env={"HF_ENDPOINT": hub.url})
    rep = json.loads(res.stdout)
    assert res.exit_code == 1 and rep["differences"][0]["tensor"] == "model.norm.weight"
    assert rep["ingredients"][0]["parameters"] == sum(t.numel() for t in make_state(1, big=3000).values())
    assert not list(hf_isolated.rglob("*.safetensors"))
