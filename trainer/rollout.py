"""Rollouts: run an unchanged agent once per (task, sample), capture each run as an episode, grade it.

``run_rollouts(tasks, agent, group_size=G, concurrency=C, ...)`` runs every task
``G`` times (rollout ids ``0..G-1``), ``C`` episodes at a time, and returns a
``RolloutSummary``. The agent is one of three kinds (docs/rollout.md says which to use):

* a Python callable (``"module:function"`` or the function itself): imported once,
  called concurrently in this process, each call inside its own episode root span,
  with the OpenAI client captured as ``tracetrain run`` captures it;
* a command (``CommandAgent``): one process per episode, captured like
  ``tracetrain run``; the task arrives as ``$TRACETRAIN_TASK``, on stdin and in
  ``{task}``/``{prompt}`` placeholders;
* a long-lived process (``ServerAgent``) fed JSON-lines tasks on stdin.

The runner opens each episode's span itself and ends it with the outcome: a crash,
a non-zero exit, an exception or a timeout marks it as an error (``has_error`` in
the ``episodes`` view; the trainer leaves such episodes out) and the other episodes
go on. A grader's reward (or one the agent reports in its result) is recorded as a
``reward`` span inside the episode.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tracetrain.instrumentation import semconv as sc

from .rollout_agents import Agent, AgentOutcome, CallableAgent, CommandAgent, make_agent
from .rollout_grader import CallableGrader, CommandGrader, Grader, make_grader
from .rollout_server import ServerAgent
from .rollout_tracing import RolloutTracing

logger = logging.getLogger(__name__)

__all__ = ["CallableAgent", "CallableGrader", "CommandAgent", "CommandGrader", "EpisodeResult", "EpisodeSpec",
           "RolloutError", "RolloutSummary", "ServerAgent", "load_tasks", "run_rollouts"]

OK, FAILED, TIMEOUT = "ok", "failed", "timeout"
DEFAULT_COLLECTOR = "http://127.0.0.1:4317"


class RolloutError(ValueError):
    """Bad input to a rollout (tasks file, agent or grader spec)."""


@dataclass(frozen=True)
class EpisodeSpec:
    """One run of the agent: a task, which sample of it, and the ids its spans carry."""

    task: dict
    task_id: str
    rollout_id: str
    episode_id: str

    def ids(self) -> dict[str, str]:
        """The semconv id attributes of this episode."""
        return {sc.EPISODE_ID: self.episode_id, sc.TASK_ID: self.task_id, sc.ROLLOUT_ID: self.rollout_id}


@dataclass
class EpisodeResult:
    """What one episode gave (one line of ``--out``)."""

    episode_id: str
    task_id: str
    rollout_id: str
    status: str  # ok | failed | timeout
    answer: Any = None
    reward: float | None = None
    reward_source: str | None = None  # grader | agent | self (the agent emitted it) | failure
    error: str | None = None
    duration_s: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class RolloutSummary:
    """All episodes of one ``run_rollouts`` call and their totals."""

    run_id: str
    wall_s: float  # everything, agent start-up included
    results: list[EpisodeResult] = field(default_factory=list)
    startup_s: float = 0.0  # starting the agent (agent servers: until every process is ready)

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def n_episodes(self) -> int:
        return len(self.results)

    @property
    def n_ok(self) -> int:
        return self.count(OK)

    @property
    def n_failed(self) -> int:
        return self.count(FAILED)

    @property
    def n_timed_out(self) -> int:
        return self.count(TIMEOUT)

    @property
    def n_rewarded(self) -> int:
        return sum(1 for r in self.results if r.reward is not None)

    @property
    def mean_reward(self) -> float | None:
        """Mean over the episodes with a known reward (None when none has one)."""
        rewards = [r.reward for r in self.results if r.reward is not None]
        return sum(rewards) / len(rewards) if rewards else None

    @property
    def episodes_per_s(self) -> float:
        """Episodes per second once the agent is up (start-up is paid once per run, not per episode)."""
        running_s = self.wall_s - self.startup_s
        return self.n_episodes / running_s if running_s > 0 else 0.0

    def to_json(self) -> dict:
        return {"run_id": self.run_id, "episodes": self.n_episodes, "ok": self.n_ok, "failed": self.n_failed,
                "timed_out": self.n_timed_out, "rewarded": self.n_rewarded, "mean_reward": self.mean_reward,
                "wall_s": round(self.wall_s, 3), "startup_s": round(self.startup_s, 3),
                "episodes_per_s": round(self.episodes_per_s, 2)}


def load_tasks(path: str | Path) -> list[dict]:
    """Tasks from a JSON-lines file: one object per line with a non-empty ``id`` (blank lines skipped).

    Raises:
        RolloutError: unreadable file, a line that is not a JSON object, a missing or duplicate id.
    """
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise RolloutError(f"cannot read tasks file {path}: {error}") from None
    tasks = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            task = json.loads(line)
        except json.JSONDecodeError as error:
            raise RolloutError(f"{path}:{number}: not JSON ({error.msg})") from None
        tasks.append(task)
    check_tasks(tasks, where=str(path))
    return tasks


def check_tasks(tasks: Sequence[Any], where: str = "tasks") -> None:
    """Every task is a dict with a unique non-empty string/int ``id``; raises RolloutError."""
    seen: set[str] = set()
    for index, task in enumerate(tasks, 1):
        if not isinstance(task, dict):
            raise RolloutError(f"{where}: task {index} is not a JSON object")
        task_id = task.get("id")
        if isinstance(task_id, bool) or not isinstance(task_id, (str, int)) or str(task_id) == "":
            raise RolloutError(f"{where}: task {index} has no \"id\" (a non-empty string or integer)")
        if str(task_id) in seen:
            raise RolloutError(f"{where}: task id {task_id!r} appears twice")
        seen.add(str(task_id))
    if not tasks:
        raise RolloutError(f"{where}: no tasks")


def episode_specs(tasks: Iterable[dict], group_size: int, run_id: str) -> list[EpisodeSpec]:
    """G specs per task, interleaved by sample so an early stop still covers every task."""
    tasks = list(tasks)
    return [EpisodeSpec(task, str(task["id"]), str(k), f"{run_id}-{task['id']}-{k}")
            for k in range(group_size) for task in tasks]


def run_rollouts(tasks: Sequence[dict], agent: Agent | Callable | str, *, group_size: int = 1,
                 concurrency: int = 8, collector: str | None = None, protocol: str = "grpc",
                 grader: Grader | Callable | str | None = None, timeout_s: float = 300.0,
                 failure_reward: float | None = None, run_id: str | None = None, agent_name: str | None = None,
                 service_name: str | None = None,
                 on_result: Callable[[EpisodeResult], None] | None = None) -> RolloutSummary:
    """Run every task ``group_size`` times through ``agent``, ``concurrency`` at a time.

    Args:
        tasks: dicts with an ``id``; the whole dict is handed to the agent.
        agent: a callable or ``"module:function"`` (called in this process), a command
            string (one process per episode), or an ``Agent`` (``CommandAgent``,
            ``CallableAgent``, ``ServerAgent``).
        group_size: samples per task (rollout ids ``"0"..str(G-1)``).
        concurrency: episodes in flight at once.
        collector: OTLP endpoint for the episodes' spans [default $OTEL_EXPORTER_OTLP_ENDPOINT,
            else http://127.0.0.1:4317].
        protocol: ``grpc`` or ``http/protobuf``.
        grader: ``(task, answer) -> float`` callable, ``"module:function"``, a command, or a
            ``Grader``; applied unless the agent gave its own reward.
        timeout_s: per-episode limit; past it the episode is recorded as ``timeout``.
        failure_reward: reward recorded for failed / timed-out episodes (default none: they
            are only marked as errors and the trainer leaves them out).
        run_id: prefix of the episode ids ``<run_id>-<task_id>-<k>`` [default: random].
        agent_name: ``gen_ai.agent.name`` of the episodes.
        service_name: ``service.name`` of the runner's (and command agents') spans.
        on_result: called with each EpisodeResult as it completes (progress bars).

    Raises:
        RolloutError: bad tasks, agent or grader, or arguments out of range.
    """
    if group_size < 1 or concurrency < 1 or not timeout_s > 0:
        raise RolloutError("group_size and concurrency must be >= 1 and timeout_s > 0")
    check_tasks(tasks)
    run_id = run_id or uuid.uuid4().hex[:8]
    started = time.perf_counter()
    try:
        agent = make_agent(agent, service_name)
        grader = make_grader(grader)
    except ValueError as error:
        raise RolloutError(str(error)) from None
    tracing = RolloutTracing(collector, protocol, service_name or "tracetrain-rollout",
                             in_process=agent.in_process)
    specs = episode_specs(tasks, group_size, run_id)
    results: list[EpisodeResult] = []
    try:
        try:
            agent.start(tracing, concurrency, timeout_s)
        except ValueError as error:
            raise RolloutError(str(error)) from None
        startup_s = time.perf_counter() - started
        _run_all(specs, agent, grader, tracing, concurrency, timeout_s, failure_reward, agent_name,
                 lambda result: (results.append(result), on_result and on_result(result)))
    finally:
        agent.close()
        tracing.flush()
    return RolloutSummary(run_id, time.perf_counter() - started, results, startup_s)


def _run_all(specs: list[EpisodeSpec], agent: Agent, grader: Grader | None, tracing: RolloutTracing,
             concurrency: int, timeout_s: float, failure_reward: float | None, agent_name: str | None,
             report: Callable[[EpisodeResult], Any]) -> None:
    """Worker threads take specs off a queue; results are reported from one thread, in completion order."""
    pending: queue.Queue = queue.Queue()
    for spec in specs:
        pending.put(spec)
    done: queue.Queue = queue.Queue()

    def work() -> None:
        while True:
            try:
                spec = pending.get_nowait()
            except queue.Empty:
                return
            try:
                done.put(run_episode(spec, agent, grader, tracing, timeout_s, failure_reward, agent_name))
            except BaseException as error:  # noqa: BLE001 - a runner bug must not hang the others
                logger.exception("episode %s: runner error", spec.episode_id)
                done.put(EpisodeResult(spec.episode_id, spec.task_id, spec.rollout_id, FAILED,
                                       error=f"runner error: {type(error).__name__}: {error}"))

    workers = [threading.Thread(target=work, name=f"rollout-{i}", daemon=True)
               for i in range(min(concurrency, len(specs)))]
    for worker in workers:
        worker.start()
    for _ in specs:
        report(done.get())


def run_episode(spec: EpisodeSpec, agent: Agent, grader: Grader | None, tracing: RolloutTracing,
                timeout_s: float, failure_reward: float | None, agent_name: str | None) -> EpisodeResult:
    """One episode: open its span, run the agent, grade, record the reward, end the span."""
    started = time.perf_counter()
    span = tracing.start_episode(spec, agent_name, agent.in_process)
    outcome = AgentOutcome(FAILED, error="not run")
    reward, source = None, None
    try:
        outcome = agent.run(spec, timeout_s, span)
        reward, source = _reward_of(spec, outcome, grader, tracing, span)
        if outcome.status != OK and failure_reward is not None:
            reward, source = failure_reward, "failure"
        if reward is not None and source != "self":
            tracing.emit_reward(span, spec, reward, name=source, reason=outcome.error)
    finally:
        tracing.end_episode(span, outcome.status, outcome.error, outcome.exit_code)
    return EpisodeResult(spec.episode_id, spec.task_id, spec.rollout_id, outcome.status, outcome.answer, reward,
                         source, outcome.error, round(time.perf_counter() - started, 4))


def _reward_of(spec: EpisodeSpec, outcome: AgentOutcome, grader: Grader | None, tracing: RolloutTracing,
               span: Any) -> tuple[float | None, str | None]:
    """The agent's own reward if it gave one, else the grader's (ok episodes only)."""
    if outcome.reward is not None:
        return outcome.reward, "agent"
    if outcome.status != OK:
        return None, None
    own = tracing.own_reward(span)
    if own is not None:
        return own, "self"
    if grader is None:
        return None, None
    try:
        value = float(grader.grade(spec.task, outcome.answer, timeout_s=None))
        if not math.isfinite(value):
            raise ValueError(f"not finite: {value}")
        return value, "grader"
    except Exception as error:  # noqa: BLE001 - a grader failure leaves the episode unrewarded
        outcome.error = f"grader failed: {type(error).__name__}: {error}"
        logger.warning("episode %s: %s", spec.episode_id, outcome.error)
        return None, None
