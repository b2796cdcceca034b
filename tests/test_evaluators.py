"""Tests of the built-in evaluators: perplexity, command, python, table, and their loading.

The perplexity tests build a tiny real Llama and a word-level tokenizer offline (``tests/tiny_lm.py``)
and compare against losses computed independently with the model's own forward.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_lm import build_tiny_lm  # noqa: E402

from soup.errors import EvaluatorError  # noqa: E402
from soup.soups.evaluate import Candidate, load_evaluator, run_evaluator  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from soup.evaluators.command import CommandEvaluator, lookup_key  # noqa: E402
from soup.evaluators.perplexity import PerplexityEvaluator  # noqa: E402
from soup.evaluators.python import PythonEvaluator  # noqa: E402
from soup.evaluators.table import TableEvaluator  # noqa: E402

DOCS = [
    "the cat sat on the mat .",
    "hello world",
    "the dog ran to the park and the sun is big .",
    "what did you say ? i said yes",
]


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lms(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-lms")
    return {"a": build_tiny_lm(root / "a", seed=0), "b": build_tiny_lm(root / "b", seed=1),
            "tied": build_tiny_lm(root / "tied", seed=2, tie_word_embeddings=True)}


@pytest.fixture(scope="module")
def refs(lms):
    """Models loaded the ordinary way, and the shared tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    models = {k: AutoModelForCausalLM.from_pretrained(p).eval() for k, p in lms.items()}
    return models, AutoTokenizer.from_pretrained(lms["a"])


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def memory_candidate(name: str, folder: Path) -> Candidate:
    return Candidate.from_state_dict(name, weights(folder), key=f"key-{name}")


