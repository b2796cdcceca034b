"""Per-example scores (racing) of the ``command`` and ``table`` evaluators: values checked against what the
test computes itself, every bad output one line naming the command or the row.

The ``lm-eval`` evaluator's per-example scores are tested in tests/test_lm_eval.py (against lm-eval's own
logged samples), ``python`` and ``perplexity`` in tests/test_racing.py and tests/test_evaluators.py.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import pytest

from soup.errors import EvaluatorError
from soup.soups.evaluate import Candidate, mean_score, run_evaluator, run_examples

torch = pytest.importorskip("torch")

from soup.evaluators.command import CommandEvaluator  # noqa: E402
from soup.evaluators.table import TableEvaluator  # noqa: E402


def script(tmp_path: Path, body: str, name: str = "bench.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def candidate(name: str = "cand", **kw) -> Candidate:
    sd = {"w": torch.ones(2)}
    return Candidate(name, f"key-{name}", state_dict_fn=lambda d: sd,
                     write_fn=lambda folder: (folder / "model.safetensors").write_bytes(b"x"), **kw)


def value(i: int) -> float:
    """The per-example value the test benchmarks give example ``i``: in [0, 1], not symmetric in i."""
    return (i * 7 % 11) / 10


# --- command -------------------------------------------------------------------------------------------

BENCH = """
    import json, sys
    indices = json.load(open(sys.argv[1]))
    with open(sys.argv[2], "a") as log:  # what the command was asked, for the test
        log.write(json.dumps(indices) + "\\n")
    print("loading the benchmark...")
    print(json.dumps({"scores": {"per_doc": [(i * 7 % 11) / 10 for i in indices]}, "note": "x"}))
"""


def test_command_per_example_scores_follow_the_indices_file(tmp_path):
    """The command is given exactly the indices asked for, in order; its values come back in that order;
    the whole score is their mean over all N (the command run on 0..N-1), the contract's ``score_is_mean``."""
    n, log = 37, tmp_path / "asked.jsonl"
    bench = script(tmp_path, BENCH)
    ev = CommandEvaluator(cmd=[sys.executable, str(bench), "{indices}", str(log)], examples=n,
                          per_example="scores.per_doc", example_range=[0, 1])
    assert ev.examples() == n and ev.score_is_mean and ev.example_range == (0.0, 1.0)
    cand = candidate()
    asked = [30, 2, 2, 11, 0]
    assert ev.score_examples(cand, asked) == [value(i) for i in asked] == [0.1, 0.3, 0.3, 0.0, 0.0]
    everything = [value(i) for i in range(n)]
    expected = float(Fraction(math.fsum(everything)) / n)
    assert run_evaluator(ev, cand).value == expected == mean_score(everything)
    assert ev.aggregate(everything) == expected
    assert [json.loads(line) for line in log.read_text().splitlines()] == [asked, list(range(n))]
    with pytest.raises(EvaluatorError, match="example index out of range 0..36: 37"):
        ev.score_examples(cand, [0, 37])
    assert len(log.read_text().splitlines()) == 2  # refused before any run
    with pytest.raises(EvaluatorError, match="no per-example scores without examples: N"):
        CommandEvaluator(cmd=[sys.executable, str(bench)]).score_examples(cand, [0])


def test_command_per_example_list_in_a_result_file_or_on_the_last_stdout_line(tmp_path):
    """The list is read from ``result`` at ``per_example``, or, with neither, from the last line of stdout
    that parses as JSON (the whole JSON being the list)."""
    to_file = script(tmp_path, """
        import json, os, sys
        indices = json.load(open(sys.argv[1]))
        os.makedirs(sys.argv[2])
        json.dump({"runs": [{"per_example": [i / 100 for i in indices]}]}, open(sys.argv[2] + "/r.json", "w"))
    """, name="to_file.py")
    ev = CommandEvaluator(cmd=[sys.executable, str(to_file), "{indices}", "{output}"], result="{output}/r.json",
                          examples=50, per_example="runs[0].per_example")
    assert ev.score_examples(candidate(), [49, 3]) == [0.49, 0.03]
    assert ev.score(candidate()) == mean_score([i / 100 for i in range(50)])
    assert ev.example_range is None  # not given: racing uses the range seen so far
    last_line = script(tmp_path, """
        import json, sys
        print("[9, 9]")  # an earlier list is not the answer
        print(json.dumps([len(sys.argv[1]) * 0 + i * 2.5 for i in json.load(open(sys.argv[1]))]))
        print("done")
    """, name="last_line.py")
    ev = CommandEvaluator(cmd=[sys.executable, str(last_line), "{indices}"], examples=4)
    assert ev.score_examples(candidate(), [3, 1]) == [7.5, 2.5]
    assert ev.score(candidate()) == (0 + 2.5 + 5 + 7.5) / 4


