"""Command evaluator: run any external benchmark CLI on a candidate and read its score back.

Works with lm-evaluation-harness, VLMEvalKit, OpenCompass or a shell script of your own. The command
gets the candidate as an HF-layout folder and reports a number, either in a JSON file or on stdout.

Placeholders, replaced in every argument of ``cmd``, in ``result``, ``cwd`` and ``env`` values:

- ``{model}``: ``candidate.path()`` (the folder is written only when some argument uses it);
- ``{output}``: a path in a fresh temporary folder that the command may write (removed afterwards).
- ``{indices}``: with ``examples: N`` (per-example scores, for racing), a JSON file listing the example
  indices to score (see below).

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

Per-example scores (racing, docs/racing.md): with ``examples: N`` the command scores the examples whose
indices (0..N-1) the ``{indices}`` file lists, as a JSON list of the indices, and gives one number per
index, in that order, as a JSON list: in the ``result`` file when given, else on stdout (the whole of
it, or its last line that parses as JSON), at the key path ``per_example`` (default: the whole JSON is
the list). ``score`` runs it on all N and returns their mean (``mean_score``), so ``key`` and ``regex``
are not used and are refused. A list of another length, a non-list or a non-finite value is one line.
``example_range: [low, high]`` bounds each value (``[0, 1]`` for accuracy), for racing's scale.

    CommandEvaluator(cmd="python bench.py --model {model} --only {indices}", examples=500,
                     per_example="correct", example_range=[0, 1])
    # bench.py reads the indices file and prints {"correct": [1, 0, 1, ...]}

Example::

    CommandEvaluator(cmd="lm_eval --model hf --model_args pretrained={model} --tasks arc_easy "
                         "--output_path {output}",
                     result="{output}/**/results_*.json", key="results.arc_easy.acc,none",
                     timeout=3600)
"""

from __future__ import annotations

import collections
import contextlib
import json
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
from soup.soups.evaluate import Candidate, Evaluator, mean_score

from soup.evaluators.command_output import (as_float, check_examples, lookup_key, number_from_stdout,
                                              parse_stdout_json, per_example_values, quote_tail, read_json_file)

__all__ = ["CommandEvaluator", "lookup_key"]

_TAIL_LINES = 20  # stderr lines quoted in errors


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
        examples: N, the command's number of examples: per-example scores through ``{indices}``.
        per_example: with ``examples``: the key path of the per-example list (default: the whole JSON).
        example_range: with ``examples``: ``[low, high]``, the bounds of each per-example value.

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
        if self._examples is not None and (key is not None or regex is not None):
            raise EvaluatorError("command: with examples: N the score is the mean of the per-example values; "
                                 "drop key/regex (per_example names the list)")
        if self._examples is not None:
            self.score_is_mean = True  # the score is the mean of the per-example values (docstring)
            self.example_range = (float(example_range[0]), float(example_range[1])) if example_range else None

    def score(self, candidate: Candidate) -> float | dict[str, float]:
        """Run the command for ``candidate`` and return its score (or metrics).

        Args:
            candidate: the candidate; its folder is written only if ``{model}`` is used.

        Returns:
            A float, or ``{metric: value}`` when ``key`` is a mapping; with ``examples: N``, the mean of
            the N per-example values.

        Raises:
            EvaluatorError: see the class docstring.
        """
        if self._examples is not None:
            return mean_score(self._invoke(candidate, list(range(self._examples))))
        return self._invoke(candidate, None)

    def examples(self) -> int | None:
        """``examples`` when given (per-example scores through ``{indices}``), else None."""
        return self._examples

    def score_examples(self, candidate: Candidate, indices: Sequence[int]) -> list[float]:
        """Run the command with ``{indices}`` naming a JSON file of these example indices; read one value
        per index from ``per_example`` (a key path in the result file or stdout JSON; default: the whole
        JSON, a list)."""
        if self._examples is None:
            raise EvaluatorError("command: no per-example scores without examples: N")
        n = self._examples
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise EvaluatorError(f"command: example index out of range 0..{n - 1}: {bad[0]}")
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
                data = read_json_file(sub(a["result"]), argv, stderr_tail) if a["result"] else \
                    parse_stdout_json(stdout, argv, stderr_tail)
                got = lookup_key(data, a["per_example"], where="per_example") if a.get("per_example") else data
                return per_example_values(got, len(indices), argv, stderr_tail, self.example_range)
            if a["result"]:
                data = read_json_file(sub(a["result"]), argv, stderr_tail)
                return self._extract(data, argv, stderr_tail, f"result file {sub(a['result'])}")
            if a["key"] is not None:
                return self._extract(parse_stdout_json(stdout, argv, stderr_tail), argv,
                                     stderr_tail, "stdout")
            return number_from_stdout(stdout, self._regex, argv, stderr_tail)
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
                                 + quote_tail(tail))
        if proc.returncode != 0:
            raise EvaluatorError(f"command {name!r} exited with status {proc.returncode}"
                                 + quote_tail(tail))
        return b"".join(out_chunks).decode("utf-8", "replace"), tail

    # --- reading --------------------------------------------------------------------------------

    def _extract(self, data: Any, argv: list[str], tail: str, where: str) -> float | dict[str, float]:
        key = self.args["key"]
        if key is None:  # a result file without key: the file must hold a number
            return as_float(data, argv, tail, where)
        if isinstance(key, Mapping):
            return {metric: as_float(lookup_key(data, path, where=where), argv, tail, where)
                    for metric, path in key.items()}
        return as_float(lookup_key(data, key, where=where), argv, tail, where)


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