def ref_loss(model, pairs) -> float:
    """Token-weighted mean of the model's own ``labels=`` loss over (input_ids, labels) pairs."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in pairs:
            ids, labels = torch.tensor([ids]), torch.tensor([labels])
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    return total / count


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- perplexity ----------------------------------------------------------------------------------


def test_perplexity_plain_text_matches_model_loss(lms, refs, tmp_path):
    models, tok = refs
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(DOCS[:2]) + "\n\n" + "\n".join(DOCS[2:]) + "\n")
    ev = PerplexityEvaluator(data=data, model=lms["a"], batch_size=3)  # padded batches
    score = run_evaluator(ev, memory_candidate("a", lms["a"]))
    ids = [tok(d)["input_ids"] for d in DOCS]
    expected = ref_loss(models["a"], [(i, i) for i in ids])
    assert score.primary == "perplexity"  # the evaluator's score is what it is named after
    assert score.value == score.metrics["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert score.metrics["loss"] == pytest.approx(expected, abs=1e-5)
    assert score.metrics["tokens"] == sum(len(i) - 1 for i in ids)
    # token-weighted, not a mean of per-document means
    per_doc = [ref_loss(models["a"], [(i, i)]) for i in ids]
    assert abs(sum(per_doc) / len(per_doc) - expected) > 1e-3
    ev.close()
    assert ev.model is None


def test_perplexity_whole_text_windows(lms, refs, tmp_path):
    models, tok = refs
    data = tmp_path / "book.txt"
    data.write_text(" ".join(DOCS))
    ev = PerplexityEvaluator(data=data, model=lms["a"], documents="whole", max_length=8,
                             batch_size=2)
    got = ev.score(memory_candidate("a", lms["a"]))
    ids = tok(" ".join(DOCS))["input_ids"]
    windows = [ids[i:i + 8] for i in range(0, len(ids), 8)]
    assert got["loss"] == pytest.approx(ref_loss(models["a"], [(w, w) for w in windows]), abs=1e-5)
    assert got["tokens"] == sum(len(w) - 1 for w in windows)


def test_perplexity_text_jsonl_and_max_samples(lms, refs, tmp_path):
    models, tok = refs
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    ev = PerplexityEvaluator(data=data, model=lms["b"], max_samples=2)
    got = ev.score(memory_candidate("b", lms["b"]))
    ids = [tok(d)["input_ids"] for d in DOCS[:2]]
    assert got["loss"] == pytest.approx(ref_loss(models["b"], [(i, i) for i in ids]), abs=1e-5)


def test_perplexity_prompt_response_scores_response_only(lms, refs, tmp_path):
    models, tok = refs
    rows = [{"prompt": "what is the sun ?", "response": " the sun is big ."},
            {"prompt": "who ran ?", "completion": " the dog ran to the park"}]
    data = write_jsonl(tmp_path / "pr.jsonl", rows)
    ev = PerplexityEvaluator(data=data, model=lms["a"], batch_size=2)
    got = ev.score(memory_candidate("a", lms["a"]))
    pairs, manual_sum, manual_n = [], 0.0, 0
    for r in rows:
        response = r.get("response", r.get("completion"))
        ids = tok(r["prompt"] + response)["input_ids"]
        n_prompt = len(tok(r["prompt"])["input_ids"])  # [BOS] + prompt words
        labels = [-100] * n_prompt + ids[n_prompt:]
        pairs.append((ids, labels))
        # by hand: -log p(token t | tokens < t) for each response token
        with torch.no_grad():
            logp = torch.log_softmax(models["a"](input_ids=torch.tensor([ids])).logits[0], -1)
        for t in range(n_prompt, len(ids)):
            manual_sum -= logp[t - 1, ids[t]].item()
            manual_n += 1
    assert got["tokens"] == manual_n == 5 + 6
    assert got["loss"] == pytest.approx(manual_sum / manual_n, abs=1e-5)
    assert got["loss"] == pytest.approx(ref_loss(models["a"], pairs), abs=1e-5)


def test_perplexity_chat_messages_score_assistant_turns(lms, refs, tmp_path):
    models, tok = refs
    messages = [{"role": "system", "content": "you answer"},
                {"role": "user", "content": "what is the sun ?"},
                {"role": "assistant", "content": "the sun is big ."},
                {"role": "user", "content": "and the moon ?"},
                {"role": "assistant", "content": "the moon is small"}]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    ev = PerplexityEvaluator(data=data, model=lms["a"])
    got = ev.score(memory_candidate("a", lms["a"]))
    # by hand: the tokens after each <|assistant|> marker up to and including its <|end|>
    ids = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assistant, end = tok.convert_tokens_to_ids(["<|assistant|>", "<|end|>"])
    labels, inside = [], False
    for i in ids:
        labels.append(i if inside else -100)
        if i == assistant:
            inside = True
        elif i == end:
            inside = False
    assert got["tokens"] == (5 + 1) + (4 + 1)
    assert got["loss"] == pytest.approx(ref_loss(models["a"], [(ids, labels)]), abs=1e-5)


def test_perplexity_keeps_one_model_and_loads_candidates_in_place(lms, refs, tmp_path, monkeypatch):
    models, tok = refs
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(DOCS))
    calls = []
    real = transformers.AutoModelForCausalLM.from_config

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", counting)
    ids = [tok(d)["input_ids"] for d in DOCS]
    expected = {k: ref_loss(models[k], [(i, i) for i in ids]) for k in ("a", "b")}
    assert abs(expected["a"] - expected["b"]) > 0.1
    ev = load_evaluator("perplexity", data=str(data), model=str(lms["a"]))
    assert isinstance(ev, PerplexityEvaluator)
    got_a = ev.score(memory_candidate("a", lms["a"]))["loss"]
    resident = ev.model
    got_b = ev.score(memory_candidate("b", lms["b"]))["loss"]
    got_a2 = ev.score(memory_candidate("a again", lms["a"]))["loss"]
    assert got_a == pytest.approx(expected["a"], abs=1e-5)
    assert got_b == pytest.approx(expected["b"], abs=1e-5)
    assert got_a2 == pytest.approx(got_a, abs=1e-7)
    assert len(calls) == 1 and ev.model is resident


def test_perplexity_default_model_from_first_candidate_folder(lms, refs, tmp_path):
    """Without model=, the first candidate's folder gives config + tokenizer; later ones no disk."""
    models, tok = refs
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(DOCS))
    writes: list[str] = []

    def candidate(name: str, folder: Path) -> Candidate:
        def write(dest: Path) -> None:
            writes.append(name)
            for f in folder.iterdir():
                shutil.copy(f, dest / f.name)
        sd = weights(folder)
        return Candidate(name, name, state_dict_fn=lambda device: dict(sd), write_fn=write)

    ev = PerplexityEvaluator(data=data)
    first, second = candidate("a", lms["a"]), candidate("b", lms["b"])
    got_a, got_b = ev.score(first)["loss"], ev.score(second)["loss"]
    first.close()
    ids = [tok(d)["input_ids"] for d in DOCS]
    assert got_a == pytest.approx(ref_loss(models["a"], [(i, i) for i in ids]), abs=1e-5)
    assert got_b == pytest.approx(ref_loss(models["b"], [(i, i) for i in ids]), abs=1e-5)
    assert writes == ["a"]


