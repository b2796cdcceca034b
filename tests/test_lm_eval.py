"""Tests of the lm-eval evaluator on tiny Llama fine-tunes and a local multiple-choice task.

The task is a YAML written here over a JSONL file written here (nothing is downloaded). Scores are
compared with what lm-eval itself reports for the same weights loaded from a folder
(``simple_evaluate(model="hf", model_args="pretrained=FOLDER")``).
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_lm import build_tiny_lm  # noqa: E402

from soup.errors import EvaluatorError  # noqa: E402
from soup.soups.evaluate import Candidate, load_evaluator, mean_score, run_evaluator  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's HFLM imports it

from lm_eval.tasks import TaskManager  # noqa: E402
from soup.evaluators.lm_eval import LMEvalEvaluator  # noqa: E402

# 8 questions over the tiny vocabulary, 3 choices each (brier_score needs as many for every question),
# of different lengths so that acc and acc_norm differ
ROWS = [
    {"question": "where did the cat sit ?", "choices": ["on the mat", "on the big red rug", "to the park"], "label": 0},
    {"question": "who ran to the park ?", "choices": ["the dog", "the small cat", "a tree"], "label": 0},
    {"question": "is the sun big ?", "choices": ["yes", "no", "a big dog"], "label": 0},
    {"question": "what is red ?", "choices": ["the house", "the moon", "a big green tree"], "label": 0},
    {"question": "was it a good day ?", "choices": ["no", "yes , it was", "night"], "label": 1},
    {"question": "where is the dog ?", "choices": ["home", "on the rug", "to the park"], "label": 1},
    {"question": "how is the moon ?", "choices": ["small", "big and blue", "red"], "label": 1},
    {"question": "what did you say ?", "choices": ["hello world", "good night", "yes"], "label": 2},
]

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{question}}}} answer"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
  - metric: brier_score
    aggregation: brier_score
    higher_is_better: false
"""

GROUP_YAML = """\
group: soup_tiny_suite
task: [soup_tiny_mc, soup_tiny_mc_2shot]
aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: true
"""

# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base tiny Llama, three fine-tunes of it (base + noise), the data and the task folder."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("lm-eval")
    base = build_tiny_lm(root / "base", seed=0)
    state = load_file(str(base / "model.safetensors"))
    fts = []
    for i in range(3):
        folder = root / f"ft{i}"
        shutil.copytree(base, folder)
        g = torch.Generator().manual_seed(100 + i)
        tuned = {k: v + 0.3 * torch.randn(v.shape, generator=g) if v.dim() > 1 else v.clone()
                 for k, v in state.items()}
        save_file(tuned, str(folder / "model.safetensors"), metadata={"format": "pt"})
        fts.append(folder)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny.yaml").write_text(TASK_YAML.format(name="soup_tiny_mc", data=data))
    suite = root / "suite"  # a second include folder: a 2-shot task and a group of both tasks
    suite.mkdir()
    other = suite / "other.yaml"
    other.write_text(TASK_YAML.format(name="soup_tiny_mc_2shot", data=data) + "num_fewshot: 2\n")
    (suite / "group.yaml").write_text(GROUP_YAML)
    fewshot = root / "fewshot"  # 2-shot tasks: examples drawn at random (lm-eval's default) or the first two
    fewshot.mkdir()
    (fewshot / "random.yaml").write_text(TASK_YAML.format(name="soup_tiny_mc_random", data=data) + "num_fewshot: 2\n")
    (fewshot / "first.yaml").write_text(TASK_YAML.format(name="soup_tiny_mc_first", data=data)
                                        + "num_fewshot: 2\nfewshot_config:\n  sampler: first_n\n")
    with pytest.MonkeyPatch.context() as mp:  # the datasets library's Arrow cache, away from ~/.cache
        import datasets
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "datasets-cache")
        yield {"root": root, "base": base, "fts": fts, "tasks": tasks, "suite": suite, "other": other,
               "data": data, "fewshot": fewshot}


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def reference(folder: Path, tasks: list[str], include_path: Path | list[Path] | None = None) -> dict:
    """What lm-eval reports for the weights in ``folder``, loaded by lm-eval itself."""
    paths = [str(p) for p in (include_path if isinstance(include_path, list) else [include_path])
             if p is not None]
    manager = TaskManager(include_path=paths or None, include_defaults=False)
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder}", tasks=tasks,
                                  task_manager=manager, device="cpu", batch_size=4, bootstrap_iters=0,
                                  log_samples=False)
    return out["results"]


