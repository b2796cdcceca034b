"""Command evaluator: run any external benchmark CLI on a candidate and read its score back.

Works with lm-evaluation-harness, VLMEvalKit, OpenCompass or a shell script of your own. The command
gets the candidate as an HF-layout folder and reports a number, either in a JSON file or on stdout.

Placeholders, replaced in every argument of ``cmd``, in ``result``, ``cwd`` and ``env`` values:

- ``{model}``: ``candidate.path()`` (the folder is written only when some argument uses it);
- ``{output}``: a path in a fresh temporary folder that the command may write (removed afterwards).
- ``{indices}``: with ``examples: N`` (racing), a JSON file listing the example indices to score; the
  command gives one value per index as a JSON list (at ``per_example``, a key path; default the whole
  JSON) in its result file or on stdout, and the score is their mean over all N.

A ``cmd`` string is split with ``shlex.split`` (POSIX shell quoting rules) *before* substitution, so
a path with spaces stays one argument; no shell runs (pipes, ``&&``, globs and ``$VAR`` are not
interpreted: use ``["bash", "-c", "..."]`` for that). A list is used as given.

Reading the score:

- ``result`` given: that JSON file (a glob such as ``{output}/**/results_*.json`` takes the newest
  match), at the dotted path ``key``;
- else stdout: parsed as JSON at ``key`` when ``key`` is given (the whole stdout, else its last line
  that parses), else the first group of the last match of ``regex``, else the last number printed.

``key`` is a dotted path (``results.mmlu.acc,none``) in which an integer indexes a list
(``runs.0.score`` or ``runs[0].score``); a dict key that itself contains dots is matched too. A
mapping ``{metric: path}`` reads several metrics; ``primary`` names the one used for selection.

Example::

    CommandEvaluator(cmd="lm_eval --model hf --model_args pretrained={model} --tasks arc_easy "
                         "--output_path {output}",
                     result="{output}/**/results_*.json", key="results.arc_easy.acc,none",
                     timeout=3600)
"""

from __future__ import annotations

import collections
import contextlib
import glob
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from soup.errors import EvaluatorError
from soup.signals import child_process
from soup.soups.evaluate import Candidate, Evaluator

__all__ = ["CommandEvaluator", "lookup_key"]

_TAIL_LINES = 20  # stderr lines quoted in errors
_NUMBER = re.compile(r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|\b(?:nan|inf(?:inity)?)\b)",
                     re.IGNORECASE)


