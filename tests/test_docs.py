"""The documentation cannot drift from the code: the README and the MkDocs site under docs/.

- the site builds with ``mkdocs build --strict`` (skipped only when MkDocs is missing outside CI);
- every ```python block runs as written, on tiny checkpoints in tmp_path, except those marked with an
  HTML comment ``<!-- not run: REASON -->`` on the line before the fence (a GPU, the hub, a server);
- every ``soup`` command line (```bash blocks, ``$ `` prompts, Kubernetes ``command:`` lists, inline
  code spans that start with ``soup ``) names a subcommand and options that the CLI has;
- the API reference covers ``soup.__all__`` and the plug-in base classes; every page is in the nav.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import typer.main
import yaml

import soup
from conftest import make_state, write_checkpoint
from soup.cli import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(.*?)\s*-->$")
SHELLS = {"bash", "sh", "shell", "console"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: str | None  # the reason, when the line before the fence is <!-- not run: ... -->

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a markdown page, in order."""
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(`{3,})\s*([\w+-]*)", lines[i])
        if not fence:
            i += 1
            continue
        start, end = i, i + 1
        while end < len(lines) and not lines[end].startswith(fence.group(1)):
            end += 1
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN.match(before)
        found.append(Block(page, start + 1, fence.group(2).lower(), "\n".join(lines[start + 1:end]) + "\n",
                           marker.group(1) if marker else None))
        i = end + 1
    return found


def prose(page: Path) -> str:
    """The page with its fenced blocks blanked out, line numbers kept (for inline code spans)."""
    return re.sub(r"^(`{3,}).*?^\1\s*$", lambda m: "\n" * m.group(0).count("\n"), page.read_text(),
                  flags=re.S | re.M)


ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]
PYTHON = [b for b in ALL_BLOCKS if b.lang in ("python", "py")]


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


# ---- (a) the site builds, strictly --------------------------------------------------------------------
def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI: {', '.join(missing)} missing (the dev extra installs mkdocs-material and mkdocstrings)")
        pytest.skip(f"{', '.join(missing)} not installed (pip install mkdocs-material 'mkdocstrings[python]')")


