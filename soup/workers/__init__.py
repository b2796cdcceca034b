"""Evaluating on several machines: an evaluation queue on an optuna study, drained by ``soup worker``.

With a storage URL given by the user (``soup run RECIPE --storage URL``, ``cook(storage=...)``) the
coordinator's ``Scorer.score`` / ``score_many`` do not evaluate candidates in-process: each candidate
becomes a WAITING trial of a *queue study* in that storage (its weights as params; its cache key,
name, weights and per-pattern groups as user attributes), and the coordinator waits until a trial
with that key is COMPLETE. ``soup worker RECIPE --storage URL``, on any number of machines, claims
WAITING trials one at a time, evaluates each with its own evaluator (through its own score cache)
and completes the trial with the score.

- **One queue per run identity.** The study's name is derived from the ingredients' content
  fingerprints, the evaluator's identity, the rules and the dtype (``queue_name``): a worker given
  the same recipe computes the same name. The coordinator creates the study (retrying the race of a
  first creation); workers wait for it, and say what differs when they find a study for another
  identity (a copied ingredient with another modification time, another evaluator argument).
- **Dead workers.** A worker records optuna's trial heartbeat while it evaluates; a trial whose
  heartbeat stops (a preempted node, an OOM kill, SIGKILL) is failed as stale by the next worker or
  the coordinator (``optuna.storages.fail_stale_trials``), and ``RetryHeartbeatStaleTrialCallback``
  puts a copy back in the queue, at most ``max_retry`` times. A worker told to stop (SIGTERM,
  Ctrl-C) hands its trial back at once instead.
- **Never counted twice.** The coordinator takes the first COMPLETE trial per key. A worker that
  was only slow cannot complete a trial that was handed on (optuna refuses to update a finished
  trial); its score still lands in the score cache, under the same content key, which is harmless.
- **Done.** Each coordinator run writes ``run:<id>`` into the study's user attributes and marks it
  done when it needs no more evaluations (its queued trials that nobody took are cancelled). A
  worker exits when every run it has seen is done, or after ``idle_timeout`` seconds with nothing to
  do. Workers register as ``worker:<id>`` (host, pid, devices, last seen): ``Scorer.parallelism``
  counts the live ones, and optuna-dashboard shows them.
- **The coordinator evaluates too** unless told not to (``local_worker=False``,
  ``--no-local-worker``): while it waits it takes queued trials itself, on its own devices, so a
  coordinator alone (``soup run --storage sqlite:///x.db``) always finishes.

The heartbeat settings are the coordinator's (environment variables ``SOUP_HEARTBEAT_INTERVAL``,
default 30 s, ``SOUP_HEARTBEAT_GRACE``, default 120 s, and ``SOUP_MAX_RETRY``, default 3); it writes
them into the study and workers adopt them, so every machine judges staleness alike.

The modules:

- ``settings``: ``QueueSettings``, the queue's identity and name, ``shared_cache``.
- ``queue``: opening the storage (with retries), claims (table ``soup_claims``), the ``_Queue`` wrapper.
- ``runner``: ``_Runner``, which claims queued candidates and evaluates them on a local Scorer.
- ``coordinator``: ``EvaluationQueue``, the coordinator's side (``soup.pipeline`` injects it into the Scorer).
- ``join``: ``worker()`` (``soup worker``) and ``WorkerResult``; ``scratch``: a worker's scratch folder.
"""

from soup.workers.coordinator import EvaluationQueue
from soup.workers.join import WorkerResult, worker
from soup.workers.settings import QueueSettings, queue_identity, queue_name, shared_cache

__all__ = ["worker", "WorkerResult", "EvaluationQueue", "QueueSettings", "queue_name", "queue_identity",
           "shared_cache"]