class CommandEvaluator(Evaluator):
    """Score a candidate by running an external command.

    Args:
        cmd: the command, a string (split with ``shlex.split``) or a list of arguments.
        result: a JSON file to read the score from (placeholders and globs allowed); default stdout.
        key: a dotted path into the JSON, or a mapping ``{metric: dotted path}``.
        regex: for stdout without ``key``: a regular expression with one group holding the number;
            the last match wins.
        timeout: seconds before the command's whole process group is killed; None: no limit.
        direction: ``"maximize"`` (default) or ``"minimize"``.
        primary: with a ``key`` mapping, the metric used for selection.
        env: extra environment variables (values are strings; placeholders allowed).
        cwd: the working directory of the command.
        echo: copy the command's stderr to ours as it runs (progress bars of long benchmarks).

    Raises:
        EvaluatorError: from ``score``: the command is not found, exits non-zero, times out, or its
            result file, key or number is missing (the message names the command and quotes the last
            lines of its stderr).
    """

    name = "command"
    version = "1"

    def __init__(self, *, cmd: str | Sequence[str], result: str | None = None,
                 key: str | Sequence[str | int] | Mapping[str, str] | None = None,
                 regex: str | None = None, timeout: float | None = None,
                 direction: str = "maximize", primary: str | None = None,
                 env: Mapping[str, Any] | None = None, cwd: str | None = None,
                 echo: bool = False, examples: int | None = None, per_example: str | None = None,
                 example_range: Sequence[float] | None = None) -> None:
        extra = {k: v for k, v in (("examples", examples), ("per_example", per_example),
                                   ("example_range", list(example_range) if example_range is not None else None))
                 if v is not None}  # only when given: older cache keys stay as they were
        super().__init__(cmd=cmd if isinstance(cmd, str) else [str(c) for c in cmd], result=result,
                         key=dict(key) if isinstance(key, Mapping) else key, regex=regex,
                         timeout=timeout, direction=direction, primary=primary,
                         env={k: str(v) for k, v in (env or {}).items()}, cwd=cwd, echo=echo, **extra)
        try:
            self._argv = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
        except ValueError as e:
            raise EvaluatorError(f"command: cannot split cmd {cmd!r}: {e}") from e
        if not self._argv:
            raise EvaluatorError("command: cmd is empty")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise EvaluatorError(f"command: timeout must be a positive number of seconds, got {timeout!r}")
        self._regex = None
        if regex is not None:
            try:
                self._regex = re.compile(regex)
            except re.error as e:
                raise EvaluatorError(f"command: invalid regex {regex!r}: {e}") from e
            if self._regex.groups != 1:
                raise EvaluatorError(f"command: regex {regex!r} must have exactly one group")
        if isinstance(key, Mapping) and primary is None and len(key) > 1:
            raise EvaluatorError(f"command: key names metrics {sorted(key)}; say which is primary")
        self._examples = check_examples(examples, per_example, example_range,
                                        [*self._argv, cwd or "", *(str(v) for v in (env or {}).values())])
        if self._examples is not None:
            self.score_is_mean = True  # the score is the mean of the per-example values (docstring)
            self.example_range = (float(example_range[0]), float(example_range[1])) if example_range else None

    def score(self, candidate: Candidate) -> float | dict[str, float]:
        """Run the command for ``candidate`` and return its score (or metrics).

        Args:
            candidate: the candidate; its folder is written only if ``{model}`` is used.

        Returns:
            A float, or ``{metric: value}`` when ``key`` is a mapping.

        Raises:
            EvaluatorError: see the class docstring.
        """
        return self._invoke(candidate, None)

    def examples(self) -> int | None:
        """``examples`` when given (per-example scores through ``{indices}``), else None."""
        return self._examples

    def score_examples(self, candidate: Candidate, indices: Sequence[int]) -> list[float]:
        """Run the command with ``{indices}`` naming a JSON file of these example indices; read one value
        per index from ``per_example`` (a key path in the result file or stdout JSON; default: the whole
        JSON, a list)."""
        return self._invoke(candidate, list(indices))

    def _invoke(self, candidate: Candidate, indices: list[int] | None) -> Any:
        a = self.args
        uses_model = any("{model}" in str(s) for s in
                         (*self._argv, a["result"], a["cwd"], *a["env"].values()) if s)
        tmp = Path(tempfile.mkdtemp(prefix="soup-command-"))
        try:
            values = {"{model}": str(candidate.path()) if uses_model else "",
                      "{output}": str(tmp / "output"), "{indices}": str(tmp / "indices.json")}
            wanted = indices if indices is not None else list(range(self._examples or 0))
            (tmp / "indices.json").write_text(json.dumps(wanted))

            def sub(s: str) -> str:
                for placeholder, value in values.items():
                    s = s.replace(placeholder, value)
                return s

            argv = [sub(arg) for arg in self._argv]
            env = {**os.environ, **{k: sub(v) for k, v in a["env"].items()}}
            cwd = sub(a["cwd"]) if a["cwd"] else None
            stdout, stderr_tail = self._run(argv, env, cwd)
            if indices is not None:
                data = _read_json_file(sub(a["result"]), argv, stderr_tail) if a["result"] else \
                    _parse_stdout_json(stdout, argv, stderr_tail)
                got = lookup_key(data, a["per_example"], where="per_example") if a.get("per_example") else data
                return per_example_values(got, len(indices), argv, stderr_tail)
            if a["result"]:
                data = _read_json_file(sub(a["result"]), argv, stderr_tail)
                return self._extract(data, argv, stderr_tail, f"result file {sub(a['result'])}")
            if a["key"] is not None:
                return self._extract(_parse_stdout_json(stdout, argv, stderr_tail), argv,
                                     stderr_tail, "stdout")
            return _number_from_stdout(stdout, self._regex, argv, stderr_tail)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # --- running --------------------------------------------------------------------------------

    def _run(self, argv: list[str], env: dict[str, str], cwd: str | None) -> tuple[str, str]:
        """Run ``argv``; return (stdout, stderr tail) or raise on failure. Never waits past timeout."""
        posix = os.name == "posix"
        with contextlib.ExitStack() as stack:
            try:  # own process group (killed as one), and it dies with soup even if soup is SIGKILLed
                proc = stack.enter_context(child_process(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                         stderr=subprocess.PIPE, env=env, cwd=cwd))
            except FileNotFoundError as e:
                raise EvaluatorError(f"command not found: {argv[0]!r} ({e.strerror})") from e
            except OSError as e:
                raise EvaluatorError(f"cannot start command {argv[0]!r}: {e}") from e
            return self._wait(proc, argv, posix)

    def _wait(self, proc: subprocess.Popen, argv: list[str], posix: bool) -> tuple[str, str]:
        timeout = self.args["timeout"]
        out_chunks: list[bytes] = []
        err_lines: collections.deque[bytes] = collections.deque(maxlen=_TAIL_LINES)
        echo = self.args["echo"]

        def read_out() -> None:
            out_chunks.append(proc.stdout.read())

        def read_err() -> None:
            for line in iter(proc.stderr.readline, b""):
                err_lines.append(line)
                if echo:
                    sys.stderr.write(line.decode("utf-8", "replace"))

        readers = [threading.Thread(target=read_out, daemon=True),
                   threading.Thread(target=read_err, daemon=True)]
        for t in readers:
            t.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc, posix)
        except BaseException:  # KeyboardInterrupt: do not leave the benchmark running
            _kill_group(proc, posix)
            raise
        for t in readers:  # a grandchild that escaped the group may hold a pipe open: bounded wait
            t.join(timeout=5)
        tail = b"".join(err_lines).decode("utf-8", "replace").rstrip()
        name = Path(argv[0]).name
        if timed_out:
            raise EvaluatorError(f"command {name!r} timed out after {timeout} s and was killed"
                                 + _quote_tail(tail))
        if proc.returncode != 0:
            raise EvaluatorError(f"command {name!r} exited with status {proc.returncode}"
                                 + _quote_tail(tail))
        return b"".join(out_chunks).decode("utf-8", "replace"), tail

    # --- reading --------------------------------------------------------------------------------

    def _extract(self, data: Any, argv: list[str], tail: str, where: str) -> float | dict[str, float]:
        key = self.args["key"]
        if key is None:  # a result file without key: the file must hold a number
            return _as_float(data, argv, tail, where)
        if isinstance(key, Mapping):
            return {metric: _as_float(lookup_key(data, path, where=where), argv, tail, where)
                    for metric, path in key.items()}
        return _as_float(lookup_key(data, key, where=where), argv, tail, where)