def test_perplexity_tied_embeddings_without_lm_head(lms, refs, tmp_path):
    models, tok = refs
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(DOCS))
    sd = weights(lms["tied"])
    assert "lm_head.weight" not in sd
    ev = PerplexityEvaluator(data=data, model=lms["tied"])
    got = ev.score(Candidate.from_state_dict("tied", sd))["loss"]
    ids = [tok(d)["input_ids"] for d in DOCS]
    assert got == pytest.approx(ref_loss(models["tied"], [(i, i) for i in ids]), abs=1e-5)


def test_perplexity_refuses_missing_and_unknown_weights(lms, tmp_path):
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(DOCS))
    ev = PerplexityEvaluator(data=data, model=lms["a"])
    sd = weights(lms["a"])
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(EvaluatorError, match=r"has 1 tensor\(s\) the soup does not provide, e\.g\. model\.layers\.1\.mlp\.up_proj"):
        run_evaluator(ev, Candidate.from_state_dict("broken", sd))
    sd = {**weights(lms["a"]), "vision.extra": torch.zeros(2)}
    with pytest.raises(EvaluatorError, match="vision.extra"):
        ev.score(Candidate.from_state_dict("extra", sd))
    lenient = PerplexityEvaluator(data=data, model=lms["a"], strict=False)
    assert lenient.score(Candidate.from_state_dict("extra", sd))["loss"] > 0


