"""Hub I/O against a real HTTP hub look-alike (tests/hubserver.py), through huggingface_hub itself.

Covers: pinned pulls while the branch moves (and offline from the cache), a multi-shard LFS push
downloaded back byte-identical, ShardUploader in merge order on a renamed folder, a stale parent,
401s and missing repos as one-line errors without the token, retried 5xx, the model card passing
the hub's YAML validation route, and the test server's own headers, ranges and typed errors.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.utils import get_session
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))

from hubserver import git_blob_oid, running_hub  # noqa: E402

from soup.finish.card import render_model_card  # noqa: E402
from soup.pipeline import greedy_soup  # noqa: E402
from soup.io.ingredients import HubOptions  # noqa: E402
from soup.io.manifest import Manifest, write  # noqa: E402
from soup.merging import merge  # noqa: E402
from soup.errors import HubError  # noqa: E402
from soup.hub import PULL_PATTERNS, RetryPolicy, ShardUploader, parse_hub_spec, pull, push  # noqa: E402

FAST = RetryPolicy(tries=3, base_delay=0.01, max_delay=0.02)
from conftest import TOKEN  # noqa: E402
MB = 1024 * 1024


@pytest.fixture(autouse=True)
def _isolated(hf_isolated):
    """Every hub test runs with HF home, cache and token file in tmp_path (conftest.hf_isolated)."""
    return hf_isolated


def tiny_model(folder: Path, seed: int, *, extra: dict[str, bytes] | None = None) -> Path:
    """A one-file safetensors model with a config, plus ``extra`` files."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(8, 8, generator=g), "b": torch.randn(8, generator=g)},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "seed": seed}))
    for name, data in (extra or {}).items():
        (folder / name).write_bytes(data)
    return folder