def check_examples(examples: Any, per_example: Any, example_range: Any, texts: Sequence[str]) -> int | None:
    """The per-example arguments checked before any work: ``examples`` a whole number >= 1 given with an
    ``{indices}`` placeholder the command reads; ``per_example`` and ``example_range`` only with it."""
    if examples is None:
        if per_example is not None or example_range is not None:
            raise EvaluatorError("command: per_example and example_range need examples: N")
        return None
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise EvaluatorError(f"command: examples must be a whole number >= 1, got {examples!r}")
    if not any("{indices}" in t for t in texts):
        raise EvaluatorError("command: examples: N needs the {indices} placeholder in cmd, env or cwd "
                             "(the file naming the examples to score)")
    if example_range is not None and not (isinstance(example_range, (list, tuple)) and len(example_range) == 2 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in example_range)
            and example_range[0] < example_range[1]):
        raise EvaluatorError(f"command: example_range must be [low, high] with low < high, got {example_range!r}")
    return examples


def per_example_values(got: Any, n: int, argv: list[str], tail: str) -> list[float]:
    """The command's per-example values: a list of ``n`` finite numbers, else one line saying what came."""
    name = Path(argv[0]).name
    if not isinstance(got, list):
        raise EvaluatorError(f"command {name!r} gave {type(got).__name__} for its per-example scores, "
                             "expected a JSON list" + _quote_tail(tail))
    if len(got) != n:
        raise EvaluatorError(f"command {name!r} gave {len(got)} per-example scores for {n} examples"
                             + _quote_tail(tail))
    out = [_as_float(v, argv, tail, f"per-example score {i}") for i, v in enumerate(got)]
    if not all(math.isfinite(v) for v in out):
        raise EvaluatorError(f"command {name!r} gave a non-finite per-example score" + _quote_tail(tail))
    return out