def test_perplexity_bad_data(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"question": "no"}])
    with pytest.raises(EvaluatorError, match=r"bad\.jsonl:2: a record needs"):
        PerplexityEvaluator(data=bad)
    with pytest.raises(EvaluatorError, match="not found"):
        PerplexityEvaluator(data=tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(EvaluatorError, match="no records"):
        PerplexityEvaluator(data=empty)


def test_perplexity_identity_follows_data_content(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("hello world\n")
    before = PerplexityEvaluator(data=data).identity()
    data.write_text("hello moon\n")
    after = PerplexityEvaluator(data=data).identity()
    assert before["args"] == after["args"] and before["data_sha256"] != after["data_sha256"]
    assert before["name"] == "perplexity"
    json.dumps(before)  # the cache can serialise it


# --- command -------------------------------------------------------------------------------------


def script(tmp_path: Path, body: str, name: str = "bench.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def tiny_candidate(name: str = "cand", writes: list | None = None, **kw) -> Candidate:
    sd = {"w": torch.ones(2)}

    def write(folder: Path) -> None:
        if writes is not None:
            writes.append(name)
        (folder / "model.safetensors").write_bytes(b"x")

    return Candidate(name, f"key-{name}", state_dict_fn=lambda d: sd, write_fn=write, **kw)


def test_command_json_result_file_with_key_paths(tmp_path):
    bench = script(tmp_path, """
        import json, os, sys
        model, out = sys.argv[1], sys.argv[2]
        assert os.path.isfile(os.path.join(model, "model.safetensors"))
        json.dump({"results": {"mmlu": {"acc,none": 0.625}, "v1.2": {"f1": 0.5}},
                   "runs": [{"score": 1.5}, {"score": 2.5}]}, open(out, "w"))
    """)
    writes: list[str] = []
    cmd = f"{sys.executable} {bench} {{model}} {{output}}"
    ev = CommandEvaluator(cmd=cmd, result="{output}", key="results.mmlu.acc,none")
    assert run_evaluator(ev, tiny_candidate(writes=writes)).value == 0.625
    assert writes == ["cand"]
    ev = CommandEvaluator(cmd=[sys.executable, str(bench), "{model}", "{output}"], result="{output}",
                          key={"second": "runs[1].score", "dotted": "results.v1.2.f1"},
                          primary="second")
    score = run_evaluator(ev, tiny_candidate())
    assert score.value == 2.5 and score.metrics == {"second": 2.5, "dotted": 0.5}
    with pytest.raises(EvaluatorError, match=r"'nope'.*available: mmlu, v1\.2"):
        CommandEvaluator(cmd=cmd, result="{output}", key="results.nope.acc").score(tiny_candidate())


def test_command_result_glob_and_missing_file(tmp_path):
    bench = script(tmp_path, """
        import json, os, sys
        os.makedirs(os.path.join(sys.argv[1], "org__model"))
        json.dump({"acc": 0.75}, open(os.path.join(sys.argv[1], "org__model", "results_1.json"), "w"))
    """)
    ev = CommandEvaluator(cmd=[sys.executable, str(bench), "{output}"],
                          result="{output}/**/results_*.json", key="acc")
    assert ev.score(tiny_candidate()) == 0.75
    quiet = script(tmp_path, "import sys; print('done', file=sys.stderr)\n", "quiet.py")
    ev = CommandEvaluator(cmd=[sys.executable, str(quiet)], result="{output}", key="acc")
    with pytest.raises(EvaluatorError, match=r"wrote no result file .*stderr tail:\ndone"):
        ev.score(tiny_candidate())


def test_command_stdout_json_number_and_regex(tmp_path):
    bench = script(tmp_path, """
        print("loading 3 shards")
        print('{"metrics": {"acc": 0.42}}')
    """)
    writes: list[str] = []
    ev = CommandEvaluator(cmd=f"{sys.executable} {bench}", key="metrics.acc")
    assert ev.score(tiny_candidate(writes=writes)) == 0.42
    assert writes == []  # {model} unused: no folder written
    numbers = script(tmp_path, "print('epoch 3 of 3'); print('accuracy = 87.5% (n=200)')\n", "n.py")
    assert CommandEvaluator(cmd=[sys.executable, str(numbers)]).score(tiny_candidate()) == 200.0
    ev = CommandEvaluator(cmd=[sys.executable, str(numbers)], regex=r"accuracy = ([\d.]+)%")
    assert ev.score(tiny_candidate()) == 87.5
    ev = CommandEvaluator(cmd=[sys.executable, str(numbers)], key="acc")
    with pytest.raises(EvaluatorError, match="printed no JSON"):
        ev.score(tiny_candidate())


def test_command_env_and_cwd(tmp_path):
    bench = script(tmp_path, "import os; print(os.environ['SOUP_TEST_VALUE'], os.getcwd())\n")
    work = tmp_path / "work"
    work.mkdir()
    ev = CommandEvaluator(cmd=[sys.executable, str(bench)], env={"SOUP_TEST_VALUE": 7},
                          regex=r"^(\S+) ", cwd=str(work))
    assert ev.score(tiny_candidate()) == 7.0


def test_command_nonzero_exit_quotes_stderr_tail(tmp_path):
    bench = script(tmp_path, """
        import sys
        for i in range(30):
            print(f"log line {i:02d}", file=sys.stderr)
        sys.exit(3)
    """)
    ev = CommandEvaluator(cmd=[sys.executable, str(bench)])
    with pytest.raises(EvaluatorError) as info:
        run_evaluator(ev, tiny_candidate("soup 2/3"))
    msg = str(info.value)
    assert "soup 2/3" in msg and "exited with status 3" in msg and Path(sys.executable).name in msg
    assert "log line 29" in msg and "log line 10" in msg and "log line 09" not in msg
    with pytest.raises(EvaluatorError, match="command not found: 'no-such-benchmark-cli'"):
        CommandEvaluator(cmd="no-such-benchmark-cli --x").score(tiny_candidate())


def test_command_timeout_kills_process_group(tmp_path):
    marker = tmp_path / "child-survived"
    bench = script(tmp_path, f"""
        import subprocess, sys, time
        # a grandchild in the same process group must die too
        subprocess.Popen([sys.executable, "-c",
                          "import time; time.sleep(4); open({str(marker)!r}, 'w').write('x')"])
        print("starting", file=sys.stderr, flush=True)
        time.sleep(60)
    """)
    ev = CommandEvaluator(cmd=[sys.executable, str(bench)], timeout=1)
    start = time.monotonic()
    with pytest.raises(EvaluatorError, match=r"timed out after 1 s.*\nstarting"):
        ev.score(tiny_candidate())
    assert time.monotonic() - start < 10
    time.sleep(4)
    assert not marker.exists()


def test_command_bad_arguments():
    with pytest.raises(EvaluatorError, match="one group"):
        CommandEvaluator(cmd="x", regex=r"\d+")
    with pytest.raises(EvaluatorError, match="timeout"):
        CommandEvaluator(cmd="x", timeout=0)
    with pytest.raises(EvaluatorError, match="primary"):
        CommandEvaluator(cmd="x", key={"a": "a", "b": "b"})
    with pytest.raises(EvaluatorError, match="direction"):
        CommandEvaluator(cmd="x", direction="up")
    assert lookup_key({"a": [{"b": 1}]}, "a[0].b") == 1


# --- python --------------------------------------------------------------------------------------


def test_python_evaluator_from_file_module_and_callable(tmp_path, monkeypatch):
    code = textwrap.dedent("""
        def weight_sum(candidate, scale=1.0):
            return float(sum(t.sum() for t in candidate.state_dict("cpu").values())) * scale

        def metrics(candidate):
            return {"acc": 0.5, "loss": 1.25}
    """)
    (tmp_path / "my_eval.py").write_text(code)
    ev = PythonEvaluator(fn=f"{tmp_path / 'my_eval.py'}:weight_sum", kwargs={"scale": 2})
    assert run_evaluator(ev, tiny_candidate()).value == 4.0
    assert len(ev.identity()["source_sha256"]) == 64

    monkeypatch.syspath_prepend(str(tmp_path))
    ev = load_evaluator("python", fn="my_eval:metrics", primary="loss", direction="minimize")
    score = run_evaluator(ev, tiny_candidate())
    assert score.value == 1.25 and score.metrics == {"acc": 0.5, "loss": 1.25}

    def local_fn(candidate):
        return 3

    ev = PythonEvaluator(fn=local_fn)
    assert run_evaluator(ev, tiny_candidate()).value == 3.0
    qualname = "test_python_evaluator_from_file_module_and_callable.<locals>.local_fn"
    assert ev.identity()["args"]["fn"] == f"{__name__}:{qualname}"
    json.dumps(ev.identity())

    with pytest.raises(EvaluatorError, match="has no attribute 'missing'"):
        PythonEvaluator(fn="my_eval:missing")
    with pytest.raises(EvaluatorError, match="module:function"):
        PythonEvaluator(fn="my_eval")


def test_run_evaluator_rejects_nan_naming_candidate():
    ev = PythonEvaluator(fn=lambda candidate: float("nan"))
    with pytest.raises(EvaluatorError, match=r"non-finite score nan .* for greedy candidate 4/8"):
        run_evaluator(ev, tiny_candidate("greedy candidate 4/8"))


# --- table ---------------------------------------------------------------------------------------


def test_table_csv_lookup_order(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text("candidate,acc,f1\nft-ocr,0.7,0.6\nft-chat,0.5,\nft-chat+ft-ocr,0.8,0.9\n"
                    "soup-final,0.9,0.1\nkey-x,0.3,0.3\n")
    ev = TableEvaluator(path=path)
    assert ev.primary == "acc"
    single = tiny_candidate("ingredient 1/2 (ft-ocr)", weights={"ft-ocr": 1.0, "ft-chat": 0.0})
    assert run_evaluator(ev, single).metrics == {"acc": 0.7, "f1": 0.6}
    uniform = tiny_candidate("greedy candidate 2/2", weights={"ft-ocr": 0.5, "ft-chat": 0.5})
    assert run_evaluator(ev, uniform).value == 0.8
    named = tiny_candidate("soup-final", weights={"ft-ocr": 0.5, "ft-chat": 0.5})
    assert run_evaluator(ev, named).value == 0.9  # the name wins over the ingredients
    assert run_evaluator(ev, tiny_candidate("x")).value == 0.3  # by key "key-x"
    assert ev.score(tiny_candidate("ft-chat")) == {"acc": 0.5}  # empty cells are left out
    uneven = tiny_candidate("weighted", weights={"ft-ocr": 0.7, "ft-chat": 0.3})
    with pytest.raises(EvaluatorError, match=r"no score for weighted in .*scores\.csv"):
        run_evaluator(ev, uneven)


def test_table_json_yaml_and_errors(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"a": 1.5, "b+a": {"score": 2.0}}))
    ev = TableEvaluator(path=tmp_path / "s.json", direction="minimize")
    assert ev.score(tiny_candidate("a")) == 1.5
    soup = tiny_candidate("soup", weights={"a": 1 / 3, "b": 1 / 3, "c": 0.0})
    assert run_evaluator(ev, soup).value == 2.0  # file key "b+a" found as "a+b"
    (tmp_path / "s.yaml").write_text("a: {loss: 0.5, acc: 0.9}\nb: {loss: 0.7, acc: 0.8}\n")
    ev = TableEvaluator(path=tmp_path / "s.yaml", primary="loss", direction="minimize")
    assert run_evaluator(ev, tiny_candidate("b")).value == 0.7
    with pytest.raises(EvaluatorError, match=r"no score for zzz in .*s\.yaml \(tried 'zzz', 'key-zzz'\)"):
        run_evaluator(ev, tiny_candidate("zzz"))
    with pytest.raises(EvaluatorError, match="not found"):
        TableEvaluator(path=tmp_path / "none.csv")
    (tmp_path / "bad.csv").write_text("candidate,score\na,high\n")
    with pytest.raises(EvaluatorError, match=r"bad\.csv:2 \(score\): 'high' is not a number"):
        TableEvaluator(path=tmp_path / "bad.csv")


# --- loading -------------------------------------------------------------------------------------


def test_load_evaluator_unknown_name_lists_builtins():
    with pytest.raises(EvaluatorError) as info:
        load_evaluator("nope")
    for name in ("perplexity", "command", "python", "table"):
        assert name in str(info.value)


def test_load_evaluator_by_entry_point_names(tmp_path):
    (tmp_path / "t.csv").write_text("candidate,score\nx,1\n")
    assert isinstance(load_evaluator("table", path=str(tmp_path / "t.csv")), TableEvaluator)
    assert isinstance(load_evaluator("command", cmd="true"), CommandEvaluator)
    with pytest.raises(EvaluatorError, match="evaluator table: unknown argument 'colour'; accepted: direction, path"):
        load_evaluator("table", path=str(tmp_path / "t.csv"), colour="red")


def test_perplexity_dtype_argument(lms, tmp_path):
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(DOCS))
    full = PerplexityEvaluator(data=data, model=lms["a"]).score(memory_candidate("a", lms["a"]))
    ev = PerplexityEvaluator(data=data, model=lms["a"], dtype="bf16")
    half = ev.score(memory_candidate("a", lms["a"]))
    assert ev.model.dtype == torch.bfloat16
    assert half["loss"] == pytest.approx(full["loss"], abs=0.1) and half["loss"] != full["loss"]
    with pytest.raises(EvaluatorError, match="unknown dtype"):
        PerplexityEvaluator(data=data, dtype="int3")


def test_table_with_per_example_values_races_and_checks_its_rows(tmp_path):
    """A JSON table whose rows carry ``examples`` lists gives per-example scores: greedy races on them and
    keeps what full evaluation keeps; bad rows are one line naming the row."""
    import itertools
    import random as _random

    from soup.pipeline import greedy_soup
    from soup.evaluators.table import TableEvaluator

    labels, n = ["a", "b", "c"], 600
    skill = {"a": 0.8, "b": 0.78, "c": 0.2}
    rng = _random.Random(0)
    difficulty = [rng.random() for _ in range(n)]
    rows = {}
    for k in (1, 2, 3):
        for members in itertools.combinations(labels, k):
            level = sum(skill[m] for m in members) / k + 0.02 * (k - 1)
            values = [1.0 if d < level else 0.0 for d in difficulty]
            rows["+".join(members)] = {"score": sum(values) / n, "examples": values}
    table = tmp_path / "scores.json"
    table.write_text(json.dumps(rows))
    ev = TableEvaluator(path=table)
    assert ev.examples() == n and ev.score_is_mean and ev.example_range == (0.0, 1.0)
    assert ev.score_examples(tiny_candidate("x", weights={"b": 0.5, "a": 0.5}), [3, 1]) == \
        [rows["a+b"]["examples"][3], rows["a+b"]["examples"][1]]
    paths = []
    for i, lab in enumerate(labels):
        folder = tmp_path / lab
        folder.mkdir()
        from safetensors.torch import save_file

        save_file({"w": torch.full((4,), float(i))}, str(folder / "model.safetensors"))
        paths.append(folder)
    raced = greedy_soup(paths, "table", evaluator_args={"path": str(table)}, cache=None)
    full = greedy_soup(paths, "table", evaluator_args={"path": str(table)}, cache=None, racing=False)
    assert raced.weights == full.weights and raced.soup_score.value == full.soup_score.value
    c = next(t for t in raced.manifest.evaluation.history if t.candidate == "c")
    assert c.stopped == "separated" and c.examples < n
    for bad, message in (({"a": {"score": 0.5, "examples": [1, 0, 1]}}, "not the mean"),
                         ({"a": {"examples": [1, 0]}, "b": {"examples": [1]}}, "has 1 examples"),
                         ({"a": {"examples": [1, 0]}, "b": 0.5}, "b has no examples list")):
        table.write_text(json.dumps(bad))
        with pytest.raises(EvaluatorError, match=message):
            TableEvaluator(path=table)