def args(world, **kw) -> dict:
    return {"tasks": "soup_tiny_mc", "include_path": str(world["tasks"]), "metric": "acc_norm",
            "model": str(world["base"]), "batch_size": 4, "device": "cpu", **kw}


# --- scores --------------------------------------------------------------------------------------


def test_scores_equal_lm_eval_on_the_same_weights_from_a_folder(world):
    ev = load_evaluator("lm-eval", **args(world))
    got = {}
    for ft in world["fts"][:2]:  # the second candidate is loaded into the same resident model
        state = random.getstate()
        score = run_evaluator(ev, Candidate.from_state_dict(ft.name, weights(ft), key=ft.name))
        assert random.getstate() == state  # lm-eval's global seeding is undone
        ref = reference(ft, ["soup_tiny_mc"], world["tasks"])["soup_tiny_mc"]
        assert score.primary == "acc_norm" and score.value == ref["acc_norm,none"]
        assert score.metrics == {"acc": ref["acc,none"], "acc_norm": ref["acc_norm,none"],
                                 "brier_score": ref["brier_score,none"]}
        got[ft.name] = score.metrics
    assert got["ft0"]["brier_score"] != got["ft1"]["brier_score"]  # the weights really changed
    ev.close()
    assert ev.model is None


def test_task_yaml_paths_and_several_tasks(world):
    ft = world["fts"][2]
    tasks = [str(world["tasks"] / "tiny.yaml"), str(world["other"])]
    # no model folder given: the config and tokenizer come from the first candidate's folder
    ev = LMEvalEvaluator(tasks=tasks, metric="acc,none", batch_size=4, device="cpu")
    got = run_evaluator(ev, Candidate.from_state_dict("ft2", weights(ft), config_dir=ft))
    ref = reference(ft, tasks)
    one, two = ref["soup_tiny_mc"], ref["soup_tiny_mc_2shot"]
    assert got.metrics["soup_tiny_mc/acc"] == one["acc,none"]
    assert got.metrics["soup_tiny_mc_2shot/brier_score"] == two["brier_score,none"]
    assert got.primary == "acc" and got.value == pytest.approx((one["acc,none"] + two["acc,none"]) / 2, abs=1e-12)
    assert one["brier_score,none"] != two["brier_score,none"]  # the 2-shot prompts differ


def test_local_group_is_scored_by_its_aggregate(world):
    ft = world["fts"][1]
    includes = [world["tasks"], world["suite"]]
    ev = LMEvalEvaluator(**args(world, tasks="soup_tiny_suite", include_path=includes, metric="acc"))
    got = run_evaluator(ev, Candidate.from_state_dict("ft1", weights(ft)))
    ref = reference(ft, ["soup_tiny_suite"], includes)
    assert got.metrics == {"acc": ref["soup_tiny_suite"]["acc,none"]}


def test_greedy_soup_builds_the_model_once_and_writes_no_candidate(world, tmp_path, monkeypatch):
    import transformers

    import soup

    builds, folders = [], []
    build = LMEvalEvaluator._build
    monkeypatch.setattr(LMEvalEvaluator, "_build", lambda self, c: (builds.append(c.name), build(self, c))[1])
    path = Candidate.path
    monkeypatch.setattr(Candidate, "path", lambda self: (folders.append(self.name), path(self))[1])

    def no_load(*a, **k):
        raise AssertionError("a model was loaded from disk")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    before = set(Path(tempfile.gettempdir()).glob("soup-candidate-*"))
    result = soup.greedy_soup([str(f) for f in world["fts"]], evaluator="lm-eval",
                              evaluator_args=args(world, metric="brier_score", direction="minimize"),
                              out=tmp_path / "soup", cache=None)
    assert len(builds) == 1 and folders == []
    assert set(Path(tempfile.gettempdir()).glob("soup-candidate-*")) == before
    assert not list(tmp_path.rglob("soup-candidate-*"))
    # the noise is mostly independent: averaging two fine-tunes beats each, the third is left out
    assert len(result.trajectory) == 3 and sorted(result.weights.values()) == [0.0, 0.5, 0.5]
    monkeypatch.undo()
    ref = reference(tmp_path / "soup", ["soup_tiny_mc"], world["tasks"])["soup_tiny_mc"]
    assert result.soup_score.value == ref["brier_score,none"]  # the soup written is the one scored