def shard(path: Path, seed: int, n_bytes: int) -> dict[str, torch.Tensor]:
    """Write one safetensors shard of about ``n_bytes`` (float32); returns its tensors."""
    g = torch.Generator().manual_seed(seed)
    tensors = {f"layer{seed}.weight": torch.randn(n_bytes // 4, generator=g)}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return tensors


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


SCORES = {"ft-a": 0.71, "ft-b": 0.69, "local": 0.4}  # each ingredient's validation score alone


def scores(candidate):
    """A validation evaluator (a plain function): the members' mean score, +0.01 for a soup of several."""
    members = list(candidate.weights)
    return sum(SCORES[k] for k in members) / len(members) + (0.01 if len(members) > 1 else 0.0)


def cooked(ingredients: list, **options) -> Manifest:
    """The manifest of a real greedy soup of ft-a, ft-b and local, produced by the code (never written by
    hand): ft-a and ft-b are kept (0.71, then 0.71 for both), local is not (0.61)."""
    return greedy_soup(ingredients, scores, labels=list(SCORES), cache=None, **options).manifest


# ---- specs ---------------------------------------------------------------------------------------------
def test_parse_hub_spec():
    assert parse_hub_spec("hf://owner/name") == ("owner/name", None)
    assert parse_hub_spec("hf://owner/name@main") == ("owner/name", "main")
    assert parse_hub_spec("hf://owner/na.me-2@refs/pr/3") == ("owner/na.me-2", "refs/pr/3")
    assert parse_hub_spec("./local/folder") is None
    assert parse_hub_spec("owner/name") is None
    assert parse_hub_spec("hf://gpt2") == ("gpt2", None)  # the hub's canonical models have no owner
    assert parse_hub_spec("hf://gpt2@main") == ("gpt2", "main")
    for bad in ("hf://owner/name@", "hf://a/b/c", "hf://", "hf://-x", "hf://a/"):
        with pytest.raises(HubError, match="invalid hub spec"):
            parse_hub_spec(bad)


# ---- pull ----------------------------------------------------------------------------------------------
def test_pull_pinned_revision_while_main_moves(hub, tmp_path, hf_isolated, monkeypatch):
    v1 = tiny_model(tmp_path / "v1", 1, extra={"notes.txt": b"not a model file", "tokenizer.json": b"{}"})
    v2 = tiny_model(tmp_path / "v2", 2)
    first = push(v1, "owner/ft-a", endpoint=hub.url, retry=FAST)
    second = push(v2, "owner/ft-a", endpoint=hub.url, retry=FAST)
    assert first.commit != second.commit and hub.head("owner/ft-a") == second.commit

    old = pull("owner/ft-a", revision=first.commit, endpoint=hub.url, retry=FAST)
    assert old.commit == first.commit and old.revision == first.commit
    assert folder_bytes(old.path) == {k: v for k, v in folder_bytes(v1).items() if k != "notes.txt"}
    assert old.path.is_relative_to(hf_isolated)  # the standard cache, isolated by the fixture
    server = hub.files("owner/ft-a", first.commit)
    assert old.file_oids == {name: git_blob_oid(server[name])
                             for name in ("config.json", "model.safetensors", "tokenizer.json")}

    new = pull("owner/ft-a", endpoint=hub.url, retry=FAST)  # default branch: the new head
    assert new.commit == second.commit and new.revision is None
    assert (new.path / "model.safetensors").read_bytes() == (v2 / "model.safetensors").read_bytes()
    # a push keeps remote non-weight files: v1's tokenizer is still on main, notes.txt is never pulled
    assert set(folder_bytes(new.path)) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert "notes.txt" in hub.files("owner/ft-a")

    # offline: a pinned sha (and the branch seen before) come from the cache, with no request at all
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = len(hub.requests)
    again = pull("owner/ft-a", revision=first.commit, endpoint=hub.url, retry=FAST)
    assert again.commit == first.commit and again.path == old.path and again.file_oids == old.file_oids
    assert pull("owner/ft-a", endpoint=hub.url, retry=FAST).commit == second.commit
    assert len(hub.requests) == seen
    with pytest.raises(HubError, match="not in the local cache.*HF_HUB_OFFLINE"):
        pull("owner/ft-a", revision="c" * 40, endpoint=hub.url, retry=FAST)


def test_pull_branch_with_slash_and_missing_things(hub, tmp_path):
    push(tiny_model(tmp_path / "m", 1), "owner/m", endpoint=hub.url, retry=FAST)
    on_branch = push(tiny_model(tmp_path / "b", 2), "owner/m", revision="exp/lr-1e-5", endpoint=hub.url, retry=FAST)
    pulled = pull("owner/m", revision="exp/lr-1e-5", endpoint=hub.url, retry=FAST)
    assert pulled.commit == on_branch.commit == hub.head("owner/m", "exp/lr-1e-5")
    assert (pulled.path / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()

    with pytest.raises(HubError, match=r"^hub: revision not found: owner/m@nope$"):
        pull("owner/m", revision="nope", endpoint=hub.url, retry=FAST)
    with pytest.raises(HubError, match=r"^hub: repository not found: owner/absent"):
        pull("owner/absent", endpoint=hub.url, retry=FAST)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{}")
    push(tmp_path / "cfg", "owner/config-only", endpoint=hub.url, retry=FAST)
    with pytest.raises(HubError, match="has no weight files"):
        pull("owner/config-only", endpoint=hub.url, retry=FAST)


# ---- push ----------------------------------------------------------------------------------------------
def test_push_multishard_lfs_roundtrip(hub, tmp_path):
    out = tmp_path / "soup"
    out.mkdir()
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    tensors = {}
    for i, name in enumerate(names):
        tensors.update(shard(out / name, i, 11 * MB))
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in tensors.values())},
             "weight_map": {f"layer{i}.weight": name for i, name in enumerate(names)}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text('{"model_type": "toy"}')
    before = folder_bytes(out)

    result = push(out, "owner/soup", endpoint=hub.url, retry=FAST)
    assert result.commit == hub.head("owner/soup") and result.pr_url is None
    assert result.repo_url == f"{hub.url}/owner/soup"
    assert folder_bytes(out) == before  # the local folder is only read
    remote = hub.files("owner/soup")
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == before
    lfs = {f.path for f in HfApi(endpoint=hub.url).list_repo_tree("owner/soup", recursive=True) if f.lfs}
    assert lfs == set(names)
    assert hub.count("lfs_upload") == 2 and hub.count("commit") == 1

    pulled = pull("owner/soup", revision=result.commit, endpoint=hub.url, retry=FAST)
    assert folder_bytes(pulled.path) == before
    loaded = {}
    for name in names:
        loaded.update(load_file(str(pulled.path / name)))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert pulled.file_oids[names[0]] == hashlib.sha256(before[names[0]]).hexdigest()  # LFS: the sha256


def test_push_to_new_branch_and_as_pull_request(hub, tmp_path):
    base = push(tiny_model(tmp_path / "a", 1), "owner/r", endpoint=hub.url, retry=FAST)
    branch = push(tiny_model(tmp_path / "b", 2), "owner/r", revision="soups", endpoint=hub.url, retry=FAST)
    assert hub.head("owner/r") == base.commit and hub.head("owner/r", "soups") == branch.commit
    pr = push(tiny_model(tmp_path / "c", 3), "owner/r", create_pr=True, endpoint=hub.url, retry=FAST)
    assert pr.pr_url == f"{hub.url}/owner/r/discussions/1"
    assert hub.head("owner/r") == base.commit  # main did not move
    assert hub.files("owner/r", "refs/pr/1")["config.json"] == (tmp_path / "c" / "config.json").read_bytes()


def test_push_deletes_stale_weights_and_keeps_other_files(hub, tmp_path):
    two = tmp_path / "two"
    two.mkdir()
    for i in (1, 2):
        shard(two / f"model-0000{i}-of-00002.safetensors", i, 1024)
    (two / "model.safetensors.index.json").write_text("{}")
    (two / "LICENSE").write_text("apache-2.0")
    push(two, "owner/s", endpoint=hub.url, retry=FAST)
    one = tiny_model(tmp_path / "one", 3)  # the next soup is a single file
    result = push(one, "owner/s", endpoint=hub.url, retry=FAST)
    remote = hub.files("owner/s", result.commit)
    assert set(remote) == {".gitattributes", "LICENSE", "config.json", "model.safetensors"}
    assert remote["model.safetensors"] == (one / "model.safetensors").read_bytes()


def test_shard_uploader_can_open_a_pull_request(hub, tmp_path):
    base = push(tiny_model(tmp_path / "base", 1), "owner/pr", endpoint=hub.url, retry=FAST)
    out = tmp_path / "out"
    out.mkdir()
    with ShardUploader("owner/pr", create_pr=True, commit_message="a better soup", endpoint=hub.url,
                       retry=FAST) as up:
        up.start()
        shard(out / "model.safetensors", 5, 11 * MB)
        up.shard_done(out / "model.safetensors")
        result = up.finish(out)
    assert result.pr_url == f"{hub.url}/owner/pr/discussions/1" and hub.head("owner/pr") == base.commit
    assert hub.files("owner/pr", "refs/pr/1")["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert hub.count("lfs_upload") == 1


def test_push_refuses_missing_or_empty_folder(hub, tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "absent", tmp_path / "empty"):
        with pytest.raises(HubError, match="nothing to push"):
            push(folder, "owner/x", endpoint=hub.url, retry=FAST)
    assert hub.requests == []


def test_shard_uploader_in_merge_order_on_renamed_folder(hub, tmp_path):
    tmp_out, final = tmp_path / ".soup-tmp-1234", tmp_path / "soup"
    tmp_out.mkdir()
    up = ShardUploader("owner/soup", endpoint=hub.url, retry=FAST)
    up.start()
    # the writer finishes shard 1 (LFS-sized): its upload starts while shard 2 is being written
    shard(tmp_out / "model-00001-of-00002.safetensors", 0, 11 * MB)
    up.shard_done(tmp_out / "model-00001-of-00002.safetensors")
    wait_for(lambda: hub.count("lfs_upload") == 1)
    assert hub.count("commit") == 0  # uploaded in the background, before any commit
    shard(tmp_out / "model-00002-of-00002.safetensors", 1, 4096)  # small: stays a regular file
    up.shard_done(tmp_out / "model-00002-of-00002.safetensors")
    # then index, config, card, plot and the manifest last; the folder is renamed into place
    (tmp_out / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (tmp_out / "config.json").write_text('{"model_type": "toy"}')
    (tmp_out / "soup_plot.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    manifest = cooked([tiny_model(tmp_path / "in" / k, seed) for seed, k in enumerate(SCORES)])
    (tmp_out / "README.md").write_text(render_model_card(manifest))
    write(tmp_out, manifest)
    tmp_out.rename(final)
    local = folder_bytes(final)

    result = up.finish(final)
    assert result.commit == hub.head("owner/soup")
    remote = hub.files("owner/soup", result.commit)
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == local
    assert hub.count("lfs_upload") == 1 and hub.count("commit") == 1  # shard 1 was not uploaded twice
    assert hub.count("validate_yaml") == 1  # the card went through the hub's YAML check
    assert folder_bytes(final) == local
    commits = HfApi(endpoint=hub.url).list_repo_commits("owner/soup")
    assert commits[0].title == "soup: greedy soup of 3 ingredients" and len(commits) == 2


def test_shard_uploader_reuploads_a_shard_rewritten_after_shard_done(hub, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    up = ShardUploader("owner/re", endpoint=hub.url, retry=FAST)
    up.start()
    shard(out / "model.safetensors", 0, 11 * MB)
    up.shard_done(out / "model.safetensors")
    wait_for(lambda: hub.count("lfs_upload") == 1)
    shard(out / "model.safetensors", 7, 11 * MB + 8)  # the writer (wrongly) rewrote it afterwards
    up.finish(out)
    assert hub.files("owner/re")["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert hub.count("lfs_upload") == 2  # uploaded again, by the commit


def test_stale_parent_is_a_clear_error_and_keeps_the_folder(hub, tmp_path):
    push(tiny_model(tmp_path / "first", 1), "owner/race", endpoint=hub.url, retry=FAST)
    ours = tiny_model(tmp_path / "ours", 2)
    up = ShardUploader("owner/race", endpoint=hub.url, retry=FAST)
    up.start()
    up.shard_done(ours / "model.safetensors")
    theirs = push(tiny_model(tmp_path / "theirs", 3), "owner/race", endpoint=hub.url, retry=FAST)
    before = folder_bytes(ours)
    with pytest.raises(HubError) as info:
        up.finish(ours)
    message = str(info.value)
    assert "owner/race@main moved since" in message and "re-run soup push" in message and "\n" not in message
    assert hub.head("owner/race") == theirs.commit  # nothing overwritten
    assert hub.files("owner/race")["model.safetensors"] == (tmp_path / "theirs" / "model.safetensors").read_bytes()
    assert folder_bytes(ours) == before


# ---- errors and retries --------------------------------------------------------------------------------
def test_401_is_one_line_without_the_token(auth_hub, tmp_path, monkeypatch):
    folder = tiny_model(tmp_path / "m", 1)
    before = folder_bytes(folder)
    wrong = "hf_WrongTokenValue_987654"
    with pytest.raises(HubError) as info:
        push(folder, "owner/private", endpoint=auth_hub.url, token=wrong, retry=FAST)
    message = str(info.value)
    assert message == ("hub: 401 Unauthorized for owner/private@main: "
                       "check your token (HF_TOKEN or `hf auth login`)")
    assert wrong not in message and TOKEN not in message
    assert folder_bytes(folder) == before

    monkeypatch.setenv("HF_TOKEN", wrong)  # a wrong token from the environment: same line, no token
    with pytest.raises(HubError, match="^hub: 401 Unauthorized for owner/private: check your token") as info:
        pull("owner/private", endpoint=auth_hub.url, retry=FAST)
    assert wrong not in str(info.value)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="401 Unauthorized"):  # no token at all
        pull("owner/private", endpoint=auth_hub.url, retry=FAST)

    # the right token works end to end; other errors do not show it either
    ok = push(folder, "owner/private", private=True, endpoint=auth_hub.url, token=TOKEN, retry=FAST)
    assert pull("owner/private", endpoint=auth_hub.url, token=TOKEN, retry=FAST).commit == ok.commit
    for revision, pattern in (("nope", "revision not found"), (None, "repository not found")):
        repo = "owner/private" if revision else "owner/missing"
        with pytest.raises(HubError, match=pattern) as info:
            pull(repo, revision=revision, endpoint=auth_hub.url, token=TOKEN, retry=FAST)
        assert TOKEN not in str(info.value) and "\n" not in str(info.value)


def test_transient_500_is_retried(hub, tmp_path):
    first = push(tiny_model(tmp_path / "a", 1), "owner/flaky", endpoint=hub.url, retry=FAST)
    hub.fail_next("info", times=2)
    pulled = pull("owner/flaky", endpoint=hub.url, retry=FAST)
    assert pulled.commit == first.commit
    assert [s for m, r, s in hub.requests if r == "info"] == [500, 500, 200]

    hub.fail_next("resolve", times=1)  # a failed download inside snapshot_download is retried too
    fresh = pull("owner/flaky", revision=first.commit, endpoint=hub.url, cache_dir=tmp_path / "c2", retry=FAST)
    assert (fresh.path / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()
    assert fresh.path.is_relative_to(tmp_path / "c2") and (500 in [s for _, r, s in hub.requests if r == "resolve"])

    hub.fail_next("commit", times=1)
    second = push(tiny_model(tmp_path / "b", 2), "owner/flaky", endpoint=hub.url, retry=FAST)
    commits = HfApi(endpoint=hub.url).list_repo_commits("owner/flaky")
    assert [c.commit_id for c in commits[:2]] == [second.commit, first.commit]  # exactly one new commit

    hub.fail_next("info", times=3)  # as many failures as tries: a clear error
    with pytest.raises(HubError, match="^hub: 500 server error for owner/flaky, still failing after retries"):
        pull("owner/flaky", endpoint=hub.url, retry=FAST)
    assert [s for m, r, s in hub.requests if r == "info"] == [500, 500, 200, 200, 500, 500, 500]


def test_unreachable_hub_is_one_line(tmp_path):
    with running_hub() as gone:
        url = gone.url
    with pytest.raises(HubError, match="^hub: cannot reach the hub for owner/x") as info:
        pull("owner/x", endpoint=url, retry=FAST)
    assert "\n" not in str(info.value)


# ---- model card ----------------------------------------------------------------------------------------
def test_model_card_validates_against_the_hub(hub, monkeypatch, tmp_path):
    shas = [push(tiny_model(tmp_path / "src" / k, seed), f"owner/{k}", endpoint=hub.url).commit
            for seed, k in enumerate(("ft-a", "ft-b"))]
    local = tiny_model(tmp_path / "ft-c", 2)
    res = greedy_soup(["hf://owner/ft-a", f"hf://owner/ft-b@{shas[1]}", local], scores, labels=list(SCORES),
                      out=tmp_path / "soup", hub=HubOptions(endpoint=hub.url), cache=None)
    manifest = res.manifest
    assert (tmp_path / "soup" / "README.md").read_text() == render_model_card(manifest)  # what merge wrote
    text = render_model_card(manifest, recipe_text="method: greedy\ningredients:\n  - hf://owner/ft-a\n")
    card = ModelCard(text)
    assert card.data.base_model == ["owner/ft-a", "owner/ft-b"]
    assert {"merge", "model-soup"} <= set(card.data.tags) and card.data.library_name == "transformers"
    assert "https://arxiv.org/abs/2409.04828" in text and "https://arxiv.org/abs/2203.05482" in text
    assert f"| 0 | ft-a | owner/ft-a | `{shas[0][:12]}` | 0.5 | 0.71 | yes |" in text  # pinned revisions
    assert f"| 1 | ft-b | owner/ft-b | `{shas[1][:12]}` | 0.5 | 0.69 | yes |" in text
    assert f"| 2 | local | {local} | – | 0 | 0.4 | no |" in text
    assert "| Evaluator | `python` (maximize) |" in text and "| **Soup** | **0.71** |" in text
    assert "](soup_plot.png)" in text and (tmp_path / "soup" / "soup_plot.png").exists()
    assert "```yaml\nmethod: greedy\ningredients:\n  - hf://owner/ft-a\n```" in text

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)  # ModelCard.validate() uses the global endpoint
    card.validate()
    assert hub.requests[-1] == ("POST", "validate_yaml", 200)
    with pytest.raises(ValueError, match="base_model"):
        ModelCard("---\nbase_model: 3\n---\n# bad\n").validate()

    plain = merge([local, tiny_model(tmp_path / "ft-d", 3)], None).manifest  # a plain merge: no evaluation
    text = render_model_card(plain)
    assert "base_model" not in text and "soup_plot" not in text and "## Evaluation" not in text
    assert "the uniform average of all 2 ingredients" in text
    ModelCard(text).validate()


def test_pull_patterns_cover_vlm_files():
    from huggingface_hub.utils import filter_repo_objects

    names = ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
             "config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model",
             "preprocessor_config.json", "processor_config.json", "chat_template.jinja", "vocab.json",
             "merges.txt", "README.md", "training_args.bin", "optimizer.pt", "images/x.png"]
    kept = set(filter_repo_objects(names, allow_patterns=PULL_PATTERNS))
    assert kept == set(names) - {"README.md", "training_args.bin", "optimizer.pt", "images/x.png"}


# ---- the test server itself ----------------------------------------------------------------------------
def test_hubserver_resolve_headers_ranges_and_typed_errors(tmp_path):
    with running_hub(token=TOKEN) as hub:
        result = push(tiny_model(tmp_path / "m", 1), "owner/r", revision="feat/x", endpoint=hub.url, token=TOKEN,
                      retry=FAST)
        data = (tmp_path / "m" / "model.safetensors").read_bytes()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        url = f"{hub.url}/owner/r/resolve/feat%2Fx/model.safetensors"
        client = get_session()  # huggingface_hub's own HTTP client (shared: not closed here)
        head = client.head(url, headers=auth)
        assert head.status_code == 200 and head.headers["X-Repo-Commit"] == result.commit
        assert head.headers["ETag"] == f'"{git_blob_oid(data)}"'
        assert int(head.headers["Content-Length"]) == len(data)
        part = client.get(url, headers={**auth, "Range": "bytes=2-9"})
        assert part.status_code == 206 and part.content == data[2:10]
        assert part.headers["Content-Range"] == f"bytes 2-9/{len(data)}"
        assert client.get(url, headers={**auth, "Range": "bytes=-4"}).content == data[-4:]
        assert client.get(url, headers={**auth, "Range": f"bytes={len(data)}-"}).status_code == 416
        missing = client.get(f"{hub.url}/owner/r/resolve/feat%2Fx/nope.bin", headers=auth)
        assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"
        assert missing.headers["X-Repo-Commit"] == result.commit
        assert client.get(f"{hub.url}/owner/r/resolve/nope/config.json", headers=auth).headers[
            "X-Error-Code"] == "RevisionNotFound"
        assert client.get(f"{hub.url}/api/models/owner/absent", headers=auth).headers[
            "X-Error-Code"] == "RepoNotFound"
        assert client.get(url).status_code == 401
        assert client.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        created = client.post(f"{hub.url}/api/repos/create", headers=auth,
                              json={"name": "r", "organization": "owner", "type": "model"})
        assert created.status_code == 409 and created.json()["url"] == f"{hub.url}/owner/r"