@pytest.mark.parametrize("printed, message", [
    ("[1, 2]", "gave 2 per-example scores for 3 examples"),
    ('{"a": [1, 2, 3]}', "gave dict for its per-example scores, expected a JSON list"),
    ("[1, NaN, 0]", "gave a non-finite per-example score 1: nan"),
    ('[0, 1, "Infinity"]', "gave a non-finite per-example score 2: inf"),
    ('[0, "x", 1]', "per-example score 1 holds 'x', not a number"),
    ("[0, 1, true]", "per-example score 2 holds True, not a number"),
    ("[0, 1.5, 1]", r"gave per-example score 1 = 1.5, outside example_range \[0, 1\]"),
    ("no json", "printed no JSON on stdout"),
])
def test_command_bad_per_example_output_is_one_line(tmp_path, printed, message):
    bench = script(tmp_path, f"print({printed!r})\n")
    ev = CommandEvaluator(cmd=[sys.executable, str(bench), "{indices}"], examples=5, example_range=[0, 1])
    with pytest.raises(EvaluatorError, match=message) as caught:
        run_examples(ev, candidate("ft-x"), [0, 1, 2])
    text = str(caught.value)
    assert "\n" not in text and text.startswith("evaluator command failed on ft-x (per-example): ")


@pytest.mark.parametrize("kwargs, message", [
    ({"examples": 5, "key": "mean"}, "with examples: N the score is the mean of the per-example values"),
    ({"examples": 5, "regex": r"acc=(\S+)"}, "drop key/regex"),
    ({"examples": 0}, "examples must be a whole number >= 1, got 0"),
    ({"examples": True}, "examples must be a whole number >= 1, got True"),
    ({"examples": 5.0}, "examples must be a whole number >= 1, got 5.0"),
    ({"examples": 5, "example_range": [1, 0]}, r"example_range must be \[low, high\] with low < high"),
    ({"per_example": "x"}, "per_example and example_range need examples: N"),
    ({"example_range": [0, 1]}, "per_example and example_range need examples: N"),
])
def test_command_per_example_arguments_are_checked_before_any_run(tmp_path, kwargs, message):
    with pytest.raises(EvaluatorError, match=message) as caught:
        CommandEvaluator(cmd=[sys.executable, "never-run.py", "{indices}"], **kwargs)
    assert "\n" not in str(caught.value)
    with pytest.raises(EvaluatorError, match=r"needs the \{indices\} placeholder"):
        CommandEvaluator(cmd=[sys.executable, "never-run.py"], examples=5)


RACE = """
    import glob, json, struct, sys
    indices = json.load(open(sys.argv[1]))
    (path,) = glob.glob(sys.argv[2] + "/*.safetensors")
    with open(path, "rb") as f:  # the soup's "s": 1/k at its k members (one-hot ingredients, uniform soup)
        size = struct.unpack("<Q", f.read(8))[0]
        entry = json.loads(f.read(size))["s"]
        f.seek(8 + size + entry["data_offsets"][0])
        s = struct.unpack("<3f", f.read(12))
    members = [m for m in range(3) if s[m] > 1e-6]
    level = sum((0.8, 0.78, 0.2)[m] for m in members) / len(members) + 0.02 * (len(members) - 1)
    difficulty = [(i * 2654435761 % 2**32) / 2**32 for i in indices]
    print(json.dumps([1.0 if d < level else 0.0 for d in difficulty]))
"""


def test_a_command_evaluator_races_greedy_to_full_evaluation_s_soup(tmp_path):
    """A benchmark command with ``examples: N``: greedy raced keeps what greedy scored whole keeps, with the
    same soup score, and stops the clearly worse candidate early."""
    from safetensors.torch import save_file

    from soup.pipeline import greedy_soup

    paths = []
    for i, label in enumerate("abc"):
        folder = tmp_path / label
        folder.mkdir()
        save_file({"s": torch.nn.functional.one_hot(torch.tensor(i), 3).float()}, str(folder / "model.safetensors"))
        paths.append(folder)
    n = 600
    args = {"cmd": [sys.executable, str(script(tmp_path, RACE)), "{indices}", "{model}"], "examples": n,
            "example_range": [0, 1]}
    raced = greedy_soup(paths, "command", evaluator_args=args, cache=None)
    full = greedy_soup(paths, "command", evaluator_args=args, cache=None, racing=False)
    assert raced.weights == full.weights and set(raced.weights.values()) == {0.5, 0.0}
    levels = [(i * 2654435761 % 2**32) / 2**32 < 0.81 for i in range(n)]
    assert raced.soup_score.value == full.soup_score.value == sum(levels) / n  # a+b, scored on every example
    c = next(t for t in raced.manifest.evaluation.history if t.candidate == "c")
    assert c.stopped == "separated" and c.examples < n