def lookup_key(data: Any, key: str | Sequence[str | int], *, where: str = "JSON") -> Any:
    """Follow a dotted key path (``a.b[0].c`` or ``a.b.0.c``, or a list of parts) into JSON data.

    Args:
        data: parsed JSON.
        key: the path; at a dict, the longest run of parts joined by ``.`` that is a key wins, so
            keys containing dots work.
        where: names the source in errors.

    Returns:
        The value at the path.

    Raises:
        EvaluatorError: a part is missing (names the available keys at that level).
    """
    if isinstance(key, str):
        parts: list[str | int] = [p for p in re.sub(r"\[(\d+)\]", r".\1", key).split(".") if p != ""]
    else:
        parts = list(key)
    node, i = data, 0
    while i < len(parts):
        if isinstance(node, Mapping):
            for j in range(len(parts), i, -1):  # the longest dotted run that is a key
                joined = ".".join(str(p) for p in parts[i:j])
                if joined in node:
                    node, i = node[joined], j
                    break
            else:
                shown = ", ".join(map(str, list(node)[:12])) + (", ..." if len(node) > 12 else "")
                raise EvaluatorError(f"key {key!r} not found in {where}: no {parts[i]!r} "
                                     f"(available: {shown})")
        elif isinstance(node, list):
            try:
                node, i = node[int(parts[i])], i + 1
            except (ValueError, IndexError):
                raise EvaluatorError(f"key {key!r} not found in {where}: {parts[i]!r} is not an "
                                     f"index of a list of {len(node)}") from None
        else:
            raise EvaluatorError(f"key {key!r} not found in {where}: {parts[i - 1]!r} is a "
                                 f"{type(node).__name__}, not an object or list")
    return node


def _kill_group(proc: subprocess.Popen, posix: bool) -> None:
    """SIGTERM the process group, then SIGKILL it if it is still there 3 s later."""
    try:
        if posix:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        if posix:
            os.killpg(proc.pid, signal.SIGKILL)  # the leader may be gone while children remain
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _quote_tail(tail: str) -> str:
    return f"; stderr tail:\n{tail}" if tail else " (no stderr)"


def _read_json_file(pattern: str, argv: list[str], tail: str) -> Any:
    if any(c in pattern for c in "*?["):
        matches = [m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]
        if not matches:
            raise EvaluatorError(f"command {Path(argv[0]).name!r} wrote no file matching {pattern}"
                                 + _quote_tail(tail))
        path = max(matches, key=os.path.getmtime)
    else:
        path = pattern
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise EvaluatorError(f"command {Path(argv[0]).name!r} wrote no result file {path}"
                             + _quote_tail(tail)) from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvaluatorError(f"cannot read result file {path} of command {Path(argv[0]).name!r}: {e}") from e


def _parse_stdout_json(stdout: str, argv: list[str], tail: str) -> Any:
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        pass
    for line in reversed(stdout.splitlines()):
        if line.strip().startswith(("{", "[")):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise EvaluatorError(f"command {Path(argv[0]).name!r} printed no JSON on stdout "
                         f"(stdout ends: {stdout.strip()[-200:]!r})" + _quote_tail(tail))


def _number_from_stdout(stdout: str, regex: re.Pattern | None, argv: list[str], tail: str) -> float:
    name = Path(argv[0]).name
    if regex is not None:
        found = regex.findall(stdout)
        if not found:
            raise EvaluatorError(f"command {name!r}: regex {regex.pattern!r} matched nothing on "
                                 f"stdout (stdout ends: {stdout.strip()[-200:]!r})" + _quote_tail(tail))
        return _as_float(found[-1], argv, tail, "stdout")
    found = _NUMBER.findall(stdout)
    if not found:
        raise EvaluatorError(f"command {name!r} printed no number on stdout "
                             f"(stdout ends: {stdout.strip()[-200:]!r})" + _quote_tail(tail))
    return float(found[-1])


def _as_float(value: Any, argv: list[str], tail: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise EvaluatorError(f"command {Path(argv[0]).name!r}: {where} holds {value!r}, not a number")
    try:
        return float(value)
    except ValueError:
        raise EvaluatorError(f"command {Path(argv[0]).name!r}: {where} holds {value!r}, "
                             f"not a number") from None