# --- errors and identity -------------------------------------------------------------------------


def test_metric_not_reported_and_lower_is_better(world):
    cand = Candidate.from_state_dict("ft0", weights(world["fts"][0]))
    with pytest.raises(EvaluatorError, match=r"metric 'f1' is not reported .*reported: acc, acc_norm, brier_score"):
        run_evaluator(load_evaluator("lm-eval", **args(world, metric="f1")), cand)
    with pytest.raises(EvaluatorError, match="lower brier_score is better.*direction: minimize"):
        run_evaluator(load_evaluator("lm-eval", **args(world, metric="brier_score")), cand)


def test_bad_arguments_are_refused_before_any_work(world, tmp_path):
    with pytest.raises(EvaluatorError, match="evaluator lm-eval: argument 'metric' is required"):
        load_evaluator("lm-eval", tasks="soup_tiny_mc", include_path=str(world["tasks"]))  # no metric
    for bad, match in [({"limit": 0}, "limit"), ({"batch_size": "big"}, "batch_size"),
                       ({"num_fewshot": -1}, "num_fewshot"), ({"dtype": "int3"}, "unknown dtype"),
                       ({"include_path": str(tmp_path / "none")}, "include_path"),
                       ({"tasks": str(tmp_path / "none.yaml")}, "task YAML not found"),
                       ({"tasks": []}, "tasks must be"), ({"direction": "up"}, "direction"),
                       ({"model": str(tmp_path / "none")}, "model folder not found")]:
        with pytest.raises(EvaluatorError, match=match):
            LMEvalEvaluator(**args(world, **bad))


def test_missing_package_is_one_line(world, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(EvaluatorError, match=r"pip install 'soup-merge\[lm-eval\]'") as info:
        LMEvalEvaluator(**args(world))
    assert "\n" not in str(info.value)


def test_unknown_task_suggests_close_names(world, monkeypatch):
    import lm_eval.tasks

    class LocalOnly(TaskManager):  # lm-eval's own index takes seconds to build: leave it out here
        def __init__(self, include_path=None, include_defaults=True, **kw):
            super().__init__(include_path=include_path, include_defaults=False, **kw)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalOnly)
    with pytest.raises(EvaluatorError, match=r"unknown task 'soup_tiny_mx'.*did you mean soup_tiny_mc"):
        LMEvalEvaluator(**args(world, tasks="soup_tiny_mx"))


def test_identity_follows_task_files_and_lm_eval_version(world):
    first = LMEvalEvaluator(**args(world)).identity()
    assert first["name"] == "lm-eval" and first["lm_eval_version"] == lm_eval.__version__
    assert first["primary"] == "acc_norm" and "device" not in first["args"]
    json.dumps(first)  # the cache can serialise it
    yaml = world["tasks"] / "tiny.yaml"
    text = yaml.read_text()
    try:
        yaml.write_text(text.replace("answer\"", "answer :\""))
        assert LMEvalEvaluator(**args(world)).identity()["tasks_sha256"] != first["tasks_sha256"]
    finally:
        yaml.write_text(text)
    rows = world["data"].read_text()
    try:
        world["data"].write_text(rows + json.dumps(ROWS[0]) + "\n")  # the data the YAML points to
        assert LMEvalEvaluator(**args(world)).identity()["tasks_sha256"] != first["tasks_sha256"]
    finally:
        world["data"].write_text(rows)
    assert LMEvalEvaluator(**args(world)).identity() == first


# --- per-example scores (racing) -------------------------------------------------------------------


