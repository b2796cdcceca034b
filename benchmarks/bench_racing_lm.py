"""Racing on a real language model (issue 21): greedy and search on a tiny Llama, scored by perplexity.

The task: a tiny Llama (``tests/tiny_lm.py``: word-level tokenizer, 2 layers, hidden 64) is first
trained on a mixture of six sentence templates (the "base"), then fine-tuned from that base on one
template each (``--ingredients`` fine-tunes; the last one on sentences with their words shuffled,
a bad fine-tune). Validation: ``--examples`` sentences of the mixture; per-example score = the mean
token loss of one sentence (``PerplexityEvaluator`` with ``model=``: the number of examples is known
before any candidate, so greedy and search race). Every seed draws new training data and new
fine-tunes, then runs greedy (and, with ``--search-trials``, search with the random sampler) twice
without a score cache: racing off and on. For the first ``--lm-eval-seeds`` seeds, greedy also runs
(and search) with lm-eval on a local multiple-choice task over the same sentences (a sentence's first half; its
true ending against another sentence's and its own shuffled; ``acc`` per question). Printed as
``bench_racing.py`` prints its tasks.

    python benchmarks/bench_racing_lm.py                    # 8 seeds
    python benchmarks/bench_racing_lm.py --seeds 2 --search-trials 0
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_racing import Counting, run_pair, run_search_pair, summarise, summarise_search  # noqa: E402
from tiny_lm import build_tiny_lm  # noqa: E402

from soup.evaluators.perplexity import PerplexityEvaluator  # noqa: E402

NOUNS = "cat dog sun moon tree house mat rug park".split()
ADJS = "big small red blue green good bad".split()
TEMPLATES = [
    lambda r: f"the {r.choice(ADJS)} {r.choice(NOUNS)} sat on the {r.choice(['mat', 'rug'])} .",
    lambda r: f"the {r.choice(NOUNS)} ran to the {r.choice(['park', 'house', 'home'])} and the {r.choice(NOUNS)} ran home .",
    lambda r: f"what is the {r.choice(NOUNS)} ? the {r.choice(NOUNS)} is {r.choice(ADJS)} .",
    lambda r: f"where is the {r.choice(NOUNS)} ? it was on the {r.choice(['mat', 'rug'])} .",
    lambda r: f"hello world , good {r.choice(['day', 'night'])} , the {r.choice(['sun', 'moon'])} is {r.choice(ADJS)} !",
    lambda r: f"do you say yes ? i said {r.choice(['yes', 'no'])} , they said {r.choice(['yes', 'no'])} .",
]


def sentences(rng: random.Random, n: int, templates: list[int], shuffle: bool = False) -> list[str]:
    out = []
    for _ in range(n):
        words = TEMPLATES[rng.choice(templates)](rng).split()
        if shuffle:
            rng.shuffle(words)
        out.append(" ".join(words))
    return out


def train(folder: Path, start: Path | None, texts: list[str], steps: int, lr: float, seed: int) -> Path:
    """Train the tiny LM in ``folder`` (from ``start``'s weights, else as built) on ``texts``; save."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_tiny_lm(folder, seed=0, hidden_size=64)
    model = AutoModelForCausalLM.from_pretrained(folder)
    if start is not None:
        model.load_state_dict(load_file(str(start / "model.safetensors")), strict=False)
    tok = AutoTokenizer.from_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = [texts[int(i)] for i in torch.randint(len(texts), (32,), generator=gen)]
        enc = tok(batch, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(folder)
    return folder


def task(root: Path, seed: int, n_ingredients: int, n_examples: int) -> tuple[list[Path], Path, Path]:
    """The base, the fine-tunes and the validation file of one seed."""
    rng = random.Random(seed)
    everything = list(range(len(TEMPLATES)))
    base = train(root / "base", None, sentences(rng, 3000, everything), 300, 3e-3, seed)
    paths = []
    for i in range(n_ingredients):
        bad = i == n_ingredients - 1
        texts = sentences(rng, 1000, [i % len(TEMPLATES)], shuffle=bad)
        paths.append(train(root / f"ft{i}", base, texts, 60, 2e-3, seed * 100 + i))
    val = root / "val.txt"
    val.write_text("\n".join(sentences(rng, n_examples, everything)) + "\n")
    return paths, base, val


MC_TASK = """\
task: soup_bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def mc_task(root: Path, seed: int, n: int) -> Path:
    """A local lm-eval multiple-choice task: a sentence of the mixture cut in two, the true ending
    against another sentence's ending and the true one shuffled (the folder of its YAML)."""
    import json

    rng = random.Random(seed + 7)
    everything = list(range(len(TEMPLATES)))
    rows = []
    for s, other in zip(sentences(rng, n, everything), sentences(rng, n, everything)):
        words, more = s.split(), other.split()
        cut, cut2 = len(words) // 2, len(more) // 2
        true, wrong = " ".join(words[cut:]), " ".join(more[cut2:])
        mixed = words[cut:]
        rng.shuffle(mixed)
        choices = [true, wrong, " ".join(mixed)]
        order = list(range(3))
        rng.shuffle(order)
        rows.append({"context": " ".join(words[:cut]), "choices": [choices[k] for k in order],
                     "label": order.index(0)})
    folder = root / "mc"
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "task.yaml").write_text(MC_TASK.format(data=data))
    return folder


def counting_lm_eval(counter: Counting, **kw):
    from soup.evaluators.lm_eval import LMEvalEvaluator

    class CountingLMEval(LMEvalEvaluator):
        def score(self, candidate):
            out = super().score(candidate)
            self.counter.add(candidate, self.examples() or 0)
            return out

        def score_examples(self, candidate, indices):
            self.counter.add(candidate, len(indices))
            return super().score_examples(candidate, indices)

    ev = CountingLMEval(**kw)
    ev.counter = counter
    return ev


class CountingPerplexity(PerplexityEvaluator):
    """The perplexity evaluator, counting the examples it scores (``bench_racing.Counting``)."""

    def __init__(self, counter: Counting, **kw) -> None:
        super().__init__(**kw)
        self.counter = counter

    def score(self, candidate):
        out = super().score(candidate)
        self.counter.add(candidate, self.examples())
        return out

    def score_examples(self, candidate, indices):
        self.counter.add(candidate, len(indices))
        return super().score_examples(candidate, indices)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--ingredients", type=int, default=6)
    ap.add_argument("--examples", type=int, default=1000, help="validation sentences")
    ap.add_argument("--search-trials", type=int, default=20, help="trials per search run (0: no search)")
    ap.add_argument("--lm-eval-seeds", type=int, default=4, help="seeds of the lm-eval multiple-choice task "
                    "(greedy; 0: none)")
    ap.add_argument("--mc-examples", type=int, default=400, help="questions of the lm-eval task")
    ap.add_argument("--delta", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--min-examples", type=int, default=128)
    args = ap.parse_args(argv)
    racing = {"delta": args.delta, "batch": args.batch, "min_examples": args.min_examples}
    print(f"racing: {racing}")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    greedy_runs, search_runs, mc_runs, mc_search_runs = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="soup-bench-racing-lm-") as tmp:
        for seed in range(args.seeds):
            paths, base, val = task(Path(tmp) / f"seed{seed}", seed, args.ingredients, args.examples)

            def make(counter, base=base, val=val):
                return CountingPerplexity(counter, data=val, model=base, batch_size=64)

            greedy_runs.append(run_pair(paths, make, racing, seed))
            if args.search_trials:
                search_runs.append(run_search_pair(paths, make, racing, seed, args.search_trials))
            if seed < args.lm_eval_seeds:
                tasks = mc_task(Path(tmp) / f"seed{seed}", seed, args.mc_examples)

                def make_mc(counter, base=base, tasks=tasks):
                    return counting_lm_eval(counter, tasks="soup_bench_mc", include_path=str(tasks), metric="acc",
                                            model=str(base), batch_size=64, device="cpu")

                mc_runs.append(run_pair(paths, make_mc, racing, seed))
                if args.search_trials:
                    mc_search_runs.append(run_search_pair(paths, make_mc, racing, seed, args.search_trials))
            print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    name = f"perplexity on a tiny Llama (greedy; {args.ingredients - 1} fine-tunes + 1 on shuffled words)"
    print("\n".join(summarise(name, greedy_runs, args.examples, args.ingredients)))
    if mc_runs:
        name = "lm-eval local multiple-choice task on the same fine-tunes (greedy; acc per question)"
        print("\n".join(summarise(name, mc_runs, args.mc_examples, args.ingredients)))
    if search_runs:
        print("\n".join(summarise_search(search_runs, args.examples, args.ingredients, args.search_trials,
                                         "search, perplexity on a tiny Llama")))
    if mc_search_runs:
        print("\n".join(summarise_search(mc_search_runs, args.mc_examples, args.ingredients, args.search_trials,
                                         "search, lm-eval local multiple-choice task")))
    print(f"wall time: {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
