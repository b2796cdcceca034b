"""Fine-tunes with different vocabularies, souped by token (``soup.io.vocab``, ``soup.engine.vocab``).

Real tokenizers and tiny Llamas are built here (``tiny_lm``; nothing downloaded); fine-tunes add tokens
as users do (``add_special_tokens`` + ``resize_token_embeddings``), so ``<image>`` has different ids in
different fine-tunes. Every row of the soup is checked against the float64 weighted mean of the rows of
the same string, computed here from each ingredient's own tokenizer (loaded with transformers).
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import soup
import soup.engine.combine as combine
import soup.io.vocab as vocab_io
from soup.cli import app
from soup.errors import CheckpointError, IncompatibleIngredients, RecipeError
from soup.io.vocab import plan_vocab, read_vocab
from soup.io.checkpoint import open_checkpoint

from conftest import load_soup, reference_mean, write_checkpoint
from tiny_lm import CHAT_TEMPLATE, TINY_WORDS, build_tiny_lm, build_tiny_tokenizer

transformers = pytest.importorskip("transformers")
VOCABS = ("model.embed_tokens.weight", "lm_head.weight")


def finetune(base, out, tokens, seed, *, pad=None, special=True, scale=0.05):
    """``base`` with ``tokens`` added (in order) and the embeddings resized, every weight moved a little."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base)
    for t in tokens:
        if special:
            tok.add_special_tokens({"additional_special_tokens": [t]})
        else:
            tok.add_tokens([t])
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=pad, mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny Llama (61 tokens) and three fine-tunes: ``a`` adds <image> (id 61); ``b`` adds <ocr> then
    <image> (61, 62); ``c`` adds <image> and pads its embeddings to a multiple of 64 (62 tokens, 64 rows)."""
    root = tmp_path_factory.mktemp("vocab")
    base = build_tiny_lm(root / "base", seed=0)
    a = finetune(base, root / "a", ["<image>"], 1)
    b = finetune(base, root / "b", ["<ocr>", "<image>"], 2)
    c = finetune(base, root / "c", ["<image>"], 3, pad=64)
    return base, [a, b, c]


def vocab_of(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


def by_token(soup_folder, folders, weights, name):
    """The definition, in float64: soup row r is the weighted mean of the rows of token r's string in the
    ingredients that have it (weights renormalised among them); rows that are no token (padding) by
    position among the ingredients for which that row is padding too; zero where nobody has one."""
    out_ids = {i: t for t, i in vocab_of(soup_folder).items()}
    rows = load_soup(soup_folder)[name].shape[0]
    ings = [(load_file(str(f / "model.safetensors"))[name].double(), vocab_of(f), w) for f, w in zip(folders, weights)]
    want = torch.zeros(rows, ings[0][0].shape[1], dtype=torch.float64)
    for r in range(rows):
        parts = []
        for x, voc, w in ings:
            i = voc.get(out_ids[r]) if r in out_ids else (r if r not in voc.values() else None)
            if i is not None and i < x.shape[0]:
                parts.append((x[i], w))
        if parts:
            want[r] = sum(x * w for x, w in parts) / sum(w for _, w in parts)
    return want


def test_union_rows_are_the_mean_of_the_same_strings_rows(family, tmp_path):
    _, fts = family
    weights = [0.5, 0.3, 0.2]
    res = soup.merge(fts, tmp_path / "soup", weights=weights)
    out = load_soup(res.path)
    for name in VOCABS:
        assert out[name].shape == (64, 32)  # 63 tokens (a's 62, then b's <ocr>), padded to c's multiple of 64
        torch.testing.assert_close(out[name], by_token(res.path, fts, weights, name).float(), rtol=1e-6, atol=1e-7)
    a, b, c = (load_file(str(f / "model.safetensors")) for f in fts)
    emb = "model.embed_tokens.weight"
    assert torch.equal(out[emb][62], b[emb][61])  # <ocr>: only b has it (its id 61)
    assert torch.equal(out[emb][63], c[emb][63])  # a padding row only c has
    # every other tensor is the plain weighted mean, as always
    ref = reference_mean([{k: v for k, v in sd.items() if k not in VOCABS} for sd in (a, b, c)], weights)
    for name in out:
        if name not in VOCABS:
            assert torch.equal(out[name], ref[name]), name


def test_the_soup_loads_and_tokenizes_every_added_token_to_its_row(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, fts = family
    path = soup.merge(fts, tmp_path / "soup").path
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.convert_tokens_to_ids(["<image>", "<ocr>"]) == [61, 62] and len(tok) == 63
    ids = tok("<image> the cat <ocr>").input_ids
    assert ids[1] == 61 and ids[-1] == 62
    assert "<image>" in tok.all_special_tokens and "<ocr>" in tok.all_special_tokens
    assert tok.chat_template == CHAT_TEMPLATE  # config_from's
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.vocab_size == 64
    want = by_token(path, fts, [1 / 3] * 3, "model.embed_tokens.weight").float()
    got = model.get_input_embeddings()(torch.tensor(ids))
    torch.testing.assert_close(got, want[ids], rtol=1e-6, atol=1e-7)
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 64) and torch.isfinite(logits).all()


def test_vocab_first_or_named_keeps_that_vocabulary(family, tmp_path):
    _, fts = family
    run = CliRunner().invoke
    res = run(app, ["merge", *map(str, fts), "-o", str(tmp_path / "first"), "--vocab", "first", "-q"])
    assert res.exit_code == 0, res.output
    out = load_soup(tmp_path / "first")
    assert out["lm_head.weight"].shape == (62, 32)  # a's rows: <ocr> dropped
    assert "<ocr>" not in vocab_of(tmp_path / "first")
    for name in VOCABS:
        torch.testing.assert_close(out[name], by_token(tmp_path / "first", fts, [1 / 3] * 3, name).float(),
                                   rtol=1e-6, atol=1e-7)
    res = run(app, ["merge", *map(str, fts), "-o", str(tmp_path / "b"), "--vocab", "b", "-q"])
    assert res.exit_code == 0, res.output
    assert vocab_of(tmp_path / "b") == vocab_of(fts[1])  # b's ids: <ocr> 61, <image> 62
    assert json.loads((tmp_path / "b" / "config.json").read_text())["vocab_size"] == 63
    for name in VOCABS:
        torch.testing.assert_close(load_soup(tmp_path / "b")[name],
                                   by_token(tmp_path / "b", fts, [1 / 3] * 3, name).float(), rtol=1e-6, atol=1e-7)


def test_a_bad_vocab_value_is_one_line_naming_it(family, tmp_path):
    _, fts = family
    run = CliRunner().invoke
    for value, line in [("bogus", "vocab: 'bogus' is not union, first, an ingredient index or name (have: a, b, c)"),
                        ("7", "vocab: index 7 out of range (0..2)")]:
        res = run(app, ["merge", *map(str, fts), "-o", str(tmp_path / "bad"), "--vocab", value])
        assert res.exit_code == 1 and res.output.strip() == f"error: {line}", res.output
    assert not (tmp_path / "bad").exists()
    with pytest.raises(RecipeError, match="vocab: -1 must be union, first"):
        soup.merge(fts, tmp_path / "bad", vocab=-1)
    from soup.recipe import parse_recipe

    with pytest.raises(RecipeError, match=r"vocab: index 5 out of range \(0..2\)"):
        parse_recipe({"ingredients": [str(f) for f in fts], "strategy": "average", "vocab": 5})
    assert parse_recipe({"ingredients": [str(f) for f in fts], "strategy": "average", "vocab": "c"}).vocab == "c"


def test_zero_weight_holders_and_take_rules_still_fill_their_tokens(family):
    _, fts = family
    a, b, c = (load_file(str(f / "model.safetensors")) for f in fts)
    emb = "model.embed_tokens.weight"
    out = soup.merge(fts, weights=[1, 0, 0]).state_dict
    assert torch.equal(out[emb][:62], a[emb])  # a's own tokens, as they are
    assert torch.equal(out[emb][62], b[emb][61])  # <ocr>: only b (weight 0) has it
    out = soup.merge(fts, rules=["lm_head.weight=take:2"]).state_dict
    assert torch.equal(out["lm_head.weight"][61], c["lm_head.weight"][61])  # <image> from c
    assert torch.equal(out["lm_head.weight"][62], b["lm_head.weight"][61])  # c has no <ocr>


def test_blocks_do_not_change_the_soup(family, monkeypatch):
    _, fts = family
    whole = soup.merge(fts, weights=[0.2, 0.5, 0.3]).state_dict
    monkeypatch.setattr(combine, "BLOCK_ELEMENTS", 100)  # 3 rows a block
    small = soup.merge(fts, weights=[0.2, 0.5, 0.3]).state_dict
    assert all(torch.equal(whole[k], small[k]) for k in whole)


def test_identical_vocabularies_change_nothing(family, tmp_path):
    _, fts = family
    copy = shutil.copytree(fts[0], tmp_path / "copy")
    cks = [open_checkpoint(fts[0]), open_checkpoint(copy)]
    assert plan_vocab(cks) is None
    plan = plan_vocab([open_checkpoint(f) for f in fts])
    assert plan.rows == 64 and plan.names == frozenset(VOCABS) and plan.tokens[61:] == ["<image>", "<ocr>"]


def test_load_into_a_resident_model_and_a_strategy(family, tmp_path):
    from transformers import AutoModelForCausalLM

    _, fts = family
    path = soup.merge(fts, tmp_path / "soup").path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    soup.merge(fts, model)
    written = load_soup(path)
    assert all(torch.equal(written[k], v) for k, v in model.state_dict().items() if k in written)
    result = soup.average_soup(fts, out=tmp_path / "average")
    assert all(torch.equal(written[k], v) for k, v in load_soup(result.path).items())
    from soup.recipe import parse_recipe

    recipe = parse_recipe({"ingredients": [str(f) for f in fts], "strategy": "average", "vocab": "b"})
    result = soup.run_recipe(recipe, output=tmp_path / "recipe")
    assert load_soup(result.path)["lm_head.weight"].shape == (63, 32) and vocab_of(result.path) == vocab_of(fts[1])


def test_task_vector_methods_align_the_base_and_average_tokens_it_lacks(family):
    base, fts = family
    weights = [1.0, 0.5, 0.25]
    out = soup.merge(fts, method="task_arithmetic", base=base, weights=weights).state_dict
    b0 = load_file(str(base / "model.safetensors"))
    sds = [load_file(str(f / "model.safetensors")) for f in fts]
    for name in VOCABS:
        x0 = b0[name].double()
        want = x0 + sum(w * (sd[name][:61].double() - x0) for sd, w in zip(sds, weights))  # base tokens: task vectors
        torch.testing.assert_close(out[name][:61], want.float(), rtol=1e-6, atol=1e-6)
        image = sum(w * sd[name][61 if i != 1 else 62].double() for i, (sd, w) in enumerate(zip(sds, weights)))
        torch.testing.assert_close(out[name][61], (image / sum(weights)).float())  # <image>: no task vector
        assert torch.equal(out[name][62], sds[1][name][61])  # <ocr>: b's row
        assert torch.equal(out[name][63], sds[2][name][63])  # padding: c's


@pytest.mark.parametrize("method", [{"name": "ties", "density": 0.5}, {"name": "dare_ties", "density": 0.6}])
def test_methods_see_the_base_tokens_as_a_tensor_of_their_own(family, method):
    """A method's rows of the base's tokens are the method on the ingredients cut to those rows."""
    base, fts = family
    out = soup.merge(fts, method=method, base=base, seed=3).state_dict
    sds = [load_file(str(f / "model.safetensors")) for f in fts]
    cut = [{k: v[:61].contiguous() if k in VOCABS else v for k, v in sd.items()} for sd in sds]
    want = soup.merge(cut, method=method, base=load_file(str(base / "model.safetensors")), seed=3).state_dict
    for name in out:
        n = want[name].shape[0] if name in VOCABS else None
        assert torch.equal(out[name][:n], want[name]), name


def test_tied_embeddings_stay_tied(tmp_path):
    from transformers import AutoModelForCausalLM

    base = build_tiny_lm(tmp_path / "base", seed=0, tie_word_embeddings=True)
    fts = [finetune(base, tmp_path / "a", ["<image>"], 1), finetune(base, tmp_path / "b", ["<ocr>", "<image>"], 2)]
    assert "lm_head.weight" not in load_file(str(fts[0] / "model.safetensors"))
    path = soup.merge(fts, tmp_path / "soup").path
    out = load_soup(path)
    assert "lm_head.weight" not in out and out["model.embed_tokens.weight"].shape == (63, 32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.lm_head.weight.detach(),
                               by_token(path, fts, [0.5, 0.5], "model.embed_tokens.weight").float())
    untied = build_tiny_lm(tmp_path / "untied", seed=0)
    with pytest.raises(IncompatibleIngredients, match=r"a ties its output head .*tie_word_embeddings.* untied has"):
        soup.merge([fts[0], untied], tmp_path / "mixed")


def test_a_vlm_language_model_is_aligned_and_its_config_follows(tmp_path):
    """A LLaVA-like layout: ``language_model.*`` tensors, ``text_config.vocab_size``, ``image_token_index``."""
    def vlm(folder, extra, seed):
        tok = build_tiny_tokenizer()
        tok.add_special_tokens({"additional_special_tokens": extra})
        g = torch.Generator().manual_seed(seed)
        v = len(tok)
        state = {"vision_tower.proj.weight": torch.randn(8, 4, generator=g),
                 "language_model.model.embed_tokens.weight": torch.randn(v, 16, generator=g),
                 "language_model.model.layers.0.mlp.weight": torch.randn(62, 16, generator=g),  # in a layer: never rows
                 "language_model.lm_head.weight": torch.randn(v, 16, generator=g)}
        config = {"model_type": "llava", "image_token_index": tok.convert_tokens_to_ids("<image>"),
                  "text_config": {"vocab_size": v, "model_type": "llama"}}
        write_checkpoint(folder, state, config=config)
        (folder / "tokenizer_config.json").unlink()
        tok.save_pretrained(folder)
        return folder, state, tok

    (a, sa, _), (b, sb, _) = vlm(tmp_path / "a", ["<image>"], 1), vlm(tmp_path / "b", ["<ocr>", "<image>"], 2)
    path = soup.merge([a, b], tmp_path / "soup", config_from=1).path
    out = load_soup(path)
    emb = "language_model.model.embed_tokens.weight"
    assert out[emb].shape == (63, 16) and out["language_model.lm_head.weight"].shape == (63, 16)
    torch.testing.assert_close(out[emb][61], (sa[emb][61] + sb[emb][62]) / 2)  # <image>: a's 61, b's 62
    assert torch.equal(out[emb][62], sb[emb][61])  # <ocr>
    config = json.loads((path / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 63
    assert config["image_token_index"] == 61  # b's config (62 there) re-mapped to the soup's <image>
    with pytest.raises(IncompatibleIngredients, match="layers.0.mlp.weight: shape"):
        bad = shutil.copytree(b, tmp_path / "bad")
        save_file(dict(sb, **{"language_model.model.layers.0.mlp.weight": torch.zeros(63, 16)}),
                  str(bad / "model.safetensors"))
        soup.merge([a, bad], tmp_path / "nope")


def test_tokenizers_are_read_without_the_tokenizers_library_alike(family, monkeypatch, tmp_path):
    _, fts = family
    with_lib = read_vocab(fts[1])
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    monkeypatch.setattr(vocab_io, "_CACHE", {})
    from_json = read_vocab(fts[1])
    assert from_json.tokens == with_lib.tokens and from_json.added == with_lib.added
    assert from_json.tokens["<image>"] == 62 and from_json.added["<ocr>"]["special"] is True
    # a BPE-style folder without tokenizer.json: vocab.json + added_tokens.json
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "slow" / "added_tokens.json").write_text(json.dumps({"<image>": 2}))
    slow = read_vocab(tmp_path / "slow")
    assert slow.tokens == {"a": 0, "b": 1, "<image>": 2} and slow.base == {"a": 0, "b": 1}


def test_a_different_base_tokenizer_is_refused_naming_the_token(family, tmp_path):
    _, fts = family
    other = build_tiny_lm(tmp_path / "other", seed=1, vocab_words=("a", "the") + TINY_WORDS[2:])  # 'the' is id 9
    with pytest.raises(IncompatibleIngredients, match=r"other's tokenizer is not a's with tokens added: token 'the'"):
        soup.merge([fts[0], other], tmp_path / "nope")


def test_a_changed_tokenizer_is_scored_afresh(family, tmp_path):
    """The candidate key holds the token alignment: the same weights with an ingredient's added token
    renamed are another soup (other rows meet), so a cached score is not reused for them."""
    import shutil

    base, fts = family
    copies = [shutil.copytree(f, tmp_path / f.name) for f in fts]
    calls = []

    def count(candidate):
        calls.append(candidate.name)
        return float(len(calls))

    cache = tmp_path / "scores.sqlite"
    soup.greedy_soup(copies, "python", evaluator_args={"fn": count}, cache=str(cache), output=tmp_path / "s1")
    first = len(calls)
    soup.greedy_soup(copies, "python", evaluator_args={"fn": count}, cache=str(cache), output=tmp_path / "s2")
    assert len(calls) == first  # nothing changed: every score from the cache
    tok = copies[1] / "tokenizer.json"
    tok.write_text(tok.read_text().replace("<ocr>", "<ocr2>"))
    for name in ("tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"):
        if (copies[1] / name).exists():
            f = copies[1] / name
            f.write_text(f.read_text().replace("<ocr>", "<ocr2>"))
    soup.greedy_soup(copies, "python", evaluator_args={"fn": count}, cache=str(cache), output=tmp_path / "s3")
    assert len(calls) > first  # the soups that mix b's rows with others are evaluated again


def test_soup_json_and_the_report_say_where_each_added_token_came_from(family, tmp_path):
    from soup.finish.report import format_report
    from soup.io.manifest import read

    _, fts = family
    path = soup.merge(fts, tmp_path / "soup").path
    v = read(path).vocabulary
    assert v["mode"] == "union" and v["ids_from"] == "a" and v["rows"] == 64
    by_token = {a["token"]: a for a in v["added"]}
    assert by_token["<image>"] == {"token": "<image>", "id": vocab_of(path)["<image>"], "from": ["a", "b", "c"]}
    assert by_token["<ocr>"]["from"] == ["b"] and by_token["<ocr>"]["id"] == vocab_of(path)["<ocr>"]
    assert "added tokens: <image> (a/b/c), <ocr> (b)" in format_report(read(path))
    res = CliRunner().invoke(app, ["report", str(path)])
    assert res.exit_code == 0 and "vocabulary: union, ids of a, 64 rows; added tokens: <image> (a/b/c), <ocr> (b)" \
        in res.output.replace("\n", " "), res.output
    same = soup.merge([fts[0], fts[0]], tmp_path / "same").path
    assert read(same).vocabulary is None  # one vocabulary: nothing to record


def test_inspect_lists_the_tokens_each_ingredient_adds(family):
    from typer.testing import CliRunner

    from soup.cli import app

    _, fts = family
    report = soup.inspect(*fts)
    v = report["vocabulary"]
    assert {a["token"]: a["from"] for a in v["added"]} == {"<image>": ["a", "b", "c"], "<ocr>": ["b"]}
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(v["tensors"])
    res = CliRunner().invoke(app, ["inspect", *map(str, fts)])
    lines = res.output.splitlines()
    assert "  a adds <image>" in lines and "  b adds <image>, <ocr>" in lines and "  c adds <image>" in lines
    res = CliRunner().invoke(app, ["inspect", "--diff", "-q", *map(str, fts)])
    lines = res.output.splitlines()
    assert "  a adds <image>" in lines and "  b adds <image>, <ocr>" in lines and "  c adds <image>" in lines
    said = [ln for ln in lines if ln.startswith("vocabularies differ: rows souped by token")]
    assert len(said) == 1 and "64 rows, the ids of a" in said[0], res.output
    assert "model.embed_tokens.weight" in said[0] and "lm_head.weight" in said[0]
    assert soup.inspect(fts[0], fts[0])["vocabulary"] is None


def test_mergekit_tokenizer_source_union_and_a_model_align_by_token(family, tmp_path):
    """``tokenizer_source: union`` is ``vocab: union``; a model's name keeps that model's vocabulary."""
    import yaml
    from typer.testing import CliRunner

    from soup.cli import app

    _, fts = family
    for source, vocab, index in (("union", "union", 0), (str(fts[1]), 1, 1)):
        config = {"merge_method": "linear", "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in fts],
                  "dtype": "float32", "tokenizer_source": source}
        (tmp_path / "mk.yml").write_text(yaml.safe_dump(config))
        out = tmp_path / f"out-{index}"
        res = CliRunner().invoke(app, ["run", str(tmp_path / "mk.yml"), "-o", str(out), "-q"])
        assert res.exit_code == 0, res.output
        direct = soup.merge(fts, tmp_path / f"direct-{index}", vocab=vocab, config_from=index).path
        got, want = load_soup(out), load_soup(direct)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
        assert vocab_of(out) == vocab_of(direct)


def test_mergekit_tokenizer_source_base_keeps_the_base_models_tokens(family, tmp_path):
    """``tokenizer_source: base`` (and no tokenizer_source, mergekit's default) is the base's vocabulary:
    with a method's base model, its 61 tokens, each row the method on the rows of that token's string;
    with the base among linear's models, that model's vocabulary (``vocab: N``)."""
    import yaml

    from soup.io.manifest import read

    base, fts = family
    b0 = load_file(str(base / "model.safetensors"))
    sds = [load_file(str(f / "model.safetensors")) for f in fts]
    weights = [1.0, 0.5, 0.25]
    models = [{"model": str(f), "parameters": {"weight": w}} for f, w in zip(fts, weights)]
    for k, extra in enumerate(({"tokenizer_source": "base"}, {})):
        config = {"merge_method": "task_arithmetic", "base_model": str(base), "models": models, "dtype": "float32",
                  **extra}
        (tmp_path / "mk.yml").write_text(yaml.safe_dump(config))
        out = tmp_path / f"ta-{k}"
        res = CliRunner().invoke(app, ["run", str(tmp_path / "mk.yml"), "-o", str(out), "-q"])
        assert res.exit_code == 0, res.output
        got = load_soup(out)
        for name in VOCABS:
            x0 = b0[name].double()
            want = x0 + sum(w * (sd[name][:61].double() - x0) for sd, w in zip(sds, weights))
            assert got[name].shape == (61, x0.shape[1])
            torch.testing.assert_close(got[name], want.float(), rtol=1e-6, atol=1e-6)
        assert vocab_of(out) == vocab_of(base)
        assert json.loads((out / "config.json").read_text())["vocab_size"] == 61
        v = read(out).vocabulary
        assert v["mode"] == "base" and v["ids_from"] == base.name and v["rows"] == 61 and v["added"] == []
    # linear with the base among the models: the base is an ingredient, and its vocabulary is kept
    config = {"merge_method": "linear", "base_model": str(fts[1]), "dtype": "float32", "tokenizer_source": "base",
              "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in fts]}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(config))
    res = CliRunner().invoke(app, ["run", str(tmp_path / "mk.yml"), "-o", str(tmp_path / "lin"), "-q"])
    assert res.exit_code == 0, res.output
    direct = soup.merge(fts, tmp_path / "lin-direct", vocab=1, config_from=1).path
    got, want = load_soup(tmp_path / "lin"), load_soup(direct)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert vocab_of(tmp_path / "lin") == vocab_of(fts[1])


def test_vocab_base_without_a_base_model_is_one_line(family, tmp_path):
    _, fts = family
    with pytest.raises(RecipeError, match=r"^vocab: base is the vocabulary of a merge method's base model, and "
                                          r"there is none$"):
        soup.merge(fts, tmp_path / "nope", vocab="base")
    assert not (tmp_path / "nope").exists()


# ---- PEFT adapters trained on resized embeddings --------------------------------------------------------


def lora_resized(base, out, tokens, seed):
    """A LoRA adapter of ``base`` with ``tokens`` added and the embeddings resized (saved whole, as
    ``modules_to_save``), its tokenizer saved beside it, as trainers do."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base)
    for t in tokens:
        tok.add_special_tokens({"additional_special_tokens": [t]})
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM",
                                             modules_to_save=["embed_tokens", "lm_head"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def resized(family, tmp_path_factory):
    """Adapters of the family's base: ``a`` and ``a2`` add <image> (62 rows), ``o`` adds <ocr> (62 rows,
    another token at id 61), ``b`` adds <ocr> then <image> (63 rows)."""
    pytest.importorskip("peft")
    base, _ = family
    root = tmp_path_factory.mktemp("resized")
    plan = {"a": ["<image>"], "a2": ["<image>"], "o": ["<ocr>"], "b": ["<ocr>", "<image>"]}
    return base, {k: lora_resized(base, root / k, toks, seed) for seed, (k, toks) in enumerate(plan.items())}


def test_adapters_of_different_vocabularies_are_refused_naming_the_adapter_and_tensor(resized, tmp_path):
    """Same row count, other tokens (id 61 is <image> in a, <ocr> in o): averaging by position would mix
    two tokens' rows, so it is refused before any work; so are other row counts and a base without them."""
    base, ads = resized
    out = tmp_path / "out"
    how = "adapter soups do not match rows by token: merge each adapter into its base model"
    with pytest.raises(IncompatibleIngredients, match=r"^adapter o: tensor base_model\.model\.\S+weight: its tokenizer "
                       r"is not a's \(id 61 is '<ocr>' there, '<image>' in a\): " + how):
        soup.adapter_soup([ads["a"], ads["o"]], out)
    with pytest.raises(IncompatibleIngredients, match=r"^adapter b: tensor base_model\.model\.\S+weight has 63 rows "
                       r"but 62 in a \(embeddings resized to another vocabulary\): " + how):
        soup.adapter_soup([ads["a"], ads["b"]], out)
    with pytest.raises(CheckpointError, match=r"^adapter a: tensor base_model\.model\.\S+ has 62 rows but "
                       r"(model\.embed_tokens|lm_head)\.weight has 61 in the base base \(embeddings resized"):
        soup.adapter_soup([ads["a"], ads["a2"]], out, merge_into=base)
    assert not out.exists()
    res = CliRunner().invoke(app, ["merge", str(ads["a"]), str(ads["o"]), "-o", str(out), "-q"])
    assert res.exit_code == 1 and res.output.startswith("error: adapter o: tensor base_model.model."), res.output
    assert len(res.output.strip().splitlines()) == 1 and "its tokenizer is not a's" in res.output, res.output
    assert not out.exists()


def test_trainable_token_indices_that_differ_are_refused(resized, tmp_path):
    _, ads = resized
    copies = []
    for name, ids in (("a", [61]), ("a2", [60])):
        copy = shutil.copytree(ads[name], tmp_path / name)
        cfg = json.loads((copy / "adapter_config.json").read_text())
        (copy / "adapter_config.json").write_text(json.dumps({**cfg, "trainable_token_indices": ids}))
        copies.append(copy)
    with pytest.raises(IncompatibleIngredients, match=r"^trainable_token_indices: \[61\] in a but \[60\] in a2$"):
        soup.adapter_soup(copies, tmp_path / "out")


def test_adapters_of_one_resized_vocabulary_are_souped_by_position(resized, tmp_path):
    """One vocabulary (both add <image>): rows by position are rows by token; the soup's rows are the
    float64 weighted mean."""
    _, ads = resized
    path = soup.adapter_soup([ads["a"], ads["a2"]], tmp_path / "out", weights=[0.75, 0.25]).path
    got = load_file(str(path / "adapter_model.safetensors"))
    x, y = (load_file(str(ads[k] / "adapter_model.safetensors")) for k in ("a", "a2"))
    names = [n for n in x if "embed_tokens" in n or "lm_head" in n]
    assert names and all(got[n].shape[0] == 62 for n in names)
    for n in names:
        torch.testing.assert_close(got[n].double(), 0.75 * x[n].double() + 0.25 * y[n].double(), rtol=0, atol=1e-6)