def logged(folder: Path, task: str, include_path: Path, metric: str = "acc") -> tuple[list[float], float]:
    """lm-eval's own run on every document of ``task`` for the weights in ``folder``: each document's
    logged ``metric`` (by doc id) and the task's aggregate."""
    manager = TaskManager(include_path=[str(include_path)], include_defaults=False)
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder}", tasks=[task],
                                  task_manager=manager, device="cpu", batch_size=4, bootstrap_iters=0,
                                  log_samples=True)
    by_doc = {s["doc_id"]: float(s[metric]) for s in out["samples"][task]}
    assert sorted(by_doc) == list(range(len(ROWS)))
    return [by_doc[i] for i in range(len(ROWS))], out["results"][task][f"{metric},none"]


def test_per_document_scores_are_lm_eval_s_own_logged_samples(world):
    """One task with a mean metric: ``examples()`` is its documents, ``score_examples`` each document's
    value as lm-eval logs it when it evaluates every document, their mean the task's score."""
    ft = world["fts"][1]
    ev = load_evaluator("lm-eval", **args(world, metric="acc"))
    assert ev.examples() == len(ROWS) and ev.score_is_mean and ev.example_range == (0.0, 1.0)
    assert ev.model is None  # counting the documents builds no model
    cand = Candidate.from_state_dict(ft.name, weights(ft), key=ft.name)
    subset = ev.score_examples(cand, [5, 0, 3])
    every = ev.score_examples(cand, list(range(len(ROWS))))
    expected, acc = logged(ft, "soup_tiny_mc", world["tasks"])
    assert [expected[5], expected[0], expected[3]] != [expected[0], expected[3], expected[5]]  # order matters
    assert every == expected and subset == [expected[5], expected[0], expected[3]]
    assert sum(every) / len(every) == acc
    assert ev.aggregate(every) == {"acc": acc}
    score = run_evaluator(ev, cand)  # the whole score: the mean of the same values
    assert score.value == score.metrics["acc"] == mean_score(every) == acc
    with pytest.raises(EvaluatorError, match="out of range 0..7: 8"):
        ev.score_examples(cand, [2, 8])
    ev.close()
    brier = load_evaluator("lm-eval", **args(world, metric="brier_score", direction="minimize"))
    assert brier.examples() is None  # not a mean: scored whole
    group = load_evaluator("lm-eval", **args(world, tasks="soup_tiny_suite",
                                             include_path=[str(world["tasks"]), str(world["suite"])], metric="acc"))
    assert group.examples() is None
    several = load_evaluator("lm-eval", **args(world, tasks=["soup_tiny_mc", str(world["other"])], metric="acc"))
    assert several.examples() is None
    with pytest.raises(EvaluatorError, match="no per-example scores here"):
        several.score_examples(cand, [0])


def test_per_document_scores_with_few_shot_examples_only_when_each_document_s_own(world):
    """Few-shot examples drawn at random depend on how many documents came before (one generator per
    run): a subset would see other examples than a full run, so such a task gives no per-example scores.
    The ``first_n`` sampler gives each document the same examples in any run: its values on a subset
    are those of lm-eval's full run, and their mean is the score."""
    ft, folder = world["fts"][2], world["fewshot"]
    random_shots = load_evaluator("lm-eval", **args(world, tasks="soup_tiny_mc_random", include_path=str(folder),
                                                    metric="acc"))
    assert random_shots.examples() is None and not random_shots.score_is_mean
    zero = load_evaluator("lm-eval", **args(world, tasks="soup_tiny_mc_random", include_path=str(folder),
                                            metric="acc", num_fewshot=0))
    assert zero.examples() == len(ROWS)  # num_fewshot: 0 overrides the task's 2: no examples drawn
    ev = load_evaluator("lm-eval", **args(world, tasks="soup_tiny_mc_first", include_path=str(folder), metric="acc"))
    assert ev.examples() == len(ROWS) and ev.score_is_mean
    cand = Candidate.from_state_dict(ft.name, weights(ft), key=ft.name)
    expected, acc = logged(ft, "soup_tiny_mc_first", folder)
    sub = [7, 0, 3, 5]
    assert [expected[i] for i in sub] != [expected[i] for i in sorted(sub)]  # the order asked for matters
    assert ev.score_examples(cand, sub) == [expected[i] for i in sub]
    assert ev.score_examples(cand, list(range(len(ROWS)))) == expected
    assert run_evaluator(ev, cand).metrics["acc"] == mean_score(expected) == acc
    ev.close()