# --- table ---------------------------------------------------------------------------------------------


def table(tmp_path: Path, rows: dict, name: str = "scores.json") -> Path:
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps(rows))
    else:
        import yaml
        path.write_text(yaml.safe_dump(rows))
    return path


def test_table_rows_give_their_examples_and_a_score_that_is_exactly_their_mean(tmp_path):
    """A row's ``score`` may be left out (filled in) or given as rounding leaves it (taken as the exact
    mean); ``examples()`` is the lists' length, looked up as ``score`` looks a candidate up."""
    drift = [0.789, 0.094, 0.028, 0.836, 0.433, 0.762, 0.002]
    assert sum(drift) / 7 != math.fsum(drift) / 7  # a naive mean differs in the last bit
    path = table(tmp_path, {"a": {"examples": [1, 0, 1, 1, 0, 0, 1]},
                            "b": {"score": sum(drift) / 7, "examples": drift},
                            "a+b": {"score": 3 / 7, "examples": [0, 0, 1, 1, 0, 0, 1]}}, "scores.yaml")
    ev = TableEvaluator(path=path)
    assert ev.examples() == 7 and ev.score_is_mean and ev.example_range == (0.0, 1.0)
    a = candidate("x", weights={"a": 1.0, "b": 0.0})
    assert run_evaluator(ev, a).value == 4 / 7
    assert run_evaluator(ev, candidate("b")).value == float(Fraction(math.fsum(drift)) / 7) == mean_score(drift)
    assert ev.score_examples(candidate("y", weights={"b": 0.5, "a": 0.5}), [6, 0, 2]) == [1.0, 0.0, 1.0]
    assert ev.score_examples(candidate("b"), [3, 1]) == [0.836, 0.094]
    with pytest.raises(EvaluatorError, match="example index out of range 0..6: 7"):
        ev.score_examples(a, [0, 7])
    with pytest.raises(EvaluatorError, match=r"no examples for z in .*scores.yaml \(tried 'z', 'key-z'\)"):
        ev.score_examples(candidate("z"), [0])


def test_table_examples_are_the_primary_metric_s(tmp_path):
    """With several metrics, the lists hold the primary metric's values: it is their mean, the others
    stay as given."""
    rows = {"a": {"acc": 0.5, "f1": 0.9, "examples": [1, 0]}, "b": {"f1": 0.2, "examples": [1, 1]}}
    ev = TableEvaluator(path=table(tmp_path, rows), primary="acc")
    assert ev.score(candidate("a")) == {"acc": 0.5, "f1": 0.9}
    assert ev.score(candidate("b")) == {"acc": 1.0, "f1": 0.2}
    assert ev.aggregate([1.0, 1.0]) == {"acc": 1.0}
    rows["a"]["acc"] = 0.6
    with pytest.raises(EvaluatorError, match=r"a: acc 0.6 is not the mean of its examples \(0.5\)"):
        TableEvaluator(path=table(tmp_path, rows), primary="acc")


@pytest.mark.parametrize("rows, message", [
    ({"a": {"score": 0.5, "examples": [1, 0, 1]}}, r"a: score 0.5 is not the mean of its examples \(0.666"),
    ({"a": {"examples": [1, 0]}, "ft-long": {"examples": [1, 0, 1]}}, "ft-long has 3 examples, a has 2"),
    ({"a": {"examples": [1, 0]}, "b": 0.5}, "b has no examples list while other rows have one"),
    ({"a": {"examples": [1, 0]}, "b": {"score": 1, "examples": []}}, "b.examples must be a non-empty list"),
    ({"a": {"examples": [1, "x"]}}, r"a.examples\[1\]: 'x' is not a number"),
    ({"a": {"examples": [1, True]}}, r"a.examples\[1\]: True is not a number"),
    ({"a": {"examples": [1, float("nan")]}}, r"a.examples holds a non-finite value \(index 1\)"),
    ({"a": {"examples": 3}}, "a.examples must be a non-empty list of numbers"),
])
def test_table_bad_examples_are_one_line_naming_the_row(tmp_path, rows, message):
    with pytest.raises(EvaluatorError, match=message) as caught:
        TableEvaluator(path=table(tmp_path, rows))
    assert "\n" not in str(caught.value) and "scores.json" in str(caught.value)


def test_csv_tables_give_no_per_example_scores(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text("candidate,score\na,0.5\nb,0.25\n")
    ev = TableEvaluator(path=path)
    assert ev.examples() is None and not ev.score_is_mean and ev.aggregate([1.0]) is None