def test_the_site_builds_strictly(tmp_path):
    _require("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (site / "index.html").exists() and (site / "api" / "index.html").exists()
    api = (site / "api" / "index.html").read_text()
    for name in ("soup.merge", "soup.greedy_soup", "soup.methods.base.MergeMethod"):
        assert name in api, name


# ---- (b) every python block runs, on tiny checkpoints -------------------------------------------------
@pytest.fixture
def runs(tmp_path, monkeypatch):
    """A working directory with runs/ft-a, ft-b, ft-c (fine-tunes) and runs/base, as the examples name
    them; offline, with the score cache, temp files and the current directory all in tmp_path."""
    work = tmp_path / "work"
    for i, name in enumerate(["ft-a", "ft-b", "ft-c"]):
        write_checkpoint(work / "runs" / name, make_state(i))
    write_checkpoint(work / "runs" / "base", make_state(99))
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("SOUP_CACHE", str(tmp_path / "scores.sqlite"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return work


@pytest.mark.parametrize("block", PYTHON, ids=[b.where for b in PYTHON])
def test_python_block_runs(block, runs, monkeypatch):
    if block.not_run is not None:
        assert block.not_run, f"{block.where}: <!-- not run: --> needs a reason"
        pytest.skip(f"not run: {block.not_run}")
    top = sorted(p.name for p in ROOT.iterdir())
    module = types.ModuleType("soup_docs_example")  # a real module: dataclasses and pickling need one
    monkeypatch.setitem(sys.modules, module.__name__, module)
    # the README's Python API example uses two trained models of the reader's own
    module.__dict__.update(model_a=torch.nn.Linear(3, 2), model_b=torch.nn.Linear(3, 2))
    exec(compile(block.code, block.where, "exec"), module.__dict__)
    assert sorted(p.name for p in ROOT.iterdir()) == top, "an example wrote into the repository"


def test_not_run_markers_sit_on_python_blocks():
    """A marker anywhere else would skip nothing: each one must be right before a python block."""
    marked = {(b.page, b.line) for b in PYTHON if b.not_run is not None}
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if NOT_RUN.match(line.strip()):
                fence = next((j for j in range(i + 1, len(lines)) if lines[j].strip()), None)
                assert fence is not None and (page, fence + 1) in marked, \
                    f"{_rel(page)}:{i + 1}: a not-run marker that is not right before a ```python block"


# ---- (c) every soup command line matches the CLI ------------------------------------------------------
CLI = typer.main.get_command(app)
WRAPPERS = {"srun", "sudo", "exec", "nohup", "time", "env", "timeout", "flock"}


def _options(command) -> set[str]:
    """A click command's option names (typer ships its own copy of click: duck-typed, not isinstance)."""
    names = {"--help"}
    for param in command.params:
        if param.param_type_name == "option":
            names.update(param.opts + param.secondary_opts)
    return names


def check_soup_args(args: list[str]) -> list[str]:
    """Problems with one ``soup ...`` invocation (the words after ``soup``); [] when it fits the CLI."""
    problems, i = [], 0
    while i < len(args) and args[i].startswith("-"):  # the app's own options: soup --debug merge ...
        if args[i].split("=")[0] not in _options(CLI):
            problems.append(f"soup has no option {args[i]} before the subcommand")
        i += 1
    if i == len(args):
        return problems
    name = args[i]
    if name == "...":  # prose: `soup --debug ...`
        return problems
    sub = CLI.commands.get(name)
    if sub is None:
        return problems + [f"no subcommand {name!r} (soup has {', '.join(sorted(CLI.commands))})"]
    known = _options(sub) | {"--debug"}  # the app's flag, accepted after the subcommand too (soup.cli.common)
    for word in args[i + 1:]:
        if word == "--":
            break
        if word.startswith("-") and len(word) > 1 and not re.fullmatch(r"-\d.*", word):
            if word.split("=")[0] not in known:
                problems.append(f"soup {name} has no option {word.split('=')[0]}")
    return problems


def soup_invocations(code: str) -> list[list[str]]:
    """The words after ``soup`` of each soup command in a shell snippet (comments, continuations,
    ``&&`` / ``|`` / ``;`` chains, leading ``VAR=value`` assignments and wrappers like ``srun``)."""
    lexer = shlex.shlex(code.replace("\\\n", " "), posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    found, command, words = [], [], [*lexer, ";"]
    i = 0
    while i < len(words):
        word = words[i]
        if re.fullmatch(r"[<>&]*[<>][<>&]*", word):  # a redirection (>>, 2>&1): skip its target
            i += 2
            continue
        if word in (";", "&&", "||", "|", "&", ";;"):
            while command and re.fullmatch(r"\w+=.*", command[0]):
                command.pop(0)
            while command and command[0] in WRAPPERS:
                wrapper = command.pop(0)
                while command and (command[0].startswith("-") or re.fullmatch(r"\w+=.*", command[0])):
                    command.pop(0)
                if wrapper in ("flock", "timeout") and command:  # their lock file / duration
                    command.pop(0)
            if command and (command[0] == "soup" or command[0].endswith("/soup")):
                found.append(command[1:])
            command = []
        else:
            command.append(word)
        i += 1
    return found


def _yaml_commands(node):
    """Kubernetes-style ``command: [...]`` lists anywhere in a YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "command" and isinstance(value, list) and all(isinstance(v, str) for v in value):
                yield value
            else:
                yield from _yaml_commands(value)
    elif isinstance(node, list):
        for value in node:
            yield from _yaml_commands(value)


def command_lines(page: Path) -> list[tuple[str, list[str]]]:
    """(where, words after soup) for every soup command the page shows."""
    found = []
    for b in blocks(page):
        if b.lang in SHELLS:
            lines = b.code.split("\n")
            # one snippet per logical line, so a problem names its line
            i = 0
            while i < len(lines):
                start, text = i, lines[i]
                while text.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    text = text[:-1] + " " + lines[i]
                if b.lang == "console" and not text.startswith("$ "):
                    i += 1
                    continue
                for words in soup_invocations(text.removeprefix("$ ")):
                    found.append((f"{_rel(page)}:{b.line + 1 + start}", words))
                i += 1
        elif b.lang == "":  # logs and output: only the prompt lines are commands
            for k, line in enumerate(b.code.split("\n")):
                if line.startswith("$ "):
                    for words in soup_invocations(line[2:]):
                        found.append((f"{_rel(page)}:{b.line + 1 + k}", words))
        elif b.lang in ("yaml", "yml"):
            for command in _yaml_commands(yaml.safe_load(b.code)):
                if command and (command[0] == "soup" or command[0].endswith("/soup")):
                    found.append((f"{_rel(page)}:{b.line} (command:)", command[1:]))
    text = prose(page)
    for span in re.finditer(r"`(soup\s[^`]+)`", text):
        line = text[:span.start()].count("\n") + 1
        words = shlex.split(" ".join(span.group(1).split()))[1:]
        found.append((f"{_rel(page)}:{line} (inline `{span.group(1)}`)", words))
    return found


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_soup_command_lines_match_the_cli(page):
    problems = [f"{where}: {p}" for where, words in command_lines(page) for p in check_soup_args(words)]
    assert not problems, "\n".join(problems)


def test_the_command_check_catches_drift():
    assert soup_invocations("X=1 srun --gres=gpu:1 soup worker r.yaml --devices cuda:0  # comment") == \
        [["worker", "r.yaml", "--devices", "cuda:0"]]
    assert soup_invocations("cd /srv && flock -n .lock .venv/bin/soup run s.yaml -q >> log 2>&1") == \
        [["run", "s.yaml", "-q", "2"]]
    assert soup_invocations("pip install x && soup demo --output d") == [["demo", "--output", "d"]]
    assert check_soup_args(["merge", "a", "b", "-o", "out", "--weights", "1,2", "--set", "density=0.5"]) == []
    assert check_soup_args(["merge", "a", "-o", "out", "--shard-sise", "5GB"]) == ["soup merge has no option --shard-sise"]
    assert check_soup_args(["mix", "a"])[0].startswith("no subcommand 'mix'")
    assert check_soup_args(["--debug", "merge", "a", "-o", "b"]) == []
    assert check_soup_args(["--verbose", "run", "r.yaml"]) == ["soup has no option --verbose before the subcommand"]


def test_readme_commands_are_the_documented_ones():
    """The two commands on a fresh clone, exactly; CI (.ci/run) runs the second."""
    text = (ROOT / "README.md").read_text()
    assert 'pip install torch==2.13.0 && pip install -e ".[dev]" && soup demo --output soup-demo' in text
    assert "```bash\npython -m pytest -q\n```" in text
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()
    assert len(text.splitlines()) <= 200, "the README is a front door: the reference belongs in docs/"


# ---- the API reference and the nav ---------------------------------------------------------------------
def test_api_reference_covers_the_public_api():
    entries = set(re.findall(r"^::: ([\w.]+)", (DOCS / "api.md").read_text(), re.M))
    for name in soup.__all__:
        if name == "__version__":
            continue
        obj = getattr(soup, name)
        assert f"{obj.__module__}.{obj.__qualname__}" in entries, f"docs/api.md lacks soup.{name}"
    for base in ("soup.soups.evaluate.Evaluator", "soup.soups.strategies.SoupStrategy",
                 "soup.methods.base.MergeMethod"):
        assert base in entries, f"docs/api.md lacks the plug-in base class {base}"


def test_every_page_is_in_the_nav():
    def files(nav):
        for item in nav:
            if isinstance(item, str):
                yield item
            elif isinstance(item, dict):
                for value in item.values():
                    yield from (files(value) if isinstance(value, list) else [value])

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["strict"] is True
    nav = set(files(config["nav"]))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages <= nav, f"pages missing from the nav in mkdocs.yml: {sorted(pages - nav)}"
    assert nav <= pages, f"nav entries without a page: {sorted(nav - pages)}"
